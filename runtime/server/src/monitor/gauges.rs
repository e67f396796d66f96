//! The monitor's Prometheus gauges (lag, status, alerts, probes), built from its snapshot at
//! scrape time.

use super::{ConsumerKind, Health, Monitor};

impl Monitor {
    /// Adds the monitor's gauges (lag, status, alerts, probes) to a scrape's registry.
    pub fn register_gauges(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let snapshot = self.snapshot();
        type Labels = Vec<(String, String)>;
        let lag: Family<Labels, Gauge> = Family::default();
        let time_lag: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
        for r in &snapshot.rows {
            let labels = vec![
                ("kind".to_string(), r.kind.as_str().to_string()),
                ("consumer".to_string(), r.name.clone()),
                ("topic".to_string(), r.topic.clone()),
                ("partition".to_string(), r.partition.to_string()),
            ];
            lag.get_or_create(&labels).set(r.lag as i64);
            time_lag
                .get_or_create(&labels)
                .set(r.time_lag_ms as f64 / 1000.0);
        }
        let status: Family<Labels, Gauge> = Family::default();
        let alerts: Family<Labels, Gauge> = Family::default();
        let probes_seen: Family<Labels, Gauge> = Family::default();
        let probes_lost: Family<Labels, Gauge> = Family::default();
        let probes_dup: Family<Labels, Gauge> = Family::default();
        for c in &snapshot.consumers {
            let labels = vec![
                ("kind".to_string(), c.kind.as_str().to_string()),
                ("consumer".to_string(), c.name.clone()),
            ];
            for h in [
                Health::Ok,
                Health::Warn,
                Health::Stall,
                Health::Stop,
                Health::Error,
            ] {
                let mut l = labels.clone();
                l.push(("status".into(), h.to_string()));
                status.get_or_create(&l).set(i64::from(c.status == h));
            }
            if c.kind == ConsumerKind::Plugin {
                let plugin = vec![("plugin".to_string(), c.name.clone())];
                for kind in ["lag", "delay"] {
                    let mut l = plugin.clone();
                    l.push(("alert".into(), kind.into()));
                    let on = c.alerts.iter().any(|a| a.starts_with(kind));
                    alerts.get_or_create(&l).set(i64::from(on));
                }
                probes_seen.get_or_create(&plugin).set(c.probes.seen as i64);
                probes_lost.get_or_create(&plugin).set(c.probes.lost as i64);
                probes_dup
                    .get_or_create(&plugin)
                    .set(c.probes.duplicated as i64);
            }
        }
        registry.register(
            "consumer_lag_records",
            "Records not yet processed, per consumer partition",
            lag,
        );
        registry.register(
            "consumer_lag_seconds",
            "Age of the oldest record not yet processed, per consumer partition",
            time_lag,
        );
        registry.register(
            "consumer_status",
            "1 for the consumer's current status (Burrow's rules)",
            status,
        );
        registry.register(
            "plugin_alert_active",
            "1 while a plugin's alert is raised",
            alerts,
        );
        registry.register(
            "probes_seen",
            "Probe records a plugin committed past",
            probes_seen,
        );
        registry.register(
            "probes_lost",
            "Probe records a plugin never saw",
            probes_lost,
        );
        registry.register(
            "probes_duplicated",
            "Probe records a plugin saw twice",
            probes_dup,
        );
    }
}
