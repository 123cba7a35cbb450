//! The MQTT link against hostile and faulty brokers (issue 10): nothing a broker sends may
//! put the link into a reconnect loop, silence it, make it mis-acknowledge or lose a reading.
//!
//! The link is driven directly (`link::spawn`, as `benches/outbox.rs` does) so that each test
//! sees its counters. Tests marked "fake" use `common::fake_broker`, a scripted MQTT server,
//! because no real broker misbehaves on demand; everything else runs against mosquitto.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::fake_broker::{self, FakeBroker, Script};
use common::{Mosquitto, MqttProbe};
use fieldbridge::link::{self, InMessage, Link, LinkSettings, OutMessage, Outbox};
use fieldbridge::model::{Config, Qos};
use tokio::sync::mpsc;
use tracing_subscriber::prelude::*;

const WAIT: Duration = Duration::from_secs(15);

/// `protocol`: 4 (3.1.1) or 5; `extra`: more `mqtt` keys, each line indented by two spaces.
fn config(port: u16, protocol: u8, extra: &str) -> Config {
    config_with_store(port, protocol, extra, "none")
}

/// As `config`, with the store at `store` (a path, or `none`).
fn config_with_store(port: u16, protocol: u8, extra: &str, store: &str) -> Config {
    let protocol = if protocol == 5 { "  protocol: 5\n" } else { "" };
    let yaml = format!(
        "gateway:\n  id: gw\n  prefix: t\nmqtt:\n  url: mqtt://127.0.0.1:{port}\n{protocol}  reconnect: {{ min: 50ms, max: 200ms }}\n{extra}store:\n  path: \"{store}\"\nbuses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: 1502 }}\ndevices:\n  - {{ name: d, bus: b, points: [ {{ name: n, address: 0 }} ] }}\n"
    );
    fieldbridge::config::parse(&yaml, "test.yaml").expect("test config")
}

struct Running {
    link: Link,
    commands: mpsc::Receiver<InMessage>,
}

/// The link as the gateway runs it: with the publisher stage's announcer (the will, the
/// retained `online` first in every session, the held-back mark).
fn start(cfg: &Config, subscriptions: &[&str], outbox: Option<Outbox>) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .finish()
        .with(fieldbridge::logging::parse_filter("fieldbridge=debug").expect("valid"))
        .try_init();
    let (_, announcer) = fieldbridge::publish::encoding(cfg);
    let mut settings = LinkSettings::from_config(&cfg.mqtt);
    if outbox.is_some() {
        settings = settings.with_store(&cfg.store);
    }
    settings.subscriptions = subscriptions.iter().map(ToString::to_string).collect();
    settings.announcer = Some(announcer);
    let (tx, commands) = mpsc::channel(16);
    let link = link::spawn(&cfg.mqtt, settings, outbox, Some(tx), 1024).expect("link");
    Running { link, commands }
}

fn msg(topic: &str, payload: &str) -> OutMessage {
    OutMessage {
        topic: topic.to_string(),
        payload: payload.as_bytes().to_vec(),
        qos: Qos::AtLeastOnce,
        retain: false,
        created: Instant::now(),
        correlation: None,
        kind: link::AS_IS,
    }
}

async fn send_readings(link: &Link, n: usize) {
    for i in 0..n {
        link.sender
            .send(msg(&format!("t/d/r{i}"), &i.to_string()))
            .await
            .expect("link running");
    }
}

/// Waits until `cond` holds on the link's counters, at most `within`.
async fn wait_stats(
    link: &Link,
    within: Duration,
    cond: impl Fn(&link::LinkStats) -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond(&link.stats) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond(&link.stats)
}

