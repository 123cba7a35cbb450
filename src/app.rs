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
use crate::model::{Config, MessageMode, PayloadFormat, Qos};
use crate::publish::{self, ChangeFilter};

/// What a run ended with.
#[derive(Debug)]
pub struct RunReport {
    pub link: LinkReport,
}

/// A request to reload the configuration from `path` (SIGHUP).
pub struct Reload {
    pub path: std::path::PathBuf,
    pub requests: mpsc::Receiver<()>,
}

/// A bus event with the configuration (and its generation) its indices refer to: a bus kept
/// across a reload goes on reporting against the configuration it was started with.
struct Tagged {
    config: Arc<Config>,
    generation: u64,
    event: BusEvent,
}

/// A running bus task and what it was started from.
struct RunningBus {
    def: BusDef,
    handle: BusHandle,
    cancel: CancellationToken,
    tracker: TaskTracker,
    forwarder: tokio::task::JoinHandle<()>,
}

/// A bus and its devices as configured, independent of their positions in the file.
#[derive(PartialEq)]
struct BusDef {
    bus: crate::model::Bus,
    devices: Vec<crate::model::Device>,
}

fn bus_def(config: &Config, b: usize) -> BusDef {
    BusDef {
        bus: config.buses[b].clone(),
        devices: config
            .devices
            .iter()
            .filter(|d| d.bus == b)
            .map(|d| crate::model::Device {
                bus: 0,
                ..d.clone()
            })
            .collect(),
    }
}

fn spawn_bus(
    config: &Arc<Config>,
    generation: u64,
    b: usize,
    tagged: &mpsc::Sender<Tagged>,
    stop: &CancellationToken,
) -> Option<RunningBus> {
    let bus = &config.buses[b];
    let devices: Vec<_> = config
        .devices
        .iter()
        .enumerate()
        .filter(|(_, d)| d.bus == b)
        .map(|(i, d)| (i, d.clone()))
        .collect();
    if devices.is_empty() {
        tracing::warn!(bus = %bus.name, "bus has no devices; not opened");
        return None;
    }
    let spawn = match bus.kind {
        crate::model::BusKind::Lines(_) => crate::lines::spawn,
        _ => modbus::spawn,
    };
    let (events_tx, mut events_rx) = mpsc::channel::<BusEvent>(64);
    let cancel = stop.child_token();
    let tracker = TaskTracker::new();
    let handle = spawn(bus, devices, events_tx, cancel.clone(), &tracker);
    tracker.close();
    let def = bus_def(config, b);
    let (config, tagged) = (config.clone(), tagged.clone());
    // Ends when the bus task ends and drops its sender.
    let forwarder = tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            let t = Tagged {
                config: config.clone(),
                generation,
                event,
            };
            if tagged.send(t).await.is_err() {
                break;
            }
        }
    });
    Some(RunningBus {
        def,
        handle,
        cancel,
        tracker,
        forwarder,
    })
}

/// Stops one bus task and waits until it and its forwarder are gone.
async fn stop_bus(r: RunningBus) {
    r.cancel.cancel();
    r.tracker.wait().await;
    let _ = r.forwarder.await;
}

/// The new configuration if it can replace the running one, else `None` with the reason
/// logged (the running configuration stays).
fn load_for_reload(path: &std::path::Path, running: &Config) -> Option<Config> {
    match crate::config::load(path) {
        Err(errors) => {
            tracing::error!("reload refused, keeping the running configuration:\n{errors}");
            None
        }
        Ok(new)
            if new.gateway != running.gateway
                || new.mqtt != running.mqtt
                || new.store != running.store =>
        {
            tracing::error!(
                "reload refused: the gateway, mqtt or store section changed, which needs a restart (systemctl restart fieldbridge); keeping the running configuration"
            );
            None
        }
        Ok(new) => Some(new),
    }
}

/// Where commands go now: the current router's queue, and the configuration it routes by.
type RouterInput = (mpsc::Sender<crate::link::InMessage>, Arc<Config>);

/// Tasks that are replaced as a whole on a reload: the command router, the stats publisher
/// and the systemd supervisor.
struct Sidecars {
    router_cancel: CancellationToken,
    router: tokio::task::JoinHandle<crate::command::router::Memory>,
    stats_cancel: CancellationToken,
    health_retire: CancellationToken,
}

