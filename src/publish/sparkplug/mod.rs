//! The Sparkplug B 3.0 encoding: the gateway is an edge node, each device a Sparkplug device,
//! each point a metric.
//!
//! - Topics: `spBv1.0/{group}/{NBIRTH|NDEATH|NDATA|NCMD}/{node}` and
//!   `spBv1.0/{group}/{DBIRTH|DDEATH|DDATA|DCMD}/{node}/{device}`.
//! - Node: NBIRTH (`seq` 0, `bdSeq`, `Node Control/Rebirth`, the gateway's own figures) first
//!   in every session; NDEATH (only `bdSeq`) is the last will. `bdSeq` goes up by one per
//!   connection attempt and is kept in a file next to the store, so it survives restarts.
//! - Devices: DBIRTH with every metric (datatype, current value or `is_null`, engineering unit
//!   and labels as properties) before any DDATA; DDATA with the changed metrics only, by alias;
//!   DDEATH when a device goes offline.
//! - `seq` (0–255, wrapping) is given when the link sends a message ([`Node::render`]), in the
//!   order the messages go on the wire, so that stored messages sent in a later session still
//!   count on from that session's NBIRTH. A DDATA that was held back is marked
//!   `is_historical` then too.
//!
//! The state the link needs at each CONNACK (the births, with the latest values) is shared
//! between the publisher's [`Encoding`] and the link's [`Node`] under one mutex.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use prost::Message as _;

use super::{CommandResult, Encoder, Sample};
use crate::link::{Announcer, OutMessage, Rendered, Will};
use crate::modbus::Reading;
use crate::model::{Config, DataType, Device, Point, Qos, Value};

pub mod proto;
use proto::{datatype, Metric, MetricValue, Payload, PropertyKind, PropertySet};

/// The namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";

/// [`OutMessage::kind`]s of the Sparkplug messages (rendered by [`Node::render`]).
pub const KIND_NBIRTH: u8 = 2;
/// DBIRTH, DDEATH: a `seq`, never historical.
pub const KIND_BIRTH: u8 = 3;
/// DDATA, NDATA: a `seq`, and `is_historical` on every metric when held back.
pub const KIND_DATA: u8 = 4;

/// Aliases of the node's own metrics; device metrics count on from [`FIRST_DEVICE_ALIAS`].
const ALIAS_BACKLOG: u64 = 1;
const ALIAS_DROPPED: u64 = 2;
const ALIAS_DEVICES_ONLINE: u64 = 3;
const ALIAS_COMMANDS_REFUSED: u64 = 4;
const ALIAS_COMMANDS_EXECUTED: u64 = 5;
const FIRST_DEVICE_ALIAS: u64 = 100;

/// The node metric names (for the births).
pub const NODE_METRICS: [(&str, u64); 5] = [
    ("Gateway/Backlog", ALIAS_BACKLOG),
    ("Gateway/Dropped", ALIAS_DROPPED),
    ("Gateway/Devices online", ALIAS_DEVICES_ONLINE),
    ("Gateway/Commands refused", ALIAS_COMMANDS_REFUSED),
    ("Gateway/Commands executed", ALIAS_COMMANDS_EXECUTED),
];

/// The gateway's own figures, as node metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeFigures {
    pub backlog: u64,
    pub dropped: u64,
    pub devices_online: u64,
    pub commands_refused: u64,
    pub commands_executed: u64,
}

impl NodeFigures {
    fn values(&self) -> [u64; 5] {
        [
            self.backlog,
            self.dropped,
            self.devices_online,
            self.commands_refused,
            self.commands_executed,
        ]
    }
}

/// Topics of one edge node.
#[derive(Debug, Clone)]
pub struct Topics {
    pub nbirth: String,
    pub ndeath: String,
    pub ndata: String,
    pub ncmd: String,
    pub dbirth: Vec<String>,
    pub ddeath: Vec<String>,
    pub ddata: Vec<String>,
    pub dcmd: Vec<String>,
    /// `spBv1.0/STATE/{host}` when a primary host is configured.
    pub state: Option<String>,
}

impl Topics {
    pub fn new(config: &Config) -> Option<Topics> {
        let s = config.sparkplug.as_ref()?;
        let node = |t: &str| format!("{NAMESPACE}/{}/{t}/{}", s.group_id, s.edge_node_id);
        let device = |t: &str| -> Vec<String> {
            config
                .devices
                .iter()
                .map(|d| format!("{}/{}", node(t), d.name))
                .collect()
        };
        Some(Topics {
            nbirth: node("NBIRTH"),
            ndeath: node("NDEATH"),
            ndata: node("NDATA"),
            ncmd: node("NCMD"),
            dbirth: device("DBIRTH"),
            ddeath: device("DDEATH"),
            ddata: device("DDATA"),
            dcmd: device("DCMD"),
            state: s
                .primary_host_id
                .as_ref()
                .map(|h| format!("{NAMESPACE}/STATE/{h}")),
        })
    }