fn stat(link: &Link, f: impl Fn(&link::LinkStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(&link.stats).load(Ordering::Relaxed)
}

/// The readings `t/d/r0..n` the fake received on connection `conn`, in order.
fn readings_on(fake: &FakeBroker, conn: usize) -> Vec<String> {
    fake.received()
        .into_iter()
        .filter(|r| r.conn == conn && r.topic.starts_with("t/d/"))
        .map(|r| r.text())
        .collect()
}

fn all(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

// --- Item 6: every topic we publish is bounded ---------------------------------------------

/// A topic the wire cannot carry (over 65535 bytes: rumqttc would write its length as
/// `len as u16`), an empty one, one with wildcards or a NUL: each is refused by the link
/// before rumqttc sees it, counted in `dropped`, and the session lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_the_wire_cannot_carry_are_refused_and_the_session_lives_on() {
    let broker = Mosquitto::start();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let run = start(&config(broker.port(), 4, ""), &[], None);
    assert!(
        wait_stats(&run.link, WAIT, |s| s.connected.load(Ordering::Relaxed)
            == 1)
        .await
    );
    let long = format!("t/{}", "x".repeat(70_000));
    for bad in [long.as_str(), "", "t/+/x", "t/#", "t/a\0b"] {
        run.link.sender.send(msg(bad, "bad")).await.unwrap();
    }
    send_readings(&run.link, 5).await;
    for i in 0..5 {
        let topic = format!("t/d/r{i}");
        probe.expect(|t| t == topic, WAIT).await;
    }
    assert!(wait_stats(&run.link, WAIT, |s| s.dropped.load(Ordering::Relaxed) == 5).await);
    // Still the first session.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stat(&run.link, |s| &s.connects), 1, "{}", broker.log());
    assert!(probe.drain().iter().all(|m| m.text() != "bad"));
}

// --- Item 10: protocol errors of the broker (fake) ---------------------------------------

/// Fake: a CONNACK with `session_present = 1` on our clean session made rumqttc replay the
/// publishes of the dead session while the link re-sent them too, so PUBACKs completed the
/// wrong entries. Now it is a protocol error: counted, the connection reset, and a later good
/// session receives every reading once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_present_on_a_clean_session_is_a_protocol_error() {
    let fake = FakeBroker::start(|n| match n {
        // Takes the readings, acknowledges none, then dies.
        0 => Script {
            ack: false,
            ..Script::default()
        },
        1 => Script {
            session_present: true,
            ..Script::default()
        },
        _ => Script::default(),
    })
    .await;
    let run = start(&config(fake.port(), 4, ""), &[], None);
    send_readings(&run.link, 5).await;
    assert!(fake.wait(WAIT, |f| readings_on(f, 0).len() == 5).await);
    // End session 0 by stopping the fake's side: restart a fake on... the same one: the link
    // reconnects when its connection drops, which the fake's script does not do; so make it.
    drop_connections(&fake).await;
    assert!(
        fake.wait(WAIT, |f| readings_on(f, 2) == all(5)).await,
        "session 2 got {:?}; all: {:?}",
        readings_on(&fake, 2),
        fake.received()
    );
    assert!(stat(&run.link, |s| &s.protocol_errors) >= 1);
    // Nothing was taken as delivered in session 1: its acks do not count.
    assert!(readings_on(&fake, 1).is_empty(), "{:?}", fake.received());
    assert!(
        wait_stats(&run.link, WAIT, |s| s.delivered.load(Ordering::Relaxed)
            >= 6)
        .await
    );
}

/// Ends every open connection of the fake (a network blip).
async fn drop_connections(fake: &FakeBroker) {
    fake.close_all();
    assert!(fake.wait(WAIT, |f| f.connections() >= 2).await);
}

/// Fake, MQTT 5: Receive Maximum 0 (forbidden, §3.2.2.3.3) left the link silent for good.
/// Now the session is reset and the next one delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_zero_is_a_protocol_error() {
    let fake = FakeBroker::start(|n| match n {
        0 => Script {
            receive_max: Some(0),
            ..Script::default()
        },
        _ => Script::default(),
    })
    .await;
    let run = start(&config(fake.port(), 5, ""), &[], None);
    send_readings(&run.link, 5).await;
    assert!(
        fake.wait(WAIT, |f| readings_on(f, 1) == all(5)).await,
        "{} connections, {} protocol errors, received {:?}",
        fake.connections(),
        stat(&run.link, |s| &s.protocol_errors),
        fake.received()
    );
    assert!(stat(&run.link, |s| &s.protocol_errors) >= 1);
    assert_eq!(fake.levels()[0], 5);
}

