//! A topic's life on JetStream: its config in the metadata stream, its stream, creation and
//! deletion — each write either fenced on what the writer read or aimed at a name no later
//! topic can have, so a request that failed and lands late never undoes a later one.
//!
//! - The config key is never purged: a deletion writes an empty value over it, fenced on the
//!   config it read, and a creation is fenced on the key's last sequence (the empty value or
//!   nothing). A stale creation cannot bring back a deleted topic, nor a stale deletion
//!   remove a topic created since.
//! - Every creation names a new stream, `<prefix>-t-<token>-<8 hex>`, recorded in the config
//!   (topics created before this keep `<prefix>-t-<token>`). A stream deletion, a trim or a
//!   producer-state purge that lands late reaches only the stream it was meant for, never the
//!   stream of the topic created again under the same name; appends and closes name their
//!   stream (`Nats-Expected-Stream`), so a late one is refused by another incarnation's.
//! - Group offsets of a deleted topic are overwritten with empty values (fenced) rather than
//!   purged, for the same reason as the key.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use weir_core::TopicConfig;
use weir_log::LogError;

use crate::partition::rand_id;
use crate::{engine, JetStreamLog};

/// A topic's stored config: the broker's config and the name of its stream.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredTopic {
    #[serde(flatten)]
    config: TopicConfig,
    /// Absent in configs written before streams were named per creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
}

/// How many times a tombstone is tried again when a write lands between its read and it.
const TOMBSTONE_TRIES: usize = 20;