    /// The filters the node subscribes to: its NCMD, its devices' DCMD, the primary host's
    /// STATE.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut out = vec![self.ncmd.clone()];
        out.push(format!("{}/+", self.ncmd.replace("/NCMD/", "/DCMD/")));
        out.extend(self.state.clone());
        out
    }
}

/// The alias of each device's points, by device and point index: unique across the node, and
/// the same on every start with the same configuration.
pub fn aliases(config: &Config) -> Vec<Vec<u64>> {
    let mut next = FIRST_DEVICE_ALIAS;
    config
        .devices
        .iter()
        .map(|d| {
            d.points
                .iter()
                .map(|_| {
                    let a = next;
                    next += 1;
                    a
                })
                .collect()
        })
        .collect()
}

/// The Sparkplug datatype that holds a point's values exactly.
pub fn point_datatype(point: &Point) -> u32 {
    #[allow(clippy::float_cmp)] // exactly the configured defaults
    let scaled = point.scale != 1.0 || point.offset != 0.0;
    match point.data_type {
        DataType::Bool | DataType::Bit(_) => datatype::BOOLEAN,
        DataType::Ascii(_) => datatype::STRING,
        _ if scaled => datatype::DOUBLE,
        DataType::U16 => datatype::UINT16,
        DataType::I16 => datatype::INT16,
        DataType::U32 => datatype::UINT32,
        DataType::I32 => datatype::INT32,
        DataType::U64 => datatype::UINT64,
        DataType::I64 => datatype::INT64,
        DataType::F32 => datatype::FLOAT,
        DataType::F64 => datatype::DOUBLE,
    }
}

/// A reading's value in the field its datatype names (signed integers as two's complement,
/// sign-extended to 32 bits for Int8/Int16/Int32, as Eclipse Tahu writes them). `None` for a
/// value the datatype cannot carry (a non-finite number in an integer, say).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn metric_value(t: u32, v: &Value) -> Option<MetricValue> {
    let int = |v: &Value| -> Option<i128> {
        match *v {
            Value::Int(i) => Some(i.into()),
            Value::UInt(u) => Some(u.into()),
            Value::Bool(b) => Some(b.into()),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 1.8e19 => Some(f as i128),
            _ => None,
        }
    };
    Some(match t {
        datatype::BOOLEAN => MetricValue::BooleanValue(match *v {
            Value::Bool(b) => b,
            Value::Int(i) => i != 0,
            Value::UInt(u) => u != 0,
            _ => return None,
        }),
        datatype::STRING | datatype::TEXT => MetricValue::StringValue(match v {
            Value::Text(t) => t.clone(),
            other => super::value_json(other).to_string(),
        }),
        datatype::FLOAT => MetricValue::FloatValue(v.as_f64()? as f32),
        datatype::DOUBLE => MetricValue::DoubleValue(v.as_f64()?),
        datatype::INT8 | datatype::INT16 | datatype::INT32 => {
            MetricValue::IntValue(i32::try_from(int(v)?).ok()? as u32)
        }
        datatype::UINT8 | datatype::UINT16 | datatype::UINT32 => {
            MetricValue::IntValue(u32::try_from(int(v)?).ok()?)
        }
        datatype::INT64 => MetricValue::LongValue(i64::try_from(int(v)?).ok()? as u64),
        datatype::UINT64 => MetricValue::LongValue(u64::try_from(int(v)?).ok()?),
        _ => return None,
    })
}