/// Fake: a PUBACK for a packet id not in flight (3.1.1 and 5), and a SUBSCRIBE sent by the
/// server. Each resets the connection; nothing is taken as delivered before its real PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_acks_and_unexpected_packets_reset_the_connection() {
    for protocol in [4, 5] {
        for bad in [
            fake_broker::puback(77),
            fake_broker::subscribe_from_server(9, "x/#"),
        ] {
            let fake = FakeBroker::start(move |n| match n {
                0 => Script {
                    ack: false,
                    after_connack: vec![bad.clone()],
                    ..Script::default()
                },
                _ => Script::default(),
            })
            .await;
            let run = start(&config(fake.port(), protocol, ""), &[], None);
            send_readings(&run.link, 5).await;
            assert!(
                fake.wait(WAIT, |f| readings_on(f, 1) == all(5)).await,
                "v{protocol}: {:?}",
                fake.received()
            );
            assert!(stat(&run.link, |s| &s.protocol_errors) >= 1, "v{protocol}");
            assert!(
                wait_stats(&run.link, WAIT, |s| s.delivered.load(Ordering::Relaxed)
                    == 6)
                .await
            );
        }
    }
}

/// Fake, MQTT 5: a PUBLISH with a Topic Alias although we advertised Topic Alias Maximum 0
/// (§3.3.2.3.4: a protocol error). rumqttc accepts it; the link never hands it on as a
/// command and resets the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_an_unadvertised_topic_alias_is_never_executed() {
    let fake = FakeBroker::start(|n| match n {
        0 => Script {
            after_suback: vec![fake_broker::publish_v5_with_alias("t/d/n/set", b"1", 1, 3)],
            ..Script::default()
        },
        _ => Script::default(),
    })
    .await;
    let mut run = start(&config(fake.port(), 5, ""), &["t/+/+/set"], None);
    assert!(fake.wait(WAIT, |f| f.connections() >= 2).await);
    assert!(
        wait_stats(&run.link, WAIT, |s| s
            .protocol_errors
            .load(Ordering::Relaxed)
            >= 1)
        .await
    );
    send_readings(&run.link, 3).await;
    assert!(fake.wait(WAIT, |f| readings_on(f, 1) == all(3)).await);
    assert!(
        run.commands.try_recv().is_err(),
        "an aliased publish was handed on"
    );
}

// --- Item 7: an oversized retained command never puts the link into a reconnect loop ------

/// Publishes `payload` retained at QoS 1 on `topic` with a client of our own and returns once
/// the broker acknowledged it (so it holds the message).
async fn publish_retained(port: u16, topic: &str, payload: Vec<u8>) {
    let mut options = rumqttc::MqttOptions::new("retainer", "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("retained publish: {e}"),
            }
        }
    })
    .await
    .expect("retained publish acknowledged");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
}

/// A retained message twice our incoming limit on a command topic, there before the link
/// starts (MQTT 3.1.1 cannot tell the broker our limit; MQTT 5 does, in CONNECT). Readings
/// keep flowing, the link settles in a session that lasts, the filter that brings the message
/// is no longer subscribed (3.1.1), commands on the other filters still arrive, and nothing is
/// dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_retained_command_never_makes_the_link_reconnect_for_ever() {
    for protocol in [4, 5] {
        let broker = Mosquitto::start();
        publish_retained(broker.port(), "t/d/n/set", vec![b'x'; 8192]).await;
        let mut probe = MqttProbe::connect(broker.port(), "t/d/#").await;
        let cfg = config(broker.port(), protocol, "  max_packet_size: 4096\n");
        let mut run = start(&cfg, &["t/+/+/set", "t/other/cmd"], None);
        send_readings(&run.link, 5).await;
        for i in 0..5 {
            let topic = format!("t/d/r{i}");
            probe.expect(|t| t == topic, WAIT).await;
        }
        // Settles in a session that lives, subscribed to the other filter.
        let expected_drops = u64::from(protocol == 4);
        assert!(
            wait_stats(&run.link, WAIT, |s| s
                .filters_dropped
                .load(Ordering::Relaxed)
                == expected_drops
                && s.connected.load(Ordering::Relaxed) == 1)
            .await,
            "v{protocol}: {} filters dropped",
            stat(&run.link, |s| &s.filters_dropped)
        );
        let connects = stat(&run.link, |s| &s.connects);
        assert!(connects <= 4, "v{protocol}: {connects} sessions");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            stat(&run.link, |s| &s.connects),
            connects,
            "v{protocol}: still reconnecting"
        );
        probe
            .publish("t/other/cmd", "1", rumqttc::QoS::AtLeastOnce, false)
            .await;
        let cmd = tokio::time::timeout(WAIT, run.commands.recv())
            .await
            .expect("command on the other filter")
            .expect("link running");
        assert_eq!(cmd.topic, "t/other/cmd");
        assert_eq!(stat(&run.link, |s| &s.dropped), 0, "v{protocol}");
    }
}

