//! SunSpec discovery against an independent peer: a device built by pysunspec2 (the SunSpec
//! Alliance's Python implementation) from the Alliance's model definitions and served over
//! Modbus TCP by pymodbus (tests/sunspec/device.py), read by `fieldbridge sunspec` and by
//! pysunspec2's own client (tests/sunspec/client.py). Every point must agree: names, scale
//! factors applied, "not implemented" as no value. Also: the other two bases, a chain that never
//! ends and a length past the address space (bounded, refused with a reason, the models before
//! kept), `fieldbridge scan` naming the SunSpec device, and `sunspec: auto` in `run`: the
//! gateway discovers the device itself, publishes every point as pysunspec2 reads it, and
//! discovers again when the device comes back with other models.
//!
//! The peers are installed by scripts/install-sunspec (scripts/test runs it); a missing venv
//! fails the tests.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, kill_and_reap, port_accepts, run_cli, wait_until};
use common::{Gateway, Mosquitto, MqttProbe};
use serde_json::Value;

const START: Duration = Duration::from_secs(20);

fn python() -> PathBuf {
    let venv = std::env::var_os("FIELDBRIDGE_SUNSPEC_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/fieldbridge/sunspec")
        });
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/install-sunspec",
        py.display()
    );
    py
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sunspec")
        .join(name)
}

/// tests/sunspec/device.py on a free loopback port; killed (by PID) on drop.
struct SunSpecDevice {
    child: Child,
    port: u16,
}

impl SunSpecDevice {
    fn start(args: &[&str]) -> SunSpecDevice {
        Self::start_on(free_port(), args)
    }

    fn start_on(port: u16, args: &[&str]) -> SunSpecDevice {
        let mut child = Command::new(python())
            .arg(script("device.py"))
            .arg("--port")
            .arg(port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn device.py");
        let stdout = child.stdout.take().expect("stdout");
        // "ready" comes before the server binds: wait for both, bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx.recv_timeout(START).unwrap_or_default();
        let mut d = SunSpecDevice { child, port };
        if !ready.starts_with("ready") || !wait_until(START, || port_accepts(port)) {
            kill_and_reap(&mut d.child);
            panic!("device.py {args:?} did not start within {START:?} ({ready:?})");
        }
        d
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for SunSpecDevice {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

fn pysunspec2_reads(port: u16) -> serde_json::Map<String, Value> {
    let started = Instant::now();
    let out = Command::new(python())
        .arg(script("client.py"))
        .arg("--port")
        .arg(port.to_string())
        .output()
        .expect("run client.py");
    assert!(
        out.status.success() && started.elapsed() < Duration::from_secs(60),
        "client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("client.py JSON") {
        Value::Object(m) => m,
        other => panic!("client.py printed {other}"),
    }
}

fn fieldbridge_reads(host: &str) -> serde_json::Map<String, Value> {
    let out = run_cli(&["sunspec", "--host", host, "--json"]);
    assert!(out.success(), "fieldbridge sunspec: {}", out.stderr);
    match serde_json::from_str(&out.stdout).expect("fieldbridge sunspec --json") {
        Value::Object(m) => m,
        other => panic!("fieldbridge printed {other}"),
    }
}

fn agree(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(1.0)
        }
        _ => a == b,
    }
}

#[test]
fn fieldbridge_and_pysunspec2_agree_on_every_point() {
    let device = SunSpecDevice::start(&["--models", "1,103,160:2,203"]);
    let ours = fieldbridge_reads(&device.host());
    let theirs = pysunspec2_reads(device.port);
    let mut missing: Vec<&String> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    missing.sort();
    let mut extra: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "points only pysunspec2 has: {missing:?}; only fieldbridge: {extra:?}"
    );
    let differ: Vec<String> = theirs
        .iter()
        .filter(|(k, v)| !agree(v, &ours[*k]))
        .map(|(k, v)| format!("{k}: pysunspec2 {v}, fieldbridge {}", ours[k]))
        .collect();
    assert!(differ.is_empty(), "values differ:\n{}", differ.join("\n"));
    // The comparison covered what matters: modules by index, phases, sentinels, scaled values.
    for name in [
        "common_Mn",
        "inverter_three_phase_W",
        "mppt_module1_DCW",
        "mppt_module2_DCW",
        "ac_meter_abcn_WphC",
    ] {
        assert!(ours.contains_key(name), "no {name}");
    }
    assert!(
        ours.values().filter(|v| v.is_null()).count() >= 10,
        "too few not-implemented values to test the sentinels"
    );
    assert!(
        ours.values()
            .filter_map(Value::as_f64)
            .any(|v| v.fract() != 0.0),
        "no scale factor below 0 was applied"
    );
}

#[test]
fn the_marker_is_found_at_0_and_at_50000() {
    for base in ["0", "50000"] {
        let device = SunSpecDevice::start(&["--base", base, "--models", "1,101,201"]);
        let out = run_cli(&["sunspec", "--host", &device.host()]);
        assert!(out.success(), "{}", out.stderr);
        let first = out.stdout.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            format!(
                "SunSpec at {base}: 1 common (L 66), 101 inverter_single_phase (L 50), 201 ac_meter_an_or_ab (L 105)"
            )
        );
        assert!(out.stdout.contains("common_Mn"), "{}", out.stdout);
    }
}

