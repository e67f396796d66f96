//! Runs every `sh` block of docs/plugin-guide.md, in order, against a real `weir serve`: plugin
//! new, native unit test, build, `weir test`, deploy, publish, state, list, logs, upgrade — in
//! Rust, then new, unit test, build, `weir test` and deploy in Python and in JavaScript.

use crate::common;

use std::process::Command;

use common::{weir_bin, WeirProcess};

#[test]
fn the_plugin_guide_runs_as_written() {
    let guide = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/plugin-guide.md"
    ))
    .unwrap();
    let mut script = String::from("set -euo pipefail\n");
    let mut in_block = false;
    for line in guide.lines() {
        if line.trim_start() == "```sh" {
            in_block = true;
        } else if in_block && line.trim_start() == "```" {
            in_block = false;
        } else if in_block {
            script.push_str(line);
            script.push('\n');
        }
    }
    assert!(script.lines().count() > 10, "the guide lost its commands");

    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let bin_dir = std::path::Path::new(weir_bin())
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Generated crates share one target directory so their dependencies compile once.
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/plugin-guide");
    // `weir test` and the server share one compiled-component cache, as a developer's would.
    let compiled = tempfile::tempdir().unwrap();
    let server = WeirProcess::spawn(
        data.path(),
        "127.0.0.1:0",
        &["--compiled-cache", compiled.path().to_str().unwrap()],
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .env("PATH", path)
        .env("WEIR_SERVER", &server.addr)
        .env("CARGO_TARGET_DIR", target)
        .env("WEIR_CACHE_DIR", compiled.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the guide failed:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("created plugin project"), "{stdout}");
    // A newcomer's first build says what to run next, and that run works without --output.
    assert!(stdout.contains("next: weir test "), "{stdout}");
    assert!(stderr.contains("outputs: shop-counter.counts"), "{stderr}");
    assert!(
        stdout.contains(r#""topic":"shop-counter.counts""#),
        "weir test printed outputs: {stdout}"
    );
    assert!(stderr.contains("run 2: 3 record(s) in, 3 processed in all, 3 skipped as already processed, 0 new output(s)"), "{stderr}");
    assert!(
        stdout.contains("deployed plugin shop-counter v1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 (version 2)"),
        "ann's count in the deployed plugin: {stdout}"
    );
    assert!(
        stdout.contains("upgraded plugin shop-counter to v2"),
        "{stdout}"
    );
    for lang in ["py", "js"] {
        assert!(
            stdout.contains(&format!(r#""topic":"shop-counter-{lang}.counts""#)),
            "weir test printed the {lang} plugin's outputs: {stdout}"
        );
        assert!(
            stdout.contains(&format!("deployed plugin shop-counter-{lang} v1")),
            "{stdout}"
        );
    }
    assert_eq!(
        stdout.matches("2 (version 2)").count(),
        3,
        "ann's count in the Rust, Python and JavaScript plugins: {stdout}"
    );
}
