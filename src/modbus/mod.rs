//! Bus tasks: one task owns each serial port or TCP endpoint and serves every device on it.
//!
//! The task keeps a schedule of (device, poll group) jobs, each with its next due time. It sleeps
//! until the earliest job is due, reads that job's coalesced blocks one after the other, decodes
//! them and hands a [`Reading`] to the publisher. Requests from elsewhere (writes, one-shot reads)
//! arrive on the task's queue and are served before the next poll request, so they wait at most
//! for the transaction already on the wire.
//!
//! Time rules:
//! - No drift: the next due time is the previous due time plus the interval, not "now plus".
//!   A tick that passed while the bus was busy is skipped and counted, never queued up.
//! - A device that fails (timeout, transport or framing error) stops its cycle at the first
//!   failure, so it delays the other devices by at most one timeout; its polls are then spaced
//!   out (doubling back-off up to `backoff_max`) and it is reported offline after
//!   `offline_after` consecutive failed polls.
//! - A Modbus exception is an answer: the device is online, the points of that block are bad
//!   quality. A block answered with "illegal data address" is split and retried at once, and the
//!   gap between the halves is remembered so that later cycles plan around it.

pub mod conn;
pub mod precise;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::codec::{self, Raw};
use crate::model::{Bus, Device, RegisterKind};
use crate::plan::{self, BadRanges, Limits, ReadBlock, SplitOutcome};
pub use conn::{Connection, Data, RequestError, Write};

/// The decoded values of one poll of one device group.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Index into `Config::devices`.
    pub device: usize,
    /// Index into the device's poll groups.
    pub group: usize,
    /// Wall-clock time of the reading (published as `ts`).
    pub ts: SystemTime,
    /// Monotonic time the read completed (for latency figures).
    pub read_at: Instant,
    /// Point index → raw value, or the reason it is bad quality.
    pub values: Vec<(usize, Result<Raw, String>)>,
}

/// What a bus task tells the publisher.
#[derive(Debug, Clone)]
pub enum BusEvent {
    Reading(Reading),
    /// A device went online (first good answer) or offline (`offline_after` failures).
    Status {
        device: usize,
        online: bool,
        reason: String,
    },
    /// SunSpec discovery on a `sunspec: auto` device found a model chain other than the one
    /// its points came from (or the first one): the application restarts the bus with it.
    Discovered {
        device: usize,
        found: Arc<crate::sunspec::Discovered>,
    },
}

/// An operation asked of the bus by another task.
#[derive(Debug)]
pub enum Op {
    Read {
        kind: RegisterKind,
        start: u16,
        count: u16,
    },
    Write(Write),
    /// A command line for line device `device` (index into `Config::devices`) of a `lines`
    /// bus; with `reply`, the regex the answer line must match. Modbus buses refuse it.
    Line {
        device: usize,
        bytes: Vec<u8>,
        reply: Option<String>,
    },
    /// Poll the device with this unit id at once, off its schedule, without moving its grid
    /// (after a command, so that a per-device message carries the new value now). Answered
    /// when the poll is scheduled, not when it is done; a failing device is left alone.
    Refresh,
}

/// A request to the bus task; answered on `reply`.
#[derive(Debug)]
pub struct BusRequest {
    pub unit: u8,
    pub op: Op,
    pub timeout: Duration,
    /// Not to be sent after this (a command's expiry): checked when the bus takes it, right
    /// before the transaction, so a command that went stale in the queue never goes out.
    pub not_after: Option<tokio::time::Instant>,
    pub reply: oneshot::Sender<Result<Option<Data>, RequestError>>,
}

impl BusRequest {
    /// Past its `not_after`.
    pub fn is_stale(&self) -> bool {
        self.not_after
            .is_some_and(|t| tokio::time::Instant::now() > t)
    }
}

/// Counters of one bus, readable from any task.
#[derive(Debug, Default)]
pub struct BusStats {
    pub polls: AtomicU64,
    pub requests: AtomicU64,
    pub failed_polls: AtomicU64,
    pub skipped_ticks: AtomicU64,
    pub resets: AtomicU64,
    pub devices_online: AtomicU64,
    /// Every transaction on the wire (poll blocks, commands, reads asked by others).
    pub transactions: AtomicU64,
    /// Failed transactions by `observe::FailureKind`.
    pub failures: [AtomicU64; 4],
    /// Time spent in transactions (µs): its rate is the bus's busy fraction.
    pub busy_us: AtomicU64,
    pub transaction_time: crate::observe::TransactionTime,
    /// Line-device ports: bad lines by kind (`observe::BAD_LINE_KINDS`).
    pub bad_lines: [AtomicU64; 4],
    /// Per device, in the task's order.
    pub devices: Vec<crate::observe::DeviceStats>,
    /// Beaten on every turn of the task's loop and after every transaction (see `health`).
    pub heartbeat: crate::health::Heartbeat,
}

