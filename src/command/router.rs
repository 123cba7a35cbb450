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
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    check_expiry, err_result, log_text, ok_result, parse_default_topic, parse_payload, plan,
    set_bit_write, Plan, RateLimiter, RecentIds, Refusal, Reply, Seen, Step, MAX_PAYLOAD,
};
use crate::codec::{self, Raw};
use crate::link::{InMessage, OutMessage};
use crate::modbus::{BusHandle, BusRequest, Data, Op};
use crate::model::{Config, MessageMode, Qos, RegisterKind};
use crate::publish;

/// Starts the router. `buses` are the running bus tasks (matched to the config by name).
pub fn spawn(
    config: Arc<Config>,
    buses: &[BusHandle],
    commands: mpsc::Receiver<InMessage>,
    link: mpsc::Sender<OutMessage>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
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
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let router = Router {
        config,
        topics,
        buses,
        executors: HashMap::new(),
        points: HashMap::new(),
        link,
        done_tx,
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
    /// The earlier of the command's expiries (MQTT 5 message expiry, the payload's
    /// `expires` taken onto the monotonic clock on arrival), checked again when the bus takes
    /// it: a command that waited past it is not executed.
    deadline: Option<Instant>,
    reply: Option<Reply>,
}

impl Reply {
    /// The reply wanted by `msg`, if it asked for one with a topic we can publish to.
    fn of(msg: &InMessage) -> Option<Reply> {
        let topic = msg.response_topic.as_ref()?;
        if !super::valid_response_topic(topic) {
            tracing::warn!(
                topic = %msg.topic, response_topic = %topic,
                "command's response topic is not a topic one can publish to (empty, wildcard, `$` or too long): result on the result topic only"
            );
            return None;
        }
        Some(Reply {
            topic: topic.clone(),
            correlation: msg.correlation.clone(),
        })
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

#[derive(Default)]
struct PointState {
    ids: RecentIds,
    limiter: Option<RateLimiter>,
}

struct Router {
    config: Arc<Config>,
    /// Command topic → (device, point), writable points only.
    topics: HashMap<String, (usize, usize)>,
    /// Bus index → its running task (`None`: not running, no devices).
    buses: Vec<Option<BusHandle>>,
    executors: HashMap<usize, mpsc::Sender<Job>>,
    points: HashMap<(usize, usize), PointState>,
    link: mpsc::Sender<OutMessage>,
    done_tx: mpsc::UnboundedSender<Done>,
}

impl Router {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<InMessage>,
        mut done: mpsc::UnboundedReceiver<Done>,
        cancel: CancellationToken,
    ) {
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
            for m in out {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    sent = self.link.send(m) => if sent.is_err() { return },
                }
            }
        }
    }

    /// Validates one incoming command; returns the messages to publish now.
    fn on_command(&mut self, msg: InMessage) -> Vec<OutMessage> {
        let received = Instant::now();
        let text = log_text(&msg.payload);
        let reply = Reply::of(&msg);
        // Which point? Either an exact command topic, or the default form under the wildcard.
        let target = match self.topics.get(&msg.topic) {
            Some(&t) => Ok(t),
            None => Err(self.unrouted(&msg.topic)),
        };
        let (d, p) = match target {
            Ok(t) => t,
            Err((names, result_topic, refusal)) => {
                let (device, point) = names.unzip();
                log_outcome(
                    device.as_deref(),
                    point.as_deref(),
                    &msg.topic,
                    &text,
                    None,
                    Err(&refusal),
                );
                let body = err_result(device.as_deref(), point.as_deref(), None, &refusal);
                return results(result_topic, &body, reply.as_ref());
            }
        };
        let config = self.config.clone();
        let device = &config.devices[d];
        let point = &device.points[p];
        let settings = &device.commands[p];
        let topic = msg.topic.clone();
        let logged = text.clone();
        let refuse = |id: Option<&str>, r: Refusal| {
            log_outcome(
                Some(&device.name),
                Some(&point.name),
                &topic,
                &logged,
                id,
                Err(&r),
            );
            let body = err_result(Some(&device.name), Some(&point.name), id, &r);
            (body, settings.result_topic.clone())
        };
        if msg.payload.len() > MAX_PAYLOAD {
            let (body, topic) = refuse(
                None,
                Refusal::new(
                    "too_large",
                    format!(
                        "payload of {} bytes exceeds {MAX_PAYLOAD}",
                        msg.payload.len()
                    ),
                ),
            );
            return results(topic, &body, reply.as_ref());
        }
        let cmd = match parse_payload(&msg.payload) {
            Ok(c) => c,
            Err(r) => {
                let (body, topic) = refuse(None, r);
                return results(topic, &body, reply.as_ref());
            }
        };
        let id = cmd.id.clone();
        let state = self.points.entry((d, p)).or_default();
        if let Some(id) = &id {
            match state.ids.get_mut(id) {
                Some(Seen::Pending { waiting }) => {
                    waiting.push(reply);
                    tracing::info!(device = %device.name, point = %point.name, id = %id, topic = %msg.topic, "command: duplicate id while executing; result follows");
                    return Vec::new();
                }
                Some(Seen::Done(body)) => {
                    let mut body = body.clone();
                    body.insert("duplicate".into(), Json::Bool(true));
                    tracing::info!(device = %device.name, point = %point.name, id = %id, topic = %msg.topic, value = %text, outcome = "duplicate", "command not executed again: same id");
                    return results(settings.result_topic.clone(), &body, reply.as_ref());
                }
                None => {}
            }
        }
        let mqtt_expiry = match msg.expires_at {
            Some(t) if received > t => Err(Refusal::new(
                "expired",
                "the MQTT 5 message expiry interval had passed when the command arrived",
            )),
            _ => Ok(()),
        };
        let checked = mqtt_expiry
            .and_then(|()| check_expiry(&cmd, settings.max_age, SystemTime::now()))
            .and_then(|()| match device.line {
                Some(_) => crate::lines::command_plan(&config, d, p, &cmd.value),
                None => plan(point, settings, &cmd.value),
            })
            .and_then(|plan| {
                let limiter = match settings.rate {
                    Some(rate) => Some(
                        state
                            .limiter
                            .get_or_insert_with(|| RateLimiter::new(rate, received)),
                    ),
                    None => None,
                };
                match limiter.map(|l| l.allow(received)) {
                    Some(false) => Err(Refusal::new(
                        "rate_limited",
                        "too many commands for this point: see its command.rate",
                    )),
                    _ => Ok(plan),
                }
            });
        let plan = match checked {
            Ok(plan) => plan,
            Err(r) => {
                let (body, topic) = refuse(id.as_deref(), r);
                if let Some(id) = &id {
                    state.ids.put(id, Seen::Done(body.clone()));
                }
                return results(topic, &body, reply.as_ref());
            }
        };
        let bus = device.bus;
        let Some(handle) = self.buses.get(bus).cloned().flatten() else {
            let (body, topic) = refuse(
                id.as_deref(),
                Refusal::new("unavailable", "the device's bus is not running"),
            );
            return results(topic, &body, reply.as_ref());
        };
        if let Some(id) = &id {
            state.ids.put(
                id,
                Seen::Pending {
                    waiting: Vec::new(),
                },
            );
        }
        // (A wall time too far ahead for the monotonic clock is no deadline.)
        let expires = cmd.expires.and_then(|wall| {
            received.checked_add(wall.duration_since(SystemTime::now()).unwrap_or_default())
        });
        let deadline = msg.expires_at.into_iter().chain(expires).min();
        let job = Job {
            device: d,
            point: p,
            id,
            topic: msg.topic,
            text,
            plan,
            received,
            deadline,
            reply,
        };
        let config = self.config.clone();
        let done = self.done_tx.clone();
        let executor = self.executors.entry(bus).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(executor(config, handle, rx, done));
            tx
        });
        if let Err(e) = executor.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            let (body, topic) = refuse(
                job.id.as_deref(),
                Refusal::new("busy", "too many commands queued for this bus"),
            );
            if let Some(id) = &job.id {
                self.points
                    .entry((d, p))
                    .or_default()
                    .ids
                    .put(id, Seen::Done(body.clone()));
            }
            return results(topic, &body, job.reply.as_ref());
        }
        Vec::new()
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
    fn on_done(&mut self, done: Done) -> Vec<OutMessage> {
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
                if device.message_mode == MessageMode::PerPoint {
                    let value = codec::to_value(point, &e.raw);
                    out.push(OutMessage {
                        topic: point.topic.clone(),
                        payload: publish::point_payload(
                            point,
                            &value,
                            codec::label(point, &e.raw),
                            e.written_at,
                        ),
                        qos: point.qos,
                        retain: point.retain,
                        created: Instant::now(),
                        correlation: None,
                        json_object: point.payload == crate::model::PayloadFormat::Json,
                    });
                }
                body
            }
            Err(r) => err_result(Some(&device.name), Some(&point.name), job.id.as_deref(), r),
        };
        let elapsed_ms = job.received.elapsed().as_secs_f64() * 1000.0;
        match &outcome {
            Ok(_) => tracing::info!(
                device = %device.name, point = %point.name, topic = %job.topic, value = %job.text,
                id = job.id.as_deref().unwrap_or(""), outcome = "ok", elapsed_ms, "command executed"
            ),
            Err(r) => tracing::warn!(
                device = %device.name, point = %point.name, topic = %job.topic, value = %job.text,
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
        let mut msgs = results(settings.result_topic.clone(), &body, job.reply.as_ref());
        if !waiting.is_empty() {
            let mut dup = body.clone();
            dup.insert("duplicate".into(), Json::Bool(true));
            for reply in &waiting {
                msgs.extend(results(settings.result_topic.clone(), &dup, reply.as_ref()));
            }
        }
        msgs.extend(out);
        msgs
    }
}

