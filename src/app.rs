//! Wiring: buses → publisher → link, and the ordered shutdown.
//!
//! Shutdown order (SIGTERM/SIGINT or the caller's token): bus tasks stop polling and exit →
//! the publisher drains what they produced and exits, closing the link's inbound queue → the
//! link delivers what it holds (bounded by its flush timeout), publishes `offline` and
//! disconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::codec;
use crate::link::{self, LinkReport, LinkSettings, OutMessage};
use crate::modbus::{self, BusEvent, BusHandle, Reading};
use crate::model::{Config, MessageMode, Qos};
use crate::publish::{self, ChangeFilter};

/// What a run ended with.
#[derive(Debug)]
pub struct RunReport {
    pub link: LinkReport,
}

/// Runs the gateway until `cancel` fires. Errors only for setup failures (TLS files).
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<RunReport> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut settings = LinkSettings::from_config(&config.mqtt);
    // ---- commands (1/2): subscriptions and the channel from the link to the router ----
    settings.subscriptions = crate::command::subscriptions(&config);
    let (commands_tx, commands_rx) = mpsc::channel(crate::command::QUEUE);
    let settings = settings.with_store(&config.store);
    let outbox = open_store(&config.store);
    let store_stats = outbox.as_ref().map(|o| o.store.stats.clone());
    let link = link::spawn(&config.mqtt, settings, outbox, Some(commands_tx), 1024)?;
    let command_link = link.sender.clone();
    // ---- end commands (1/2) ----
    tracing::info!(
        gateway = %config.gateway.id,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        buses = config.buses.len(),
        devices = config.devices.len(),
        "fieldbridge started"
    );

    let (events_tx, events_rx) = mpsc::channel::<BusEvent>(256);
    let config = Arc::new(config);
    let publisher = tokio::spawn(publisher(config.clone(), events_rx, link.sender.clone()));
    // The stats task stops on `cancel`, releasing its sender like the publisher does. Every
    // sender must be gone for the link to finish: none may outlive its task.
    let stats_sender = config
        .gateway
        .stats_interval
        .map(|every| (every, link.sender.clone()));
    drop(link.sender);

    let tracker = TaskTracker::new();
    let mut buses: Vec<BusHandle> = Vec::new();
    for (b, bus) in config.buses.iter().enumerate() {
        let devices: Vec<_> = config
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.bus == b)
            .map(|(i, d)| (i, d.clone()))
            .collect();
        if devices.is_empty() {
            tracing::warn!(bus = %bus.name, "bus has no devices; not opened");
            continue;
        }
        let spawn = match bus.kind {
            crate::model::BusKind::Lines(_) => crate::lines::spawn,
            _ => modbus::spawn,
        };
        buses.push(spawn(
            bus,
            devices,
            events_tx.clone(),
            cancel.clone(),
            &tracker,
        ));
    }
    drop(events_tx);
    // ---- commands (2/2): the router; it stops on `cancel`, dropping its link sender ----
    crate::command::router::spawn(
        config.clone(),
        &buses,
        commands_rx,
        command_link,
        cancel.clone(),
    );
    // ---- end commands (2/2) ----
    if let Some((every, stats_sender)) = stats_sender {
        tokio::spawn(publish_stats(
            config.clone(),
            every,
            buses.iter().map(|b| b.stats.clone()).collect(),
            link.stats.clone(),
            store_stats,
            stats_sender,
            cancel.clone(),
        ));
    }
    tracker.close();
    // ---- systemd: READY=1 now, STATUS= and WATCHDOG=1 while tasks progress, STOPPING=1 ----
    crate::health::spawn(&config, &buses, link.stats.clone(), cancel.clone());

    cancel.cancelled().await;
    tracing::info!("shutting down: stopping polls");
    tracker.wait().await;
    let _ = publisher.await;
    // The link bounds its own flush (5 s) and goodbye (2 s); this bound only guards against a
    // sender kept alive by mistake, which would otherwise hang the stop until SIGKILL.
    let report = match tokio::time::timeout(Duration::from_secs(15), link.done).await {
        Ok(report) => report?,
        Err(_) => anyhow::bail!("the MQTT link did not stop within 15 s"),
    };
    for bus in &buses {
        let s = &bus.stats;
        tracing::info!(
            bus = %bus.name,
            polls = modbus::BusStats::get(&s.polls),
            failed = modbus::BusStats::get(&s.failed_polls),
            exceptions = modbus::BusStats::get(&s.exceptions),
            skipped_ticks = modbus::BusStats::get(&s.skipped_ticks),
            resets = modbus::BusStats::get(&s.resets),
            "bus summary"
        );
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN);
    tracing::info!(
        delivered = report.delivered,
        dropped = report.dropped,
        undelivered = report.undelivered,
        latency_p50_ms = ms(report.latency.quantile(0.5)),
        latency_p99_ms = ms(report.latency.quantile(0.99)),
        "link summary"
    );
    Ok(RunReport { link: report })
}

