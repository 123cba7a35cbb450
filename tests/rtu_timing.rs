//! RTU line timing at real speeds: the real gateway on one end of a socat pty pair, a
//! `WireSlave` (tests/common/wire.rs) on the other end that behaves like slaves on an RS-485
//! line at the configured baud rate (character times, end of frame after 3.5 characters of
//! silence, broken frames, turnaround), a real mosquitto.
//!
//! What the slave measures is the silence the gateway leaves on the line, at the device, from
//! the arrival times of the gateway's bytes: not the gateway's own timestamps.

mod common;

use std::time::Duration;

use common::wire::{request_silences, FrameKind, FrameRecord, LineFormat, WireSlave};
use common::{Gateway, Mosquitto, MqttProbe, PtyPair};
use fieldbridge::config::frame_gap_for_baud;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn header(broker_port: u16) -> String {
    format!(
        "gateway:\n  id: gw\n  prefix: t\nmqtt:\n  url: mqtt://127.0.0.1:{broker_port}\n  reconnect: {{ min: 100ms, max: 500ms }}\n"
    )
}

fn requests(frames: &[FrameRecord], unit: u8) -> usize {
    frames
        .iter()
        .filter(|f| f.kind == FrameKind::Request && f.unit == unit)
        .count()
}

fn answers(frames: &[FrameRecord], unit: u8) -> usize {
    frames
        .iter()
        .filter(|f| f.kind == FrameKind::Answer && f.unit == unit)
        .count()
}

fn ignored(frames: &[FrameRecord]) -> usize {
    frames
        .iter()
        .filter(|f| matches!(f.kind, FrameKind::Broken | FrameKind::BadCrc))
        .count()
}

