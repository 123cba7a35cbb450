//! The JSON encoding: point, device and bad-quality payloads (pure).
//!
//! JSON payloads are built with `serde_json::Map`. The crate does not enable serde_json's
//! `preserve_order` feature, so keys come out sorted (`raw`, `ts`, `unit`, `value`); consumers
//! must not rely on key order (JSON objects are unordered anyway).
//!
//! Numbers are written the way serde_json writes them: integers exactly, floats in their
//! shortest round-trip form (`230.1`, `1.0`, `1e20`), non-finite floats as `null`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde_json::{Map, Value as Json};

use super::{homeassistant, CommandResult, Encoder, Sample};
use crate::link::{Announcer, OutMessage, Rendered, Will, AS_IS};
use crate::modbus::Reading;
use crate::model::{Config, Device, MessageMode, PayloadFormat, Point, Qos, Value};

/// `2026-11-21T10:00:00.123Z` (UTC, milliseconds).
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A reading as JSON; non-finite floats become `null`.
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::UInt(u) => Json::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(t) => Json::String(t.clone()),
    }
}

/// Bare text of a reading: strings unquoted, everything else as in JSON.
fn bare(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        other => value_json(other).to_string(),
    }
}

fn to_bytes(map: Map<String, Json>) -> Vec<u8> {
    serde_json::to_vec(&Json::Object(map)).expect("a JSON map always serializes")
}

/// The message for one point's reading.
///
/// - [`PayloadFormat::Json`]: `{"value": 230.1, "unit": "V", "ts": "…"}`; `unit` only when the
///   point has one. With a label, `value` is the label and `raw` the reading.
/// - [`PayloadFormat::Value`]: the bare value (or label) as text: `230.1`, `true`, `run`.
pub fn point_payload(point: &Point, value: &Value, label: Option<&str>, ts: SystemTime) -> Vec<u8> {
    match point.payload {
        PayloadFormat::Value => label
            .map_or_else(|| bare(value), str::to_owned)
            .into_bytes(),
        PayloadFormat::Json => {
            let mut map = Map::new();
            match label {
                Some(l) => {
                    map.insert("value".into(), Json::String(l.to_owned()));
                    map.insert("raw".into(), value_json(value));
                }
                None => {
                    map.insert("value".into(), value_json(value));
                }
            }
            if let Some(unit) = &point.unit {
                map.insert("unit".into(), Json::String(unit.clone()));
            }
            map.insert("ts".into(), Json::String(rfc3339_millis(ts)));
            to_bytes(map)
        }
    }
}

/// The message for a point that could not be read: `{"value": null, "quality": "bad",
/// "error": "…", "ts": "…"}`. Bare-value points have no way to say "bad", so nothing is
/// published for them (`None`): a stale value is better than a fake one.
pub fn bad_quality_payload(point: &Point, error: &str, ts: SystemTime) -> Option<Vec<u8>> {
    match point.payload {
        PayloadFormat::Value => None,
        PayloadFormat::Json => {
            let mut map = Map::new();
            map.insert("value".into(), Json::Null);
            map.insert("quality".into(), Json::String("bad".into()));
            map.insert("error".into(), Json::String(error.to_owned()));
            map.insert("ts".into(), Json::String(rfc3339_millis(ts)));
            Some(to_bytes(map))
        }
    }
}

/// One message for a device's poll group:
/// `{"device": "m1", "ts": "…", "values": {"bad_point": null, "voltage": 230.1}}`
/// (`None` entries, unreadable points, become `null`). `entries` come sorted by name.
pub fn device_payload(device: &str, ts: SystemTime, entries: &[(&str, Option<Json>)]) -> Vec<u8> {
    // Written straight out, keys in the order a JSON map would give them (sorted: the caller
    // passes them so, in the order it keeps per device), rather than built as a map first: a
    // 50-point device would cost a hundred allocations per poll. Point names are unique per
    // device (validated), so no key repeats.
    debug_assert!(
        entries.is_sorted_by_key(|e| e.0),
        "entries not sorted by name"
    );
    let mut out = Vec::with_capacity(48 + device.len() + entries.len() * 24);
    out.extend_from_slice(b"{\"device\":");
    write(&mut out, &device);
    out.extend_from_slice(b",\"ts\":");
    write(&mut out, &rfc3339_millis(ts).as_str());
    out.extend_from_slice(b",\"values\":{");
    for (n, (name, value)) in entries.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write(&mut out, name);
        out.push(b':');
        match value {
            Some(v) => write(&mut out, v),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"}}");
    out
}

