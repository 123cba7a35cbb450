//! Topics, payloads and the change filter (pure).
//!
//! JSON payloads are built with `serde_json::Map`. The crate does not enable serde_json's
//! `preserve_order` feature, so keys come out sorted (`raw`, `ts`, `unit`, `value`); consumers
//! must not rely on key order (JSON objects are unordered anyway).
//!
//! Numbers are written the way serde_json writes them: integers exactly, floats in their
//! shortest round-trip form (`230.1`, `1.0`, `1e20`), non-finite floats as `null`.

use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value as Json};

use crate::model::{PayloadFormat, Point, PublishPolicy, Value};

/// MQTT limit on a topic name: a UTF-8 string with a 16-bit length prefix (MQTT 3.1.1 §1.5.3).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// What is wrong with a topic, template or name, and where (`at` is a byte offset).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error(
        "{what} {text:?} contains the wildcard {ch:?} at byte {at}; wildcards are for \
         subscriptions, not for publishing"
    )]
    Wildcard {
        what: &'static str,
        text: String,
        ch: char,
        at: usize,
    },
    #[error("{what} {text:?} contains a NUL character at byte {at}")]
    Nul {
        what: &'static str,
        text: String,
        at: usize,
    },
    #[error("topic {topic:?} has an empty level at byte {at} (leading or trailing '/', or '//')")]
    EmptyLevel { topic: String, at: usize },
    #[error("topic {topic:?} starts with '$', which brokers reserve for themselves ($SYS)")]
    Reserved { topic: String },
    #[error("topic is {len} bytes long; MQTT allows at most {MAX_TOPIC_BYTES}")]
    TooLong { len: usize },
    #[error(
        "name {name:?} contains '/' at byte {at}; a name becomes a single topic level, \
         use '-' or '_' instead"
    )]
    Slash { name: String, at: usize },
    #[error("name {name:?} has leading or trailing whitespace")]
    Whitespace { name: String },
    #[error(
        "template {template:?} has an unknown placeholder {{{name}}} at byte {at}; \
         known: {{prefix}}, {{device}}, {{point}}"
    )]
    UnknownPlaceholder {
        template: String,
        name: String,
        at: usize,
    },
    #[error("template {template:?} has an unclosed '{{' at byte {at}")]
    Unclosed { template: String, at: usize },
}

/// Renders a topic template with the placeholders `{prefix}`, `{device}` and `{point}`, then
/// checks the result with [`validate_topic`]. A `}` outside a placeholder is literal.
pub fn render_topic(
    template: &str,
    prefix: &str,
    device: &str,
    point: &str,
) -> Result<String, TopicError> {
    let mut out = String::with_capacity(template.len() + prefix.len() + device.len() + point.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let at = template.len() - rest.len() + open;
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| TopicError::Unclosed {
            template: template.to_owned(),
            at,
        })?;
        let name = &after[..close];
        out.push_str(match name {
            "prefix" => prefix,
            "device" => device,
            "point" => point,
            _ => {
                return Err(TopicError::UnknownPlaceholder {
                    template: template.to_owned(),
                    name: name.to_owned(),
                    at,
                })
            }
        });
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    validate_topic(&out)?;
    Ok(out)
}

/// Checks a topic to publish to: non-empty, at most 65535 bytes, no wildcards (`+`, `#`), no
/// NUL, no empty levels, and not starting with `$` (broker-reserved, MQTT 3.1.1 §4.7.2).
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    const WHAT: &str = "topic";
    if topic.is_empty() {
        return Err(TopicError::Empty { what: WHAT });
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong { len: topic.len() });
    }
    forbidden_chars(WHAT, topic)?;
    if topic.starts_with('$') {
        return Err(TopicError::Reserved {
            topic: topic.to_owned(),
        });
    }
    let mut at = 0;
    for level in topic.split('/') {
        if level.is_empty() {
            return Err(TopicError::EmptyLevel {
                topic: topic.to_owned(),
                at,
            });
        }
        at += level.len() + 1;
    }
    Ok(())
}

