//! The command router task: incoming command publishes → validation → the bus → results.
//!
//! One router task owns the per-point state (remembered ids, rate limiters) and does every
//! check that needs no bus, so a refusal never waits behind a slow device. Validated commands
//! go to one executor task per bus, which runs them one at a time through that bus task's
//! request queue (served ahead of polls). One at a time per bus keeps a read-modify-write
//! from interleaving with another command on the same register, and keeps the order in which
//! commands for one point arrived. Executors report back to the router, which remembers the
//! outcome under the command's id and publishes the result and the new value.
//!
//! Shutdown: the router stops on cancellation (dropping its link sender, so the link can
//! flush and stop); a command still executing then gets no result.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    decide, err_result, log_text, log_topic, ok_result, parse_default_topic, set_bit_write,
    Arrival, Clock, CommandStats, Plan, PointState, RateLimiter, RecentIds, Refusal, Reply,
    ResponseTopics, Seen, Step, Verdict, MAX_TOPIC, REFUSAL_BUDGET,
};
use crate::codec::{self, Raw};
use crate::link::InMessage;
use crate::modbus::{BusHandle, BusRequest, Data, Op};
use crate::model::{Config, MessageMode, RegisterKind};
use crate::publish::{CommandResult, Input};

/// What a router hands to its successor on a reload: the outcome of every remembered command
/// id, by device and point name, so that a redelivery after the reload is not executed again.
#[derive(Debug, Default)]
pub struct Memory(HashMap<(String, String), RecentIds>);