/// Appends one JSON value to `out` (writing into a Vec cannot fail).
fn write<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("serializing into a Vec cannot fail");
}

/// [`OutMessage::kind`] of a JSON object the stage built: marked `"buffered":true` when it was
/// held back ([`mark_buffered`]). Never guessed from the bytes: a bare string value or a line
/// field may look like an object.
pub const OBJECT: u8 = 1;

/// The JSON encoding ([`crate::publish::Encoder`]): a message per point (`{"value": …}` or the
/// bare value) or per device, statuses `online`/`offline` (retained), results as JSON objects.
#[derive(Default)]
pub struct JsonEncoding {
    /// The announcer the link asks for births (with the discovery configs).
    pub gateway: Option<std::sync::Arc<Gateway>>,
}

impl Encoder for JsonEncoding {
    fn reading(
        &mut self,
        device: &Device,
        reading: &Reading,
        samples: &[Sample],
        out: &mut Vec<OutMessage>,
    ) {
        match device.message_mode {
            MessageMode::PerPoint => {
                for s in samples {
                    if !s.changed {
                        continue;
                    }
                    let point = &device.points[s.point];
                    let payload = match &s.value {
                        Some(value) => Some(point_payload(
                            point,
                            value,
                            s.label(device, reading),
                            reading.ts,
                        )),
                        None => bad_quality_payload(point, s.error(reading), reading.ts),
                    };
                    if let Some(payload) = payload {
                        out.push(OutMessage {
                            topic: point.topic.clone(),
                            payload,
                            qos: point.qos,
                            retain: point.retain,
                            created: reading.read_at,
                            correlation: None,
                            kind: point_kind(point),
                        });
                    }
                }
            }
            MessageMode::PerDevice => {
                // Point filters fire on change and on their heartbeat; a bad point always.
                if !samples.iter().any(|s| s.changed) {
                    return;
                }
                // Each point's JSON at its index, then listed in name order.
                let mut values: Vec<Option<Option<Json>>> = Vec::new();
                values.resize_with(device.points.len(), || None);
                for s in samples {
                    values[s.point] = Some(match (&s.value, s.label(device, reading)) {
                        (Some(_), Some(label)) => Some(Json::String(label.to_string())),
                        (Some(value), None) => Some(value_json(value)),
                        (None, _) => None,
                    });
                }
                let entries: Vec<(&str, Option<Json>)> = device
                    .points_by_name
                    .iter()
                    .filter_map(|&p| Some((device.points[p].name.as_str(), values[p].take()?)))
                    .collect();
                let first = samples.first().and_then(|s| device.points.get(s.point));
                out.push(OutMessage {
                    topic: device.topic.clone(),
                    payload: device_payload(&device.name, reading.ts, &entries),
                    qos: first.map_or(Qos::AtLeastOnce, |p| p.qos),
                    retain: first.is_some_and(|p| p.retain),
                    created: reading.read_at,
                    correlation: None,
                    kind: OBJECT,
                });
            }
        }
    }

    fn status(&mut self, device: &Device, online: bool, out: &mut Vec<OutMessage>) {
        out.push(status_message(&device.status_topic, online));
    }

    fn publishes_written(&self, device: &Device) -> bool {
        // A device message carries the whole poll group: the next poll shows the new value.
        device.message_mode == MessageMode::PerPoint
    }

    fn written(
        &mut self,
        device: &Device,
        point: usize,
        value: &Value,
        label: Option<&str>,
        at: SystemTime,
        out: &mut Vec<OutMessage>,
    ) {
        let point = &device.points[point];
        out.push(OutMessage {
            topic: point.topic.clone(),
            payload: point_payload(point, value, label, at),
            qos: point.qos,
            retain: point.retain,
            created: Instant::now(),
            correlation: None,
            kind: point_kind(point),
        });
    }

    fn result(&mut self, result: &CommandResult, out: &mut Vec<OutMessage>) {
        out.extend(results(result));
    }

    fn announce(&mut self) -> bool {
        self.gateway.as_ref().is_some_and(|g| g.announce_all())
    }

    fn reconfigure(&mut self, config: &Config) -> bool {
        self.gateway.as_ref().is_some_and(|g| g.reconfigure(config))
    }
}

