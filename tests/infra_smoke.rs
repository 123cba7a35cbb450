//! Smoke tests of the test helpers themselves, against the real peers they wrap.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{
    DeviceState, Kind, Mosquitto, MqttProbe, Outcome, PtyPair, RtuDevice, TcpDevice, TestCerts,
};
use rumqttc::QoS;
use tokio::time::timeout;
use tokio_modbus::client::{rtu, tcp, Context};
use tokio_modbus::prelude::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn mosquitto_delivers_and_survives_a_restart_on_the_same_port() {
    let mut broker = Mosquitto::start();
    let port = broker.port();
    let mut probe = MqttProbe::connect(port, "smoke/#").await;

    probe
        .publish("smoke/a", "hello", QoS::AtLeastOnce, false)
        .await;
    let m = probe.expect(|t| t == "smoke/a", T).await;
    assert_eq!(m.payload, b"hello");
    assert!(!m.retain);

    probe
        .publish("smoke/r", "kept", QoS::AtLeastOnce, true)
        .await;
    probe.expect(|t| t == "smoke/r", T).await;
    let late = MqttProbe::connect(port, "smoke/r").await;
    let mut late = late;
    let m = late.expect(|t| t == "smoke/r", T).await;
    assert!(
        m.retain,
        "a retained message is delivered with retain to a new subscriber"
    );

    broker.stop();
    assert!(!common::port_accepts(port));
    broker.restart();
    assert_eq!(broker.port(), port);
    probe.wait_resubscribed(Duration::from_secs(10)).await;
    probe
        .publish("smoke/b", "again", QoS::AtLeastOnce, false)
        .await;
    let m = probe.expect(|t| t == "smoke/b", T).await;
    assert_eq!(m.text(), "again");
    assert!(
        broker.log().contains("New client connected"),
        "{}",
        broker.log()
    );
}

#[tokio::test]
async fn probe_expect_and_collect_for_report_what_arrives() {
    let broker = Mosquitto::start();
    let mut probe = MqttProbe::connect(broker.port(), "#").await;
    for i in 0..3 {
        probe
            .publish(
                &format!("c/{i}"),
                format!("{{\"i\":{i}}}"),
                QoS::AtMostOnce,
                false,
            )
            .await;
    }
    let got = probe.collect_for(Duration::from_millis(500)).await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["c/0", "c/1", "c/2"]);
    assert_eq!(got[2].json()["i"], 2);
    assert!(probe.next(Duration::from_millis(100)).await.is_none());
}

#[tokio::test]
async fn tls_broker_accepts_the_right_ca_and_client_cert_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::generate(dir.path());
    let broker = Mosquitto::start_tls(&certs, true);

    let mut probe = MqttProbe::connect_tls(broker.port(), &certs, "tls/#").await;
    probe
        .publish("tls/x", "secret", QoS::AtLeastOnce, false)
        .await;
    assert_eq!(probe.expect(|t| t == "tls/x", T).await.text(), "secret");

    let read = TestCerts::read;
    let wrong_ca = common::mqtt::ProbeTls::Tls {
        ca_pem: read(&certs.other_ca_cert),
        client: Some((read(&certs.client_cert), read(&certs.client_key))),
    };
    let err = MqttProbe::try_connect(broker.port(), "#", wrong_ca)
        .await
        .err()
        .expect("a server cert from another CA must be refused");
    assert!(err.contains("UnknownIssuer"), "{err}");

    let no_client_cert = common::mqtt::ProbeTls::Tls {
        ca_pem: read(&certs.ca_cert),
        client: None,
    };
    assert!(
        MqttProbe::try_connect(broker.port(), "#", no_client_cert)
            .await
            .is_err(),
        "require_certificate must refuse a client without a certificate"
    );

    let rogue_client = common::mqtt::ProbeTls::Tls {
        ca_pem: read(&certs.ca_cert),
        client: Some((
            read(&certs.other_client_cert),
            read(&certs.other_client_key),
        )),
    };
    assert!(
        MqttProbe::try_connect(broker.port(), "#", rogue_client)
            .await
            .is_err(),
        "a client certificate from another CA must be refused"
    );
}

#[test]
fn pty_pair_carries_bytes_both_ways_and_restarts() {
    let mut pty = PtyPair::new();
    for _ in 0..2 {
        let mut b = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pty.b())
            .unwrap();
        let mut a = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pty.a())
            .unwrap();
        a.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        read_exact_bounded(&mut b, &mut buf);
        assert_eq!(&buf, b"ping");
        b.write_all(b"pong").unwrap();
        read_exact_bounded(&mut a, &mut buf);
        assert_eq!(&buf, b"pong");
        drop((a, b));
        pty.restart();
    }
}

/// Tests run side by side, and a pty pair started right after another was stopped gets the
/// same /dev/pts numbers: the stopped pair's links must be gone, or whoever reopens them
/// (a gateway waiting for its port to come back) lands in the other test's pair.
#[test]
fn a_stopped_pty_pair_leaves_no_link_into_the_next_pair() {
    let mut old = PtyPair::new();
    let (a, b) = (old.a().to_path_buf(), old.b().to_path_buf());
    old.stop();
    let next = PtyPair::new();
    for link in [&a, &b] {
        assert!(
            std::fs::symlink_metadata(link).is_err(),
            "{} still exists after stop (next pair: {} and {})",
            link.display(),
            next.a().display(),
            next.b().display()
        );
    }
}

