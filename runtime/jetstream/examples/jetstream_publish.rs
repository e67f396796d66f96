//! The peer in BENCHMARKS.md's cluster section: JetStream's own publish of the records
//! `weir bench publish` sends (100-byte values, 16-byte keys), with no weir in between, to an
//! R3 stream of 4 partition subjects, 8 publishers with 64 acks in flight each.
//!
//! `--mode per-record`: one message per record, the NATS-native way.
//! `--mode packed`: records packed into ~128 KiB messages (weir packs its chunks to 256 KiB).
//!
//! cargo run --release -p weir-jetstream --example jetstream_publish -- \
//!     --servers nats://127.0.0.1:4222 --records 1000000 --mode packed

use std::collections::VecDeque;
use std::time::Instant;

use async_nats::jetstream;
use bytes::{BufMut, Bytes, BytesMut};

const PUBLISHERS: usize = 8;
const WINDOW: usize = 64;
const PARTITIONS: usize = 4;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    let servers = arg(&args, "--servers").ok_or("--servers nats://HOST:PORT[,...] is required")?;
    let records: usize = arg(&args, "--records").map_or(Ok(1_000_000), |r| r.parse())?;
    let replicas: usize = arg(&args, "--replicas").map_or(Ok(3), |r| r.parse())?;
    let mode = arg(&args, "--mode").unwrap_or_else(|| "packed".into());
    let packed = match mode.as_str() {
        "packed" => true,
        "per-record" => false,
        other => return Err(format!("--mode {other:?}: use packed or per-record").into()),
    };
    let urls: Vec<String> = servers.split(',').map(String::from).collect();
    let client = async_nats::connect(urls).await?;
    let js = jetstream::new(client);
    let name = format!("peer-bench-{}", std::process::id());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;

    // The same shape of record weir's benchmark sends: 16-byte key, 100-byte value.
    let record = |i: usize| -> (Bytes, Bytes) {
        let mut key = format!("k{i}").into_bytes();
        key.resize(16, b'.');
        (Bytes::from(key), Bytes::from(vec![(i % 251) as u8; 100]))
    };
    let mut messages: Vec<(String, Bytes)> = Vec::new();
    if packed {
        let mut buf = BytesMut::new();
        let mut part = 0;
        for i in 0..records {
            let (k, v) = record(i);
            buf.put_u32(k.len() as u32);
            buf.put_slice(&k);
            buf.put_u32(v.len() as u32);
            buf.put_slice(&v);
            if buf.len() >= 128 * 1024 || i + 1 == records {
                messages.push((format!("{name}.{part}"), buf.split().freeze()));
                part = (part + 1) % PARTITIONS;
            }
        }
    } else {
        for i in 0..records {
            let (k, v) = record(i);
            let mut buf = BytesMut::with_capacity(k.len() + v.len() + 8);
            buf.put_u32(k.len() as u32);
            buf.put_slice(&k);
            buf.put_slice(&v);
            messages.push((format!("{name}.{}", i % PARTITIONS), buf.freeze()));
        }
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per = messages.len().div_ceil(PUBLISHERS);
    for share in messages.chunks(per.max(1)) {
        let (js, share) = (js.clone(), share.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut in_flight = VecDeque::new();
            for (subject, payload) in share {
                in_flight.push_back(js.publish(subject, payload).await?);
                if in_flight.len() >= WINDOW {
                    in_flight.pop_front().expect("in flight").await?;
                }
            }
            for ack in in_flight {
                ack.await?;
            }
            Ok::<_, async_nats::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let info = stream.get_info().await?;
    js.delete_stream(&name).await?;
    println!(
        "jetstream {mode} R{replicas}: {records} records in {} messages, {:.2} s: throughput: {:.0} records/s (stream holds {} messages)",
        messages.len(),
        elapsed.as_secs_f64(),
        records as f64 / elapsed.as_secs_f64(),
        info.state.messages
    );
    Ok(())
}