fn point_kind(point: &Point) -> u8 {
    match point.payload {
        PayloadFormat::Json => OBJECT,
        PayloadFormat::Value => AS_IS,
    }
}

/// `online` / `offline`, retained, QoS 1, on `topic`.
fn status_message(topic: &str, online: bool) -> OutMessage {
    OutMessage {
        topic: topic.to_owned(),
        payload: if online {
            b"online".to_vec()
        } else {
            b"offline".to_vec()
        },
        qos: Qos::AtLeastOnce,
        retain: true,
        created: Instant::now(),
        correlation: None,
        kind: AS_IS,
    }
}

/// The result on its result topic and, for an MQTT 5 request with a response topic, a copy
/// there carrying the request's correlation data.
pub fn results(result: &CommandResult) -> Vec<OutMessage> {
    let first = OutMessage {
        topic: result.topic.clone(),
        payload: serde_json::to_vec(&result.body).unwrap_or_default(),
        qos: Qos::AtLeastOnce,
        retain: false,
        created: Instant::now(),
        correlation: None,
        kind: OBJECT,
    };
    match &result.reply {
        None => vec![first],
        Some(reply) => {
            let answer = OutMessage {
                topic: reply.topic.clone(),
                // Present even when empty: the requester may match on it.
                correlation: Some(reply.correlation.clone().unwrap_or_default()),
                ..first.clone()
            };
            vec![first, answer]
        }
    }
}

/// The gateway's own status in JSON mode, said on the link's behalf: `online` (retained) first
/// in every session, `offline` as the last will and before a clean disconnect; the held-back
/// mark on JSON objects; and the Home Assistant discovery configs when they are due.
pub struct Gateway {
    status_topic: String,
    discovery: Option<std::sync::Mutex<Discovery>>,
}

/// What Home Assistant has been told, and what is due.
struct Discovery {
    entities: Vec<homeassistant::Entity>,
    /// Config topic → payload sent (kept across restarts as topics only, in `file`).
    announced: BTreeMap<String, String>,
    /// Due with the next births: `Some(force)` (force: every config again, not only changes).
    due: Option<bool>,
    file: Option<PathBuf>,
    /// What was announced before the configs last handed to the link, until they are known to
    /// have gone out (`Announcer::births_done`).
    previous: Option<BTreeMap<String, String>>,
}

impl Discovery {
    /// Keeps the announced topics (and those whose clearing is not known to be out yet) for
    /// the next start.
    fn keep(&self) {
        let Some(file) = self.file.as_deref() else {
            return;
        };
        let mut topics: Vec<&String> = self.announced.keys().collect();
        if let Some(previous) = &self.previous {
            topics.extend(previous.keys());
        }
        topics.sort();
        topics.dedup();
        let text: String = topics.iter().map(|t| format!("{t}\n")).collect();
        let tmp = file.with_extension("topics.tmp");
        let kept = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = kept {
            tracing::warn!(file = %file.display(), error = %e, "cannot keep the announced Home Assistant topics: a point removed before the next start will not be cleared from Home Assistant");
        }
    }
}

impl Gateway {
    pub fn new(config: &Config) -> Gateway {
        let discovery = config.homeassistant.as_ref().map(|_| {
            let file = config.store.path.as_ref().map(|p| {
                p.parent()
                    .unwrap_or(Path::new("."))
                    .join(format!("homeassistant-{}.topics", config.gateway.id))
            });
            // Topics announced by the last run: those no longer configured are cleared.
            let announced = file
                .as_deref()
                .and_then(|f| std::fs::read_to_string(f).ok())
                .map(|text| {
                    text.lines()
                        .filter(|l| !l.is_empty())
                        .map(|l| (l.to_owned(), String::new()))
                        .collect()
                })
                .unwrap_or_default();
            std::sync::Mutex::new(Discovery {
                entities: homeassistant::entities(config),
                announced,
                due: Some(true),
                file,
                previous: None,
            })
        });
        Gateway {
            status_topic: config.mqtt.status_topic.clone(),
            discovery,
        }
    }

    /// Home Assistant (re)started, or asked: every config again with the next births.
    pub fn announce_all(&self) -> bool {
        let Some(d) = &self.discovery else {
            return false;
        };
        d.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .due = Some(true);
        true
    }