/// Fake: while the link subscribes one filter at a time (after a session ended on an
/// oversized packet) it holds its publishes back until the last SUBACK; a broker that never
/// sends it must not silence the link: after 10 s the readings go anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_acknowledges_a_subscribe_does_not_hold_readings_back() {
    let fake = FakeBroker::start(|n| match n {
        0 => Script {
            after_suback: vec![fake_broker::publish_v3("t/d/n/set", &[b'x'; 5000], 1, true)],
            ..Script::default()
        },
        _ => Script {
            suback: false,
            ..Script::default()
        },
    })
    .await;
    let cfg = config(fake.port(), 4, "  max_packet_size: 4096\n");
    let run = start(&cfg, &["t/+/+/set"], None);
    assert!(fake.wait(WAIT, |f| f.connections() >= 2).await);
    send_readings(&run.link, 3).await;
    assert!(
        fake.wait(Duration::from_secs(20), |f| readings_on(f, 1) == all(3))
            .await,
        "{:?}",
        fake.received()
    );
}

// --- Item 9: no reading is dropped on a guess; a client-id conflict is named ---------------

/// A client with the gateway's client id that connects again as soon as its session is taken
/// over (a second gateway from a cloned SD card), so that our sessions die right after their
/// CONNACK, often before the PUBACK of what they re-sent.
fn intruder(port: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let options = rumqttc::MqttOptions::new("gw", "127.0.0.1", port);
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        loop {
            if eventloop.poll().await.is_err() {
                tokio::task::yield_now().await;
            }
        }
    })
}

/// Real mosquitto: two clients with one client id take the session from each other again and
/// again. The old poison rule dropped the oldest reading in flight (and deleted its row) after
/// 5 such sessions. Now the link names the conflict (LinkStats.client_id_conflicts), drops
/// nothing, and once the other client is gone every reading arrives and every row is deleted
/// after its PUBACK only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_with_our_client_id_costs_no_reading() {
    const N: usize = 60;
    for protocol in [4, 5] {
        let broker = Mosquitto::start();
        let mut probe = MqttProbe::connect(broker.port(), "t/d/#").await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let cfg = config_with_store(broker.port(), protocol, "", &path.display().to_string());
        let (store, events) = fieldbridge::store::open(&cfg.store, &path).expect("store");
        let store_stats = store.stats.clone();
        let run = start(&cfg, &[], Some(Outbox { store, events }));
        assert!(
            wait_stats(&run.link, WAIT, |s| s.connected.load(Ordering::Relaxed)
                == 1)
            .await
        );
        let other = intruder(broker.port());
        for i in 0..N {
            run.link
                .sender
                .send(msg(&format!("t/d/r{i}"), &i.to_string()))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            wait_stats(&run.link, WAIT, |s| s
                .client_id_conflicts
                .load(Ordering::Relaxed)
                >= 1)
            .await,
            "v{protocol}: no conflict seen in {} sessions",
            stat(&run.link, |s| &s.connects)
        );
        let sessions = stat(&run.link, |s| &s.connects);
        other.abort();
        let _ = other.await;
        let mut seen = std::collections::BTreeSet::new();
        let deadline = Instant::now() + WAIT;
        while seen.len() < N && Instant::now() < deadline {
            if let Some(m) = probe.next(Duration::from_millis(200)).await {
                seen.insert(m.text().parse::<usize>().unwrap());
            }
        }
        let missing: Vec<usize> = (0..N).filter(|i| !seen.contains(i)).collect();
        assert!(
            missing.is_empty(),
            "v{protocol}: lost {missing:?} over {sessions} sessions"
        );
        assert_eq!(stat(&run.link, |s| &s.dropped), 0, "v{protocol}");
        assert!(
            wait_stats(&run.link, WAIT, |_| store_stats
                .backlog
                .load(Ordering::Relaxed)
                == 0)
            .await,
            "v{protocol}: rows left"
        );
        drop(run);
    }
}