/// Publishes `{prefix}/status/stats` every `every` while the broker is connected (never into
/// the store: statistics of an outage are of no use after it).
async fn publish_stats(
    config: Arc<Config>,
    every: Duration,
    buses: Vec<Arc<modbus::BusStats>>,
    link_stats: Arc<link::LinkStats>,
    store: Option<Arc<crate::store::StoreStats>>,
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
        let (stored, stored_bytes, oldest, store_dropped) =
            store.as_ref().map_or((0, 0, 0, 0), |s| {
                (
                    s.backlog.load(Relaxed),
                    s.backlog_bytes.load(Relaxed),
                    s.oldest_created.load(Relaxed),
                    s.dropped.load(Relaxed),
                )
            });
        let oldest_age_s = if stored > 0 && oldest > 0 {
            (crate::store::now_ms() - oldest).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        let body = serde_json::json!({
            "ts": publish::rfc3339_millis(std::time::SystemTime::now()),
            "devices": config.devices.len(),
            "devices_online": online,
            "backlog": link_stats.backlog.load(Relaxed),
            "store_messages": stored,
            "store_bytes": stored_bytes,
            "oldest_age_s": oldest_age_s,
            "dropped": link_stats.dropped.load(Relaxed) + store_dropped,
            "delivered": delivered,
            "delivery_rate": (rate * 10.0).round() / 10.0,
            "polls": buses.iter().map(|b| b.polls.load(Relaxed)).sum::<u64>(),
            "failed_polls": buses.iter().map(|b| b.failed_polls.load(Relaxed)).sum::<u64>(),
        });
        let msg = OutMessage {
            topic: topic.clone(),
            payload: body.to_string().into_bytes(),
            qos: Qos::AtMostOnce,
            retain: true,
            created: Instant::now(),
        };
        if sender.send(msg).await.is_err() {
            return;
        }
    }
}

/// Opens the outbox; without one the gateway still runs, on its memory queue, loudly.
fn open_store(config: &crate::model::Store) -> Option<link::Outbox> {
    let path = config.path.as_ref()?;
    match crate::store::open(config, path) {
        Ok((store, events)) => {
            tracing::info!(
                store = %path.display(),
                backlog = store.stats.backlog.load(std::sync::atomic::Ordering::Relaxed),
                "store opened"
            );
            Some(link::Outbox { store, events })
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "cannot open the store: running WITHOUT store-and-forward (memory queue only); fix store.path or its permissions"
            );
            None
        }
    }
}

/// Turns bus events into MQTT messages: scaling, labels, change filters, payloads.
async fn publisher(
    config: Arc<Config>,
    mut events: mpsc::Receiver<BusEvent>,
    link: mpsc::Sender<OutMessage>,
) {
    let mut filters: HashMap<(usize, usize), ChangeFilter> = HashMap::new();
    let mut online = std::collections::BTreeSet::new();
    while let Some(event) = events.recv().await {
        let messages = match event {
            BusEvent::Status {
                device,
                online: is_online,
                ..
            } => {
                if is_online {
                    online.insert(device);
                } else {
                    online.remove(&device);
                    // A consumer that saw `offline` gets every value again when the device
                    // returns, not only those that changed meanwhile.
                    filters.retain(|(d, _), _| *d != device);
                }
                vec![device_status(&config, device, is_online)]
            }
            BusEvent::Reading(reading) => render_reading(&config, &reading, &mut filters),
        };
        for m in messages {
            if link.send(m).await.is_err() {
                return;
            }
        }
    }
    // Polling has stopped: the retained device statuses must not keep saying `online`.
    for device in online {
        if link
            .send(device_status(&config, device, false))
            .await
            .is_err()
        {
            return;
        }
    }
}

fn device_status(config: &Config, device: usize, online: bool) -> OutMessage {
    OutMessage {
        topic: config.devices[device].status_topic.clone(),
        payload: if online {
            b"online".to_vec()
        } else {
            b"offline".to_vec()
        },
        qos: Qos::AtLeastOnce,
        retain: true,
        created: Instant::now(),
    }
}

/// Messages for one reading, after the change filters.
pub fn render_reading(
    config: &Config,
    reading: &Reading,
    filters: &mut HashMap<(usize, usize), ChangeFilter>,
) -> Vec<OutMessage> {
    let device = &config.devices[reading.device];
    let now = Instant::now();
    let mut out = Vec::new();
    match device.message_mode {
        MessageMode::PerPoint => {
            for (p, raw) in &reading.values {
                let point = &device.points[*p];
                let payload = match raw {
                    Ok(raw) => {
                        let value = codec::to_value(point, raw);
                        let filter = filters
                            .entry((reading.device, *p))
                            .or_insert_with(|| ChangeFilter::new(point.publish));
                        if !filter.should_publish(&value, now) {
                            continue;
                        }
                        Some(publish::point_payload(
                            point,
                            &value,
                            codec::label(point, raw),
                            reading.ts,
                        ))
                    }
                    Err(reason) => publish::bad_quality_payload(point, reason, reading.ts),
                };
                if let Some(payload) = payload {
                    out.push(OutMessage {
                        topic: point.topic.clone(),
                        payload,
                        qos: point.qos,
                        retain: point.retain,
                        created: reading.read_at,
                    });
                }
            }
        }
        MessageMode::PerDevice => {
            let mut changed = false;
            let mut entries = Vec::with_capacity(reading.values.len());
            for (p, raw) in &reading.values {
                let point = &device.points[*p];
                let json = match raw {
                    Ok(raw) => {
                        let value = codec::to_value(point, raw);
                        let filter = filters
                            .entry((reading.device, *p))
                            .or_insert_with(|| ChangeFilter::new(point.publish));
                        changed |= filter.should_publish(&value, now);
                        Some(match codec::label(point, raw) {
                            Some(label) => serde_json::Value::String(label.to_string()),
                            None => publish::value_json(&value),
                        })
                    }
                    Err(_) => {
                        changed = true;
                        None
                    }
                };
                entries.push((point.name.as_str(), json));
            }
            // Point filters fire on change and on their heartbeat.
            if changed {
                let first = device.points.get(reading.values.first().map_or(0, |v| v.0));
                out.push(OutMessage {
                    topic: device.topic.clone(),
                    payload: publish::device_payload(&device.name, reading.ts, &entries),
                    qos: first.map_or(Qos::AtLeastOnce, |p| p.qos),
                    retain: first.is_some_and(|p| p.retain),
                    created: reading.read_at,
                });
            }
        }
    }
    out
}
