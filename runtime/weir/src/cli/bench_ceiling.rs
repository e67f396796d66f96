//! `weir bench discard-server`: weir's publish API with nothing stored behind it
//! (`weir_server::discard`), the gRPC ceiling `cargo xtask bench` measures durable publish
//! against.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// Arguments of `weir bench discard-server`.
#[derive(clap::Args, Debug, Clone)]
pub struct DiscardServer {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
}

/// Serves until `shutdown` (Ctrl-C).
pub(super) async fn run(args: DiscardServer, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    // The first line on stdout, as `weir serve` prints it (`cargo xtask bench` reads it).
    println!("weir listening on {}", listener.local_addr()?);
    eprintln!("A discard server: publishes are decoded and acknowledged, nothing is stored. Ctrl-C stops it.");
    weir_server::discard::serve(listener, shutdown).await?;
    Ok(())
}
