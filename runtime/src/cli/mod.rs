//! The `weir` command line: argument definitions and dispatch. Every command but `serve` is a
//! client of the gRPC API. `main.rs` only parses, sets up logging and calls [`run`].

mod bench;
mod consume;
mod plugin;
mod publish;
mod scaffold;
mod test;
mod topic;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, DEFAULT_SERVER};
use crate::durability::FsyncPolicy;
use crate::server::{self, ServerConfig};

/// weir: a durable log with WebAssembly consumers that have exactly-once effects.
#[derive(Parser, Debug)]
#[command(name = "weir", version, about, max_term_width = 100)]
pub struct Cli {
    /// Server to talk to (not used by `serve`).
    #[arg(long, global = true, env = "WEIR_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server on an embedded store.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Publish records (the value argument, or one record per stdin line).
    Publish(publish::PublishArgs),
    /// Print records of a topic, following the tail.
    Consume(consume::ConsumeArgs),
    /// Deploy and operate WebAssembly consumer plugins.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Query plugin state.
    #[command(subcommand)]
    State(plugin::StateCommand),
    /// Run a plugin against JSON-lines input in a local runtime (no server needed).
    Test(test::TestArgs),
    /// Measure throughput and latency.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// `weir serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Directory of the embedded store (created if missing).
    #[arg(long, default_value = "weir-data")]
    pub data_dir: PathBuf,
    /// Address to listen on; port 0 picks a free one (printed at start).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// When writes are synced: `always` (ack after fsync, group commit), `interval:<ms>`
    /// (ack after write, fsync every interval), `never` (fsync only at shutdown).
    #[arg(long, default_value = "always", value_parser = clap::value_parser!(FsyncPolicy))]
    pub fsync: FsyncPolicy,
    /// Largest record accepted, in encoded bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_record_bytes: usize,
    /// How often retention runs, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub retention_check_ms: u64,
    /// sled page cache in MiB.
    #[arg(long, default_value_t = 512)]
    pub cache_mb: u64,
}

impl clap::builder::ValueParserFactory for FsyncPolicy {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| s.parse::<FsyncPolicy>())
    }
}

/// Runs a parsed command line until it finishes or `shutdown` is cancelled (Ctrl-C).
///
/// # Errors
/// Whatever the command failed with, as a message for the user.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args, shutdown).await,
        Command::Topic(cmd) => topic::run(&connect(&cli.server).await?, cmd).await,
        Command::Publish(args) => publish::run(&connect(&cli.server).await?, args).await,
        Command::Consume(args) => consume::run(&connect(&cli.server).await?, args, shutdown).await,
        Command::Plugin(cmd) => match plugin::local_command(&cmd) {
            Some(result) => result,
            None => plugin::run(&connect(&cli.server).await?, cmd).await,
        },
        Command::State(cmd) => plugin::state(&connect(&cli.server).await?, cmd).await,
        Command::Test(args) => test::run(args).await,
        Command::Bench(cmd) => bench::run(&cli.server, cmd, shutdown).await,
    }
}

async fn connect(server: &str) -> anyhow::Result<Client> {
    Ok(Client::connect(server).await?)
}

async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.max_record_bytes == 0 || args.max_record_bytes > 32 * 1024 * 1024 {
        anyhow::bail!("--max-record-bytes must be between 1 and 33554432");
    }
    let mut config = ServerConfig::new(args.data_dir);
    config.listen = args.listen;
    config.fsync = args.fsync;
    config.cache_bytes = args.cache_mb * 1024 * 1024;
    config.broker.max_record_bytes = args.max_record_bytes;
    config.broker.retention_interval =
        std::time::Duration::from_millis(args.retention_check_ms.max(1));
    server::run(config, shutdown, |addr| {
        // Machine-readable for scripts and tests that start the server on port 0.
        println!("weir listening on {addr}");
    })
    .await?;
    Ok(())
}
