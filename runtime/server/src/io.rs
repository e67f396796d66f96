//! The plugin core's seams over this server's broker and monitor: plugins read their input
//! from the broker, publish their outputs to it as the server's idempotent producers, and
//! report probes to the monitor's book.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;
use weir_broker::{Broker, BrokerError, Caller, ProducerFields, Publish, TopicLookup};
use weir_core::{ProbeMarker, ReadLimits, StartAt, StoredRecord, TopicConfig};
use weir_plugins::{Acked, Input, IoError, Output, OutputBatch, ProbeSink};

use crate::monitor::probe::ProbeBook;
use crate::statuses::{broker_code, io_kind};

fn io(e: BrokerError) -> IoError {
    let (code, name) = broker_code(&e);
    IoError {
        kind: io_kind(code),
        name,
        message: e.to_string(),
    }
}

/// A plugin's output batch as the broker's publish by its server-owned idempotent producer.
fn server_publish(broker: &Broker, batch: OutputBatch) -> Publish {
    Publish {
        topic: batch.topic,
        partition: Some(batch.partition),
        records: batch.records,
        producer: Some(ProducerFields {
            producer_id: batch.producer_id,
            // 0 unless a client bumped it before plugins' producers were the server's; only
            // this plugin partition's forwarder uses the id, so its epoch is current.
            epoch: broker.server_producer_epoch(batch.producer_id).unwrap_or(0),
            base_sequence: batch.base_sequence,
        }),
        caller: Caller::Server,
    }
}

/// The broker as a plugin's input and output.
pub struct BrokerIo(pub Arc<Broker>);

#[async_trait]
impl Input for BrokerIo {
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        limits: ReadLimits,
    ) -> Result<Vec<StoredRecord>, IoError> {
        self.0
            .read_limited(topic, partition, from, limits)
            .await
            .map_err(io)
    }

    async fn know_topic(&self, topic: &str) {
        // A shared log: another node may have created it a moment ago (one look at the
        // store finds it), and a topic being created may not open at once (its configuration
        // is written before its stream): only that case waits, up to 10 s. A name the log
        // does not have (misspelt) returns at once, and the caller says it is unknown.
        for _ in 0..20 {
            match self.0.look_up_topic(topic).await {
                Ok(TopicLookup::Opening) => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                _ => return,
            }
        }
    }

    fn watch(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>, IoError> {
        self.0.watch(topic, partition).map_err(io)
    }

    fn partition_count(&self, topic: &str) -> Result<u32, IoError> {
        self.0.partition_count(topic).map_err(io)
    }

    async fn resolve_start(
        &self,
        topic: &str,
        partition: u32,
        start: StartAt,
    ) -> Result<u64, IoError> {
        self.0
            .resolve_start(topic, partition, start)
            .await
            .map_err(io)
    }
}

#[async_trait]
impl Output for BrokerIo {
    async fn append(&self, batch: OutputBatch) -> Result<Acked, IoError> {
        let pending = self
            .0
            .append(server_publish(&self.0, batch))
            .await
            .map_err(io)?;
        Ok(Box::pin(async move {
            pending.acked().await.map(drop).map_err(io)
        }))
    }

    fn partition_count(&self, topic: &str) -> Result<u32, IoError> {
        self.0.partition_count(topic).map_err(io)
    }

    fn max_record_bytes(&self) -> usize {
        self.0.config().max_record_bytes
    }

    async fn new_producer(&self) -> Result<u64, IoError> {
        Ok(self
            .0
            .init_producer(None, &Caller::Server)
            .await
            .map_err(io)?
            .0)
    }

    async fn claim_producers(&self, ids: &[u64]) -> Result<(), IoError> {
        self.0.claim_for_server(ids).await.map_err(io)
    }

    async fn release_producers(&self, ids: &[u64]) -> Result<(), IoError> {
        self.0.release_server_producers(ids).await.map_err(io)
    }

    async fn ensure_topic(&self, name: &str, partitions: u32) -> Result<(), IoError> {
        if self.0.partition_count(name).is_ok() {
            return Ok(());
        }
        match self
            .0
            .create_topic(TopicConfig::new(name, partitions))
            .await
        {
            Ok(_) | Err(BrokerError::TopicExists(_)) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }
}

impl ProbeSink for ProbeBook {
    fn record(&self, plugin: &str, partition: u32, marker: ProbeMarker, delay_ms: u64) {
        ProbeBook::record(self, plugin, partition, marker, delay_ms)
    }

    fn forget(&self, plugin: &str) {
        ProbeBook::forget(self, plugin)
    }
}