impl Sidecars {
    #[allow(clippy::too_many_arguments)]
    fn start(
        config: &Arc<Config>,
        handles: &[BusHandle],
        router_input: &tokio::sync::watch::Sender<RouterInput>,
        link_sender: &mpsc::Sender<OutMessage>,
        link_stats: &Arc<link::LinkStats>,
        store_stats: &Option<Arc<crate::store::StoreStats>>,
        command_stats: &Arc<crate::command::CommandStats>,
        memory: crate::command::router::Memory,
        stop: &CancellationToken,
    ) -> Sidecars {
        let router_cancel = stop.child_token();
        let (tx, rx) = mpsc::channel(crate::command::QUEUE);
        router_input.send_replace((tx, config.clone()));
        let router = crate::command::router::spawn(
            config.clone(),
            handles,
            rx,
            link_sender.clone(),
            command_stats.clone(),
            memory,
            router_cancel.clone(),
        );
        let stats_cancel = stop.child_token();
        if let Some(every) = config.gateway.stats_interval {
            tokio::spawn(publish_stats(
                config.clone(),
                every,
                handles.iter().map(|b| b.stats.clone()).collect(),
                link_stats.clone(),
                store_stats.clone(),
                command_stats.clone(),
                link_sender.clone(),
                stats_cancel.clone(),
            ));
        }
        // READY=1 now, STATUS= and WATCHDOG=1 while tasks progress, STOPPING=1 on `stop`.
        let health_retire = CancellationToken::new();
        crate::health::spawn(
            config,
            handles,
            link_stats.clone(),
            store_stats.clone(),
            stop.clone(),
            health_retire.clone(),
        );
        Sidecars {
            router_cancel,
            router,
            stats_cancel,
            health_retire,
        }
    }

    /// Stops the router and the stats task. On a reload the supervisor is retired silently
    /// (its successor sends `READY=1`); on shutdown it sees the stop and sends `STOPPING=1`.
    ///
    /// On a reload the supervisor is left running, watching the old buses while they stop
    /// (each stops within its own stall limit), and is retired by the caller right before
    /// its successor starts: the watchdog is pinged all through the reload.
    async fn stop(self) -> (crate::command::router::Memory, CancellationToken) {
        self.router_cancel.cancel();
        self.stats_cancel.cancel();
        let memory = self.router.await.unwrap_or_default();
        (memory, self.health_retire)
    }
}

/// Runs the gateway until `cancel` fires. Errors only for setup failures (TLS files).
pub async fn run(config: Config, cancel: CancellationToken) -> anyhow::Result<RunReport> {
    run_with_reload(config, cancel, None).await
}