    /// A reload: the new configuration's entities; what changed goes with the next births.
    pub fn reconfigure(&self, config: &Config) -> bool {
        let Some(d) = &self.discovery else {
            return false;
        };
        let mut d = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        d.entities = homeassistant::entities(config);
        d.due = Some(d.due.unwrap_or(false));
        true
    }

    /// The discovery configs due now (retained, QoS 1; empty payloads clear removed ones).
    fn discovery(&self) -> Vec<OutMessage> {
        let Some(d) = &self.discovery else {
            return Vec::new();
        };
        let mut d = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(force) = d.due.take() else {
            return Vec::new();
        };
        let before = d.announced.clone();
        let Discovery {
            entities,
            announced,
            ..
        } = &mut *d;
        let changes = homeassistant::changes(entities, announced, force);
        // Until these are out, what was announced before counts too (for a retry, and for the
        // clears after a restart).
        match &mut d.previous {
            Some(previous) => {
                for (topic, payload) in before {
                    previous.entry(topic).or_insert(payload);
                }
            }
            None => d.previous = Some(before),
        }
        d.keep();
        if !changes.is_empty() {
            tracing::info!(
                configs = changes.len(),
                "Home Assistant discovery announced"
            );
        }
        changes
            .into_iter()
            .map(|(topic, payload)| OutMessage {
                topic,
                payload,
                qos: Qos::AtLeastOnce,
                retain: true,
                created: Instant::now(),
                correlation: None,
                kind: AS_IS,
            })
            .collect()
    }
}

impl Announcer for Gateway {
    fn will(&self) -> Option<Will> {
        Some(Will {
            topic: self.status_topic.clone(),
            payload: b"offline".to_vec(),
            qos: Qos::AtLeastOnce,
            retain: true,
        })
    }

    /// `online`, then the discovery configs that are due (the gateway's device first).
    fn births(&self) -> Vec<OutMessage> {
        let mut out = vec![status_message(&self.status_topic, true)];
        out.extend(self.discovery());
        out
    }

    fn goodbye(&self) -> Vec<OutMessage> {
        vec![status_message(&self.status_topic, false)]
    }

    fn render(&self, kind: u8, held: bool, _created: Instant, payload: &[u8]) -> Rendered {
        if kind != OBJECT || !held {
            return Rendered::AsIs;
        }
        let mut marked = payload.to_vec();
        mark_buffered(&mut marked);
        Rendered::Bytes(marked)
    }

    /// Discovery configs that did not all go out are sent again, all of them, with the next
    /// births (and the clears among them: what was announced before is restored).
    fn births_done(&self, all_sent: bool) {
        let Some(d) = &self.discovery else {
            return;
        };
        let mut d = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match d.previous.take() {
            Some(previous) if !all_sent => {
                for (topic, payload) in previous {
                    d.announced.entry(topic).or_insert(payload);
                }
                d.due = Some(true);
            }
            Some(_) => d.keep(),
            None => {}
        }
    }
}

