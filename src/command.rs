//! Commands: MQTT command topics become validated device writes, with a result for every one.
//!
//! This module is the pure part (no runtime): topic filters, payload parsing, expiry, the
//! value → function-code plan, the per-point rate limiter and id memory, and the result JSON.
//! [`router`] is the thin async part that owns that state and talks to the bus tasks.
//!
//! # Path of one command
//! 1. The link forwards a publish received on a subscribed filter ([`subscriptions`]): every
//!    writable point's command topic, plus the default-template wildcard
//!    `{prefix}/+/+/set`, so that a command for an unknown or read-only point still gets a
//!    result (configuration refuses any published topic that the wildcard would match).
//! 2. The router refuses, with no bus traffic, a topic over [`MAX_TOPIC`] (no result: its
//!    result topic would be built from it), an unknown topic or point (`unknown_point`) and
//!    a point that is not writable (`not_writable`). Then [`decide`] (pure) goes, in this order:
//!    the point's rate limit (`rate_limited`; first, so refused and repeated commands count
//!    too); a retained message (`retained`); the payload (`too_large`, `bad_payload`); an `id`
//!    already seen for this point (the remembered result is published again with
//!    `"duplicate": true`; a delivery while it executes waits for its result); expiry and the
//!    clock (`expired`, `missing_timestamp`, `clock_skew`, `clock_unsynchronised`); the schema
//!    (`wrong_type`, `out_of_range`, `unknown_label`, `not_representable`). Every refusal's
//!    result and log line share [`REFUSAL_BUDGET`].
//! 3. The plan ([`plan`]) goes to the bus's command executor, which runs it through the bus
//!    task's request queue (served ahead of polls): FC5/FC15 for coils, FC6/FC16 for registers,
//!    and for a bit of a register FC22 or read (FC3) + write.
//! 4. Optional read-back; the result is published (QoS 1, not retained) and the new value at
//!    once on the point's topic.
//!
//! # Time
//! MQTT 3.1.1 carries no send time and no expiry, so expiry comes from the payload: `expires`
//! (RFC 3339), or `ts` (send time) checked against the point's `max_age`; with MQTT 5 also
//! the message expiry interval. A point with `max_age` refuses commands that carry neither.
//! The wall clock is judged first ([`Clock`]), and a sender's clock may be at most
//! [`CLOCK_SKEW`] ahead.

pub mod router;

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value as Json};

use crate::codec::{self, CodecError, Raw};
use crate::modbus::Write;
use crate::model::{
    BitWrite, ClockPolicy, Config, DataType, Point, PointCommand, RegisterKind, Value,
};
use crate::publish;

/// Largest command payload accepted, bytes.
pub const MAX_PAYLOAD: usize = 4096;
/// Command ids remembered per point (with their result) to execute a redelivery once.
pub const REMEMBERED_IDS: usize = 32;
/// Commands waiting between the link and the router.
pub const QUEUE: usize = 256;
/// Longest topic the gateway builds a result topic from, or answers on, bytes. Longer ones
/// get no result (counted): `{topic}/result` from a 64 KiB topic would be a malformed packet.
pub const MAX_TOPIC: usize = 1024;
/// Further deliveries of one id, while it executes, that each get the result; more are
/// counted and ignored.
pub const MAX_WAITING: usize = 4;
/// Results of refused commands (and the log lines about them), all points together: a
/// burst of this many, then this many per second. A flood of bad commands costs the broker
/// at most this; what is beyond is counted (`suppressed`), not published.
pub const REFUSAL_BUDGET: u32 = 20;

/// Counters of the command path, read by the stats message.
#[derive(Debug, Default)]
pub struct CommandStats {
    pub executed: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// Results (and their log lines) not published because refusals came in a flood.
    pub suppressed: std::sync::atomic::AtomicU64,
    /// Commands dropped unread: the router's queue was full, or the topic too long.
    pub dropped: std::sync::atomic::AtomicU64,
    /// `refused` by reason (the result's `reason`): at most [`REASONS_KEPT`] reasons, the
    /// rest as `other`, so that a label never grows with what the network sends.
    by_reason: std::sync::Mutex<Vec<(String, u64)>>,
}

/// How many refusal reasons [`CommandStats`] tells apart.
pub const REASONS_KEPT: usize = 32;

impl CommandStats {
    /// Counts one refused command.
    pub fn count_refusal(&self, reason: &str) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(mut by) = self.by_reason.lock() else {
            return;
        };
        let key = if by.len() >= REASONS_KEPT && !by.iter().any(|(r, _)| r == reason) {
            "other"
        } else {
            reason
        };
        match by.iter_mut().find(|(r, _)| r == key) {
            Some((_, n)) => *n += 1,
            None => by.push((key.to_string(), 1)),
        }
    }

    /// Refusals by reason, in the order first seen.
    pub fn refusals(&self) -> Vec<(String, u64)> {
        self.by_reason.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

/// The filter derived from the default command template: `{prefix}/+/+/set`.
pub fn wildcard_filter(prefix: &str) -> String {
    format!("{prefix}/+/+/set")
}

/// Whether `topic` matches the subscription `filter` (MQTT 3.1.1 §4.7: `+` one level, `#`
/// the rest; topics starting with `$` match no wildcard at the first level).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Metrics one Sparkplug DCMD may carry (each is a command; more are refused).
pub const MAX_SPARKPLUG_METRICS: usize = 64;

/// Filters the gateway subscribes to: the wildcard, plus each writable point's command topic
/// that the wildcard does not already cover (overlapping subscriptions may deliver a message
/// twice, MQTT 3.1.1 §3.3.5).
pub fn subscriptions(config: &Config) -> Vec<String> {
    if let Some(topics) = crate::publish::sparkplug::Topics::new(config) {
        return topics.subscriptions();
    }
    let wildcard = wildcard_filter(&config.gateway.prefix);
    let mut out = vec![wildcard.clone()];
    // Home Assistant's birth message: the discovery configs are sent again.
    if let Some(ha) = &config.homeassistant {
        out.push(format!("{}/status", ha.prefix));
    }
    for d in &config.devices {
        for (p, c) in d.points.iter().zip(&d.commands) {
            if p.writable
                && !c.topic.is_empty()
                && !topic_matches(&wildcard, &c.topic)
                && !out.contains(&c.topic)
            {
                out.push(c.topic.clone());
            }
        }
    }
    out
}

/// Whether an MQTT 5 response topic is one the gateway may publish a result to: a topic name
/// (no wildcards, MQTT 5 §4.7.3), not empty, no NUL, not a `$` system topic, within
/// [`MAX_TOPIC`]. A publish to a wildcard topic would be a protocol error that closes the
/// connection (§3.3.2.1), so a bad one is never used.
pub fn valid_response_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC
        && !topic.starts_with('$')
        && !topic.contains(['+', '#', '\0'])
}

