//! An idempotent producer as the kill -9 tests drive it: what it knows survives server crashes
//! (it lives in the test); a batch without an ack stays pending and is retried as it was
//! (same id, epoch, sequence), through whichever server the test picks.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use weir_api::{pb, Client};
use weir_core::Record;

pub struct IdemProducer {
    pub id: u64,
    pub epoch: u32,
    topic: String,
    partitions: u32,
    /// Most records per batch.
    max_batch: u64,
    next_seq: HashMap<u32, u64>,
    /// A batch sent but not acknowledged: (partition, base sequence, record ids).
    pub pending: Option<(u32, u64, Vec<String>)>,
    /// Acknowledged record id → (partition, offset).
    pub acked: HashMap<String, (u32, u64)>,
    /// Retries the broker answered as already stored (the crash hit after the append).
    pub duplicates: usize,
    rng: rand::rngs::StdRng,
}

impl IdemProducer {
    pub fn new(
        id: u64,
        epoch: u32,
        topic: &str,
        partitions: u32,
        max_batch: u64,
        seed: u64,
    ) -> Self {
        IdemProducer {
            id,
            epoch,
            topic: topic.into(),
            partitions,
            max_batch,
            next_seq: HashMap::new(),
            pending: None,
            acked: HashMap::new(),
            duplicates: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Sends the pending batch, or a new one to a random partition; on an ack records where
    /// each record went (asserting none is acknowledged twice).
    pub async fn send(&mut self, client: &Client) -> Result<(), tonic::Status> {
        if self.pending.is_none() {
            let partition = self.rng.random_range(0..self.partitions);
            let seq = *self.next_seq.get(&partition).unwrap_or(&0);
            let n = self.rng.random_range(1..=self.max_batch);
            let ids = (0..n)
                .map(|i| format!("p{}-{partition}-{}", self.id, seq + i))
                .collect();
            self.pending = Some((partition, seq, ids));
        }
        let (partition, seq, ids) = self.pending.clone().unwrap();
        let request = pb::PublishRequest {
            topic: self.topic.clone(),
            partition: Some(partition),
            records: ids
                .iter()
                .map(|id| {
                    pb::Record::from(Record {
                        id: Some(id.clone()),
                        ..Record::from_value(id.clone())
                    })
                })
                .collect(),
            producer: Some(pb::ProducerFields {
                producer_id: self.id,
                epoch: self.epoch,
                base_sequence: seq,
            }),
            request_id: 0,
        };
        let ack = client
            .raw()
            .publish(request)
            .await?
            .into_inner()
            .acks
            .remove(0);
        assert_eq!(ack.record_count as usize, ids.len());
        self.duplicates += usize::from(ack.duplicate);
        for (i, id) in ids.iter().enumerate() {
            let previous = self
                .acked
                .insert(id.clone(), (partition, ack.base_offset + i as u64));
            assert!(previous.is_none(), "{id} acknowledged twice");
        }
        self.next_seq.insert(partition, seq + ids.len() as u64);
        self.pending = None;
        Ok(())
    }
}
