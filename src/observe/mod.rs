//! The gateway's figures in one place: the counters and gauges the tasks keep, and the one
//! [`Snapshot`] of them that the stats topic, the systemd status line and watchdog summary,
//! `fieldbridge status` and the HTTP endpoints (`/metrics`, `/api/status`, the status page)
//! all read.
//!
//! The tasks own their counters (atomics in `BusStats`, [`DeviceStats`], `LinkStats`,
//! `StoreStats`, `CommandStats`, [`Histogram`]s): updating one is a relaxed add, nothing more.
//! [`Sources`] holds handles to all of them for the running configuration (replaced on a
//! reload) and takes the snapshot on demand. The last value of every point ([`Live`]) is kept
//! only while the HTTP endpoint is on: with it off, the publisher does no extra work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::health::{self, TaskAge};
use crate::link::LinkStats;
use crate::modbus::BusHandle;
use crate::model::{Config, Device, Value};
use crate::store::StoreStats;

pub mod process;
pub mod prometheus;

/// Wall-clock milliseconds since the Unix epoch (0 before 1970).
pub fn wall_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A fixed-bucket histogram of durations, updated lock-free (Prometheus' cumulative buckets
/// are computed when it is read).
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending; one more bucket counts what lies above the last.
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// Bus transactions: a Modbus request and its answer (5 ms .. 5 s).
pub const TRANSACTION_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Read (or command) to PUBACK: from milliseconds on a LAN to minutes across an outage.
pub const DELIVERY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// [`Histogram`] of bus transaction times ([`TRANSACTION_BOUNDS`]).
#[derive(Debug)]
pub struct TransactionTime(pub Histogram);

impl Default for TransactionTime {
    fn default() -> Self {
        TransactionTime(Histogram::new(TRANSACTION_BOUNDS))
    }
}

/// [`Histogram`] of read-to-PUBACK times ([`DELIVERY_BOUNDS`]).
#[derive(Debug)]
pub struct DeliveryTime(pub Histogram);

impl Default for DeliveryTime {
    fn default() -> Self {
        DeliveryTime(Histogram::new(DELIVERY_BOUNDS))
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Cumulative counts per upper bound (the last is `+Inf`), and the sum in seconds.
    pub fn read(&self) -> HistogramSnapshot {
        let mut total = 0;
        let buckets = self
            .counts
            .iter()
            .map(|c| {
                total += c.load(Relaxed);
                total
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative: buckets,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram as read: cumulative counts (`cumulative[i]` ≤ `bounds[i]`, the last one all).
#[derive(Debug, Clone, Serialize)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// A device's figures, kept by its bus task.
#[derive(Debug)]
pub struct DeviceStats {
    pub name: String,
    pub polls: AtomicU64,
    pub failures: AtomicU64,
    /// 0 not yet known, 1 online, 2 offline.
    pub online: AtomicU8,
    /// Wall-clock ms of the last good poll; 0: never.
    pub last_good_ms: AtomicU64,
    /// The back-off now in force after failures (ms); 0 when polling normally.
    pub backoff_ms: AtomicU64,
    /// How long the last poll took (all its transactions), µs.
    pub last_poll_us: AtomicU64,
    /// Wall-clock ms of the last failure; 0: never.
    pub last_error_ms: AtomicU64,
    /// The last failure's reason, set only when a poll fails.
    pub last_error: Mutex<String>,
}

impl DeviceStats {
    pub fn new(name: &str) -> DeviceStats {
        DeviceStats {
            name: name.to_string(),
            polls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            online: AtomicU8::new(0),
            last_good_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
            last_poll_us: AtomicU64::new(0),
            last_error_ms: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
        }
    }

    /// A poll that took `took` ended well.
    pub fn good(&self, took: Duration) {
        self.polls.fetch_add(1, Relaxed);
        self.online.store(1, Relaxed);
        self.last_good_ms.store(wall_ms(SystemTime::now()), Relaxed);
        self.backoff_ms.store(0, Relaxed);
        self.last_poll_us
            .store(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A poll failed with `error`; the device waits `backoff` before the next one.
    pub fn failed(&self, took: Duration, error: &str, backoff: Duration, offline: bool) {
        self.polls.fetch_add(1, Relaxed);
        self.failures.fetch_add(1, Relaxed);
        if offline {
            self.online.store(2, Relaxed);
        }
        self.backoff_ms.store(
            u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
            Relaxed,
        );
        self.last_poll_us
            .store(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
        self.last_error_ms
            .store(wall_ms(SystemTime::now()), Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            last.clear();
            // Bounded: a device's error text is ours, but may quote what it sent.
            last.extend(error.chars().take(200));
        }
    }
}

/// What kind of failure a bus transaction ended with (label `kind` of the failures metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Timeout,
    Exception,
    Protocol,
    Transport,
}

impl FailureKind {
    pub const ALL: [FailureKind; 4] = [
        FailureKind::Timeout,
        FailureKind::Exception,
        FailureKind::Protocol,
        FailureKind::Transport,
    ];
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Exception => "exception",
            FailureKind::Protocol => "protocol",
            FailureKind::Transport => "transport",
        }
    }
}

/// Kinds of bad lines of a line-device port (as `lines::task` counts them).
pub const BAD_LINE_KINDS: [&str; 4] = ["too_long", "invalid_utf8", "checksum", "unmatched"];

/// The last value of every point, for the status page: kept by the publisher stage while the
/// HTTP endpoint is on. Keyed by device name (a bus kept across a reload reports under its own
/// configuration's indices, but its devices keep their names and points).
#[derive(Debug, Default)]
pub struct Live {
    devices: Mutex<HashMap<String, Vec<LastValue>>>,
}

/// A point's last reading.
#[derive(Debug, Clone, Default)]
pub struct LastValue {
    /// `None`: never read, or the last read was bad.
    pub value: Option<Value>,
    pub label: Option<String>,
    /// Wall-clock ms of the reading.
    pub at_ms: u64,
    pub bad_reads: u64,
}

impl Live {
    /// Records a reading (or a written value) of points of `device`: `(point, value, label)`,
    /// value `None` for a bad read.
    pub fn record<'a>(
        &self,
        device: &Device,
        at: SystemTime,
        values: impl Iterator<Item = (usize, Option<&'a Value>, Option<&'a str>)>,
    ) {
        let at_ms = wall_ms(at);
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        let points = match devices.get_mut(&device.name) {
            Some(p) => p,
            None => devices
                .entry(device.name.clone())
                .or_insert_with(|| vec![LastValue::default(); device.points.len()]),
        };
        if points.len() != device.points.len() {
            points.resize(device.points.len(), LastValue::default());
        }
        for (p, value, label) in values {
            let Some(slot) = points.get_mut(p) else {
                continue;
            };
            slot.at_ms = at_ms;
            match value {
                Some(v) => {
                    if slot.value.as_ref() != Some(v) {
                        slot.value = Some(v.clone());
                    }
                    if slot.label.as_deref() != label {
                        slot.label = label.map(str::to_string);
                    }
                }
                None => {
                    slot.value = None;
                    slot.bad_reads += 1;
                }
            }
        }
    }

    /// Forgets devices the configuration no longer has.
    pub fn retain(&self, config: &Config) {
        if let Ok(mut devices) = self.devices.lock() {
            devices.retain(|name, _| config.devices.iter().any(|d| &d.name == name));
        }
    }

    /// The last values of `device`, if it was ever read.
    pub fn get(&self, device: &str) -> Option<Vec<LastValue>> {
        self.devices.lock().ok()?.get(device).cloned()
    }
}

/// Per-device poll-latency history for the status page's plots: sampled every
/// [`HISTORY_EVERY`], [`HISTORY_LEN`] samples kept (6 minutes, 720 bytes a device).
pub const HISTORY_EVERY: Duration = Duration::from_secs(2);
pub const HISTORY_LEN: usize = 180;

/// The sampled history: per device name, poll latency in ms (`NaN`: offline or no poll).
#[derive(Debug, Default)]
pub struct History {
    devices: Mutex<HashMap<String, std::collections::VecDeque<f32>>>,
}

impl History {
    /// Takes one sample of every device of `sources` (its poll time while online), reading
    /// only the devices' counters: cheaper than a whole snapshot.
    pub fn sample(&self, sources: &Sources) {
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        let stats: Vec<&DeviceStats> = sources
            .buses
            .iter()
            .flat_map(|b| b.stats.devices.iter())
            .collect();
        devices.retain(|name, _| stats.iter().any(|d| &d.name == name));
        for d in stats {
            let v = match d.online.load(Relaxed) {
                1 => d.last_poll_us.load(Relaxed) as f32 / 1000.0,
                _ => f32::NAN,
            };
            let ring = match devices.get_mut(&d.name) {
                Some(r) => r,
                None => devices.entry(d.name.clone()).or_default(),
            };
            if ring.len() >= HISTORY_LEN {
                ring.pop_front();
            }
            ring.push_back(v);
        }
    }

    pub fn get(&self, device: &str) -> Vec<Option<f32>> {
        self.devices
            .lock()
            .ok()
            .and_then(|d| {
                d.get(device)
                    .map(|r| r.iter().map(|v| (!v.is_nan()).then_some(*v)).collect())
            })
            .unwrap_or_default()
    }
}

/// Handles to every counter of the running configuration.
#[derive(Clone)]
pub struct Sources {
    pub config: Arc<Config>,
    pub buses: Vec<BusHandle>,
    /// Each bus's stall limit (`health::bus_stall_limit`), in the order of `buses`.
    pub limits: Vec<Duration>,
    pub link: Arc<LinkStats>,
    pub store: Option<Arc<StoreStats>>,
    pub commands: Arc<crate::command::CommandStats>,
    pub live: Option<Arc<Live>>,
    pub started: Started,
    /// Set once `READY=1` was sent (the tasks run).
    pub ready: Arc<AtomicBool>,
}

/// When the process started.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    pub at: Instant,
    pub wall: SystemTime,
}

impl Started {
    pub fn now() -> Started {
        Started {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

impl Sources {
    /// The sources of `config` running on `buses`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        buses: Vec<BusHandle>,
        link: Arc<LinkStats>,
        store: Option<Arc<StoreStats>>,
        commands: Arc<crate::command::CommandStats>,
        live: Option<Arc<Live>>,
        started: Started,
        ready: Arc<AtomicBool>,
    ) -> Sources {
        let limits = buses
            .iter()
            .map(
                |handle| match config.buses.iter().position(|b| b.name == handle.name) {
                    Some(b) => health::bus_stall_limit(
                        &config.buses[b],
                        config.devices.iter().filter(|d| d.bus == b),
                    ),
                    None => health::LINK_STALL_LIMIT,
                },
            )
            .collect();
        Sources {
            config,
            buses,
            limits,
            link,
            store,
            commands,
            live,
            started,
            ready,
        }
    }

    /// Every watched task's heartbeat age and limit (the watchdog's rule, `health::stalled`).
    pub fn tasks(&self) -> Vec<TaskAge> {
        let mut ages: Vec<TaskAge> = self
            .buses
            .iter()
            .zip(&self.limits)
            .map(|(b, limit)| TaskAge {
                name: format!("bus {}", b.name),
                age: b.stats.heartbeat.age(),
                limit: *limit,
            })
            .collect();
        ages.push(TaskAge {
            name: "mqtt link".to_string(),
            age: self.link.heartbeat.age(),
            limit: health::LINK_STALL_LIMIT,
        });
        if let Some(store) = &self.store {
            ages.push(TaskAge {
                name: "store".to_string(),
                age: store.heartbeat.age(),
                limit: health::STORE_STALL_LIMIT,
            });
        }
        ages
    }

    /// The few figures the status line says (cheap: taken every second).
    pub fn summary(&self) -> health::Summary {
        health::Summary {
            devices_online: self
                .buses
                .iter()
                .map(|b| b.stats.devices_online.load(Relaxed))
                .sum(),
            devices: self.config.devices.len(),
            mqtt_connected: self.link.connected.load(Relaxed) == 1,
            backlog: self.link.backlog.load(Relaxed),
            stalled: health::stalled(&self.tasks()),
        }
    }

    /// Every figure, now.
    pub fn snapshot(&self) -> Snapshot {
        let now_wall = SystemTime::now();
        let now_ms = wall_ms(now_wall);
        let age = |ms: u64| (ms > 0).then(|| now_ms.saturating_sub(ms) as f64 / 1000.0);
        let summary = self.summary();
        let link = &self.link;
        let c = &self.config;
        let buses = self
            .buses
            .iter()
            .map(|b| {
                let s = &b.stats;
                let kind = c
                    .buses
                    .iter()
                    .find(|x| x.name == b.name)
                    .map_or("", |x| bus_kind(&x.kind));
                BusSnapshot {
                    name: b.name.clone(),
                    kind,
                    polls: s.polls.load(Relaxed),
                    failed_polls: s.failed_polls.load(Relaxed),
                    transactions: s.transactions.load(Relaxed),
                    requests: s.requests.load(Relaxed),
                    failures: FailureKind::ALL
                        .iter()
                        .map(|k| (k.name(), s.failures[*k as usize].load(Relaxed)))
                        .collect(),
                    busy_seconds: s.busy_us.load(Relaxed) as f64 / 1e6,
                    skipped_ticks: s.skipped_ticks.load(Relaxed),
                    resets: s.resets.load(Relaxed),
                    devices_online: s.devices_online.load(Relaxed),
                    bad_lines: matches!(kind, "lines").then(|| {
                        BAD_LINE_KINDS
                            .iter()
                            .zip(&s.bad_lines)
                            .map(|(k, n)| (*k, n.load(Relaxed)))
                            .collect()
                    }),
                    transaction_seconds: s.transaction_time.0.read(),
                    heartbeat_age_seconds: s.heartbeat.age().as_secs_f64(),
                }
            })
            .collect();
        let devices = c
            .devices
            .iter()
            .map(|d| {
                let bus_name = &c.buses[d.bus].name;
                let stats = self
                    .buses
                    .iter()
                    .find(|b| &b.name == bus_name)
                    .and_then(|b| b.stats.devices.iter().find(|s| s.name == d.name));
                let live = self.live.as_ref().and_then(|l| l.get(&d.name));
                device_snapshot(d, bus_name, stats, live.as_deref(), &age)
            })
            .collect();
        let store = self.store.as_ref().map(|s| {
            let messages = s.backlog.load(Relaxed);
            let oldest = s.oldest_created.load(Relaxed);
            StoreSnapshot {
                messages,
                bytes: s.backlog_bytes.load(Relaxed),
                cap_bytes: c.store.max_bytes,
                oldest_age_seconds: if messages > 0 && oldest > 0 {
                    (crate::store::now_ms() - oldest).max(0) as f64 / 1000.0
                } else {
                    0.0
                },
                appended: s.appended.load(Relaxed),
                deleted: s.deleted.load(Relaxed),
                commits: s.commits.load(Relaxed),
                write_failures: s.write_failures.load(Relaxed),
                unreadable: s.unreadable.load(Relaxed),
                dropped: s.dropped.load(Relaxed),
            }
        });
        let cs = &self.commands;
        let commands = CommandSnapshot {
            executed: cs.executed.load(Relaxed),
            refused: cs.refused.load(Relaxed),
            failed: cs.failed.load(Relaxed),
            suppressed: cs.suppressed.load(Relaxed),
            dropped: cs.dropped.load(Relaxed),
            refused_by_reason: cs.refusals(),
        };
        let store_dropped = store.as_ref().map_or(0, |s| s.dropped);
        Snapshot {
            gateway: GatewaySnapshot {
                id: c.gateway.id.clone(),
                version: env!("CARGO_PKG_VERSION"),
                mode: if c.sparkplug.is_some() {
                    "sparkplug"
                } else {
                    "json"
                },
                ts: crate::publish::rfc3339_millis(now_wall),
                uptime_seconds: self.started.at.elapsed().as_secs_f64(),
                start_time_unix: wall_ms(self.started.wall) as f64 / 1000.0,
                ready: self.ready.load(Relaxed),
                stalled: summary.stalled,
                devices: summary.devices,
                devices_online: summary.devices_online,
            },
            mqtt: MqttSnapshot {
                broker: format!("{}:{}", c.mqtt.host, c.mqtt.port),
                connected: summary.mqtt_connected,
                connects: link.connects.load(Relaxed),
                backlog: summary.backlog,
                in_flight: link.in_flight.load(Relaxed),
                queued: link.queued.load(Relaxed),
                delivered: link.delivered.load(Relaxed),
                resent: link.resent.load(Relaxed),
                dropped: link.dropped.load(Relaxed) + store_dropped,
                dropped_by_reason: vec![
                    ("queue_full", link.dropped_queue_full.load(Relaxed)),
                    ("unsendable", link.dropped_unsendable.load(Relaxed)),
                    ("broker_refused", link.dropped_refused.load(Relaxed)),
                ],
                protocol_errors: link.protocol_errors.load(Relaxed),
                commands_dropped: link.commands_dropped.load(Relaxed),
                delivery_seconds: link.delivery_time.0.read(),
            },
            store,
            commands,
            buses,
            devices,
            process: process::read(),
        }
    }
}

fn bus_kind(kind: &crate::model::BusKind) -> &'static str {
    use crate::model::BusKind;
    match kind {
        BusKind::Tcp { .. } => "tcp",
        BusKind::Rtu { .. } => "rtu",
        BusKind::RtuOverTcp { .. } => "rtu_over_tcp",
        BusKind::Lines(_) => "lines",
    }
}

fn device_snapshot(
    d: &Device,
    bus: &str,
    stats: Option<&DeviceStats>,
    live: Option<&[LastValue]>,
    age: &dyn Fn(u64) -> Option<f64>,
) -> DeviceSnapshot {
    let get = |f: fn(&DeviceStats) -> &AtomicU64| stats.map_or(0, |s| f(s).load(Relaxed));
    let points = live.map(|values| {
        d.points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let last = values.get(i);
                PointSnapshot {
                    name: p.name.clone(),
                    value: last
                        .and_then(|l| l.value.as_ref())
                        .map(crate::publish::value_json),
                    label: last.and_then(|l| l.label.clone()),
                    unit: p.unit.clone(),
                    age_seconds: last.and_then(|l| age(l.at_ms)),
                    bad_reads: last.map_or(0, |l| l.bad_reads),
                }
            })
            .collect()
    });
    let online = stats.and_then(|s| match s.online.load(Relaxed) {
        1 => Some(true),
        2 => Some(false),
        _ => None,
    });
    let last_poll_us = get(|s| &s.last_poll_us);
    DeviceSnapshot {
        name: d.name.clone(),
        bus: bus.to_string(),
        unit: d.unit,
        online,
        polls: get(|s| &s.polls),
        failures: get(|s| &s.failures),
        last_good_age_seconds: age(get(|s| &s.last_good_ms)),
        backoff_seconds: get(|s| &s.backoff_ms) as f64 / 1000.0,
        poll_ms: (last_poll_us > 0).then(|| last_poll_us as f64 / 1000.0),
        last_error: stats
            .and_then(|s| s.last_error.lock().ok().map(|e| e.clone()))
            .filter(|e| !e.is_empty()),
        last_error_age_seconds: age(get(|s| &s.last_error_ms)),
        points,
    }
}

/// Every figure of the gateway at one instant (serialised as `/api/status`).
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub gateway: GatewaySnapshot,
    pub mqtt: MqttSnapshot,
    pub store: Option<StoreSnapshot>,
    pub commands: CommandSnapshot,
    pub buses: Vec<BusSnapshot>,
    pub devices: Vec<DeviceSnapshot>,
    pub process: process::Process,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewaySnapshot {
    pub id: String,
    pub version: &'static str,
    pub mode: &'static str,
    pub ts: String,
    pub uptime_seconds: f64,
    pub start_time_unix: f64,
    pub ready: bool,
    pub stalled: Vec<String>,
    pub devices: usize,
    pub devices_online: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttSnapshot {
    /// Host and port only: never the URL's credentials.
    pub broker: String,
    pub connected: bool,
    pub connects: u64,
    pub backlog: u64,
    pub in_flight: u64,
    pub queued: u64,
    pub delivered: u64,
    pub resent: u64,
    pub dropped: u64,
    pub dropped_by_reason: Vec<(&'static str, u64)>,
    pub protocol_errors: u64,
    pub commands_dropped: u64,
    pub delivery_seconds: HistogramSnapshot,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreSnapshot {
    pub messages: u64,
    pub bytes: u64,
    pub cap_bytes: u64,
    pub oldest_age_seconds: f64,
    pub appended: u64,
    pub deleted: u64,
    pub commits: u64,
    pub write_failures: u64,
    pub unreadable: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CommandSnapshot {
    pub executed: u64,
    pub refused: u64,
    pub failed: u64,
    pub suppressed: u64,
    pub dropped: u64,
    pub refused_by_reason: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BusSnapshot {
    pub name: String,
    pub kind: &'static str,
    pub polls: u64,
    pub failed_polls: u64,
    pub transactions: u64,
    pub requests: u64,
    pub failures: Vec<(&'static str, u64)>,
    pub busy_seconds: f64,
    pub skipped_ticks: u64,
    pub resets: u64,
    pub devices_online: u64,
    pub bad_lines: Option<Vec<(&'static str, u64)>>,
    pub transaction_seconds: HistogramSnapshot,
    pub heartbeat_age_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceSnapshot {
    pub name: String,
    pub bus: String,
    pub unit: u8,
    /// `None` until the first poll settles it.
    pub online: Option<bool>,
    pub polls: u64,
    pub failures: u64,
    pub last_good_age_seconds: Option<f64>,
    pub backoff_seconds: f64,
    /// The last poll's duration.
    pub poll_ms: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_age_seconds: Option<f64>,
    /// Last values (only while the HTTP endpoint keeps them).
    pub points: Option<Vec<PointSnapshot>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointSnapshot {
    pub name: String,
    pub value: Option<serde_json::Value>,
    pub label: Option<String>,
    pub unit: Option<String>,
    pub age_seconds: Option<f64>,
    pub bad_reads: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_the_sum() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [1, 5, 10, 50, 200, 2000] {
            h.record(Duration::from_millis(ms));
        }
        let s = h.read();
        // ≤ 10 ms: 1, 5, 10; ≤ 100 ms: + 50; ≤ 1 s: + 200; +Inf: + 2000.
        assert_eq!(s.cumulative, vec![3, 4, 5, 6]);
        assert_eq!(s.count(), 6);
        assert!((s.sum_seconds - 2.266).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn device_stats_keep_the_last_error_bounded_and_the_state() {
        let d = DeviceStats::new("m");
        d.good(Duration::from_millis(12));
        assert_eq!(d.online.load(Relaxed), 1);
        assert_eq!(d.last_poll_us.load(Relaxed), 12_000);
        let long = "x".repeat(1000);
        d.failed(Duration::from_secs(1), &long, Duration::from_secs(4), true);
        assert_eq!(d.online.load(Relaxed), 2);
        assert_eq!(d.backoff_ms.load(Relaxed), 4000);
        assert_eq!(d.last_error.lock().unwrap().len(), 200);
        assert_eq!(d.failures.load(Relaxed), 1);
        assert_eq!(d.polls.load(Relaxed), 2);
        d.good(Duration::from_millis(3));
        assert_eq!(
            d.backoff_ms.load(Relaxed),
            0,
            "back-off ends with a good poll"
        );
    }

    #[test]
    fn history_keeps_a_bounded_ring_per_device() {
        let config = Arc::new(
            crate::config::parse(
                "gateway: { id: g }\nmqtt: { url: \"mqtt://127.0.0.1:1883\" }\nbuses:\n  - { name: b, type: tcp, host: 127.0.0.1 }\ndevices:\n  - { name: m, bus: b, points: [ { name: p, address: 0 } ] }\n",
                "t.yaml",
            )
            .expect("config"),
        );
        let stats = Arc::new(crate::modbus::BusStats::for_devices(&[(
            0,
            config.devices[0].clone(),
        )]));
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let handle = BusHandle {
            name: "b".into(),
            requests: tx,
            stats: stats.clone(),
        };
        let sources = Sources::new(
            config,
            vec![handle],
            Arc::default(),
            None,
            Arc::default(),
            None,
            Started::now(),
            Arc::default(),
        );
        let h = History::default();
        stats.devices[0].good(Duration::from_millis(7));
        for _ in 0..HISTORY_LEN + 5 {
            h.sample(&sources);
        }
        stats.devices[0].failed(
            Duration::from_secs(1),
            "timeout",
            Duration::from_secs(2),
            true,
        );
        h.sample(&sources);
        let ring = h.get("m");
        assert_eq!(ring.len(), HISTORY_LEN);
        assert_eq!(ring[0], Some(7.0));
        assert_eq!(ring.last(), Some(&None), "offline is a gap in the plot");
        assert!(h.get("other").is_empty());
    }
}
