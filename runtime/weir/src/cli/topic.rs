//! `weir topic …`.

use clap::Subcommand;

use weir_api::Client;
use weir_core::TopicConfig;

/// Topic administration.
#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: letters, digits, '.', '_' and '-'.
        name: String,
        /// Number of partitions (fixed for the topic's life).
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Delete records older than this many ms (0 = keep forever).
        #[arg(long, default_value_t = 0)]
        retention_ms: u64,
        /// Per partition, delete the oldest records beyond this many bytes (0 = no bound).
        #[arg(long, default_value_t = 0)]
        retention_bytes: u64,
        /// Admission limit (the seed's 限流): at most this many records per key within
        /// --admit-window-ms; excess records are refused before they reach the log (0 = none).
        #[arg(long, default_value_t = 0)]
        admit_per_key: u32,
        /// The admission window, ms.
        #[arg(long, default_value_t = 1000)]
        admit_window_ms: u64,
    },
    /// List topics.
    List,
    /// Show a topic's partitions with their offsets and sizes.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and all its records.
    Delete {
        /// Topic name.
        name: String,
    },
}

pub(super) async fn run(client: &Client, cmd: TopicCommand) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            admit_per_key,
            admit_window_ms,
        } => {
            let info = client
                .create_topic(&TopicConfig {
                    name,
                    partitions,
                    retention_ms,
                    retention_bytes,
                    admission: (admit_per_key > 0).then_some(weir_core::Admission {
                        per_key: admit_per_key,
                        window_ms: admit_window_ms,
                    }),
                })
                .await?;
            println!(
                "created topic {} with {} partition(s)",
                info.config.name, info.config.partitions
            );
        }
        TopicCommand::List => {
            // Asked before the header is printed: a refused call prints only its error.
            let topics = client.list_topics().await?;
            println!(
                "{:<32} {:>10} {:>14} {:>14}",
                "TOPIC", "PARTITIONS", "RECORDS", "BYTES"
            );
            for t in topics {
                let records: u64 = t
                    .partitions
                    .iter()
                    .map(|p| p.end_offset.saturating_sub(p.start_offset))
                    .sum();
                let bytes: u64 = t.partitions.iter().map(|p| p.size_bytes).sum();
                println!(
                    "{:<32} {:>10} {:>14} {:>14}",
                    t.config.name, t.config.partitions, records, bytes
                );
            }
        }
        TopicCommand::Describe { name } => {
            let t = client.describe_topic(&name).await?;
            let retention = |v: u64, unit: &str| {
                if v == 0 {
                    "unbounded".to_string()
                } else {
                    format!("{v} {unit}")
                }
            };
            println!(
                "topic {}  partitions {}  retention {} / {}",
                t.config.name,
                t.config.partitions,
                retention(t.config.retention_ms, "ms"),
                retention(t.config.retention_bytes, "bytes per partition")
            );
            if let Some(a) = t.config.admission {
                println!(
                    "admission: at most {} record(s) per key per {} ms; excess refused before the log",
                    a.per_key, a.window_ms
                );
            }
            println!(
                "{:>9} {:>14} {:>14} {:>14}",
                "PARTITION", "START", "END", "BYTES"
            );
            for p in t.partitions {
                println!(
                    "{:>9} {:>14} {:>14} {:>14}",
                    p.partition, p.start_offset, p.end_offset, p.size_bytes
                );
            }
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}
