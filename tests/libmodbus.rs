//! An independent Modbus peer: libmodbus' own unit-test server (`tests/unit-test-server.c` of
//! Debian's libmodbus source, built by scripts/install-libmodbus-peer against libmodbus-dev;
//! its one change: the TCP port or serial device as second argument). Its tables are those of
//! `unit-test.h`; some holding-register addresses misbehave on purpose (see
//! `unit-test-server.c`): 0x171 answers with a wrong transaction id (TCP) or slave id (RTU),
//! 0x172 sleeps 500 ms first, 0x173 answers byte by byte, 5 ms apart (TCP only).
//!
//! Like unit-test-client.c, the test writes the coil and holding-register tables first (the
//! server only sets the inputs itself), here through the gateway's commands, and then checks
//! every value the gateway reads back.
//!
//! The TCP server serves one connection and exits when it closes; it runs in a bounded shell
//! loop so that the gateway's reconnect (after a timeout) finds it again.

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Gateway, Mosquitto, MqttProbe, Msg, PtyPair};
use rumqttc::QoS;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

// unit-test.h (libmodbus 3.1.6).
const UT_BITS_ADDRESS: u16 = 0x130;
const UT_BITS_NB: u16 = 0x25;
const UT_BITS_TAB: [u8; 5] = [0xCD, 0x6B, 0xB2, 0x0E, 0x1B];
const UT_INPUT_BITS_ADDRESS: u16 = 0x1C4;
const UT_INPUT_BITS_NB: u16 = 0x16;
const UT_INPUT_BITS_TAB: [u8; 3] = [0xAC, 0xDB, 0x35];
const UT_REGISTERS_ADDRESS: u16 = 0x160;
const UT_REGISTERS_TAB: [u16; 3] = [0x022B, 0x0001, 0x0064];
const UT_INPUT_REGISTERS_ADDRESS: u16 = 0x108;
const UT_INPUT_REGISTERS_TAB: [u16; 1] = [0x000A];
const UT_REGISTERS_ADDRESS_INVALID_TID_OR_SLAVE: u16 = 0x171;
const UT_REGISTERS_ADDRESS_SLEEP_500_MS: u16 = 0x172;
const UT_REGISTERS_ADDRESS_BYTE_SLEEP_5_MS: u16 = 0x173;
const SERVER_ID: u8 = 17;

fn bit(tab: &[u8], i: u16) -> bool {
    tab[usize::from(i / 8)] >> (i % 8) & 1 == 1
}

fn server_binary() -> PathBuf {
    let cache = std::env::var_os("FIELDBRIDGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fieldbridge")
        });
    let bin = cache.join("libmodbus/unit-test-server");
    assert!(
        bin.is_file(),
        "{} missing: run scripts/install-libmodbus-peer",
        bin.display()
    );
    bin
}

