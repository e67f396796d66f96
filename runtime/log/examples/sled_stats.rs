//! What a stopped server's sled store holds: keys and bytes per tree and key prefix, against
//! the file's size. For diagnosing disk and memory growth (BENCHMARKS.md, "Memory over time").
//! Since weir-log/4 sled holds the log's index and metadata only; the plugins' state is in
//! `kv.redb`, which this does not read.
//!
//! `cargo run -p weir-log --release --example sled_stats -- DATA_DIR` (the server must be stopped).

use std::collections::BTreeMap;

fn prefix(key: &[u8]) -> String {
    let cut: Vec<u8> = key
        .iter()
        .take_while(|b| b.is_ascii_graphic() && **b != b'/')
        .take(24)
        .copied()
        .collect();
    let mut p = String::from_utf8_lossy(&cut).into_owned();
    if key.get(cut.len()) == Some(&b'/') {
        p.push('/');
        if let Some(b) = key.get(cut.len() + 1).filter(|b| b.is_ascii_graphic()) {
            p.push(*b as char);
        }
    }
    p
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: sled_stats DATA_DIR (a stopped weir server's --data-dir)")?;
    if !std::path::Path::new(&dir).join("db").is_file() {
        return Err(
            format!("{dir} holds no sled `db` file: pass a weir server's --data-dir").into(),
        );
    }
    let db = sled::Config::new()
        .path(&dir)
        .segment_size(weir_log::sled_store::SEGMENT_BYTES)
        .open()?;
    println!("file: {:.1} MB on disk", db.size_on_disk()? as f64 / 1e6);
    let (mut all_keys, mut all_bytes) = (0u64, 0u64);
    for name in db.tree_names() {
        let tree = db.open_tree(&name)?;
        let mut groups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let g = groups.entry(prefix(&k)).or_default();
            g.0 += 1;
            g.1 += (k.len() + v.len()) as u64;
        }
        let (keys, bytes) = groups
            .values()
            .fold((0, 0), |(a, b), (k, n)| (a + k, b + n));
        all_keys += keys;
        all_bytes += bytes;
        println!(
            "tree {:?}: {keys} keys, {:.1} MB",
            String::from_utf8_lossy(&name),
            bytes as f64 / 1e6
        );
        for (p, (k, n)) in groups.iter().filter(|(_, (_, n))| *n > 1_000_000) {
            println!("  {p:<28} {k:>10} keys {:>9.1} MB", *n as f64 / 1e6);
        }
    }
    println!(
        "live: {all_keys} keys, {:.1} MB of keys and values",
        all_bytes as f64 / 1e6
    );
    Ok(())
}
