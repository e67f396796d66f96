//! Reads a plugin's commit histograms from a server's Prometheus page (`weir serve --metrics`)
//! for `weir bench plugin --metrics`: commit latency (written → durable) and how many batches
//! one durable step covered.

use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One histogram of one plugin, as scraped: cumulative buckets (upper bound, count), sum,
/// count.
#[derive(Debug, Default, PartialEq)]
pub struct Scraped {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Scraped {
    /// Finds `name`'s series labelled `plugin` in a Prometheus text page.
    pub fn parse(page: &str, name: &str, plugin: &str) -> Scraped {
        let label = format!("plugin=\"{plugin}\"");
        let mut out = Scraped::default();
        for line in page.lines().filter(|l| l.contains(&label)) {
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            if line.starts_with(&format!("{name}_bucket{{")) {
                let bound = line
                    .split("le=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(|b| {
                        if b == "+Inf" {
                            f64::INFINITY
                        } else {
                            b.parse().unwrap_or(f64::NAN)
                        }
                    });
                if let Some(bound) = bound {
                    out.buckets.push((bound, value));
                }
            } else if line.starts_with(&format!("{name}_sum{{")) {
                out.sum = value;
            } else if line.starts_with(&format!("{name}_count{{")) {
                out.count = value;
            }
        }
        out
    }

    /// The upper bound of the bucket holding quantile `q` (`None` without observations).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0.0 {
            return None;
        }
        self.buckets
            .iter()
            .find(|(_, n)| *n >= q * self.count)
            .map(|(bound, _)| *bound)
    }

    /// The mean observation.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

/// GETs `http://addr/metrics` (plain HTTP/1.0: the monitor's page).
///
/// # Errors
/// The server cannot be reached or answers with something other than 200.
pub async fn page(addr: &str) -> anyhow::Result<String> {
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("timed out")?
        .with_context(|| format!("reading http://{addr}/metrics"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    anyhow::ensure!(
        head.lines().next().is_some_and(|l| l.contains(" 200")),
        "http://{addr}/metrics answered {:?}; start the server with --metrics {addr}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_string())
}

/// The commit line `weir bench plugin --metrics` prints for `plugin`.
pub fn commit_summary(page: &str, plugin: &str) -> String {
    let latency = Scraped::parse(page, "weir_plugin_commit_seconds", plugin);
    let batches = Scraped::parse(page, "weir_plugin_commit_batches", plugin);
    let calls = Scraped::parse(page, "weir_plugin_batch_seconds", plugin);
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.2}", s * 1000.0));
    // Calls of the plugin (batches of up to its max batch) a commit covered, on average
    // (calls of commits that conflicted and ran again included).
    let per_commit = if latency.count > 0.0 {
        format!("{:.1}", calls.count / latency.count)
    } else {
        "-".into()
    };
    format!(
        "commits: {}; plugin calls (batches) per commit: mean {per_commit}; latency written → \
         durable: mean {} ms, p50 ≤ {} ms, p99 ≤ {} ms (bucket bounds); commits per durable \
         step: mean {}, p99 ≤ {}",
        latency.count,
        ms(latency.mean()),
        ms(latency.quantile_bound(0.5)),
        ms(latency.quantile_bound(0.99)),
        batches.mean().map_or("-".into(), |m| format!("{m:.2}")),
        batches
            .quantile_bound(0.99)
            .map_or("-".into(), |b| format!("{b}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugins_histogram_is_read_from_the_page() {
        let page = "\
# HELP weir_plugin_commit_seconds x
weir_plugin_commit_seconds_sum{plugin=\"a\"} 0.5
weir_plugin_commit_seconds_count{plugin=\"a\"} 4
weir_plugin_commit_seconds_bucket{le=\"0.001\",plugin=\"a\"} 1
weir_plugin_commit_seconds_bucket{le=\"0.002\",plugin=\"a\"} 3
weir_plugin_commit_seconds_bucket{le=\"+Inf\",plugin=\"a\"} 4
weir_plugin_commit_seconds_bucket{le=\"0.001\",plugin=\"b\"} 9
";
        let h = Scraped::parse(page, "weir_plugin_commit_seconds", "a");
        assert_eq!(h.count, 4.0);
        assert_eq!(h.mean(), Some(0.125));
        assert_eq!(h.quantile_bound(0.5), Some(0.002));
        assert_eq!(h.quantile_bound(0.99), Some(f64::INFINITY));
        assert_eq!(
            Scraped::parse(page, "weir_plugin_commit_seconds", "c").quantile_bound(0.5),
            None
        );
    }
}
