//! The chaos test's weir nodes: started, killed, paused, restarted (on empty data directories
//! too), each with its own path to the NATS servers.

use super::*;

/// Starts weir node `i` (its `restarts`th start) with `--log url`; with `WEIR_PLUGIN_CHAOS_LOGS`
/// set, its info-level log goes to `<that dir>/w<i>-<restarts>.log` (the data directories are
/// deleted with the test).
pub(super) fn spawn_node(
    dir: &Path,
    listen: &str,
    url: &str,
    i: usize,
    restarts: usize,
) -> WeirProcess {
    let args = ["--log", url, "--cache-mb", "16"];
    match std::env::var_os("WEIR_PLUGIN_CHAOS_LOGS") {
        Some(logs) => {
            let logs = PathBuf::from(logs);
            std::fs::create_dir_all(&logs).unwrap();
            WeirProcess::spawn_logging(
                dir,
                listen,
                &args,
                &logs.join(format!("w{i}-{restarts}.log")),
            )
        }
        None => WeirProcess::spawn(dir, listen, &args),
    }
}

/// The three weir nodes: node 0 names every nats-server, node 1 all but `path`, node 2 only
/// `path` (which the freeze cycles SIGSTOP).
pub(super) struct Weirs {
    pub(super) procs: Vec<Option<WeirProcess>>,
    pub(super) ports: Vec<u16>,
    /// Each node's `--log`.
    pub(super) urls: Vec<String>,
    /// What the publishers send through.
    pub(super) nodes: Nodes,
    pub(super) dir: PathBuf,
    pub(super) restarts: usize,
}

impl Weirs {
    pub(super) fn start(dir: &Path, urls: Vec<String>) -> Weirs {
        let procs: Vec<Option<WeirProcess>> = urls
            .iter()
            .enumerate()
            .map(|(i, u)| {
                Some(spawn_node(
                    &dir.join(format!("w{i}")),
                    "127.0.0.1:0",
                    u,
                    i,
                    0,
                ))
            })
            .collect();
        let ports = procs.iter().map(|p| p.as_ref().unwrap().port()).collect();
        let nodes = Arc::new(Mutex::new(
            procs
                .iter()
                .map(|p| p.as_ref().map(|p| p.addr.clone()))
                .collect(),
        ));
        Weirs {
            procs,
            ports,
            urls,
            nodes,
            dir: dir.to_path_buf(),
            restarts: 0,
        }
    }

    pub(super) fn addr(&self, i: usize) -> String {
        self.procs[i].as_ref().unwrap().addr.clone()
    }

    pub(super) fn live(&self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|i| self.procs[*i].is_some())
            .collect()
    }

    /// `kill -9` node `i`, `down_ms` later a restart, every other one on an empty data
    /// directory; returns whether it was.
    pub(super) fn kill9_restart(&mut self, i: usize, down_ms: u64) -> bool {
        self.nodes.lock().unwrap()[i] = None;
        self.procs[i].take().unwrap().kill9();
        std::thread::sleep(Duration::from_millis(down_ms));
        self.restarts += 1;
        let fresh = self.restarts % 2 == 1;
        let name = if fresh {
            format!("w{i}-empty{}", self.restarts)
        } else {
            format!("w{i}")
        };
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        // The port may not be free again at once.
        let mut p = None;
        for _ in 0..100 {
            let (dir, url, restarts) = (self.dir.join(&name), &self.urls[i], self.restarts);
            let started = std::panic::catch_unwind(|| spawn_node(&dir, &listen, url, i, restarts));
            if let Ok(process) = started {
                p = Some(process);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let p = p.unwrap_or_else(|| panic!("weir node {i} did not start again on {listen}"));
        self.nodes.lock().unwrap()[i] = Some(p.addr.clone());
        self.procs[i] = Some(p);
        fresh
    }

    /// SIGSTOP node `i` for `ms` (publishers leave it alone meanwhile), then SIGCONT.
    pub(super) fn pause(&self, i: usize, ms: u64) {
        let pid = self.procs[i].as_ref().unwrap().child.id().to_string();
        self.nodes.lock().unwrap()[i] = None;
        let signal = |s: &str| {
            std::process::Command::new("kill")
                .args([s, &pid])
                .status()
                .unwrap()
        };
        signal("-STOP");
        std::thread::sleep(Duration::from_millis(ms));
        signal("-CONT");
        self.nodes.lock().unwrap()[i] = Some(self.addr(i));
    }

    /// `weir plugin list` through node 1 (never behind the frozen server), else a live one.
    pub(super) fn list(&self) -> String {
        let via = if self.procs[1].is_some() {
            1
        } else {
            self.live()[0]
        };
        common::weir_cli(&self.addr(via), &["plugin", "list"], "").1
    }

    /// Waits up to 30 s until the listing through every live node satisfies `check`;
    /// returns node 1's (or a live node's).
    pub(super) fn wait_listed(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listings: Vec<(usize, String)> = self
                .live()
                .into_iter()
                .map(|i| {
                    (
                        i,
                        common::weir_cli(&self.addr(i), &["plugin", "list"], "").1,
                    )
                })
                .collect();
            if listings.iter().all(|(_, l)| check(l)) {
                return self.list();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not listed so by every node within 30 s: {listings:#?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The node the listing says runs `plugin`.
    pub(super) fn runner(&self, listed: &str, plugin: &str) -> Option<usize> {
        let block = plugin_block(listed, plugin)?;
        let line = block
            .lines()
            .find(|l| l.trim_start().starts_with("runs on node"))?;
        (0..self.procs.len()).find(|i| {
            self.procs[*i].is_some() && line.contains(&format!("(127.0.0.1:{})", self.ports[*i]))
        })
    }

    /// A live node other than `not`, at random.
    pub(super) fn other_than(&self, not: Option<usize>, rng: &mut impl Rng) -> usize {
        let others: Vec<usize> = self
            .live()
            .into_iter()
            .filter(|i| Some(*i) != not)
            .collect();
        others[rng.random_range(0..others.len())]
    }

    /// Waits until every deployed plugin runs on a node (a deployment no node runs is issue
    /// 25's second defect).
    pub(super) fn wait_all_run(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let listed = self.list();
            let idle: Vec<&str> = PLUGINS
                .into_iter()
                .filter(|p| match plugin_block(&listed, p) {
                    Some(block) => !block.contains("runs on node"),
                    None => true,
                })
                .collect();
            if idle.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {idle:?} deployed but run by no node (or not deployed) for 45 s:\n{listed}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