/// The unit-test server (in a bounded respawn loop for TCP), killed by process group on drop.
struct UnitTestServer {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl UnitTestServer {
    fn start(backend: &str, where_: &str) -> UnitTestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("server.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"i=0; while [ "$i" -lt 200 ]; do "$0" "$1" "$2"; i=$((i+1)); done"#)
            .arg(server_binary())
            .arg(backend)
            .arg(where_)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("spawn unit-test-server");
        UnitTestServer {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for UnitTestServer {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Points of the unit-test tables: holding registers and coils writable.
fn table_points() -> String {
    let mut p = String::new();
    for (i, _) in UT_REGISTERS_TAB.iter().enumerate() {
        p += &format!(
            "      - {{ name: hr{i}, address: {}, type: u16, writable: true }}\n",
            UT_REGISTERS_ADDRESS + i as u16
        );
    }
    for (i, _) in UT_INPUT_REGISTERS_TAB.iter().enumerate() {
        p += &format!(
            "      - {{ name: ir{i}, register: input, address: {}, type: u16 }}\n",
            UT_INPUT_REGISTERS_ADDRESS + i as u16
        );
    }
    for i in 0..UT_BITS_NB {
        p += &format!(
            "      - {{ name: co{i}, register: coil, address: {}, writable: true }}\n",
            UT_BITS_ADDRESS + i
        );
    }
    for i in 0..UT_INPUT_BITS_NB {
        p += &format!(
            "      - {{ name: di{i}, register: discrete, address: {} }}\n",
            UT_INPUT_BITS_ADDRESS + i
        );
    }
    p
}

/// The latest reading of every point of `device` seen within `within`, until `done` holds.
async fn readings_until(
    probe: &mut MqttProbe,
    device: &str,
    latest: &mut std::collections::BTreeMap<String, Value>,
    done: impl Fn(&std::collections::BTreeMap<String, Value>) -> bool,
    what: &str,
) {
    let deadline = Instant::now() + WAIT;
    let prefix = format!("lm/{device}/");
    while !done(latest) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            panic!("{what}: not done within {WAIT:?}; latest {latest:?}");
        };
        if let Some(point) = m.topic.strip_prefix(&prefix) {
            if !point.contains('/') {
                latest.insert(point.to_string(), m.json());
            }
        }
    }
}

async fn write_tables(probe: &mut MqttProbe, device: &str) {
    let mut commands: Vec<(String, String)> = UT_REGISTERS_TAB
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("hr{i}"), v.to_string()))
        .collect();
    for i in 0..UT_BITS_NB {
        commands.push((format!("co{i}"), bit(&UT_BITS_TAB, i).to_string()));
    }
    for (point, value) in commands {
        let topic = format!("lm/{device}/{point}/set");
        probe
            .publish(&topic, value.clone(), QoS::AtLeastOnce, false)
            .await;
        let result = format!("{topic}/result");
        let r = probe
            .expect_msg(|m: &Msg| m.topic == result, WAIT)
            .await
            .json();
        assert_eq!(r["ok"], json!(true), "write {point} = {value}: {r}");
    }
}

fn tables_as_read(latest: &std::collections::BTreeMap<String, Value>) -> bool {
    let v = |k: &str| latest.get(k).map(|m| m["value"].clone());
    UT_REGISTERS_TAB
        .iter()
        .enumerate()
        .all(|(i, x)| v(&format!("hr{i}")) == Some(json!(x)))
        && UT_INPUT_REGISTERS_TAB
            .iter()
            .enumerate()
            .all(|(i, x)| v(&format!("ir{i}")) == Some(json!(x)))
        && (0..UT_BITS_NB).all(|i| v(&format!("co{i}")) == Some(json!(bit(&UT_BITS_TAB, i))))
        && (0..UT_INPUT_BITS_NB)
            .all(|i| v(&format!("di{i}")) == Some(json!(bit(&UT_INPUT_BITS_TAB, i))))
}

fn config(bus: &str, devices: &str) -> String {
    format!(
        "gateway: {{ id: gw, prefix: lm, clock: local }}\nmqtt:\n  url: mqtt://127.0.0.1:{{broker}}\n  reconnect: {{ min: 100ms, max: 500ms }}\n\
         buses:\n{bus}devices:\n{devices}"
    )
}

/// Every reading of `topic` seen until `pred` matched one; panics after `WAIT`.
async fn until(
    probe: &mut MqttProbe,
    topic: &str,
    seen: &mut Vec<Value>,
    pred: impl Fn(&Value) -> bool,
    what: &str,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            panic!("{what}: not seen within {WAIT:?}; saw {seen:?}");
        };
        if m.topic == topic {
            let v = m.json();
            seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libmodbus_unit_test_server_over_tcp() {
    let servers: Vec<(u16, UnitTestServer)> = (0..3)
        .map(|_| {
            let port = free_port();
            (port, UnitTestServer::start("tcp", &port.to_string()))
        })
        .collect();
    let broker = Mosquitto::start();
    let mut probe = MqttProbe::connect(broker.port(), "lm/#").await;
    // Bus b: the tables. b2: the byte-by-byte answer (it carries unit 255 whatever was asked).
    // b3: the slow register beside a steady one.
    let bus = format!(
        "  - {{ name: b, type: tcp, host: 127.0.0.1, port: {} }}\n  - {{ name: b2, type: tcp, host: 127.0.0.1, port: {} }}\n  - {{ name: b3, type: tcp, host: 127.0.0.1, port: {} }}\n",
        servers[0].0, servers[1].0, servers[2].0
    );
    let devices = format!(
        "  - name: ut\n    bus: b\n    unit: 255\n    interval: 300ms\n    points:\n{}\
         \x20 - name: bytes\n    bus: b2\n    unit: 255\n    interval: 500ms\n    points:\n      - {{ name: reg, address: {UT_REGISTERS_ADDRESS_BYTE_SLEEP_5_MS}, type: u16 }}\n\
         \x20 - name: steady\n    bus: b3\n    unit: 255\n    interval: 200ms\n    points:\n      - {{ name: ir0, register: input, address: {UT_INPUT_REGISTERS_ADDRESS}, type: u16 }}\n\
         \x20 - name: slow\n    bus: b3\n    unit: 1\n    interval: 1s\n    timeout: 200ms\n    offline_after: 1\n    points:\n      - {{ name: reg, address: {UT_REGISTERS_ADDRESS_SLEEP_500_MS}, type: u16 }}\n",
        table_points()
    );
    let gateway =
        Gateway::start(&config(&bus, &devices).replace("{broker}", &broker.port().to_string()));
    probe.wait_gateway_answers("lm", WAIT).await;

    // Every value as unit-test.h says, the coils and holding registers after writing them.
    write_tables(&mut probe, "ut").await;
    let mut latest = Default::default();
    readings_until(&mut probe, "ut", &mut latest, tables_as_read, "TCP tables").await;

    // The byte-by-byte answer (one register, 0) is assembled into a good reading.
    let mut seen = Vec::new();
    until(
        &mut probe,
        "lm/bytes/reg",
        &mut seen,
        |v| v["value"] == json!(0),
        "byte-by-byte answer",
    )
    .await;

    // The slow register times out (a transport failure: the device goes offline after
    // `offline_after` polls, no reading is published), and the steady register on the same
    // connection reads right after each timeout: never the late answer (0) taken for its own.
    let mut status = MqttProbe::connect(broker.port(), "lm/slow/status").await;
    status
        .expect_msg(|m: &Msg| m.text().contains("offline"), WAIT)
        .await;
    let deadline = Instant::now() + WAIT;
    let (mut steady, mut slow) = (Vec::new(), Vec::new());
    let timeouts = || {
        gateway
            .logs()
            .matches("device=slow bus=b3 unit=1 error=timeout after 200ms")
            .count()
    };
    while steady.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            panic!(
                "slow/steady: {} steady readings, {} timeouts",
                steady.len(),
                timeouts()
            );
        };
        match m.topic.as_str() {
            "lm/steady/ir0" => steady.push(m.json()),
            "lm/slow/reg" => slow.push(m.json()),
            _ => {}
        }
    }
    let wrong: Vec<&Value> = steady.iter().filter(|v| v["value"] != json!(10)).collect();
    assert!(
        wrong.is_empty(),
        "a late answer taken for the next request's: {wrong:?}"
    );
    assert!(
        slow.iter().all(|v| v["value"].is_null()),
        "the slow register read: {slow:?}"
    );
    assert!(timeouts() >= 1, "the slow register's timeout is logged");
    drop(servers);
}

