//! Recovering a partition on a node that starts (or rebuilds its view): a scan of the whole
//! partition's headers, then the walk over what arrived after it.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use parking_lot::Mutex;
use weir_core::TopicPartition;
use weir_log::{LogError, RecoveredPartition};

use crate::partition::{advance, classify_parts, Walked};
use crate::{engine, JetStreamLog, PartState};

impl JetStreamLog {
    /// Reads a whole partition's headers (not its records) through an ordered consumer:
    /// what a node starting on an empty data directory needs to index it. Producer states,
    /// the only payloads needed, are fetched one by one afterwards (one per producer).
    async fn scan_headers(
        &self,
        tp: &TopicPartition,
        st: &mut PartState,
        mut seen: impl FnMut(Walked),
    ) -> Result<(), LogError> {
        use futures::StreamExt;
        let failed = |e: &dyn std::fmt::Display| engine(&format!("scan {tp}"), e);
        let stream = self.stream(&tp.topic).await?;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.names.partition_subjects(&tp.topic, tp.partition),
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(());
        }
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        let mut producer_seqs: HashMap<u64, u64> = HashMap::new();
        loop {
            let next = tokio::time::timeout(self.options.request_timeout, messages.next())
                .await
                .map_err(|_| failed(&"no message within the request timeout"))?;
            let Some(m) = next else {
                return Err(failed(&"the consumer ended early"));
            };
            let m = m.map_err(|e| failed(&e))?;
            let info = m.info().map_err(|e| failed(&e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let walked = classify_parts(m.subject.as_str(), seq, m.headers.as_ref(), &m.payload);
            if let Walked::Producer { id, .. } = walked {
                st.walked_seq = seq;
                st.producer_seqs.insert(id, seq);
                producer_seqs.insert(id, seq);
            } else if advance(st, &walked, seq) {
                seen(walked);
            }
            if pending == 0 {
                break;
            }
        }
        let mut producers: Vec<(u64, u64)> = producer_seqs.into_iter().collect();
        producers.sort_by_key(|(_, seq)| *seq);
        for (id, seq) in producers {
            match stream.raw_message_builder().sequence(seq).send().await {
                Ok(m) => seen(Walked::Producer {
                    id,
                    state: m.payload,
                }),
                // Replaced by a newer state since the scan: the walk after it reads that one.
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(failed(&e)),
            }
        }
        Ok(())
    }

    pub(crate) fn recover_once(&self, tp: &TopicPartition) -> Result<RecoveredPartition, LogError> {
        let mut st = PartState::default();
        let mut chunks = Vec::new();
        let mut producers: HashMap<u64, Bytes> = HashMap::new();
        let mut collect = |w| match w {
            Walked::Chunk { base, meta, .. } => chunks.push((base, meta)),
            Walked::Producer { id, state } => {
                producers.insert(id, state);
            }
            Walked::ChunkPart | Walked::Closed => {}
        };
        self.block_on(async {
            self.scan_headers(tp, &mut st, &mut collect).await?;
            // What arrived after the scan's snapshot.
            self.walk(tp, &mut st, &mut collect).await
        })?;
        let start_offset = chunks.first().map(|(b, _)| *b).unwrap_or(st.next);
        self.parts
            .lock()
            .insert(tp.clone(), Arc::new(Mutex::new(st)));
        Ok(RecoveredPartition {
            start_offset,
            chunks,
            producers: producers.into_iter().collect(),
        })
    }
}