/// Three slaves polled back to back (interval 10 ms, far below what the line carries): the
/// gateway must leave at least its frame gap (3.5 characters of 11 bits, 1.75 ms above
/// 19200 baud; Modbus over serial line v1.02 §2.5.1.1) between the end of each answer and its
/// next request, as seen by the device.
async fn keeps_the_silent_interval(baud: u32, min_requests: usize) {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let format = LineFormat::n81(baud);
    let slave = WireSlave::start(pty.a(), format, &[1, 2, 3], Duration::ZERO);
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let mut yaml = format!(
        "{}buses:\n  - {{ name: rs485, type: rtu, port: {}, baud: {baud} }}\ndevices:\n",
        header(broker.port()),
        pty.b().display()
    );
    for unit in 1..=3 {
        yaml.push_str(&format!(
            "  - {{ name: m{unit}, bus: rs485, unit: {unit}, interval: 10ms, timeout: 500ms, points: [ {{ name: a, address: 7 }}, {{ name: b, address: 16 }} ] }}\n"
        ));
    }
    let gateway = Gateway::start(&yaml);
    let m2 = probe.expect_msg(|m| m.topic == "t/m2/b", WAIT).await.json();
    assert_eq!(m2["value"], json!(2016), "{m2}");
    assert!(
        tokio::task::block_in_place(
            || slave.wait_frames(WAIT, |f| (1..=3).all(|u| answers(f, u) >= min_requests / 3))
        ),
        "{} requests answered in {WAIT:?}; slave error {:?}\n{}",
        slave.frames().len(),
        slave.error(),
        gateway.logs()
    );
    let frames = slave.frames();
    let s = request_silences(&frames).expect("requests seen");
    let gap = frame_gap_for_baud(baud);
    println!(
        "{baud} baud: {} silences before requests: min {:?} median {:?} max {:?} (frame gap {gap:?}, 3.5 chars {:?})",
        s.count,
        s.min,
        s.median,
        s.max,
        format.chars(3.5)
    );
    assert!(s.min >= format.chars(3.5), "{s:?}");
    assert!(
        s.min >= gap,
        "the gateway left {:?} of silence before a request, less than its frame gap {gap:?}: {s:?}",
        s.min
    );
    assert_eq!(ignored(&frames), 0, "broken or bad-CRC frames: {frames:?}");
    assert_eq!(
        slave.collisions(),
        0,
        "bytes sent while the slave was answering"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_the_silent_interval_at_9600_baud() {
    keeps_the_silent_interval(9600, 45).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_the_silent_interval_at_115200_baud() {
    keeps_the_silent_interval(115_200, 150).await;
}

/// A slave that takes 150 ms to answer (slow meters do) at 9600 baud, with a timeout that
/// covers its turnaround and the answer's 40 ms on the wire: every request is answered and
/// taken, none times out, and the fast neighbour keeps being read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_slaves_turnaround_is_tolerated() {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let format = LineFormat::n81(9600);
    let slave = WireSlave::start(pty.a(), format, &[1, 2], Duration::ZERO);
    let turnaround = Duration::from_millis(150);
    slave.set_turnaround(2, turnaround);
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = format!(
        "{}buses:\n  - {{ name: rs485, type: rtu, port: {}, baud: 9600 }}\ndevices:\n  - {{ name: fast, bus: rs485, unit: 1, interval: 100ms, timeout: 300ms, points: [ {{ name: v, address: 3 }} ] }}\n  - {{ name: slow, bus: rs485, unit: 2, interval: 100ms, timeout: 300ms, offline_after: 1, points: [ {{ name: v, address: 3 }}, {{ name: w, address: 12 }} ] }}\n",
        header(broker.port()),
        pty.b().display()
    );
    let gateway = Gateway::start(&yaml);
    assert!(
        tokio::task::block_in_place(
            || slave.wait_frames(WAIT, |f| answers(f, 2) >= 8 && answers(f, 1) >= 8)
        ),
        "slave error {:?}\n{}",
        slave.error(),
        gateway.logs()
    );
    let msgs = probe.collect_for(Duration::from_millis(300)).await;
    let slow = msgs
        .iter()
        .rev()
        .find(|m| m.topic == "t/slow/w")
        .expect("a reading of slow/w")
        .json();
    assert_eq!(slow["value"], json!(2012), "{slow}");
    assert!(
        !msgs
            .iter()
            .any(|m| m.topic == "t/slow/status" && m.text() == "offline"),
        "the slow slave was taken for dead"
    );
    let frames = slave.frames();
    // Every request to the slow slave was answered (the last one may be in flight) ...
    assert!(requests(&frames, 2) <= answers(&frames, 2) + 1);
    // ... after its turnaround, measured on the modelled wire ...
    for w in frames.windows(2) {
        if w[0].kind == FrameKind::Request && w[0].unit == 2 && w[1].kind == FrameKind::Answer {
            assert!(w[1].start - w[0].end >= turnaround, "{w:?}");
        }
    }
    // ... and the gateway never spoke over an answer.
    assert_eq!(slave.collisions(), 0);
    let bad: Vec<_> = msgs
        .iter()
        .filter(|m| m.topic.starts_with("t/slow/") && m.text().contains("\"quality\":\"bad\""))
        .collect();
    assert!(bad.is_empty(), "bad readings of the slow slave: {bad:?}");
}

/// At 9600 baud a dead slave costs its timeout: the gateway waits the whole timeout for it
/// (measured at the device: the silence after its unanswered request), marks it offline, and
/// goes on reading the live slave, whose answers (a 40-register read, 89 ms on the wire) fit
/// in the same timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_at_9600_baud_is_a_whole_timeout_of_silence() {
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let format = LineFormat::n81(9600);
    let slave = WireSlave::start(pty.a(), format, &[1, 2], Duration::from_millis(5));
    slave.set_silent(2, true);
    let timeout = Duration::from_millis(150);
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = format!(
        "{}buses:\n  - {{ name: rs485, type: rtu, port: {}, baud: 9600 }}\ndevices:\n  - {{ name: live, bus: rs485, unit: 1, interval: 200ms, timeout: 150ms, points: [ {{ name: v, address: 0 }}, {{ name: w, address: 39 }} ] }}\n  - {{ name: dead, bus: rs485, unit: 2, interval: 200ms, timeout: 150ms, offline_after: 2, points: [ {{ name: v, address: 0 }} ] }}\n",
        header(broker.port()),
        pty.b().display()
    );
    let gateway = Gateway::start(&yaml);
    probe
        .expect_msg(
            |m| m.topic == "t/dead/status" && m.text() == "offline",
            WAIT,
        )
        .await;
    let live = probe
        .expect_msg(|m| m.topic == "t/live/w", WAIT)
        .await
        .json();
    assert_eq!(live["value"], json!(1039), "{live}");
    let frames = slave.frames();
    let mut after_dead = Vec::new();
    for w in frames.windows(2) {
        if w[0].kind == FrameKind::Request && w[0].unit == 2 {
            after_dead.push(w[1].silence_before.expect("a silence"));
        }
    }
    assert!(after_dead.len() >= 2, "{frames:?}\n{}", gateway.logs());
    for s in &after_dead {
        // The request's own wire time is not silence: the timeout runs from its write.
        assert!(
            *s + Duration::from_millis(9) >= timeout,
            "only {s:?} of silence after a request to the dead slave (timeout {timeout:?})"
        );
    }
    assert_eq!(answers(&frames, 2), 0);
    assert!(answers(&frames, 1) >= 2);
    assert_eq!(ignored(&frames), 0);
    assert_eq!(slave.collisions(), 0);
    drop(gateway);
}