/// The server in RTU mode on one end of a pty pair, a broker, a probe on `lm/#`, and the bus
/// section for the other end.
async fn rtu_peer() -> (PtyPair, UnitTestServer, Mosquitto, MqttProbe, String) {
    let pty = PtyPair::new();
    let server = UnitTestServer::start("rtu", &pty.b().display().to_string());
    let broker = Mosquitto::start();
    let probe = MqttProbe::connect(broker.port(), "lm/#").await;
    let bus = format!(
        "  - {{ name: r, type: rtu, port: \"{}\", baud: 115200 }}\n",
        pty.a().display()
    );
    (pty, server, broker, probe, bus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libmodbus_unit_test_server_over_rtu() {
    let (_pty, server, broker, mut probe, bus) = rtu_peer().await;
    // The wrong-slave register in a group of its own, so that its failure is its own.
    let devices = format!(
        "  - name: ut\n    bus: r\n    unit: {SERVER_ID}\n    interval: 300ms\n    timeout: 500ms\n    groups: {{ odd: 700ms }}\n    points:\n{}\
         \x20     - {{ name: wrong, address: {UT_REGISTERS_ADDRESS_INVALID_TID_OR_SLAVE}, type: u16, group: odd }}\n",
        table_points()
    );
    let gateway =
        Gateway::start(&config(&bus, &devices).replace("{broker}", &broker.port().to_string()));
    probe.wait_gateway_answers("lm", WAIT).await;
    write_tables(&mut probe, "ut").await;
    let mut latest = Default::default();
    readings_until(&mut probe, "ut", &mut latest, tables_as_read, "RTU tables").await;
    // The answer from slave 18 to a request for 17 is rejected: logged, never a reading,
    // and the tables read on (checked again after it).
    let rejected = || {
        gateway
            .logs()
            .lines()
            .filter(|l| {
                l.contains("device=ut")
                    && l.contains("mismatching headers")
                    && l.contains("slave_id: 18")
            })
            .count()
    };
    assert!(
        common::wait_until(WAIT, || rejected() >= 1),
        "the wrong slave's answer not reported:\n{}\n{}",
        gateway
            .logs()
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n"),
        server.log()
    );
    tables_read_on_without_wrong(
        &mut probe,
        &latest,
        tables_as_read,
        "RTU tables after the wrong slave",
    )
    .await;
}

/// After the wrong answers were refused: the tables (`done`) read again, and the `wrong`
/// register never had a value, neither in `latest` nor since.
async fn tables_read_on_without_wrong(
    probe: &mut MqttProbe,
    latest: &std::collections::BTreeMap<String, Value>,
    done: impl Fn(&std::collections::BTreeMap<String, Value>) -> bool,
    what: &str,
) {
    let mut again = Default::default();
    readings_until(probe, "ut", &mut again, done, what).await;
    let taken: Vec<&Value> = [latest.get("wrong"), again.get("wrong")]
        .into_iter()
        .flatten()
        .filter(|v| !v["value"].is_null())
        .collect();
    assert!(
        taken.is_empty(),
        "{what}: the wrong answer was taken: {taken:?}"
    );
}

/// The gateway's log lines about `device` that say a reply's header did not match its request.
fn mismatches(gateway: &Gateway, device: &str) -> Vec<String> {
    gateway
        .logs()
        .lines()
        .filter(|l| l.contains(&format!("device={device} ")) && l.contains("mismatching headers"))
        .map(str::to_string)
        .collect()
}

/// The tables as a freshly started server holds them: its inputs, nothing written yet.
fn fresh_tables_as_read(latest: &std::collections::BTreeMap<String, Value>) -> bool {
    let v = |k: &str| latest.get(k).map(|m| m["value"].clone());
    (0..UT_REGISTERS_TAB.len()).all(|i| v(&format!("hr{i}")) == Some(json!(0)))
        && UT_INPUT_REGISTERS_TAB
            .iter()
            .enumerate()
            .all(|(i, x)| v(&format!("ir{i}")) == Some(json!(x)))
        && (0..UT_BITS_NB).all(|i| v(&format!("co{i}")) == Some(json!(false)))
        && (0..UT_INPUT_BITS_NB)
            .all(|i| v(&format!("di{i}")) == Some(json!(bit(&UT_INPUT_BITS_TAB, i))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libmodbus_wrong_transaction_id_over_tcp() {
    // 0x171 over TCP: the server answers with transaction id 0 and unit 255 whatever was asked.
    // Unit 17, so that even the first request of a connection (transaction id 0) is refused;
    // the register sits in a group of its own, read after the tables, so that its requests
    // carry ids above 0. Each refusal drops the connection, and the server (one connection per
    // process) starts again with its tables as unit-test.h leaves them: nothing written.
    let port = free_port();
    let server = UnitTestServer::start("tcp", &port.to_string());
    let broker = Mosquitto::start();
    let mut probe = MqttProbe::connect(broker.port(), "lm/#").await;
    let bus = format!("  - {{ name: b, type: tcp, host: 127.0.0.1, port: {port} }}\n");
    let devices = format!(
        "  - name: ut\n    bus: b\n    unit: {SERVER_ID}\n    interval: 300ms\n    backoff_max: 600ms\n    groups: {{ odd: 700ms }}\n    points:\n{}\
         \x20     - {{ name: wrong, address: {UT_REGISTERS_ADDRESS_INVALID_TID_OR_SLAVE}, type: u16, group: odd }}\n",
        table_points()
    );
    let gateway =
        Gateway::start(&config(&bus, &devices).replace("{broker}", &broker.port().to_string()));
    probe.wait_gateway_answers("lm", WAIT).await;
    let mut latest = Default::default();
    readings_until(
        &mut probe,
        "ut",
        &mut latest,
        fresh_tables_as_read,
        "TCP tables",
    )
    .await;
    // Refused for its transaction id (among others): asked with an id above 0, answered with 0.
    let by_id = || {
        mismatches(&gateway, "ut")
            .iter()
            .filter(|l| {
                l.contains("actual/response = Header { transaction_id: 0, unit_id: 255 }")
                    && !l.contains("expected/request = Header { transaction_id: 0,")
            })
            .count()
    };
    assert!(
        common::wait_until(WAIT, || by_id() >= 2),
        "the wrong transaction id's answer not reported:\n{}\n{}",
        mismatches(&gateway, "ut").join("\n"),
        server.log()
    );
    tables_read_on_without_wrong(
        &mut probe,
        &latest,
        fresh_tables_as_read,
        "TCP tables after the wrong transaction id",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libmodbus_slow_register_over_rtu() {
    // 0x172 answers 500 ms after the request, past the device's 300 ms timeout. A write sent as
    // the timeout is logged waits for the bus and goes out as soon as the port is reopened: it
    // must not meet the late reply (RTU has no transaction id; a reply of the same shape would
    // be taken for the next request's, another one fails it although the device applied it).
    let (_pty, server, broker, mut probe, bus) = rtu_peer().await;
    let devices = format!(
        "  - name: ut\n    bus: r\n    unit: {SERVER_ID}\n    interval: 1s\n    timeout: 300ms\n    backoff_max: 1s\n    groups: {{ slow: 1s }}\n    points:\n\
         \x20     - {{ name: hr2, address: {}, type: u16, writable: true }}\n\
         \x20     - {{ name: slow, address: {UT_REGISTERS_ADDRESS_SLEEP_500_MS}, type: u16, group: slow }}\n",
        UT_REGISTERS_ADDRESS + 2
    );
    let gateway =
        Gateway::start(&config(&bus, &devices).replace("{broker}", &broker.port().to_string()));
    probe.wait_gateway_answers("lm", WAIT).await;
    let timeouts = || {
        gateway
            .logs()
            .lines()
            .filter(|l| l.contains("device=ut ") && l.contains("error=timeout after 300ms"))
            .count()
    };
    for i in 0..4u16 {
        let before = timeouts();
        assert!(
            common::wait_until(WAIT, || timeouts() > before),
            "the slow register's timeout not logged:\n{}",
            gateway.logs()
        );
        let value = 100 + i;
        probe
            .publish("lm/ut/hr2/set", value.to_string(), QoS::AtLeastOnce, false)
            .await;
        let r = probe
            .expect_msg(|m: &Msg| m.topic == "lm/ut/hr2/set/result", WAIT)
            .await
            .json();
        assert_eq!(
            r["ok"],
            json!(true),
            "the write after timeout {i} met the late reply: {r}\n{}",
            server.log()
        );
        let read = probe
            .expect_msg(|m: &Msg| m.topic == "lm/ut/hr2", WAIT)
            .await
            .json();
        assert_eq!(read["value"], json!(value), "hr2 read back after write {i}");
    }
    let mismatched = mismatches(&gateway, "ut");
    assert!(
        mismatched.is_empty(),
        "a late reply was read:\n{}",
        mismatched.join("\n")
    );
}
