//! Commands from a hostile or careless sender, end to end: the real binary, a real mosquitto
//! and a tokio-modbus device that logs every request. Retained commands, stale ones queued
//! behind a slow device, topics built to overflow a packet, and floods.

mod common;

use std::time::{Duration, Instant};

use common::{DeviceState, Gateway, Mosquitto, MqttProbe, TcpDevice};
use rumqttc::QoS;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn config(broker_port: u16, device_port: u16, points: &str) -> String {
    format!(
        "gateway:\n  id: gw\n  prefix: t\n  clock: local\nstore:\n  path: none\nmqtt:\n  url: mqtt://127.0.0.1:{broker_port}\n  reconnect: {{ min: 100ms, max: 500ms }}\nbuses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {device_port} }}\ndevices:\n  - name: plc\n    bus: b\n    unit: 1\n    interval: 60s\n    timeout: 5s\n    points:\n{points}"
    )
}

const POINTS: &str = "      - { name: sp, address: 0, type: u16, writable: true }\n      - { name: level, address: 1, type: u16 }\n";

async fn wait_ready(probe: &mut MqttProbe) {
    probe.wait_gateway_answers("t", WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_command_is_never_executed() {
    // A dashboard publishing `…/set` with retain leaves an old setpoint on the broker: it
    // comes back with every subscribe, so after every reconnect and restart.
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    probe
        .publish("t/plc/sp/set", r#"{"value": 7}"#, QoS::AtLeastOnce, true)
        .await;
    let _gateway = Gateway::start(&config(broker.port(), device.port(), POINTS));
    let result = probe.expect(|t| t == "t/plc/sp/set/result", WAIT).await;
    let body = result.json();
    assert_eq!(body["ok"], json!(false), "{body}");
    assert_eq!(body["reason"], json!("retained"), "{body}");
    // A live command right after it is executed: only that one reaches the device.
    wait_ready(&mut probe).await;
    probe
        .publish("t/plc/sp/set", r#"{"value": 3}"#, QoS::AtLeastOnce, false)
        .await;
    let live = probe
        .expect_msg(
            |m| m.topic == "t/plc/sp/set/result" && m.json()["ok"] == json!(true),
            WAIT,
        )
        .await;
    assert_eq!(live.json()["value"], json!(3));
    let written: Vec<Vec<u16>> = state.writes().into_iter().map(|w| w.values).collect();
    assert_eq!(
        written,
        vec![vec![3]],
        "the retained 7 must never be written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_outlives_its_max_age_waiting_for_the_bus_is_not_written() {
    // Every transaction takes 1.5 s; a command with max_age 1 s queued behind a write is
    // stale by the time the bus could take it (MQTT 3.1.1: `ts` is its only clock).
    const SLOW: Duration = Duration::from_millis(1500);
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let points = "      - { name: sp, address: 0, type: u16, writable: true, command: { max_age: 1s } }\n      - { name: level, address: 1, type: u16 }\n";
    let _gateway = Gateway::start(&config(broker.port(), device.port(), points));
    probe.expect(|t| t == "t/plc/level", WAIT).await;
    wait_ready(&mut probe).await;
    state.set_delay(1, Some(SLOW));
    let now = || humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    probe
        .publish(
            "t/plc/sp/set",
            format!(r#"{{"value": 1, "id": "a", "ts": "{}"}}"#, now()),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    state
        .wait_for_request(|q| q.is_write() && q.values == vec![1], WAIT)
        .await;
    probe
        .publish(
            "t/plc/sp/set",
            format!(r#"{{"value": 2, "id": "b", "ts": "{}"}}"#, now()),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    let mut results = std::collections::BTreeMap::new();
    while results.len() < 2 {
        let m = probe.expect(|t| t == "t/plc/sp/set/result", WAIT).await;
        let body = m.json();
        results.insert(body["id"].as_str().unwrap_or("?").to_string(), body);
    }
    assert_eq!(results["a"]["ok"], json!(true), "{results:?}");
    assert_eq!(results["b"]["reason"], json!("expired"), "{results:?}");
    let error = results["b"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("waiting for the bus"), "{error}");
    let written: Vec<Vec<u16>> = state.writes().into_iter().map(|w| w.values).collect();
    assert_eq!(written, vec![vec![1]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_topic_near_64k_gets_no_result_and_the_session_lives_on() {
    // `{topic}/result` of a 65530-byte topic is longer than a topic can be: rumqttc would
    // write its length as `len as u16`, the broker would end the session, and the result
    // would be re-sent in every new one.
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let _gateway = Gateway::start(&config(broker.port(), device.port(), POINTS));
    wait_ready(&mut probe).await;
    let long = format!("t/{}/sp/set", "x".repeat(65_530 - 9));
    assert_eq!(long.len(), 65_530);
    probe.publish(&long, "1", QoS::AtLeastOnce, false).await;
    // The session is still the same one: a command sent after it is answered, and the
    // gateway's status never went `offline` (its will) in between.
    wait_ready(&mut probe).await;
    probe
        .publish("t/plc/sp/set", "5", QoS::AtLeastOnce, false)
        .await;
    probe
        .expect_msg(
            |m| m.topic == "t/plc/sp/set/result" && m.json()["ok"] == json!(true),
            WAIT,
        )
        .await;
    let seen = probe.drain();
    assert!(
        !seen
            .iter()
            .any(|m| m.topic == "t/status" && m.text() == "offline"),
        "the gateway's session died"
    );
    let log = broker.log();
    assert_eq!(
        log.matches("New client connected").count(),
        2,
        "one gateway session and the probe's: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_commands_is_answered_within_the_budget() {
    // 500 refusals in a burst: each used to cost a result and a warning. The gateway answers
    // a bounded number, counts the rest, and goes on executing good commands.
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = config(broker.port(), device.port(), POINTS)
        .replace("  clock: local\n", "  clock: local\n  stats_interval: 1s\n");
    let gateway = Gateway::start(&yaml);
    wait_ready(&mut probe).await;
    // Let the budget refill after wait_ready's own refusals.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    for i in 0..500 {
        probe
            .publish("t/plc/level/set", format!("{i}"), QoS::AtMostOnce, false)
            .await;
    }
    let seen = probe.collect_for(Duration::from_secs(1)).await;
    let answered = seen
        .iter()
        .filter(|m| m.topic == "t/plc/level/set/result")
        .count();
    let elapsed = started.elapsed().as_secs_f64();
    // Burst of 20 plus 20/s for the time it took.
    let bound = 20 + (20.0 * elapsed).ceil() as usize;
    assert!(answered >= 1, "refusals are still answered");
    assert!(
        answered <= bound,
        "{answered} results for 500 refusals in {elapsed:.2}s (bound {bound})"
    );
    let refused_lines = gateway.logs().matches("command refused").count();
    assert!(refused_lines <= bound + 5, "{refused_lines} log lines");
    // The flood was on a read-only point (no command topic of its own): a refusal for a
    // writable point is still answered at once, from a budget of its own.
    probe
        .publish("t/plc/sp/set", "70000", QoS::AtLeastOnce, false)
        .await;
    let r = probe
        .expect(|t| t == "t/plc/sp/set/result", WAIT)
        .await
        .json();
    assert_eq!(r["reason"], json!("out_of_range"), "{r}");
    // The refusals are counted, not lost from view: the stats message says how many.
    let stats = probe
        .expect_msg(
            |m| {
                m.topic == "t/status/stats"
                    && m.json()["commands"]["refused"].as_u64().unwrap_or(0) >= 500
            },
            WAIT,
        )
        .await;
    let commands = &stats.json()["commands"];
    assert!(
        commands["suppressed"].as_u64().unwrap_or(0) >= 500 - bound as u64,
        "{commands}"
    );
    // A good command still goes through once the flood ebbs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    probe
        .publish("t/plc/sp/set", "4", QoS::AtLeastOnce, false)
        .await;
    probe
        .expect_msg(
            |m| m.topic == "t/plc/sp/set/result" && m.json()["ok"] == json!(true),
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_synchronised_clock_timed_commands_are_refused() {
    // `gateway.clock: ntp` (the default): a command that depends on time is judged by the
    // clock only while the kernel says an NTP client has set it. The debug build's
    // FIELDBRIDGE_TEST_CLOCK_UNSYNCED makes the clock unsynchronised on any machine.
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = config(broker.port(), device.port(), POINTS).replace("  clock: local\n", "");
    let _gateway = Gateway::start_with_env(&yaml, &[("FIELDBRIDGE_TEST_CLOCK_UNSYNCED", "1")]);
    wait_ready(&mut probe).await;
    let soon =
        humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(60));
    let timed = format!(r#"{{"value": 6, "id": "t1", "expires": "{soon}"}}"#);
    probe
        .publish("t/plc/sp/set", timed.clone(), QoS::AtLeastOnce, false)
        .await;
    let r = probe
        .expect(|t| t == "t/plc/sp/set/result", WAIT)
        .await
        .json();
    assert_eq!(r["reason"], json!("clock_unsynchronised"), "{r}");
    assert!(state.writes().is_empty());
    // Not remembered under its id: the same command again is judged again, not a duplicate.
    probe
        .publish("t/plc/sp/set", timed, QoS::AtLeastOnce, false)
        .await;
    let again = probe
        .expect(|t| t == "t/plc/sp/set/result", WAIT)
        .await
        .json();
    assert_eq!(again["reason"], json!("clock_unsynchronised"), "{again}");
    assert_eq!(again["duplicate"], json!(null), "{again}");
    // A command without a time does not depend on the clock.
    probe
        .publish("t/plc/sp/set", "8", QoS::AtLeastOnce, false)
        .await;
    let r = probe
        .expect(|t| t == "t/plc/sp/set/result", WAIT)
        .await
        .json();
    assert_eq!(r["ok"], json!(true), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_goes_stale_behind_a_poll_on_the_wire_is_not_written() {
    // The executor takes the command at once, but the bus is in the middle of a 1.5 s poll:
    // the command's max_age (1 s) passes in the bus's queue. It is checked again right before
    // its transaction, not only when the executor took it.
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let points = "      - { name: sp, address: 0, type: u16, writable: true, command: { max_age: 1s } }\n      - { name: level, address: 1, type: u16 }\n";
    let yaml =
        config(broker.port(), device.port(), points).replace("interval: 60s", "interval: 3s");
    let _gateway = Gateway::start(&yaml);
    probe.expect(|t| t == "t/plc/level", WAIT).await;
    wait_ready(&mut probe).await;
    state.set_delay(1, Some(Duration::from_millis(1500)));
    state.clear_requests();
    // A poll is on the wire.
    state.wait_for_request(|q| !q.is_write(), WAIT).await;
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    probe
        .publish(
            "t/plc/sp/set",
            format!(r#"{{"value": 2, "id": "late", "ts": "{now}"}}"#),
            QoS::AtLeastOnce,
            false,
        )
        .await;
    let r = probe
        .expect(|t| t == "t/plc/sp/set/result", WAIT)
        .await
        .json();
    assert_eq!(r["reason"], json!("expired"), "{r}");
    assert!(state.writes().is_empty(), "{:?}", state.writes());
}
