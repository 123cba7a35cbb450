//! MQTT 5 end to end: the real binary with `mqtt.protocol: 5`, a real mosquitto, an MQTT 5
//! client and a tokio-modbus device. Request/response (response topic, correlation data),
//! message expiry on commands, and PUBACK reason codes.

mod common;

use std::time::{Duration, Instant};

use common::{DeviceState, Gateway, Mosquitto, Mqtt5Probe, TcpDevice};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

fn config(broker_port: u16, device_port: u16, devices: &str) -> String {
    format!(
        "gateway:\n  id: gw\n  prefix: t\n  clock: local\nstore:\n  path: none\nmqtt:\n  protocol: 5\n  url: mqtt://127.0.0.1:{broker_port}\n  reconnect: {{ min: 100ms, max: 500ms }}\nbuses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {device_port} }}\n{devices}"
    )
}

fn request(response_topic: &str, correlation: &[u8]) -> PublishProperties {
    PublishProperties {
        response_topic: Some(response_topic.to_string()),
        correlation_data: Some(correlation.to_vec().into()),
        ..PublishProperties::default()
    }
}

/// Publishes to a topic no point has until its `unknown_point` result comes back: then the
/// gateway is connected and subscribed.
async fn wait_ready(probe: &mut Mqtt5Probe) {
    let deadline = Instant::now() + WAIT;
    loop {
        probe
            .publish("t/ready/check/set", "1", PublishProperties::default())
            .await;
        let got = probe.collect_for(Duration::from_millis(300)).await;
        if got.iter().any(|m| m.topic == "t/ready/check/set/result") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway never answered a command"
        );
    }
}

