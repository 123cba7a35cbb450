//! systemd integration: the notify protocol of the real binary against a NOTIFY_SOCKET this test
//! binds (READY, STATUS, WATCHDOG, STOPPING), the watchdog withheld while a poll loop or the
//! store thread is stuck, and `systemd-analyze verify` of the unit where systemd-analyze exists.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{DeviceState, Gateway, Mosquitto, TcpDevice};

/// The notification socket, as systemd would provide it.
struct NotifySocket {
    socket: UnixDatagram,
    path: String,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        NotifySocket {
            socket,
            path: path.display().to_string(),
            _dir: dir,
        }
    }

    /// Every line received within `window`, each with its arrival time.
    fn collect(&self, window: Duration) -> Vec<(Instant, String)> {
        let mut lines = Vec::new();
        let end = Instant::now() + window;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let now = Instant::now();
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    lines.push((now, line.to_string()));
                }
            }
        }
        lines
    }

    /// Collects until `done` holds for what was received (or `timeout`).
    fn collect_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[(Instant, String)]) -> bool,
    ) -> Vec<(Instant, String)> {
        let mut lines = Vec::new();
        let end = Instant::now() + timeout;
        while Instant::now() < end && !done(&lines) {
            lines.extend(self.collect(Duration::from_millis(100)));
        }
        lines
    }
}

fn count(lines: &[(Instant, String)], exact: &str) -> usize {
    lines.iter().filter(|(_, l)| l == exact).count()
}

fn yaml(broker: u16, device: u16) -> String {
    format!(
        "gateway:\n  id: gw\n  prefix: t\nmqtt:\n  url: mqtt://127.0.0.1:{broker}\n  reconnect: {{ min: 100ms, max: 500ms }}\nbuses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {device} }}\ndevices:\n  - name: d\n    bus: b\n    interval: 100ms\n    timeout: 200ms\n    points:\n      - {{ name: v, address: 0 }}\n"
    )
}

fn device() -> TcpDevice {
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 0, &[42]);
    TcpDevice::start(state)
}