/// Fake, MQTT 5: Server Keep Alive 0 in CONNACK. rumqttc took it as its keep-alive interval
/// (and kept it for every later CONNECT): a PINGREQ at once, and again, and again, until
/// its "last ping not acknowledged" error ended the session. The link keeps its own
/// interval instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_zero_neither_floods_pings_nor_ends_the_session() {
    let fake = FakeBroker::start(|_| Script {
        server_keep_alive: Some(0),
        ..Script::default()
    })
    .await;
    let run = start(&config(fake.port(), 5, ""), &[], None);
    send_readings(&run.link, 3).await;
    assert!(fake.wait(WAIT, |f| readings_on(f, 0) == all(3)).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(fake.pings() <= 2, "{} PINGREQs in a second", fake.pings());
    assert_eq!(fake.connections(), 1);
    assert_eq!(stat(&run.link, |s| &s.connects), 1);
}

/// Fake, MQTT 5: a broker with Maximum QoS 1 (AWS IoT has it) takes no QoS 2 publish
/// (§3.2.2.3.4: a protocol error that ends the session, again in every session). The link
/// sends QoS 2 messages at QoS 1 to it (still at least once), and delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_never_exceed_the_brokers_maximum_qos() {
    let fake = FakeBroker::start(|_| Script {
        max_qos: Some(1),
        ..Script::default()
    })
    .await;
    let run = start(&config(fake.port(), 5, ""), &[], None);
    for i in 0..3 {
        let m = OutMessage {
            qos: Qos::ExactlyOnce,
            ..msg(&format!("t/d/r{i}"), &i.to_string())
        };
        run.link.sender.send(m).await.unwrap();
    }
    assert!(fake.wait(WAIT, |f| readings_on(f, 0) == all(3)).await);
    let qos: Vec<u8> = fake.received().iter().map(|r| r.qos).collect();
    assert!(qos.iter().all(|&q| q <= 1), "{qos:?}");
    assert!(
        wait_stats(&run.link, WAIT, |s| s.delivered.load(Ordering::Relaxed)
            == 4)
        .await
    );
}

// --- Item 8: what the broker sends is bounded, drops are counted ----------------------------

/// Publishes `t/d/n/set` until the link hands one on: then it is subscribed.
async fn wait_subscribed(probe: &common::Mqtt5Probe, run: &mut Running) {
    let deadline = Instant::now() + WAIT;
    loop {
        probe.publish("t/d/n/set", "0", Default::default()).await;
        if let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(200), run.commands.recv()).await
        {
            while run.commands.try_recv().is_ok() {}
            return;
        }
        assert!(Instant::now() < deadline, "the link never subscribed");
    }
}

/// MQTT 5 correlation data is sized by the sender (up to 65535 bytes per request, kept with
/// every queued result): over 256 bytes, neither it nor the response topic is kept (no
/// response copy), and that is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_correlation_data_is_not_kept() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let broker = Mosquitto::start();
    let probe = common::Mqtt5Probe::connect(broker.port(), &["x/#"]).await;
    let mut run = start(&config(broker.port(), 5, ""), &["t/+/+/set"], None);
    wait_subscribed(&probe, &mut run).await;
    let request = |len: usize| PublishProperties {
        response_topic: Some("x/answer".into()),
        correlation_data: Some(vec![7u8; len].into()),
        ..PublishProperties::default()
    };
    probe.publish("t/d/n/set", "1", request(256)).await;
    probe.publish("t/d/n/set", "2", request(257)).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            tokio::time::timeout(WAIT, run.commands.recv())
                .await
                .expect("command")
                .expect("link running"),
        );
    }
    assert_eq!(got[0].correlation.as_ref().map(Vec::len), Some(256));
    assert_eq!(got[0].response_topic.as_deref(), Some("x/answer"));
    assert!(!got[0].correlation_refused);
    assert_eq!(got[1].correlation, None);
    assert_eq!(got[1].response_topic, None);
    assert!(got[1].correlation_refused);
    assert_eq!(stat(&run.link, |s| &s.correlation_refused), 1);
}

