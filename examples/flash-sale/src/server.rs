//! A `weir serve` child process of the demo: started on loopback ports it reports, killed
//! with `kill -9` or stopped.

use std::path::Path;

use anyhow::{ensure, Context as _, Result};

/// A `weir serve` child process of the demo.
pub struct Server {
    child: std::process::Child,
    /// gRPC URL.
    pub url: String,
    /// Status page / metrics address.
    pub metrics: String,
    /// Kafka listener address, when started with `--kafka-listen`.
    pub kafka: Option<String>,
}

impl Server {
    /// Starts `weir serve` on `data_dir` with metrics, fast lag sampling and probes.
    ///
    /// # Errors
    /// The binary did not start or did not print its addresses.
    pub fn start(weir: &Path, data_dir: &Path, log: &Path) -> Result<Server> {
        Self::start_with(weir, data_dir, log, &[])
    }

    /// [`Server::start`] with more `weir serve` arguments (`--log nats://...`).
    ///
    /// # Errors
    /// As [`Server::start`].
    pub fn start_with(weir: &Path, data_dir: &Path, log: &Path, extra: &[&str]) -> Result<Server> {
        use std::io::BufRead;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut child = std::process::Command::new(weir)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--lag-sample-ms", "250", "--probe-interval-ms", "250"])
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            .env("WEIR_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", weir.display()))?;
        let stdout = child.stdout.take().expect("stdout");
        // Held from here, so a server whose output is not as expected is killed, not left.
        let mut server = Server {
            child,
            url: String::new(),
            metrics: String::new(),
            kafka: None,
        };
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut line = |prefix: &str| -> Result<String> {
            let l = lines.next().context("weir serve exited")??;
            l.strip_prefix(prefix)
                .map(str::to_string)
                .with_context(|| format!("unexpected output of weir serve: {l:?}"))
        };
        server.url = format!("http://{}", line("weir listening on ")?);
        server.metrics = line("weir metrics on ")?;
        if extra.contains(&"--kafka-listen") {
            server.kafka = Some(line("weir kafka on ")?);
        }
        Ok(server)
    }

    /// `kill -9`.
    pub fn kill9(mut self) -> Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -9 failed");
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait (a clean stop).
    pub fn stop(mut self) -> Result<()> {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