/// Starts the router. `buses` are the running bus tasks (matched to the config by name);
/// `memory` is what the previous router remembered. The task returns its own memory.
pub fn spawn(
    config: Arc<Config>,
    buses: &[BusHandle],
    commands: mpsc::Receiver<InMessage>,
    publisher: mpsc::Sender<Input>,
    stats: Arc<CommandStats>,
    memory: Memory,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<Memory> {
    let mut topics = HashMap::new();
    for (d, device) in config.devices.iter().enumerate() {
        for (p, (point, c)) in device.points.iter().zip(&device.commands).enumerate() {
            if point.writable && !c.topic.is_empty() {
                topics.insert(c.topic.clone(), (d, p));
            }
        }
    }
    let buses = config
        .buses
        .iter()
        .map(|b| buses.iter().find(|h| h.name == b.name).cloned())
        .collect();
    let mut points: HashMap<(usize, usize), PointState> = HashMap::new();
    let mut memory = memory.0;
    for (d, device) in config.devices.iter().enumerate() {
        for (p, point) in device.points.iter().enumerate() {
            if let Some(ids) = memory.remove(&(device.name.clone(), point.name.clone())) {
                points.entry((d, p)).or_default().ids = ids;
            }
        }
    }
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let sparkplug = SparkplugRoutes::new(&config).map(Arc::new);
    let router = Router {
        response_topics: ResponseTopics::new(&config),
        config,
        topics,
        buses,
        executors: HashMap::new(),
        points,
        outstanding: 0,
        publisher,
        done_tx,
        stats,
        budgets: [(); 2].map(|()| {
            RateLimiter::new(
                crate::model::Rate {
                    count: REFUSAL_BUDGET,
                    per: Duration::from_secs(1),
                },
                Instant::now(),
            )
        }),
        suppressed: [0; 2],
        sparkplug,
        announce_budget: RateLimiter::new(
            crate::model::Rate {
                count: 1,
                per: ANNOUNCE_EVERY,
            },
            Instant::now(),
        ),
    };
    tokio::spawn(router.run(commands, done_rx, cancel))
}

/// A validated command on its way to the bus.
struct Job {
    device: usize,
    point: usize,
    id: Option<String>,
    topic: String,
    text: String,
    plan: Plan,
    received: Instant,
    /// The earliest of the command's expiries (MQTT 5 message expiry, the payload's
    /// `expires`, `ts` + `max_age`, taken onto the monotonic clock on arrival), checked again
    /// when the executor takes it and by the bus right before the write.
    deadline: Option<Instant>,
    reply: Option<Reply>,
}

impl Reply {
    /// The reply wanted by `msg`, if it asked for one we may send: a permitted response topic
    /// ([`ResponseTopics`]). (The link drops the wish of a request whose correlation data is
    /// over 256 bytes, and counts it.)
    fn of(msg: &InMessage, allowed: &ResponseTopics) -> Result<Option<Reply>, String> {
        let Some(topic) = msg.response_topic.as_ref() else {
            return Ok(None);
        };
        if let Err(why) = allowed.check(topic) {
            return Err(format!("response topic refused: {why}"));
        }
        Ok(Some(Reply {
            topic: topic.clone(),
            correlation: msg.correlation.clone(),
        }))
    }
}

/// What an executor did with a job.
struct Done {
    job: Job,
    outcome: Result<Executed, Refusal>,
}

struct Executed {
    raw: Raw,
    written_at: SystemTime,
    read_back: bool,
    read_back_error: Option<Refusal>,
}

struct Router {
    config: Arc<Config>,
    /// Command topic → (device, point), writable points only.
    topics: HashMap<String, (usize, usize)>,
    /// Bus index → its running task (`None`: not running, no devices).
    buses: Vec<Option<BusHandle>>,
    executors: HashMap<usize, mpsc::Sender<Job>>,
    points: HashMap<(usize, usize), PointState>,
    /// Jobs handed to executors whose outcome has not come back.
    outstanding: usize,
    /// The publisher stage, told of results and written values.
    publisher: mpsc::Sender<Input>,
    done_tx: mpsc::UnboundedSender<Done>,
    response_topics: ResponseTopics,
    stats: Arc<CommandStats>,
    /// The refusal budgets (see [`REFUSAL_BUDGET`]): `[UNROUTED]` for topics that are no
    /// writable point's command topic, `[ROUTED]` for the writable points. Two, so that a
    /// flood of made-up topics never silences the answers to commands for real points.
    budgets: [RateLimiter; 2],
    /// Refusals not answered since the last one that was, per budget.
    suppressed: [u64; 2],
    /// Sparkplug mode: where NCMD and DCMD arrive, and the metrics by alias.
    sparkplug: Option<Arc<SparkplugRoutes>>,
    /// Requests for the births again (Sparkplug rebirth, Home Assistant's birth): at most one
    /// per [`ANNOUNCE_EVERY`], so that a flood of them cannot keep the link sending births.
    announce_budget: RateLimiter,
}

/// Bytes of a Sparkplug command we decode at most (64 metrics with long strings fit).
const MAX_SPARKPLUG_COMMAND: usize = 64 * 1024;

/// How often a rebirth may be asked for.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// How Sparkplug commands find their point.
struct SparkplugRoutes {
    ncmd: String,
    /// DCMD topic → device index.
    dcmd: HashMap<String, usize>,
    /// Alias → (device, point).
    aliases: HashMap<u64, (usize, usize)>,
    datatypes: Vec<Vec<u32>>,
}

impl SparkplugRoutes {
    fn new(config: &Config) -> Option<SparkplugRoutes> {
        let topics = crate::publish::sparkplug::Topics::new(config)?;
        let aliases = crate::publish::sparkplug::aliases(config);
        Some(SparkplugRoutes {
            ncmd: topics.ncmd,
            dcmd: topics
                .dcmd
                .into_iter()
                .enumerate()
                .map(|(d, t)| (t, d))
                .collect(),
            aliases: aliases
                .iter()
                .enumerate()
                .flat_map(|(d, ps)| ps.iter().enumerate().map(move |(p, a)| (*a, (d, p))))
                .collect(),
            datatypes: config
                .devices
                .iter()
                .map(|d| {
                    d.points
                        .iter()
                        .map(crate::publish::sparkplug::point_datatype)
                        .collect()
                })
                .collect(),
        })
    }
}

const UNROUTED: usize = 0;
const ROUTED: usize = 1;

/// Who a refusal is about, for its log line and result.
struct Target<'a> {
    device: Option<&'a str>,
    point: Option<&'a str>,
    result_topic: String,
    /// [`UNROUTED`] or [`ROUTED`]: the budget it draws on.
    budget: usize,
}