/// A command's metric value as the text of a command payload (a JSON literal), read by the
/// datatype the birth declared (not the one the command claims): `None` when the value is
/// not of that datatype.
#[allow(clippy::cast_possible_wrap)]
pub fn command_text(t: u32, v: &MetricValue) -> Option<String> {
    Some(match (t, v) {
        (datatype::BOOLEAN, MetricValue::BooleanValue(b)) => b.to_string(),
        (datatype::STRING | datatype::TEXT, MetricValue::StringValue(s)) => {
            serde_json::to_string(s).ok()?
        }
        (datatype::INT8 | datatype::INT16 | datatype::INT32, MetricValue::IntValue(u)) => {
            (*u as i32).to_string()
        }
        (datatype::UINT8 | datatype::UINT16 | datatype::UINT32, MetricValue::IntValue(u)) => {
            u.to_string()
        }
        // Some libraries write 32-bit integers in the 64-bit field.
        (datatype::INT8 | datatype::INT16 | datatype::INT32, MetricValue::LongValue(u)) => {
            i32::try_from(*u as i64).ok()?.to_string()
        }
        (datatype::UINT8 | datatype::UINT16 | datatype::UINT32, MetricValue::LongValue(u)) => {
            u32::try_from(*u).ok()?.to_string()
        }
        (datatype::INT64, MetricValue::LongValue(u)) => (*u as i64).to_string(),
        (datatype::UINT64, MetricValue::LongValue(u)) => u.to_string(),
        (datatype::FLOAT, MetricValue::FloatValue(f)) if f.is_finite() => f.to_string(),
        (datatype::DOUBLE, MetricValue::DoubleValue(f)) if f.is_finite() => f.to_string(),
        (datatype::DOUBLE, MetricValue::FloatValue(f)) if f.is_finite() => f.to_string(),
        _ => return None,
    })
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The last known state of one metric (for the births).
#[derive(Debug, Clone, PartialEq)]
enum Last {
    Unknown,
    Good(Value, u64),
    Bad(u64),
}

/// What the publisher's encoding and the link's announcer share.
struct State {
    /// `bdSeq` of the connection being made (its will) or made.
    bd_seq: u64,
    /// The next `seq` to give.
    seq: u64,
    /// Per device: online (as the bus says), born in the current session, last values.
    online: Vec<bool>,
    born: Vec<bool>,
    last: Vec<Vec<Last>>,
    /// Devices a session's births declared although they were offline: their DDEATH follows
    /// through the publisher (behind what the store holds for them).
    deaths_due: Vec<usize>,
    figures: NodeFigures,
    /// The timestamp of the newest primary host STATE seen.
    host_timestamp: u64,
    /// When the births of the current session (or rebirth) were made.
    session_start: Option<Instant>,
}

/// The edge node, as the link sees it: the will, the births, the goodbye and the `seq`.
pub struct Node {
    config: Arc<Config>,
    topics: Topics,
    aliases: Vec<Vec<u64>>,
    datatypes: Vec<Vec<u32>>,
    qos: Qos,
    bd_seq_file: Option<PathBuf>,
    state: Mutex<State>,
}

impl Node {
    /// The node of a Sparkplug configuration (`None` without one). `bdSeq` is read from (and
    /// kept in) `bdseq` next to the store, when there is one.
    pub fn new(config: &Config) -> Option<Arc<Node>> {
        let s = config.sparkplug.as_ref()?;
        let topics = Topics::new(config)?;
        let bd_seq_file = config
            .store
            .path
            .as_ref()
            .map(|p| bd_seq_path(p, &s.edge_node_id));
        let bd_seq = bd_seq_file.as_deref().map_or(0, read_bd_seq);
        let devices = config.devices.len();
        Some(Arc::new(Node {
            topics,
            aliases: aliases(config),
            datatypes: config
                .devices
                .iter()
                .map(|d| d.points.iter().map(point_datatype).collect())
                .collect(),
            qos: s.data_qos,
            bd_seq_file,
            state: Mutex::new(State {
                // The first will takes this one (`will` counts up before each connection).
                bd_seq: bd_seq.wrapping_sub(1),
                seq: 0,
                online: vec![false; devices],
                born: vec![false; devices],
                last: config
                    .devices
                    .iter()
                    .map(|d| vec![Last::Unknown; d.points.len()])
                    .collect(),
                deaths_due: Vec::new(),
                figures: NodeFigures::default(),
                host_timestamp: 0,
                session_start: None,
            }),
            config: Arc::new(config.clone()),
        }))
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn aliases(&self) -> &[Vec<u64>] {
        &self.aliases
    }

    pub fn datatypes(&self) -> &[Vec<u32>] {
        &self.datatypes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn message(&self, topic: &str, payload: &Payload, kind: u8, qos: Qos) -> OutMessage {
        OutMessage {
            topic: topic.to_owned(),
            payload: payload.encode_to_vec(),
            qos,
            retain: false,
            created: Instant::now(),
            correlation: None,
            kind,
        }
    }

    /// NBIRTH: `bdSeq`, `Node Control/Rebirth` and the node metrics (its `seq`, 0, is given
    /// when it is sent).
    fn nbirth(&self, state: &State) -> OutMessage {
        let now = millis(SystemTime::now());
        let mut metrics = vec![
            Metric {
                name: Some("bdSeq".into()),
                timestamp: Some(now),
                datatype: Some(datatype::INT64),
                value: Some(MetricValue::LongValue(state.bd_seq)),
                ..Metric::default()
            },
            Metric {
                name: Some("Node Control/Rebirth".into()),
                timestamp: Some(now),
                datatype: Some(datatype::BOOLEAN),
                value: Some(MetricValue::BooleanValue(false)),
                ..Metric::default()
            },
        ];
        for ((name, alias), v) in NODE_METRICS.iter().zip(state.figures.values()) {
            metrics.push(Metric {
                name: Some((*name).into()),
                alias: Some(*alias),
                timestamp: Some(now),
                datatype: Some(datatype::UINT64),
                value: Some(MetricValue::LongValue(v)),
                ..Metric::default()
            });
        }
        let payload = Payload {
            timestamp: Some(now),
            metrics,
            // Given when sent (`Node::render`).
            seq: None,
            uuid: None,
        };
        self.message(&self.topics.nbirth, &payload, KIND_NBIRTH, Qos::AtMostOnce)
    }

    /// DBIRTH of device `d`: every metric with its datatype, properties and last value.
    fn dbirth(&self, state: &State, d: usize) -> OutMessage {
        let device = &self.config.devices[d];
        let now = millis(SystemTime::now());
        let metrics = device
            .points
            .iter()
            .enumerate()
            .map(|(p, point)| {
                let t = self.datatypes[d][p];
                let mut properties = PropertySet::default();
                if let Some(unit) = &point.unit {
                    properties.push(
                        "engUnit",
                        datatype::STRING,
                        PropertyKind::StringValue(unit.clone()),
                    );
                }
                if !point.labels.is_empty() {
                    let labels: Vec<String> = point
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    properties.push(
                        "labels",
                        datatype::STRING,
                        PropertyKind::StringValue(labels.join(",")),
                    );
                }
                if point.writable {
                    properties.push(
                        "writable",
                        datatype::BOOLEAN,
                        PropertyKind::BooleanValue(true),
                    );
                }
                let mut m = Metric {
                    name: Some(point.name.clone()),
                    alias: Some(self.aliases[d][p]),
                    datatype: Some(t),
                    ..Metric::default()
                };
                match &state.last[d][p] {
                    Last::Good(v, ts) => {
                        m.timestamp = Some(*ts);
                        m.value = metric_value(t, v);
                        if m.value.is_none() {
                            m.is_null = Some(true);
                        }
                    }
                    Last::Bad(ts) => {
                        m.timestamp = Some(*ts);
                        m.is_null = Some(true);
                        properties.push("Quality", datatype::INT32, PropertyKind::IntValue(0));
                    }
                    Last::Unknown => {
                        m.timestamp = Some(now);
                        m.is_null = Some(true);
                    }
                }
                if !properties.keys.is_empty() {
                    m.properties = Some(properties);
                }
                m
            })
            .collect();
        let payload = Payload {
            timestamp: Some(now),
            metrics,
            // Given when sent (`Node::render`).
            seq: None,
            uuid: None,
        };
        self.message(
            &self.topics.dbirth[d],
            &payload,
            KIND_BIRTH,
            Qos::AtMostOnce,
        )
    }

    fn ddeath(&self, d: usize) -> OutMessage {
        let payload = Payload {
            timestamp: Some(millis(SystemTime::now())),
            metrics: Vec::new(),
            // Given when sent (`Node::render`).
            seq: None,
            uuid: None,
        };
        self.message(
            &self.topics.ddeath[d],
            &payload,
            KIND_BIRTH,
            Qos::AtMostOnce,
        )
    }

    /// The births of a new session (or of a rebirth): NBIRTH, then a DBIRTH for every device,
    /// online or not, with its last values (or `is_null`): what the store holds for a device
    /// (kept from before a restart, too) then always follows a birth. The offline ones are
    /// owed a DDEATH, which the publisher sends behind that.
    fn births_locked(&self, state: &mut State) -> Vec<OutMessage> {
        state.session_start = Some(Instant::now());
        let mut out = vec![self.nbirth(state)];
        state.deaths_due.clear();
        for d in 0..self.config.devices.len() {
            state.born[d] = true;
            out.push(self.dbirth(state, d));
            if !state.online[d] {
                state.deaths_due.push(d);
            }
        }
        out
    }
}

fn bd_seq_path(store: &Path, node: &str) -> PathBuf {
    let dir = store.parent().unwrap_or(Path::new("."));
    dir.join(format!("sparkplug-{node}.bdseq"))
}

/// The `bdSeq` kept by the last run (0 when there is none or it cannot be read).
fn read_bd_seq(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |n| (n % 256 + 1) % 256)
}

/// Keeps `bd_seq` (the last one used) for the next run; written aside and renamed, so a power
/// cut leaves the old or the new one.
fn write_bd_seq(path: &Path, bd_seq: u64) {
    let tmp = path.with_extension("bdseq.tmp");
    let done =
        std::fs::write(&tmp, format!("{bd_seq}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        tracing::warn!(file = %path.display(), error = %e, "cannot keep the Sparkplug bdSeq: the next start may repeat it");
    }
}

/// NDEATH: only `bdSeq`, no `seq` (Sparkplug 3.0).
fn ndeath(bd_seq: u64) -> Payload {
    Payload {
        timestamp: Some(millis(SystemTime::now())),
        metrics: vec![Metric {
            name: Some("bdSeq".into()),
            datatype: Some(datatype::INT64),
            value: Some(MetricValue::LongValue(bd_seq)),
            ..Metric::default()
        }],
        seq: None,
        uuid: None,
    }
}

impl Announcer for Node {
    /// NDEATH with the next `bdSeq` (one per connection attempt).
    fn will(&self) -> Option<Will> {
        let mut state = self.lock();
        state.bd_seq = state.bd_seq.wrapping_add(1) % 256;
        if let Some(path) = &self.bd_seq_file {
            write_bd_seq(path, state.bd_seq);
        }
        let payload = ndeath(state.bd_seq);
        Some(Will {
            topic: self.topics.ndeath.clone(),
            payload: payload.encode_to_vec(),
            qos: Qos::AtLeastOnce,
            retain: false,
        })
    }

    fn births(&self) -> Vec<OutMessage> {
        let mut state = self.lock();
        self.births_locked(&mut state)
    }

    /// NDEATH before a clean disconnect (which fires no will), with the session's `bdSeq`.
    fn goodbye(&self) -> Vec<OutMessage> {
        let state = self.lock();
        let payload = ndeath(state.bd_seq);
        vec![self.message(
            &self.topics.ndeath,
            &payload,
            crate::link::AS_IS,
            Qos::AtLeastOnce,
        )]
    }

    /// The primary host's STATE topic (Sparkplug 3.0 §5.x: births only once it says online).
    fn gate_topic(&self) -> Option<&str> {
        self.topics.state.as_deref()
    }

    /// `{"online": bool, "timestamp": ms}`; one older than the last one seen is ignored (a
    /// stale retained STATE must not undo a newer one).
    fn gate(&self, payload: &[u8]) -> Option<bool> {
        #[derive(serde::Deserialize)]
        struct State {
            online: bool,
            timestamp: Option<u64>,
        }
        let Ok(state) = serde_json::from_slice::<State>(payload) else {
            tracing::warn!("primary host STATE that is not Sparkplug 3.0 JSON: ignored");
            return None;
        };
        let mut s = self.lock();
        let ts = state.timestamp.unwrap_or(0);
        if ts < s.host_timestamp {
            return None;
        }
        s.host_timestamp = ts;
        Some(state.online)
    }

    /// Gives the message its `seq` (0 for an NBIRTH, which starts the count again) and, for
    /// held-back data, `is_historical` on every metric.
    /// A DBIRTH or DDEATH made before this session's births is dropped (they declared the
    /// current state); DATA made before them is historical, held back or not (a message
    /// re-sent after a reconnect must not roll current values back).
    fn render(&self, kind: u8, held: bool, created: Instant, payload: &[u8]) -> Rendered {
        let mut state = self.lock();
        let before_births = state.session_start.is_some_and(|s| created < s);
        if kind == KIND_BIRTH && before_births {
            return Rendered::Drop;
        }
        let historical = kind == KIND_DATA && (held || before_births);
        let seq = if kind == KIND_NBIRTH {
            state.seq = 1;
            0
        } else {
            let s = state.seq;
            state.seq = (s + 1) % 256;
            s
        };
        drop(state);
        // Messages are encoded without `seq`: it is appended (protobuf takes fields in any
        // order), so a live message is not decoded again; historical data is, to mark it.
        let mut bytes = if historical {
            let Ok(mut p) = Payload::decode(payload) else {
                return Rendered::AsIs;
            };
            for m in &mut p.metrics {
                m.is_historical = Some(true);
            }
            p.encode_to_vec()
        } else {
            let mut b = Vec::with_capacity(payload.len() + 3);
            b.extend_from_slice(payload);
            b
        };
        // Field 3 (`seq`), varint: tag 0x18.
        bytes.push(0x18);
        prost::encoding::encode_varint(seq, &mut bytes);
        Rendered::Bytes(bytes)
    }
}

/// The publisher's side: readings, statuses and the node's figures become DBIRTH, DDATA,
/// DDEATH and NDATA.
pub struct Encoding {
    node: Arc<Node>,
}

impl Encoding {
    pub fn new(node: Arc<Node>) -> Encoding {
        Encoding { node }
    }

    /// DDEATHs owed by the last births (devices declared while offline).
    fn deaths_due(&self, state: &mut State, out: &mut Vec<OutMessage>) {
        for d in std::mem::take(&mut state.deaths_due) {
            if !state.online[d] && state.born[d] {
                state.born[d] = false;
                out.push(self.node.ddeath(d));
            }
        }
    }
}

impl Encoder for Encoding {
    fn reading(
        &mut self,
        device: &Device,
        reading: &Reading,
        samples: &[Sample],
        out: &mut Vec<OutMessage>,
    ) {
        let node = &self.node;
        let d = reading.device;
        if d >= node.config.devices.len() || node.config.devices[d].name != device.name {
            return;
        }
        let ts = millis(reading.ts);
        let mut state = node.lock();
        self.deaths_due(&mut state, out);
        for s in samples {
            state.last[d][s.point] = match &s.value {
                Some(v) => Last::Good(v.clone(), ts),
                None => Last::Bad(ts),
            };
        }
        if !state.born[d] {
            // The first reading since the device came (back) online: its birth, with values.
            state.born[d] = true;
            let mut birth = node.dbirth(&state, d);
            birth.created = reading.read_at;
            out.push(birth);
            return;
        }
        let metrics: Vec<Metric> = samples
            .iter()
            .filter(|s| s.changed)
            .map(|s| {
                let t = node.datatypes[d][s.point];
                // No datatype in DATA: the birth declared it (Sparkplug 3.0 recommends
                // leaving it out; 2 bytes a metric).
                let mut m = Metric {
                    alias: Some(node.aliases[d][s.point]),
                    timestamp: Some(ts),
                    ..Metric::default()
                };
                match &s.value {
                    Some(v) => {
                        m.value = metric_value(t, v);
                        if m.value.is_none() {
                            m.is_null = Some(true);
                        }
                    }
                    None => {
                        m.is_null = Some(true);
                        let mut q = PropertySet::default();
                        q.push("Quality", datatype::INT32, PropertyKind::IntValue(0));
                        m.properties = Some(q);
                    }
                }
                m
            })
            .collect();
        if metrics.is_empty() {
            return;
        }
        let payload = Payload {
            timestamp: Some(ts),
            metrics,
            // Given when sent (`Node::render`).
            seq: None,
            uuid: None,
        };
        let mut msg = node.message(&node.topics.ddata[d], &payload, KIND_DATA, node.qos);
        msg.created = reading.read_at;
        out.push(msg);
    }

    fn status(&mut self, device: &Device, online: bool, out: &mut Vec<OutMessage>) {
        let node = &self.node;
        let Some(d) = node
            .config
            .devices
            .iter()
            .position(|x| x.name == device.name)
        else {
            return;
        };
        let mut state = node.lock();
        self.deaths_due(&mut state, out);
        state.online[d] = online;
        if online {
            // Born again by its next reading, with values.
            state.born[d] = false;
        } else if state.born[d] {
            state.born[d] = false;
            out.push(node.ddeath(d));
        }
    }

    fn publishes_written(&self, _device: &Device) -> bool {
        // The next DDATA carries the written value (the specification has no result topic).
        false
    }

    fn written(
        &mut self,
        _device: &Device,
        _point: usize,
        _value: &Value,
        _label: Option<&str>,
        _at: SystemTime,
        _out: &mut Vec<OutMessage>,
    ) {
    }

    /// Sparkplug has no result topic: the router has logged and counted the outcome (node
    /// metrics `Gateway/Commands refused` and `…executed`).
    fn result(&mut self, _result: &CommandResult, _out: &mut Vec<OutMessage>) {}

    /// The link's next births (NBIRTH and every DBIRTH) are computed when it asks.
    fn announce(&mut self) -> bool {
        true
    }

    fn tick(&mut self, figures: NodeFigures, out: &mut Vec<OutMessage>) {
        let node = &self.node;
        let mut state = node.lock();
        self.deaths_due(&mut state, out);
        let figures = NodeFigures {
            devices_online: state.online.iter().filter(|&&o| o).count() as u64,
            ..figures
        };
        if figures == state.figures {
            return;
        }
        let now = millis(SystemTime::now());
        let metrics = NODE_METRICS
            .iter()
            .zip(figures.values().into_iter().zip(state.figures.values()))
            .filter(|(_, (new, old))| new != old)
            .map(|((_, alias), (new, _))| Metric {
                alias: Some(*alias),
                timestamp: Some(now),
                value: Some(MetricValue::LongValue(new)),
                ..Metric::default()
            })
            .collect();
        state.figures = figures;
        let payload = Payload {
            timestamp: Some(now),
            metrics,
            // Given when sent (`Node::render`).
            seq: None,
            uuid: None,
        };
        out.push(node.message(&node.topics.ndata, &payload, KIND_DATA, node.qos));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Raw;
    use crate::modbus::BusEvent;
    use crate::publish::{Input, Stage, Tagged};
    use std::time::Duration;

    const CONFIG: &str = r#"
gateway: { id: gw, prefix: t }
mqtt: { url: "mqtt://127.0.0.1:1883" }
store: { path: none }
sparkplug: { group_id: plant, edge_node_id: gw1 }
buses:
  - { name: b, type: tcp, host: 127.0.0.1 }
devices:
  - name: m1
    bus: b
    publish: { mode: on_change }
    points:
      - { name: volts, address: 0, type: u16, scale: 0.1, unit: V }
      - { name: count, address: 1, type: i32 }
      - { name: sp, address: 3, type: u16, writable: true, max: 100 }
  - name: m2
    bus: b
    unit: 2
    points:
      - { name: run, register: coil, address: 0 }
"#;

    fn setup() -> (Arc<Config>, Arc<Node>, Encoding) {
        let config = Arc::new(crate::config::parse(CONFIG, "t.yaml").expect("config loads"));
        let node = Node::new(&config).expect("sparkplug mode");
        let enc = Encoding::new(node.clone());
        (config, node, enc)
    }

    fn bytes(r: Rendered) -> Vec<u8> {
        match r {
            Rendered::Bytes(b) => b,
            other => panic!("rendered {other:?}"),
        }
    }

    fn decode(m: &OutMessage) -> Payload {
        Payload::decode(m.payload.as_slice()).expect("protobuf")
    }

    fn input(config: &Arc<Config>, event: BusEvent) -> Input {
        Input::Bus(Tagged {
            config: config.clone(),
            generation: 1,
            event,
        })
    }

    fn reading(device: usize, values: Vec<(usize, Result<Raw, String>)>) -> BusEvent {
        BusEvent::Reading(Reading {
            device,
            group: 0,
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
            read_at: Instant::now(),
            values,
        })
    }

    fn online(device: usize, online: bool) -> BusEvent {
        BusEvent::Status {
            device,
            online,
            reason: String::new(),
        }
    }

    #[test]
    fn topics_aliases_and_datatypes_follow_the_configuration() {
        let (_, node, _) = setup();
        let t = node.topics();
        assert_eq!(t.nbirth, "spBv1.0/plant/NBIRTH/gw1");
        assert_eq!(t.dbirth[1], "spBv1.0/plant/DBIRTH/gw1/m2");
        assert_eq!(
            t.subscriptions(),
            ["spBv1.0/plant/NCMD/gw1", "spBv1.0/plant/DCMD/gw1/+"]
        );
        assert_eq!(node.aliases(), [vec![100, 101, 102], vec![103]]);
        assert_eq!(
            node.datatypes(),
            [
                vec![datatype::DOUBLE, datatype::INT32, datatype::UINT16],
                vec![datatype::BOOLEAN]
            ]
        );
    }

    /// A device is born by its first reading (with values), then sends only what changed, by
    /// alias; DDEATH when it goes offline; the link's births declare it again with its last
    /// values, and `render` numbers the messages from the NBIRTH on.
    #[test]
    fn births_data_deaths_and_seq() {
        let (config, node, mut enc) = setup();
        let mut stage = Stage::default();
        let mut out = Vec::new();
        stage.on_input(input(&config, online(0, true)), &mut enc, &mut out);
        assert!(out.is_empty(), "no DBIRTH before values are known");
        let v = |a: u64, b: i64, c: u64| {
            vec![
                (0, Ok(Raw::U64(a))),
                (1, Ok(Raw::I64(b))),
                (2, Ok(Raw::U64(c))),
            ]
        };
        stage.on_input(
            input(&config, reading(0, v(2301, -5, 7))),
            &mut enc,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "spBv1.0/plant/DBIRTH/gw1/m1");
        let birth = decode(&out[0]);
        assert_eq!(birth.metrics.len(), 3);
        assert_eq!(birth.metrics[0].name.as_deref(), Some("volts"));
        assert_eq!(birth.metrics[0].alias, Some(100));
        assert_eq!(
            birth.metrics[0].value,
            Some(MetricValue::DoubleValue(230.1))
        );
        assert_eq!(
            birth.metrics[0].properties.as_ref().unwrap().keys,
            ["engUnit"]
        );
        assert_eq!(
            birth.metrics[1].value,
            Some(MetricValue::IntValue((-5i32) as u32))
        );
        out.clear();
        // Only `count` changed: one metric, by alias, no name.
        stage.on_input(
            input(&config, reading(0, v(2301, 6, 7))),
            &mut enc,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, "spBv1.0/plant/DDATA/gw1/m1");
        assert_eq!(out[0].kind, KIND_DATA);
        let data = decode(&out[0]);
        assert_eq!(data.metrics.len(), 1);
        assert_eq!(
            (data.metrics[0].alias, data.metrics[0].name.as_ref()),
            (Some(101), None)
        );
        assert_eq!(data.metrics[0].timestamp, Some(1_700_000_000_000));
        // The link numbers what it sends: NBIRTH 0, then on; held data is historical.
        let births = node.births();
        assert_eq!(
            births.len(),
            3,
            "NBIRTH and every device's DBIRTH (m2, never read, with nulls)"
        );
        let m2 = Payload::decode(births[2].payload.as_slice()).unwrap();
        assert!(m2.metrics.iter().all(|m| m.is_null == Some(true)));
        let n = Payload::decode(
            bytes(node.render(births[0].kind, false, Instant::now(), &births[0].payload))
                .as_slice(),
        )
        .unwrap();
        assert_eq!(n.seq, Some(0));
        assert_eq!(n.metrics[0].name.as_deref(), Some("bdSeq"));
        let d = bytes(node.render(births[1].kind, false, Instant::now(), &births[1].payload));
        assert_eq!(Payload::decode(d.as_slice()).unwrap().seq, Some(1));
        // The DDATA was made before these births: historical even if not held back.
        let h = bytes(node.render(out[0].kind, false, out[0].created, &out[0].payload));
        let h = Payload::decode(h.as_slice()).unwrap();
        assert_eq!(h.seq, Some(2));
        assert_eq!(h.metrics[0].is_historical, Some(true));
        // A DBIRTH made before this session's births is superseded by them: not sent.
        let old_birth = node.dbirth(&node.lock(), 0);
        let mut stale = old_birth.clone();
        stale.created = Instant::now() - Duration::from_secs(1);
        assert_eq!(
            node.render(stale.kind, false, stale.created, &stale.payload),
            Rendered::Drop
        );
        out.clear();
        stage.on_input(input(&config, online(0, false)), &mut enc, &mut out);
        // m2, declared by the births while offline, is owed its DDEATH first; then m1's.
        let topics: Vec<&str> = out.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["spBv1.0/plant/DDEATH/gw1/m2", "spBv1.0/plant/DDEATH/gw1/m1"]
        );
    }

    #[test]
    fn seq_wraps_after_255() {
        let (_, node, _) = setup();
        let births = node.births();
        node.render(KIND_NBIRTH, false, Instant::now(), &births[0].payload);
        let mut last = 0;
        for _ in 0..300 {
            let p = bytes(node.render(KIND_DATA, false, Instant::now(), &births[0].payload));
            last = Payload::decode(p.as_slice()).unwrap().seq.unwrap();
        }
        assert_eq!(last, 300 % 256);
    }

    /// The will's `bdSeq` counts up per connection attempt; the NBIRTH carries the one of the
    /// connection it is sent on.
    #[test]
    fn bd_seq_of_the_birth_is_the_will_s() {
        let (_, node, _) = setup();
        for expected in 0..3u64 {
            let will = node.will().unwrap();
            let w = Payload::decode(will.payload.as_slice()).unwrap();
            assert_eq!(w.metrics[0].value, Some(MetricValue::LongValue(expected)));
            assert_eq!(w.seq, None);
            let b = Payload::decode(node.births()[0].payload.as_slice()).unwrap();
            assert_eq!(b.metrics[0].value, Some(MetricValue::LongValue(expected)));
        }
    }

    #[test]
    fn bd_seq_survives_a_restart_in_a_file_next_to_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let text = CONFIG.replace(
            "store: { path: none }",
            &format!("store: {{ path: \"{}\" }}", path.display()),
        );
        let config = crate::config::parse(&text, "t.yaml").unwrap();
        let first = Node::new(&config).unwrap();
        first.will();
        first.will();
        let second = Node::new(&config).unwrap();
        let w = Payload::decode(second.will().unwrap().payload.as_slice()).unwrap();
        assert_eq!(w.metrics[0].value, Some(MetricValue::LongValue(2)));
    }

    #[test]
    fn command_values_are_read_by_the_birth_s_datatype() {
        assert_eq!(
            command_text(datatype::UINT16, &MetricValue::IntValue(7)),
            Some("7".into())
        );
        assert_eq!(
            command_text(datatype::INT16, &MetricValue::IntValue((-3i32) as u32)),
            Some("-3".into())
        );
        assert_eq!(
            command_text(datatype::INT32, &MetricValue::LongValue(u64::MAX)),
            Some("-1".into())
        );
        assert_eq!(
            command_text(datatype::DOUBLE, &MetricValue::DoubleValue(21.5)),
            Some("21.5".into())
        );
        assert_eq!(
            command_text(datatype::BOOLEAN, &MetricValue::BooleanValue(true)),
            Some("true".into())
        );
        assert_eq!(
            command_text(datatype::STRING, &MetricValue::StringValue("a\"b".into())),
            Some(r#""a\"b""#.into())
        );
        // Not of the declared datatype, or not a number: refused.
        assert_eq!(
            command_text(datatype::UINT16, &MetricValue::BooleanValue(true)),
            None
        );
        assert_eq!(
            command_text(datatype::DOUBLE, &MetricValue::DoubleValue(f64::NAN)),
            None
        );
        assert_eq!(
            command_text(datatype::UINT16, &MetricValue::LongValue(1 << 40)),
            None
        );
    }
}
