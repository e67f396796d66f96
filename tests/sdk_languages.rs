//! The Python and JavaScript SDKs (sdk/python/weir_plugin.py, sdk/js/weir-plugin.js) against
//! the Rust codec, the points examples' native unit tests, and the examples' copies of the SDK
//! files. Needs `python3` and `node` (20+); fails saying so if either is absent.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn python(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("python3")
        .args(args)
        .current_dir(dir)
        .env("PYTHONPATH", root().join("sdk/python"))
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is needed for the Python SDK tests and could not run: {e}")
        })
}

fn node(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("node")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "node (Node.js 20+) is needed for the JavaScript SDK tests and could not run: {e}"
            )
        })
}

/// Rust writes a batch blob into `dir/batch.bin`; `max_offset` is the second record's offset.
fn write_rust_batch(dir: &Path, max_offset: u64) {
    let mut w = weir_codec::Writer::new();
    let records = [
        weir_codec::InRecord {
            offset: 7,
            timestamp_ms: -5,
            partition: 2,
            key: Some(b"u1"),
            value: "{\"n\":1} ü".as_bytes(),
            id: Some("order-1"),
            headers: vec![("h", b"\x00\xff"), ("h2", b"")],
        },
        weir_codec::InRecord {
            offset: max_offset,
            timestamp_ms: 1_700_000_000_000,
            partition: 0,
            key: None,
            value: b"",
            id: None,
            headers: vec![],
        },
    ];
    for r in &records {
        w.push_in(r);
    }
    std::fs::write(dir.join("batch.bin"), w.finish()).unwrap();
}

/// Rust decodes what a script wrote to `dir/outputs.bin` from the batch of `write_rust_batch`.
fn check_outputs(dir: &Path, max_offset: u64) {
    let blob = std::fs::read(dir.join("outputs.bin")).unwrap();
    let outputs = weir_codec::decode_outputs(&blob).unwrap();
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[0].topic, "order-1");
    assert_eq!(outputs[0].key, Some(&b"u1"[..]));
    assert_eq!(outputs[0].value, "{\"n\":1} ü7/-5/2".as_bytes());
    assert_eq!(
        outputs[0].headers,
        vec![("h", &b"\x00\xff"[..]), ("h2", &b""[..])]
    );
    assert_eq!(outputs[1].topic, "out");
    assert_eq!(outputs[1].key, None);
    assert_eq!(
        outputs[1].value,
        format!("{max_offset}/1700000000000/0").as_bytes()
    );
}

/// Rust writes a batch blob; Python decodes it and emits one output per record; Rust decodes
/// the outputs: the encoding means the same thing on both sides.
#[test]
fn python_reads_rust_batches_and_rust_reads_python_outputs() {
    let dir = tempfile::tempdir().unwrap();
    write_rust_batch(dir.path(), u64::MAX);
    let script = r#"
import weir_plugin as weir
records = weir.decode_batch(open("batch.bin", "rb").read())
outs = []
for r in records:
    outs.append(weir.Output(r.id or "out", r.key, r.value + str(r.offset).encode() + b"/" + str(r.timestamp_ms).encode() + b"/" + str(r.partition).encode(), r.headers))
open("outputs.bin", "wb").write(weir.encode_outputs(outs))
"#;
    let out = python(&["-c", script], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_outputs(dir.path(), u64::MAX);
}

/// The same in JavaScript. Offsets and timestamps are JavaScript numbers there, exact below
/// 2^53 (a partition would need 285 years at a million records a second to pass it).
#[test]
fn javascript_reads_rust_batches_and_rust_reads_javascript_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let max_offset = (1u64 << 53) - 1;
    write_rust_batch(dir.path(), max_offset);
    let sdk = root().join("sdk/js/weir-plugin.js");
    let script = format!(
        r#"
import {{ readFileSync, writeFileSync }} from "node:fs";
import {{ decodeBatch, encodeOutputs, Output }} from "{}";
const utf8 = (s) => Uint8Array.from(Buffer.from(s));
const outs = decodeBatch(new Uint8Array(readFileSync("batch.bin"))).map((r) => {{
  const tail = utf8(`${{r.offset}}/${{r.timestampMs}}/${{r.partition}}`);
  const value = new Uint8Array(r.value.length + tail.length);
  value.set(r.value);
  value.set(tail, r.value.length);
  return new Output(r.id ?? "out", r.key, value, r.headers);
}});
writeFileSync("outputs.bin", encodeOutputs(outs));
"#,
        sdk.display()
    );
    std::fs::write(dir.path().join("check.mjs"), script).unwrap();
    let out = node(&["check.mjs"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_outputs(dir.path(), max_offset);
}

/// The examples carry their own copy of the SDK file, as a project from `weir plugin new`
/// does: it must be this repository's SDK.
#[test]
fn the_examples_carry_this_sdk() {
    for (copy, sdk) in [
        (
            "examples/points-py/weir_plugin.py",
            "sdk/python/weir_plugin.py",
        ),
        ("examples/points-js/weir-plugin.js", "sdk/js/weir-plugin.js"),
    ] {
        let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
        assert!(
            read(copy) == read(sdk),
            "{copy} differs from {sdk}: copy the SDK file over it"
        );
    }
}

#[test]
fn the_javascript_points_plugin_passes_its_native_unit_tests() {
    let out = node(&["--test"], &root().join("examples/points-js"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("# pass 2"), "{stdout}");
}

#[test]
fn the_python_points_plugin_passes_its_native_unit_tests() {
    let out = python(
        &["-m", "unittest", "-v"],
        &root().join("examples/points-py"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Ran 2 tests"), "{stderr}");
}
