//! A `weir serve` (or `weir bench discard-server`) child process for the benchmarks: started
//! on port 0, its addresses read from the lines it prints, stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::run;

/// A `weir serve` child process.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) url: String,
    /// Where it serves Kafka clients, when started with `--kafka-listen`.
    pub(crate) kafka: Option<String>,
}

impl Server {
    pub(crate) fn start(bin: &Path, data_dir: &Path, fsync: &str) -> Result<Server> {
        Self::start_with(bin, data_dir, fsync, &[])
    }

    pub(crate) fn start_with(
        bin: &Path,
        data_dir: &Path,
        fsync: &str,
        extra: &[&str],
    ) -> Result<Server> {
        let mut command = Command::new(bin);
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--fsync",
                fsync,
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra);
        Self::spawn(command)
    }

    /// `weir bench discard-server`: the API with nothing stored, the gRPC ceiling.
    pub(crate) fn start_discard(bin: &Path) -> Result<Server> {
        let mut command = Command::new(bin);
        command.args(["bench", "discard-server", "--listen", "127.0.0.1:0"]);
        Self::spawn(command)
    }

    /// Starts `command`, which prints `weir listening on ADDR` first on its stdout.
    fn spawn(mut command: Command) -> Result<Server> {
        let mut child = command
            .env("WEIR_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting weir")?;
        let kafka_asked = command.get_args().any(|a| a == "--kafka-listen");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("weir listening on ")
            .with_context(|| format!("the weir server did not start: {line:?}"))?
            .to_string();
        // The Kafka address follows on a line of its own.
        let mut kafka = None;
        while kafka_asked && kafka.is_none() {
            line.clear();
            if stdout.read_line(&mut line)? == 0 {
                bail!("weir serve --kafka-listen did not say where it serves Kafka");
            }
            kafka = line
                .trim()
                .strip_prefix("weir kafka on ")
                .map(str::to_string);
        }
        Ok(Server {
            url: format!("http://{addr}"),
            kafka,
            child,
        })
    }

    /// The process id (for `weir bench plugin --server-pid`).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        run(Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string()))?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("weir serve exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