/// Which MQTT 5 response topics a command may have its result copied to. Anyone who may
/// publish commands names the response topic, and the gateway publishes there with its own
/// broker rights: so never to a topic the gateway itself publishes or reads (its readings,
/// statuses, stats, results, command topics: everything under its prefix and every
/// configured topic), and, when `mqtt.response_topics` is set, only within those filters.
#[derive(Debug, Clone, Default)]
pub struct ResponseTopics {
    allow: Vec<String>,
    own_filters: Vec<String>,
    own: std::collections::HashSet<String>,
}

impl ResponseTopics {
    pub fn new(config: &Config) -> Self {
        let mut own = std::collections::HashSet::new();
        own.insert(config.mqtt.status_topic.clone());
        for d in &config.devices {
            own.insert(d.topic.clone());
            own.insert(d.status_topic.clone());
            for (p, c) in d.points.iter().zip(&d.commands) {
                own.insert(p.topic.clone());
                own.insert(c.topic.clone());
                own.insert(c.result_topic.clone());
            }
        }
        own.remove("");
        ResponseTopics {
            allow: config.mqtt.response_topics.clone(),
            own_filters: vec![format!("{}/#", config.gateway.prefix)],
            own,
        }
    }

    /// `Err` with the reason when the result must not go to `topic`.
    pub fn check(&self, topic: &str) -> Result<(), &'static str> {
        if !valid_response_topic(topic) {
            return Err("not a topic one can publish to (empty, wildcard, `$` or too long)");
        }
        if self.own.contains(topic) || self.own_filters.iter().any(|f| topic_matches(f, topic)) {
            return Err("one of the gateway's own topics");
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|f| topic_matches(f, topic)) {
            return Err("outside mqtt.response_topics");
        }
        Ok(())
    }
}

/// `(device, point)` of a topic of the default form `{prefix}/{device}/{point}/set`.
pub fn parse_default_topic<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, &'t str)> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let rest = rest.strip_suffix("/set")?;
    let (device, point) = rest.split_once('/')?;
    (!point.contains('/')).then_some((device, point))
}

/// Why a command was not executed, or failed: `reason` is machine-readable.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: String,
    pub error: String,
}

impl Refusal {
    pub fn new(reason: impl Into<String>, error: impl Into<String>) -> Self {
        Refusal {
            reason: reason.into(),
            error: error.into(),
        }
    }
}

/// A parsed command payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub value: Value,
    pub id: Option<String>,
    pub expires: Option<SystemTime>,
    /// When the sender says it sent the command (for `max_age`).
    pub ts: Option<SystemTime>,
}

fn bad(error: impl Into<String>) -> Refusal {
    Refusal::new("bad_payload", error)
}

/// Parses a payload: a bare value (`21.5`, `true`, `"AUTO"`, or unquoted text such as `AUTO`)
/// or a JSON object `{"value": .., "id": .., "expires": .., "ts": ..}` (no other keys).
pub fn parse_payload(payload: &[u8]) -> Result<Command, Refusal> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Refusal::new(
            "too_large",
            format!("payload of {} bytes exceeds {MAX_PAYLOAD}", payload.len()),
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|_| bad("payload is not UTF-8"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(bad("payload is empty"));
    }
    let json: Json = match serde_json::from_str(text) {
        Ok(j) => j,
        // JSON that is broken, not plain text that happens not to be JSON.
        Err(e) if text.starts_with(['{', '[', '"']) => {
            return Err(bad(format!("malformed JSON: {e}")))
        }
        Err(_) => {
            return Ok(Command {
                value: Value::Text(text.to_string()),
                id: None,
                expires: None,
                ts: None,
            })
        }
    };
    let Json::Object(map) = json else {
        let value =
            json_value(&json).ok_or_else(|| bad("the value must be a number, bool or string"))?;
        return Ok(Command {
            value,
            id: None,
            expires: None,
            ts: None,
        });
    };
    let mut cmd = Command {
        value: Value::Bool(false),
        id: None,
        expires: None,
        ts: None,
    };
    let mut have_value = false;
    for (k, v) in &map {
        match k.as_str() {
            "value" => {
                cmd.value =
                    json_value(v).ok_or_else(|| bad("`value` must be a number, bool or string"))?;
                have_value = true;
            }
            "id" => {
                cmd.id = match v {
                    Json::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
                    Json::Number(n) => Some(n.to_string()),
                    Json::Null => None,
                    _ => return Err(bad("`id` must be a string (1 to 256 bytes) or a number")),
                }
            }
            "expires" | "ts" => {
                let t = v.as_str().and_then(parse_time).ok_or_else(|| {
                    bad(format!(
                        "`{k}` must be an RFC 3339 time, e.g. 2026-01-01T12:00:00Z"
                    ))
                })?;
                if k == "ts" {
                    cmd.ts = Some(t);
                } else {
                    cmd.expires = Some(t);
                }
            }
            other => {
                return Err(bad(format!(
                    "unknown key `{other}` (keys: value, id, expires, ts)"
                )))
            }
        }
    }
    if !have_value {
        return Err(bad("the JSON object has no `value`"));
    }
    Ok(cmd)
}

fn json_value(j: &Json) -> Option<Value> {
    Some(match j {
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64()?)
            }
        }
        Json::String(s) => Value::Text(s.clone()),
        _ => return None,
    })
}

/// RFC 3339 with `Z` or a numeric offset (`+02:00`), fractions optional.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Some(base) = s.strip_suffix(['Z', 'z']) {
        return humantime::parse_rfc3339_weak(base).ok();
    }
    if s.len() < 6 || !s.is_char_boundary(s.len() - 6) {
        return None;
    }
    let (base, off) = s.split_at(s.len() - 6);
    let b = off.as_bytes();
    if !matches!(b[0], b'+' | b'-') || b[3] != b':' {
        return None;
    }
    let hours: u64 = off[1..3].parse().ok()?;
    let minutes: u64 = off[4..6].parse().ok()?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    // Local time = UTC + offset.
    if b[0] == b'+' {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

/// How far a sender's clock may be ahead of ours: a `ts` later than now by more than this is
/// refused (`clock_skew`), and with `max_age` an `expires` may lie at most `max_age` plus
/// this ahead. A `ts` in the future would otherwise pass any `max_age` for ever.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The wall clock as commands see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    pub now: SystemTime,
    /// `false` while the clock is known to be wrong (not yet synchronised, or earlier than
    /// the build): commands that depend on time are then refused.
    pub synchronised: bool,
}

impl Clock {
    /// The system clock, judged by `policy` (see [`crate::model::ClockPolicy`]).
    pub fn system(policy: ClockPolicy) -> Clock {
        let now = SystemTime::now();
        let built = SystemTime::UNIX_EPOCH + Duration::from_secs(build_unix());
        // A day of margin for a builder whose clock ran ahead.
        let after_build = now + Duration::from_secs(86_400) >= built;
        let synchronised = after_build
            && match policy {
                ClockPolicy::Local => true,
                ClockPolicy::Ntp => kernel_clock_synchronised(),
            };
        // Debug builds only: lets a test see an unsynchronised clock on any machine.
        #[cfg(debug_assertions)]
        let synchronised =
            synchronised && std::env::var_os("FIELDBRIDGE_TEST_CLOCK_UNSYNCED").is_none();
        Clock { now, synchronised }
    }
}