fn forbidden_chars(what: &'static str, text: &str) -> Result<(), TopicError> {
    if let Some((at, ch)) = text.char_indices().find(|&(_, c)| matches!(c, '+' | '#')) {
        return Err(TopicError::Wildcard {
            what,
            text: text.to_owned(),
            ch,
            at,
        });
    }
    if let Some(at) = text.find('\0') {
        return Err(TopicError::Nul {
            what,
            text: text.to_owned(),
            at,
        });
    }
    Ok(())
}

/// Checks a device, point or gateway name that becomes one topic level: non-empty, no `/`,
/// `+`, `#` or NUL, no leading or trailing whitespace.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    const WHAT: &str = "name";
    if name.is_empty() {
        return Err(TopicError::Empty { what: WHAT });
    }
    forbidden_chars(WHAT, name)?;
    if let Some(at) = name.find('/') {
        return Err(TopicError::Slash {
            name: name.to_owned(),
            at,
        });
    }
    if name.trim() != name {
        return Err(TopicError::Whitespace {
            name: name.to_owned(),
        });
    }
    Ok(())
}

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

/// Decides, per point, whether a reading is worth publishing under its [`PublishPolicy`].
#[derive(Debug, Clone)]
pub struct ChangeFilter {
    policy: PublishPolicy,
    /// Last published value and when.
    last: Option<(Value, Instant)>,
}

impl ChangeFilter {
    pub fn new(policy: PublishPolicy) -> Self {
        ChangeFilter { policy, last: None }
    }

    /// Whether to publish `value` read at `now`; records it as the last published value when the
    /// answer is yes.
    ///
    /// `EveryPoll`: always. `OnChange`: the first value; a number that moved by more than
    /// `deadband` from the last published one (any change when the deadband is 0); a bool or
    /// text that changed at all; a change of kind (number ↔ text); or `heartbeat` elapsed since
    /// the last publish. NaN equals NaN here, so a stuck NaN is not republished every poll.
    pub fn should_publish(&mut self, value: &Value, now: Instant) -> bool {
        let publish = match (self.policy, &self.last) {
            (PublishPolicy::EveryPoll, _) | (PublishPolicy::OnChange { .. }, None) => true,
            (
                PublishPolicy::OnChange {
                    deadband,
                    heartbeat,
                },
                Some((last, at)),
            ) => {
                heartbeat.is_some_and(|h| now.saturating_duration_since(*at) >= h)
                    || changed(last, value, deadband)
            }
        };
        if publish {
            self.last = Some((value.clone(), now));
        }
        publish
    }

    /// Forgets the last published value, so that the next reading is published (after a bad
    /// reading, or when the broker session was lost).
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// Time since the last publish, if any.
    pub fn since_last(&self, now: Instant) -> Option<Duration> {
        self.last
            .as_ref()
            .map(|(_, at)| now.saturating_duration_since(*at))
    }
}

