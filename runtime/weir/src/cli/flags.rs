//! The ranges and value parsers of `weir serve`'s flags: every number is checked against its
//! range before anything starts, and every malformed value is refused with the flag's name.

use weir_server::server::FsyncPolicy;

/// The range of every numeric flag of `weir serve` (docs/security.md, "Flags and their
/// ranges", lists them). clap refuses a value outside with the flag's name and the range before
/// anything starts, so no flag can wrap when it is scaled to bytes or combined with another.
pub mod bounds {
    use std::ops::RangeInclusive;

    /// `--replicas` (1, 3 or 5: `weir serve` refuses an even count with its own message).
    pub const REPLICAS: RangeInclusive<u64> = 1..=5;
    /// `--max-record-bytes`.
    pub const RECORD_BYTES: RangeInclusive<u64> = 1..=32 << 20;
    /// `--retention-check-ms` (at least once a day).
    pub const RETENTION_CHECK_MS: RangeInclusive<u64> = 1..=86_400_000;
    /// `--cache-mb` (sled's and redb's page caches; 1 TiB at most).
    pub const CACHE_MB: RangeInclusive<u64> = 1..=1 << 20;
    /// `--max-request-mb`: gRPC frames a message with a 32-bit length, so below 4 GiB.
    pub const REQUEST_MB: RangeInclusive<u64> = 1..=4095;
    /// `--max-batch-records`.
    pub const BATCH_RECORDS: RangeInclusive<u64> = 1..=10_000_000;
    /// `--max-streams-per-connection`.
    pub const STREAMS_PER_CONNECTION: RangeInclusive<u64> = 1..=100_000;
    /// `--max-wasm-mb` (and below `--max-request-mb`).
    pub const WASM_MB: RangeInclusive<u64> = 1..=4094;
    /// `--max-plugin-timeout-ms` (a deploy's `timeout_ms` is 32 bits).
    pub const PLUGIN_TIMEOUT_MS: RangeInclusive<u64> = 1..=u32::MAX as u64;
    /// `--state-cache-mb` (per plugin; 1 TiB at most).
    pub const STATE_CACHE_MB: RangeInclusive<u64> = 1..=1 << 20;
    /// `--producer-expiry-ms`, `--group-expiry-ms`: any duration weir can add to a timestamp.
    pub const EXPIRY_MS: RangeInclusive<u64> = 1..=weir_core::MAX_DURATION_MS;
    /// `--max-plugins-per-principal` (0: only principals whose auth entry sets `max_plugins`
    /// may deploy).
    pub const PLUGINS_PER_PRINCIPAL: RangeInclusive<u64> = 0..=1_000_000;
    /// `--max-producers-per-principal`.
    pub const PRODUCERS_PER_PRINCIPAL: RangeInclusive<u64> = 1..=100_000_000;
    /// `--lag-sample-ms` (at least once an hour).
    pub const LAG_SAMPLE_MS: RangeInclusive<u64> = 1..=3_600_000;
    /// `--debug-sync-delay-ms` (hidden, for crash tests).
    pub const DEBUG_SYNC_DELAY_MS: RangeInclusive<u64> = 0..=10_000;
    /// `--lag-window`, in samples.
    pub const LAG_WINDOW: RangeInclusive<u64> = 2..=10_000;
    /// `--probe-interval-ms` (0: no probes; at least once a day).
    pub const PROBE_INTERVAL_MS: RangeInclusive<u64> = 0..=86_400_000;
    /// The `<ms>` of `--fsync interval:<ms>` (beyond an hour, `never` says what is meant).
    pub const FSYNC_INTERVAL_MS: RangeInclusive<u64> = 1..=3_600_000;
}

/// clap's parser of an integer flag within `range`; its error names the flag and the range
/// ("invalid value '0' for '--cache-mb <CACHE_MB>': 0 is not in 1..=1048576").
pub(super) fn ranged<T>(
    range: std::ops::RangeInclusive<u64>,
) -> clap::builder::RangedU64ValueParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
    <T as TryFrom<u64>>::Error: Send + Sync + 'static + std::error::Error + ToString,
{
    clap::builder::RangedU64ValueParser::<T>::new().range(range)
}

/// `value` of `flag` if it is within `range`, else an error naming both.
pub(super) fn within<T: Copy + TryInto<u64> + std::fmt::Display>(
    value: T,
    flag: &str,
    range: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<T> {
    match value.try_into() {
        Ok(v) if range.contains(&v) => Ok(value),
        _ => anyhow::bail!(
            "{flag} {value} is out of range: {} to {}",
            range.start(),
            range.end()
        ),
    }
}

/// `value` MiB of `flag` in bytes, refusing a value outside `range` or one whose bytes do not
/// fit (checked, never shifted: `17592186044416 << 20` wraps to 0).
pub(super) fn mib<T>(
    value: T,
    flag: &str,
    range: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<T>
where
    T: Copy + TryInto<u64> + TryFrom<u64> + std::fmt::Display,
{
    within(value, flag, range.clone())?;
    value
        .try_into()
        .ok()
        .and_then(|v: u64| v.checked_mul(1 << 20))
        .and_then(|bytes| T::try_from(bytes).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{flag} {value} is out of range: {} to {}",
                range.start(),
                range.end()
            )
        })
}

/// `--fsync`: a policy, with `interval:<ms>` within [`bounds::FSYNC_INTERVAL_MS`].
pub(super) fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    let policy = s.parse::<FsyncPolicy>()?;
    if let FsyncPolicy::Interval(d) = policy {
        let range = bounds::FSYNC_INTERVAL_MS;
        if !range.contains(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)) {
            return Err(format!(
                "interval:{} is out of range: {} to {} ms (use never to leave syncing to the OS)",
                d.as_millis(),
                range.start(),
                range.end()
            ));
        }
    }
    Ok(policy)
}

/// A `host:port` for --kafka-advertise.
pub(super) fn host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port (e.g. broker1.example.com:9092)"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{port:?} is not a port number (1 to 65535)"))?;
    if host.is_empty() || port == 0 {
        return Err(format!(
            "{s:?} is not host:port (e.g. broker1.example.com:9092)"
        ));
    }
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn kafka_advertise_takes_host_port_and_says_what_is_wrong() {
        assert_eq!(host_port("broker1:9092"), Ok(("broker1".into(), 9092)));
        assert_eq!(host_port("[::1]:9092"), Ok(("::1".into(), 9092)));
        for (bad, says) in [
            ("broker1", "is not host:port"),
            (":9092", "is not host:port"),
            ("broker1:0", "is not host:port"),
            ("broker1:99999", "is not a port number"),
            ("broker1:x", "is not a port number"),
        ] {
            let err = host_port(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
