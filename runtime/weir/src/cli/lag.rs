//! `weir lag [NAME]`: per-partition lag of plugins and consumer groups, as
//! `kafka-consumer-groups --describe` prints it, with Burrow's status, alerts and probe delays.

use weir_api::lag::{json, table};
use weir_api::Client;

/// `weir lag`.
#[derive(clap::Args, Debug)]
pub struct LagArgs {
    /// A plugin or consumer group; all of them when omitted.
    pub name: Option<String>,
    /// Refresh every interval until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Refresh interval for --watch, ms.
    #[arg(long, default_value_t = 2000)]
    pub interval_ms: u64,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(
    client: &Client,
    args: LagArgs,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let name = args.name.clone().unwrap_or_default();
    loop {
        let lag = client.lag(&name).await?;
        let text = if args.json { json(&lag) } else { table(&lag) };
        if args.watch && !args.json {
            // Clear the screen and home the cursor, as `watch` does.
            print!("\x1b[2J\x1b[H");
        }
        print!("{text}");
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(args.interval_ms.max(100))) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
