//! Broker compatibility suite: one scenario, run by the real gateway binary against five
//! broker implementations (mosquitto 3.1.1 and 5, rumqttd, aedes, RabbitMQ's MQTT plugin,
//! ejabberd's mod_mqtt), each a real process started here (see `interop/brokers.rs`).
//!
//! The scenario (`scenario`): login with user/password; a poll burst delivered at QoS 1 with
//! no gap; the retained `online` status seen by a new subscriber; a command round trip; the
//! last will when the gateway's TCP connection is killed (through a `Relay`); with
//! `mqtt.session: persistent`, commands sent during that outage delivered on return, the one
//! still valid executed once and the expired one refused; a broker restart with the backlog
//! drained in order; MQTT 5 request/response where the broker speaks 5. On MQTT 5 brokers
//! also the will delay: a connection restored within it publishes no `offline`, one that
//! stays away does.
//!
//! Each broker is started once per test (the Erlang ones take long to boot); the test runs
//! every protocol version the broker speaks against it. Installed by scripts/install-brokers.

#[path = "interop/brokers.rs"]
mod brokers;
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use brokers::{Broker, Kind, PASSWORD, USER};
use common::relay::Relay;
use common::{DeviceState, Gateway, Kind as Reg, MqttProbe, Msg, TcpDevice};
use rumqttc::QoS;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Not a test of its own: the child process that runs rumqttd (see `brokers`).
#[test]
fn rumqttd_child() {
    if let Some(port) = std::env::var("FIELDBRIDGE_RUMQTTD_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        brokers::run_rumqttd(port);
    }
}

fn gateway_config(
    prefix: &str,
    relay_port: u16,
    device_port: u16,
    v5: bool,
    extra: &str,
) -> String {
    let protocol = if v5 { "5" } else { "\"3.1.1\"" };
    format!(
        "gateway: {{ id: gw-{prefix}, prefix: {prefix}, clock: local }}\n\
         mqtt:\n  protocol: {protocol}\n  url: mqtt://127.0.0.1:{relay_port}\n  username: {USER}\n  password_env: FB_INTEROP_PASSWORD\n  session: persistent\n{extra}  reconnect: {{ min: 100ms, max: 500ms }}\n\
         store: {{ path: \"{{dir}}/outbox.db\" }}\n\
         buses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {device_port} }}\n\
         devices:\n  - name: d\n    bus: b\n    interval: 100ms\n    points:\n      - {{ name: count, address: 0, type: u16 }}\n      - {{ name: sp, address: 1, type: u16, writable: true, max: 1000 }}\n"
    )
}

fn start_gateway(config: &str) -> Gateway {
    Gateway::start_with_env(config, &[("FB_INTEROP_PASSWORD", PASSWORD)])
}

/// Count readings seen on `probe` (in arrival order) until `enough` more arrived.
async fn counts(probe: &mut MqttProbe, topic: &str, enough: usize, what: &str) -> Vec<u64> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < enough {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            panic!(
                "{what}: {} of {enough} readings within {WAIT:?}: {got:?}",
                got.len()
            );
        };
        if m.topic == topic {
            if let Some(v) = m.json()["value"].as_u64() {
                got.push(v);
            }
        }
    }
    got
}

fn assert_gap_free(values: &[u64], from: Option<u64>, what: &str) {
    let set: BTreeSet<u64> = values.iter().copied().collect();
    let first = from.unwrap_or(*set.first().expect("values"));
    let last = *set.last().expect("values");
    let missing: Vec<u64> = (first..=last).filter(|v| !set.contains(v)).collect();
    assert!(
        missing.is_empty(),
        "{what}: readings lost {missing:?} in {values:?}"
    );
}

/// The result of command `id` on `{prefix}/d/sp/set/result`.
async fn result_of(probe: &mut MqttProbe, prefix: &str, id: &str) -> serde_json::Value {
    let topic = format!("{prefix}/d/sp/set/result");
    let id = id.to_string();
    probe
        .expect_msg(
            |m: &Msg| m.topic == topic && m.json()["id"] == json!(id),
            WAIT,
        )
        .await
        .json()
}

/// The first message matching each of `preds`, in whatever order they arrive.
async fn all_of(probe: &mut MqttProbe, preds: &[&dyn Fn(&Msg) -> bool], what: &str) -> Vec<Msg> {
    let deadline = Instant::now() + WAIT;
    let mut found: Vec<Option<Msg>> = vec![None; preds.len()];
    let mut seen = 0usize;
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            panic!("{what}: not all expected messages within {WAIT:?} ({seen} others seen); found {found:?}");
        };
        seen += 1;
        for (i, p) in preds.iter().enumerate() {
            if found[i].is_none() && p(&m) {
                found[i] = Some(m.clone());
                break;
            }
        }
    }
    found.into_iter().map(|m| m.expect("found")).collect()
}

async fn expect_status(probe: &mut MqttProbe, prefix: &str, status: &str, within: Duration) {
    let topic = format!("{prefix}/status");
    probe
        .expect_msg(
            |m: &Msg| m.topic == topic && m.text().contains(status),
            within,
        )
        .await;
}