#[test]
fn ready_status_and_watchdog_pings_reach_the_notify_socket() {
    let broker = Mosquitto::start();
    let device = device();
    let notify = NotifySocket::bind();
    let mut gateway = Gateway::start_with_env(
        &yaml(broker.port(), device.port()),
        &[("NOTIFY_SOCKET", &notify.path), ("WATCHDOG_USEC", "500000")],
    );
    let lines = notify.collect_until(Duration::from_secs(15), |l| {
        count(l, "READY=1") == 1
            && l.iter()
                .any(|(_, s)| s == "STATUS=1/1 devices online, MQTT connected, backlog 0")
            && count(l, "WATCHDOG=1") >= 4
    });
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(count(&lines, "READY=1"), 1, "{text:?}\n{}", gateway.logs());
    assert_eq!(text[0], "READY=1", "READY=1 comes first: {text:?}");
    assert!(
        text.contains(&"STATUS=1/1 devices online, MQTT connected, backlog 0"),
        "{text:?}\n{}",
        gateway.logs()
    );
    // Half of WATCHDOG_USEC at most between pings, with room for a loaded machine.
    let pings: Vec<Instant> = lines
        .iter()
        .filter(|(_, l)| l == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    assert!(pings.len() >= 4, "{text:?}");
    for pair in pings.windows(2) {
        assert!(
            pair[1] - pair[0] < Duration::from_millis(450),
            "pings too far apart: {:?}",
            pair[1] - pair[0]
        );
    }

    gateway.terminate();
    let lines = notify.collect_until(Duration::from_secs(10), |l| {
        l.iter().any(|(_, s)| s == "STOPPING=1")
    });
    assert!(
        lines.iter().any(|(_, s)| s == "STOPPING=1"),
        "{lines:?}\n{}",
        gateway.logs()
    );
    let status = gateway.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// Every await in a bus task is bounded by a timeout, so no real device can make a poll loop
/// hang; the debug-build hook `FIELDBRIDGE_TEST_STALL_BUS` stops the loop (and its heartbeat)
/// after its first poll, as a missing timeout would.
#[test]
fn no_watchdog_ping_while_a_poll_loop_is_stuck() {
    let broker = Mosquitto::start();
    let device = device();
    let notify = NotifySocket::bind();
    let gateway = Gateway::start_with_env(
        &yaml(broker.port(), device.port()),
        &[
            ("NOTIFY_SOCKET", &notify.path),
            ("WATCHDOG_USEC", "500000"),
            ("FIELDBRIDGE_TEST_STALL_BUS", "b"),
        ],
    );
    // The bus limit is 1 s + 200 ms + 2 ticks + 5 s slack: well within 20 s.
    let lines = notify.collect_until(Duration::from_secs(20), |l| {
        l.iter().any(|(_, s)| s.contains("stalled: bus b"))
    });
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(text.first(), Some(&"READY=1"), "{text:?}");
    assert!(
        text.iter().any(|s| s.contains("stalled: bus b")),
        "{text:?}\n{}",
        gateway.logs()
    );
    // Pings went out while the bus was still within its limit...
    assert!(count(&lines, "WATCHDOG=1") >= 2, "{text:?}");
    // ...and none after the stall was seen, although the MQTT link is healthy.
    let after = notify.collect(Duration::from_secs(2));
    assert_eq!(count(&after, "WATCHDOG=1"), 0, "{after:?}");
    assert!(
        gateway.logs().contains("withholding the watchdog ping"),
        "{}",
        gateway.logs()
    );
}

/// A store thread stuck in I/O (a dying SD card) stops its heartbeat; no real file does it on
/// demand, so the debug-build hook `FIELDBRIDGE_TEST_STALL_STORE` makes the thread hang.
#[test]
fn no_watchdog_ping_while_the_store_thread_is_stuck() {
    let broker = Mosquitto::start();
    let device = device();
    let notify = NotifySocket::bind();
    let yaml = yaml(broker.port(), device.port())
        .replace("buses:\n", "store:\n  path: \"{dir}/outbox.db\"\nbuses:\n");
    let mut gateway = Gateway::start_with_env(
        &yaml,
        &[
            ("NOTIFY_SOCKET", &notify.path),
            ("WATCHDOG_USEC", "500000"),
            ("FIELDBRIDGE_TEST_STALL_STORE", "1"),
        ],
    );
    // The store's limit is 20 s.
    let lines = notify.collect_until(Duration::from_secs(40), |l| {
        l.iter().any(|(_, s)| s.contains("stalled: store"))
    });
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(
        text.iter().any(|s| s.contains("stalled: store")),
        "{text:?}\n{}",
        gateway.logs()
    );
    assert!(count(&lines, "WATCHDOG=1") >= 2, "{text:?}");
    let after = notify.collect(Duration::from_secs(2));
    assert_eq!(count(&after, "WATCHDOG=1"), 0, "{after:?}");
    // A stop (systemctl restart) does not hang on the stuck thread.
    gateway.terminate();
    let status = gateway.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "still running 20 s after SIGTERM\n{}",
        gateway.logs()
    );
}

#[test]
fn watchdog_pings_go_on_while_a_reload_stops_a_busy_bus() {
    // Every transaction of the device takes 2 s; a reload that changes its bus waits for the
    // one on the wire. The supervisor used to be retired for the whole reload: no ping for
    // as long as the slowest bus took to stop, past a short WatchdogSec.
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 0, &[42]);
    let device = TcpDevice::start(state.clone());
    let notify = NotifySocket::bind();
    let slow = yaml(broker.port(), device.port())
        .replace("interval: 100ms", "interval: 100ms\n    offline_after: 100")
        .replace("timeout: 200ms", "timeout: 4s");
    let mut gateway = Gateway::start_with_env(
        &slow,
        &[
            ("NOTIFY_SOCKET", &notify.path),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let lines = notify.collect_until(Duration::from_secs(15), |l| {
        count(l, "READY=1") == 1 && count(l, "WATCHDOG=1") >= 2
    });
    assert!(count(&lines, "WATCHDOG=1") >= 2, "{lines:?}");
    state.set_delay(1, Some(Duration::from_secs(2)));
    // A transaction is on the wire when the reload comes.
    let seen = state.requests().len();
    assert!(
        common::wait_until(Duration::from_secs(10), || state.requests().len() > seen),
        "no poll reached the device"
    );
    let running = std::fs::read_to_string(gateway.config_path()).expect("config");
    let changed = running.replace("interval: 100ms", "interval: 200ms");
    std::fs::write(gateway.config_path(), changed).expect("rewrite");
    gateway.hangup();
    let lines = notify.collect_until(Duration::from_secs(15), |l| {
        l.iter().any(|(_, s)| s == "READY=1") && count(l, "WATCHDOG=1") >= 4
    });
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(
        text.contains(&"RELOADING=1"),
        "{text:?}\n{}",
        gateway.logs()
    );
    assert!(text.contains(&"READY=1"), "{text:?}\n{}", gateway.logs());
    let pings: Vec<Instant> = lines
        .iter()
        .filter(|(_, l)| l == "WATCHDOG=1" || l == "RELOADING=1")
        .map(|(t, _)| *t)
        .collect();
    for pair in pings.windows(2) {
        assert!(
            pair[1] - pair[0] < Duration::from_millis(900),
            "no watchdog ping for {:?} during the reload: {text:?}",
            pair[1] - pair[0]
        );
    }
    gateway.terminate();
    let _ = gateway.wait_exit(Duration::from_secs(15));
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/fieldbridge.service");
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(&unit)
        .output()
    else {
        eprintln!("systemd-analyze not installed: skipped");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The binary it names is not installed here; everything else must be clean.
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("/usr/bin/fieldbridge") && !l.trim().is_empty())
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify: {stderr}");
}

/// The value of `key=` in the unit's [Service] section (the last one given wins, as in systemd).
fn service_setting(unit: &str, key: &str) -> Option<String> {
    let mut in_service = false;
    let mut value = None;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            if in_service {
                value = Some(v.trim().to_string());
            }
        }
    }
    value
}

