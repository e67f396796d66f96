//! Rust plugins: a crate built by cargo for wasm32-wasip2. Its `weir-sdk` (with the macros and
//! the batch codec it uses) is written into the project's `vendor/` from copies this `weir`
//! binary carries, so a project builds anywhere, with nothing but the binary and cargo; `--sdk`
//! points the dependency at a checkout's `sdk/` instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::Files;

/// The SDK sources this weir was built with: (path under `vendor/`, contents). The manifests
/// are standalone versions of the workspace ones (same dependencies, versions pinned here).
const VENDORED: &[(&str, &str)] = &[
    (
        "weir-sdk/src/lib.rs",
        include_str!("../../../../../sdk/src/lib.rs"),
    ),
    (
        "weir-sdk/src/context.rs",
        include_str!("../../../../../sdk/src/context.rs"),
    ),
    (
        "weir-sdk/wit/world.wit",
        include_str!("../../../../../sdk/wit/world.wit"),
    ),
    (
        "weir-sdk-macros/src/lib.rs",
        include_str!("../../../../../sdk/macros/src/lib.rs"),
    ),
    (
        "weir-codec/src/lib.rs",
        include_str!("../../../../../codec/src/lib.rs"),
    ),
    (
        "weir-sdk/Cargo.toml",
        r#"[package]
name = "weir-sdk"
description = "Write weir consumer plugins in Rust (vendored by `weir plugin new`)"
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"
publish = false

[dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"
weir-codec = { path = "../weir-codec" }
weir-sdk-macros = { path = "../weir-sdk-macros" }
wit-bindgen = { version = "=0.46.0", default-features = false, features = ["macros", "realloc"] }
"#,
    ),
    (
        "weir-sdk-macros/Cargo.toml",
        r#"[package]
name = "weir-sdk-macros"
description = "The #[consumer] attribute of weir-sdk (vendored by `weir plugin new`)"
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"
publish = false

[lib]
proc-macro = true

[dependencies]
syn = { version = "2", features = ["full"] }
quote = "1"
proc-macro2 = "1"
"#,
    ),
    (
        "weir-codec/Cargo.toml",
        r#"[package]
name = "weir-codec"
description = "weir's batch and output blob encodings (vendored by `weir plugin new`)"
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"
publish = false

[dependencies]
"#,
    ),
];

/// Writes the crate: a working consumer, a unit test, a sample input and, unless `sdk` names
/// a checkout's `sdk/`, the vendored SDK.
pub(super) fn write_crate(name: &str, files: &Files, sdk: Option<PathBuf>) -> anyhow::Result<()> {
    let sdk_dependency = match sdk {
        Some(sdk) => {
            let sdk = sdk.canonicalize().unwrap_or(sdk);
            anyhow::ensure!(
                sdk.join("Cargo.toml").exists(),
                "--sdk {}: no Cargo.toml there; point it at the sdk/ directory of a weir checkout",
                sdk.display()
            );
            sdk.display().to_string()
        }
        None => {
            for (path, text) in VENDORED {
                files.write(&format!("vendor/{path}"), text)?;
            }
            "vendor/weir-sdk".to_string()
        }
    };
    let write = |rel: &str, text: String| files.write(rel, &text);
    write(
        "Cargo.toml",
        format!(
            r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
weir-sdk = {{ path = "{sdk_dependency}" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

# Fast plugins: opt-level 3 ran the points plugin 8-11% faster than "s" for a .wasm ~15%
# larger (weir's BENCHMARKS.md); "s" if the upload's size matters more.
[profile.release]
opt-level = 3
lto = true
codegen-units = 1
strip = true

# A standalone crate, not part of an enclosing workspace.
[workspace]
"#
        ),
    )?;
    write(".cargo/config.toml", "# `cargo plugin` builds the .wasm weir deploys (`weir plugin build` does the same).\n[alias]\nplugin = \"build --release --target wasm32-wasip2\"\n".into())?;
    write(".gitignore", "/target\n".into())?;
    write(
        "src/lib.rs",
        format!(
            r#"//! {name}: counts records per key and emits each running count to `{name}.counts`.

use weir_sdk::{{consumer, Context, Record, Result}};

/// Counts one record.
#[consumer]
pub fn count(record: &Record, ctx: &mut Context) -> Result<()> {{
    let key = record.key_str().unwrap_or("no-key");
    let state_key = format!("count/{{key}}");
    let count = ctx.get::<u64>(&state_key)?.unwrap_or(0) + 1;
    ctx.put(&state_key, &count)?;
    ctx.emit_json("{name}.counts", Some(key), &serde_json::json!({{ "key": key, "count": count }}))
}}

#[cfg(test)]
mod tests {{
    use std::collections::BTreeMap;

    use weir_sdk::codec::InRecord;
    use weir_sdk::MemoryState;

    use super::*;

    #[test]
    fn counts_per_key() {{
        let (config, mut state) = (BTreeMap::new(), MemoryState::default());
        let mut ctx = Context::new(&mut state, &config);
        for (offset, key) in ["ann", "bob", "ann"].iter().enumerate() {{
            let record = InRecord {{ offset: offset as u64, timestamp_ms: 0, partition: 0, key: Some(key.as_bytes()), value: b"{{}}", id: None, headers: vec![] }};
            count(&Record::new(record), &mut ctx).unwrap();
        }}
        assert_eq!(ctx.outputs().len(), 3);
        drop(ctx);
        assert_eq!(state.get_json::<u64>("count/ann"), Some(2));
    }}
}}
"#
        ),
    )?;
    Ok(())
}

/// Installs the wasm target if rustup lacks it.
fn ensure_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map_err(|e| anyhow::anyhow!("rustup is needed to build plugins: {e}"))?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-wasip2")
    {
        super::run(
            Command::new("rustup").args(["target", "add", "wasm32-wasip2"]),
            "rustup target add wasm32-wasip2",
        )?;
    }
    Ok(())
}

/// The `name` of a Cargo.toml's `[package]`.
fn package_name(manifest: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", manifest.display()))?;
    let mut in_package = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(value) = line
                .strip_prefix("name")
                .map(str::trim)
                .and_then(|l| l.strip_prefix('='))
            {
                return Ok(value.trim().trim_matches('"').to_string());
            }
        }
    }
    anyhow::bail!("{} has no [package] name", manifest.display())
}

/// Builds the plugin crate at `path` for wasm32-wasip2 in release; returns the artifact.
pub(super) fn build(path: &Path) -> anyhow::Result<PathBuf> {
    let manifest = path.join("Cargo.toml");
    let name = package_name(&manifest)?;
    ensure_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cargo = Command::new(cargo);
    cargo.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ]);
    cargo.arg(&manifest);
    super::run(&mut cargo, &format!("building {}", path.display()))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| path.join("target"));
    let wasm = target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    anyhow::ensure!(wasm.exists(), "the build produced no {}", wasm.display());
    Ok(wasm)
}
