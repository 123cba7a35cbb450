//! The task owning one `lines` bus: a serial port shared by devices that print lines.
//!
//! One loop, no nested waits, so that the heartbeat, cancellation and the port are always
//! attended to:
//! - Bytes read are cut into lines ([`Splitter`]). A line is, in this order: the reply awaited
//!   by a command; the answer of the device being polled (if it parses for that device); a
//!   reading of every streaming device it parses for; else counted as unmatched. A line that
//!   fits nothing never disturbs the next one.
//! - At most one transaction is on the line at a time (a poll waiting for its answer, or a
//!   command waiting for its reply), as RS-485 needs. Commands queued on the handle go before
//!   the next poll; polled devices are served in due order on the no-drift grid of
//!   [`crate::modbus::next_due`], a failing one backed off like a Modbus slave.
//! - Offline: a polled device after `offline_after` unanswered queries; a streaming device
//!   after `offline_after` consecutive `timeout`s without a line it parses.
//! - The port is reopened with a doubling back-off (100 ms up to `reconnect_max`) when a read
//!   or write fails or the device disappears (USB adapter unplugged: EIO, then ENOENT until
//!   it is back).
//! - Bad lines (too long, invalid UTF-8, wrong checksum, unmatched) are counted; the first of
//!   each kind is logged with the line, then a summary at most once a minute.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use regex_lite::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::parse::{self, BadKind, BadLines, DeviceParser, Framed, Parser, Splitter};
use crate::modbus::{
    backoff, next_due, BusEvent, BusHandle, BusRequest, BusStats, Data, Op, Reading, RequestError,
};
use crate::model::{Bus, BusKind, Device, LineBus, LineMode};

const SUMMARY_EVERY: Duration = Duration::from_secs(60);
const REOPEN_MIN: Duration = Duration::from_millis(100);

