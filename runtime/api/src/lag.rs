//! `weir lag`'s rendering of a GetLag answer: a table like `kafka-consumer-groups --describe`
//! prints (with Burrow's status, alerts and probe delays), or JSON lines.

use crate::pb;

fn duration(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms < 1000 => format!("{ms}ms"),
        ms if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// The table: one row per consumer × partition, then one line per consumer.
pub fn table(lag: &pb::GetLagResponse) -> String {
    let header = [
        "NAME",
        "KIND",
        "TOPIC",
        "PARTITION",
        "COMMITTED",
        "END",
        "LAG",
        "TIME-LAG",
        "STATUS",
    ];
    let rows: Vec<[String; 9]> = lag
        .rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.kind.clone(),
                r.topic.clone(),
                r.partition.to_string(),
                r.committed.to_string(),
                r.end.to_string(),
                r.lag.to_string(),
                duration(r.time_lag_ms),
                r.status.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: &[&str], out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&header, &mut out);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>(), &mut out);
    }
    if rows.is_empty() {
        out.push_str("(no plugins or consumer groups yet)\n");
    }
    for c in &lag.consumers {
        out.push('\n');
        out.push_str(&format!(
            "{} {}: {}, lag {}, oldest waiting {}",
            c.kind,
            c.name,
            c.status,
            c.lag,
            duration(c.time_lag_ms)
        ));
        if c.probes_seen > 0 {
            out.push_str(&format!(
                "; probes {} seen, {} lost, {} duplicated, delay p50 {:.0}ms p99 {:.0}ms p999 {:.0}ms",
                c.probes_seen,
                c.probes_lost,
                c.probes_duplicated,
                c.probe_p50_ms,
                c.probe_p99_ms,
                c.probe_p999_ms
            ));
        }
        if !c.node.is_empty() {
            out.push_str(&format!("; runs on node {}", c.node));
        }
        for a in &c.alerts {
            out.push_str(&format!("\n  ALERT {a}"));
        }
    }
    if !lag.consumers.is_empty() {
        out.push('\n');
    }
    out
}

/// One JSON object per row and per consumer.
pub fn json(lag: &pb::GetLagResponse) -> String {
    let mut out = String::new();
    for r in &lag.rows {
        let v = serde_json::json!({
            "type": "partition", "kind": r.kind, "name": r.name, "topic": r.topic,
            "partition": r.partition, "committed": r.committed, "end": r.end, "lag": r.lag,
            "time_lag_ms": r.time_lag_ms, "status": r.status,
        });
        out.push_str(&v.to_string());
        out.push('\n');
    }
    for c in &lag.consumers {
        let v = serde_json::json!({
            "type": "consumer", "kind": c.kind, "name": c.name, "status": c.status, "lag": c.lag,
            "time_lag_ms": c.time_lag_ms, "alerts": c.alerts,
            // The node running a plugin in cluster mode (the table's "runs on node"); null
            // on a single node and for consumer groups.
            "node": (!c.node.is_empty()).then_some(&c.node),
            "probes": {
                "seen": c.probes_seen, "lost": c.probes_lost, "duplicated": c.probes_duplicated,
                "p50_ms": c.probe_p50_ms, "p99_ms": c.probe_p99_ms, "p999_ms": c.probe_p999_ms,
            },
        });
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}
