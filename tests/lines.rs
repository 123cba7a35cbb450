//! Serial line devices end to end: the real binary on one end of a socat pty pair, a scripted
//! peer (written here) on the other end printing lines or answering queries, a real mosquitto.
//! Plus the configuration checks of the new keys and `check --sample`.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{run_cli, Gateway, Mosquitto, MqttProbe, Msg, PtyPair};
use fieldbridge::config::{self, ConfigError};
use fieldbridge::model::{BusKind, Checksum, DataType, Encoding, LineMode, LineParser};
use rumqttc::QoS;
use serde_json::{json, Value as Json};

const WAIT: Duration = Duration::from_secs(15);

fn header(broker_port: u16) -> String {
    format!(
        "gateway:\n  id: gw\n  prefix: t\nmqtt:\n  url: mqtt://127.0.0.1:{broker_port}\n  reconnect: {{ min: 100ms, max: 500ms }}\n"
    )
}

fn open_end(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Stops a peer thread when dropped.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A device printing `line(n)` every `period` (n = 1, 2, ...), reopening its end of the
/// cable whenever a write fails (socat restarted). Returns the count written and a guard.
fn streaming_peer(
    path: &Path,
    period: Duration,
    line: impl Fn(u64) -> Vec<u8> + Send + 'static,
) -> (Arc<AtomicU64>, Stop) {
    let path = path.to_path_buf();
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (w, s) = (written.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut port: Option<File> = None;
        while !s.load(Ordering::Relaxed) {
            if port.is_none() {
                port = open_end(&path).ok();
            }
            if let Some(f) = port.as_mut() {
                let n = w.load(Ordering::Relaxed) + 1;
                if f.write_all(&line(n)).is_ok() {
                    w.store(n, Ordering::Relaxed);
                } else {
                    port = None;
                }
            }
            std::thread::sleep(period);
        }
    });
    (written, Stop(stop))
}

