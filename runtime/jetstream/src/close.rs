//! Closing a topic: the first step of its deletion. Deleting a topic's key and stream cannot
//! be made conditional in JetStream (a purge and a stream deletion take no expectation), so a
//! deletion that failed — its request waiting in a frozen server, delivered later — could
//! land after records acknowledged since and remove them. Closing can be conditional: one
//! message per partition on the partition's chunk subject, fenced on that subject's last
//! sequence as read just before and on the topic's stream (`Nats-Expected-Stream`). It lands
//! only if no record was appended to the partition since the read; once it has landed every
//! append there is refused (fenced on a sequence before the close, it makes the writer read
//! the tail, which says closed), so nothing is acknowledged between the close and the
//! removal. Partitions close one by one, concurrently, each retried on its own: a partition
//! under steady traffic closes between two appends (a close of all partitions in one batch
//! would be refused by any append anywhere).

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;
use weir_core::TopicConfig;
use weir_log::LogError;

use crate::partition::H_CLOSED;
use crate::{engine, JetStreamLog};

/// How many times a partition's close re-reads the partition after a record landed in
/// between.
const CLOSE_TRIES: usize = 100;

impl JetStreamLog {
    /// Closes every partition of a topic's current creation (see the module documentation):
    /// the first step of [`weir_log::Log::delete_topic`]. A topic without a stream has nothing
    /// to close. Blocking.
    ///
    /// # Errors
    /// The engine did not answer, or records kept landing between the read and the close.
    pub fn close_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.block_on(async {
            let stream = self.stream_name(&config.name).await?;
            self.close_stream(&config.name, config, &stream).await
        })
    }

    /// Closes the partitions of `topic`'s stream `name`.
    pub(crate) async fn close_stream(
        &self,
        topic: &str,
        config: &TopicConfig,
        name: &str,
    ) -> Result<(), LogError> {
        let stream = match self.js.get_stream(name).await {
            Ok(s) => s,
            Err(e) if e.to_string().contains("not found") => return Ok(()),
            Err(e) => return Err(engine(&format!("open stream {name}"), e)),
        };
        let closes = (0..config.partitions).map(|p| {
            let stream = stream.clone();
            async move {
                let subject = self.names.chunk_subject(topic, p);
                for _ in 0..CLOSE_TRIES {
                    let last = match stream
                        .raw_message_builder()
                        .last_by_subject(subject.clone())
                        .send()
                        .await
                    {
                        Ok(m) if m.headers.get(H_CLOSED).is_some() => return Ok(()),
                        Ok(m) => m.sequence,
                        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
                        Err(e) => return Err(engine(&format!("read {subject}"), e)),
                    };
                    let mut h = HeaderMap::new();
                    h.insert(H_CLOSED, "1");
                    h.insert(
                        "Nats-Expected-Last-Subject-Sequence",
                        last.to_string().as_str(),
                    );
                    // Only into this creation's stream, never one of the name made since.
                    h.insert("Nats-Expected-Stream", name);
                    let what = format!("{topic}/{p} (closing it)");
                    let message = [(subject.clone(), h, Bytes::new(), None)];
                    if self.send_fenced(&what, &message).await?.is_some() {
                        return Ok(());
                    }
                    // Appends keep landing: leave them a gap before reading again.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(LogError::Conflict {
                    what: format!(
                        "{topic}/{p} (records kept arriving while the topic was deleted)"
                    ),
                })
            }
        });
        futures::future::try_join_all(closes).await.map(drop)
    }
}
