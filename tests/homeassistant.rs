//! Home Assistant MQTT discovery against the real mosquitto: the retained configs, their
//! republishing on Home Assistant's birth, and their removal (reload and restart). The test
//! with Home Assistant itself is in `homeassistant_real` below.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{DeviceState, Gateway, Mosquitto, MqttProbe, TcpDevice};
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(20);

fn config(broker: u16, device: u16, points: &str) -> String {
    format!(
        "gateway: {{ id: gw1, prefix: plant, clock: local }}\n\
         mqtt: {{ url: \"mqtt://127.0.0.1:{broker}\", reconnect: {{ min: 100ms, max: 400ms }} }}\n\
         store: {{ path: \"{{dir}}/outbox.db\" }}\n\
         homeassistant: {{ discovery: true }}\n\
         buses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {device} }}\n\
         devices:\n  - name: meter\n    bus: b\n    manufacturer: Eastron\n    model: SDM120\n    interval: 200ms\n    points:\n{points}"
    )
}

const POINTS: &str = "      - { name: voltage, address: 0, type: u16, scale: 0.1, unit: V }\n      - { name: energy, address: 1, type: u32, unit: kWh }\n      - { name: setpoint, address: 3, type: u16, min: 0, max: 100, writable: true }\n";

/// Config messages (topic → payload) until `n` distinct topics were seen or `within` ends.
async fn configs(probe: &mut MqttProbe, n: usize, within: Duration) -> BTreeMap<String, Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut seen = BTreeMap::new();
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            panic!(
                "{} of {n} discovery configs within {within:?}: {:?}",
                seen.len(),
                seen.keys()
            );
        };
        if m.topic.starts_with("homeassistant/") && m.topic.ends_with("/config") {
            seen.insert(m.topic, m.payload);
        }
    }
    seen
}

/// Writes a new configuration into the gateway's file (its `{dir}` resolved).
fn rewrite(gateway: &Gateway, yaml: &str) {
    let yaml = yaml.replace("{dir}", &gateway.dir().display().to_string());
    std::fs::write(gateway.config_path(), yaml).unwrap();
}

