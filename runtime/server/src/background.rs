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
            _ = tick.tick() => {
                if let Err(error) = broker.apply_retention().await {
                    tracing::warn!(message = "Retention failed.", %error);
                }
                if let Err(error) = broker.expire_idle(weir_core::now_ms()).await {
                    tracing::warn!(message = "Expiring idle producers and groups failed.", %error);
                }
            }
            _ = shutdown.cancelled() => return,
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
            _ = tick.tick() => {
                n += 1;
                match broker.follow_shared(n % 20 == 1).await {
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
            _ = shutdown.cancelled() => return,
        }
    }
}