/// Marks a JSON object payload as held back (`"buffered":true` as its first key) so that
/// consumers can tell late readings. Only for payloads the stage built as JSON objects
/// ([`OBJECT`]): the bytes alone do not tell (a string point `{x}`).
pub fn mark_buffered(payload: &mut Vec<u8>) {
    const MARK: &[u8] = b"\"buffered\":true";
    if payload.len() >= 2 && payload[0] == b'{' && payload.last() == Some(&b'}') {
        if payload.starts_with(b"{\"buffered\"") {
            return;
        }
        let mut insert = MARK.to_vec();
        if payload.len() > 2 {
            insert.push(b',');
        }
        payload.splice(1..1, insert);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Discovery configs that did not all go out (the session ended first) are sent again,
    /// all of them, with the next births; once they went out, only `online` follows.
    #[test]
    fn discovery_configs_not_sent_are_sent_again_with_the_next_births() {
        let config = crate::config::parse(
            "gateway: { id: gw }\nmqtt: { url: \"mqtt://127.0.0.1:1883\" }\nstore: { path: none }\nhomeassistant: { discovery: true }\nbuses:\n  - { name: b, type: tcp, host: 127.0.0.1 }\ndevices:\n  - { name: d, bus: b, points: [ { name: p, address: 0 } ] }\n",
            "t.yaml",
        )
        .expect("config loads");
        let gateway = Gateway::new(&config);
        let first = gateway.births();
        assert!(first.len() > 1, "online and the configs");
        gateway.births_done(false);
        assert_eq!(gateway.births().len(), first.len(), "not sent again");
        gateway.births_done(true);
        assert_eq!(gateway.births().len(), 1, "only online once they went out");
    }
    use crate::model::{DataType, PublishPolicy, RegisterKind, WordOrder};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn point(payload: PayloadFormat, unit: Option<&str>) -> Point {
        Point {
            name: "voltage".into(),
            kind: RegisterKind::Input,
            address: 0,
            data_type: DataType::F32,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: unit.map(str::to_owned),
            labels: BTreeMap::new(),
            group: 0,
            topic: "gw/m1/voltage".into(),
            payload,
            publish: PublishPolicy::EveryPoll,
            qos: Qos::AtLeastOnce,
            retain: false,
            writable: false,
            min: None,
            max: None,
        }
    }

    /// 2026-11-21T10:00:00.123Z
    fn ts() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_255_200_123)
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_millis(ts()), "2026-11-21T10:00:00.123Z");
    }

    #[test]
    fn values_become_json_and_non_finite_floats_null() {
        assert_eq!(value_json(&Value::Float(230.1)).to_string(), "230.1");
        assert_eq!(value_json(&Value::Float(f64::NAN)), Json::Null);
        assert_eq!(value_json(&Value::Float(f64::INFINITY)), Json::Null);
        assert_eq!(
            value_json(&Value::UInt(u64::MAX)).to_string(),
            "18446744073709551615"
        );
        assert_eq!(value_json(&Value::Int(-2)).to_string(), "-2");
        assert_eq!(value_json(&Value::Bool(true)).to_string(), "true");
        assert_eq!(
            value_json(&Value::Text("FB-01".into())).to_string(),
            "\"FB-01\""
        );
    }

    #[test]
    fn json_payload_carries_value_unit_and_timestamp() {
        let p = point(PayloadFormat::Json, Some("V"));
        assert_eq!(
            text(point_payload(&p, &Value::Float(230.1), None, ts())),
            r#"{"ts":"2026-11-21T10:00:00.123Z","unit":"V","value":230.1}"#
        );
        let p = point(PayloadFormat::Json, None);
        assert_eq!(
            text(point_payload(&p, &Value::UInt(7), None, ts())),
            r#"{"ts":"2026-11-21T10:00:00.123Z","value":7}"#
        );
    }

    #[test]
    fn json_payload_with_a_label_keeps_the_raw_value() {
        let p = point(PayloadFormat::Json, None);
        assert_eq!(
            text(point_payload(&p, &Value::UInt(1), Some("run"), ts())),
            r#"{"raw":1,"ts":"2026-11-21T10:00:00.123Z","value":"run"}"#
        );
    }

    #[test]
    fn value_payload_is_the_bare_value() {
        let p = point(PayloadFormat::Value, Some("V"));
        let bare = |v: Value, l: Option<&str>| text(point_payload(&p, &v, l, ts()));
        assert_eq!(bare(Value::Float(230.1), None), "230.1");
        assert_eq!(bare(Value::Float(f64::NAN), None), "null");
        assert_eq!(bare(Value::Int(-2), None), "-2");
        assert_eq!(bare(Value::Bool(false), None), "false");
        assert_eq!(bare(Value::Text("FB-01".into()), None), "FB-01");
        assert_eq!(bare(Value::UInt(1), Some("run")), "run");
    }

    #[test]
    fn bad_quality_is_published_only_as_json() {
        let p = point(PayloadFormat::Json, Some("V"));
        assert_eq!(
            text(bad_quality_payload(&p, "illegal data address", ts()).unwrap()),
            r#"{"error":"illegal data address","quality":"bad","ts":"2026-11-21T10:00:00.123Z","value":null}"#
        );
        let p = point(PayloadFormat::Value, None);
        assert_eq!(bad_quality_payload(&p, "timeout", ts()), None);
    }

    #[test]
    fn device_payload_gathers_every_point() {
        let entries = [
            ("bad_point", None),
            ("voltage", Some(value_json(&Value::Float(230.1)))),
        ];
        assert_eq!(
            text(device_payload("m1", ts(), &entries)),
            r#"{"device":"m1","ts":"2026-11-21T10:00:00.123Z","values":{"bad_point":null,"voltage":230.1}}"#
        );
    }
}