#[test]
fn a_chain_without_end_or_with_a_bad_length_is_cut_with_a_reason() {
    let endless = SunSpecDevice::start(&["--models", "1,103", "--fault", "loop"]);
    let out = run_cli(&["sunspec", "--host", &endless.host()]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("model chain cut short: more than 64 models"),
        "{}",
        out.stderr
    );
    // The models before the break are still read.
    assert!(
        out.stdout.contains("inverter_three_phase_W "),
        "{}",
        out.stdout
    );

    let bad = SunSpecDevice::start(&["--models", "1,103", "--fault", "length"]);
    let out = run_cli(&["sunspec", "--host", &bad.host()]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("runs past the address space"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("common_Mn"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("inverter_three_phase_W "),
        "{}",
        out.stdout
    );
}

#[test]
fn scan_names_the_sunspec_device_and_its_models() {
    let device = SunSpecDevice::start(&["--models", "1,103,160:2", "--unit", "3"]);
    let out = run_cli(&[
        "scan",
        "--host",
        &device.host(),
        "--units",
        "1-4",
        "-c",
        "/nonexistent/x.yaml",
    ]);
    assert!(out.success(), "{}", out.stderr);
    let y: fieldbridge::config::yaml::Value =
        fieldbridge::config::yaml::from_str(&out.stdout).expect("YAML");
    let units: Vec<u64> = y["devices"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|d| d["unit"].as_u64().unwrap())
        .collect();
    assert_eq!(units, vec![3], "{}", out.stdout);
    assert!(
        out.stdout.contains("SunSpec at 40000: Mn1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("models 1 common (L 66), 103 inverter_three_phase (L 50), 160 mppt (L 48)"),
        "{}",
        out.stdout
    );
}

#[test]
fn the_model_table_is_what_the_generator_makes_of_pysunspec2s_definitions() {
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/sunspec-models"))
        .arg("--check")
        .output()
        .expect("run scripts/sunspec-models");
    assert!(
        out.status.success(),
        "src/sunspec/models.rs is stale: run scripts/sunspec-models\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every point of device `inv` published under `t/inv/`, until the names in `wanted` have all
/// arrived (bounded by `within`): name -> its value (`null` when bad quality), and the errors
/// of the bad ones.
/// A gateway on the broker at `broker` with one TCP bus `b` to `device`, and `devices` (the
/// list's items, YAML) on it; topics under `t/`.
fn gateway_yaml(broker: u16, device: u16, devices: &str) -> String {
    format!(
        "gateway: {{ id: gw, prefix: t }}\n\
         mqtt: {{ url: \"mqtt://127.0.0.1:{broker}\" }}\n\
         buses: [ {{ name: b, type: tcp, host: 127.0.0.1, port: {device}, reconnect_max: 200ms }} ]\n\
         devices:\n{devices}"
    )
}

async fn collect(
    probe: &mut MqttProbe,
    wanted: &[&String],
    within: Duration,
) -> (
    serde_json::Map<String, Value>,
    serde_json::Map<String, Value>,
) {
    let deadline = Instant::now() + within;
    let (mut values, mut errors) = (serde_json::Map::new(), serde_json::Map::new());
    while !wanted.iter().all(|w| values.contains_key(*w)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            let mut missing: Vec<&&String> = wanted
                .iter()
                .filter(|w| !values.contains_key(**w))
                .collect();
            missing.sort();
            panic!("within {within:?}, no message for {missing:?}");
        };
        let Some(name) = m.topic.strip_prefix("t/inv/") else {
            continue;
        };
        if name == "status" || name.contains('/') {
            continue;
        }
        let j = m.json();
        values.insert(name.to_string(), j["value"].clone());
        if let Some(e) = j.get("error") {
            errors.insert(name.to_string(), e.clone());
        }
    }
    (values, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sunspec_auto_discovers_the_device_publishes_what_pysunspec2_reads_and_rediscovers() {
    const WAIT: Duration = Duration::from_secs(30);
    let device = SunSpecDevice::start(&["--models", "1,103,160:2,203"]);
    let theirs = pysunspec2_reads(device.port);
    let broker = Mosquitto::start();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = gateway_yaml(
        broker.port(),
        device.port,
        "  - name: inv\n    bus: b\n    interval: 300ms\n    offline_after: 2\n    backoff_max: 300ms\n    sunspec: auto\n    points_exclude: [common_Opt, no_such_point]\n    points:\n      - { name: marker, address: 40000, type: u32 }\n",
    );
    // Valid before any discovery: the device has no points of SunSpec yet.
    let gateway = Gateway::start(&yaml);
    gateway.expect_log("SunSpec device discovered", WAIT);
    gateway.expect_log("SunSpec points added", WAIT);
    let logs = gateway.logs();
    assert!(
        logs.contains("models=1 common (L 66), 103 inverter_three_phase (L 50), 160 mppt (L 48), 203 ac_meter_abcn (L 105)"),
        "{}",
        logs
    );
    assert!(
        logs.contains("the device's SunSpec models have no point `no_such_point`"),
        "{logs}"
    );

    let mut wanted: Vec<&String> = theirs.keys().filter(|k| *k != "common_Opt").collect();
    let marker = "marker".to_string();
    wanted.push(&marker);
    let (ours, errors) = collect(&mut probe, &wanted, WAIT).await;
    // Scale factors applied and sentinels as no value, exactly as pysunspec2 reads them.
    let differ: Vec<String> = theirs
        .iter()
        .filter(|(k, _)| *k != "common_Opt")
        .filter(|(k, v)| !agree(v, &ours[*k]))
        .map(|(k, v)| format!("{k}: pysunspec2 {v}, fieldbridge {}", ours[k]))
        .collect();
    assert!(differ.is_empty(), "values differ:\n{}", differ.join("\n"));
    let not_implemented = theirs.iter().filter(|(_, v)| v.is_null()).count();
    assert!(
        not_implemented >= 10,
        "too few sentinels to test: {not_implemented}"
    );
    assert!(
        errors.values().all(|e| e == "not_implemented"),
        "{errors:?}"
    );
    // The device's own point is read beside them ("SunS"), the excluded one is not published.
    assert_eq!(ours["marker"], 0x5375_6E53u32);
    assert!(!ours.contains_key("common_Opt"));
    // Scale factors are applied, not published.
    assert!(
        !ours.keys().any(|k| k.ends_with("_SF")),
        "{:?}",
        ours.keys()
    );

    // The device comes back as another one (a firmware update): discovered again, its new
    // points published, the old ones no longer.
    let port = device.port;
    drop(device);
    gateway.expect_log("device offline", WAIT);
    let _replaced = SunSpecDevice::start_on(port, &["--models", "1,101"]);
    assert!(
        wait_until(WAIT, || gateway.logs().contains(
            "models=1 common (L 66), 101 inverter_single_phase (L 50)"
        )),
        "{}",
        gateway.logs()
    );
    probe.drain();
    let single = "inverter_single_phase_W".to_string();
    let (after, _) = collect(&mut probe, &[&single, &marker], WAIT).await;
    assert!(after["inverter_single_phase_W"].is_number(), "{after:?}");
    probe.drain();
    let (later, _) = collect(&mut probe, &[&single], WAIT).await;
    assert!(
        !later.keys().any(|k| k.starts_with("inverter_three_phase")),
        "{later:?}"
    );
}

/// A timeout in the middle of the walk (a noisy line) fails the discovery, which is tried again:
/// the chain cut short there is never taken for the device's. Our own test device (not
/// pysunspec2) because it can answer one request late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_in_the_middle_of_discovery_is_retried_not_taken_for_a_shorter_chain() {
    use common::device::{DeviceState, TcpDevice};
    const WAIT: Duration = Duration::from_secs(30);
    let state = DeviceState::new(&[1]);
    // "SunS", model 1 (66 registers), model 103 (50) with W = 1234 and W_SF = 0, the end.
    state.set_holding(1, 40000, &[0x5375, 0x6E53, 1, 66]);
    state.set_holding(1, 40070, &[103, 50]);
    state.set_holding(1, 40070 + 14, &[1234, 0]);
    state.set_holding(1, 40122, &[0xFFFF, 0]);
    // The header of model 103 is answered after the device's timeout, once.
    state.add_late_once(1, 40070, Duration::from_millis(600));
    let device = TcpDevice::start(state);
    let broker = Mosquitto::start();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = gateway_yaml(
        broker.port(),
        device.port(),
        "  - { name: inv, bus: b, interval: 300ms, timeout: 200ms, backoff_max: 300ms, sunspec: auto }\n",
    );
    let gateway = Gateway::start(&yaml);
    gateway.expect_log("SunSpec device discovered", WAIT);
    let logs = gateway.logs();
    assert!(
        !logs.contains("model chain cut short"),
        "a cut chain was taken:\n{logs}"
    );
    assert!(
        logs.contains("models=1 common (L 66), 103 inverter_three_phase (L 50)"),
        "{logs}"
    );
    let w = "inverter_three_phase_W".to_string();
    let (values, _) = collect(&mut probe, &[&w], WAIT).await;
    // Scaled (by W_SF = 0), so a float.
    assert_eq!(
        values["inverter_three_phase_W"].as_f64(),
        Some(1234.0),
        "{values:?}"
    );
    // The late answer was the first try's: the device was asked again.
    let headers = device
        .state()
        .requests()
        .iter()
        .filter(|r| r.address == 40070)
        .count();
    assert!(headers >= 2, "model 103's header read {headers} times");
}

/// Points found that the configuration refuses (here a topic of the device's own point that a
/// discovered one also gets) are logged, and the device is not shown online with nothing read:
/// it goes offline like a device that cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_the_configuration_refuses_leaves_the_device_offline_not_silently_online() {
    use common::device::{DeviceState, TcpDevice};
    const WAIT: Duration = Duration::from_secs(30);
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 40000, &[0x5375, 0x6E53, 1, 66]);
    state.set_holding(1, 40070, &[0xFFFF, 0]);
    let device = TcpDevice::start(state);
    let broker = Mosquitto::start();
    let yaml = gateway_yaml(
        broker.port(),
        device.port(),
        "  - name: inv\n    bus: b\n    interval: 200ms\n    offline_after: 2\n    backoff_max: 200ms\n    sunspec: auto\n    points:\n      - { name: mine, address: 41000, topic: \"t/inv/common_Mn\" }\n",
    );
    let gateway = Gateway::start(&yaml);
    gateway.expect_log(
        "the SunSpec points found do not fit the configuration",
        WAIT,
    );
    gateway.expect_log("device offline", WAIT);
}

/// A reload that puts another inverter behind the same device (the bus's port changed, the
/// name and unit did not): the bus's start discovers again, and the other models are read, not
/// the first inverter's layout on the second one's registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_puts_another_inverter_behind_the_device_discovers_it_again() {
    use common::device::{DeviceState, TcpDevice};
    const WAIT: Duration = Duration::from_secs(30);
    let inverter = |model: u16| {
        let state = DeviceState::new(&[1]);
        state.set_holding(1, 40000, &[0x5375, 0x6E53, 1, 66]);
        state.set_holding(1, 40070, &[model, 50]);
        state.set_holding(1, 40122, &[0xFFFF, 0]);
        TcpDevice::start(state)
    };
    let (three, single) = (inverter(103), inverter(101));
    let broker = Mosquitto::start();
    let device = "  - { name: inv, bus: b, interval: 300ms, sunspec: auto }\n";
    let mut gateway = Gateway::start(&gateway_yaml(broker.port(), three.port(), device));
    gateway.expect_log("SunSpec points added", WAIT);
    assert!(gateway.logs().contains("103 inverter_three_phase"));
    // The file as the harness wrote it (with its store), the bus's port changed.
    let written = std::fs::read_to_string(gateway.config_path()).expect("config read");
    let moved = written.replace(
        &format!("port: {},", three.port()),
        &format!("port: {},", single.port()),
    );
    assert_ne!(moved, written);
    std::fs::write(gateway.config_path(), moved).expect("config rewritten");
    gateway.hangup();
    assert!(
        wait_until(WAIT, || gateway
            .logs()
            .contains("101 inverter_single_phase")),
        "{}",
        gateway.logs()
    );
}
