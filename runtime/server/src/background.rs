//! The server's background loops: retention and expiry, and following a shared log.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use weir_broker::Broker;

/// Retention, and expiry of idle producers and consumer groups, every retention interval.
pub(crate) async fn retention_loop(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(broker.config().retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A round left unfinished at shutdown is as a crash there: the next start runs it.
        let round = async {
            if let Err(error) = broker.apply_retention().await {
                tracing::warn!(message = "Retention failed.", %error);
            }
            if let Err(error) = broker.expire_idle(weir_core::now_ms()).await {
                tracing::warn!(message = "Expiring idle producers and groups failed.", %error);
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = round => {}
        }
    }
}

/// How often a node on a shared log looks for other nodes' appends (and, every 20th time,
/// their topics): the bound on how late a subscriber of this node sees a record published
/// through another.
const FOLLOW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Follows what other weir nodes write to a shared log until shutdown.
pub(crate) async fn follow_loop(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        // Only reads: a look cut short at shutdown leaves nothing half-done. (Unraced, a
        // node whose NATS servers were gone kept reading after SIGTERM, each partition's tail
        // waiting out the request time-out.)
        let followed = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            followed = broker.follow_shared(n % 20 == 1) => followed,
        };
        match followed {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(message = "Following the shared log again.");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(message = "Cannot follow the shared log; retrying.", %error);
            }
            Err(_) => {}
        }
    }
}
