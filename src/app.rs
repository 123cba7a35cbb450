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
    let settings = LinkSettings::from_config(&config.mqtt);
    let link = link::spawn(&config.mqtt, settings, None, 1024)?;
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
        buses.push(modbus::spawn(
            bus,
            devices,
            events_tx.clone(),
            cancel.clone(),
            &tracker,
        ));
    }
    drop(events_tx);
    tracker.close();

    cancel.cancelled().await;
    tracing::info!("shutting down: stopping polls");
    tracker.wait().await;
    let _ = publisher.await;
    let report = link.done.await?;
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
