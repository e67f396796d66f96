//! The forwarder of a plugin partition: publishes the partition's outbox entries in order, as
//! the partition's idempotent producer with the sequences assigned at commit. A page of
//! entries is appended batch after batch without waiting for each to be durable (the broker
//! fixes a batch's offsets before the next is sent, so order holds), then waited for once, and
//! deleted in one write: a page costs one sync of the log, not one per output partition per
//! entry. A re-forward after a crash carries the same (producer id, sequence), so the broker
//! drops it: outputs appear exactly once.
//!
//! In cluster mode it forwards only while this node holds the plugin, confirmed at the
//! changelog's end before each page and each retry: a node that lost the plugin (taken over,
//! removed, a write refused) or a zombie that has not noticed yet sends nothing.
//!
//! A failure it cannot get past (its producer fenced, an output topic deleted) shows in the
//! partition's status, the monitor and a metric, and is retried every few seconds in case an
//! operator fixes it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_core::Backoff;

use crate::io::{Acked, IoError, IoKind, OutputBatch};
use crate::runtime::PluginRuntime;
use crate::store::Group;

/// Outbox entries read per scan: a backlog (outputs blocked for hours while the plugin kept
/// committing) is forwarded a page at a time, never read into memory whole. An entry is one
/// commit's outputs (up to `--commit-records` records, about 5,000), so 16 entries hold
/// more records than 64 did when each call was its own commit.
pub(crate) const OUTBOX_PAGE: usize = 16;

/// The broker's name for a sequence below the next expected one that matches none of the
/// batches it remembers for retries (weir_broker's `KEEP_BATCHES`, 5, as Kafka).
pub(crate) const SEQUENCE_OUT_OF_ORDER: &str = "sequence-out-of-order";

/// Sleeps `d`; `false` when cancelled.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Why a group was not appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// The hold is lost or not confirmed: scan again from the top.
    Rescan,
    /// The forwarder is stopping.
    Cancelled,
}

/// The forwarder of one input partition's outputs.
pub(crate) struct Forwarder {
    rt: Arc<PluginRuntime>,
    partition: u32,
}

impl Forwarder {
    pub(crate) fn new(rt: Arc<PluginRuntime>, partition: u32) -> Self {
        Forwarder { rt, partition }
    }

