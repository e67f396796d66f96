//! The broker's producer ids: issuing them (owned by their caller), bumping epochs, checking
//! an idempotent publish's producer, claiming plugins' producers for the server.

use weir_core::now_ms;

use crate::owners::{Caller, Owner, ProducerRecord, ProducerTable};
use crate::{Broker, BrokerError, ProducerFields};
use weir_log::{Log, LogError};

impl Broker {
    /// Allocates a producer id (epoch 0) owned by `caller`, or bumps the epoch of `existing`,
    /// fencing its older instances.
    ///
    /// # Errors
    /// [`BrokerError::UnknownProducer`] for an id this broker never issued,
    /// [`BrokerError::ProducerExpired`] for one forgotten after its idle time,
    /// [`BrokerError::ProducerNotOwned`] for another principal's or a plugin's producer.
    pub async fn init_producer(
        &self,
        existing: Option<u64>,
        caller: &Caller,
    ) -> Result<(u64, u32), BrokerError> {
        self.init_producer_expecting(existing, None, caller).await
    }

    /// [`Broker::init_producer`] of `existing` only while its epoch is `epoch` (KIP-360: a
    /// zombie instance that still holds an older epoch cannot fence the live one).
    ///
    /// # Errors
    /// As [`Broker::init_producer`], and [`BrokerError::StaleEpoch`] when the producer has
    /// moved past `epoch`.
    pub async fn bump_producer_epoch(
        &self,
        id: u64,
        epoch: u32,
        caller: &Caller,
    ) -> Result<(u64, u32), BrokerError> {
        self.init_producer_expecting(Some(id), Some(epoch), caller)
            .await
    }

    async fn init_producer_expecting(
        &self,
        existing: Option<u64>,
        expected_epoch: Option<u32>,
        caller: &Caller,
    ) -> Result<(u64, u32), BrokerError> {
        let _writing = self.producer_writes.lock().await;
        if let Some(id) = existing {
            if self.is_shared() {
                // Another node may have issued it or bumped its epoch.
                self.reload_producer(id).await?;
            }
        }
        let mut attempt = 0;
        loop {
            match self
                .init_producer_once(existing, expected_epoch, caller)
                .await
            {
                // Another node issued the id this one proposed (shared logs): reload, retry.
                Err(BrokerError::Storage(LogError::Conflict { .. })) if attempt < 20 => {
                    attempt += 1;
                    match existing {
                        // Another node bumped this producer's epoch first: bump from its.
                        Some(id) => self.reload_producer(id).await?,
                        None => self.reload_producers().await?,
                    }
                }
                other => return other,
            }
        }
    }

    async fn init_producer_once(
        &self,
        existing: Option<u64>,
        expected_epoch: Option<u32>,
        caller: &Caller,
    ) -> Result<(u64, u32), BrokerError> {
        let (id, record, next_id, previous) = {
            let mut producers = self.producers.lock();
            let now = now_ms();
            match existing {
                Some(id) => {
                    let current = self.producer(&producers, id)?;
                    if !current.owner.admits(caller) {
                        return Err(BrokerError::ProducerNotOwned {
                            producer_id: id,
                            owner: current.owner.to_string(),
                            caller: caller.to_string(),
                        });
                    }
                    if let Some(seen) = expected_epoch.filter(|&e| e != current.epoch) {
                        return Err(BrokerError::StaleEpoch {
                            producer_id: id,
                            epoch: seen,
                            current: current.epoch,
                        });
                    }
                    let epoch = current.epoch.checked_add(1).ok_or_else(|| {
                        BrokerError::InvalidArgument(format!(
                            "producer {id} has used every epoch; init a new producer"
                        ))
                    })?;
                    let record = ProducerRecord {
                        epoch,
                        owner: current.owner.clone(),
                        last_used_ms: now,
                    };
                    (id, record, producers.next_id, Some(current.encode()))
                }
                None => {
                    self.check_producer_quota(&producers, caller)?;
                    let record = ProducerRecord {
                        epoch: 0,
                        owner: Owner::of(caller),
                        last_used_ms: now,
                    };
                    let id = producers.next_id;
                    // Reserved under the lock, so concurrent inits get distinct ids.
                    producers.next_id += 1;
                    (id, record, id + 1, None)
                }
            }
        };
        // Written (and synced) before it is used: a restart must never reissue an id or an
        // epoch. `producer_writes` (not the table's lock) is held across the write.
        let store = self.store.clone();
        let encoded = record.encode();
        let issued = existing.is_none();
        let written = Self::blocking(move || {
            Ok(write_producer(
                &*store,
                id,
                previous.as_deref(),
                &encoded,
                next_id,
            )?)
        })
        .await;
        if let Err(e) = written {
            if issued {
                // The id stays reserved in this node's table; a conflict reloads the table.
                tracing::debug!(message = "Issuing a producer id failed.", producer_id = id, error = %e);
            }
            return Err(e);
        }
        let epoch = record.epoch;
        self.producers.lock().records.insert(id, record);
        self.sync_now().await?;
        Ok((id, epoch))
    }

