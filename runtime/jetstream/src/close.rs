//! Closing a topic: the first step of its deletion. Deleting a topic's key and stream cannot
//! be made conditional in JetStream (a purge and a stream deletion take no expectation), so a
//! deletion that failed — its request waiting in a frozen server, delivered later — could
//! land after records acknowledged since and remove them. Closing can be conditional: one
//! message per partition on the partition's chunk subject, each fenced on that subject's last
//! sequence as read just before, in atomic batches. It lands only if no record was appended
//! since the read; once it has landed every append is refused (fenced on a sequence before
//! the close, it makes the writer read the tail, which says closed), so nothing is
//! acknowledged between the close and the removal.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;
use weir_core::TopicConfig;
use weir_log::LogError;

use crate::partition::{H_CLOSED, MAX_BATCH_MESSAGES};
use crate::{engine, JetStreamLog};

/// How many times a close re-reads the partitions after a record landed in between.
const CLOSE_TRIES: usize = 50;

impl JetStreamLog {
    /// Closes every partition of a topic (see the module documentation): the first step of
    /// [`weir_log::Log::delete_topic`]. A topic without a stream has nothing to close.
    /// Blocking.
    ///
    /// # Errors
    /// The engine did not answer, or records kept landing between the read and the close.
    pub fn close_topic(&self, config: &TopicConfig) -> Result<(), LogError> {
        self.block_on(self.close_topic_async(config))
    }

    pub(crate) async fn close_topic_async(&self, config: &TopicConfig) -> Result<(), LogError> {
        let name = self.stream_name(&config.name).await?;
        let stream = match self.js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) if e.to_string().contains("not found") => return Ok(()),
            Err(e) => return Err(engine(&format!("open stream {name}"), e)),
        };
        let partitions: Vec<u32> = (0..config.partitions).collect();
        for share in partitions.chunks(MAX_BATCH_MESSAGES) {
            let mut tries = 0;
            loop {
                let mut messages = Vec::with_capacity(share.len());
                for p in share {
                    let subject = self.names.chunk_subject(&config.name, *p);
                    let last = match stream
                        .raw_message_builder()
                        .last_by_subject(subject.clone())
                        .send()
                        .await
                    {
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
                    messages.push((subject, h, Bytes::new(), None));
                }
                // Only into this topic's stream, never one of the name created since.
                messages[0].1.insert("Nats-Expected-Stream", name.as_str());
                let what = format!("topic {} (closing it)", config.name);
                if self.send_fenced(&what, &messages).await?.is_some() {
                    break;
                }
                tries += 1;
                if tries >= CLOSE_TRIES {
                    return Err(LogError::Conflict {
                        what: format!(
                            "topic {} (records kept arriving while it was deleted)",
                            config.name
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}