/// When this binary was built, seconds since the epoch (build.rs).
pub fn build_unix() -> u64 {
    env!("FIELDBRIDGE_BUILD_UNIX").parse().unwrap_or(0)
}

/// Whether the kernel says an NTP client keeps the clock synchronised: `adjtimex(2)` in
/// read-only mode answers `TIME_ERROR` while `STA_UNSYNC` is set, which it is from boot until
/// systemd-timesyncd, chrony or ntpd first set the time.
#[cfg(target_os = "linux")]
pub fn kernel_clock_synchronised() -> bool {
    // SAFETY: `timex` is plain data; modes = 0 only reads the kernel's state.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    state >= 0 && state != libc::TIME_ERROR && t.status & libc::STA_UNSYNC == 0
}

#[cfg(not(target_os = "linux"))]
pub fn kernel_clock_synchronised() -> bool {
    true
}

/// Refuses a command past its `expires`, or older than `max_age` by its `ts`; and every
/// command that depends on time while the clock cannot judge it, or whose time is beyond
/// [`CLOCK_SKEW`] of ours.
pub fn check_expiry(cmd: &Command, max_age: Option<Duration>, clock: Clock) -> Result<(), Refusal> {
    let now = clock.now;
    let timed = max_age.is_some() || cmd.expires.is_some();
    if timed && !clock.synchronised {
        return Err(Refusal::new(
            "clock_unsynchronised",
            "the gateway's clock is not synchronised (no NTP sync yet, or earlier than the build): commands that carry or need a time are refused until it is (gateway.clock: local trusts a real-time clock)",
        ));
    }
    if let Some(ts) = cmd.ts.filter(|_| clock.synchronised) {
        if let Ok(ahead) = ts.duration_since(now) {
            if ahead > CLOCK_SKEW {
                return Err(Refusal::new(
                    "clock_skew",
                    format!(
                        "`ts` is {} ahead of the gateway's clock (tolerance {}): check the sender's clock",
                        fmt_ms(ahead),
                        fmt_ms(CLOCK_SKEW)
                    ),
                ));
            }
        }
    }
    if let Some(expires) = cmd.expires {
        if now > expires {
            return Err(Refusal::new(
                "expired",
                format!(
                    "expired {} ago",
                    fmt_ms(now.duration_since(expires).unwrap_or_default())
                ),
            ));
        }
    }
    if let Some(max_age) = max_age {
        match cmd.ts {
            Some(ts) => {
                // A sender clock ahead of ours (within the tolerance) gives a negative age.
                let age = now.duration_since(ts).unwrap_or_default();
                if age > max_age {
                    return Err(Refusal::new(
                        "expired",
                        format!("sent {} ago, max_age is {}", fmt_ms(age), fmt_ms(max_age)),
                    ));
                }
            }
            None => match cmd.expires {
                // `expires` alone stands in for the age only within max_age (+ skew): a far
                // future one would outlive the point's policy.
                Some(expires) => {
                    let ahead = expires.duration_since(now).unwrap_or_default();
                    if ahead > max_age + CLOCK_SKEW {
                        return Err(Refusal::new(
                            "clock_skew",
                            format!(
                                "`expires` is {} ahead, more than this point's max_age {} (+{} tolerance): send `ts`",
                                fmt_ms(ahead),
                                fmt_ms(max_age),
                                fmt_ms(CLOCK_SKEW)
                            ),
                        ));
                    }
                }
                None => {
                    return Err(Refusal::new(
                        "missing_timestamp",
                        "this point has max_age: send JSON with `ts` (send time) or `expires`",
                    ))
                }
            },
        }
    }
    Ok(())
}

/// The last moment a command may still be written, on the monotonic clock: the earliest of
/// the MQTT 5 message expiry, `expires`, and `ts + max_age`, taken from the wall clock at
/// `received`. Checked again when the bus takes the command. (A wall time too far ahead for
/// the monotonic clock is no deadline.)
pub fn deadline(
    cmd: &Command,
    max_age: Option<Duration>,
    mqtt_expiry: Option<Instant>,
    clock: Clock,
    received: Instant,
) -> Option<Instant> {
    let onto =
        |wall: SystemTime| received.checked_add(wall.duration_since(clock.now).unwrap_or_default());
    let expires = cmd.expires.and_then(onto);
    let aged = match (cmd.ts, max_age) {
        (Some(ts), Some(age)) => ts.checked_add(age).and_then(onto),
        _ => None,
    };
    mqtt_expiry.into_iter().chain(expires).chain(aged).min()
}

fn fmt_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The bus operation(s) of one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// One write request.
    Write(Write),
    /// Read the holding register, set or clear the bit, write it back.
    SetBit {
        address: u16,
        bit: u8,
        on: bool,
        multiple: bool,
    },
    /// Send a line to a line device (see [`crate::lines::command_plan`]); with `reply`, the
    /// regex its answer must match.
    Line {
        bytes: Vec<u8>,
        reply: Option<String>,
    },
}

/// A validated command, ready for the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub step: Step,
    /// The raw value written (after rounding).
    pub raw: Raw,
}

pub(crate) fn refusal_of(e: &CodecError) -> Refusal {
    let reason = match e {
        CodecError::OutOfRange { .. } | CodecError::OutOfBounds { .. } => "out_of_range",
        CodecError::UnknownLabel(_) => "unknown_label",
        CodecError::NotRepresentable { .. } => "not_representable",
        CodecError::TypeMismatch(_) | CodecError::NotANumber | CodecError::NotAscii(_) => {
            "wrong_type"
        }
        CodecError::WrongLength { .. } | CodecError::NeedsReadModifyWrite => "internal",
    };
    Refusal::new(reason, e.to_string())
}

/// Validates `value` against `point` and encodes it into the bus operation to run.
///
/// Bool points (coils, bits) also take 0 and 1. Every number maps to exactly one raw value:
/// an integer point refuses a value, whole or not, that is not a whole number of its
/// resolution (21.55 with scale 0.1; 20 with offset -273.15), instead of rounding it; the
/// bounds are checked on the value that will be written (see [`codec::from_value`]), and
/// [`Plan::raw`] decodes to exactly that value.
pub fn plan(point: &Point, cmd: &PointCommand, value: &Value) -> Result<Plan, Refusal> {
    if !point.writable {
        return Err(Refusal::new("not_writable", "the point is not writable"));
    }
    let is_bool = matches!(point.data_type, DataType::Bool | DataType::Bit(_));
    let value = match (is_bool, value) {
        (true, Value::Int(0) | Value::UInt(0)) => Value::Bool(false),
        (true, Value::Int(1) | Value::UInt(1)) => Value::Bool(true),
        _ => value.clone(),
    };
    let raw = codec::from_value(point, &value).map_err(|e| refusal_of(&e))?;
    let a = point.address;
    let step = match (point.kind, point.data_type, &raw) {
        (RegisterKind::Coil, _, Raw::Bool(b)) if cmd.write_multiple => {
            Step::Write(Write::MultipleCoils(a, vec![*b]))
        }
        (RegisterKind::Coil, _, Raw::Bool(b)) => Step::Write(Write::SingleCoil(a, *b)),
        (RegisterKind::Holding, DataType::Bit(bit), Raw::Bool(on)) => match cmd.bit_write {
            BitWrite::Mask => {
                let mask = 1u16 << bit;
                Step::Write(Write::MaskWrite(a, !mask, if *on { mask } else { 0 }))
            }
            BitWrite::ReadModifyWrite => Step::SetBit {
                address: a,
                bit,
                on: *on,
                multiple: cmd.write_multiple,
            },
        },
        (RegisterKind::Holding, dt, raw) => {
            let regs = codec::encode(dt, point.order, raw).map_err(|e| refusal_of(&e))?;
            if regs.len() == 1 && !cmd.write_multiple {
                Step::Write(Write::SingleRegister(a, regs[0]))
            } else {
                Step::Write(Write::MultipleRegisters(a, regs))
            }
        }
        _ => {
            return Err(Refusal::new(
                "not_writable",
                "only coils and holding registers can be written",
            ))
        }
    };
    Ok(Plan { step, raw })
}