/// A flood of commands while the command queue is full: each dropped one is counted (the
/// warning is rate-limited), and the link lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_dropped_on_a_full_queue_are_counted() {
    let broker = Mosquitto::start();
    let probe = common::Mqtt5Probe::connect(broker.port(), &["x/#"]).await;
    let mut run = start(&config(broker.port(), 5, ""), &["t/+/+/set"], None);
    wait_subscribed(&probe, &mut run).await;
    // The queue holds 16; nobody reads it now.
    for i in 0..40 {
        probe
            .publish("t/d/n/set", &i.to_string(), Default::default())
            .await;
    }
    assert!(
        wait_stats(&run.link, WAIT, |s| s
            .commands_dropped
            .load(Ordering::Relaxed)
            == 24)
        .await,
        "{} dropped",
        stat(&run.link, |s| &s.commands_dropped)
    );
    assert_eq!(stat(&run.link, |s| &s.connects), 1);
}

/// The memory queue is bounded in bytes too (`mqtt.queue.max_bytes`), not only in messages:
/// with a broker that acknowledges nothing, 10 messages of 10 KiB against a 64 KiB bound keep
/// 6 (the rest dropped and counted). Fake only to hold the messages unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_queue_is_bounded_in_bytes() {
    let fake = FakeBroker::start(|_| Script {
        ack: false,
        ..Script::default()
    })
    .await;
    let cfg = config(
        fake.port(),
        4,
        "  queue: { capacity: 1000, max_bytes: 65536 }\n",
    );
    let run = start(&cfg, &[], None);
    assert!(
        wait_stats(&run.link, WAIT, |s| s.connected.load(Ordering::Relaxed)
            == 1)
        .await
    );
    let big = "x".repeat(10_000);
    for i in 0..10 {
        run.link
            .sender
            .send(msg(&format!("t/d/r{i}"), &big))
            .await
            .unwrap();
    }
    assert!(
        wait_stats(&run.link, WAIT, |s| s.dropped.load(Ordering::Relaxed) == 4).await,
        "{} dropped",
        stat(&run.link, |s| &s.dropped)
    );
    assert!(fake.wait(WAIT, |f| readings_on(f, 0).len() == 6).await);
}

// --- The held-back mark goes on the publisher's JSON objects only ------------------------

/// Readings held back while the broker is down get `"buffered":true` only when the publisher
/// built a JSON object (`OutMessage::kind` `publish::json::OBJECT`, marked by the stage's
/// announcer when the link sends it); a string point whose value is `{x}` (or a JSON line
/// field) arrives as it was. The link used to guess from the first and last bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_held_back_mark_goes_on_json_objects_only() {
    let mut broker = Mosquitto::start();
    let mut probe = MqttProbe::connect(broker.port(), "t/d/#").await;
    let run = start(&config(broker.port(), 4, ""), &[], None);
    assert!(
        wait_stats(&run.link, WAIT, |s| s.connected.load(Ordering::Relaxed)
            == 1)
        .await
    );
    broker.stop();
    assert!(
        wait_stats(&run.link, WAIT, |s| s.connected.load(Ordering::Relaxed)
            == 0)
        .await
    );
    // Retained: the probe sees them whenever it is subscribed again.
    let string_point = OutMessage {
        retain: true,
        ..msg("t/d/s", "{x}")
    };
    let json = OutMessage {
        retain: true,
        kind: fieldbridge::publish::json::OBJECT,
        ..msg("t/d/j", r#"{"value":1}"#)
    };
    run.link.sender.send(string_point).await.unwrap();
    run.link.sender.send(json).await.unwrap();
    broker.restart();
    probe.wait_resubscribed(WAIT).await;
    let s = probe.expect(|t| t == "t/d/s", WAIT).await;
    assert_eq!(s.text(), "{x}");
    let j = probe.expect(|t| t == "t/d/j", WAIT).await;
    assert_eq!(j.text(), r#"{"buffered":true,"value":1}"#);
}