/// A device that answers each line it receives (terminator removed) with `answer(line)`, if
/// any. Returns every byte it received.
fn answering_peer(
    path: &Path,
    answer: impl Fn(&str) -> Option<String> + Send + 'static,
) -> Arc<Mutex<Vec<u8>>> {
    let mut port = open_end(path).expect("open the peer end");
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut line = Vec::new();
        loop {
            let n = match port.read(&mut buf) {
                Ok(0) | Err(_) => return, // socat gone: the test is over
                Ok(n) => n,
            };
            log.lock().unwrap().extend_from_slice(&buf[..n]);
            for &b in &buf[..n] {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                let text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                line.clear();
                if let Some(reply) = answer(&text) {
                    if port.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    received
}

/// Every message on `topic` during `within`, as JSON values of `value`.
fn values_of(msgs: &[Msg], topic: &str) -> Vec<Json> {
    msgs.iter()
        .filter(|m| m.topic == topic)
        .map(|m| m.json()["value"].clone())
        .collect()
}

const STREAM_DEVICE: &str = r#"
buses:
  - { name: s, type: lines, port: "PORT", baud: 9600, line_end: "\r\n" }
devices:
  - name: th
    bus: s
    mode: stream
    timeout: 2s
    parse: { kv: { separator: ";", assign: "=" } }
    points:
      - { name: temp, field: T, unit: "°C" }
      - { name: hum, field: H, type: f64, scale: 0.1 }
      - { name: ok, field: OK, type: bool }
      - { name: id, field: ID, type: string }
      - { name: count, field: N, type: i64 }
      - { name: mode, field: M, type: u64, labels: { 0: "OFF", 1: "ON" } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lines_arrive_typed_at_the_broker() {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = format!(
        "{}{}",
        header(broker.port()),
        STREAM_DEVICE.replace("PORT", &pty.a().display().to_string())
    );
    let gateway = Gateway::start(&yaml);
    let (_written, _stop) = streaming_peer(pty.b(), Duration::from_millis(100), |n| {
        format!("T=23.41;H=452;OK=on;ID=th-1;N={n};M=1\r\n").into_bytes()
    });

    // The first status is `online`. (It once was `offline`: another test's stopped pty pair
    // left links to /dev/pts numbers this pair had been given, and that test's gateway held
    // our port locked (serialport's TIOCEXCL and flock). PtyPair::stop removes its links
    // first now.)
    let first = probe.expect_msg(|m| m.topic == "t/th/status", WAIT).await;
    assert_eq!(first.text(), "online");
    let mut seen = std::collections::BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 6 && Instant::now() < deadline {
        if let Some(m) = probe.next(Duration::from_millis(500)).await {
            if m.topic != "t/th/status" {
                seen.insert(m.topic.clone(), m.json());
            }
        }
    }
    assert_eq!(seen["t/th/temp"]["value"], json!(23.41), "{seen:?}");
    assert_eq!(seen["t/th/temp"]["unit"], json!("°C"));
    assert_eq!(seen["t/th/hum"]["value"], json!(45.2));
    assert_eq!(seen["t/th/ok"]["value"], json!(true));
    assert_eq!(seen["t/th/id"]["value"], json!("th-1"));
    assert!(seen["t/th/count"]["value"].as_i64().unwrap() >= 1);
    assert_eq!(seen["t/th/mode"]["value"], json!("ON"));
    assert_eq!(seen["t/th/mode"]["raw"], json!(1));
    let ts = seen["t/th/temp"]["ts"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 24, "ts {ts}");
    gateway.expect_log("line port opened", WAIT);
}

/// Two devices on one RS-485 line, told apart by their query; a third one never answers.
const POLLED_DEVICES: &str = r#"
buses:
  - { name: rs485, type: lines, port: "PORT" }
devices:
  - name: a
    bus: rs485
    mode: poll
    query: 'A?\r\n'
    interval: 200ms
    timeout: 300ms
    parse: { regex: '^A T=(?P<t>-?[0-9.]+)$' }
    points:
      - { name: temp, field: t }
  - name: b
    bus: rs485
    mode: poll
    query: "B?"
    interval: 200ms
    timeout: 300ms
    parse: { json: {} }
    points:
      - { name: level, field: /tank/level, type: i64 }
      - { name: pump, field: pump, type: bool }
"#;

const SILENT_DEVICE: &str = r#"
  - name: c
    bus: rs485
    mode: poll
    query: "C?"
    interval: 200ms
    timeout: 200ms
    offline_after: 2
    backoff_max: 400ms
    parse: { regex: '^C (?P<v>\d+)$' }
    points:
      - { name: v, field: v, type: u64 }
"#;

fn poll_answers(q: &str) -> Option<String> {
    match q {
        "A?" => Some("A T=-1.5\r\n".into()),
        "B?" => Some("{\"id\": \"B\", \"tank\": {\"level\": 42}, \"pump\": true}\n".into()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_devices_on_one_bus_each_get_their_answer() {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let received = answering_peer(pty.b(), poll_answers);
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = format!(
        "{}{}",
        header(broker.port()),
        POLLED_DEVICES.replace("PORT", &pty.a().display().to_string())
    );
    let _gateway = Gateway::start(&yaml);
    let msgs = probe.collect_for(Duration::from_secs(3)).await;
    let temps = values_of(&msgs, "t/a/temp");
    let levels = values_of(&msgs, "t/b/level");
    assert!(temps.len() >= 5, "a: {temps:?}");
    assert!(levels.len() >= 5, "b: {levels:?}");
    assert!(temps.iter().all(|v| *v == json!(-1.5)));
    assert!(levels.iter().all(|v| *v == json!(42)));
    assert!(values_of(&msgs, "t/b/pump")
        .iter()
        .all(|v| *v == json!(true)));
    // The queries went out as configured: `A?\r\n` as written, `B?` with the bus's `\n`.
    let wire = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert!(
        wire.starts_with("A?\r\nB?\n") || wire.starts_with("B?\nA?\r\n"),
        "{wire:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_goes_offline_while_the_other_keeps_its_rate() {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let _received = answering_peer(pty.b(), poll_answers);
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let devices = POLLED_DEVICES.replace("PORT", &pty.a().display().to_string());
    let yaml = format!("{}{devices}{SILENT_DEVICE}", header(broker.port()));
    let _gateway = Gateway::start(&yaml);
    let offline = probe
        .expect_msg(|m| m.topic == "t/c/status" && m.text() == "offline", WAIT)
        .await;
    assert_eq!(offline.text(), "offline");
    // With c failing (each miss costs at most one 200 ms timeout, then backed off), a keeps
    // close to its 200 ms interval: at least 10 readings in 3 s (15 without any delay).
    let msgs = probe.collect_for(Duration::from_secs(3)).await;
    let a = values_of(&msgs, "t/a/temp").len();
    assert!(a >= 10, "a published only {a} readings in 3 s");
    assert!(values_of(&msgs, "t/c/v").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_long_lines_and_invalid_utf8_never_lose_a_good_line() {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = format!(
        "{}buses:\n  - {{ name: s, type: lines, port: \"{}\", max_line: 64 }}\ndevices:\n  - name: g\n    bus: s\n    timeout: 5s\n    parse: {{ regex: '^T=(?P<t>-?\\d+)$' }}\n    points:\n      - {{ name: t, field: t, type: i64 }}\n",
        header(broker.port()),
        pty.a().display()
    );
    let gateway = Gateway::start(&yaml);
    let mut port = open_end(pty.b()).unwrap();
    // Until the gateway has the port open, what is written may be flushed away.
    let deadline = Instant::now() + WAIT;
    loop {
        port.write_all(b"T=0\n").unwrap();
        if let Some(m) = probe.next(Duration::from_millis(200)).await {
            if m.topic == "t/g/t" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no first reading");
    }
    let mut burst = Vec::new();
    for n in 1..=20 {
        burst.extend_from_slice(format!("T={n}\n").as_bytes());
        match n % 4 {
            0 => burst.extend_from_slice(b"#$%&garbage!!\n"),
            1 => {
                burst.extend(std::iter::repeat_n(b'x', 300));
                burst.push(b'\n');
            }
            2 => burst.extend_from_slice(b"T=\xff\xfe\x80\n"),
            _ => burst.extend_from_slice(b"\x00\x01\x02\r\n\n"),
        }
    }
    port.write_all(&burst).unwrap();
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 20 && Instant::now() < deadline {
        if let Some(m) = probe.next(Duration::from_millis(500)).await {
            if m.topic == "t/g/t" {
                let v = m.json()["value"].as_i64().unwrap();
                if v > 0 {
                    got.insert(v);
                }
            }
        }
    }
    assert_eq!(got, (1..=20).collect(), "good lines lost");
    for kind in [
        "kind=\"too_long\"",
        "kind=\"invalid_utf8\"",
        "kind=\"unmatched\"",
    ] {
        gateway.expect_log(kind, WAIT);
    }
    // Rate-limited: each kind is logged in full once (the rest are debug lines).
    let logs = gateway.logs();
    let full = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("kind=\"unmatched\""))
        .count();
    assert_eq!(full, 1, "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_resume_after_the_port_disappears_and_comes_back() {
    let broker = Mosquitto::start();
    let mut pty = PtyPair::new();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = format!(
        "{}buses:\n  - {{ name: s, type: lines, port: \"{}\", reconnect_max: 500ms }}\ndevices:\n  - name: u\n    bus: s\n    timeout: 500ms\n    offline_after: 2\n    parse: {{ kv: {{ separator: ',' }} }}\n    points:\n      - {{ name: n, field: n, type: u64 }}\n",
        header(broker.port()),
        pty.a().display()
    );
    let gateway = Gateway::start(&yaml);
    let (written, _stop) = streaming_peer(pty.b(), Duration::from_millis(50), |n| {
        format!("n={n}\n").into_bytes()
    });
    probe.expect_msg(|m| m.topic == "t/u/n", WAIT).await;

    // The USB adapter is unplugged: both ptys vanish; a new pair appears at the same paths.
    pty.stop();
    probe
        .expect_msg(|m| m.topic == "t/u/status" && m.text() == "offline", WAIT)
        .await;
    gateway.expect_log("line port lost", WAIT);
    std::thread::sleep(Duration::from_millis(300));
    pty.restart();
    let before = written.load(Ordering::Relaxed);
    probe
        .expect_msg(|m| m.topic == "t/u/status" && m.text() == "online", WAIT)
        .await;
    let after = probe
        .expect_msg(
            |m| m.topic == "t/u/n" && m.json()["value"].as_u64().unwrap_or(0) > before,
            WAIT,
        )
        .await;
    assert!(after.json()["value"].as_u64().unwrap() > before);
    gateway.expect_log("line port reopened", WAIT);
}

async fn wait_ready(probe: &mut MqttProbe) {
    probe.wait_gateway_answers("t", WAIT).await;
}

async fn command(probe: &mut MqttProbe, topic: &str, payload: &str) -> Json {
    probe.publish(topic, payload, QoS::AtLeastOnce, false).await;
    let result_topic = format!("{topic}/result");
    probe.expect(|t| t == result_topic, WAIT).await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_command_puts_the_exact_line_on_the_wire_and_reports_the_reply() {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let received = answering_peer(pty.b(), |q| {
        if q == "S?" {
            return Some("SP=20.0\r\n".into());
        }
        let v: f64 = q.strip_prefix("SET ")?.parse().ok()?;
        Some(if v <= 50.0 { "OK\r\n" } else { "ERR 3\r\n" }.into())
    });
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = format!(
        "{}buses:\n  - {{ name: s, type: lines, port: \"{}\", line_end: \"\\r\\n\" }}\ndevices:\n  - name: heater\n    bus: s\n    mode: poll\n    query: 'S?'\n    interval: 60s\n    timeout: 500ms\n    parse: {{ regex: '^SP=(?P<sp>[0-9.]+)$' }}\n    points:\n      - name: setpoint\n        field: sp\n        writable: true\n        min: 0\n        max: 90\n        command: {{ template: 'SET {{value:.1}}', reply: '^OK' }}\n",
        header(broker.port()),
        pty.a().display()
    );
    let _gateway = Gateway::start(&yaml);
    wait_ready(&mut probe).await;

    // `{value:.1}` would send 21.46 as 21.5 while the result said 21.46: refused.
    let inexact = command(
        &mut probe,
        "t/heater/setpoint/set",
        "{\"value\": 21.46, \"id\": \"c-0\"}",
    )
    .await;
    assert_eq!(inexact["reason"], json!("not_representable"), "{inexact}");
    let ok = command(
        &mut probe,
        "t/heater/setpoint/set",
        "{\"value\": 21.5, \"id\": \"c-1\"}",
    )
    .await;
    assert_eq!(ok["ok"], json!(true), "{ok}");
    assert_eq!(ok["id"], json!("c-1"));
    assert_eq!(ok["value"], json!(21.5));
    // The new value is published on the point's topic at once.
    let published = probe.expect(|t| t == "t/heater/setpoint", WAIT).await;
    assert_eq!(published.json()["value"], json!(21.5));

    let refused = command(&mut probe, "t/heater/setpoint/set", "60").await;
    assert_eq!(refused["ok"], json!(false), "{refused}");
    assert_eq!(refused["reason"], json!("protocol"));
    assert!(
        refused["error"].as_str().unwrap().contains("ERR 3"),
        "{refused}"
    );

    let out_of_range = command(&mut probe, "t/heater/setpoint/set", "95").await;
    assert_eq!(out_of_range["reason"], json!("out_of_range"));

    let wire = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    let writes: Vec<&str> = wire
        .split_inclusive("\r\n")
        .filter(|l| l.starts_with("SET"))
        .collect();
    assert_eq!(writes, ["SET 21.5\r\n", "SET 60.0\r\n"], "{wire:?}");
}

// ---------------------------------------------------------------------------------------------
// configuration

const HEAD: &str = "\
gateway:
  id: gw
mqtt:
  url: mqtt://localhost
buses:
  - name: s
    type: lines
    port: /dev/ttyUSB0
devices:
  - name: dev
    bus: s
";
// HEAD has 11 lines; the device's next key is on line 12.

fn errors(text: &str) -> Vec<ConfigError> {
    match config::parse(text, "test.yaml") {
        Ok(_) => panic!("expected errors, the config loaded"),
        Err(e) => e.errors,
    }
}

fn one_error(text: &str) -> ConfigError {
    let mut errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    errs.remove(0)
}

#[test]
fn a_line_device_loads_with_its_defaults() {
    let c = config::parse(
        &format!(
            "{HEAD}    parse: {{ regex: 'T=(?P<temp>[-0-9.]+)' }}\n    checksum: nmea\n    sample: 'T=1*00'\n    points:\n      - {{ name: temp, unit: C }}\n      - {{ name: sp, field: temp, writable: true, command: {{ template: 'SET {{value:.1}}', reply: '^OK' }} }}\n"
        ),
        "t.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let BusKind::Lines(bus) = &c.buses[0].kind else {
        panic!("not a lines bus")
    };
    assert_eq!(
        (bus.line_end.as_slice(), bus.max_line, bus.encoding),
        (&b"\n"[..], 512, Encoding::Utf8)
    );
    let d = &c.devices[0];
    assert_eq!(d.timeout, Duration::from_secs(5), "streaming default");
    let line = d.line.as_ref().unwrap();
    assert_eq!(line.mode, LineMode::Stream);
    assert_eq!(
        line.parser,
        LineParser::Regex("T=(?P<temp>[-0-9.]+)".into())
    );
    assert_eq!(line.checksum, Some(Checksum::Nmea));
    assert_eq!(line.points[0].field, "temp", "field defaults to the name");
    assert_eq!(d.points[0].data_type, DataType::F64);
    let cmd = line.points[1].command.as_ref().unwrap();
    assert_eq!(
        cmd.template, "SET {value:.1}\n",
        "the bus's line end is appended"
    );
    assert_eq!(cmd.reply.as_deref(), Some("^OK"));
    assert_eq!(d.commands[1].topic, "gw/dev/sp/set");
}

#[test]
fn poll_mode_needs_a_query_and_unescapes_it() {
    let c = config::parse(
        &format!("{HEAD}    mode: poll\n    query: 'READ?\\r\\n'\n    parse: {{ json: {{}} }}\n    points:\n      - {{ name: t, field: /a/0 }}\n"),
        "t.yaml",
    )
    .unwrap();
    assert_eq!(
        c.devices[0].line.as_ref().unwrap().mode,
        LineMode::Poll {
            query: b"READ?\r\n".to_vec()
        }
    );
    let e = one_error(&format!(
        "{HEAD}    mode: poll\n    parse: {{ json: {{}} }}\n    points:\n      - {{ name: t }}\n"
    ));
    assert_eq!(e.path, "devices[0]");
    assert_eq!(e.message, "a device with mode poll needs `query`");
    assert_eq!(e.line, Some(10));
}

#[test]
fn a_regex_without_the_points_capture_is_refused_with_the_captures() {
    let e = one_error(&format!(
        "{HEAD}    parse: {{ regex: 'T=(?P<temp>[-0-9.]+)' }}\n    points:\n      - {{ name: t, field: tmp }}\n"
    ));
    assert_eq!(e.path, "devices[0].points[0].field");
    assert_eq!(e.line, Some(14));
    assert_eq!(e.message, "the regex has no capture named `tmp`");
    assert_eq!(
        e.hint.as_deref(),
        Some("captures: temp; did you mean `temp`?")
    );
}

#[test]
fn every_line_mistake_is_reported_with_its_line() {
    let text = format!(
        "{HEAD}    unit: 3\n    parse: {{ regex: '(?P<a>[' }}\n    checksum: crc\n    interval: 1s\n    points:\n      - {{ name: a, address: 4, type: u16 }}\n      - {{ name: b, writable: true }}\n      - {{ name: c, writable: true, command: {{ template: 'SET {{val}}' }} }}\n"
    );
    let got: Vec<(String, Option<usize>, String)> = errors(&text)
        .into_iter()
        .map(|e| (e.path, e.line, e.message))
        .collect();
    let want: Vec<(String, Option<usize>, String)> = [
        (
            "devices[0].unit",
            12,
            "`unit` applies only to Modbus devices",
        ),
        (
            "devices[0].parse.regex",
            13,
            "not a regular expression: found unclosed character class",
        ),
        ("devices[0].checksum", 14, "`crc` is not one of nmea"),
        (
            "devices[0].interval",
            15,
            "`interval` applies only to mode poll",
        ),
        (
            "devices[0].points[0].address",
            17,
            "`address` does not apply to a point of a line device",
        ),
        (
            "devices[0].points[0].type",
            17,
            "`u16` is not one of f64, i64, u64, bool, string (for a line device)",
        ),
        (
            "devices[0].points[1]",
            18,
            "a writable point of a line device needs `command.template`",
        ),
        (
            "devices[0].points[2].command.template",
            19,
            "unknown placeholder `{val}`: use {value} or {value:.N}",
        ),
    ]
    .iter()
    .map(|(p, l, m)| (p.to_string(), Some(*l), m.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn line_keys_are_refused_on_modbus_buses_and_devices() {
    let text = "\
gateway:
  id: gw
mqtt:
  url: mqtt://localhost
buses:
  - { name: m, type: rtu, port: /dev/ttyUSB0, line_end: \"\\r\\n\" }
devices:
  - name: dev
    bus: m
    unit: 1
    parse: { json: {} }
    points:
      - { name: a, address: 0, field: x }
";
    let got: Vec<(String, Option<usize>, String)> = errors(text)
        .into_iter()
        .map(|e| (e.path, e.line, e.message))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "buses[0].line_end".to_string(),
                Some(6),
                "`line_end` applies only to lines buses".to_string()
            ),
            (
                "devices[0].parse".into(),
                Some(11),
                "`parse` applies only to devices on lines buses".into()
            ),
            (
                "devices[0].points[0].field".into(),
                Some(13),
                "`field` applies only to points of devices on lines buses".into()
            ),
        ]
    );
}

#[test]
fn a_bad_line_end_and_a_decimal_template_on_an_integer_are_refused() {
    let text = "\
gateway:
  id: gw
mqtt:
  url: mqtt://localhost
buses:
  - { name: s, type: lines, port: /dev/ttyUSB0, line_end: ';', encoding: ascii }
devices:
  - name: dev
    bus: s
    parse: { kv: {} }
    points:
      - { name: n, type: i64, writable: true, command: { template: 'N {value:.2}' } }
";
    let got: Vec<(String, Option<usize>)> = errors(text)
        .into_iter()
        .map(|e| (e.message, e.line))
        .collect();
    assert_eq!(
        got,
        vec![
            ("`;` is not one of \\n, \\r\\n, \\r".to_string(), Some(6)),
            ("`ascii` is not one of utf8, latin1".to_string(), Some(6)),
            (
                "`{value:.N}` takes decimals, which a i64 point has none of".to_string(),
                Some(12)
            ),
        ]
    );
}

#[test]
fn modbus_points_still_need_an_address() {
    let text = "\
gateway:
  id: gw
mqtt:
  url: mqtt://localhost
buses:
  - { name: m, type: tcp, host: 127.0.0.1 }
devices:
  - name: dev
    bus: m
    points:
      - { name: a, type: u16 }
";
    let e = one_error(text);
    assert_eq!(e.path, "devices[0].points[0].address");
    assert_eq!(e.message, "required key `address` is missing");
    assert_eq!(e.line, Some(11));
}

#[test]
fn check_shows_how_the_sample_and_a_given_line_parse() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!("{HEAD}    parse: {{ kv: {{ separator: ';' }} }}\n    sample: 'T=23.41;H=45.2'\n    points:\n      - {{ name: temp, field: T, unit: C }}\n      - {{ name: hum, field: H, scale: 0.1 }}\n      - {{ name: flag, field: F, type: bool }}\n"),
    )
    .unwrap();
    let out = run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains("device dev (line device: stream"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("temp <- \"T\": 23.41 C"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("hum <- \"H\": 4.52"), "{}", out.stdout);
    assert!(
        out.stdout.contains("flag <- \"F\": (not in this line)"),
        "{}",
        out.stdout
    );

    let out = run_cli(&[
        "check",
        "--config",
        path.to_str().unwrap(),
        "--sample",
        "dev",
        "T=1;F=maybe",
    ]);
    assert!(out.success(), "{out:?}");
    let sample = out
        .stdout
        .split("sample for dev:")
        .nth(1)
        .expect("sample section");
    assert!(sample.contains("temp <- \"T\": 1.0 C"), "{sample}");
    assert!(
        sample.contains("flag <- \"F\": bad quality: parse: `maybe` is not a bool"),
        "{sample}"
    );

    let out = run_cli(&[
        "check",
        "--config",
        path.to_str().unwrap(),
        "--sample",
        "dev",
        "nothing",
    ]);
    assert!(
        out.stdout.contains("no reading (unmatched)"),
        "{}",
        out.stdout
    );
    let out = run_cli(&[
        "check",
        "--config",
        path.to_str().unwrap(),
        "--sample",
        "nope",
        "x",
    ]);
    assert_eq!(out.code, Some(2));
}

#[test]
fn the_serial_sensors_example_loads_and_its_samples_parse() {
    let c = config::load("config/examples/serial-sensors.yaml".as_ref())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.devices.len(), 3);
    let out = run_cli(&["check", "--config", "config/examples/serial-sensors.yaml"]);
    assert!(out.success(), "{out:?}");
    for shown in [
        "temperature <- \"T\": 23.41 °C",
        "level <- \"/level/mm\": 0.812 m",
        "alarm <- \"alarm\": \"ok\" (raw false)",
        "setpoint <- \"sp\": 21.5 °C",
        "output <- \"out\": 40 %",
    ] {
        assert!(out.stdout.contains(shown), "{shown}:\n{}", out.stdout);
    }
}