/// The write of a read-modify-write, from the register as read.
pub fn set_bit_write(address: u16, reg: u16, bit: u8, on: bool, multiple: bool) -> Write {
    let new = codec::set_bit(reg, bit, on);
    if multiple {
        Write::MultipleRegisters(address, vec![new])
    } else {
        Write::SingleRegister(address, new)
    }
}

/// A point's value as JSON, with its label when it has one (as the publisher shows it).
pub fn value_json(point: &Point, raw: &Raw) -> (Json, Option<Json>) {
    let v = publish::value_json(&codec::to_value(point, raw));
    match codec::label(point, raw) {
        Some(l) => (Json::String(l.to_string()), Some(v)),
        None => (v, None),
    }
}

/// Result of an executed command.
pub fn ok_result(
    device: &str,
    point: &Point,
    id: Option<&str>,
    raw: &Raw,
    written_at: SystemTime,
    read_back: bool,
) -> Map<String, Json> {
    let mut m = Map::new();
    m.insert(
        "id".into(),
        id.map_or(Json::Null, |i| Json::String(i.into())),
    );
    m.insert("ok".into(), Json::Bool(true));
    let (value, raw_json) = value_json(point, raw);
    m.insert("value".into(), value);
    if let Some(r) = raw_json {
        m.insert("raw".into(), r);
    }
    m.insert("read_back".into(), Json::Bool(read_back));
    m.insert(
        "written_at".into(),
        Json::String(publish::rfc3339_millis(written_at)),
    );
    m.insert("device".into(), Json::String(device.into()));
    m.insert("point".into(), Json::String(point.name.clone()));
    m
}

/// Result of a refused or failed command.
pub fn err_result(
    device: Option<&str>,
    point: Option<&str>,
    id: Option<&str>,
    r: &Refusal,
) -> Map<String, Json> {
    let mut m = Map::new();
    m.insert(
        "id".into(),
        id.map_or(Json::Null, |i| Json::String(i.into())),
    );
    m.insert("ok".into(), Json::Bool(false));
    m.insert("error".into(), Json::String(r.error.clone()));
    m.insert("reason".into(), Json::String(r.reason.clone()));
    if let Some(d) = device {
        m.insert("device".into(), Json::String(d.into()));
    }
    if let Some(p) = point {
        m.insert("point".into(), Json::String(p.into()));
    }
    m
}

/// Token bucket: `count` commands, refilled at `count` per `per`.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    capacity: f64,
    per_token: Duration,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: crate::model::Rate, now: Instant) -> Self {
        RateLimiter {
            capacity: f64::from(rate.count),
            per_token: rate.per / rate.count.max(1),
            tokens: f64::from(rate.count),
            last: now,
        }
    }

    /// Takes a token if one is left.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens
            + elapsed.as_secs_f64() / self.per_token.as_secs_f64().max(1e-9))
        .min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What happened to a command id of one point.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// Still executing; `waiting` holds each further delivery's MQTT 5 response wish (none
    /// when it asked for none): every one gets the result when it comes.
    Pending {
        waiting: Vec<Option<Reply>>,
    },
    Done(Map<String, Json>),
}

/// Where an MQTT 5 request wants its answer: a copy of the result goes there, with the
/// request's correlation data.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
}

/// The last [`REMEMBERED_IDS`] ids of one point with their outcome.
#[derive(Debug, Default, Clone)]
pub struct RecentIds {
    entries: VecDeque<(String, Seen)>,
}

impl RecentIds {
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Seen> {
        self.entries
            .iter_mut()
            .find(|(i, _)| i == id)
            .map(|(_, s)| s)
    }

    /// Forgets `id` (a refusal that a retry may overcome: busy, unavailable).
    pub fn forget(&mut self, id: &str) {
        self.entries.retain(|(i, _)| i != id);
    }

    /// Forgets the ids still executing (their outcome will not be known here).
    pub fn retain_done(&mut self) {
        self.entries.retain(|(_, s)| matches!(s, Seen::Done(_)));
    }

    /// Records `id` (new, or updates it); the oldest id is forgotten beyond the cap.
    pub fn put(&mut self, id: &str, seen: Seen) {
        if let Some(s) = self.get_mut(id) {
            *s = seen;
            return;
        }
        if self.entries.len() >= REMEMBERED_IDS {
            // The oldest finished one: an id still executing must stay known, or its
            // redelivery would run again. (Executing ids are bounded by the bus's queue.)
            if let Some(i) = self
                .entries
                .iter()
                .position(|(_, s)| matches!(s, Seen::Done(_)))
            {
                self.entries.remove(i);
            }
        }
        self.entries.push_back((id.to_string(), seen));
    }
}

/// What the command path remembers of one point: the outcome of recent command ids and its
/// rate limiter.
#[derive(Debug, Default)]
pub struct PointState {
    pub ids: RecentIds,
    pub limiter: Option<RateLimiter>,
}

/// A command for a known point, as far as the decision needs it.
#[derive(Debug, Clone)]
pub struct Arrival<'a> {
    pub payload: &'a [u8],
    /// Sent by the broker as a retained message.
    pub retain: bool,
    /// The MQTT 5 message expiry, on the monotonic clock.
    pub mqtt_expiry: Option<Instant>,
    /// Where an MQTT 5 request wants its answer (already checked).
    pub reply: Option<Reply>,
    pub received: Instant,
    pub clock: Clock,
}

/// What to do with a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Refused (the refusal is remembered under `id` when there is one): answer it.
    Refuse {
        refusal: Refusal,
        id: Option<String>,
    },
    /// This id was answered before: publish that result again, marked as a duplicate.
    Duplicate(Map<String, Json>),
    /// This id is executing: the delivery waits for its result (`kept`), or is ignored
    /// because [`MAX_WAITING`] deliveries already wait.
    Waiting { kept: bool },
    /// Valid: run `plan` on the bus, not after `deadline` (the id is marked executing).
    Execute {
        plan: Plan,
        id: Option<String>,
        deadline: Option<Instant>,
    },
}