fn log_outcome(
    device: Option<&str>,
    point: Option<&str>,
    topic: &str,
    text: &str,
    id: Option<&str>,
    outcome: Result<(), &Refusal>,
) {
    if let Err(r) = outcome {
        tracing::warn!(
            device = device.unwrap_or(""), point = point.unwrap_or(""), topic = %topic,
            value = %text, id = id.unwrap_or(""), outcome = %r.reason, error = %r.error,
            "command refused"
        );
    }
}

fn result_message(topic: String, body: &Map<String, Json>) -> OutMessage {
    OutMessage {
        topic,
        payload: serde_json::to_vec(body).unwrap_or_default(),
        qos: Qos::AtLeastOnce,
        retain: false,
        created: Instant::now(),
        correlation: None,
        json_object: true,
    }
}

/// The result on its result topic and, for an MQTT 5 request with a response topic, a copy
/// there carrying the request's correlation data.
fn results(topic: String, body: &Map<String, Json>, reply: Option<&Reply>) -> Vec<OutMessage> {
    let result = result_message(topic, body);
    match reply {
        None => vec![result],
        Some(reply) => {
            let answer = OutMessage {
                topic: reply.topic.clone(),
                // Present even when empty: the requester may match on it.
                correlation: Some(reply.correlation.clone().unwrap_or_default()),
                ..result.clone()
            };
            vec![result, answer]
        }
    }
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
    let ask = |op| request(bus, device.unit, device.timeout, op);
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
        let read = ask(Op::Read {
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
        let _ = ask(Op::Refresh).await;
    }
    Ok(executed)
}

/// One request through the bus task's queue. The bus applies `timeout` to the transaction;
/// the outer guard only covers a bus task that never answers (waiting behind long polls).
async fn request(
    bus: &BusHandle,
    unit: u8,
    timeout: Duration,
    op: Op,
) -> Result<Option<Data>, Refusal> {
    let (tx, rx) = oneshot::channel();
    let req = BusRequest {
        unit,
        op,
        timeout,
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