impl Router {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<InMessage>,
        mut done: mpsc::UnboundedReceiver<Done>,
        cancel: CancellationToken,
    ) -> Memory {
        tracing::info!(topics = self.topics.len(), "command router started");
        loop {
            let out = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(d) = done.recv() => self.on_done(d),
                msg = commands.recv() => match msg {
                    Some(msg) => self.on_command(msg),
                    None => break,
                },
            };
            if !self.send(out).await {
                return self.memory();
            }
        }
        // Commands received but not yet looked at are answered `busy` (they were acknowledged
        // to the broker: dropping them would leave their senders without a word).
        commands.close();
        while let Ok(msg) = commands.try_recv() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            let out = overloaded(&self.config, &msg).map(Input::Result);
            if !self.send(out.into_iter().collect()).await {
                return self.memory();
            }
        }
        // Commands already on their way to a device get their result (a reload or stop
        // waits for them a little; the bus answers or times out within this).
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.outstanding > 0 {
            match tokio::time::timeout_at(deadline.into(), done.recv()).await {
                Ok(Some(d)) => {
                    let out = self.on_done(d);
                    let sent = tokio::time::timeout_at(deadline.into(), self.send(out)).await;
                    if sent != Ok(true) {
                        break;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.memory()
    }

    /// Tells the publisher; `false` when it is gone.
    async fn send(&mut self, out: Vec<Input>) -> bool {
        for m in out {
            if self.publisher.send(m).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The remembered outcomes, by name (pending ones are not kept: their result is lost).
    fn memory(&mut self) -> Memory {
        let mut memory = HashMap::new();
        for ((d, p), state) in self.points.drain() {
            let device = &self.config.devices[d];
            let mut ids = state.ids;
            ids.retain_done();
            memory.insert((device.name.clone(), device.points[p].name.clone()), ids);
        }
        Memory(memory)
    }

    /// A refusal: counted always; logged and answered within the refusal budget.
    fn refuse(
        &mut self,
        target: &Target<'_>,
        topic: &str,
        text: &str,
        id: Option<&str>,
        refusal: &Refusal,
        reply: Option<&Reply>,
    ) -> Vec<Input> {
        self.stats.count_refusal(&refusal.reason);
        let body = err_result(target.device, target.point, id, refusal);
        let b = target.budget;
        let kind = if b == ROUTED {
            "commands for configured points"
        } else {
            "commands on unknown topics"
        };
        if !self.budgets[b].allow(Instant::now()) {
            self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
            if self.suppressed[b] == 0 {
                tracing::warn!(
                    budget_per_s = REFUSAL_BUDGET,
                    "{kind} refused in a flood: further refusals are counted, not answered or logged, until it ebbs"
                );
            }
            self.suppressed[b] += 1;
            return Vec::new();
        }
        if self.suppressed[b] > 0 {
            tracing::warn!(
                suppressed = self.suppressed[b],
                "flood of {kind} ebbed: refusals in it were not answered"
            );
            self.suppressed[b] = 0;
        }
        tracing::warn!(
            device = target.device.unwrap_or(""), point = target.point.unwrap_or(""),
            topic = %log_topic(topic), value = %text, id = id.unwrap_or(""),
            outcome = %refusal.reason, error = %refusal.error, "command refused"
        );
        results(target.result_topic.clone(), body, reply)
    }

    /// Validates one incoming command; returns the messages to publish now.
    fn on_command(&mut self, msg: InMessage) -> Vec<Input> {
        let received = Instant::now();
        if msg.topic.len() > MAX_TOPIC {
            // No result: its topic would be built from (and as long as) this one.
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if self.budgets[UNROUTED].allow(received) {
                tracing::warn!(
                    bytes = msg.topic.len(),
                    topic = %log_topic(&msg.topic),
                    "command on a topic longer than {MAX_TOPIC} bytes: dropped without a result"
                );
            }
            return Vec::new();
        }
        if let Some(ha) = &self.config.homeassistant {
            if msg.topic.len() == ha.prefix.len() + 7
                && msg.topic.starts_with(&ha.prefix)
                && msg.topic.ends_with("/status")
            {
                // Home Assistant's birth (`online`): it may have lost what it knew.
                if msg.payload == b"online" {
                    return self.announce("Home Assistant is online: discovery configs again");
                }
                return Vec::new();
            }
        }
        if let Some(sp) = &self.sparkplug {
            if msg.topic.starts_with(crate::publish::sparkplug::NAMESPACE) {
                let sp = sp.clone();
                return self.on_sparkplug(&sp, msg, received);
            }
        }
        let text = log_text(&msg.payload);
        // Which point? Either an exact command topic, or the default form under the wildcard.
        let (d, p) = match self.topics.get(&msg.topic) {
            Some(&t) => t,
            None => {
                let (names, result_topic, refusal) = self.unrouted(&msg.topic);
                let (device, point) = names.unzip();
                let target = Target {
                    device: device.as_deref(),
                    point: point.as_deref(),
                    result_topic,
                    budget: UNROUTED,
                };
                let reply = Reply::of(&msg, &self.response_topics).unwrap_or(None);
                return self.refuse(&target, &msg.topic, &text, None, &refusal, reply.as_ref());
            }
        };
        self.on_point(d, p, &msg, received, &text)
    }

    /// A command for point `p` of device `d` (found by its topic, or by a Sparkplug DCMD).
    fn on_point(
        &mut self,
        d: usize,
        p: usize,
        msg: &InMessage,
        received: Instant,
        text: &str,
    ) -> Vec<Input> {
        let config = self.config.clone();
        let device = &config.devices[d];
        let point = &device.points[p];
        let settings = &device.commands[p];
        let target = Target {
            device: Some(&device.name),
            point: Some(&point.name),
            result_topic: settings.result_topic.clone(),
            budget: ROUTED,
        };
        let reply = match Reply::of(msg, &self.response_topics) {
            Ok(r) => r,
            Err(why) => {
                if self.budgets[ROUTED].allow(received) {
                    tracing::warn!(device = %device.name, point = %point.name, response_topic = %log_topic(msg.response_topic.as_deref().unwrap_or("")), "{why}: result on the result topic only");
                }
                None
            }
        };
        let arrival = Arrival {
            payload: &msg.payload,
            retain: msg.retain,
            mqtt_expiry: msg.expires_at,
            reply: reply.clone(),
            received,
            clock: Clock::system(config.gateway.clock),
        };
        let state = self.points.entry((d, p)).or_default();
        let (plan, id, deadline) = match decide(&config, d, p, state, arrival) {
            Verdict::Execute { plan, id, deadline } => (plan, id, deadline),
            Verdict::Refuse { refusal, id } => {
                return self.refuse(
                    &target,
                    &msg.topic,
                    text,
                    id.as_deref(),
                    &refusal,
                    reply.as_ref(),
                )
            }
            Verdict::Waiting { kept } => {
                if !kept {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                return Vec::new();
            }
            Verdict::Duplicate(body) => {
                if !self.budgets[ROUTED].allow(received) {
                    self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
                    return Vec::new();
                }
                tracing::info!(device = %device.name, point = %point.name, id = %body["id"], outcome = "duplicate", "command not executed again: same id");
                return results(settings.result_topic.clone(), body, reply.as_ref());
            }
        };
        let Some(handle) = self.buses.get(device.bus).cloned().flatten() else {
            let r = Refusal::new("unavailable", "the device's bus is not running");
            let out = self.refuse(&target, &msg.topic, text, id.as_deref(), &r, reply.as_ref());
            // Not remembered: a retry once the bus runs again should execute.
            if let Some(id) = &id {
                self.points.entry((d, p)).or_default().ids.forget(id);
            }
            return out;
        };
        let job = Job {
            device: d,
            point: p,
            id,
            topic: msg.topic.clone(),
            text: text.to_owned(),
            plan,
            received,
            deadline,
            reply,
        };
        let bus = device.bus;
        let executor = self.executors.entry(bus).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(executor(config.clone(), handle, rx, self.done_tx.clone()));
            tx
        });
        self.outstanding += 1;
        if let Err(e) = executor.try_send(job) {
            self.outstanding -= 1;
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            let r = Refusal::new("busy", "too many commands queued for this bus");
            let out = self.refuse(
                &target,
                &msg.topic,
                text,
                job.id.as_deref(),
                &r,
                job.reply.as_ref(),
            );
            // Not remembered: "send it again" must work with the same id.
            if let Some(id) = &job.id {
                self.points.entry((d, p)).or_default().ids.forget(id);
            }
            return out;
        }
        Vec::new()
    }

    /// The births again, within [`ANNOUNCE_EVERY`] (more often: counted as dropped).
    fn announce(&mut self, why: &str) -> Vec<Input> {
        if self.announce_budget.allow(Instant::now()) {
            tracing::info!("{why}");
            return vec![Input::Rebirth];
        }
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        Vec::new()
    }

    /// A Sparkplug NCMD (rebirth) or DCMD (writes, each metric one command through the same
    /// checks as a JSON command; a metric by alias, or by name when it has none). Sparkplug
    /// has no result topic: refusals are logged (within the budget) and counted.
    fn on_sparkplug(
        &mut self,
        sp: &SparkplugRoutes,
        msg: InMessage,
        received: Instant,
    ) -> Vec<Input> {
        use crate::publish::sparkplug::{command_text, proto};
        use prost::Message as _;
        let refuse = |router: &mut Router, why: &str| {
            router.stats.count_refusal("sparkplug_command");
            if router.budgets[UNROUTED].allow(received) {
                tracing::warn!(topic = %log_topic(&msg.topic), "Sparkplug command refused: {why}");
            } else {
                router.stats.suppressed.fetch_add(1, Ordering::Relaxed);
            }
            Vec::new()
        };
        if msg.retain {
            return refuse(self, "retained (a retained command is never executed)");
        }
        // Decoded only when small enough to hold at most a few hundred metrics.
        if msg.payload.len() > MAX_SPARKPLUG_COMMAND {
            return refuse(self, "larger than a Sparkplug command of ours can be");
        }
        let Ok(payload) = proto::Payload::decode(msg.payload.as_slice()) else {
            return refuse(self, "not a Sparkplug B payload");
        };
        if msg.topic == sp.ncmd {
            let rebirth = payload.metrics.iter().any(|m| {
                m.name.as_deref() == Some("Node Control/Rebirth")
                    && m.value == Some(proto::MetricValue::BooleanValue(true))
            });
            if rebirth {
                return self.announce("Sparkplug rebirth requested: NBIRTH and every DBIRTH again");
            }
            return refuse(self, "NCMD without `Node Control/Rebirth = true`");
        }
        let Some(&d) = sp.dcmd.get(&msg.topic) else {
            return refuse(self, "not this node's NCMD or a DCMD of one of its devices");
        };
        let config = self.config.clone();
        let mut out = Vec::new();
        if payload.metrics.len() > crate::command::MAX_SPARKPLUG_METRICS {
            // All or nothing: the sender has no result to tell it which were written.
            return refuse(self, "more metrics than one DCMD may carry: none written");
        }
        for m in &payload.metrics {
            let found = match (m.alias, m.name.as_deref()) {
                (Some(a), _) => sp.aliases.get(&a).copied().filter(|&(dd, _)| dd == d),
                (None, Some(name)) => config.devices[d]
                    .points
                    .iter()
                    .position(|p| p.name == name)
                    .map(|p| (d, p)),
                (None, None) => None,
            };
            let Some((_, p)) = found else {
                out.extend(refuse(
                    self,
                    "a metric that is not one of the device's (alias or name)",
                ));
                continue;
            };
            let t = sp.datatypes[d][p];
            let Some(text) = m.value.as_ref().and_then(|v| command_text(t, v)) else {
                out.extend(refuse(self, "a value that is not of the metric's datatype"));
                continue;
            };
            let one = InMessage {
                topic: msg.topic.clone(),
                payload: text.clone().into_bytes(),
                retain: false,
                response_topic: None,
                correlation: None,
                correlation_refused: false,
                expires_at: msg.expires_at,
            };
            out.extend(self.on_point(d, p, &one, received, &text));
        }
        out
    }

    /// A topic that is no writable point's command topic: names, result topic and refusal.
    #[allow(clippy::type_complexity)]
    fn unrouted(&self, topic: &str) -> (Option<(String, String)>, String, Refusal) {
        let fallback = format!("{topic}/result");
        let Some((dn, pn)) = parse_default_topic(&self.config.gateway.prefix, topic) else {
            return (
                None,
                fallback,
                Refusal::new("unknown_point", format!("`{topic}` is no command topic")),
            );
        };
        let names = Some((dn.to_string(), pn.to_string()));
        let found = self
            .config
            .devices
            .iter()
            .find(|d| d.name == dn)
            .and_then(|d| {
                let p = d.points.iter().position(|p| p.name == pn)?;
                Some((&d.points[p], &d.commands[p]))
            });
        match found {
            None => (
                names,
                fallback,
                Refusal::new("unknown_point", format!("no point `{pn}` on device `{dn}`")),
            ),
            Some((point, c)) if !point.writable => (
                names,
                c.result_topic.clone(),
                Refusal::new(
                    "not_writable",
                    format!("point `{pn}` of device `{dn}` is not writable"),
                ),
            ),
            Some((_, c)) => (
                names,
                c.result_topic.clone(),
                Refusal::new(
                    "unknown_point",
                    format!(
                        "point `{pn}` of device `{dn}` takes commands on `{}`",
                        c.topic
                    ),
                ),
            ),
        }
    }

    /// An executor finished a job: remember, log, publish the result and the new value.
    fn on_done(&mut self, done: Done) -> Vec<Input> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let Done { job, outcome } = done;
        let config = self.config.clone();
        let device = &config.devices[job.device];
        let point = &device.points[job.point];
        let settings = &device.commands[job.point];
        let mut out = Vec::new();
        let body = match &outcome {
            Ok(e) => {
                let mut body = ok_result(
                    &device.name,
                    point,
                    job.id.as_deref(),
                    &e.raw,
                    e.written_at,
                    e.read_back,
                );
                if let Some(r) = &e.read_back_error {
                    body.insert(
                        "read_back_error".into(),
                        Json::String(format!("{}: {}", r.reason, r.error)),
                    );
                }
                // The publisher decides whether and how the written value is published.
                out.push(Input::Written {
                    config: config.clone(),
                    device: job.device,
                    point: job.point,
                    raw: e.raw.clone(),
                    at: e.written_at,
                });
                body
            }
            Err(r) => err_result(Some(&device.name), Some(&point.name), job.id.as_deref(), r),
        };
        let elapsed_ms = job.received.elapsed().as_secs_f64() * 1000.0;
        let counter = match &outcome {
            Ok(_) => &self.stats.executed,
            Err(_) => &self.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match &outcome {
            Ok(_) => tracing::info!(
                device = %device.name, point = %point.name, topic = %log_topic(&job.topic), value = %job.text,
                id = job.id.as_deref().unwrap_or(""), outcome = "ok", elapsed_ms, "command executed"
            ),
            Err(r) => tracing::warn!(
                device = %device.name, point = %point.name, topic = %log_topic(&job.topic), value = %job.text,
                id = job.id.as_deref().unwrap_or(""), outcome = %r.reason, error = %r.error,
                elapsed_ms, "command failed"
            ),
        }
        let mut waiting = Vec::new();
        if let Some(id) = &job.id {
            let state = self.points.entry((job.device, job.point)).or_default();
            if let Some(Seen::Pending { waiting: w }) = state.ids.get_mut(id) {
                waiting = std::mem::take(w);
            }
            state.ids.put(id, Seen::Done(body.clone()));
        }
        // The result goes first: a consumer waiting on it then already finds the new value.
        let mut msgs = results(
            settings.result_topic.clone(),
            body.clone(),
            job.reply.as_ref(),
        );
        if !waiting.is_empty() {
            let mut dup = body.clone();
            dup.insert("duplicate".into(), Json::Bool(true));
            for reply in &waiting {
                msgs.extend(results(
                    settings.result_topic.clone(),
                    dup.clone(),
                    reply.as_ref(),
                ));
            }
        }
        msgs.extend(out);
        msgs
    }
}

/// The `busy` result of a command that could not even be queued (see `app`); none for a
/// topic too long to build a result topic from.
pub fn overloaded(config: &Config, msg: &InMessage) -> Option<CommandResult> {
    if msg.topic.len() > MAX_TOPIC {
        return None;
    }
    let found = config.devices.iter().find_map(|d| {
        let p = d.commands.iter().position(|c| c.topic == msg.topic)?;
        Some((d, p))
    });
    let r = Refusal::new(
        "busy",
        "too many commands waiting: not executed, send it again",
    );
    let (device, point, topic) = match found {
        Some((d, p)) => (
            Some(d.name.as_str()),
            Some(d.points[p].name.as_str()),
            d.commands[p].result_topic.clone(),
        ),
        None => (None, None, format!("{}/result", msg.topic)),
    };
    Some(CommandResult {
        topic,
        body: err_result(device, point, None, &r),
        reply: None,
    })
}

/// A result for the publisher (which publishes it on its result topic and, for an MQTT 5
/// request with a response topic, a copy there).
fn results(topic: String, body: Map<String, Json>, reply: Option<&Reply>) -> Vec<Input> {
    vec![Input::Result(CommandResult {
        topic,
        body,
        reply: reply.cloned(),
    })]
}

/// Runs the jobs of one bus, one at a time.
async fn executor(
    config: Arc<Config>,
    bus: BusHandle,
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Done>,
) {
    while let Some(job) = jobs.recv().await {
        let outcome = execute(&config, &bus, &job).await;
        if done.send(Done { job, outcome }).is_err() {
            return;
        }
    }
}

async fn execute(config: &Config, bus: &BusHandle, job: &Job) -> Result<Executed, Refusal> {
    if job.deadline.is_some_and(|d| Instant::now() > d) {
        return Err(Refusal::new(
            "expired",
            "the command expired while waiting for the bus",
        ));
    }
    let device = &config.devices[job.device];
    let point = &device.points[job.point];
    let settings = &device.commands[job.point];
    // Only what writes carries the deadline: the read-back and the refresh after a write
    // that happened must not be skipped as "expired".
    let ask = |op| request(bus, device.unit, device.timeout, job.deadline, op);
    let ask_after = |op| request(bus, device.unit, device.timeout, None, op);
    match &job.plan.step {
        Step::Write(w) => {
            ask(Op::Write(w.clone())).await?;
        }
        Step::SetBit {
            address,
            bit,
            on,
            multiple,
        } => {
            let read = ask(Op::Read {
                kind: RegisterKind::Holding,
                start: *address,
                count: 1,
            })
            .await?;
            let Some(Data::Words(words)) = read else {
                return Err(Refusal::new(
                    "protocol",
                    "the register read answered no word",
                ));
            };
            let reg = *words
                .first()
                .ok_or_else(|| Refusal::new("protocol", "the register read answered no word"))?;
            ask(Op::Write(set_bit_write(
                *address, reg, *bit, *on, *multiple,
            )))
            .await?;
        }
        Step::Line { bytes, reply } => {
            ask(Op::Line {
                device: job.device,
                bytes: bytes.clone(),
                reply: reply.clone(),
            })
            .await?;
        }
    }
    let written_at = SystemTime::now();
    let mut executed = Executed {
        raw: job.plan.raw.clone(),
        written_at,
        read_back: false,
        read_back_error: None,
    };
    if settings.read_back {
        let read = ask_after(Op::Read {
            kind: point.kind,
            start: point.address,
            count: point.width(),
        })
        .await;
        let decoded = read.and_then(|data| match data {
            Some(Data::Words(w)) => codec::decode(point.data_type, point.order, &w)
                .map_err(|e| Refusal::new("decode", e.to_string())),
            Some(Data::Bits(b)) if !b.is_empty() => Ok(codec::decode_bits(&b)),
            _ => Err(Refusal::new("protocol", "the read-back answered nothing")),
        });
        match decoded {
            Ok(raw) => {
                executed.raw = raw;
                executed.read_back = true;
            }
            // The write itself succeeded: report it, with why the read-back did not.
            Err(r) => executed.read_back_error = Some(r),
        }
    }
    if device.message_mode == MessageMode::PerDevice && device.line.is_none() {
        // A per-device message carries every point: poll the device now rather than publish
        // the new value only at its next scheduled poll. Best effort: the write is done.
        let _ = ask_after(Op::Refresh).await;
    }
    Ok(executed)
}

/// One request through the bus task's queue. The bus applies `timeout` to the transaction;
/// the outer guard only covers a bus task that never answers (waiting behind long polls).
async fn request(
    bus: &BusHandle,
    unit: u8,
    timeout: Duration,
    not_after: Option<Instant>,
    op: Op,
) -> Result<Option<Data>, Refusal> {
    let (tx, rx) = oneshot::channel();
    let req = BusRequest {
        unit,
        op,
        timeout,
        not_after: not_after.map(Into::into),
        reply: tx,
    };
    let stopped = || Refusal::new("unavailable", "the bus task stopped");
    let guard = timeout.saturating_mul(4) + Duration::from_secs(10);
    let asked = async {
        bus.requests.send(req).await.map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(|e| Refusal::new(e.reason(), e.to_string()))
    };
    match tokio::time::timeout(guard, asked).await {
        Ok(r) => r,
        Err(_) => Err(Refusal::new(
            "timeout",
            format!("the bus did not serve the request within {guard:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(topic: &str) -> InMessage {
        InMessage {
            topic: topic.into(),
            payload: b"1".to_vec(),
            retain: false,
            correlation_refused: false,
            response_topic: None,
            correlation: None,
            expires_at: None,
        }
    }

    #[test]
    fn a_command_that_finds_the_queue_full_is_answered_busy_on_its_result_topic() {
        let config = crate::config::parse(
            "gateway: { id: gw, prefix: t }\nmqtt: { host: 127.0.0.1 }\nbuses:\n  - { name: b, type: tcp, host: 127.0.0.1, port: 502 }\ndevices:\n  - name: d\n    bus: b\n    points:\n      - { name: p, address: 0, writable: true, command: { result_topic: 'r/p' } }\n",
            "t.yaml",
        )
        .unwrap();
        let busy = overloaded(&config, &message("t/d/p/set")).expect("a result");
        let out = crate::publish::json::results(&busy);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "r/p");
        let body: Json = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(body["reason"], "busy");
        assert_eq!(body["point"], "p");
        let unknown = overloaded(&config, &message("t/x/y/set")).expect("a result");
        assert_eq!(unknown.topic, "t/x/y/set/result");
        // No result topic is built from a topic too long to carry one.
        let long = format!("t/{}/p/set", "x".repeat(MAX_TOPIC));
        assert!(overloaded(&config, &message(&long)).is_none());
    }
}
