//! Liveness of the gateway's tasks, and the supervisor that reports it to systemd.
//!
//! # Heartbeats
//! Each bus task, the MQTT link's manager task and the store thread own a [`Heartbeat`] (in
//! `BusStats`, `LinkStats` and `StoreStats`) and beat it on every turn of their loop and after
//! every bus transaction. The link's and the store's loops wake at least every [`TICK`] even
//! when idle; a Modbus bus task instead promises, before it waits, that it is idle until its
//! next poll ([`Heartbeat::idle_until`]), and sleeps until then. So a heartbeat older than a
//! few ticks (past any promise) means the task is stuck inside an await, not merely waiting
//! for its next poll.
//!
//! # Watchdog
//! A task is *stalled* when its heartbeat is older than its limit: for a bus, the longest a
//! transaction may legitimately take (connect timeout, connect delay, request timeout of its
//! slowest device) plus slack; for the link, a few ticks; for the store, [`STORE_STALL_LIMIT`]. While any task is stalled the
//! supervisor withholds `WATCHDOG=1`, so systemd restarts the service after `WatchdogSec=`.
//! If the runtime thread itself is blocked, the supervisor does not run and no ping is sent
//! either. `WatchdogSec=` should exceed the longest bus limit; see systemd/fieldbridge.service.
//!
//! # Status
//! `READY=1` once the tasks are spawned; `STATUS=` a one-line summary whenever it changes
//! (checked every tick); `STOPPING=1` when shutdown begins. A summary of poll failures is
//! logged every [`FAILURE_SUMMARY_EVERY`], since the bus task logs only the first failure of
//! an episode at `warn`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::model::{Bus, Device};
use crate::notify::{self, Notifier};
use crate::observe::Sources;

/// Longest an idle task loop sleeps before it beats its heartbeat again.
pub const TICK: Duration = Duration::from_secs(1);

/// Added to every computed limit (scheduling delays on a busy Pi).
const SLACK: Duration = Duration::from_secs(5);

/// The link's manager does no I/O of its own; it only waits for events and ticks.
pub const LINK_STALL_LIMIT: Duration = Duration::from_secs(7);

/// The store thread waits at most a tick between turns; a turn is one request, a commit or
/// a sweep batch, which an SD card busy with its own garbage collection can hold for seconds
/// (a rebuild beats on every page). Stuck longer, it is in I/O that does not come back.
pub const STORE_STALL_LIMIT: Duration = Duration::from_secs(20);

/// How often a summary of poll failures is logged.
pub const FAILURE_SUMMARY_EVERY: Duration = Duration::from_secs(600);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// When a task last made progress (milliseconds since the process's first use of it), or until
/// when it is known to be idle: a task about to wait for its next poll (and nothing else)
/// promises [`Heartbeat::idle_until`] that time, and need not wake every [`TICK`] just to beat.
#[derive(Debug, Default)]
pub struct Heartbeat {
    last: AtomicU64,
    idle_until: AtomicU64,
}

impl Heartbeat {
    /// Records progress now (and ends an idle promise).
    pub fn beat(&self) {
        self.last.store(now_ms(), Ordering::Relaxed);
        self.idle_until.store(0, Ordering::Relaxed);
    }

    /// The task now waits, doing nothing else, until `until` at the latest (its next poll),
    /// or for an event it beats on: its heartbeat is young until then.
    pub fn idle_until(&self, until: Instant) {
        let ms =
            u64::try_from(until.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX);
        self.last.store(now_ms(), Ordering::Relaxed);
        self.idle_until.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat (since start-up if it never beat), or since the end of the
    /// idle time it promised; zero within it.
    pub fn age(&self) -> Duration {
        let now = now_ms();
        let promised = self.idle_until.load(Ordering::Relaxed);
        if promised > now {
            return Duration::ZERO;
        }
        let since = self.last.load(Ordering::Relaxed).max(promised);
        Duration::from_millis(now.saturating_sub(since))
    }
}

/// Longest a bus task may go without a heartbeat: one transaction of its slowest device
/// (connect attempt bounded by max(timeout, 1 s), connect delay, the request timeout; see
/// `modbus::conn::Connection::call`), a tick, and slack.
pub fn bus_stall_limit<'a>(bus: &Bus, devices: impl IntoIterator<Item = &'a Device>) -> Duration {
    let slowest = devices
        .into_iter()
        .map(|d| d.timeout)
        .max()
        .unwrap_or_default();
    slowest.max(Duration::from_secs(1)) + slowest + bus.connect_delay + TICK * 2 + SLACK
}