/// The whole decision on a command for point `p` of device `d`, in order: the point's rate
/// limit (first, so that refused and repeated commands count too), retained, payload, a
/// remembered id, expiry and the clock, then the schema. Updates `state` (rate tokens, the id's
/// outcome); does no I/O.
pub fn decide(
    config: &Config,
    d: usize,
    p: usize,
    state: &mut PointState,
    arrival: Arrival<'_>,
) -> Verdict {
    let device = &config.devices[d];
    let point = &device.points[p];
    let settings = &device.commands[p];
    let refuse = |reason: &str, error: &str| Verdict::Refuse {
        refusal: Refusal::new(reason, error),
        id: None,
    };
    // The token is taken first, so that refused and repeated commands count too; a known id
    // is still answered with its outcome (a redelivery of a write that happened must not read
    // as a failure).
    let within_rate = match settings.rate {
        Some(rate) => state
            .limiter
            .get_or_insert_with(|| RateLimiter::new(rate, arrival.received))
            .allow(arrival.received),
        None => true,
    };
    if arrival.retain {
        // The broker replays a retained message on every subscribe: after each reconnect
        // and restart it would write its value again.
        return refuse(
            "retained",
            "retained commands are never executed (they come back after every reconnect): publish commands without the retain flag, and clear this one with an empty retained message",
        );
    }
    let cmd = match parse_payload(arrival.payload) {
        Ok(c) => c,
        Err(refusal) => return Verdict::Refuse { refusal, id: None },
    };
    if let Some(id) = &cmd.id {
        match state.ids.get_mut(id) {
            Some(Seen::Pending { waiting }) => {
                let kept = waiting.len() < MAX_WAITING;
                if kept {
                    waiting.push(arrival.reply);
                }
                return Verdict::Waiting { kept };
            }
            Some(Seen::Done(body)) => {
                let mut body = body.clone();
                body.insert("duplicate".into(), Json::Bool(true));
                return Verdict::Duplicate(body);
            }
            None => {}
        }
    }
    if !within_rate {
        return refuse(
            "rate_limited",
            "too many commands for this point: see its command.rate",
        );
    }
    let checked = match arrival.mqtt_expiry {
        Some(t) if arrival.received > t => Err(Refusal::new(
            "expired",
            "the MQTT 5 message expiry interval had passed when the command arrived",
        )),
        _ => Ok(()),
    }
    .and_then(|()| check_expiry(&cmd, settings.max_age, arrival.clock))
    .and_then(|()| match device.line {
        Some(_) => crate::lines::command_plan(config, d, p, &cmd.value),
        None => plan(point, settings, &cmd.value),
    });
    match checked {
        Ok(plan) => {
            if let Some(id) = &cmd.id {
                state.ids.put(
                    id,
                    Seen::Pending {
                        waiting: Vec::new(),
                    },
                );
            }
            Verdict::Execute {
                plan,
                deadline: deadline(
                    &cmd,
                    settings.max_age,
                    arrival.mqtt_expiry,
                    arrival.clock,
                    arrival.received,
                ),
                id: cmd.id,
            }
        }
        Err(refusal) => {
            // Final refusals are remembered; a clock not yet synchronised may be by the retry.
            let lasting = refusal.reason != "clock_unsynchronised";
            if let (Some(id), true) = (&cmd.id, lasting) {
                let body = err_result(Some(&device.name), Some(&point.name), Some(id), &refusal);
                state.ids.put(id, Seen::Done(body));
            }
            Verdict::Refuse {
                refusal,
                id: cmd.id,
            }
        }
    }
}

/// A topic shortened for a log line (a received one can be 64 KiB).
pub fn log_topic(topic: &str) -> String {
    log_text(topic.as_bytes())
}

