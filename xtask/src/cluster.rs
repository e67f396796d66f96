//! `cargo xtask cluster`: a 3-node JetStream cluster and two weir nodes on 127.0.0.1, to try
//! weir in cluster mode (docs/scale-out.md). Runs in the foreground until Ctrl-C, which stops
//! every process it started; state is kept in `target/cluster` (`--fresh` starts empty).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use weir_cluster::{NatsCluster, SyncMode};

/// Parses the options, starts everything, prints where it is and waits.
pub fn cluster(args: &[String]) -> Result<()> {
    let (mut sync, mut fresh, mut release, mut weir_nodes) = (SyncMode::Default, false, false, 2);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sync-always" => sync = SyncMode::Always,
            "--fresh" => fresh = true,
            "--release" => release = true,
            "--weir-nodes" => {
                weir_nodes = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=8).contains(n))
                    .context("--weir-nodes takes a number from 1 to 8")?
            }
            other => bail!(
                "unknown option {other:?}; usage: cargo xtask cluster [--sync-always] [--fresh] [--release] [--weir-nodes N]"
            ),
        }
    }
    let nats = super::nats::ensure()?;
    let mut build = super::cargo();
    build.args(["build", "-p", "weir"]);
    if release {
        build.arg("--release");
    }
    super::run(&mut build)?;
    let root = super::workspace_root();
    let weir = root.join(if release {
        "target/release/weir"
    } else {
        "target/debug/weir"
    });
    let dir = root.join("target/cluster");
    if fresh && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    eprintln!(
        "Starting 3 nats-server nodes (JetStream, R3) in {} ...",
        dir.display()
    );
    let nats_cluster =
        NatsCluster::start(&nats, &dir.join("nats"), 3, sync).map_err(anyhow::Error::msg)?;
    let mut nodes = Vec::new();
    for i in 1..=weir_nodes {
        let node = WeirNode::start(
            &weir,
            &dir.join(format!("weir-{i}")),
            &nats_cluster.url_list(),
        )?;
        nodes.push(node);
    }
    println!();
    println!("NATS JetStream: {}", nats_cluster.url_list());
    for (i, n) in nodes.iter().enumerate() {
        println!("weir node {}: http://{}  (log: {})", i + 1, n.addr, n.log);
    }
    let first = &nodes[0].addr;
    println!();
    println!("Try it (any node serves any topic):");
    println!("  target/debug/weir --server http://{first} topic create orders --partitions 4");
    if let Some(second) = nodes.get(1) {
        println!("  echo hello | target/debug/weir --server http://{first} publish orders");
        println!(
            "  target/debug/weir --server http://{} consume orders --from earliest",
            second.addr
        );
    }
    println!();
    println!(
        "Stop everything with Ctrl-C. Data stays in {} (--fresh starts empty).",
        dir.display()
    );
    // Ctrl-C reaches the whole foreground process group: the servers stop with this process.
    loop {
        std::thread::sleep(Duration::from_secs(1));
        for (i, n) in nodes.iter_mut().enumerate() {
            if let Ok(Some(status)) = n.child.try_wait() {
                bail!("weir node {} exited ({status}); see {}", i + 1, n.log);
            }
        }
    }
}

/// A `weir serve --log ...` child process.
pub struct WeirNode {
    /// Its gRPC address.
    pub addr: String,
    /// Its log file.
    pub log: String,
    child: Child,
}

impl WeirNode {
    fn start(weir: &Path, data_dir: &Path, log_urls: &str) -> Result<Self> {
        let log_path = data_dir.with_extension("log");
        let port = weir_cluster::free_ports(1)[0];
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(weir)
            .args(["serve", "--listen", &addr, "--log", log_urls, "--data-dir"])
            .arg(data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log_path)?))
            .spawn()
            .with_context(|| format!("starting {}", weir.display()))?;
        let mut node = WeirNode {
            addr,
            log: log_path.display().to_string(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&node.addr).is_err() {
            if let Ok(Some(status)) = node.child.try_wait() {
                bail!("weir exited ({status}) before listening; see {}", node.log);
            }
            if Instant::now() > deadline {
                bail!(
                    "weir did not listen on {} within 60 s; see {}",
                    node.addr,
                    node.log
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(node)
    }
}

impl Drop for WeirNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
