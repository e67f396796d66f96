//! What the JetStream engine tests share: a 3-node cluster on loopback and logs on it.

#![allow(dead_code)] // each test file uses part of it

use std::path::Path;

use bytes::Bytes;
use weir_cluster::{nats_server_binary, NatsCluster, SyncMode};
use weir_core::Record;
use weir_jetstream::{JetStreamLog, JetStreamOptions};

pub fn cluster(dir: &Path) -> NatsCluster {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = nats_server_binary(&root).unwrap_or_else(|e| panic!("{e}"));
    NatsCluster::start(&bin, dir, 3, SyncMode::Default).unwrap_or_else(|e| panic!("{e}"))
}

pub fn connect(c: &NatsCluster, prefix: &str) -> JetStreamLog {
    let mut o = JetStreamOptions::new(c.urls());
    o.prefix = prefix.into();
    JetStreamLog::connect(o).expect("connect")
}

/// A log reaching the cluster only through `servers`, whose requests give up after 3 s.
pub fn connect_through(servers: Vec<String>, prefix: &str) -> JetStreamLog {
    let mut o = JetStreamOptions::new(servers);
    o.prefix = prefix.into();
    o.request_timeout = std::time::Duration::from_secs(3);
    JetStreamLog::connect(o).expect("connect")
}

pub fn records(n: usize, size: usize, tag: u8) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            key: Some(Bytes::from(format!("k{i}"))),
            value: Bytes::from(vec![tag; size]),
            ..Default::default()
        })
        .collect()
}
