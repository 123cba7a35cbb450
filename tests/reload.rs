//! SIGHUP reload: the real binary re-reads its file; unchanged buses keep polling without a
//! restart, removed ones stop, new ones start; the store and the MQTT connection are kept; a
//! file that does not validate, or that changes what needs a restart, is refused.

mod common;

use std::time::Duration;

use common::{DeviceState, Gateway, Mosquitto, MqttProbe, TcpDevice};

const WAIT: Duration = Duration::from_secs(15);

fn device(value: u16) -> TcpDevice {
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 0, &[value]);
    TcpDevice::start(state)
}

fn config(broker: u16, devices: &[(&str, u16)]) -> String {
    let mut yaml = format!(
        "gateway:\n  id: gw\n  prefix: t\nmqtt:\n  url: mqtt://127.0.0.1:{broker}\nstore:\n  path: \"{{dir}}/outbox.db\"\nbuses:\n"
    );
    for (name, port) in devices {
        yaml.push_str(&format!(
            "  - {{ name: {name}, type: tcp, host: 127.0.0.1, port: {port} }}\n"
        ));
    }
    yaml.push_str("devices:\n");
    for (name, _) in devices {
        yaml.push_str(&format!(
            "  - {{ name: {name}, bus: {name}, interval: 100ms, points: [ {{ name: v, address: 0 }} ] }}\n"
        ));
    }
    yaml
}

fn rewrite(gateway: &Gateway, yaml: &str) {
    let yaml = yaml.replace("{dir}", &gateway.dir().display().to_string());
    std::fs::write(gateway.config_path(), yaml).expect("rewrite config");
}