/// Starts the task owning `bus` (which must be a `lines` bus).
pub fn spawn(
    bus: &Bus,
    devices: Vec<(usize, Device)>,
    events: mpsc::Sender<BusEvent>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> BusHandle {
    let (tx, rx) = mpsc::channel(64);
    let stats = Arc::new(BusStats::for_devices(&devices));
    let task = LineTask::new(bus, devices, events, rx, stats.clone());
    tracker.spawn(task.run(cancel));
    BusHandle {
        name: bus.name.clone(),
        requests: tx,
        stats,
    }
}

struct Dev {
    /// Index into `Config::devices`.
    index: usize,
    device: Device,
    parser: Option<DeviceParser>,
    /// `Some` for polled devices.
    query: Option<Vec<u8>>,
    interval: Duration,
    /// Polled: next query. Streaming: end of the current silence window.
    due: Instant,
    failures: u32,
    online: Option<bool>,
}

enum Pending {
    Poll {
        slot: usize,
        due: Instant,
        deadline: Instant,
    },
    Reply {
        slot: usize,
        reply: Regex,
        deadline: Instant,
        timeout: Duration,
        tx: oneshot::Sender<Result<Option<Data>, RequestError>>,
    },
}

impl Pending {
    fn deadline(&self) -> Instant {
        match self {
            Pending::Poll { deadline, .. } | Pending::Reply { deadline, .. } => *deadline,
        }
    }
}

struct LineTask {
    name: String,
    bus: LineBus,
    connect_delay: Duration,
    reconnect_max: Duration,
    port: Option<tokio_serial::SerialStream>,
    reopen_at: Instant,
    reopen_backoff: Duration,
    open_failures: u32,
    splitter: Splitter,
    bad: BadLines,
    devs: Vec<Dev>,
    pending: Option<Pending>,
    events: mpsc::Sender<BusEvent>,
    requests: mpsc::Receiver<BusRequest>,
    requests_open: bool,
    stats: Arc<BusStats>,
}

/// The publisher is gone (shutting down): stop.
struct Stop;

impl LineTask {
    fn new(
        bus: &Bus,
        devices: Vec<(usize, Device)>,
        events: mpsc::Sender<BusEvent>,
        requests: mpsc::Receiver<BusRequest>,
        stats: Arc<BusStats>,
    ) -> Self {
        let line_bus = match &bus.kind {
            BusKind::Lines(l) => l.clone(),
            other => unreachable!("lines task started for {other:?}"),
        };
        let now = Instant::now();
        let devs = devices
            .into_iter()
            .map(|(index, device)| {
                let ld = device.line.as_ref();
                let parser = ld.and_then(|ld| match Parser::new(&ld.parser) {
                    Ok(p) => Some(DeviceParser {
                        parser: p,
                        checksum: ld.checksum,
                    }),
                    Err(e) => {
                        tracing::error!(device = %device.name, error = %e, "line parser does not compile; device ignored");
                        None
                    }
                });
                let query = ld.and_then(|ld| match &ld.mode {
                    LineMode::Poll { query } => Some(query.clone()),
                    LineMode::Stream => None,
                });
                let interval = device.groups[0].interval;
                let due = if query.is_some() {
                    now
                } else {
                    now + device.timeout
                };
                Dev {
                    index,
                    parser,
                    query,
                    interval,
                    due,
                    failures: 0,
                    online: None,
                    device,
                }
            })
            .collect();
        LineTask {
            name: bus.name.clone(),
            splitter: Splitter::new(&line_bus.line_end, line_bus.max_line),
            bus: line_bus,
            connect_delay: bus.connect_delay,
            reconnect_max: bus.reconnect_max,
            port: None,
            reopen_at: now,
            reopen_backoff: REOPEN_MIN.min(bus.reconnect_max),
            open_failures: 0,
            bad: BadLines::new(SUMMARY_EVERY, now),
            devs,
            pending: None,
            events,
            requests,
            requests_open: true,
            stats,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        tracing::info!(bus = %self.name, port = %self.bus.serial.port, devices = self.devs.len(), "line bus started");
        let mut buf = vec![0u8; 4096];
        loop {
            self.stats.heartbeat.beat();
            if self.turn().await.is_err() {
                break;
            }
            let wake = self.next_wake();
            let idle = self.pending.is_none() && self.requests_open;
            let reading = self.port.is_some();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                read = read_some(self.port.as_mut(), &mut buf), if reading => match read {
                    Ok(0) => self.port_lost("the port hung up (end of file)".into()).await,
                    Ok(n) => {
                        let framed = self.splitter.push(&buf[..n]);
                        if self.on_framed(framed).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => self.port_lost(e.to_string()).await,
                },
                request = self.requests.recv(), if idle => match request {
                    Some(request) => self.start_request(request).await,
                    // Every handle dropped: keep reading until cancelled.
                    None => self.requests_open = false,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        if let Some(Pending::Reply { tx, .. }) = self.pending.take() {
            let _ = tx.send(Err(RequestError::NotConnected("shutting down".into())));
        }
        tracing::info!(
            bus = %self.name,
            too_long = self.bad.total(&BadKind::TooLong),
            invalid_utf8 = self.bad.total(&BadKind::InvalidUtf8),
            checksum = self.bad.total(&BadKind::Checksum),
            unmatched = self.bad.total(&BadKind::Unmatched),
            "line bus stopped"
        );
    }

    /// Everything that is due now: reopen, timeouts, silence, the next command or poll.
    async fn turn(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if self.port.is_none() && now >= self.reopen_at {
            self.open().await;
        }
        if let Some(summary) = self.bad.summary(now) {
            tracing::warn!(bus = %self.name, counts = %summary, "bad lines in the last minute");
        }
        if self.pending.as_ref().is_some_and(|p| now >= p.deadline()) {
            match self.pending.take() {
                Some(Pending::Poll { slot, due, .. }) => {
                    let timeout = self.devs[slot].device.timeout;
                    self.poll_failed(slot, due, RequestError::Timeout(timeout))
                        .await?;
                }
                Some(Pending::Reply { tx, timeout, .. }) => {
                    let _ = tx.send(Err(RequestError::Timeout(timeout)));
                }
                None => {}
            }
        }
        self.stream_silence(now).await?;
        if self.pending.is_none() && self.requests_open {
            if let Ok(request) = self.requests.try_recv() {
                self.start_request(request).await;
            }
        }
        if self.pending.is_none() {
            self.start_due_poll(now).await?;
        }
        Ok(())
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + crate::health::TICK;
        if let Some(p) = &self.pending {
            wake = wake.min(p.deadline());
        }
        for d in &self.devs {
            // Polls wait for the transaction on the line; silence windows run regardless.
            if d.query.is_none() || self.pending.is_none() {
                wake = wake.min(d.due);
            }
        }
        if self.port.is_none() {
            wake = wake.min(self.reopen_at);
        }
        wake.max(now)
    }

    async fn open(&mut self) {
        let serial = self.bus.serial.clone();
        match crate::modbus::conn::open_serial(&serial) {
            Ok(port) => {
                if !self.connect_delay.is_zero() {
                    tokio::time::sleep(self.connect_delay).await;
                }
                if self.open_failures > 0 {
                    tracing::info!(bus = %self.name, port = %serial.port, failures = self.open_failures, "line port reopened");
                } else {
                    tracing::info!(bus = %self.name, port = %serial.port, "line port opened");
                }
                self.port = Some(port);
                self.splitter.clear();
                self.open_failures = 0;
                self.reopen_backoff = REOPEN_MIN.min(self.reconnect_max);
            }
            Err(e) => {
                self.open_failures += 1;
                if self.open_failures == 1 {
                    tracing::warn!(bus = %self.name, port = %serial.port, error = %e, "cannot open line port; retrying with back-off");
                } else {
                    tracing::debug!(bus = %self.name, port = %serial.port, error = %e, failures = self.open_failures, "cannot open line port");
                }
                self.reopen_at = Instant::now() + self.reopen_backoff;
                self.reopen_backoff = (self.reopen_backoff * 2).min(self.reconnect_max);
                self.stats.resets.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The port failed: drop it (the next turn reopens it after the back-off).
    async fn port_lost(&mut self, error: String) {
        if self.port.take().is_some() {
            tracing::warn!(bus = %self.name, port = %self.bus.serial.port, error = %error, "line port lost; reopening with back-off");
        }
        self.splitter.clear();
        self.reopen_at = Instant::now() + self.reopen_backoff;
        self.reopen_backoff = (self.reopen_backoff * 2).min(self.reconnect_max);
        self.open_failures = self.open_failures.max(1);
        if let Some(Pending::Reply { tx, .. }) = self.pending.take() {
            let _ = tx.send(Err(RequestError::Transport(error)));
        }
        // A pending poll stays pending and times out: a miss like any other.
    }

    async fn write(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), RequestError> {
        let Some(port) = self.port.as_mut() else {
            return Err(RequestError::NotConnected(format!(
                "{} is not open",
                self.bus.serial.port
            )));
        };
        let written = tokio::time::timeout(timeout.max(Duration::from_millis(100)), async {
            port.write_all(bytes).await?;
            port.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let e = e.to_string();
                self.port_lost(e.clone()).await;
                Err(RequestError::Transport(e))
            }
            Err(_) => Err(RequestError::Timeout(timeout)),
        }
    }

    /// A command from the router: write its line, then wait for the reply if one is expected.
    async fn start_request(&mut self, request: BusRequest) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if request.is_stale() {
            let _ = request.reply.send(Err(RequestError::Expired));
            return;
        }
        let BusRequest {
            op, timeout, reply, ..
        } = request;
        if matches!(op, Op::Refresh) {
            // Line devices publish what they print; a polled one keeps its schedule.
            let _ = reply.send(Ok(None));
            return;
        }
        let Op::Line {
            device,
            bytes,
            reply: expected,
        } = op
        else {
            let _ = reply.send(Err(RequestError::Protocol(
                "a lines bus takes line commands only".into(),
            )));
            return;
        };
        let Some(slot) = self.devs.iter().position(|d| d.index == device) else {
            let _ = reply.send(Err(RequestError::Protocol(format!(
                "device {device} is not on this bus"
            ))));
            return;
        };
        let pattern = match expected.as_deref().map(Regex::new).transpose() {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(RequestError::Protocol(format!("reply pattern: {e}"))));
                return;
            }
        };
        tracing::debug!(bus = %self.name, device = %self.devs[slot].device.name, line = %parse::preview(&bytes, 120), "line command");
        if let Err(e) = self.write(&bytes, timeout).await {
            let _ = reply.send(Err(e));
            return;
        }
        match pattern {
            None => {
                let _ = reply.send(Ok(None));
            }
            Some(reply_re) => {
                self.pending = Some(Pending::Reply {
                    slot,
                    reply: reply_re,
                    deadline: Instant::now() + timeout,
                    timeout,
                    tx: reply,
                });
            }
        }
    }

    async fn start_due_poll(&mut self, now: Instant) -> Result<(), Stop> {
        let next = self
            .devs
            .iter()
            .enumerate()
            .filter(|(_, d)| d.query.is_some() && d.parser.is_some() && d.due <= now)
            .min_by_key(|(_, d)| d.due)
            .map(|(i, _)| i);
        let Some(slot) = next else { return Ok(()) };
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        let due = self.devs[slot].due;
        let timeout = self.devs[slot].device.timeout;
        let query = self.devs[slot].query.clone().unwrap_or_default();
        match self.write(&query, timeout).await {
            Ok(()) => {
                self.pending = Some(Pending::Poll {
                    slot,
                    due,
                    deadline: Instant::now() + timeout,
                });
                Ok(())
            }
            Err(e) => self.poll_failed(slot, due, e).await,
        }
    }

    async fn on_framed(&mut self, framed: Vec<Framed>) -> Result<(), Stop> {
        for f in framed {
            match f {
                Framed::TooLong(len) => {
                    self.bad_line(
                        BadKind::TooLong,
                        &format!(
                            "{len} bytes without a line end (max_line {})",
                            self.bus.max_line
                        ),
                        b"",
                    );
                }
                Framed::Line(bytes) => self.on_line(&bytes).await?,
            }
        }
        Ok(())
    }

    fn bad_line(&mut self, kind: BadKind, reason: &str, line: &[u8]) {
        let i = match kind {
            BadKind::TooLong => 0,
            BadKind::InvalidUtf8 => 1,
            BadKind::Checksum => 2,
            BadKind::Unmatched => 3,
        };
        self.stats.bad_lines[i].fetch_add(1, Ordering::Relaxed);
        if self.bad.note(kind.clone()) {
            tracing::warn!(
                bus = %self.name, kind = kind.name(), reason = %reason, line = %parse::preview(line, 120),
                "bad line (further ones are counted and summarised every minute)"
            );
        } else {
            tracing::debug!(bus = %self.name, kind = kind.name(), reason = %reason, line = %parse::preview(line, 120), "bad line");
        }
    }

    async fn on_line(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.stats.heartbeat.beat();
        let line = match parse::decode(bytes, self.bus.encoding) {
            Ok(l) => l,
            Err(e) => {
                self.bad_line(BadKind::InvalidUtf8, &e, bytes);
                return Ok(());
            }
        };
        // 1. The reply a command waits for.
        if let Some(Pending::Reply { slot, reply, .. }) = &self.pending {
            let slot = *slot;
            if reply.is_match(&line) {
                if let Some(Pending::Reply { tx, .. }) = self.pending.take() {
                    let _ = tx.send(Ok(None));
                }
                return Ok(());
            }
            if self.devs[slot].query.is_some() {
                // A polled device answers its command with the next line: this is it.
                let pattern = reply.as_str().to_string();
                if let Some(Pending::Reply { tx, .. }) = self.pending.take() {
                    let _ = tx.send(Err(RequestError::Protocol(format!(
                        "reply `{}` does not match `{pattern}`",
                        parse::preview(line.as_bytes(), 80)
                    ))));
                }
                return Ok(());
            }
        }
        let now = Instant::now();
        // 2. The answer of the polled device.
        if let Some(Pending::Poll { slot, due, .. }) = &self.pending {
            let (slot, due) = (*slot, *due);
            let dev = &self.devs[slot];
            let parsed = dev
                .parser
                .as_ref()
                .map(|p| parse::point_values(&dev.device, p, &line));
            if let Some(Ok(values)) = parsed {
                self.pending = None;
                return self.good(slot, values, now, Some(due)).await;
            }
        }
        // 3. Streaming devices.
        let mut matched = false;
        let mut last_miss = None;
        for slot in 0..self.devs.len() {
            let dev = &self.devs[slot];
            let (None, Some(parser)) = (&dev.query, &dev.parser) else {
                continue;
            };
            match parse::point_values(&dev.device, parser, &line) {
                Ok(values) => {
                    matched = true;
                    self.good(slot, values, now, None).await?;
                }
                Err(e) => {
                    last_miss = Some(e);
                }
            }
        }
        if !matched {
            // A checksum failure says more than "unmatched".
            let (kind, reason) = match last_miss {
                Some(e) => (e.kind, e.reason),
                None => (BadKind::Unmatched, "no device parses this line".into()),
            };
            self.bad_line(kind, &reason, line.as_bytes());
        }
        Ok(())
    }

    /// A device produced a reading (`due`: the poll it answered).
    async fn good(
        &mut self,
        slot: usize,
        values: parse::PointValues,
        now: Instant,
        due: Option<Instant>,
    ) -> Result<(), Stop> {
        let mut events = Vec::new();
        let dev = &mut self.devs[slot];
        if dev.failures > 0 && dev.online == Some(true) {
            tracing::info!(device = %dev.device.name, failures = dev.failures, "device answering again");
        }
        dev.failures = 0;
        if let Some(s) = self.stats.devices.get(slot) {
            // A line device's poll time: from the command (or the window's start) to the line.
            s.good(due.map_or(Duration::ZERO, |d| now.saturating_duration_since(d)));
        }
        match due {
            Some(due) => {
                let (next, skipped) = next_due(due, dev.interval, now);
                dev.due = next;
                self.stats
                    .skipped_ticks
                    .fetch_add(skipped, Ordering::Relaxed);
            }
            None => dev.due = now + dev.device.timeout,
        }
        if dev.online != Some(true) {
            dev.online = Some(true);
            self.stats.devices_online.fetch_add(1, Ordering::Relaxed);
            tracing::info!(device = %dev.device.name, bus = %self.name, "device online");
            events.push(BusEvent::Status {
                device: dev.index,
                online: true,
                reason: String::new(),
            });
        }
        events.push(BusEvent::Reading(Reading {
            device: dev.index,
            group: 0,
            ts: SystemTime::now(),
            read_at: now,
            values,
        }));
        self.send(events).await
    }

    async fn poll_failed(
        &mut self,
        slot: usize,
        due: Instant,
        error: RequestError,
    ) -> Result<(), Stop> {
        self.stats.failed_polls.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let dev = &mut self.devs[slot];
        let (next, _) = next_due(due, dev.interval, now);
        dev.due = next;
        let event = self.missed(slot, &error);
        let dev = &mut self.devs[slot];
        let spaced = now + backoff(dev.interval, dev.failures, dev.device.backoff_max);
        if dev.due < spaced {
            dev.due = spaced;
        }
        self.send(event.into_iter().collect()).await
    }

    /// Counts one miss; the offline event when it is the `offline_after`th.
    fn missed(&mut self, slot: usize, error: &RequestError) -> Option<BusEvent> {
        let dev = &mut self.devs[slot];
        dev.failures = dev.failures.saturating_add(1);
        if let Some(s) = self.stats.devices.get(slot) {
            let backoff = backoff(dev.interval, dev.failures, dev.device.backoff_max);
            let offline = dev.failures >= dev.device.offline_after;
            s.failed(dev.device.timeout, &error.to_string(), backoff, offline);
        }
        if dev.failures == 1 {
            tracing::warn!(device = %dev.device.name, bus = %self.name, error = %error, "line device missed");
        } else {
            tracing::debug!(device = %dev.device.name, failures = dev.failures, error = %error, "line device missed again");
        }
        if dev.failures >= dev.device.offline_after && dev.online != Some(false) {
            if dev.online == Some(true) {
                self.stats.devices_online.fetch_sub(1, Ordering::Relaxed);
            }
            dev.online = Some(false);
            tracing::warn!(device = %dev.device.name, bus = %self.name, failures = dev.failures, error = %error, "device offline");
            return Some(BusEvent::Status {
                device: dev.index,
                online: false,
                reason: error.reason(),
            });
        }
        None
    }

    /// Streaming devices silent for a whole `timeout` window: one miss per window.
    async fn stream_silence(&mut self, now: Instant) -> Result<(), Stop> {
        let mut events = Vec::new();
        for slot in 0..self.devs.len() {
            let dev = &self.devs[slot];
            if dev.query.is_some() || dev.parser.is_none() || now < dev.due {
                continue;
            }
            let timeout = dev.device.timeout;
            let error = if self.port.is_some() {
                RequestError::Timeout(timeout)
            } else {
                RequestError::NotConnected(format!("{} is not open", self.bus.serial.port))
            };
            self.devs[slot].due = now + timeout;
            events.extend(self.missed(slot, &error));
        }
        self.send(events).await
    }

    async fn send(&mut self, events: Vec<BusEvent>) -> Result<(), Stop> {
        for event in events {
            if self.events.send(event).await.is_err() {
                return Err(Stop);
            }
        }
        Ok(())
    }
}

async fn read_some(
    port: Option<&mut tokio_serial::SerialStream>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match port {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}