/// A task the supervisor watches, at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskAge {
    pub name: String,
    pub age: Duration,
    pub limit: Duration,
}

/// Names of the tasks whose heartbeat is older than their limit.
pub fn stalled(tasks: &[TaskAge]) -> Vec<String> {
    tasks
        .iter()
        .filter(|t| t.age > t.limit)
        .map(|t| t.name.clone())
        .collect()
}

/// What the status line says.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub devices_online: u64,
    pub devices: usize,
    pub mqtt_connected: bool,
    pub backlog: u64,
    pub stalled: Vec<String>,
}

/// `4/5 devices online, MQTT connected, backlog 0`, and the stalled tasks if any.
pub fn status_line(s: &Summary) -> String {
    let mut line = format!(
        "{}/{} devices online, MQTT {}, backlog {}",
        s.devices_online,
        s.devices,
        if s.mqtt_connected {
            "connected"
        } else {
            "disconnected"
        },
        s.backlog
    );
    if !s.stalled.is_empty() {
        line.push_str(", stalled: ");
        line.push_str(&s.stalled.join(", "));
    }
    line
}

/// Starts the supervisor: sends `READY=1` at once, then status, watchdog pings and failure
/// summaries until `cancel` fires, then `STOPPING=1`. Reads `NOTIFY_SOCKET` and
/// `WATCHDOG_USEC` from the environment; without them it only logs. Everything it says comes
/// from `sources` (the status line from [`Sources::summary`], the stalls from
/// [`Sources::tasks`], the failure summary from the snapshot).
pub fn spawn(
    sources: Arc<Sources>,
    cancel: CancellationToken,
    retire: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let notifier = Notifier::from_env();
    let watchdog = notify::watchdog_from_env();
    if let Some(period) = watchdog {
        let longest = sources.limits.iter().max().copied().unwrap_or_default();
        if longest > period {
            tracing::warn!(
                watchdog_ms = period.as_millis() as u64,
                longest_bus_limit_ms = longest.as_millis() as u64,
                "WatchdogSec is shorter than the slowest bus may legitimately be busy; a stuck \
                 bus is then detected only after its own limit"
            );
        }
    }
    tokio::spawn(supervise(notifier, watchdog, sources, cancel, retire))
}

