//! The Python SDK (sdk/python/weir_plugin.py) against the Rust codec, and the Python points
//! plugin's native unit tests. Needs `python3` (the machine's CPython); fails saying so if absent.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
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

/// Rust writes a batch blob; Python decodes it and emits one output per record; Rust decodes
/// the outputs: the encoding means the same thing on both sides.
#[test]
fn python_reads_rust_batches_and_rust_reads_python_outputs() {
    let dir = tempfile::tempdir().unwrap();
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
            offset: u64::MAX,
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
    std::fs::write(dir.path().join("batch.bin"), w.finish()).unwrap();
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
    let blob = std::fs::read(dir.path().join("outputs.bin")).unwrap();
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
        format!("{}/1700000000000/0", u64::MAX).as_bytes()
    );
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