/// `payload` shortened for a log line.
pub fn log_text(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    let mut t: String = text.chars().take(80).collect();
    if text.chars().count() > 80 {
        t.push('…');
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PayloadFormat, PublishPolicy, Qos, Rate, WordOrder};
    use std::collections::BTreeMap;

    fn point(kind: RegisterKind, data_type: DataType) -> Point {
        Point {
            name: "p".into(),
            kind,
            address: 10,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            labels: BTreeMap::new(),
            group: 0,
            topic: "t/d/p".into(),
            payload: PayloadFormat::Json,
            publish: PublishPolicy::EveryPoll,
            qos: Qos::AtLeastOnce,
            retain: false,
            writable: true,
            min: None,
            max: None,
        }
    }

    fn settings() -> PointCommand {
        PointCommand {
            topic: "t/d/p/set".into(),
            result_topic: "t/d/p/set/result".into(),
            write_multiple: false,
            bit_write: BitWrite::ReadModifyWrite,
            read_back: false,
            max_age: None,
            rate: None,
        }
    }

    fn step(p: &Point, c: &PointCommand, v: Value) -> Result<Step, String> {
        plan(p, c, &v).map(|p| p.step).map_err(|r| r.reason)
    }

    #[test]
    fn filters_match_like_mqtt() {
        assert!(topic_matches("t/+/+/set", "t/d/p/set"));
        assert!(!topic_matches("t/+/+/set", "t/d/p/set/result"));
        assert!(!topic_matches("t/+/+/set", "t/d/set"));
        assert!(topic_matches("t/#", "t/a/b"));
        assert!(!topic_matches("+/x", "$SYS/x"));
        assert_eq!(parse_default_topic("a/b", "a/b/d/p/set"), Some(("d", "p")));
        assert_eq!(parse_default_topic("a/b", "a/b/d/p/q/set"), None);
    }

    #[test]
    fn payloads_are_bare_values_or_json_objects() {
        assert_eq!(parse_payload(b"21.5").unwrap().value, Value::Float(21.5));
        assert_eq!(parse_payload(b" true ").unwrap().value, Value::Bool(true));
        assert_eq!(
            parse_payload(b"\"AUTO\"").unwrap().value,
            Value::Text("AUTO".into())
        );
        assert_eq!(
            parse_payload(b"AUTO").unwrap().value,
            Value::Text("AUTO".into())
        );
        let c = parse_payload(br#"{"value": 7, "id": "a1", "expires": "2030-01-01T00:00:00Z"}"#)
            .unwrap();
        assert_eq!(c.value, Value::Int(7));
        assert_eq!(c.id.as_deref(), Some("a1"));
        assert!(c.expires.is_some());
        assert_eq!(
            parse_payload(br#"{"id": 5, "value": 1}"#)
                .unwrap()
                .id
                .as_deref(),
            Some("5")
        );
        for bad_one in [
            &br#"{"value": 1"#[..],
            br#"{"velue": 1}"#,
            br#"{"id": "x"}"#,
            br#"{"value": [1]}"#,
            br#"{"value": 1, "expires": "tomorrow"}"#,
            b"",
            b"\xff\xfe",
            b"[1,2]",
        ] {
            assert_eq!(
                parse_payload(bad_one).unwrap_err().reason,
                "bad_payload",
                "{:?}",
                String::from_utf8_lossy(bad_one)
            );
        }
        assert_eq!(
            parse_payload(&vec![b'1'; MAX_PAYLOAD + 1])
                .unwrap_err()
                .reason,
            "too_large"
        );
    }

    #[test]
    fn times_take_z_or_an_offset() {
        let z = parse_time("2026-01-01T12:00:00Z").unwrap();
        assert_eq!(parse_time("2026-01-01T14:00:00+02:00"), Some(z));
        assert_eq!(parse_time("2026-01-01T11:30:00.000-00:30"), Some(z));
        assert_eq!(parse_time("2026-01-01 12:00"), None);
    }

    #[test]
    fn expiry_uses_expires_or_ts_with_max_age() {
        let now = Clock {
            now: parse_time("2026-01-01T12:00:00Z").unwrap(),
            synchronised: true,
        };
        let mut c = parse_payload(br#"{"value": 1, "expires": "2026-01-01T11:59:59Z"}"#).unwrap();
        assert_eq!(check_expiry(&c, None, now).unwrap_err().reason, "expired");
        c.expires = parse_time("2026-01-01T12:00:01Z");
        assert!(check_expiry(&c, None, now).is_ok());
        let age = Some(Duration::from_secs(10));
        let mut t = parse_payload(br#"{"value": 1, "ts": "2026-01-01T11:59:55Z"}"#).unwrap();
        assert!(check_expiry(&t, age, now).is_ok());
        t.ts = parse_time("2026-01-01T11:59:00Z");
        assert_eq!(check_expiry(&t, age, now).unwrap_err().reason, "expired");
        let bare = parse_payload(b"1").unwrap();
        assert!(check_expiry(&bare, None, now).is_ok());
        assert_eq!(
            check_expiry(&bare, age, now).unwrap_err().reason,
            "missing_timestamp"
        );
    }

    #[test]
    fn a_time_beyond_the_clock_skew_is_refused() {
        let now = Clock {
            now: parse_time("2026-01-01T12:00:00Z").unwrap(),
            synchronised: true,
        };
        let age = Some(Duration::from_secs(10));
        // A `ts` in the future passed any max_age for ever.
        let far = parse_payload(br#"{"value": 1, "ts": "9999-12-31T00:00:00Z"}"#).unwrap();
        assert_eq!(
            check_expiry(&far, age, now).unwrap_err().reason,
            "clock_skew"
        );
        assert_eq!(
            check_expiry(&far, None, now).unwrap_err().reason,
            "clock_skew"
        );
        let near = parse_payload(br#"{"value": 1, "ts": "2026-01-01T12:00:20Z"}"#).unwrap();
        assert!(check_expiry(&near, age, now).is_ok());
        // With max_age, `expires` alone may not reach past it (+ the tolerance).
        let long = parse_payload(br#"{"value": 1, "expires": "2026-01-02T00:00:00Z"}"#).unwrap();
        assert_eq!(
            check_expiry(&long, age, now).unwrap_err().reason,
            "clock_skew"
        );
        assert!(check_expiry(&long, None, now).is_ok());
        let short = parse_payload(br#"{"value": 1, "expires": "2026-01-01T12:00:30Z"}"#).unwrap();
        assert!(check_expiry(&short, age, now).is_ok());
    }

    #[test]
    fn an_unsynchronised_clock_refuses_every_command_that_depends_on_time() {
        // A Pi without a real-time clock booted at its last saved time: `expires` long past
        // looks valid.
        let early = Clock {
            now: parse_time("2024-06-01T00:00:00Z").unwrap(),
            synchronised: false,
        };
        let old = parse_payload(br#"{"value": 1, "expires": "2025-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(
            check_expiry(&old, None, early).unwrap_err().reason,
            "clock_unsynchronised"
        );
        let bare = parse_payload(b"1").unwrap();
        assert!(check_expiry(&bare, None, early).is_ok());
        assert_eq!(
            check_expiry(&bare, Some(Duration::from_secs(5)), early)
                .unwrap_err()
                .reason,
            "clock_unsynchronised"
        );
        // A clock earlier than the build is never synchronised, whatever the policy.
        assert!(build_unix() > 1_700_000_000);
    }

    #[test]
    fn the_deadline_is_the_earliest_of_every_expiry() {
        let clock = Clock {
            now: parse_time("2026-01-01T12:00:00Z").unwrap(),
            synchronised: true,
        };
        let t0 = Instant::now();
        let c = parse_payload(br#"{"value": 1, "ts": "2026-01-01T11:59:58Z"}"#).unwrap();
        // ts + max_age = 12:00:08: 8 s from now.
        let d = deadline(&c, Some(Duration::from_secs(10)), None, clock, t0);
        assert_eq!(d, Some(t0 + Duration::from_secs(8)));
        assert_eq!(deadline(&c, None, None, clock, t0), None);
        let mqtt = Some(t0 + Duration::from_secs(3));
        assert_eq!(
            deadline(&c, Some(Duration::from_secs(10)), mqtt, clock, t0),
            mqtt
        );
        let e = parse_payload(br#"{"value": 1, "expires": "2026-01-01T12:00:05Z"}"#).unwrap();
        assert_eq!(
            deadline(&e, None, None, clock, t0),
            Some(t0 + Duration::from_secs(5))
        );
    }

    #[test]
    fn response_topics_never_reach_the_gateways_own() {
        let mut config = crate::config::parse(
            "gateway: { id: gw1, prefix: plant/gw1 }\nmqtt: { host: 127.0.0.1 }\nbuses:\n  - { name: b, type: tcp, host: 127.0.0.1, port: 502 }\ndevices:\n  - name: d\n    bus: b\n    unit: 1\n    points:\n      - { name: p, address: 0, type: u16, writable: true, topic: 'elsewhere/p' }\n",
            "t.yaml",
        )
        .unwrap();
        let r = ResponseTopics::new(&config);
        assert!(r.check("app/replies/42").is_ok());
        for own in [
            "plant/gw1/d/p",
            "plant/gw1/status",
            "plant/gw1/d/p/set",
            "plant/gw1/anything/at/all",
            "elsewhere/p",
        ] {
            assert!(r.check(own).is_err(), "{own}");
        }
        config.mqtt.response_topics = vec!["replies/#".into()];
        let r = ResponseTopics::new(&config);
        assert!(r.check("replies/x").is_ok());
        assert!(r.check("app/replies/42").is_err());
    }

    #[test]
    fn registers_take_fc6_or_fc16_in_the_point_order() {
        let c = settings();
        let p = point(RegisterKind::Holding, DataType::U16);
        assert_eq!(
            step(&p, &c, Value::Int(1234)),
            Ok(Step::Write(Write::SingleRegister(10, 1234)))
        );
        let forced = PointCommand {
            write_multiple: true,
            ..settings()
        };
        assert_eq!(
            step(&p, &forced, Value::Int(1234)),
            Ok(Step::Write(Write::MultipleRegisters(10, vec![1234])))
        );
        let mut f = point(RegisterKind::Holding, DataType::F32);
        f.order = WordOrder::Cdab;
        assert_eq!(
            step(&f, &c, Value::Float(230.1)),
            Ok(Step::Write(Write::MultipleRegisters(
                10,
                vec![0x199A, 0x4366]
            )))
        );
        let i = point(RegisterKind::Holding, DataType::I16);
        assert_eq!(
            step(&i, &c, Value::Int(-2)),
            Ok(Step::Write(Write::SingleRegister(10, 0xFFFE)))
        );
    }

    #[test]
    fn coils_and_bits_take_bools_or_zero_and_one() {
        let c = settings();
        let coil = point(RegisterKind::Coil, DataType::Bool);
        assert_eq!(
            step(&coil, &c, Value::Int(1)),
            Ok(Step::Write(Write::SingleCoil(10, true)))
        );
        assert_eq!(step(&coil, &c, Value::Int(2)), Err("wrong_type".into()));
        let fc15 = PointCommand {
            write_multiple: true,
            ..settings()
        };
        assert_eq!(
            step(&coil, &fc15, Value::Bool(false)),
            Ok(Step::Write(Write::MultipleCoils(10, vec![false])))
        );
        let bit = point(RegisterKind::Holding, DataType::Bit(3));
        assert_eq!(
            step(&bit, &c, Value::Bool(true)),
            Ok(Step::SetBit {
                address: 10,
                bit: 3,
                on: true,
                multiple: false
            })
        );
        let mask = PointCommand {
            bit_write: BitWrite::Mask,
            ..settings()
        };
        assert_eq!(
            step(&bit, &mask, Value::Bool(false)),
            Ok(Step::Write(Write::MaskWrite(10, !0x0008, 0)))
        );
        assert_eq!(
            set_bit_write(10, 0b0001, 3, true, false),
            Write::SingleRegister(10, 0b1001)
        );
    }

    #[test]
    fn values_outside_the_schema_are_refused_with_a_reason() {
        let c = settings();
        let mut p = point(RegisterKind::Holding, DataType::U16);
        p.scale = 0.1;
        p.min = Some(0.0);
        p.max = Some(100.0);
        assert_eq!(
            step(&p, &c, Value::Float(21.5)),
            Ok(Step::Write(Write::SingleRegister(10, 215)))
        );
        assert_eq!(
            step(&p, &c, Value::Float(100.1)),
            Err("out_of_range".into())
        );
        assert_eq!(
            step(&p, &c, Value::Float(21.55)),
            Err("not_representable".into())
        );
        assert_eq!(step(&p, &c, Value::Bool(true)), Err("wrong_type".into()));
        assert_eq!(
            step(&p, &c, Value::Text("AUTO".into())),
            Err("unknown_label".into())
        );
        let u = point(RegisterKind::Holding, DataType::U16);
        assert_eq!(step(&u, &c, Value::Int(70_000)), Err("out_of_range".into()));
        assert_eq!(step(&u, &c, Value::Int(-1)), Err("out_of_range".into()));
        let mut l = point(RegisterKind::Holding, DataType::U16);
        l.labels.insert(2, "AUTO".into());
        assert_eq!(
            step(&l, &c, Value::Text("AUTO".into())),
            Ok(Step::Write(Write::SingleRegister(10, 2)))
        );
        let s = point(RegisterKind::Holding, DataType::Ascii(2));
        assert_eq!(
            step(&s, &c, Value::Text("ABC".into())),
            Ok(Step::Write(Write::MultipleRegisters(
                10,
                vec![0x4142, 0x4300]
            )))
        );
        assert_eq!(
            step(&s, &c, Value::Text("ABCDE".into())),
            Err("out_of_range".into())
        );
        assert_eq!(step(&s, &c, Value::Int(1)), Err("wrong_type".into()));
        let mut ro = point(RegisterKind::Holding, DataType::U16);
        ro.writable = false;
        assert_eq!(step(&ro, &c, Value::Int(1)), Err("not_writable".into()));
    }

    #[test]
    fn whole_numbers_must_map_to_one_raw_value_too() {
        let c = settings();
        let mut kelvin = point(RegisterKind::Holding, DataType::U16);
        kelvin.scale = 0.1;
        kelvin.offset = -273.15;
        // (20 + 273.15) / 0.1 = 2931.5: no register value writes 20.
        assert_eq!(
            step(&kelvin, &c, Value::Int(20)),
            Err("not_representable".into())
        );
        assert_eq!(
            step(&kelvin, &c, Value::Float(20.0)),
            Err("not_representable".into())
        );
        assert_eq!(
            step(&kelvin, &c, Value::Float(20.05)),
            Ok(Step::Write(Write::SingleRegister(10, 2932)))
        );
        let mut tens = point(RegisterKind::Holding, DataType::U16);
        tens.scale = 10.0;
        tens.max = Some(19.0);
        // 15 would be raw 1.5, rounded to 2: 20 on the wire, above max.
        assert_eq!(
            step(&tens, &c, Value::Int(15)),
            Err("not_representable".into())
        );
        assert_eq!(step(&tens, &c, Value::Int(20)), Err("out_of_range".into()));
        assert_eq!(
            step(&tens, &c, Value::Int(10)),
            Ok(Step::Write(Write::SingleRegister(10, 1)))
        );
    }

    #[test]
    fn large_values_are_no_more_rounded_than_small_ones() {
        let c = settings();
        let u32p = point(RegisterKind::Holding, DataType::U32);
        assert_eq!(
            step(&u32p, &c, Value::Float(3_000_000_000.5)),
            Err("not_representable".into())
        );
        assert!(step(&u32p, &c, Value::Float(3_000_000_000.0)).is_ok());
        let mut milli = point(RegisterKind::Holding, DataType::I32);
        milli.scale = 0.001;
        assert_eq!(
            step(&milli, &c, Value::Float(600_000.000_4)),
            Err("not_representable".into())
        );
        assert!(step(&milli, &c, Value::Float(600_000.001)).is_ok());
        // A large offset adds its own float noise, which must not refuse an exact value.
        let mut far = point(RegisterKind::Holding, DataType::U16);
        far.scale = 0.001;
        far.offset = 1_000_000.0;
        assert!(step(&far, &c, Value::Float(1_000_000.001)).is_ok());
    }

    #[test]
    fn bounds_hold_for_the_value_written_not_the_value_asked() {
        let c = settings();
        // An f32 register holds 0.1 as 0.100000001490116: the result reports what it holds.
        let mut f = point(RegisterKind::Holding, DataType::F32);
        f.max = Some(0.1);
        let planned = plan(&f, &c, &Value::Float(0.1)).unwrap();
        assert_eq!(value_json(&f, &planned.raw).0, serde_json::json!(0.1));
        // Integers beyond 2^53 compare exactly: max 2^53 refuses 2^53 + 1.
        let mut big = point(RegisterKind::Holding, DataType::I64);
        big.max = Some(9_007_199_254_740_992.0);
        assert_eq!(
            step(&big, &c, Value::Int(9_007_199_254_740_993)),
            Err("out_of_range".into())
        );
        assert!(step(&big, &c, Value::Int(9_007_199_254_740_992)).is_ok());
        let mut frac = point(RegisterKind::Holding, DataType::I16);
        frac.min = Some(-2.5);
        assert_eq!(step(&frac, &c, Value::Int(-3)), Err("out_of_range".into()));
        assert!(step(&frac, &c, Value::Int(-2)).is_ok());
    }

    #[test]
    fn a_label_outside_the_bounds_is_refused_like_its_number() {
        let c = settings();
        let mut mode = point(RegisterKind::Holding, DataType::U16);
        mode.labels.insert(0, "OFF".into());
        mode.labels.insert(1, "ON".into());
        mode.labels.insert(2, "SERVICE".into());
        mode.max = Some(1.0);
        assert_eq!(
            step(&mode, &c, Value::Text("SERVICE".into())),
            Err("out_of_range".into())
        );
        assert_eq!(step(&mode, &c, Value::Int(2)), Err("out_of_range".into()));
        assert!(step(&mode, &c, Value::Text("ON".into())).is_ok());
    }

    /// The invariant the fuzz targets check too: what is written decodes back to the
    /// result's value, and that value is within the bounds.
    #[test]
    fn every_accepted_number_decodes_back_to_the_result_value() {
        let c = settings();
        for (scale, offset) in [
            (1.0, 0.0),
            (0.1, 0.0),
            (0.1, -273.15),
            (10.0, 0.0),
            (0.01, 5.0),
        ] {
            for dt in [DataType::U16, DataType::I16, DataType::I32, DataType::F32] {
                let mut p = point(RegisterKind::Holding, dt);
                p.scale = scale;
                p.offset = offset;
                p.min = Some(-50.0);
                p.max = Some(50.0);
                for i in -600..=600 {
                    let v = Value::Float(f64::from(i) / 10.0);
                    let Ok(planned) = plan(&p, &c, &v) else {
                        continue;
                    };
                    let regs = match &planned.step {
                        Step::Write(Write::SingleRegister(_, r)) => vec![*r],
                        Step::Write(Write::MultipleRegisters(_, r)) => r.clone(),
                        other => panic!("{other:?}"),
                    };
                    let back = codec::decode(dt, p.order, &regs).unwrap();
                    let wire = codec::to_value(&p, &back);
                    assert_eq!(value_json(&p, &planned.raw).0, publish::value_json(&wire));
                    let f = wire.as_f64().unwrap();
                    assert!((-50.0..=50.0).contains(&f), "{f} from {v:?} on {dt:?}");
                }
            }
        }
    }

    fn one_point_config(command: &str) -> Config {
        crate::config::parse(
            &format!("gateway: {{ id: gw, prefix: t }}\nmqtt: {{ host: 127.0.0.1 }}\nbuses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: 502 }}\ndevices:\n  - name: d\n    bus: b\n    points:\n      - {{ name: p, address: 0, writable: true, command: {{ {command} }} }}\n"),
            "t.yaml",
        )
        .unwrap()
    }

    fn arrival(payload: &[u8]) -> Arrival<'_> {
        Arrival {
            payload,
            retain: false,
            mqtt_expiry: None,
            reply: None,
            received: Instant::now(),
            clock: Clock {
                now: SystemTime::now(),
                synchronised: true,
            },
        }
    }

    fn reason(v: &Verdict) -> &str {
        match v {
            Verdict::Refuse { refusal, .. } => &refusal.reason,
            Verdict::Execute { .. } => "execute",
            Verdict::Duplicate(_) => "duplicate",
            Verdict::Waiting { .. } => "waiting",
        }
    }

    #[test]
    fn the_decision_refuses_retained_and_counts_refusals_against_the_rate() {
        let config = one_point_config("rate: 2/m");
        let mut state = PointState::default();
        let retained = Arrival {
            retain: true,
            ..arrival(b"1")
        };
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, retained)),
            "retained"
        );
        // The refusal above took a token: one good command, then the rate limit.
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(b"1"))),
            "execute"
        );
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(b"junk{"))),
            "rate_limited"
        );
    }

    #[test]
    fn a_redelivery_past_the_rate_limit_still_gets_its_outcome() {
        let config = one_point_config("rate: 1/m");
        let mut state = PointState::default();
        let cmd = br#"{"value": 1, "id": "a"}"#;
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(cmd))),
            "execute"
        );
        state.ids.put("a", Seen::Done(Map::new()));
        // The write happened: its redelivery is answered as such, not as rate_limited.
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(cmd))),
            "duplicate"
        );
        assert_eq!(
            reason(&decide(
                &config,
                0,
                0,
                &mut state,
                arrival(br#"{"value": 2, "id": "b"}"#)
            )),
            "rate_limited"
        );
    }

    #[test]
    fn the_decision_remembers_ids_and_bounds_the_waiting_deliveries() {
        let config = one_point_config("rate: none");
        let mut state = PointState::default();
        let cmd = br#"{"value": 1, "id": "a"}"#;
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(cmd))),
            "execute"
        );
        for _ in 0..MAX_WAITING {
            assert_eq!(
                decide(&config, 0, 0, &mut state, arrival(cmd)),
                Verdict::Waiting { kept: true }
            );
        }
        assert_eq!(
            decide(&config, 0, 0, &mut state, arrival(cmd)),
            Verdict::Waiting { kept: false }
        );
        state.ids.put("a", Seen::Done(Map::new()));
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(cmd))),
            "duplicate"
        );
        // A refused id is remembered as refused.
        let bad = br#"{"value": 70000, "id": "b"}"#;
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(bad))),
            "out_of_range"
        );
        assert_eq!(
            reason(&decide(&config, 0, 0, &mut state, arrival(bad))),
            "duplicate"
        );
    }

    #[test]
    fn the_rate_limiter_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(
            Rate {
                count: 2,
                per: Duration::from_secs(1),
            },
            t0,
        );
        assert!(r.allow(t0));
        assert!(r.allow(t0));
        assert!(!r.allow(t0));
        assert!(!r.allow(t0 + Duration::from_millis(400)));
        assert!(r.allow(t0 + Duration::from_millis(600)));
    }

    #[test]
    fn ids_are_remembered_up_to_the_cap_and_executing_ones_never_forgotten() {
        let mut ids = RecentIds::default();
        ids.put(
            "running",
            Seen::Pending {
                waiting: Vec::new(),
            },
        );
        for i in 0..REMEMBERED_IDS {
            ids.put(&i.to_string(), Seen::Done(Map::new()));
        }
        // Full: the oldest finished one went, not the older one still executing.
        assert!(ids.get_mut("0").is_none());
        assert!(ids.get_mut("1").is_some());
        assert!(matches!(ids.get_mut("running"), Some(Seen::Pending { .. })));
        ids.put(
            "1",
            Seen::Pending {
                waiting: Vec::new(),
            },
        );
        assert!(matches!(ids.get_mut("1"), Some(Seen::Pending { .. })));
        ids.forget("1");
        assert!(ids.get_mut("1").is_none());
    }

    #[test]
    fn response_topics_with_wildcards_or_system_prefix_are_refused() {
        assert!(valid_response_topic("app/replies/42"));
        assert!(valid_response_topic("a"));
        for bad in ["", "app/+/x", "app/#", "$SYS/x", "a\0b"] {
            assert!(!valid_response_topic(bad), "{bad:?}");
        }
        assert!(!valid_response_topic(&"x".repeat(MAX_TOPIC + 1)));
    }
}