const POINTS: &str = r#"
devices:
  - name: plc
    bus: b
    unit: 1
    interval: 200ms
    points:
      - { name: sp, address: 0, type: u16, max: 100, writable: true }
      - { name: level, address: 1, type: u16 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_get_their_response_with_the_correlation_data() {
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 1, &[42]);
    let device = TcpDevice::start(state.clone());
    let mut probe = Mqtt5Probe::connect(broker.port(), &["t/#", "app/#"]).await;
    let gateway = Gateway::start(&config(broker.port(), device.port(), POINTS));

    // Readings flow over an MQTT 5 session.
    let reading = probe.expect(|m| m.topic == "t/plc/level", WAIT).await;
    assert_eq!(reading.json()["value"], json!(42));
    wait_ready(&mut probe).await;

    // An accepted command: the answer goes to the response topic with the correlation data,
    // and the result topic has it too (without).
    let corr = [0u8, 1, 2, 0xff];
    probe
        .publish(
            "t/plc/sp/set",
            r#"{"value": 7, "id": "r1"}"#,
            request("app/replies/1", &corr),
        )
        .await;
    let answer = probe.expect(|m| m.topic == "app/replies/1", WAIT).await;
    assert_eq!(answer.correlation.as_deref(), Some(&corr[..]));
    let body = answer.json();
    assert_eq!(body["ok"], json!(true), "{body}");
    assert_eq!(body["id"], json!("r1"));
    assert_eq!(body["value"], json!(7));
    state
        .wait_for_request(|q| q.is_write() && q.values == vec![7], WAIT)
        .await;

    // A refusal is answered the same way.
    probe
        .publish("t/plc/level/set", "5", request("app/replies/2", b"c2"))
        .await;
    let answer = probe.expect(|m| m.topic == "app/replies/2", WAIT).await;
    assert_eq!(answer.correlation.as_deref(), Some(&b"c2"[..]));
    assert_eq!(answer.json()["reason"], json!("not_writable"));
    probe
        .publish("t/plc/sp/set", "101", request("app/replies/3", b"c3"))
        .await;
    let answer = probe.expect(|m| m.topic == "app/replies/3", WAIT).await;
    assert_eq!(answer.json()["reason"], json!("out_of_range"));

    // A response topic one cannot publish to (a wildcard would be a protocol error that ends
    // the gateway's session) is ignored: the result topic still has the result.
    probe
        .publish("t/plc/sp/set", "8", request("app/+/bad", b"c4"))
        .await;
    let result = probe
        .expect(
            |m| m.topic == "t/plc/sp/set/result" && m.json()["value"] == json!(8),
            WAIT,
        )
        .await;
    assert_eq!(result.correlation, None);
    // ...and the session lives on: the next request is answered.
    probe
        .publish("t/plc/sp/set", "9", request("app/replies/5", b"c5"))
        .await;
    let answer = probe.expect(|m| m.topic == "app/replies/5", WAIT).await;
    assert_eq!(answer.json()["ok"], json!(true));
    let logs = gateway.logs();
    assert!(logs.contains("response topic refused"), "{logs}");
    assert!(!logs.contains("MQTT connection lost"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_expires_waiting_for_the_bus_never_reaches_the_device() {
    // Every transaction takes 1.5 s: a command with a 1 s message expiry queued behind one
    // write expires before the bus can take it.
    const SLOW: Duration = Duration::from_millis(1500);
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    state.set_delay(1, Some(SLOW));
    let device = TcpDevice::start(state.clone());
    let mut probe = Mqtt5Probe::connect(broker.port(), &["t/#"]).await;
    let devices = POINTS
        .replace("interval: 200ms", "interval: 60s\n    timeout: 5s")
        .replace("max: 100, ", "");
    let _gateway = Gateway::start(&config(broker.port(), device.port(), &devices));
    // The first poll is done: the bus is idle.
    probe.expect(|m| m.topic == "t/plc/level", WAIT).await;
    wait_ready(&mut probe).await;

    probe
        .publish(
            "t/plc/sp/set",
            r#"{"value": 1, "id": "a"}"#,
            PublishProperties::default(),
        )
        .await;
    // The first write is on the wire (1.5 s long) before the expiring one is sent.
    state
        .wait_for_request(|q| q.is_write() && q.values == vec![1], WAIT)
        .await;
    let expiring = PublishProperties {
        message_expiry_interval: Some(1),
        ..PublishProperties::default()
    };
    probe
        .publish("t/plc/sp/set", r#"{"value": 2, "id": "b"}"#, expiring)
        .await;
    let lasting = PublishProperties {
        message_expiry_interval: Some(60),
        ..PublishProperties::default()
    };
    probe
        .publish("t/plc/sp/set", r#"{"value": 3, "id": "c"}"#, lasting)
        .await;

    let mut results = std::collections::BTreeMap::new();
    while results.len() < 3 {
        let m = probe
            .expect(|m| m.topic == "t/plc/sp/set/result", WAIT)
            .await;
        let body = m.json();
        results.insert(body["id"].as_str().unwrap_or("?").to_string(), body);
    }
    assert_eq!(results["a"]["ok"], json!(true), "{results:?}");
    assert_eq!(results["b"]["ok"], json!(false), "{results:?}");
    assert_eq!(results["b"]["reason"], json!("expired"), "{results:?}");
    assert_eq!(results["c"]["ok"], json!(true), "{results:?}");
    let written: Vec<Vec<u16>> = state.writes().into_iter().map(|w| w.values).collect();
    assert_eq!(written, vec![vec![1], vec![3]]);
    // It expired waiting behind the first write, not on arrival.
    let error = results["b"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("waiting for the bus"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_arriving_while_the_first_executes_gets_its_own_response() {
    // The write takes 1.5 s: the same command (same id) is delivered again meanwhile, asking
    // for its answer elsewhere. It is not executed again, and each request is answered.
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    state.set_delay(1, Some(Duration::from_millis(1500)));
    let device = TcpDevice::start(state.clone());
    let mut probe = Mqtt5Probe::connect(broker.port(), &["t/#", "app/#"]).await;
    let devices = POINTS.replace("interval: 200ms", "interval: 60s\n    timeout: 5s");
    let _gateway = Gateway::start(&config(broker.port(), device.port(), &devices));
    probe.expect(|m| m.topic == "t/plc/level", WAIT).await;
    wait_ready(&mut probe).await;

    let cmd = r#"{"value": 5, "id": "twice"}"#;
    probe
        .publish("t/plc/sp/set", cmd, request("app/first", b"c1"))
        .await;
    state
        .wait_for_request(|q| q.is_write() && q.values == vec![5], WAIT)
        .await;
    probe
        .publish("t/plc/sp/set", cmd, request("app/second", b"c2"))
        .await;
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 2 {
        let m = probe.expect(|m| m.topic.starts_with("app/"), WAIT).await;
        answers.insert(m.topic.clone(), m);
    }
    let first = &answers["app/first"];
    let second = &answers["app/second"];
    assert_eq!(first.correlation.as_deref(), Some(&b"c1"[..]));
    assert_eq!(second.correlation.as_deref(), Some(&b"c2"[..]));
    assert_eq!(first.json()["ok"], json!(true), "{}", first.json());
    assert_eq!(first.json()["duplicate"], json!(null));
    assert_eq!(second.json()["ok"], json!(true), "{}", second.json());
    assert_eq!(second.json()["duplicate"], json!(true));
    assert_eq!(second.json()["written_at"], first.json()["written_at"]);
    assert_eq!(state.writes().len(), 1, "{:?}", state.writes());
}

/// A broker that lets clients use `t/#` only, and a gateway with a point `ok` on `t/plc/ok`
/// and a point `secret` (at `qos`) on `forbidden/secret`, which the broker refuses with
/// reason 0x87 (not authorised) at its PUBACK (QoS 1) or PUBREC (QoS 2).
struct Refusing {
    _broker: Mosquitto,
    _device: TcpDevice,
    probe: Mqtt5Probe,
    gateway: Gateway,
}

async fn refusing_broker(qos: u8) -> Refusing {
    let broker = Mosquitto::start_with_acl("topic readwrite t/#\n");
    let device = TcpDevice::start(DeviceState::new(&[1]));
    let probe = Mqtt5Probe::connect(broker.port(), &["t/#"]).await;
    let devices = format!(
        "devices:\n  - name: plc\n    bus: b\n    unit: 1\n    interval: 50ms\n    points:\n      - {{ name: ok, address: 0, type: u16 }}\n      - {{ name: secret, address: 1, type: u16, qos: {qos}, topic: \"forbidden/secret\" }}\n"
    );
    let gateway = Gateway::start(&config(broker.port(), device.port(), &devices));
    Refusing {
        _broker: broker,
        _device: device,
        probe,
        gateway,
    }
}

/// Readings on the allowed topic still arrive: `n` published after this call (what the
/// probe already holds is thrown away first).
async fn readings_flow_on(probe: &mut Mqtt5Probe, n: usize) {
    probe.drain();
    for _ in 0..n {
        probe.expect(|m| m.topic == "t/plc/ok", WAIT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_refuses_is_dropped_and_the_rest_flows_on() {
    // Bound whole: the broker and device live as long as the test.
    let Refusing {
        mut probe,
        gateway,
        _broker,
        _device,
    } = refusing_broker(1).await;
    assert!(
        gateway.wait_for_log("the broker refused a message", WAIT),
        "{}",
        gateway.logs()
    );
    readings_flow_on(&mut probe, 10).await;
    let logs = gateway.logs();
    assert!(logs.contains("NotAuthorized"), "{logs}");
    // In one session: a refusal is no reason to reconnect.
    assert_eq!(logs.matches("MQTT connected").count(), 1, "{logs}");
    assert!(!logs.contains("MQTT connection lost"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_publishes_the_broker_refuses_never_wedge_the_link() {
    // A QoS 2 publish refused at PUBREC keeps an in-flight slot in rumqttc's v5 state for
    // good; after the broker's Receive Maximum (mosquitto: 20) of them nothing more would be
    // sent. The link resets the session after each such refusal instead.
    // Bound whole: the broker and device live as long as the test.
    let Refusing {
        mut probe,
        gateway,
        _broker,
        _device,
    } = refusing_broker(2).await;
    assert!(
        common::wait_until(Duration::from_secs(30), || gateway
            .logs()
            .matches("refused at PUBREC")
            .count()
            >= 25),
        "fewer than 25 refusals: {}",
        gateway.logs()
    );
    // More than a Receive Maximum of refusals later, new readings still arrive.
    readings_flow_on(&mut probe, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_topic_cannot_make_the_gateway_publish_on_its_own_topics() {
    // Whoever may send commands names the response topic, and the gateway publishes there
    // with its own broker rights: its reading and status topics, or a command topic, would be
    // overwritten with a result.
    const OWN: [&str; 4] = ["t/plc/level", "t/status", "t/plc/sp/set", "other/out"];
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 1, &[42]);
    let device = TcpDevice::start(state.clone());
    let mut probe = Mqtt5Probe::connect(broker.port(), &["t/#", "app/#"]).await;
    let mut watch = Mqtt5Probe::connect(broker.port(), &OWN).await;
    let devices = format!(
        "{POINTS}      - {{ name: out, address: 2, type: u16, writable: true, topic: other/out }}\n"
    );
    let _gateway = Gateway::start(&config(broker.port(), device.port(), &devices));
    wait_ready(&mut probe).await;
    for (i, own) in OWN.iter().enumerate() {
        let corr = format!("c{i}");
        probe
            .publish(
                "t/plc/level/set",
                &format!(r#"{{"value": 1, "id": "own{i}"}}"#),
                request(own, corr.as_bytes()),
            )
            .await;
        // The refusal still lands on the result topic...
        let result = probe
            .expect(|m| m.topic == "t/plc/level/set/result", WAIT)
            .await;
        assert_eq!(result.json()["reason"], json!("not_writable"));
    }
    // ...and a permitted response topic after them is answered: the others went nowhere.
    probe
        .publish("t/plc/level/set", "1", request("app/replies/ok", b"ok"))
        .await;
    probe.expect(|m| m.topic == "app/replies/ok", WAIT).await;
    let mut seen = watch.collect_for(Duration::from_millis(500)).await;
    seen.extend(watch.drain());
    for m in &seen {
        let text = String::from_utf8_lossy(&m.payload);
        assert!(
            m.correlation.is_none() && !text.contains("\"reason\""),
            "a result was published on the gateway's own topic {}: {text}",
            m.topic
        );
    }
}
