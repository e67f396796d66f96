//! Reads from a stream's leader that are asked again when nobody answers.
//!
//! A nats-server drops a `STREAM.MSG.GET` it cannot serve — it has not yet learned of a stream
//! another node created a moment ago, or is not its leader yet — and the request waits out
//! the whole request timeout. Waiting 10 s for that once held every publish through a node
//! (BENCHMARKS.md, "the two-node ~89k mode").

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageError, LastRawMessageErrorKind};
use async_nats::jetstream::ErrorCode;
use futures::stream::{FuturesUnordered, StreamExt};
use weir_log::LogError;

use crate::{engine, JetStreamLog};

/// How long the first try waits before it is asked again; each later try waits twice as long.
const FIRST_PATIENCE: Duration = Duration::from_secs(1);

impl JetStreamLog {
    /// What `ask` reads (`None`: no such message). A read nobody answers is asked again
    /// after 1 s, 2 s, 4 s … while the earlier tries keep waiting (the first answer wins), all
    /// within the request timeout; "cluster not available" (the stream has no leader right
    /// now) is asked again the same way. Every try is the same read, so whichever answers,
    /// the answer is one the leader gave after the first try was sent.
    pub(crate) async fn patiently<F, A>(
        &self,
        what: &str,
        ask: A,
    ) -> Result<Option<StreamMessage>, LogError>
    where
        A: Fn() -> F,
        F: Future<Output = Result<StreamMessage, LastRawMessageError>>,
    {
        let deadline = tokio::time::Instant::now() + self.options.request_timeout;
        let mut tries = FuturesUnordered::new();
        tries.push(ask());
        let mut patience = FIRST_PATIENCE;
        let mut next_try = tokio::time::Instant::now() + patience;
        loop {
            tokio::select! {
                answer = tries.next(), if !tries.is_empty() => match answer {
                    Some(Ok(m)) => return Ok(Some(m)),
                    Some(Err(e)) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                        return Ok(None)
                    }
                    Some(Err(e)) if no_leader(&e) => {
                        tracing::debug!(message = "The stream has no leader right now; asking again.", what);
                    }
                    Some(Err(e)) => return Err(engine(what, e)),
                    None => {}
                },
                _ = tokio::time::sleep_until(next_try.min(deadline)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(engine(what, "the stream leader did not answer within the request timeout"));
                    }
                    tracing::debug!(message = "The stream leader did not answer a read yet; asking again.", what, waited_ms = patience.as_millis() as u64);
                    tries.push(ask());
                    patience *= 2;
                    next_try = tokio::time::Instant::now() + patience;
                }
            }
        }
    }
}

fn no_leader(e: &LastRawMessageError) -> bool {
    matches!(e.kind(), LastRawMessageErrorKind::JetStream(j) if j.error_code() == ErrorCode::CLUSTER_NOT_AVAILABLE)
}