fn rfc3339_in(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(secs)).to_string()
}

/// Writes of `value` to the setpoint register the device saw.
fn writes_of(state: &DeviceState, value: u16) -> usize {
    state
        .requests()
        .iter()
        .filter(|q| q.is_write() && q.address == 1 && q.values == vec![value])
        .count()
}

async fn scenario(broker: &mut Broker, v5: bool, prefix: &str) {
    let what = format!(
        "{:?} {}",
        broker.kind,
        if v5 { "MQTT 5" } else { "MQTT 3.1.1" }
    );
    let state = DeviceState::new(&[1]);
    state.set_auto_increment(1, Reg::HoldingRegister, 0);
    let device = TcpDevice::start(state.clone());
    let relay = Relay::start(broker.port()).await;
    let mut probe =
        MqttProbe::connect_with_credentials(broker.port(), &format!("{prefix}/#"), USER, PASSWORD)
            .await;
    let extra = if v5 { "  session_expiry: 10m\n" } else { "" };
    let gateway = start_gateway(&gateway_config(
        prefix,
        relay.port(),
        device.port(),
        v5,
        extra,
    ));
    let count_topic = format!("{prefix}/d/count");

    // A poll burst at QoS 1, nothing missing.
    let burst = counts(&mut probe, &count_topic, 20, &what).await;
    assert_gap_free(&burst, None, &format!("{what}: burst"));

    // The retained status, as a new subscriber sees it.
    let mut late = MqttProbe::connect_with_credentials(
        broker.port(),
        &format!("{prefix}/status"),
        USER,
        PASSWORD,
    )
    .await;
    expect_status(&mut late, prefix, "online", WAIT).await;
    drop(late);

    // A command round trip.
    probe.wait_gateway_answers(prefix, WAIT).await;
    let set = format!("{prefix}/d/sp/set");
    probe
        .publish(&set, r#"{"value": 7, "id": "rt"}"#, QoS::AtLeastOnce, false)
        .await;
    let r = result_of(&mut probe, prefix, "rt").await;
    assert_eq!(r["ok"], json!(true), "{what}: {r}");
    assert_eq!(writes_of(&state, 7), 1, "{what}");

    // The gateway's connection killed: the broker publishes the will.
    relay.cut();
    expect_status(&mut probe, prefix, "offline", WAIT).await;
    // Commands sent while the gateway is away wait in its persistent session.
    let valid = format!(
        r#"{{"value": 11, "id": "valid", "expires": "{}"}}"#,
        rfc3339_in(300)
    );
    let stale = format!(
        r#"{{"value": 12, "id": "stale", "expires": "{}"}}"#,
        rfc3339_in(1)
    );
    probe.publish(&set, valid, QoS::AtLeastOnce, false).await;
    probe.publish(&set, stale, QoS::AtLeastOnce, false).await;
    // Not synchronisation: the second command's expiry has to pass while it waits.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    relay.restore();
    let topic = format!("{prefix}/d/sp/set/result");
    let status = format!("{prefix}/status");
    let got = all_of(
        &mut probe,
        &[
            &|m: &Msg| m.topic == status && m.text().contains("online"),
            &|m: &Msg| m.topic == topic && m.json()["id"] == json!("valid"),
            &|m: &Msg| m.topic == topic && m.json()["id"] == json!("stale"),
        ],
        &what,
    )
    .await;
    let r = got[1].json();
    assert_eq!(
        r["ok"],
        json!(true),
        "{what}: a valid command queued in the session: {r}"
    );
    let r = got[2].json();
    assert_eq!(r["reason"], json!("expired"), "{what}: an expired one: {r}");
    assert_eq!(writes_of(&state, 11), 1, "{what}: executed once");
    assert_eq!(
        writes_of(&state, 12),
        0,
        "{what}: the expired one never reached the bus"
    );

    // A broker restart with the gateway away: its backlog drains in order afterwards.
    let before = counts(&mut probe, &count_topic, 3, &what).await;
    let last_seen = *before.iter().max().expect("values");
    relay.cut();
    tokio::task::block_in_place(|| broker.restart());
    probe.wait_resubscribed(WAIT).await;
    // Readings delivered between the last count and the cut arrived before the restart: they
    // count (dropping them made the check fail whenever the cut came a moment after a poll).
    let early: Vec<u64> = probe
        .drain()
        .iter()
        .filter(|m| m.topic == count_topic)
        .filter_map(|m| m.json()["value"].as_u64())
        .collect();
    relay.restore();
    let mut after = early;
    after.extend(counts(&mut probe, &count_topic, 30, &what).await);
    assert_gap_free(
        &after,
        Some(last_seen + 1),
        &format!("{what}: backlog after a broker restart"),
    );
    // Order of first receptions: a reading in flight when the connection was cut may come
    // again after the reconnect (QoS 1: at least once), within the in-flight window.
    let mut seen = BTreeSet::new();
    let firsts: Vec<u64> = after.iter().copied().filter(|v| seen.insert(*v)).collect();
    let repeated = after.len() - firsts.len();
    assert!(
        repeated <= 100,
        "{what}: {repeated} duplicates, more than the in-flight window"
    );
    let out_of_order: Vec<(u64, u64)> = firsts
        .windows(2)
        .filter(|w| w[1] < w[0])
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        out_of_order.is_empty(),
        "{what}: backlog out of order at {out_of_order:?} in {after:?}"
    );

    if v5 {
        request_response(broker.port(), prefix, &what).await;
    }
    let logs = gateway.logs();
    assert!(!logs.contains(PASSWORD), "{what}: the password was logged");
}

