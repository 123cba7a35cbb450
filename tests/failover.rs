//! `mqtt.servers`: with two real brokers, killing the one in use moves the gateway to the other
//! within the reconnect back-off, and nothing is lost on the way.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{DeviceState, Gateway, Kind, Mosquitto, MqttProbe, TcpDevice};

const WAIT: Duration = Duration::from_secs(20);

/// The `count` values seen on `probe` until `enough` of them, or the deadline.
async fn collect(probe: &mut MqttProbe, seen: &mut BTreeSet<u64>, enough: usize) {
    let deadline = Instant::now() + WAIT;
    let start = seen.len();
    while seen.len() < start + enough {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            panic!(
                "{} of {enough} more readings within {WAIT:?}",
                seen.len() - start
            );
        };
        if m.topic == "t/d/count" {
            if let Some(v) = m.json()["value"].as_u64() {
                seen.insert(v);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_is_left_for_the_next_one_and_nothing_is_lost() {
    let mut a = Mosquitto::start();
    let b = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    state.set_auto_increment(1, Kind::HoldingRegister, 0);
    let device = TcpDevice::start(state.clone());
    let mut on_a = MqttProbe::connect(a.port(), "t/d/#").await;
    let mut on_b = MqttProbe::connect(b.port(), "t/d/#").await;
    let gateway = Gateway::start(&format!(
        "gateway: {{ id: gw, prefix: t, clock: local }}\n\
         mqtt:\n  servers: [\"mqtt://127.0.0.1:{}\", \"mqtt://127.0.0.1:{}\"]\n  reconnect: {{ min: 100ms, max: 400ms }}\n\
         store: {{ path: \"{{dir}}/outbox.db\" }}\n\
         buses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {} }}\n\
         devices:\n  - name: d\n    bus: b\n    interval: 50ms\n    points:\n      - {{ name: count, address: 0, type: u16 }}\n",
        a.port(),
        b.port(),
        device.port()
    ));
    let mut seen = BTreeSet::new();
    collect(&mut on_a, &mut seen, 10).await;
    let killed_at = Instant::now();
    a.stop();
    collect(&mut on_b, &mut seen, 20).await;
    let moved_in = killed_at.elapsed();
    gateway.expect_log("trying the next MQTT server", WAIT);
    // Whatever A had passed on before it died, and everything since on B: no value missing
    // from the first to the last (the device counts up by one per poll).
    let (first, last) = (*seen.first().unwrap(), *seen.last().unwrap());
    let missing: Vec<u64> = (first..=last).filter(|v| !seen.contains(v)).collect();
    assert!(
        missing.is_empty(),
        "readings lost in the failover: {missing:?} (moved in {moved_in:?})"
    );
}