/// Reads exactly `buf.len()` bytes on a helper thread, failing after 5 s.
fn read_exact_bounded(f: &mut std::fs::File, buf: &mut [u8]) {
    let mut f2 = f.try_clone().unwrap();
    let n = buf.len();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut v = vec![0u8; n];
        let r = f2.read_exact(&mut v).map(|()| v);
        let _ = tx.send(r);
    });
    let v = rx
        .recv_timeout(T)
        .expect("pty read timed out")
        .expect("pty read");
    buf.copy_from_slice(&v);
}

async fn tcp_client(port: u16, unit: u8) -> Context {
    let addr = (common::LOCALHOST, port).into();
    timeout(T, tcp::connect_slave(addr, Slave(unit)))
        .await
        .expect("connect timed out")
        .expect("connect")
}

#[tokio::test]
async fn tcp_device_serves_reads_writes_exceptions_and_restarts() {
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 100, &[10, 20, 30]);
    state.set_holding(1, 150, &[0x1234]);
    state.set_coils(1, 5, &[true, false, true]);
    state.add_illegal(1, Kind::HoldingRegister, 200..=209);
    state.set_auto_increment(1, Kind::InputRegister, 0);
    let mut dev = TcpDevice::start(state.clone());

    let mut ctx = tcp_client(dev.port(), 1).await;
    let regs = timeout(T, ctx.read_holding_registers(100, 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(regs, Ok(vec![10, 20, 30]));
    let coils = timeout(T, ctx.read_coils(5, 3))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&coils[..3], &[true, false, true]);
    let exc = timeout(T, ctx.read_holding_registers(205, 10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exc, Err(ExceptionCode::IllegalDataAddress));
    let c1 = timeout(T, ctx.read_input_registers(0, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let c2 = timeout(T, ctx.read_input_registers(0, 1))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(c2[0], c1[0] + 1, "auto-increment register counts reads");

    timeout(T, ctx.write_multiple_registers(300, &[7, 8]))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    timeout(T, ctx.write_single_coil(9, true))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    timeout(T, ctx.masked_write_register(150, 0x00F0, 0x0005))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(state.holding(1, 300, 2), [7, 8]);
    assert_eq!(state.coils(1, 9, 1), [true]);
    // (0x1234 AND 0x00F0) OR (0x0005 AND NOT 0x00F0) = 0x0030 | 0x0005
    assert_eq!(state.holding(1, 150, 1), [0x0035]);
    let w = state
        .wait_for_request(|r| r.fc == 16 && r.address == 300, T)
        .await;
    assert_eq!(w.values, [7, 8]);
    assert_eq!(w.outcome, Outcome::Ok);
    assert_eq!(state.writes().len(), 3);

    dev.stop();
    let r = timeout(T, ctx.read_holding_registers(100, 1))
        .await
        .unwrap();
    assert!(r.is_err(), "a stopped device drops the connection: {r:?}");
    assert!(!common::port_accepts(dev.port()));

    dev.restart();
    let mut ctx = tcp_client(dev.port(), 1).await;
    let regs = timeout(T, ctx.read_holding_registers(101, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(regs, Ok(vec![20]));
}

#[tokio::test]
async fn tcp_device_ignores_silent_and_unknown_units() {
    let state = DeviceState::new(&[1, 2]);
    state.set_silent(2, true);
    let dev = TcpDevice::start(state.clone());
    for unit in [2, 9] {
        let mut ctx = tcp_client(dev.port(), unit).await;
        let r = timeout(Duration::from_millis(300), ctx.read_holding_registers(0, 1)).await;
        assert!(r.is_err(), "unit {unit} must not answer");
    }
    let logged = state.requests();
    assert_eq!(logged.len(), 2);
    assert!(logged.iter().all(|r| r.outcome == Outcome::Silent));
}

#[tokio::test]
async fn rtu_device_serves_several_units_on_a_pty_and_stays_silent_for_others() {
    let pty = PtyPair::new();
    let state = DeviceState::new(&[1, 2, 3]);
    state.set_holding(1, 0, &[111]);
    state.set_holding(2, 0, &[222]);
    state.set_silent(3, true);
    let _dev = RtuDevice::start(pty.a(), state.clone());

    let serial =
        tokio_serial::SerialStream::open(&tokio_serial::new(pty.b().to_string_lossy(), 19_200))
            .expect("open pty b");
    let mut ctx = rtu::attach_slave(serial, Slave(1));
    let r = timeout(T, ctx.read_holding_registers(0, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Ok(vec![111]));
    ctx.set_slave(Slave(2));
    let r = timeout(T, ctx.read_holding_registers(0, 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Ok(vec![222]));
    timeout(T, ctx.write_single_register(0, 333))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(state.holding(2, 0, 1), [333]);

    ctx.set_slave(Slave(3));
    let r = timeout(Duration::from_millis(500), ctx.read_holding_registers(0, 1)).await;
    assert!(r.is_err(), "silent unit 3 must time out, got {r:?}");
    state
        .wait_for_request(|r| r.unit == 3 && r.outcome == Outcome::Silent, T)
        .await;
}