/// The next message on `topic` is an empty one: the config is cleared.
async fn expect_cleared(probe: &mut MqttProbe, topic: &str) {
    let cleared = probe.expect(|t| t == topic, WAIT).await;
    assert!(
        cleared.payload.is_empty(),
        "not cleared: {}",
        cleared.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_are_retained_announced_again_on_home_assistant_s_birth_and_cleared_on_removal() {
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let mut gateway = Gateway::start(&config(broker.port(), device.port(), POINTS));
    gateway.expect_log("Home Assistant discovery announced", WAIT);
    // Retained: a client subscribing afterwards (Home Assistant starting later) gets them.
    let mut probe = MqttProbe::connect(broker.port(), "homeassistant/#").await;
    // The gateway's connectivity and three figures, and three points.
    let all = configs(&mut probe, 7, WAIT).await;
    let voltage = &all["homeassistant/sensor/fieldbridge_gw1/meter_voltage/config"];
    let v: serde_json::Value = serde_json::from_slice(voltage).unwrap();
    assert_eq!(v["device_class"], "voltage");
    assert_eq!(v["device"]["model"], "SDM120");
    assert!(all.contains_key("homeassistant/number/fieldbridge_gw1/meter_setpoint/config"));
    assert!(all.contains_key("homeassistant/binary_sensor/fieldbridge_gw1/connected/config"));

    // Home Assistant's birth: every config again (it may have lost them).
    probe
        .publish("homeassistant/status", "online", QoS::AtLeastOnce, false)
        .await;
    let again = configs(&mut probe, 7, WAIT).await;
    assert_eq!(again.len(), 7);

    // A reload without `energy`: its config is cleared (empty, retained), the rest unchanged.
    let fewer = POINTS.replace(
        "      - { name: energy, address: 1, type: u32, unit: kWh }\n",
        "",
    );
    rewrite(&gateway, &config(broker.port(), device.port(), &fewer));
    gateway.hangup();
    expect_cleared(
        &mut probe,
        "homeassistant/sensor/fieldbridge_gw1/meter_energy/config",
    )
    .await;

    // A restart without `setpoint`: the previous run's topics are remembered and it is cleared.
    let fewest = fewer.replace(
        "      - { name: setpoint, address: 3, type: u16, min: 0, max: 100, writable: true }\n",
        "",
    );
    gateway.terminate();
    gateway.wait_exit(WAIT).expect("the gateway stops");
    rewrite(&gateway, &config(broker.port(), device.port(), &fewest));
    gateway.restart();
    expect_cleared(
        &mut probe,
        "homeassistant/number/fieldbridge_gw1/meter_setpoint/config",
    )
    .await;

    // What a new subscriber finds now: no config of a removed point.
    drop(probe);
    let mut late = MqttProbe::connect(broker.port(), "homeassistant/#").await;
    // Retained messages come at once on subscribing; there is no event for "no more", so the
    // new subscriber looks for a bounded moment.
    let now = late.collect_for(Duration::from_millis(500)).await;
    let topics: Vec<&str> = now
        .iter()
        .filter(|m| !m.payload.is_empty())
        .map(|m| m.topic.as_str())
        .collect();
    assert!(topics.contains(&"homeassistant/sensor/fieldbridge_gw1/meter_voltage/config"));
    assert!(
        !topics
            .iter()
            .any(|t| t.contains("meter_energy") || t.contains("meter_setpoint")),
        "{topics:?}"
    );
}

/// The shipped energy-meter and PLC examples with `homeassistant: { discovery: true }` added:
/// every point is announced, each with the kind its type and writability call for.
#[test]
fn the_examples_announce_every_point() {
    let root = env!("CARGO_MANIFEST_DIR");
    for example in ["energy-meters-rs485.yaml", "plc-tcp.yaml"] {
        let text = std::fs::read_to_string(format!("{root}/config/examples/{example}")).unwrap();
        let text = format!("{text}\nhomeassistant: {{ discovery: true }}\n");
        let config = fieldbridge::config::parse(&text, example).expect("the example loads");
        let entities = fieldbridge::publish::homeassistant::entities(&config);
        for device in &config.devices {
            for point in &device.points {
                let e = entities
                    .iter()
                    .find(|e| {
                        e.device.as_deref() == Some(&device.name)
                            && e.point.as_deref() == Some(&point.name)
                    })
                    .unwrap_or_else(|| {
                        panic!("{example}: {}/{} not announced", device.name, point.name)
                    });
                let boolean = matches!(
                    point.data_type,
                    fieldbridge::model::DataType::Bool | fieldbridge::model::DataType::Bit(_)
                );
                let expected = match (point.writable, boolean, point.labels.is_empty()) {
                    (true, true, _) => "switch",
                    (true, false, false) => "select",
                    (true, false, true) => "number",
                    (false, true, _) => "binary_sensor",
                    (false, false, _) => "sensor",
                };
                if !matches!(point.data_type, fieldbridge::model::DataType::Ascii(_))
                    || !point.writable
                {
                    assert_eq!(
                        e.component, expected,
                        "{example}: {}/{}",
                        device.name, point.name
                    );
                }
                if let (Some(unit), "sensor") = (&point.unit, e.component) {
                    if point.labels.is_empty() {
                        assert!(
                            e.payload.get("unit_of_measurement").is_some(),
                            "{example}: {} has no unit ({unit})",
                            point.name
                        );
                    }
                }
            }
        }
    }
}

// --- Home Assistant itself -------------------------------------------------------------------

/// Home Assistant 2024.3.3 (the newest that runs on Debian 12's Python 3.11), installed by
/// `scripts/install-homeassistant` into a venv, driven by `tests/homeassistant/ha.py` (its
/// REST and websocket APIs) with the MQTT integration on the test broker.
struct HomeAssistant {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    _dir: tempfile::TempDir,
}

impl HomeAssistant {
    fn start(broker: u16) -> HomeAssistant {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let root = env!("CARGO_MANIFEST_DIR");
        let install = Command::new(format!("{root}/scripts/install-homeassistant"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/install-homeassistant");
        assert!(
            install.status.success(),
            "scripts/install-homeassistant failed"
        );
        let stdout = String::from_utf8_lossy(&install.stdout);
        let python = stdout
            .lines()
            .last()
            .expect("the venv's python")
            .trim()
            .to_owned();
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(&python)
            .arg(format!("{root}/tests/homeassistant/ha.py"))
            .args(["--broker-port", &broker.to_string()])
            .args(["--config-dir", dir.path().to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ha.py");
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let mut ha = HomeAssistant {
            child,
            stdin,
            lines,
            _dir: dir,
        };
        let ready = ha.next(Duration::from_secs(120));
        assert_eq!(
            ready["event"], "ready",
            "Home Assistant did not start: {ready}"
        );
        ha
    }

    fn next(&mut self, within: Duration) -> serde_json::Value {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("no answer from ha.py within {within:?}"))
    }

    /// Sends a command and returns its one answer.
    fn ask(&mut self, cmd: serde_json::Value, within: Duration) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.next(within)
    }

    /// Waits until `entity` exists (with `state`, if given).
    fn entity(&mut self, entity: &str, state: Option<&str>) -> serde_json::Value {
        let answer = self.ask(
            serde_json::json!({"cmd": "wait_entity", "entity_id": entity, "state": state, "timeout_s": 30}),
            Duration::from_secs(40),
        );
        assert_eq!(
            answer["event"], "entity",
            "{entity} (state {state:?}): {answer}"
        );
        answer["entity"].clone()
    }
}

impl Drop for HomeAssistant {
    fn drop(&mut self) {
        let _ = self.ask(serde_json::json!({"cmd": "quit"}), Duration::from_secs(30));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Home Assistant itself sees every point as the right entity (domain, unit, device class,
/// state, device), marks one unavailable when its device goes offline, and a `number` set from
/// Home Assistant writes the register through the validated command path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_itself_shows_and_commands_the_points() {
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 0, &[2301, 0, 0, 17, 2]);
    state.set_coils(1, 0, &[true]);
    let device = TcpDevice::start(state.clone());
    let points = "      - { name: voltage, address: 0, type: u16, scale: 0.1, unit: V }\n      - { name: energy, address: 1, type: u32, unit: kWh }\n      - { name: setpoint, address: 3, type: u16, min: 0, max: 100, writable: true }\n      - { name: mode, address: 4, type: u16, labels: { 1: \"eco\", 2: \"boost\" } }\n      - { name: pump, register: coil, address: 0, writable: true }\n";
    let yaml = config(broker.port(), device.port(), points).replace(
        "    interval: 200ms\n",
        "    interval: 200ms\n    offline_after: 2\n    timeout: 200ms\n",
    );
    let _gateway = Gateway::start(&yaml);
    let mut ha = HomeAssistant::start(broker.port());

    let v = ha.entity("sensor.fieldbridge_gw1_meter_voltage", Some("230.1"));
    assert_eq!(v["domain"], "sensor");
    assert_eq!(v["unit_of_measurement"], "V");
    assert_eq!(
        v["original_device_class"]
            .as_str()
            .or(v["device_class"].as_str()),
        Some("voltage")
    );
    let e = ha.entity("sensor.fieldbridge_gw1_meter_energy", Some("0"));
    assert_eq!(e["attributes"]["state_class"], "total_increasing");
    let mode = ha.entity("sensor.fieldbridge_gw1_meter_mode", Some("boost"));
    // (2024.3's registry shows no options for an MQTT enum sensor; the label is the state.)
    assert_eq!(mode["original_device_class"], "enum", "{mode}");
    ha.entity("switch.fieldbridge_gw1_meter_pump", Some("on"));
    ha.entity("number.fieldbridge_gw1_meter_setpoint", Some("17"));
    ha.entity("binary_sensor.fieldbridge_gw1_connected", Some("on"));
    let all = ha.ask(
        serde_json::json!({"cmd": "entities"}),
        Duration::from_secs(20),
    );
    let meter = all["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "meter")
        .unwrap_or_else(|| panic!("no device `meter`: {}", all["devices"]));
    assert_eq!(meter["manufacturer"], "Eastron");
    assert_eq!(meter["model"], "SDM120");
    assert!(
        !meter["via_device_id"].is_null(),
        "not linked to the gateway's device: {meter}"
    );

    // Set from Home Assistant: the register is written (through the command path).
    let set = ha.ask(
        serde_json::json!({"cmd": "service", "domain": "number", "service": "set_value",
            "data": {"entity_id": "number.fieldbridge_gw1_meter_setpoint", "value": 42}}),
        Duration::from_secs(20),
    );
    assert_eq!(set["status"], 200, "{set}");
    state
        .wait_for_request(|r| r.is_write() && r.address == 3, WAIT)
        .await;
    assert_eq!(state.holding(1, 3, 1), vec![42]);
    ha.entity("number.fieldbridge_gw1_meter_setpoint", Some("42"));

    // The device goes silent: its entities become unavailable; back: available again.
    state.set_silent(1, true);
    ha.entity("sensor.fieldbridge_gw1_meter_voltage", Some("unavailable"));
    state.set_silent(1, false);
    ha.entity("sensor.fieldbridge_gw1_meter_voltage", Some("230.1"));
}