/// As [`run`], reloading the configuration on each request of `reload`: buses whose
/// definition (the bus and its devices) did not change keep running untouched; changed and
/// removed ones are stopped, new ones started; the MQTT link and the store are kept. A file
/// that does not validate, or that changes the gateway, mqtt or store sections, is refused
/// with an error and the running configuration stays.
pub async fn run_with_reload(
    config: Config,
    cancel: CancellationToken,
    mut reload: Option<Reload>,
) -> anyhow::Result<RunReport> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut settings = LinkSettings::from_config(&config.mqtt);
    settings.subscriptions = crate::command::subscriptions(&config);
    let (commands_tx, mut commands_rx) = mpsc::channel(crate::command::QUEUE);
    let settings = settings.with_store(&config.store);
    let outbox = open_store(&config.store);
    let store_stats = outbox.as_ref().map(|o| o.store.stats.clone());
    let link = link::spawn(&config.mqtt, settings, outbox, Some(commands_tx), 1024)?;
    tracing::info!(
        gateway = %config.gateway.id,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        buses = config.buses.len(),
        devices = config.devices.len(),
        "fieldbridge started"
    );

    let (tagged_tx, tagged_rx) = mpsc::channel::<Tagged>(256);
    let publisher = tokio::spawn(publisher(tagged_rx, link.sender.clone()));
    // Commands go to whichever router is current (one per configuration). Never blocking:
    // a command that finds the router's queue full is answered `busy` (within a budget)
    // instead of being dropped silently after the broker has its PUBACK.
    let command_stats = Arc::new(crate::command::CommandStats::default());
    let (router_input, router_current) =
        tokio::sync::watch::channel((mpsc::channel(1).0, Arc::new(config.clone())));
    {
        let stats = command_stats.clone();
        // Weak: the link waits for every sender to go before it flushes and stops.
        let link_sender = link.sender.downgrade();
        tokio::spawn(async move {
            let mut budget = crate::command::RateLimiter::new(
                crate::model::Rate {
                    count: crate::command::REFUSAL_BUDGET,
                    per: Duration::from_secs(1),
                },
                Instant::now(),
            );
            while let Some(msg) = commands_rx.recv().await {
                let (router, config) = router_current.borrow().clone();
                let Err(e) = router.try_send(msg) else {
                    continue;
                };
                let msg = match e {
                    mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
                };
                stats
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !budget.allow(Instant::now()) {
                    continue;
                }
                tracing::warn!(topic = %crate::command::log_topic(&msg.topic), "command queue full (or router being replaced): answered busy, not executed");
                let Some(link_sender) = link_sender.upgrade() else {
                    continue;
                };
                for m in crate::command::router::overloaded(&config, &msg) {
                    if link_sender.try_send(m).is_err() {
                        break;
                    }
                }
            }
        });
    }

    let mut config = Arc::new(config);
    let mut generation = 1u64;
    let mut running: Vec<RunningBus> = (0..config.buses.len())
        .filter_map(|b| spawn_bus(&config, generation, b, &tagged_tx, &cancel))
        .collect();
    let handles = |running: &[RunningBus]| -> Vec<BusHandle> {
        running.iter().map(|r| r.handle.clone()).collect()
    };
    let mut sidecars = Sidecars::start(
        &config,
        &handles(&running),
        &router_input,
        &link.sender,
        &link.stats,
        &store_stats,
        &command_stats,
        crate::command::router::Memory::default(),
        &cancel,
    );

    loop {
        let requested = async {
            match reload.as_mut() {
                Some(r) => r.requests.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(()) = requested => {
                let path = reload.as_ref().expect("reload requested").path.clone();
                let Some(new) = load_for_reload(&path, &config) else { continue };
                if let Some(n) = crate::notify::Notifier::from_env() {
                    let _ = n.send("RELOADING=1");
                }
                generation += 1;
                let new = Arc::new(new);
                let (memory, old_supervisor) = sidecars.stop().await;
                let (mut kept, mut stopped) = (Vec::new(), 0usize);
                // All at once: the reload takes as long as the slowest bus takes to stop.
                let mut stopping = tokio::task::JoinSet::new();
                for r in running.drain(..) {
                    let same = new
                        .buses
                        .iter()
                        .position(|b| b.name == r.def.bus.name)
                        .is_some_and(|b| bus_def(&new, b) == r.def);
                    if same {
                        kept.push(r);
                    } else {
                        stopping.spawn(stop_bus(r));
                        stopped += 1;
                    }
                }
                stopping.join_all().await;
                old_supervisor.cancel();
                let kept_names: Vec<String> = kept.iter().map(|r| r.def.bus.name.clone()).collect();
                let started: Vec<RunningBus> = (0..new.buses.len())
                    .filter(|&b| !kept_names.contains(&new.buses[b].name))
                    .filter_map(|b| spawn_bus(&new, generation, b, &tagged_tx, &cancel))
                    .collect();
                tracing::info!(
                    kept = kept.len(),
                    stopped,
                    started = started.len(),
                    "configuration reloaded"
                );
                running = kept;
                running.extend(started);
                // Command topics the new configuration adds are subscribed to at once.
                link.subscriptions
                    .send_if_modified(|filters| {
                        let wanted = crate::command::subscriptions(&new);
                        let changed = *filters != wanted;
                        *filters = wanted;
                        changed
                    });
                config = new;
                sidecars = Sidecars::start(
                    &config,
                    &handles(&running),
                    &router_input,
                    &link.sender,
                    &link.stats,
                    &store_stats,
                    &command_stats,
                    memory,
                    &cancel,
                );
            }
        }
    }

    tracing::info!("shutting down: stopping polls");
    let buses = handles(&running);
    for r in running {
        stop_bus(r).await;
    }
    drop(tagged_tx);
    let _ = sidecars.stop().await;
    drop(router_input);
    let _ = publisher.await;
    // Every sender of the link's queue is gone now (publisher, router, stats).
    drop(link.sender);
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
#[allow(clippy::too_many_arguments)]
async fn publish_stats(
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
            "ts": publish::rfc3339_millis(std::time::SystemTime::now()),
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
            json_object: true,
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
async fn publisher(mut events: mpsc::Receiver<Tagged>, link: mpsc::Sender<OutMessage>) {
    // Change filters per configuration generation: a bus kept across a reload keeps its
    // filters; a restarted one starts afresh.
    let mut filters: HashMap<u64, Filters> = HashMap::new();
    let mut events_seen = 0u64;
    // Status topics of the devices currently online.
    let mut online = std::collections::BTreeSet::new();
    while let Some(Tagged {
        config,
        generation,
        event,
    }) = events.recv().await
    {
        events_seen += 1;
        let filters = generation_filters(&mut filters, generation, &config, events_seen);
        let messages = match event {
            BusEvent::Status {
                device,
                online: is_online,
                ..
            } => {
                let status = device_status(&config, device, is_online);
                if is_online {
                    online.insert(status.topic.clone());
                } else {
                    online.remove(&status.topic);
                    // A consumer that saw `offline` gets every value again when the device
                    // returns, not only those that changed meanwhile.
                    filters.forget(&config, device);
                }
                vec![status]
            }
            BusEvent::Reading(reading) => render_reading(&config, &reading, filters),
        };
        for m in messages {
            if link.send(m).await.is_err() {
                return;
            }
        }
    }
    // Polling has stopped: the retained device statuses must not keep saying `online`.
    for topic in online {
        let offline = OutMessage {
            topic,
            payload: b"offline".to_vec(),
            qos: Qos::AtLeastOnce,
            retain: true,
            created: Instant::now(),
            correlation: None,
            json_object: false,
        };
        if link.send(offline).await.is_err() {
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
        correlation: None,
        json_object: false,
    }
}

/// The change filters of one configuration generation's points, by device and point index
/// (this runs for every reading: a hash lookup per point was a measurable part of the
/// gateway's CPU).
pub struct Filters {
    devices: Vec<Vec<ChangeFilter>>,
    /// The publisher's event count when these were last used.
    last_used: u64,
}

impl Filters {
    pub fn new(config: &Config) -> Filters {
        Filters {
            devices: config.devices.iter().map(device_filters).collect(),
            last_used: 0,
        }
    }

    /// Forgets a device's filters: every value is published again on its next reading.
    pub fn forget(&mut self, config: &Config, device: usize) {
        self.devices[device] = device_filters(&config.devices[device]);
    }
}

fn device_filters(device: &crate::model::Device) -> Vec<ChangeFilter> {
    device
        .points
        .iter()
        .map(|p| ChangeFilter::new(p.publish))
        .collect()
}

/// Generations whose filters the publisher keeps. Buses kept across reloads keep their
/// generation, so several can be live at once; without a bound every reload would leave its
/// filters behind for good. A live generation dropped costs only a full publish of its
/// devices' next readings, as after an offline.
const KEPT_GENERATIONS: usize = 8;

/// The filters of `generation` (whose configuration is `config`), made room for by dropping
/// the least recently used generation's when [`KEPT_GENERATIONS`] are kept already.
fn generation_filters<'a>(
    all: &'a mut HashMap<u64, Filters>,
    generation: u64,
    config: &Config,
    now: u64,
) -> &'a mut Filters {
    if !all.contains_key(&generation) && all.len() >= KEPT_GENERATIONS {
        if let Some(oldest) = all.iter().min_by_key(|(_, f)| f.last_used).map(|(g, _)| *g) {
            all.remove(&oldest);
        }
    }
    let filters = all
        .entry(generation)
        .or_insert_with(|| Filters::new(config));
    filters.last_used = now;
    filters
}

/// Messages for one reading, after the change filters.
pub fn render_reading(
    config: &Config,
    reading: &Reading,
    filters: &mut Filters,
) -> Vec<OutMessage> {
    let device = &config.devices[reading.device];
    let filters = &mut filters.devices[reading.device];
    let now = Instant::now();
    let mut out = Vec::new();
    match device.message_mode {
        MessageMode::PerPoint => {
            for (p, raw) in &reading.values {
                let point = &device.points[*p];
                let payload = match raw {
                    Ok(raw) => {
                        let value = codec::to_value(point, raw);
                        if !filters[*p].should_publish(&value, now) {
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
                        correlation: None,
                        json_object: point.payload == PayloadFormat::Json,
                    });
                }
            }
        }
        MessageMode::PerDevice => {
            let mut changed = false;
            // Each point's JSON at its index, then listed in name order.
            let mut values: Vec<Option<Option<serde_json::Value>>> = Vec::new();
            values.resize_with(device.points.len(), || None);
            for (p, raw) in &reading.values {
                let point = &device.points[*p];
                let json = match raw {
                    Ok(raw) => {
                        let value = codec::to_value(point, raw);
                        changed |= filters[*p].should_publish(&value, now);
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
                values[*p] = Some(json);
            }
            let entries: Vec<(&str, Option<serde_json::Value>)> = device
                .points_by_name
                .iter()
                .filter_map(|&p| Some((device.points[p].name.as_str(), values[p].take()?)))
                .collect();
            // Point filters fire on change and on their heartbeat.
            if changed {
                let first = device.points.get(reading.values.first().map_or(0, |v| v.0));
                out.push(OutMessage {
                    topic: device.topic.clone(),
                    payload: publish::device_payload(&device.name, reading.ts, &entries),
                    qos: first.map_or(Qos::AtLeastOnce, |p| p.qos),
                    retain: first.is_some_and(|p| p.retain),
                    created: reading.read_at,
                    correlation: None,
                    json_object: true,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Raw;
    use std::time::{Duration, SystemTime};

    const PER_DEVICE: &str = r#"
gateway: { id: gw, prefix: t }
mqtt: { url: "mqtt://127.0.0.1:1883" }
buses:
  - { name: b, type: tcp, host: 127.0.0.1 }
devices:
  - name: d
    bus: b
    message: per_device
    publish: { mode: on_change }
    points:
      - { name: zeta, address: 0, type: u16 }
      - { name: alpha, address: 1, type: u16 }
      - { name: mid, address: 2, type: u16 }
"#;

    fn reading(values: Vec<(usize, Result<Raw, String>)>) -> Reading {
        Reading {
            device: 0,
            group: 0,
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            read_at: Instant::now(),
            values,
        }
    }

    fn payloads(out: Vec<OutMessage>) -> Vec<String> {
        out.into_iter()
            .map(|m| String::from_utf8(m.payload).unwrap())
            .collect()
    }

    #[test]
    fn old_generations_filters_are_dropped_least_recently_used_first() {
        let config = crate::config::parse(PER_DEVICE, "test.yaml").expect("config loads");
        let mut all = HashMap::new();
        let mut now = 0;
        for generation in 1..=KEPT_GENERATIONS as u64 {
            now += 1;
            generation_filters(&mut all, generation, &config, now);
        }
        // Generation 1 is still in use (a bus kept across the reloads); 2 is not.
        now += 1;
        generation_filters(&mut all, 1, &config, now).forget(&config, 0);
        now += 1;
        generation_filters(&mut all, 99, &config, now);
        assert_eq!(all.len(), KEPT_GENERATIONS);
        assert!(all.contains_key(&1) && all.contains_key(&99));
        assert!(!all.contains_key(&2));
    }

    #[test]
    fn per_device_payloads_list_points_by_name_and_filter_on_change() {
        let config = crate::config::parse(PER_DEVICE, "test.yaml").expect("config loads");
        let mut filters = Filters::new(&config);
        let values = || {
            vec![
                (0, Ok(Raw::U64(1))),
                (1, Ok(Raw::U64(2))),
                (2, Err("timeout".to_string())),
            ]
        };
        let first = payloads(render_reading(&config, &reading(values()), &mut filters));
        assert_eq!(
            first,
            [
                r#"{"device":"d","ts":"2023-11-14T22:13:20.123Z","values":{"alpha":2,"mid":null,"zeta":1}}"#
            ]
        );
        // Unchanged, but a point is still bad: published.
        assert_eq!(
            render_reading(&config, &reading(values()), &mut filters).len(),
            1
        );
        // Unchanged and every point good: not published.
        let good = || vec![(0, Ok(Raw::U64(1))), (1, Ok(Raw::U64(2)))];
        assert!(render_reading(&config, &reading(good()), &mut filters).is_empty());
        // After the device went offline, the same values are published again.
        filters.forget(&config, 0);
        let again = payloads(render_reading(&config, &reading(good()), &mut filters));
        assert_eq!(
            again,
            [r#"{"device":"d","ts":"2023-11-14T22:13:20.123Z","values":{"alpha":2,"zeta":1}}"#]
        );
    }
}
