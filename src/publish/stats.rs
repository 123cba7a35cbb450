//! The stats message: `{prefix}/status/stats`, the gateway's figures as JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::link::OutMessage;
use crate::model::Qos;
use crate::observe::{Snapshot, Sources};

/// Publishes `{prefix}/status/stats` every `every` while the broker is connected (never into
/// the store: statistics of an outage are of no use after it). Its figures are those of the
/// gateway's one snapshot (`observe::Sources::snapshot`), as `/metrics` and `status` show them.
pub async fn run(
    sources: Arc<Sources>,
    every: Duration,
    sender: mpsc::Sender<OutMessage>,
    cancel: CancellationToken,
) {
    let topic = format!("{}/status/stats", sources.config.gateway.prefix);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_delivered = sources
        .link
        .delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = sources.snapshot();
        let delivered = s.mqtt.delivered;
        let rate = delivered.saturating_sub(last_delivered) as f64
            / last_at.elapsed().as_secs_f64().max(1e-3);
        last_delivered = delivered;
        last_at = Instant::now();
        if !s.mqtt.connected {
            continue;
        }
        let msg = OutMessage {
            topic: topic.clone(),
            payload: body(&s, rate).to_string().into_bytes(),
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

/// The stats message's body.
pub fn body(s: &Snapshot, delivery_rate: f64) -> serde_json::Value {
    let store = s.store.as_ref();
    serde_json::json!({
        "ts": s.gateway.ts,
        "devices": s.gateway.devices,
        "devices_online": s.gateway.devices_online,
        "backlog": s.mqtt.backlog,
        "store_messages": store.map_or(0, |st| st.messages),
        "store_bytes": store.map_or(0, |st| st.bytes),
        "oldest_age_s": store.map_or(0.0, |st| st.oldest_age_seconds),
        "store_unreadable": store.map_or(0, |st| st.unreadable),
        "store_write_failures": store.map_or(0, |st| st.write_failures),
        "dropped": s.mqtt.dropped,
        "delivered": s.mqtt.delivered,
        "delivery_rate": (delivery_rate * 10.0).round() / 10.0,
        "polls": s.buses.iter().map(|b| b.polls).sum::<u64>(),
        "failed_polls": s.buses.iter().map(|b| b.failed_polls).sum::<u64>(),
        "commands": {
            "executed": s.commands.executed,
            "refused": s.commands.refused,
            "failed": s.commands.failed,
            "suppressed": s.commands.suppressed,
            "dropped": s.commands.dropped,
        },
    })
}