/// Longest pause between two consecutive reads the device saw.
fn longest_gap(device: &TcpDevice) -> Duration {
    let reads = device.state().requests();
    reads
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_device_changes_and_keeps_the_rest_running() {
    let broker = Mosquitto::start();
    let (a, b, c) = (device(1), device(2), device(3));
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let mut gateway = Gateway::start(&config(broker.port(), &[("a", a.port()), ("b", b.port())]));
    probe.expect(|t| t == "t/a/v", WAIT).await;
    probe.expect(|t| t == "t/b/v", WAIT).await;

    // b removed, c added, a unchanged.
    rewrite(
        &gateway,
        &config(broker.port(), &[("a", a.port()), ("c", c.port())]),
    );
    gateway.hangup();
    gateway.expect_log("configuration reloaded", WAIT);
    let logs = gateway.logs();
    assert!(
        logs.contains("kept=1 stopped=1 started=1"),
        "{}",
        logs.lines()
            .filter(|l| l.contains("reloaded"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let msg = probe.expect(|t| t == "t/c/v", WAIT).await;
    assert_eq!(msg.json()["value"], 3);
    // b is no longer polled.
    let b_reads = b.state().requests().len();
    a.state()
        .wait_for_count(|_| true, a.state().requests().len() + 10, WAIT)
        .await;
    assert!(b.state().requests().len() <= b_reads + 1, "b still polled");
    // a was never restarted: one bus start, and no pause in its polling.
    assert_eq!(gateway.logs().matches("bus started bus=a").count(), 1);
    let gap = longest_gap(&a);
    assert!(
        gap < Duration::from_millis(400),
        "a paused {gap:?} around the reload"
    );
    // The store and the broker connection were kept.
    let logs = gateway.logs();
    assert_eq!(logs.matches("store opened").count(), 1);
    assert_eq!(logs.matches("MQTT connected").count(), 1);

    // A file that does not validate is refused; everything goes on.
    std::fs::write(gateway.config_path(), "gateway: {}\n").unwrap();
    gateway.hangup();
    gateway.expect_log("reload refused", WAIT);
    probe.drain();
    probe.expect(|t| t == "t/a/v", WAIT).await;
    probe.expect(|t| t == "t/c/v", WAIT).await;

    // A change that needs a restart is refused too.
    rewrite(
        &gateway,
        &config(broker.port(), &[("a", a.port()), ("c", c.port())])
            .replace("prefix: t", "prefix: other"),
    );
    gateway.hangup();
    assert!(
        common::wait_until(WAIT, || gateway.logs().matches("reload refused").count()
            >= 2),
        "{}",
        gateway.logs()
    );
    assert!(gateway.logs().contains("needs a restart"));
    probe.drain();
    probe.expect(|t| t == "t/a/v", WAIT).await;

    gateway.terminate();
    let status = gateway.wait_exit(WAIT).expect("exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_after_a_reload_is_not_executed_again() {
    // The router is replaced on every reload; the ids it remembered must survive it, or a
    // QoS 1 redelivery (or a retry by the sender) after a SIGHUP writes a second time.
    let broker = Mosquitto::start();
    let (a, c) = (device(1), device(3));
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let with_sp = |devices: &[(&str, u16)]| {
        config(broker.port(), devices).replace(
            "points: [ { name: v, address: 0 } ]",
            "points: [ { name: v, address: 0 }, { name: sp, address: 1, writable: true } ]",
        )
    };
    let mut gateway = Gateway::start(&with_sp(&[("a", a.port())]));
    probe.expect(|t| t == "t/a/v", WAIT).await;
    let send = |probe: &MqttProbe| {
        let client = probe.client().clone();
        async move {
            client
                .publish(
                    "t/a/sp/set",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    r#"{"value": 5, "id": "once"}"#,
                )
                .await
                .unwrap();
        }
    };
    send(&probe).await;
    let first = probe
        .expect(|t| t == "t/a/sp/set/result", WAIT)
        .await
        .json();
    assert_eq!(first["ok"], true, "{first}");

    rewrite(&gateway, &with_sp(&[("a", a.port()), ("c", c.port())]));
    gateway.hangup();
    gateway.expect_log("configuration reloaded", WAIT);
    probe.expect(|t| t == "t/c/v", WAIT).await;
    send(&probe).await;
    let again = probe
        .expect(|t| t == "t/a/sp/set/result", WAIT)
        .await
        .json();
    assert_eq!(again["duplicate"], true, "{again}");
    let writes = a.state().writes().len();
    assert_eq!(writes, 1, "written again after the reload");
    gateway.terminate();
    assert!(gateway.wait_exit(WAIT).is_some_and(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_topic_added_by_a_reload_is_subscribed() {
    // A point whose command topic lies outside `{prefix}/+/+/set` needs its own subscription:
    // one added by a SIGHUP was never subscribed, so its commands never arrived.
    let broker = Mosquitto::start();
    let (a, c) = (device(1), device(3));
    let mut probe = MqttProbe::connect(broker.port(), "#").await;
    let mut gateway = Gateway::start(&config(broker.port(), &[("a", a.port())]));
    probe.expect(|t| t == "t/a/v", WAIT).await;
    let with_c = config(broker.port(), &[("a", a.port()), ("c", c.port())]).replace(
        "{ name: c, bus: c, interval: 100ms, points: [ { name: v, address: 0 } ] }",
        "{ name: c, bus: c, interval: 100ms, points: [ { name: v, address: 0 }, { name: sp, address: 1, writable: true, command: { topic: ext/c/sp } } ] }",
    );
    assert!(with_c.contains("ext/c/sp"));
    rewrite(&gateway, &with_c);
    gateway.hangup();
    gateway.expect_log("configuration reloaded", WAIT);
    probe.expect(|t| t == "t/c/v", WAIT).await;
    // The subscription may still be on its way: send until the result comes.
    let deadline = std::time::Instant::now() + WAIT;
    let result = loop {
        probe
            .client()
            .publish("ext/c/sp", rumqttc::QoS::AtLeastOnce, false, "7")
            .await
            .unwrap();
        let got = probe.collect_for(Duration::from_millis(300)).await;
        if let Some(m) = got
            .iter()
            .find(|m| m.topic.ends_with("sp/set/result") || m.topic == "ext/c/sp/result")
        {
            break m.json();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new command topic was never subscribed"
        );
    };
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(c.state().holding(1, 1, 1), vec![7]);
    gateway.terminate();
    assert!(gateway.wait_exit(WAIT).is_some_and(|s| s.success()));
}