impl BusStats {
    /// The counters of a bus polling `devices`.
    pub fn for_devices(devices: &[(usize, Device)]) -> BusStats {
        BusStats {
            devices: devices
                .iter()
                .map(|(_, d)| crate::observe::DeviceStats::new(&d.name))
                .collect(),
            ..BusStats::default()
        }
    }

    /// One transaction that took `took`, and how it ended.
    pub fn transaction<T>(&self, took: Duration, result: &Result<T, RequestError>) {
        use crate::observe::FailureKind;
        Self::add(&self.transactions, 1);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        Self::add(&self.busy_us, us);
        self.transaction_time.0.record(took);
        let kind = match result {
            Ok(_) | Err(RequestError::Expired) => return,
            Err(RequestError::Timeout(_)) => FailureKind::Timeout,
            Err(RequestError::Exception(_)) => FailureKind::Exception,
            Err(RequestError::Protocol(_)) => FailureKind::Protocol,
            Err(RequestError::Transport(_) | RequestError::NotConnected(_)) => {
                FailureKind::Transport
            }
        };
        Self::add(&self.failures[kind as usize], 1);
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Handle to a running bus task.
#[derive(Clone, Debug)]
pub struct BusHandle {
    pub name: String,
    pub requests: mpsc::Sender<BusRequest>,
    pub stats: Arc<BusStats>,
}

/// Starts the task owning `bus`, polling `devices` (pairs of config index and device).
pub fn spawn(
    bus: &Bus,
    devices: Vec<(usize, Device)>,
    events: mpsc::Sender<BusEvent>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> BusHandle {
    let (tx, rx) = mpsc::channel(64);
    let stats = Arc::new(BusStats::for_devices(&devices));
    let task = BusTask::new(bus, devices, events, rx, stats.clone());
    tracker.spawn(task.run(cancel));
    BusHandle {
        name: bus.name.clone(),
        requests: tx,
        stats,
    }
}

struct DeviceState {
    index: usize,
    device: Device,
    limits: Limits,
    bad: BadRanges,
    /// Cached plan per poll group; cleared when `bad` changes.
    plans: Vec<Option<Vec<ReadBlock>>>,
    /// Points of each group.
    group_points: Vec<Vec<usize>>,
    failures: u32,
    /// `None` until the first poll settles it.
    online: Option<bool>,
    backoff_until: Option<Instant>,
    last_error: String,
    /// `sunspec: auto` devices: what their points came from and how they are read.
    sunspec: Option<SunSpecState>,
}

/// The SunSpec side of a `sunspec: auto` device on the bus.
struct SunSpecState {
    /// The discovery the device's points came from; `None`: discover on the next run.
    found: Option<Arc<crate::sunspec::Discovered>>,
    /// Per poll group: its SunSpec points (index into the device's points, layout) and the
    /// reads that cover them and their scale factors.
    groups: Vec<SunSpecGroup>,
    /// Discover again on the next run: at every start of the bus (a reload may have put
    /// another device behind the same name, host or unit) and when the device comes back
    /// from offline. Found as it was, the poll goes on in the same cycle.
    again: bool,
    /// A discovery went to the application, which restarts the bus with it: not again.
    sent: bool,
}

#[derive(Default)]
struct SunSpecGroup {
    points: Vec<(usize, crate::sunspec::Point)>,
    reads: Vec<(u16, u16)>,
}

impl SunSpecState {
    /// The device's points that are the discovered ones (same name, register and type: a
    /// point of the device's own that replaces one is read as an ordinary point).
    fn of(device: &Device) -> Option<SunSpecState> {
        let s = device.sunspec.as_ref()?;
        let mut groups: Vec<SunSpecGroup> = (0..device.groups.len())
            .map(|_| SunSpecGroup::default())
            .collect();
        if let Some(found) = &s.found {
            let (layout, _) = crate::sunspec::points(&found.discovery);
            for sp in layout {
                let mine = device.points.iter().position(|p| {
                    p.name == sp.name
                        && p.kind == RegisterKind::Holding
                        && p.address == sp.address
                        && p.data_type == crate::sunspec::data_type(sp.ty)
                });
                if let Some(i) = mine {
                    groups[device.points[i].group].points.push((i, sp));
                }
            }
            for g in &mut groups {
                g.reads = crate::sunspec::reads_for(
                    g.points.iter().map(|(_, sp)| sp),
                    device.max_gap,
                    device.max_registers,
                );
            }
        }
        Some(SunSpecState {
            found: s.found.clone(),
            groups,
            again: s.found.is_some(),
            sent: false,
        })
    }

    fn is_sunspec(&self, point: usize) -> bool {
        self.groups
            .iter()
            .any(|g| g.points.iter().any(|(i, _)| *i == point))
    }
}

/// Holding registers through the bus's connection for SunSpec discovery: queued requests are
/// served before each read, as between poll transactions; after a timeout or transport error
/// nothing more is sent (the walk ends there).
struct BusRegisters<'a> {
    task: &'a mut BusTask,
    slot: usize,
    failed: Option<RequestError>,
}

impl crate::sunspec::Registers for BusRegisters<'_> {
    async fn read(&mut self, start: u16, count: u16) -> Result<Vec<u16>, String> {
        if let Some(e) = &self.failed {
            return Err(e.to_string());
        }
        let result = self
            .task
            .transact(self.slot, RegisterKind::Holding, start, count)
            .await;
        match result {
            Ok(Data::Words(w)) if w.len() == usize::from(count) => Ok(w),
            Ok(_) => Err("short or bit answer".into()),
            Err(e) => {
                let shown = e.to_string();
                // "No such register" ends a walk (or moves to the next base); a busy device,
                // a gateway without a path, a timeout or a transport error fails the discovery,
                // which is then tried again with the device's back-off instead of taking a
                // chain cut short by chance for the device's own.
                if !no_such_register(&e) {
                    self.failed = Some(e);
                }
                Err(shown)
            }
        }
    }
}

/// An exception that says the registers asked for do not exist (or cannot be read so), as
/// opposed to one that says "not now".
fn no_such_register(e: &RequestError) -> bool {
    use tokio_modbus::ExceptionCode as E;
    matches!(
        e,
        RequestError::Exception(E::IllegalFunction | E::IllegalDataAddress | E::IllegalDataValue)
    )
}

struct Job {
    device: usize,
    group: usize,
    due: Instant,
    interval: Duration,
    /// Offset of this job's grid within its interval (see [`phase_of`]); applied after the
    /// first poll, which runs within the first second.
    phase: Option<Duration>,
}

struct BusTask {
    name: String,
    conn: Connection,
    devices: Vec<DeviceState>,
    jobs: Vec<Job>,
    events: mpsc::Sender<BusEvent>,
    requests: mpsc::Receiver<BusRequest>,
    /// False once every request sender is gone.
    requests_open: bool,
    stats: Arc<BusStats>,
}

impl BusTask {
    fn new(
        bus: &Bus,
        devices: Vec<(usize, Device)>,
        events: mpsc::Sender<BusEvent>,
        requests: mpsc::Receiver<BusRequest>,
        stats: Arc<BusStats>,
    ) -> Self {
        let now = Instant::now();
        let mut jobs = Vec::new();
        let devices: Vec<DeviceState> = devices
            .into_iter()
            .enumerate()
            .map(|(slot, (index, device))| {
                let sunspec = SunSpecState::of(&device);
                let mut group_points = vec![Vec::new(); device.groups.len()];
                for (p, point) in device.points.iter().enumerate() {
                    // SunSpec points are read by their own reads (`poll_sunspec`).
                    if !sunspec.as_ref().is_some_and(|s| s.is_sunspec(p)) {
                        group_points[point.group].push(p);
                    }
                }
                for (g, group) in device.groups.iter().enumerate() {
                    let sunspec_job = sunspec.as_ref().is_some_and(|s| {
                        // Group 0 always: it discovers (again), even when nothing was found.
                        !s.groups[g].points.is_empty() || g == 0
                    });
                    if !group_points[g].is_empty() || sunspec_job {
                        let name = format!("{}/{}", device.name, group.name);
                        // The first polls are spread too, over at most a second: a start
                        // must not send every device's first request (and publish) at once.
                        let first = phase_of(&name, group.interval.min(Duration::from_secs(1)));
                        jobs.push(Job {
                            device: slot,
                            group: g,
                            due: now + first,
                            interval: group.interval,
                            phase: Some(phase_of(&name, group.interval)),
                        });
                    }
                }
                DeviceState {
                    index,
                    limits: Limits::of(&device),
                    bad: BadRanges::default(),
                    plans: vec![None; device.groups.len()],
                    group_points,
                    failures: 0,
                    online: None,
                    backoff_until: None,
                    last_error: String::new(),
                    sunspec,
                    device,
                }
            })
            .collect();
        BusTask {
            name: bus.name.clone(),
            conn: Connection::new(
                bus.kind.clone(),
                bus.frame_gap,
                bus.connect_delay,
                bus.reconnect_max,
            ),
            devices,
            jobs,
            events,
            requests,
            requests_open: true,
            stats,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        tracing::info!(bus = %self.name, endpoint = %self.conn.endpoint(), devices = self.devices.len(), "bus started");
        let stall = test_stall_hook(&self.name);
        loop {
            self.stats.heartbeat.beat();
            if stall && BusStats::get(&self.stats.polls) > 0 {
                // Test hook (debug builds only): a poll loop stuck in an await.
                cancel.cancelled().await;
                break;
            }
            let next = self
                .jobs
                .iter()
                .enumerate()
                .min_by_key(|(_, j)| j.due)
                .map(|(i, j)| (i, j.due));
            // A bus with no jobs still serves requests.
            let (job, due) = match next {
                Some((i, due)) => (Some(i), due),
                None => (None, Instant::now() + Duration::from_secs(3600)),
            };
            // Nothing but the next poll, a request (`serve` beats first) or the stop is awaited
            // here: the task is idle until `due` and need not wake before it to beat (a Pi in a
            // cabinet sleeps between polls). The poll itself beats after every transaction.
            self.stats.heartbeat.idle_until(due);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                request = self.requests.recv(), if self.requests_open => match request {
                    Some(request) => self.serve(request).await,
                    // Every handle dropped: keep polling until cancelled, without this branch
                    // (a closed channel is always ready and would starve the polls).
                    None => self.requests_open = false,
                },
                _ = tokio::time::sleep_until(due.into()), if job.is_some() => {
                    let job = job.expect("guarded");
                    if self.run_job(job, &cancel).await.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::info!(bus = %self.name, "bus stopped");
    }

    /// Serves an outside request at once (it has priority over polls).
    async fn serve(&mut self, request: BusRequest) {
        BusStats::add(&self.stats.requests, 1);
        self.stats.heartbeat.beat();
        if request.is_stale() {
            let _ = request.reply.send(Err(RequestError::Expired));
            return;
        }
        let started = Instant::now();
        let result = match &request.op {
            Op::Read { kind, start, count } => self
                .conn
                .read(request.unit, *kind, *start, *count, request.timeout)
                .await
                .map(Some),
            Op::Write(write) => self
                .conn
                .write(request.unit, write, request.timeout)
                .await
                .map(|()| None),
            Op::Line { .. } => Err(RequestError::Protocol(
                "a Modbus bus takes no line commands".into(),
            )),
            Op::Refresh => {
                self.refresh(request.unit);
                Ok(None)
            }
        };
        if matches!(request.op, Op::Read { .. } | Op::Write(_)) {
            self.stats.transaction(started.elapsed(), &result);
        }
        // The asker may have given up; nothing to do then.
        let _ = request.reply.send(result);
    }

    /// Makes every job of the (healthy) device with `unit` due now. Its grid stays: the job is
    /// set one interval back, so that after this run `next_due` lands on the tick it had.
    fn refresh(&mut self, unit: u8) {
        let now = Instant::now();
        for (slot, state) in self.devices.iter().enumerate() {
            if state.device.unit != unit || state.failures > 0 {
                continue;
            }
            for j in self.jobs.iter_mut().filter(|j| j.device == slot) {
                // Before the first poll (phase pending) the job runs within a second anyway.
                if j.phase.is_none() && j.due > now {
                    j.due = j.due.checked_sub(j.interval).unwrap_or(now).min(now);
                }
            }
        }
    }

    /// Serves whatever requests are already queued (between two poll transactions).
    async fn serve_queued(&mut self) {
        while let Ok(request) = self.requests.try_recv() {
            self.serve(request).await;
        }
    }

    /// Polls one group of one device. `Err` only when the publisher is gone (shutting down).
    async fn run_job(&mut self, job: usize, cancel: &CancellationToken) -> Result<(), ()> {
        let (slot, group, due, interval) = {
            let j = &self.jobs[job];
            (j.device, j.group, j.due, j.interval)
        };
        BusStats::add(&self.stats.polls, 1);
        let started = Instant::now();
        let outcome = self.poll_group(slot, group, cancel).await;
        let now = Instant::now();
        let took = now - started;

        let mut events = Vec::new();
        let state = &mut self.devices[slot];
        match outcome {
            Ok(values) => {
                if state.failures > 0 && state.online == Some(true) {
                    tracing::info!(device = %state.device.name, failures = state.failures, "device answering again");
                }
                state.failures = 0;
                state.backoff_until = None;
                if let Some(s) = self.stats.devices.get(slot) {
                    s.good(took);
                }
                if state.online == Some(false) {
                    // Back from offline: its firmware (and model chain) may be another now.
                    if let Some(s) = state.sunspec.as_mut().filter(|s| s.found.is_some()) {
                        s.again = true;
                    }
                }
                if state.online != Some(true) {
                    state.online = Some(true);
                    BusStats::add(&self.stats.devices_online, 1);
                    tracing::info!(device = %state.device.name, bus = %self.name, unit = state.device.unit, "device online");
                    events.push(BusEvent::Status {
                        device: state.index,
                        online: true,
                        reason: String::new(),
                    });
                }
                if !values.is_empty() {
                    events.push(BusEvent::Reading(Reading {
                        device: state.index,
                        group,
                        ts: SystemTime::now(),
                        read_at: now,
                        values,
                    }));
                }
            }
            Err(error) => {
                BusStats::add(&self.stats.failed_polls, 1);
                state.failures = state.failures.saturating_add(1);
                state.last_error = error.to_string();
                // The first failure of an episode is worth a line; the rest are counted.
                if state.failures == 1 {
                    tracing::warn!(device = %state.device.name, bus = %self.name, unit = state.device.unit, error = %error, "poll failed");
                } else {
                    tracing::debug!(device = %state.device.name, failures = state.failures, error = %error, "poll failed again");
                }
                let backoff = backoff(interval, state.failures, state.device.backoff_max);
                state.backoff_until = Some(now + backoff);
                if let Some(s) = self.stats.devices.get(slot) {
                    let offline = state.failures >= state.device.offline_after;
                    s.failed(took, &state.last_error, backoff, offline);
                }
                if state.failures >= state.device.offline_after && state.online != Some(false) {
                    if state.online == Some(true) {
                        self.stats.devices_online.fetch_sub(1, Ordering::Relaxed);
                    }
                    state.online = Some(false);
                    tracing::warn!(device = %state.device.name, bus = %self.name, failures = state.failures, error = %error, "device offline");
                    events.push(BusEvent::Status {
                        device: state.index,
                        online: false,
                        reason: error.reason(),
                    });
                }
            }
        }
        self.stats.resets.store(self.conn.resets, Ordering::Relaxed);

        // Schedule the next run of every job of this device.
        let backoff_until = self.devices[slot].backoff_until;
        let j = &mut self.jobs[job];
        let (next, skipped) = match j.phase.take() {
            // First poll done: move onto this job's own grid, without counting a skip.
            Some(phase) if due + phase > now => (due + phase, 0),
            Some(phase) => (next_due(due + phase, interval, now).0, 0),
            None => next_due(due, interval, now),
        };
        j.due = next;
        BusStats::add(&self.stats.skipped_ticks, skipped);
        if let Some(until) = backoff_until {
            for j in self.jobs.iter_mut().filter(|j| j.device == slot) {
                if j.due < until {
                    j.due = until;
                }
            }
        }

        for event in events {
            if self.events.send(event).await.is_err() {
                return Err(());
            }
        }
        Ok(())
    }

    /// Reads every block of a group. `Err` on the first transport-level failure.
    async fn poll_group(
        &mut self,
        slot: usize,
        group: usize,
        cancel: &CancellationToken,
    ) -> Result<Vec<(usize, Result<Raw, String>)>, RequestError> {
        if let Some(s) = &self.devices[slot].sunspec {
            if (s.found.is_none() || s.again) && group == 0 {
                if s.found.is_none() && s.sent {
                    // Handed over: the bus is restarted with the discovered points, normally
                    // before this poll. Still here, the configuration refused them (logged):
                    // nothing is read, and the device is not to look online.
                    return Err(RequestError::Protocol(
                        "the SunSpec points found were not applied (see the log)".into(),
                    ));
                }
                self.discover(slot).await?;
                // Found again as it was: this cycle's readings are not left out.
                let same = self.devices[slot]
                    .sunspec
                    .as_ref()
                    .is_some_and(|s| s.found.is_some() && !s.sent);
                if !same {
                    return Ok(Vec::new());
                }
            }
        }
        let mut values = self.poll_blocks(slot, group, cancel).await?;
        self.poll_sunspec(slot, group, &mut values).await?;
        Ok(values)
    }

    /// SunSpec discovery on a `sunspec: auto` device; a chain other than the one its points
    /// came from goes to the application. `Err` when the device gave no chain (no answer, or
    /// no marker).
    async fn discover(&mut self, slot: usize) -> Result<(), RequestError> {
        let mut src = BusRegisters {
            task: self,
            slot,
            failed: None,
        };
        let outcome = crate::sunspec::discover_device(&mut src).await;
        if let Some(failed) = src.failed.take() {
            return Err(failed);
        }
        let found = outcome.map_err(RequestError::Protocol)?;
        let state = &mut self.devices[slot];
        let Some(s) = state.sunspec.as_mut() else {
            return Ok(());
        };
        s.again = false;
        if let Some(why) = &found.discovery.stopped {
            tracing::warn!(device = %state.device.name, reason = %why, "SunSpec model chain cut short; the models before the cut are read");
        }
        if s.found.as_deref() == Some(&found) {
            tracing::debug!(device = %state.device.name, "SunSpec models unchanged");
            return Ok(());
        }
        if s.sent {
            return Ok(());
        }
        s.sent = true;
        tracing::info!(
            device = %state.device.name,
            bus = %self.name,
            base = found.discovery.base,
            models = %crate::sunspec::chain_line(&found.discovery),
            manufacturer = %found.manufacturer,
            model = %found.model,
            "SunSpec device discovered"
        );
        let event = BusEvent::Discovered {
            device: state.index,
            found: Arc::new(found),
        };
        // A closed channel means shutting down: nothing to hand over then.
        let _ = self.events.send(event).await;
        Ok(())
    }

    /// Reads the SunSpec points of a group (whole reads, the scale factors among them, so a
    /// value and its scale factor come from the same cycle) and decodes them.
    async fn poll_sunspec(
        &mut self,
        slot: usize,
        group: usize,
        values: &mut Vec<(usize, Result<Raw, String>)>,
    ) -> Result<(), RequestError> {
        let reads = match &self.devices[slot].sunspec {
            Some(s) if !s.groups[group].points.is_empty() => s.groups[group].reads.len(),
            _ => return Ok(()),
        };
        // (start, words) of each read answered; (start, count, reason) of each refused.
        let mut image: Vec<(u16, Vec<u16>)> = Vec::with_capacity(reads);
        let mut refused: Vec<(u16, u16, String)> = Vec::new();
        for k in 0..reads {
            let (start, count) = match &self.devices[slot].sunspec {
                Some(s) => s.groups[group].reads[k],
                None => break,
            };
            match self
                .transact(slot, RegisterKind::Holding, start, count)
                .await
            {
                Ok(Data::Words(w)) if w.len() == usize::from(count) => image.push((start, w)),
                Ok(_) => refused.push((start, count, "decode: short answer".into())),
                Err(e @ RequestError::Exception(_)) => refused.push((start, count, e.reason())),
                Err(other) => return Err(other),
            }
        }
        let reg = |a: u16| {
            image.iter().find_map(|(s, w)| {
                a.checked_sub(*s)
                    .and_then(|o| w.get(usize::from(o)))
                    .copied()
            })
        };
        let why_not = |a: u16| {
            refused
                .iter()
                .find(|(s, c, _)| a >= *s && u32::from(a) < u32::from(*s) + u32::from(*c))
                .map(|(_, _, r)| r.clone())
        };
        let s = self.devices[slot].sunspec.as_ref().expect("checked above");
        for (i, sp) in &s.groups[group].points {
            let sf = match sp.sf {
                Some(crate::sunspec::Sf::Register(r)) => Some(r),
                _ => None,
            };
            let refusal = (0..sp.ty.width())
                .map(|k| sp.address.wrapping_add(k))
                .chain(sf)
                .find_map(why_not);
            values.push((
                *i,
                match refusal {
                    Some(reason) => Err(reason),
                    None => crate::sunspec::decode_raw(sp, reg),
                },
            ));
        }
        Ok(())
    }

    /// One read of a poll (blocks, SunSpec reads, discovery) of `slot`'s device: the queued
    /// requests first (commands and one-shot reads go between transactions), then the read,
    /// counted, with a heartbeat; a failure of the link itself updates the reset count.
    async fn transact(
        &mut self,
        slot: usize,
        kind: RegisterKind,
        start: u16,
        count: u16,
    ) -> Result<Data, RequestError> {
        self.serve_queued().await;
        let (unit, timeout) = {
            let d = &self.devices[slot].device;
            (d.unit, d.timeout)
        };
        let started = Instant::now();
        let result = self.conn.read(unit, kind, start, count, timeout).await;
        self.stats.transaction(started.elapsed(), &result);
        self.stats.heartbeat.beat();
        if matches!(&result, Err(e) if !e.is_exception()) {
            self.stats.resets.store(self.conn.resets, Ordering::Relaxed);
        }
        result
    }

    /// Reads the planned blocks of a group. `Err` on the first transport-level failure.
    async fn poll_blocks(
        &mut self,
        slot: usize,
        group: usize,
        cancel: &CancellationToken,
    ) -> Result<Vec<(usize, Result<Raw, String>)>, RequestError> {
        let (blocks, wanted) = {
            let state = &mut self.devices[slot];
            if state.plans[group].is_none() {
                state.plans[group] = Some(plan::plan(
                    &state.device.points,
                    &state.group_points[group],
                    state.limits,
                    &state.bad,
                ));
            }
            let blocks = state.plans[group].clone().expect("planned above");
            (blocks, state.group_points[group].len())
        };
        let mut values = Vec::with_capacity(wanted);
        // Blocks still to read; split halves are pushed back to the front.
        let mut stack: Vec<ReadBlock> = blocks.into_iter().rev().collect();
        let mut bad_changed = false;
        let mut guard = 0u32;
        while let Some(block) = stack.pop() {
            guard += 1;
            if guard > 10_000 || cancel.is_cancelled() {
                break;
            }
            let result = self
                .transact(slot, block.kind, block.start, block.count)
                .await;
            let state = &mut self.devices[slot];
            let points = &state.device.points;
            match result {
                Ok(data) => decode_block(points, &block, &data, &mut values),
                Err(RequestError::Exception(e)) => {
                    let illegal = e == tokio_modbus::ExceptionCode::IllegalDataAddress;
                    match (illegal, plan::split(&block, points)) {
                        (true, SplitOutcome::Halves(a, b)) => {
                            if let Some((from, to)) = plan::gap_between(&a, &b) {
                                state.bad.remember(block.kind, from, to);
                                bad_changed = true;
                            }
                            tracing::debug!(device = %state.device.name, start = block.start, count = block.count, "illegal data address: splitting block");
                            stack.push(b);
                            stack.push(a);
                        }
                        (is_illegal, _) => {
                            if is_illegal {
                                state.bad.remember(
                                    block.kind,
                                    block.start,
                                    block.start + (block.count - 1),
                                );
                                bad_changed = true;
                            }
                            let reason = RequestError::Exception(e).reason();
                            tracing::debug!(device = %state.device.name, start = block.start, count = block.count, %reason, "points bad quality");
                            for &p in &block.points {
                                values.push((p, Err(reason.clone())));
                            }
                        }
                    }
                }
                Err(other) => return Err(other),
            }
        }
        if bad_changed {
            let state = &mut self.devices[slot];
            state.plans.iter_mut().for_each(|p| *p = None);
        }
        Ok(values)
    }
}

/// `FIELDBRIDGE_TEST_STALL_BUS=<bus name>` makes that bus task stop beating its heartbeat after
/// its first poll, as if stuck in an await without a timeout (every real await in the task is
/// bounded, so the watchdog test needs this). Compiled into debug builds only.
fn test_stall_hook(bus: &str) -> bool {
    cfg!(debug_assertions)
        && std::env::var("FIELDBRIDGE_TEST_STALL_BUS").is_ok_and(|name| name == bus)
}

/// Decodes every point of a block from its data.
fn decode_block(
    points: &[crate::model::Point],
    block: &ReadBlock,
    data: &Data,
    out: &mut Vec<(usize, Result<Raw, String>)>,
) {
    for &p in &block.points {
        let point = &points[p];
        let offset = usize::from(point.address - block.start);
        let width = usize::from(point.width());
        let value = match data {
            Data::Words(words) => match words.get(offset..offset + width) {
                Some(regs) => codec::decode(point.data_type, point.order, regs)
                    .map_err(|e| format!("decode: {e}")),
                None => Err("decode: short answer".to_string()),
            },
            Data::Bits(bits) => match bits.get(offset..offset + 1) {
                Some(b) => Ok(codec::decode_bits(b)),
                None => Err("decode: short answer".to_string()),
            },
        };
        out.push((p, value));
    }
}

/// Next due time after a run that was due at `due` and finished at `now`, and how many ticks
/// were skipped because they passed while the bus was busy.
pub fn next_due(due: Instant, interval: Duration, now: Instant) -> (Instant, u64) {
    let next = due + interval;
    if next > now {
        return (next, 0);
    }
    let behind = now.duration_since(next);
    let missed = (behind.as_nanos() / interval.as_nanos().max(1)) as u64 + 1;
    let skip = u32::try_from(missed).unwrap_or(u32::MAX);
    (next + interval * skip, missed)
}

/// Where in its interval a poll job runs: a stable offset from the job's name (FNV-1a), so
/// that devices with the same interval do not all poll, and publish, at the same instant.
/// A burst of simultaneous publishes costs latency (the broker's Nagle holds back all but the
/// first PUBACK until our delayed ACK, ~40 ms) and loads the bus and the CPU in spikes.
pub fn phase_of(name: &str, interval: Duration) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let nanos = interval.as_nanos().max(1);
    Duration::from_nanos((u128::from(h) % nanos) as u64)
}

/// Spacing of a failing device's polls: the interval doubled per consecutive failure, capped.
pub fn backoff(interval: Duration, failures: u32, cap: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    interval.saturating_mul(factor).min(cap.max(interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_due_keeps_the_grid_without_drift() {
        let t0 = Instant::now();
        let i = Duration::from_millis(100);
        let (next, skipped) = next_due(t0, i, t0 + Duration::from_millis(30));
        assert_eq!(next, t0 + i);
        assert_eq!(skipped, 0);
    }

    #[test]
    fn ticks_missed_while_busy_are_skipped_and_counted() {
        let t0 = Instant::now();
        let i = Duration::from_millis(100);
        // The run took 350 ms: ticks at 100, 200, 300 passed.
        let (next, skipped) = next_due(t0, i, t0 + Duration::from_millis(350));
        assert_eq!(next, t0 + Duration::from_millis(400));
        assert_eq!(skipped, 3);
        // Exactly on a tick: that tick is missed too.
        let (next, skipped) = next_due(t0, i, t0 + Duration::from_millis(100));
        assert_eq!(next, t0 + Duration::from_millis(200));
        assert_eq!(skipped, 1);
    }

    #[test]
    fn the_late_reply_guard_is_the_timeout_within_bounds() {
        use conn::late_reply_guard;
        let gap = Duration::from_micros(1750);
        assert_eq!(
            late_reply_guard(gap, Duration::from_millis(300)),
            Duration::from_millis(300)
        );
        assert_eq!(
            late_reply_guard(gap, Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(
            late_reply_guard(Duration::from_millis(40), Duration::from_millis(20)),
            Duration::from_millis(80)
        );
    }

    #[test]
    fn phases_are_stable_within_the_interval_and_spread() {
        let i = Duration::from_secs(1);
        let phases: Vec<Duration> = (0..10)
            .map(|n| phase_of(&format!("meter-{n}/default"), i))
            .collect();
        assert!(phases.iter().all(|p| *p < i));
        assert_eq!(
            phase_of("meter-0/default", i),
            phases[0],
            "stable across runs"
        );
        let mut sorted = phases.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 10, "distinct: {phases:?}");
        assert_eq!(phase_of("x", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap() {
        let i = Duration::from_secs(1);
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(i, 1, cap), Duration::from_secs(1));
        assert_eq!(backoff(i, 2, cap), Duration::from_secs(2));
        assert_eq!(backoff(i, 4, cap), Duration::from_secs(8));
        assert_eq!(backoff(i, 10, cap), cap);
        assert_eq!(backoff(i, u32::MAX, cap), cap);
        // A cap below the interval never makes polls faster than the interval.
        assert_eq!(backoff(i, 3, Duration::from_millis(10)), i);
    }
}