/// MQTT 5 request/response: the answer goes to the response topic with the correlation data.
async fn request_response(port: u16, prefix: &str, what: &str) {
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(format!("req-{prefix}"), "127.0.0.1", port);
    o.set_credentials(USER, PASSWORD);
    let (client, mut el) = AsyncClient::new(o, 16);
    let replies = format!("app/{prefix}/replies");
    client
        .subscribe_many([Filter::new(
            replies.clone(),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )])
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut subscribed = false;
    let corr = vec![1u8, 2, 3, 0xfe];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(ev) = tokio::time::timeout(left, el.poll()).await else {
            panic!("{what}: no MQTT 5 response within {WAIT:?}");
        };
        match ev {
            Ok(Event::Incoming(Packet::SubAck(_))) if !subscribed => {
                subscribed = true;
                client
                    .publish_with_properties(
                        format!("{prefix}/d/sp/set"),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        r#"{"value": 9, "id": "rr"}"#,
                        PublishProperties {
                            response_topic: Some(replies.clone()),
                            correlation_data: Some(corr.clone().into()),
                            ..PublishProperties::default()
                        },
                    )
                    .await
                    .unwrap();
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == replies.as_bytes() => {
                let c = p
                    .properties
                    .and_then(|p| p.correlation_data)
                    .map(|d| d.to_vec());
                assert_eq!(c, Some(corr), "{what}: correlation data");
                let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                assert_eq!(body["ok"], json!(true), "{what}: {body}");
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("{what}: MQTT 5 requester: {e}"),
        }
    }
}

/// MQTT 5 will delay: restored within it, no `offline`; away beyond it, `offline` after it.
async fn will_delay(broker: &Broker, prefix: &str) {
    let what = format!("{:?} will delay", broker.kind);
    let state = DeviceState::new(&[1]);
    let device = TcpDevice::start(state.clone());
    let relay = Relay::start(broker.port()).await;
    let mut probe = MqttProbe::connect_with_credentials(
        broker.port(),
        &format!("{prefix}/status"),
        USER,
        PASSWORD,
    )
    .await;
    let extra = "  session_expiry: 10m\n  will_delay: 4s\n";
    let _gateway = start_gateway(&gateway_config(
        prefix,
        relay.port(),
        device.port(),
        true,
        extra,
    ));
    expect_status(&mut probe, prefix, "online", WAIT).await;
    probe.drain();

    // Cut and restored within the delay: the gateway is back (its `online` again) and no
    // `offline` was published in between, nor until the delay would have passed.
    let cut = Instant::now();
    relay.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.restore();
    expect_status(&mut probe, prefix, "online", WAIT).await;
    let rest = Duration::from_secs(6).saturating_sub(cut.elapsed());
    let seen = probe.collect_for(rest).await;
    assert!(
        !seen.iter().any(|m| m.text().contains("offline")),
        "{what}: offline published although the gateway came back within the delay: {seen:?}"
    );

    // Away for good: `offline` comes, and not before the delay.
    probe.drain();
    let cut = Instant::now();
    relay.cut();
    expect_status(&mut probe, prefix, "offline", WAIT).await;
    let after = cut.elapsed();
    assert!(
        after >= Duration::from_millis(3500),
        "{what}: offline {after:?} after the cut, before the 4 s delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_passes_the_scenario_over_3_1_1_and_5() {
    let mut broker = Broker::start(Kind::Mosquitto);
    scenario(&mut broker, false, "mq3").await;
    scenario(&mut broker, true, "mq5").await;
    will_delay(&broker, "mqwd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_passes_the_scenario_over_3_1_1() {
    let mut broker = Broker::start(Kind::Rumqttd);
    scenario(&mut broker, false, "rq3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aedes_passes_the_scenario_over_3_1_1() {
    let mut broker = Broker::start(Kind::Aedes);
    scenario(&mut broker, false, "ae3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_scenario_over_3_1_1() {
    let mut broker = Broker::start(Kind::RabbitMq);
    scenario(&mut broker, false, "rb3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_passes_the_scenario_over_3_1_1_and_5() {
    let mut broker = Broker::start(Kind::Ejabberd);
    scenario(&mut broker, true, "ej5").await;
    scenario(&mut broker, false, "ej3").await;
    will_delay(&broker, "ejwd").await;
}
