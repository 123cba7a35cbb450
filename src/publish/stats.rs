//! The stats message: `{prefix}/status/stats`, the gateway's figures as JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::link::{self, OutMessage};
use crate::modbus;
use crate::model::{Config, Qos};

/// Publishes `{prefix}/status/stats` every `every` while the broker is connected (never into
/// the store: statistics of an outage are of no use after it).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: Arc<Config>,
    every: Duration,
    buses: Vec<Arc<modbus::BusStats>>,
    link_stats: Arc<link::LinkStats>,
    store: Option<Arc<crate::store::StoreStats>>,
    commands: Arc<crate::command::CommandStats>,
    sender: mpsc::Sender<OutMessage>,
    cancel: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let topic = format!("{}/status/stats", config.gateway.prefix);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_delivered = link_stats.delivered.load(Relaxed);
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let delivered = link_stats.delivered.load(Relaxed);
        let rate = (delivered - last_delivered) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
        last_delivered = delivered;
        last_at = Instant::now();
        if link_stats.connected.load(Relaxed) == 0 {
            continue;
        }
        let online: u64 = buses.iter().map(|b| b.devices_online.load(Relaxed)).sum();
        let (stored, stored_bytes, oldest, store_dropped, unreadable, write_failures) =
            store.as_ref().map_or((0, 0, 0, 0, 0, 0), |s| {
                (
                    s.backlog.load(Relaxed),
                    s.backlog_bytes.load(Relaxed),
                    s.oldest_created.load(Relaxed),
                    s.dropped.load(Relaxed),
                    s.unreadable.load(Relaxed),
                    s.write_failures.load(Relaxed),
                )
            });
        let oldest_age_s = if stored > 0 && oldest > 0 {
            (crate::store::now_ms() - oldest).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        let body = serde_json::json!({
            "ts": super::rfc3339_millis(std::time::SystemTime::now()),
            "devices": config.devices.len(),
            "devices_online": online,
            "backlog": link_stats.backlog.load(Relaxed),
            "store_messages": stored,
            "store_bytes": stored_bytes,
            "oldest_age_s": oldest_age_s,
            "store_unreadable": unreadable,
            "store_write_failures": write_failures,
            "dropped": link_stats.dropped.load(Relaxed) + store_dropped,
            "delivered": delivered,
            "delivery_rate": (rate * 10.0).round() / 10.0,
            "polls": buses.iter().map(|b| b.polls.load(Relaxed)).sum::<u64>(),
            "failed_polls": buses.iter().map(|b| b.failed_polls.load(Relaxed)).sum::<u64>(),
            "commands": {
                "executed": commands.executed.load(Relaxed),
                "refused": commands.refused.load(Relaxed),
                "failed": commands.failed.load(Relaxed),
                "suppressed": commands.suppressed.load(Relaxed),
                "dropped": commands.dropped.load(Relaxed),
            },
        });
        let msg = OutMessage {
            topic: topic.clone(),
            payload: body.to_string().into_bytes(),
            qos: Qos::AtMostOnce,
            retain: true,
            created: Instant::now(),
            correlation: None,
            kind: crate::publish::json::OBJECT,
        };
        if sender.send(msg).await.is_err() {
            return;
        }
    }
}