async fn supervise(
    notifier: Option<Notifier>,
    watchdog: Option<Duration>,
    sources: Arc<Sources>,
    cancel: CancellationToken,
    retire: CancellationToken,
) {
    let send = |state: &str| {
        if let Some(n) = &notifier {
            if let Err(e) = n.send(state) {
                tracing::debug!(error = %e, "sd_notify failed");
            }
        }
    };
    // Pings at half the watchdog period (sd_watchdog_enabled(3)); status checked every tick.
    let ping_every = watchdog.map(|w| w / 2);
    let tick = ping_every.map_or(TICK, |p| p.min(TICK));
    let mut last_ping: Option<Instant> = None;
    let mut last_status = String::new();
    let mut was_stalled: Vec<String> = Vec::new();
    let mut next_summary = Instant::now() + FAILURE_SUMMARY_EVERY;
    let mut failed_at_last_summary: HashMap<String, u64> = HashMap::new();
    let mut ready = false;
    loop {
        let summary = sources.summary();
        let stalled_now = summary.stalled.clone();
        if stalled_now.iter().any(|n| !was_stalled.contains(n)) {
            let ages = sources.tasks();
            for name in stalled_now.iter().filter(|n| !was_stalled.contains(n)) {
                let age = ages.iter().find(|t| &t.name == name).map(|t| t.age);
                tracing::error!(
                    task = %name,
                    silent_ms = age.map_or(0, |a| a.as_millis() as u64),
                    "task made no progress: withholding the watchdog ping"
                );
            }
        }
        was_stalled = stalled_now.clone();
        let line = status_line(&summary);
        let mut message = String::new();
        if !ready {
            message.push_str("READY=1\n");
            ready = true;
            sources.ready.store(true, Ordering::Relaxed);
        }
        if line != last_status {
            message.push_str(&notify::status(&line));
            message.push('\n');
            last_status = line;
        }
        let ping_due = match (ping_every, last_ping) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(every), Some(last)) => last.elapsed() + tick / 2 >= every,
        };
        if ping_due && stalled_now.is_empty() {
            message.push_str("WATCHDOG=1\n");
            last_ping = Some(Instant::now());
        }
        if !message.is_empty() {
            send(message.trim_end());
        }

        if Instant::now() >= next_summary {
            next_summary += FAILURE_SUMMARY_EVERY;
            let snapshot = sources.snapshot();
            for b in &snapshot.buses {
                let before = failed_at_last_summary.insert(b.name.clone(), b.failed_polls);
                let new = b.failed_polls - before.unwrap_or(0).min(b.failed_polls);
                if new > 0 {
                    let devices = snapshot.devices.iter().filter(|d| d.bus == b.name).count();
                    tracing::warn!(
                        bus = %b.name,
                        failed_polls = new,
                        devices_online = b.devices_online,
                        devices,
                        "poll failures in the last {} min",
                        FAILURE_SUMMARY_EVERY.as_secs() / 60
                    );
                }
            }
        }

        tokio::select! {
            _ = cancel.cancelled() => break,
            // Replaced by a supervisor for a reloaded configuration: not a stop.
            _ = retire.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
    send("STOPPING=1\nSTATUS=stopping: flushing and disconnecting");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, age_ms: u64, limit_ms: u64) -> TaskAge {
        TaskAge {
            name: name.to_string(),
            age: Duration::from_millis(age_ms),
            limit: Duration::from_millis(limit_ms),
        }
    }

    #[test]
    fn a_task_older_than_its_limit_is_stalled() {
        let tasks = [
            task("bus a", 900, 1000),
            task("bus b", 1001, 1000),
            task("mqtt link", 10, 7000),
        ];
        assert_eq!(stalled(&tasks), ["bus b"]);
        assert!(stalled(&tasks[..1]).is_empty());
    }

    #[test]
    fn an_idle_promise_keeps_a_heartbeat_young_until_it_ends() {
        let h = Heartbeat::default();
        h.idle_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(h.age(), Duration::ZERO);
        // A promise that ended ages from its end, not from the last beat before it.
        h.idle_until(Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let age = h.age();
        assert!(
            age >= Duration::from_millis(25) && age < Duration::from_secs(1),
            "{age:?}"
        );
        // A beat ends a promise: a task busy with something else ages as before.
        h.idle_until(Instant::now() + Duration::from_secs(60));
        h.beat();
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.age() >= Duration::from_millis(25));
    }

    #[test]
    fn a_fresh_heartbeat_is_young() {
        let h = Heartbeat::default();
        h.beat();
        assert!(h.age() < Duration::from_secs(1));
    }

    #[test]
    fn status_line_summarises_devices_link_and_stalls() {
        let mut s = Summary {
            devices_online: 4,
            devices: 5,
            mqtt_connected: true,
            backlog: 0,
            stalled: vec![],
        };
        assert_eq!(
            status_line(&s),
            "4/5 devices online, MQTT connected, backlog 0"
        );
        s.mqtt_connected = false;
        s.backlog = 12;
        s.stalled = vec!["bus rs485".into()];
        assert_eq!(
            status_line(&s),
            "4/5 devices online, MQTT disconnected, backlog 12, stalled: bus rs485"
        );
    }
}
