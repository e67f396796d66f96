//! The outbox: outputs committed with their batch, then published by a forwarder per input
//! partition as an idempotent producer (producer id per plugin × partition, sequences assigned
//! at commit), so a crash during forwarding never duplicates an output.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::executor::PluginRuntime;
use super::spec::partition_key;
use crate::broker::{ProducerFields, Publish};
use crate::record::Record;

/// One output partition's share of a batch's outputs, with its producer sequence.
pub(super) struct Group {
    pub(super) topic: String,
    pub(super) partition: u32,
    pub(super) base_seq: u64,
    pub(super) records: Vec<Record>,
}

pub(super) fn encode_groups(groups: &[Group]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
    for g in groups {
        out.extend_from_slice(&(g.topic.len() as u16).to_le_bytes());
        out.extend_from_slice(g.topic.as_bytes());
        out.extend_from_slice(&g.partition.to_le_bytes());
        out.extend_from_slice(&g.base_seq.to_le_bytes());
        let mut w = weir_codec::Writer::new();
        for r in &g.records {
            let headers: Vec<(&str, &[u8])> = r
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_ref()))
                .collect();
            w.push_out(&weir_codec::OutRecord {
                topic: &g.topic,
                key: r.key.as_deref(),
                value: &r.value,
                headers,
            });
        }
        let blob = w.finish();
        out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        out.extend_from_slice(&blob);
    }
    out
}

pub(super) fn decode_groups(b: &[u8]) -> Option<Vec<Group>> {
    let mut r = weir_codec::Reader::new(b);
    let n = r.u32().ok()?;
    let mut groups = Vec::new();
    for _ in 0..n {
        let topic = r.str16().ok()?.to_string();
        let partition = r.u32().ok()?;
        let base_seq = r.u64().ok()?;
        let blob = r.bytes32().ok()?;
        let records = weir_codec::decode_outputs(blob)
            .ok()?
            .iter()
            .map(output_record)
            .collect();
        groups.push(Group {
            topic,
            partition,
            base_seq,
            records,
        });
    }
    r.done().ok()?;
    Some(groups)
}

/// An output as a record to publish (stamped with broker time at append).
pub(super) fn output_record(o: &weir_codec::OutRecord<'_>) -> Record {
    Record {
        key: o.key.map(Bytes::copy_from_slice),
        value: Bytes::copy_from_slice(o.value),
        headers: o
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v)))
            .collect(),
        timestamp_ms: 0,
        id: None,
    }
}

impl PluginRuntime {
    /// Publishes the partition's outbox entries in order, as the partition's idempotent
    /// producer, and deletes each once acknowledged.
    pub(crate) async fn run_forwarder(self: Arc<Self>, partition: u32, cancel: CancellationToken) {
        let prefix = partition_key(b'o', partition, b"");
        let producer_id = self.spec.producer_ids[partition as usize];
        loop {
            let entries = self
                .store
                .kv_scan(&self.namespace, &prefix)
                .unwrap_or_default();
            for (key, value) in entries {
                let Some(groups) = decode_groups(&value) else {
                    self.log(format!(
                        "partition {partition}: unreadable outbox entry skipped"
                    ));
                    continue;
                };
                for g in groups {
                    let publish = Publish {
                        topic: g.topic.clone(),
                        partition: Some(g.partition),
                        records: g.records,
                        producer: Some(ProducerFields {
                            producer_id,
                            epoch: 0,
                            base_sequence: g.base_seq,
                        }),
                    };
                    tracing::debug!(message = "Forwarding outputs.", topic = %g.topic, output_partition = g.partition, records = publish.records.len(), base_seq = g.base_seq);
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        match self.broker.publish(publish.clone()).await {
                            Ok(_) => break,
                            Err(e) => {
                                self.log(format!("partition {partition}: forwarding to {} failed, will retry: {e}", g.topic));
                                tokio::select! {
                                    _ = tokio::time::sleep(backoff) => {}
                                    _ = cancel.cancelled() => return,
                                }
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                }
                let _ = self
                    .store
                    .kv_apply(&self.namespace, &[(key.to_vec(), None)]);
            }
            tokio::select! {
                _ = self.outbox[partition as usize].notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }
}
