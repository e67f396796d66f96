//! Reading many messages of a stream per round trip: JetStream's batched direct get
//! (`$JS.API.DIRECT.GET.<stream>` with `batch`, nats-server 2.11 and later).
//!
//! Any replica of a stream that allows direct gets may answer, and a follower may lag the
//! leader: what a batch returns is committed and in order, but a short or empty answer does
//! not mean the stream ends there. The walk (partition.rs) therefore only ever ends on the
//! leader's "no message" — a batch speeds up the reading, never decides where it stops.

use std::time::{Duration, Instant};

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use weir_log::LogError;

use crate::{engine, JetStreamLog};

/// Messages asked for per batch.
const BATCH_MESSAGES: usize = 256;
/// Bytes asked for per batch: the server stops after the message that passes it (a chunk
/// is at most 256 KiB plus its headers, so a batch stays under ~4.3 MiB).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How long a batch may take to begin and between its messages. A replica answers at once
/// when it is alive; one frozen or cut off (its server's routes not yet timed out) never
/// does, and a walk must not wait the whole request timeout for it.
const PATIENCE: Duration = Duration::from_secs(1);
/// How long a stream's tail is read from its leader only after a direct get failed.
const BENCHED_FOR: Duration = Duration::from_secs(30);

/// One message of a batch.
pub(crate) struct DirectMessage {
    pub(crate) subject: String,
    pub(crate) seq: u64,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

impl JetStreamLog {
    /// A batch as [`Self::direct_batch`] reads it; `None` when direct gets of `stream` failed
    /// in the last [`BENCHED_FOR`] (this one included): the caller reads from the leader.
    pub(crate) async fn try_direct_batch(
        &self,
        stream: &str,
        filter: &str,
        from: u64,
    ) -> Option<Vec<DirectMessage>> {
        {
            let mut benched = self.direct_benched.lock();
            match benched.get(stream) {
                Some(until) if Instant::now() < *until => return None,
                Some(_) => {
                    benched.remove(stream);
                }
                None => {}
            }
        }
        match self.direct_batch(stream, filter, from).await {
            Ok(batch) => Some(batch),
            Err(e) => {
                tracing::warn!(message = "Reading a stream's tail by direct get failed; reading it from its leader for a while.", stream, error = %e, seconds = BENCHED_FOR.as_secs());
                self.direct_benched
                    .lock()
                    .insert(stream.to_string(), Instant::now() + BENCHED_FOR);
                None
            }
        }
    }

    /// The messages of `filter` from sequence `from` on, as many as one batch holds, from
    /// whichever replica of `stream` answers (see the module's note on lagging followers).
    /// Empty when that replica has none.
    pub(crate) async fn direct_batch(
        &self,
        stream: &str,
        filter: &str,
        from: u64,
    ) -> Result<Vec<DirectMessage>, LogError> {
        let what = format!("read {filter} from sequence {from} (direct get)");
        let failed = |e: &dyn std::fmt::Display| engine(&what, e);
        let request = serde_json::json!({
            "seq": from,
            "next_by_subj": filter,
            "batch": BATCH_MESSAGES,
            "max_bytes": BATCH_BYTES,
        });
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| failed(&e))?;
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                inbox,
                Bytes::from(request.to_string()),
            )
            .await
            .map_err(|e| failed(&e))?;
        let mut out = Vec::new();
        loop {
            let patience = PATIENCE.min(self.options.request_timeout);
            let reply = tokio::time::timeout(patience, replies.next())
                .await
                .map_err(|_| failed(&format!("no answer within {patience:?}")))?
                .ok_or_else(|| failed(&"the connection closed"))?;
            match reply.status {
                None => out.push(direct_message(reply).map_err(|e| failed(&e))?),
                // The end of the batch, or nothing at all from `from` on.
                Some(s) if s.as_u16() == 204 || s == StatusCode::NOT_FOUND => break,
                Some(s) => {
                    return Err(failed(&format!(
                        "status {} {}",
                        s.as_u16(),
                        reply.description.unwrap_or_default()
                    )))
                }
            }
            // Older servers ignore `batch` and answer one message without the batch's end.
            if out.len() == 1 && !has_pending(&out[0].headers) {
                break;
            }
        }
        Ok(out)
    }
}

/// A message of a batch, from the headers the server adds to it.
fn direct_message(m: async_nats::Message) -> Result<DirectMessage, String> {
    let headers = m.headers.ok_or("a direct get answer without headers")?;
    let subject = headers
        .get("Nats-Subject")
        .ok_or("a direct get answer without Nats-Subject")?
        .to_string();
    let seq = headers
        .get("Nats-Sequence")
        .and_then(|v| v.as_str().parse().ok())
        .ok_or("a direct get answer without a Nats-Sequence")?;
    Ok(DirectMessage {
        subject,
        seq,
        headers,
        payload: m.payload,
    })
}

fn has_pending(h: &HeaderMap) -> bool {
    h.get("Nats-Num-Pending").is_some()
}