impl JetStreamLog {
    pub(crate) async fn load_topics_async(&self) -> Result<Vec<TopicConfig>, LogError> {
        let mut topics = Vec::new();
        for (subject, bytes) in self.meta_list(&self.names.topic_keys()).await? {
            let stored: StoredTopic =
                serde_json::from_slice(&bytes).map_err(|e| LogError::Malformed {
                    what: subject,
                    reason: e.to_string(),
                })?;
            self.learn_stream(&stored);
            topics.push(stored.config);
        }
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    /// Records where a topic's records live; a topic created again elsewhere (a new stream)
    /// drops the handle of the old one.
    fn learn_stream(&self, stored: &StoredTopic) {
        let topic = &stored.config.name;
        let name = stored
            .stream
            .clone()
            .unwrap_or_else(|| self.names.topic_stream(topic));
        let previous = self
            .topic_streams
            .lock()
            .insert(topic.clone(), name.clone());
        if previous.is_some_and(|p| p != name) {
            // Another creation: nothing this node knew of the old one's partitions holds (the
            // broker opens the topic anew, `SharedLog::incarnation`).
            self.streams.lock().remove(topic);
            self.parts.lock().retain(|tp, _| tp.topic != *topic);
        }
    }

    /// The name of a topic's stream: as its stored config says, read once.
    pub(crate) async fn stream_name(&self, topic: &str) -> Result<String, LogError> {
        if let Some(name) = self.topic_streams.lock().get(topic) {
            return Ok(name.clone());
        }
        let key = self.names.topic_key(topic);
        match self.meta_get(&key).await? {
            Some(v) if !v.bytes.is_empty() => {
                let stored: StoredTopic =
                    serde_json::from_slice(&v.bytes).map_err(|e| LogError::Malformed {
                        what: key,
                        reason: e.to_string(),
                    })?;
                self.learn_stream(&stored);
                Ok(self.topic_streams.lock()[topic].clone())
            }
            // No such topic: the name an old one would have had (the caller's request fails
            // on it with the engine's "not found").
            _ => Ok(self.names.topic_stream(topic)),
        }
    }

    /// The stream of an existing topic (created by [`JetStreamLog::create_stream`]; never
    /// recreated here, so a deleted topic's stream does not come back).
    pub(crate) async fn stream(&self, topic: &str) -> Result<jetstream::stream::Stream, LogError> {
        if let Some(s) = self.streams.lock().get(topic) {
            return Ok(s.clone());
        }
        let name = self.stream_name(topic).await?;
        let stream = self.js.get_stream(&name).await.map_err(|e| {
            engine(
                &format!("open the stream of topic {topic}"),
                format!("{e} (stream {name}; was the topic deleted?)"),
            )
        })?;
        self.streams
            .lock()
            .insert(topic.to_string(), stream.clone());
        Ok(stream)
    }

    pub(crate) async fn put_topic_async(&self, config: &TopicConfig) -> Result<(), LogError> {
        let key = self.names.topic_key(&config.name);
        // Created only if absent (never written, or deleted: an empty value), fenced on what
        // was read: of two nodes creating a topic one wins, and a creation that lands late
        // after the topic was deleted again is refused.
        let expect = match self.meta_get(&key).await? {
            Some(v) if !v.bytes.is_empty() => {
                return Err(LogError::Conflict {
                    what: format!("topic {} (it exists)", config.name),
                })
            }
            Some(v) => v.seq,
            None => 0,
        };
        let stream = format!(
            "{}-{:08x}",
            self.names.topic_stream(&config.name),
            rand_id() as u32
        );
        let stored = StoredTopic {
            config: config.clone(),
            stream: Some(stream.clone()),
        };
        let json = serde_json::to_vec(&stored).expect("topic config serialises");
        let written = self.meta_put(&key, json.into(), Some(expect)).await?;
        self.learn_stream(&stored);
        // A stream left by an earlier topic of this name whose deletion was cut short holds
        // the subjects: remove it (no topic of this name exists but the one just written).
        let made = match self.delete_orphan(config, &key, written).await {
            Ok(()) => self.create_stream(&config.name, &stream).await,
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            // No topic without its stream: every node would fail to open it.
            if let Err(undo) = self.tombstone(&key, written).await {
                tracing::warn!(message = "A topic whose stream could not be made is left in the metadata; delete it.", topic = %config.name, error = %undo);
            }
            return Err(e);
        }
        Ok(())
    }

    pub(crate) async fn delete_topic_async(&self, config: &TopicConfig) -> Result<(), LogError> {
        // What is deleted is the creation the key holds now, read once: its stream is closed
        // and removed, and its key is overwritten fenced on this read (a creation landing in
        // between makes the deletion fail rather than remove a topic it never closed).
        let key = self.names.topic_key(&config.name);
        let Some(read) = self.meta_get(&key).await?.filter(|v| !v.bytes.is_empty()) else {
            return Ok(()); // deleted already
        };
        let stored: StoredTopic =
            serde_json::from_slice(&read.bytes).map_err(|e| LogError::Malformed {
                what: key.clone(),
                reason: e.to_string(),
            })?;
        self.learn_stream(&stored);
        let stream = stored
            .stream
            .clone()
            .unwrap_or_else(|| self.names.topic_stream(&config.name));
        // Closed first, fenced on what every partition holds: from then on no node can
        // acknowledge a record of it. A deletion that fails before this never lands later
        // over records acknowledged after it (its close is refused by the engine).
        self.close_stream(&config.name, &stored.config, &stream)
            .await?;
        // The groups' commits as they are before the key goes: read now, overwritten fenced
        // on this read, so a commit on a creation made after the key went is kept.
        let groups = self
            .meta_seqs(&self.names.topic_group_keys(&config.name))
            .await?;
        // Then the key: a topic never exists without its stream (a crash after this leaves
        // an orphan stream, which creating the topic again removes).
        self.tombstone(&key, read.seq).await.map_err(|e| match e {
            LogError::Conflict { .. } => LogError::Conflict {
                what: format!("topic {} (created again while it was deleted)", config.name),
            },
            e => e,
        })?;
        for (subject, seq) in groups {
            match self.tombstone(&subject, seq).await {
                Ok(()) | Err(LogError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // Only this creation's views: one learned meanwhile (created again) stays.
        if self.topic_streams.lock().get(&config.name) == Some(&stream) {
            self.streams.lock().remove(&config.name);
            self.topic_streams.lock().remove(&config.name);
            self.parts.lock().retain(|tp, _| tp.topic != config.name);
        }
        self.delete_stream_named(&stream).await?;
        Ok(())
    }

    /// Writes an empty value over the value a subject holds now, fenced on it (a write
    /// landing in between makes it read again); nothing to do for an empty subject.
    pub(crate) async fn tombstone_current(&self, subject: &str) -> Result<(), LogError> {
        for _ in 0..TOMBSTONE_TRIES {
            match self.meta_get(subject).await? {
                Some(v) if !v.bytes.is_empty() => match self.tombstone(subject, v.seq).await {
                    Err(LogError::Conflict { .. }) => continue,
                    other => return other,
                },
                _ => return Ok(()),
            }
        }
        Err(LogError::Conflict {
            what: subject.to_string(),
        })
    }

    /// Writes an empty value over the value at `seq`, only if it is still the subject's last.
    pub(crate) async fn tombstone(&self, subject: &str, seq: u64) -> Result<(), LogError> {
        self.meta_seqs_known.lock().remove(subject);
        self.meta_put(subject, Bytes::new(), Some(seq))
            .await
            .map(|_| ())
    }

    /// Deletes a stream by name if there is one.
    async fn delete_stream_named(&self, name: &str) -> Result<(), LogError> {
        match self.js.delete_stream(name).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(engine(&format!("delete stream {name}"), e)),
        }
    }

    /// Deletes whatever stream holds a topic's subjects: what an earlier topic of the name
    /// left when its deletion was cut short (under its own name, or the old shared one) —
    /// only while the key still holds the creation this node wrote at `written` (a node
    /// paused here must not delete the stream of a creation made since).
    async fn delete_orphan(
        &self,
        config: &TopicConfig,
        key: &str,
        written: u64,
    ) -> Result<(), LogError> {
        let subject = self.names.chunk_subject(&config.name, 0);
        let orphan = match self.js.stream_by_subject(subject).await {
            Ok(name) => name,
            Err(e) if e.to_string().to_ascii_lowercase().contains("no stream") => return Ok(()),
            Err(e) if e.to_string().contains("not found") => return Ok(()),
            Err(e) => {
                return Err(engine(
                    &format!("look for a stream left by an earlier topic {}", config.name),
                    e,
                ))
            }
        };
        if self.meta_get(key).await?.map(|v| v.seq) != Some(written) {
            return Err(LogError::Conflict {
                what: format!("topic {} (deleted or created again meanwhile)", config.name),
            });
        }
        self.delete_stream_named(&orphan).await
    }

    /// Creates a topic's stream under `name` with the configured replicas.
    async fn create_stream(&self, topic: &str, name: &str) -> Result<(), LogError> {
        let config = jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![self.names.topic_subjects(topic)],
            num_replicas: self.options.replicas,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            allow_atomic_publish: true,
            // Walks read the tail many messages per request (direct.rs).
            allow_direct: true,
            // The fence, not the duplicate window, keeps appends unique.
            duplicate_window: Duration::from_secs(1),
            max_message_size: -1,
            ..Default::default()
        };
        let what = format!(
            "create the stream of topic {topic} ({} replicas)",
            self.options.replicas
        );
        let stream = crate::meta::ensure_stream(
            &self.js,
            config,
            &what,
            Duration::from_secs(15),
            crate::meta::transient,
        )
        .await?;
        self.streams.lock().insert(topic.to_string(), stream);
        Ok(())
    }
}
