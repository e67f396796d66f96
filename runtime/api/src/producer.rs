//! The idempotent [`Producer`]: retries a failed publish with the same sequence (the seed's
//! 重试 2～3 次) so that the broker stores it once.

use std::collections::HashMap;
use std::time::Duration;

use tonic::Code;

use weir_core::{partition_for_key, Backoff, Record};

use crate::client::{Ack, Client, ClientError};
use crate::pb;

/// An idempotent producer: numbers records per partition and retries a failed publish with the
/// same sequence, so that a retry whose first attempt was stored is answered with the first
/// write's offsets instead of being stored twice.
pub struct Producer {
    client: Client,
    id: u64,
    epoch: u32,
    /// Next sequence per (topic, partition).
    sequences: HashMap<(String, u32), u64>,
    /// Partition counts of topics seen, for client-side partitioning.
    partitions: HashMap<String, u32>,
    retries: u32,
    backoff: Duration,
    sticky: u32,
}

/// Whether a failed publish may be retried with the same sequence.
fn retriable(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } => true,
        ClientError::Status(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Internal
        ),
        ClientError::Protocol(_) | ClientError::Address { .. } => false,
    }
}

impl Client {
    /// Starts an idempotent producer (allocates a producer id).
    ///
    /// # Errors
    /// Transport failures.
    pub async fn producer(&self) -> Result<Producer, ClientError> {
        let r = self
            .inner
            .clone()
            .init_producer(pb::InitProducerRequest { producer_id: None })
            .await?
            .into_inner();
        Ok(Producer::new(self.clone(), r.producer_id, r.epoch))
    }
}

impl Producer {
    fn new(client: Client, id: u64, epoch: u32) -> Producer {
        Producer {
            client,
            id,
            epoch,
            sequences: HashMap::new(),
            partitions: HashMap::new(),
            retries: 3,
            backoff: Duration::from_millis(100),
            sticky: 0,
        }
    }

    /// Producer id and epoch.
    pub fn id(&self) -> (u64, u32) {
        (self.id, self.epoch)
    }

    /// Sets how many times a failed publish is retried (default 3) and the first backoff
    /// (default 100 ms, doubling).
    pub fn with_retries(mut self, retries: u32, backoff: Duration) -> Self {
        self.retries = retries;
        self.backoff = backoff;
        self
    }

    /// Publishes `records` to one partition as one batch, retrying on transport failures.
    ///
    /// # Errors
    /// A refusal from the broker (not retried), or the last failure once retries are spent.
    /// After retries are spent the producer re-initialises (new epoch, sequences from 0) on
    /// its next send, as Kafka's does: whether the failed batch was stored is unknown.
    pub async fn send_to(
        &mut self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<Ack, ClientError> {
        let key = (topic.to_string(), partition);
        let base_sequence = *self.sequences.get(&key).unwrap_or(&0);
        let count = records.len() as u64;
        let request = pb::PublishRequest {
            topic: topic.into(),
            partition: Some(partition),
            records: records.into_iter().map(Into::into).collect(),
            producer: Some(pb::ProducerFields {
                producer_id: self.id,
                epoch: self.epoch,
                base_sequence,
            }),
            request_id: 0,
        };
        let mut backoff = Backoff::new(self.backoff, Duration::from_secs(10));
        let mut attempt = 0;
        loop {
            let result = self
                .client
                .inner
                .clone()
                .publish(request.clone())
                .await
                .map_err(ClientError::from);
            match result {
                Ok(response) => {
                    let ack = response
                        .into_inner()
                        .acks
                        .into_iter()
                        .next()
                        .map(Ack::from)
                        .ok_or_else(|| {
                            ClientError::Protocol("publish answered without an ack".into())
                        })?;
                    self.sequences.insert(key, base_sequence + count);
                    return Ok(ack);
                }
                Err(e) if attempt < self.retries && retriable(&e) => {
                    attempt += 1;
                    tracing::debug!(message = "Publish failed; retrying with the same sequence.", error = %e, attempt);
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => {
                    if retriable(&e) {
                        self.reinit().await.ok();
                    }
                    return Err(e);
                }
            }
        }
    }

    async fn reinit(&mut self) -> Result<(), ClientError> {
        let (id, epoch) = self.client.init_producer(Some(self.id)).await?;
        self.id = id;
        self.epoch = epoch;
        self.sequences.clear();
        Ok(())
    }

    /// Publishes records to a topic, partitioned like the broker does (key hash; keyless
    /// records stick to one partition per call), one idempotent batch per partition.
    /// Returns each record's (partition, offset), in input order.
    ///
    /// # Errors
    /// As [`Producer::send_to`]; partitions already acknowledged stay stored.
    pub async fn send(
        &mut self,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        let n = match self.partitions.get(topic) {
            Some(&n) => n,
            None => {
                let n = self.client.describe_topic(topic).await?.config.partitions;
                self.partitions.insert(topic.to_string(), n);
                n
            }
        };
        self.sticky = self.sticky.wrapping_add(1);
        let sticky = self.sticky % n;
        let mut by_partition: std::collections::BTreeMap<u32, Vec<(usize, Record)>> =
            Default::default();
        for (i, record) in records.into_iter().enumerate() {
            let p = record
                .key
                .as_deref()
                .map_or(sticky, |k| partition_for_key(k, n));
            by_partition.entry(p).or_default().push((i, record));
        }
        let total = by_partition.values().map(Vec::len).sum();
        let mut positions = vec![(0, 0); total];
        for (p, batch) in by_partition {
            let (indexes, records): (Vec<usize>, Vec<Record>) = batch.into_iter().unzip();
            let ack = self.send_to(topic, p, records).await?;
            for (rank, i) in indexes.into_iter().enumerate() {
                positions[i] = (p, ack.base_offset + rank as u64);
            }
        }
        Ok(positions)
    }
}