fn changed(last: &Value, new: &Value, deadband: f64) -> bool {
    match (last, new) {
        (Value::Bool(a), Value::Bool(b)) => a != b,
        (Value::Text(a), Value::Text(b)) => a != b,
        (Value::Bool(_) | Value::Text(_), _) | (_, Value::Bool(_) | Value::Text(_)) => true,
        // Exact comparison of integers: u64/i64 beyond 2^53 would collapse as f64.
        (Value::Int(a), Value::Int(b)) if deadband <= 0.0 => a != b,
        (Value::UInt(a), Value::UInt(b)) if deadband <= 0.0 => a != b,
        _ => {
            let (a, b) = (
                last.as_f64().expect("numeric"),
                new.as_f64().expect("numeric"),
            );
            match (a.is_nan(), b.is_nan()) {
                (true, true) => false,
                (true, false) | (false, true) => true,
                // Infinities: inf - inf is NaN, so compare them directly.
                _ if a.is_infinite() || b.is_infinite() => a != b,
                #[allow(clippy::float_cmp)] // deadband 0 means any change at all
                _ if deadband <= 0.0 => a != b,
                _ => (b - a).abs() > deadband,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataType, Qos, RegisterKind, WordOrder};
    use std::collections::BTreeMap;

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
    fn templates_render_every_placeholder() {
        assert_eq!(
            render_topic("{prefix}/{device}/{point}", "site1", "m1", "voltage"),
            Ok("site1/m1/voltage".into())
        );
        assert_eq!(
            render_topic("plant/{device}/data/{point}/}", "p", "m1", "v"),
            Ok("plant/m1/data/v/}".into())
        );
        assert_eq!(
            render_topic("{prefix}/{device}", "gw", "m1", "unused"),
            Ok("gw/m1".into())
        );
    }

    #[test]
    fn unknown_or_unclosed_placeholders_are_refused() {
        assert_eq!(
            render_topic("{prefix}/{unit}/x", "gw", "m1", "v"),
            Err(TopicError::UnknownPlaceholder {
                template: "{prefix}/{unit}/x".into(),
                name: "unit".into(),
                at: 9
            })
        );
        assert_eq!(
            render_topic("{prefix}/{device", "gw", "m1", "v"),
            Err(TopicError::Unclosed {
                template: "{prefix}/{device".into(),
                at: 9
            })
        );
        // The rendered topic is checked too: an empty prefix leaves an empty level.
        assert!(matches!(
            render_topic("{prefix}/{device}", "", "m1", "v"),
            Err(TopicError::EmptyLevel { at: 0, .. })
        ));
    }

    #[test]
    fn publish_topics_refuse_wildcards_empty_levels_and_nul() {
        assert_eq!(validate_topic("site/m1/voltage"), Ok(()));
        assert_eq!(validate_topic("a"), Ok(()));
        assert_eq!(validate_topic(""), Err(TopicError::Empty { what: "topic" }));
        assert!(matches!(
            validate_topic("a/+/b"),
            Err(TopicError::Wildcard { ch: '+', at: 2, .. })
        ));
        assert!(matches!(
            validate_topic("a/#"),
            Err(TopicError::Wildcard { ch: '#', at: 2, .. })
        ));
        for (topic, at) in [("/a", 0), ("a/", 2), ("a//b", 2), ("/", 0)] {
            assert_eq!(
                validate_topic(topic),
                Err(TopicError::EmptyLevel {
                    topic: topic.into(),
                    at
                }),
                "{topic}"
            );
        }
        assert!(matches!(
            validate_topic("a\0b"),
            Err(TopicError::Nul { at: 1, .. })
        ));
        assert!(matches!(
            validate_topic("$SYS/x"),
            Err(TopicError::Reserved { .. })
        ));
        assert_eq!(validate_topic(&"é".repeat(32_767)), Ok(()));
        assert_eq!(
            validate_topic(&"é".repeat(32_768)),
            Err(TopicError::TooLong { len: 65_536 })
        );
    }

    #[test]
    fn topic_errors_say_what_and_where() {
        let e = validate_topic("a//b").unwrap_err().to_string();
        assert!(e.contains("byte 2") && e.contains("empty level"), "{e}");
        let e = validate_name("m/1").unwrap_err().to_string();
        assert!(e.contains("'/'") && e.contains("byte 1"), "{e}");
    }

    #[test]
    fn names_are_single_clean_levels() {
        assert_eq!(validate_name("meter-1 main"), Ok(()));
        assert_eq!(validate_name(""), Err(TopicError::Empty { what: "name" }));
        assert!(matches!(
            validate_name("m/1"),
            Err(TopicError::Slash { at: 1, .. })
        ));
        assert!(matches!(
            validate_name("m+"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(matches!(
            validate_name("#"),
            Err(TopicError::Wildcard { .. })
        ));
        assert!(matches!(validate_name("m\0"), Err(TopicError::Nul { .. })));
        assert!(matches!(
            validate_name(" m1"),
            Err(TopicError::Whitespace { .. })
        ));
        assert!(matches!(
            validate_name("m1\t"),
            Err(TopicError::Whitespace { .. })
        ));
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

    fn on_change(deadband: f64, heartbeat: Option<Duration>) -> ChangeFilter {
        ChangeFilter::new(PublishPolicy::OnChange {
            deadband,
            heartbeat,
        })
    }

    #[test]
    fn every_poll_publishes_everything() {
        let mut f = ChangeFilter::new(PublishPolicy::EveryPoll);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Int(1), t0));
        assert!(f.should_publish(&Value::Int(1), t0));
    }

    #[test]
    fn on_change_publishes_moves_beyond_the_deadband_from_the_last_published_value() {
        let mut f = on_change(0.5, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Float(230.0), t0));
        assert!(!f.should_publish(&Value::Float(230.3), t0));
        assert!(!f.should_publish(&Value::Float(230.5), t0)); // not more than the deadband
                                                              // Creeping does not escape the deadband: compared with 230.0, not 230.5.
        assert!(f.should_publish(&Value::Float(230.6), t0));
        assert!(!f.should_publish(&Value::Float(230.2), t0));
        assert!(f.should_publish(&Value::Float(230.0), t0));
    }

    #[test]
    fn a_zero_deadband_publishes_any_change() {
        let mut f = on_change(0.0, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::UInt(u64::MAX), t0));
        assert!(!f.should_publish(&Value::UInt(u64::MAX), t0));
        assert!(f.should_publish(&Value::UInt(u64::MAX - 1), t0));
        assert!(f.should_publish(&Value::Float(1.0), t0));
        assert!(!f.should_publish(&Value::Float(1.0), t0));
        assert!(f.should_publish(&Value::Float(1.000_001), t0));
        assert!(f.should_publish(&Value::Float(f64::NAN), t0));
        assert!(!f.should_publish(&Value::Float(f64::NAN), t0));
        assert!(f.should_publish(&Value::Float(f64::INFINITY), t0));
        assert!(!f.should_publish(&Value::Float(f64::INFINITY), t0));
    }

    #[test]
    fn bools_and_text_publish_on_any_change_whatever_the_deadband() {
        let mut f = on_change(10.0, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Bool(false), t0));
        assert!(!f.should_publish(&Value::Bool(false), t0));
        assert!(f.should_publish(&Value::Bool(true), t0));
        assert!(f.should_publish(&Value::Text("run".into()), t0));
        assert!(!f.should_publish(&Value::Text("run".into()), t0));
        assert!(f.should_publish(&Value::Text("stop".into()), t0));
        assert!(f.should_publish(&Value::Int(1), t0));
    }

    #[test]
    fn the_heartbeat_republishes_an_unchanged_value() {
        let mut f = on_change(1.0, Some(Duration::from_secs(60)));
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Int(5), t0));
        assert!(!f.should_publish(&Value::Int(5), t0 + Duration::from_secs(59)));
        assert!(f.should_publish(&Value::Int(5), t0 + Duration::from_secs(60)));
        // The heartbeat counts from the last publish, whatever triggered it.
        assert!(f.should_publish(&Value::Int(9), t0 + Duration::from_secs(90)));
        assert!(!f.should_publish(&Value::Int(9), t0 + Duration::from_secs(149)));
        assert!(f.should_publish(&Value::Int(9), t0 + Duration::from_secs(150)));
        assert_eq!(
            f.since_last(t0 + Duration::from_secs(151)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn reset_makes_the_next_value_publish() {
        let mut f = on_change(1.0, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Int(5), t0));
        assert!(!f.should_publish(&Value::Int(5), t0));
        f.reset();
        assert_eq!(f.since_last(t0), None);
        assert!(f.should_publish(&Value::Int(5), t0));
    }
}
