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
    std::fs::write(
        gateway.config_path(),
        config(broker.port(), device.port(), &fewer)
            .replace("{dir}", &gateway.dir().display().to_string()),
    )
    .unwrap();
    gateway.hangup();
    let cleared = probe
        .expect(
            |t| t == "homeassistant/sensor/fieldbridge_gw1/meter_energy/config",
            WAIT,
        )
        .await;
    assert!(
        cleared.payload.is_empty(),
        "not cleared: {}",
        cleared.text()
    );

    // A restart without `setpoint`: the previous run's topics are remembered and it is cleared.
    let fewest = fewer.replace(
        "      - { name: setpoint, address: 3, type: u16, min: 0, max: 100, writable: true }\n",
        "",
    );
    gateway.terminate();
    gateway.wait_exit(WAIT).expect("the gateway stops");
    std::fs::write(
        gateway.config_path(),
        config(broker.port(), device.port(), &fewest)
            .replace("{dir}", &gateway.dir().display().to_string()),
    )
    .unwrap();
    gateway.restart();
    let cleared = probe
        .expect(
            |t| t == "homeassistant/number/fieldbridge_gw1/meter_setpoint/config",
            WAIT,
        )
        .await;
    assert!(
        cleared.payload.is_empty(),
        "not cleared: {}",
        cleared.text()
    );

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