    /// Forwards until cancelled.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let (rt, partition) = (self.rt.clone(), self.partition);
        let producer_id = rt.spec.producer_ids[partition as usize];
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Commits written before the plugin opened here (by a runtime it replaced) are in
        // the outbox as of the cursors; forward them once they are durable.
        tokio::select! {
            durable = rt.seams.durability.durable(rt.opened) => if let Err(e) = durable {
                return self.failed(e.to_string(), true);
            },
            _ = cancel.cancelled() => return,
        }
        'scan: loop {
            // A node that no longer holds the plugin (another node took it over, a remove
            // dropped it, or one of its writes was refused or left uncertain) forwards
            // nothing: the holder forwards what was committed, and a straggler's outputs
            // must never reach a topic after the plugin moved or was redeployed.
            if !rt.seams.store.held(&rt.spec.name) {
                self.show("retrying: this node no longer holds the plugin; the node that runs it forwards".into());
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = cancel.cancelled() => return,
                }
                continue;
            }
            let this = rt.clone();
            let scanned = weir_core::blocking::run(move || {
                this.seams
                    .store
                    .outbox(&this.spec.name, partition, OUTBOX_PAGE)
            })
            .await;
            let mut entries = match scanned {
                Ok(Ok(entries)) => entries,
                Ok(Err(e)) => {
                    self.failed(format!("reading the outbox: {e}"), false);
                    if !pause(&cancel, backoff.next()).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    self.failed(e.to_string(), false);
                    if !pause(&cancel, backoff.next()).await {
                        return;
                    }
                    continue;
                }
            };
            if !entries.is_empty() && !self.confirmed().await {
                // Another node took the plugin over (or a remove dropped it) since this node
                // last wrote: it no longer holds it, and the top of the loop waits.
                if !pause(&cancel, backoff.next()).await {
                    return;
                }
                continue;
            }
            let full_page = entries.len() >= OUTBOX_PAGE;
            // Only what durable commits wrote: the entries are in commit order, and those of a
            // commit still in flight wait for the reporter's wake-up.
            let durable = rt.durable_seq[partition as usize].load(Ordering::Acquire);
            let all = entries.len();
            entries.retain(|e| e.seq < durable);
            let full_page = full_page && entries.len() == all;
            // Entries forwarded, deleted together once the page is done: in cluster mode
            // each delete is a replicated append, one per page instead of one per entry (a
            // crash before it re-forwards them, which the producer sequences make harmless).
            let mut forwarded = Vec::new();
            let mut appended = Vec::new();
            for entry in entries {
                let groups = match entry.groups {
                    Ok(groups) => groups,
                    Err(why) => {
                        // What went before it is deleted once durable, as at a page's end.
                        if !self.durable(&cancel, &mut backoff, appended).await {
                            if cancel.is_cancelled() {
                                return;
                            }
                            continue 'scan;
                        }
                        if !self.delete(&cancel, &mut backoff, forwarded).await {
                            return;
                        }
                        // Forwarding past it would reorder outputs: stop here and say so.
                        self.failed(format!("{why}; outputs after it wait"), true);
                        if !pause(&cancel, Duration::from_secs(5)).await {
                            return;
                        }
                        continue 'scan;
                    }
                };
                // Appended one after another (in order per output partition) without waiting
                // for each to be durable: the page waits once, below.
                for g in groups {
                    match self.send(&cancel, producer_id, g).await {
                        Ok(acked) => appended.push(acked),
                        Err(Sent::Cancelled) => return,
                        Err(Sent::Rescan) => continue 'scan, // see the top of the loop
                    }
                }
                forwarded.push(entry.seq);
                backoff.reset();
                self.ok();
            }
            if !self.durable(&cancel, &mut backoff, appended).await {
                if cancel.is_cancelled() {
                    return;
                }
                continue;
            }
            if !self.delete(&cancel, &mut backoff, forwarded).await {
                return;
            }
            if full_page {
                if cancel.is_cancelled() {
                    return;
                }
                continue; // more waiting behind this page
            }
            tokio::select! {
                _ = rt.outbox[partition as usize].notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Appends one group, retrying until it is applied (or was stored before), the hold is
    /// lost (rescan) or the forwarder is cancelled; returns what resolves once it is durable.
    async fn send(
        &self,
        cancel: &CancellationToken,
        producer_id: u64,
        g: Group,
    ) -> Result<Acked, Sent> {
        let rt = &self.rt;
        let batch = OutputBatch {
            topic: g.topic,
            partition: g.partition,
            producer_id,
            base_sequence: g.base_seq,
            records: g.records,
        };
        tracing::debug!(message = "Forwarding outputs.", topic = %batch.topic, output_partition = batch.partition, records = batch.records.len(), base_seq = batch.base_sequence);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut retry = false;
        loop {
            // A retry may come long after the page was confirmed (outputs blocked while the
            // plugin moved): confirm again.
            if !rt.seams.store.held(&rt.spec.name) || (retry && !self.confirmed().await) {
                return Err(Sent::Rescan);
            }
            retry = true;
            let e = match rt.seams.output.append(batch.clone()).await {
                Ok(acked) => return Ok(acked),
                Err(e) if e.name == SEQUENCE_OUT_OF_ORDER => {
                    // Older than the batches the broker remembers for retries (a crash or a
                    // lost hold after more than that many batches of a page went out): the
                    // producer id is this partition's alone and its sequences are dense, so a
                    // sequence below the next expected one was stored.
                    tracing::debug!(message = "An output batch was stored before (older than the retry window).", topic = %batch.topic, output_partition = batch.partition, base_seq = batch.base_sequence);
                    // Stored, maybe not yet durable (appended by an earlier pass of this
                    // process): durable once everything applied until now is.
                    let durability = rt.seams.durability.clone();
                    let ticket = durability.written();
                    return Ok(Box::pin(async move {
                        durability
                            .durable(ticket)
                            .await
                            .map_err(|e| IoError::new(IoKind::Unavailable, e.to_string()))
                    }));
                }
                Err(e) => e,
            };
            let transient = e.kind == IoKind::Unavailable;
            self.failed(
                format!("forwarding to {}/{}: {e}", batch.topic, batch.partition),
                !transient,
            );
            let delay = if transient {
                backoff.next()
            } else {
                Duration::from_secs(5)
            };
            // A new commit is worth another try at once.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = rt.outbox[self.partition as usize].notified() => {}
                _ = cancel.cancelled() => return Err(Sent::Cancelled),
            }
        }
    }

    /// Whether this node still holds the plugin as of the changelog's end (cluster mode: one
    /// round trip per page; a node that finds another's entry after its own stops holding it).
    /// A failure to ask counts as not confirmed: the page waits for the next scan.
    async fn confirmed(&self) -> bool {
        let rt = self.rt.clone();
        let asked =
            weir_core::blocking::run(move || rt.seams.store.confirm_held(&rt.spec.name)).await;
        match asked {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                self.failed(
                    format!("confirming this node still runs the plugin: {e}"),
                    false,
                );
                false
            }
            Err(e) => {
                self.failed(e.to_string(), false);
                false
            }
        }
    }

    /// Waits until every appended batch is durable: entries are deleted only then (a delete
    /// made durable before its outputs would lose them in a crash). `false` after a failure
    /// (shown; the caller scans again, and the broker answers a batch stored before from its
    /// producer sequence; a failed sync stops the server) or when cancelled.
    async fn durable(
        &self,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
        appended: Vec<Acked>,
    ) -> bool {
        let durable = futures::future::join_all(appended).await;
        match durable.into_iter().find(Result::is_err) {
            Some(Err(e)) => {
                self.failed(format!("forwarding outputs: {e}"), false);
                pause(cancel, backoff.next()).await;
                false
            }
            _ => true,
        }
    }

    /// Deletes forwarded outbox entries, retrying until it can; `false` when cancelled.
    async fn delete(
        &self,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
        seqs: Vec<u64>,
    ) -> bool {
        if seqs.is_empty() {
            return true;
        }
        let seqs = Arc::new(seqs);
        loop {
            let (this, seqs, partition) = (self.rt.clone(), seqs.clone(), self.partition);
            let deleted = weir_core::blocking::run(move || {
                this.seams
                    .store
                    .forwarded(&this.spec.name, partition, &seqs)
            })
            .await;
            match deleted {
                Ok(Ok(())) => return true,
                // Not this node's to delete any more: the holder re-forwards and deletes them.
                Ok(Err(_)) if !self.rt.seams.store.held(&self.rt.spec.name) => return true,
                Ok(Err(e)) => self.failed(format!("deleting forwarded outbox entries: {e}"), false),
                Err(e) => self.failed(e.to_string(), false),
            }
            if !pause(cancel, backoff.next()).await {
                return false;
            }
        }
    }

    /// Shows why outputs are stuck and counts a failed attempt; `blocked`: retrying alone
    /// will not help.
    fn failed(&self, why: String, blocked: bool) {
        weir_metrics::global()
            .plugin_forward_failures
            .get_or_create(&self.rt.label)
            .inc();
        self.show(if blocked {
            format!("blocked: {why}")
        } else {
            format!("retrying: {why}")
        });
    }

    /// Shows why outputs are not flowing (logged once per change).
    fn show(&self, shown: String) {
        let rt = &self.rt;
        let mut status = rt.status.lock();
        let slot = &mut status[self.partition as usize].forwarding;
        if slot.as_deref() != Some(shown.as_str()) {
            *slot = Some(shown.clone());
            drop(status);
            rt.log(format!("partition {}: outputs {shown}", self.partition));
            tracing::warn!(message = "Forwarding outputs failed.", plugin = %rt.spec.name, partition = self.partition, reason = %shown);
        }
    }

    fn ok(&self) {
        let mut status = self.rt.status.lock();
        if status[self.partition as usize].forwarding.take().is_some() {
            drop(status);
            self.rt
                .log(format!("partition {}: outputs flow again", self.partition));
        }
    }
}