    /// Refuses a new producer id to a client principal that holds the most it may (the
    /// server's producers, plugins', are not limited). Counts the ids this node knows of.
    fn check_producer_quota(
        &self,
        producers: &ProducerTable,
        caller: &Caller,
    ) -> Result<(), BrokerError> {
        let Caller::Client { name, .. } = caller else {
            return Ok(());
        };
        let max = self.config.max_producers_per_principal;
        let held = producers
            .records
            .values()
            .filter(|r| matches!(&r.owner, Owner::Principal(owner) if owner == name))
            .count();
        if held >= max {
            return Err(BrokerError::TooManyProducers {
                principal: name.clone(),
                held,
                max,
                expiry_ms: self.config.producer_expiry.as_millis() as u64,
            });
        }
        Ok(())
    }

    /// The current epoch of a producer owned by the server (a plugin's), if it is one.
    pub fn server_producer_epoch(&self, id: u64) -> Option<u32> {
        self.producers
            .lock()
            .records
            .get(&id)
            .filter(|r| r.owner == Owner::Server)
            .map(|r| r.epoch)
    }

    /// The record of a producer id, or why there is none.
    fn producer<'a>(
        &self,
        producers: &'a ProducerTable,
        id: u64,
    ) -> Result<&'a ProducerRecord, BrokerError> {
        producers
            .records
            .get(&id)
            .ok_or(if id > 0 && id < producers.next_id {
                BrokerError::ProducerExpired {
                    producer_id: id,
                    expiry_ms: self.config.producer_expiry.as_millis() as u64,
                }
            } else {
                BrokerError::UnknownProducer(id)
            })
    }

    pub(crate) fn check_producer(
        &self,
        p: &ProducerFields,
        caller: &Caller,
    ) -> Result<(), BrokerError> {
        let mut producers = self.producers.lock();
        let record = self.producer(&producers, p.producer_id)?;
        if !record.owner.admits(caller) {
            return Err(BrokerError::ProducerNotOwned {
                producer_id: p.producer_id,
                owner: record.owner.to_string(),
                caller: caller.to_string(),
            });
        }
        let current = record.epoch;
        if p.epoch < current {
            return Err(BrokerError::StaleEpoch {
                producer_id: p.producer_id,
                epoch: p.epoch,
                current,
            });
        }
        if p.epoch > current {
            return Err(BrokerError::InvalidArgument(format!(
                "producer {} has epoch {current}; epoch {} was never issued",
                p.producer_id, p.epoch
            )));
        }
        if let Some(r) = producers.records.get_mut(&p.producer_id) {
            r.last_used_ms = now_ms();
        }
        Ok(())
    }

    /// Marks producer ids as the server's (plugins' forwarders): no client may use them. For
    /// producers issued before ownership was recorded. Blocking-free; the write goes through
    /// the blocking pool.
    ///
    /// # Errors
    /// Unknown ids, storage failures.
    pub async fn claim_for_server(&self, ids: &[u64]) -> Result<(), BrokerError> {
        let _writing = self.producer_writes.lock().await;
        for &id in ids {
            let (record, next_id, previous) = {
                let producers = self.producers.lock();
                let current = self.producer(&producers, id)?;
                if current.owner == Owner::Server {
                    continue;
                }
                let mut record = current.clone();
                record.owner = Owner::Server;
                (record, producers.next_id, current.encode())
            };
            let (store, encoded) = (self.store.clone(), record.encode());
            Self::blocking(move || {
                Ok(write_producer(
                    &*store,
                    id,
                    Some(&previous),
                    &encoded,
                    next_id,
                )?)
            })
            .await?;
            self.producers.lock().records.insert(id, record);
        }
        self.sync_now().await
    }
}

/// Stores a producer's record. On a shared log an id is issued only if no node issued it
/// first, and a record replaced only if it is still `previous` (the record an epoch bump or a
/// claim was decided from): two nodes never issue the same id or epoch. A log with one writer
/// just writes it.
fn write_producer(
    store: &dyn Log,
    id: u64,
    previous: Option<&[u8]>,
    record: &[u8],
    next_id: u64,
) -> Result<(), LogError> {
    match (store.shared(), previous) {
        (Some(shared), None) => shared.issue_producer(id, record, next_id),
        (Some(shared), Some(previous)) => shared.replace_producer(id, previous, record),
        (None, _) => store.put_producer(id, record, next_id),
    }
}
