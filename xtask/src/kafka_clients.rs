//! `cargo xtask kafka-clients`: installs the Kafka clients the Kafka-protocol tests run
//! against weir — clients nobody here wrote, as issue 24 asks:
//! - Python `confluent-kafka` (its wheel bundles librdkafka), pinned by version and sha256,
//!   into `target/kafka-clients/venv`;
//! - `kcat` (librdkafka's command-line client), Debian's package, pinned by version.
//!
//! The tests find them there (`tests/kafka.rs`) and fail, saying to run this, when they
//! are missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// confluent-kafka's version (it bundles librdkafka 2.16.0).
pub const CONFLUENT_KAFKA: &str = "2.16.2";
/// sha256 of `confluent_kafka-2.16.2-cpXY-cpXY-manylinux_2_28_x86_64.whl` for CPython 3.10 to
/// 3.13 on Linux x86_64 (this project's machines have 3.11); pip picks the one for the venv's
/// Python and refuses any other file.
const WHEEL_SHA256: &[&str] = &[
    "3ae6219de6c062b55712d877b096d3d18b1ba87c88dde9f4cbf9ef66b458914a", // cp310
    "f4cae8bc8e5208def5cfe9ac07b85c934c07e5424011608b3bac713cbcc82c3e", // cp311
    "ecbbe58ddc8a1c9cbcdb1db33ba2d8865c539f2fd8ffd2668900672b8df0aca8", // cp312
    "66faaa9eb2160d6acde7e03900db7845c0e5e9e60e18de73dd728735a0d4fc36", // cp313
];
/// Debian's kcat package version (bookworm).
const KCAT: &str = "1.7.1-2";

/// Installs both clients if missing; returns the venv's python.
pub(crate) fn ensure() -> Result<PathBuf> {
    let python = ensure_confluent_kafka()?;
    ensure_kcat()?;
    Ok(python)
}

/// Installs confluent-kafka if missing; returns the venv's python.
pub(crate) fn ensure_confluent_kafka() -> Result<PathBuf> {
    let dir = super::workspace_root().join("target/kafka-clients");
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    if installed_version(&python).as_deref() == Some(CONFLUENT_KAFKA) {
        return Ok(python);
    }
    std::fs::create_dir_all(&dir)?;
    if !venv.join("bin/pip").exists() {
        super::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "creating a Python venv for confluent-kafka (Python 3.10 to 3.13 with its venv \
             module is needed: apt-get install python3-venv)",
        )?;
    }
    let requirements = dir.join("requirements.txt");
    let hashes: Vec<String> = WHEEL_SHA256
        .iter()
        .map(|h| format!("--hash=sha256:{h}"))
        .collect();
    std::fs::write(
        &requirements,
        format!("confluent-kafka=={CONFLUENT_KAFKA} {}\n", hashes.join(" ")),
    )?;
    super::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--no-deps", "--require-hashes", "-r"])
            .arg(&requirements),
    )
    .with_context(|| format!("installing confluent-kafka=={CONFLUENT_KAFKA} from PyPI"))?;
    match installed_version(&python) {
        Some(v) if v == CONFLUENT_KAFKA => Ok(python),
        other => {
            bail!("confluent-kafka reports version {other:?} after installing {CONFLUENT_KAFKA}")
        }
    }
}

fn installed_version(python: &Path) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import importlib.metadata as m; import confluent_kafka; print(m.version('confluent-kafka'))"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn ensure_kcat() -> Result<()> {
    if Path::new("/usr/bin/kcat").exists() {
        return Ok(());
    }
    super::apt_install(&format!("kcat={KCAT}"))
}

/// `cargo xtask kafka-clients`: installs them and prints the python's path.
pub fn install() -> Result<()> {
    let python = ensure()?;
    println!("{}", python.display());
    Ok(())
}