/// `64M` → bytes (the systemd.resource-control(5) suffixes K, M, G, base 1024).
fn bytes(v: &str) -> u64 {
    let (n, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("not a size: {v}"));
    n * match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => panic!("unit of {v}"),
    }
}

/// A leak or an unbounded queue ends in a restart (the outbox survives it), not in the OOM
/// killer choosing another process on the Pi. The cap leaves headroom over the measured peak
/// (W1: 7.6 MiB resident for 10 devices x 50 registers, benches/README.md) and over the
/// largest in-memory queue the config allows.
#[test]
fn unit_caps_memory_with_headroom_over_the_measured_peak() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/fieldbridge.service"),
    )
    .unwrap();
    let max = service_setting(&unit, "MemoryMax").expect("MemoryMax= in [Service]");
    let high = service_setting(&unit, "MemoryHigh").expect("MemoryHigh= in [Service]");
    let (max, high) = (bytes(&max), bytes(&high));
    let w1_peak = 7.6 * 1024.0 * 1024.0;
    assert!(
        max as f64 >= 8.0 * w1_peak,
        "MemoryMax {max} leaves little headroom"
    );
    assert!(max <= 512 << 20, "MemoryMax {max} is no cap on a Pi");
    assert!(
        high < max && high as f64 >= 4.0 * w1_peak,
        "MemoryHigh {high}"
    );
    // Swap would only make a leak slower to notice.
    assert_eq!(
        service_setting(&unit, "MemorySwapMax").as_deref(),
        Some("0")
    );
}
