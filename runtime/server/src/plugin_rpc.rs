//! Plugin requests: protobuf ⇄ the plugin manager's types.

use std::time::Duration;

use tonic::{Code, Status};

use weir_api::pb;
use weir_broker::{Broker, BrokerError, StartAt};
use weir_plugins::{
    AlertThresholds, CommitBounds, DedupWindow, DeployRequest, Limits, OnError, PluginInfo,
    PluginManager, StartFrom,
};

use crate::statuses::{status, ToStatus};

/// A plugin as the API shows it.
pub(crate) fn plugin_info(info: PluginInfo) -> pb::PluginInfo {
    {
        let spec = info.spec;
        pb::PluginInfo {
            name: spec.name,
            version: spec.version,
            wasm_sha256: spec.wasm_sha256,
            input: spec.input,
            outputs: spec.outputs,
            paused: spec.paused,
            on_error: match spec.on_error {
                OnError::Halt => "halt".into(),
                OnError::Dlq => "dlq".into(),
            },
            partitions: info
                .partitions
                .into_iter()
                .enumerate()
                .map(|(p, s)| pb::PluginPartition {
                    partition: p as u32,
                    committed: s.committed,
                    processed: s.processed,
                    skipped: s.skipped,
                    dead_lettered: s.dead_lettered,
                    state: s.state.to_string(),
                    forwarding: s.forwarding.unwrap_or_default(),
                })
                .collect(),
            memory_mb: (spec.limits.memory_bytes >> 20) as u32,
            timeout_ms: spec.limits.timeout.as_millis() as u32,
            alert_lag: spec.alerts.max_lag,
            alert_delay_ms: spec.alerts.max_delay_ms,
            owner: spec.owner.unwrap_or_default(),
            max_rate: spec.max_rate,
            commit_records: spec.commit.records_for(spec.max_batch) as u32,
            commit_interval_ms: spec.commit.interval_ms as u32,
            state_cache_bytes: info.state_cache_bytes,
            node: info.node.unwrap_or_default(),
        }
    }
}

/// Converts a deploy request, applying defaults for zero fields.
pub(super) fn deploy_request(r: pb::DeployPluginRequest) -> Result<DeployRequest, Status> {
    let defaults = Limits::default();
    let start = match r.from.as_str() {
        "" | "earliest" => StartFrom::Earliest,
        "latest" => StartFrom::Latest,
        other => {
            return Err(Status::invalid_argument(format!(
                "--from {other:?}: use earliest or latest"
            )))
        }
    };
    let on_error = match r.on_error.as_str() {
        "" | "halt" => OnError::Halt,
        "dlq" => OnError::Dlq,
        other => {
            return Err(Status::invalid_argument(format!(
                "--on-error {other:?}: use halt or dlq"
            )))
        }
    };
    let max_batch = if r.max_batch == 0 {
        500
    } else {
        r.max_batch as usize
    };
    Ok(DeployRequest {
        name: r.name,
        wasm: r.wasm,
        input: r.input,
        outputs: r.outputs,
        config: r.config.into_iter().map(|c| (c.key, c.value)).collect(),
        start,
        limits: Limits {
            memory_bytes: if r.memory_mb == 0 {
                defaults.memory_bytes
            } else {
                (r.memory_mb as usize) << 20
            },
            timeout: if r.timeout_ms == 0 {
                defaults.timeout
            } else {
                Duration::from_millis(u64::from(r.timeout_ms))
            },
        },
        on_error,
        max_attempts: if r.max_attempts == 0 {
            3
        } else {
            r.max_attempts
        },
        max_batch,
        dedup: DedupWindow {
            max_ids: if r.dedup_ids == 0 {
                DedupWindow::default().max_ids
            } else {
                r.dedup_ids as usize
            },
            max_age_ms: if r.dedup_age_ms == 0 {
                DedupWindow::default().max_age_ms
            } else {
                r.dedup_age_ms
            },
        },
        owner: None,
        owner_quota: None,
        alerts: AlertThresholds {
            max_lag: r.alert_lag,
            max_delay_ms: r.alert_delay_ms,
        },
        max_rate: r.max_rate,
        commit: CommitBounds {
            // 0: the default, which follows max_batch (stored as 0, as before these bounds).
            records: r.commit_records as usize,
            interval_ms: match r.commit_interval_ms {
                0 => CommitBounds::default().interval_ms,
                n => u64::from(n),
            },
        },
    })
}

/// A state value for `GetState`. With `after`, whether the plugin has processed that offset
/// yet; an offset at or past the partition's end is refused (it may never be processed).
pub(super) async fn get_state(
    plugins: &PluginManager,
    broker: &Broker,
    r: pb::GetStateRequest,
) -> Result<pb::GetStateResponse, Status> {
    let pending = match r.after {
        Some(at) => {
            let committed = plugins
                .committed(&r.plugin, at.partition)
                .await
                .or_status()?
                .ok_or_else(|| {
                    let partitions = plugins.info(&r.plugin).map_or(0, |i| i.partitions.len());
                    Status::invalid_argument(format!(
                        "plugin {} reads {partitions} partitions; there is no partition {}",
                        r.plugin, at.partition
                    ))
                })?;
            let pending = committed <= at.offset;
            if pending {
                ensure_stored(plugins, broker, &r.plugin, at).await?;
            }
            pending
        }
        None => false,
    };
    Ok(
        match plugins.state_get(&r.plugin, &r.key).await.or_status()? {
            Some((value, version)) => pb::GetStateResponse {
                found: true,
                value: value.into(),
                version,
                pending,
            },
            None => pb::GetStateResponse {
                found: false,
                value: Default::default(),
                version: 0,
                pending,
            },
        },
    )
}

/// Refuses an `after` that names no record: an offset at or past the end of the plugin's input
/// partition would be `pending` for ever (a client polls for ever). Refused as CommitOffsets
/// refuses a commit past the end: `OUT_OF_RANGE`, naming the end.
async fn ensure_stored(
    plugins: &PluginManager,
    broker: &Broker,
    plugin: &str,
    at: pb::InputPosition,
) -> Result<(), Status> {
    let input = plugins.info(plugin).or_status()?.spec.input;
    // The record at `offset` exists when `offset + 1` is a valid start (on a shared log, after
    // catching up with what other nodes appended).
    let next = at.offset.saturating_add(1);
    match broker
        .resolve_start(&input, at.partition, StartAt::Offset(next))
        .await
    {
        Ok(_) => Ok(()),
        Err(BrokerError::OffsetOutOfRange { end, .. }) => Err(status(
            Code::OutOfRange,
            "offset-out-of-range",
            format!(
                "offset {} is past the end of partition {} of {input}, the input of plugin \
                 {plugin}: the partition ends at {end} (the next record will get offset {end}); \
                 pass the partition:offset `weir publish` acknowledged for your record",
                at.offset, at.partition
            ),
        )),
        Err(e) => Err(crate::statuses::of_broker(e)),
    }
}
