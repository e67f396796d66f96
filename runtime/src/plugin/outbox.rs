//! The outbox: outputs committed with their batch, then published by a forwarder per input
//! partition as an idempotent producer (producer id per plugin × partition, sequences assigned
//! at commit), so a crash during forwarding never duplicates an output.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::executor::PluginRuntime;
use super::spec::partition_key;
use crate::backoff::Backoff;
use crate::broker::{BrokerError, Caller, ProducerFields, Publish};
use crate::metrics;
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
    /// producer, and deletes each once acknowledged. A failure the forwarder cannot get past
    /// (its producer fenced, an output topic deleted) shows in the partition's status, the
    /// monitor and a metric, and is retried every few seconds in case an operator fixes it.
    pub(crate) async fn run_forwarder(self: Arc<Self>, partition: u32, cancel: CancellationToken) {
        let prefix = partition_key(b'o', partition, b"");
        let producer_id = self.spec.producer_ids[partition as usize];
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        'scan: loop {
            let (this, scan_prefix) = (self.clone(), prefix.clone());
            let scanned =
                crate::blocking::run(move || this.store.kv_scan(&this.namespace, &scan_prefix))
                    .await;
            let entries = match scanned {
                Ok(Ok(entries)) => entries,
                Ok(Err(e)) => {
                    self.forward_failed(partition, format!("reading the outbox: {e}"), false);
                    if !pause(&cancel, backoff.next()).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    self.forward_failed(partition, e.to_string(), false);
                    if !pause(&cancel, backoff.next()).await {
                        return;
                    }
                    continue;
                }
            };
            for (key, value) in entries {
                let Some(groups) = decode_groups(&value) else {
                    // Forwarding past it would reorder outputs: stop here and say so.
                    self.forward_failed(
                        partition,
                        format!(
                            "outbox entry {} is unreadable; outputs after it wait",
                            String::from_utf8_lossy(&key)
                        ),
                        true,
                    );
                    if !pause(&cancel, Duration::from_secs(5)).await {
                        return;
                    }
                    continue 'scan;
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
                        caller: Caller::Server,
                    };
                    tracing::debug!(message = "Forwarding outputs.", topic = %g.topic, output_partition = g.partition, records = publish.records.len(), base_seq = g.base_seq);
                    loop {
                        let e = match self.broker.publish(publish.clone()).await {
                            Ok(_) => break,
                            Err(e) => e,
                        };
                        let transient = matches!(
                            &e,
                            BrokerError::Unavailable(_)
                                | BrokerError::NotDurable { .. }
                                | BrokerError::WriteFailed { .. }
                        ) || matches!(&e, BrokerError::Storage(s) if !s.is_damage());
                        self.forward_failed(
                            partition,
                            format!("forwarding to {}/{}: {e}", g.topic, g.partition),
                            !transient,
                        );
                        let delay = if transient {
                            backoff.next()
                        } else {
                            Duration::from_secs(5)
                        };
                        if !pause(&cancel, delay).await {
                            return;
                        }
                    }
                }
                let (this, key) = (self.clone(), key.to_vec());
                loop {
                    let (this, key) = (this.clone(), key.clone());
                    let deleted = crate::blocking::run(move || {
                        this.store.kv_apply(&this.namespace, &[(key, None)])
                    })
                    .await;
                    match deleted {
                        Ok(Ok(())) => break,
                        Ok(Err(e)) => self.forward_failed(
                            partition,
                            format!("deleting a forwarded outbox entry: {e}"),
                            false,
                        ),
                        Err(e) => self.forward_failed(partition, e.to_string(), false),
                    }
                    if !pause(&cancel, backoff.next()).await {
                        return;
                    }
                }
                backoff.reset();
                self.forward_ok(partition);
            }
            tokio::select! {
                _ = self.outbox[partition as usize].notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Shows why outputs are stuck; `blocked`: retrying alone will not help.
    fn forward_failed(&self, partition: u32, why: String, blocked: bool) {
        let m = metrics::global();
        m.plugin_forward_failures.get_or_create(&self.label).inc();
        let shown = if blocked {
            format!("blocked: {why}")
        } else {
            format!("retrying: {why}")
        };
        let mut status = self.status.lock();
        let slot = &mut status[partition as usize].forwarding;
        if slot.as_deref() != Some(shown.as_str()) {
            *slot = Some(shown.clone());
            drop(status);
            self.log(format!("partition {partition}: outputs {shown}"));
            tracing::warn!(message = "Forwarding outputs failed.", plugin = %self.spec.name, partition, reason = %shown);
        }
    }

    fn forward_ok(&self, partition: u32) {
        let mut status = self.status.lock();
        if status[partition as usize].forwarding.take().is_some() {
            drop(status);
            self.log(format!("partition {partition}: outputs flow again"));
        }
    }
}

/// Sleeps `d`; `false` when cancelled.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}
