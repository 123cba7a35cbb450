//! Sparkplug B edge node, checked by an independent host application: `tests/sparkplug/host.js`,
//! built on Eclipse Tahu's JavaScript payload library (`sparkplug-payload` from npm, installed by
//! `scripts/install-sparkplug-host`), not on our own decoder. It subscribes to `spBv1.0/#` on the
//! real mosquitto, decodes every message and checks the specification's rules (births before
//! data, aliases declared, `seq` continuous and wrapping, NDEATH `bdSeq` = NBIRTH `bdSeq`,
//! DDEATH/DBIRTH, rebirth, QoS); it sends NCMD and DCMD on request. The gateway reaches the broker
//! through a relay the test can cut (an outage on the gateway's side only: the host stays
//! connected and sees the will).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::relay::Relay;
use common::{DeviceState, Gateway, Kind, Mosquitto, TcpDevice};
use serde_json::{json, Value as Json};

const WAIT: Duration = Duration::from_secs(20);

/// The host application (a Node.js process), fed commands on stdin, read as JSON lines.
struct Host {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Json>,
    seen: Vec<Json>,
}

/// Node.js and the npm packages, once per test binary (`scripts/test` has usually done it).
fn install_host() {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = DONE.get_or_init(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        Command::new(format!("{root}/scripts/install-sparkplug-host"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(*ok, "scripts/install-sparkplug-host failed");
}

impl Host {
    fn start(port: u16, extra: &[&str]) -> Host {
        install_host();
        let root = env!("CARGO_MANIFEST_DIR");
        let mut child = Command::new("node")
            .arg(format!("{root}/tests/sparkplug/host.js"))
            .args([
                "--port",
                &port.to_string(),
                "--group",
                "plant",
                "--node",
                "gw1",
            ])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node tests/sparkplug/host.js");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<Json>(&line) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut host = Host {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        };
        host.wait(|e| e["event"] == "ready", "the host to be ready");
        host
    }

    fn send(&mut self, cmd: Json) {
        writeln!(self.stdin, "{cmd}").expect("write to the host");
        self.stdin.flush().expect("flush");
    }

    /// The first event from now on matching `pred` (every event is kept in `seen`).
    fn wait(&mut self, pred: impl Fn(&Json) -> bool, what: &str) -> Json {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if pred(&e) {
                        return e;
                    }
                }
                Err(_) => panic!("waited {WAIT:?} for {what}; last events: {:?}", self.tail()),
            }
        }
    }

    fn tail(&self) -> Vec<&Json> {
        self.seen.iter().rev().take(8).collect()
    }

    fn message(&mut self, kind: &str, device: Option<&str>, what: &str) -> Json {
        let device = device.map(Json::from).unwrap_or(Json::Null);
        self.wait(
            |e| e["event"] == "message" && e["type"] == kind && e["device"] == device,
            what,
        )
    }

    fn check(&mut self) -> Json {
        self.send(json!({"cmd": "check"}));
        self.wait(|e| e["event"] == "check", "the host's check")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of metric `name` (as the birth named it) in a host message event.
fn metric<'a>(event: &'a Json, name: &str) -> Option<&'a Json> {
    event["metrics"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name || m["birth_name"] == name)
}

fn config(broker: u16, device: u16, data_qos: u8) -> String {
    format!(
        r#"
gateway: {{ id: gw1, prefix: plant, clock: local }}
mqtt:
  url: mqtt://127.0.0.1:{broker}
  reconnect: {{ min: 100ms, max: 400ms }}
store: {{ path: "{{dir}}/outbox.db" }}
sparkplug: {{ group_id: plant, edge_node_id: gw1, data_qos: {data_qos} }}
buses:
  - {{ name: b, type: tcp, host: 127.0.0.1, port: {device} }}
devices:
  - name: m1
    bus: b
    unit: 1
    interval: 20ms
    timeout: 200ms
    points:
      - {{ name: count, address: 0, type: u16 }}
      - {{ name: volts, address: 1, type: u16, scale: 0.1, unit: V }}
      - {{ name: sp, address: 2, type: u16, writable: true, max: 100 }}
  - name: m2
    bus: b
    unit: 2
    interval: 100ms
    timeout: 200ms
    offline_after: 2
    backoff_max: 200ms
    points:
      - {{ name: t, address: 0, type: i16 }}
      - {{ name: run, register: coil, address: 0 }}
"#
    )
}

/// The checker itself: its self-test plays a correct edge node (no violation expected) and
/// broken ones (each violation expected), with Tahu's encoder, against the real mosquitto.
#[test]
fn the_host_checker_finds_what_it_should() {
    install_host();
    let broker = Mosquitto::start();
    let root = env!("CARGO_MANIFEST_DIR");
    let child = Command::new("node")
        .arg(format!("{root}/tests/sparkplug/selftest.js"))
        .args(["--port", &broker.port().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the self-test");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(Duration::from_secs(90)) else {
        // SAFETY: kill(2) on the PID of the child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("the host checker's self-test did not end within 90 s");
    };
    let output = output.expect("the self-test's output");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the checker's self-test failed:\n{out}"
    );
    assert!(out.contains(" 0 failed"), "{out}");
}

/// Two devices, a seq wrap, a DCMD that writes and one that is refused, a device lost and
/// back, a rebirth, an outage with the will and the historical data after it, then a restart:
/// the independent host finds no violation, and the data is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_host_application_finds_the_edge_node_correct() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let state = DeviceState::new(&[1, 2]);
    state.set_holding(1, 1, &[2301]);
    state.set_holding(2, 0, &[0xfffb]); // -5
    state.set_auto_increment(1, Kind::HoldingRegister, 0);
    let device = TcpDevice::start(state.clone());
    // QoS 1 for data (the documented option): the outage must lose nothing. A DATA sent in
    // the 50 ms after the host's rebirth request reached the broker is one the node sent
    // before it could see the request (it reaches both at once; the gateway then needs a few
    // ms to put the births ahead of its queue), not a violation.
    let mut host = Host::start(
        broker.port(),
        &["--data-qos", "1", "--rebirth-grace-ms", "50"],
    );
    let mut gateway = Gateway::start(&config(relay.port(), device.port(), 1));

    let nbirth = host.message("NBIRTH", None, "the NBIRTH");
    assert_eq!(nbirth["seq"], 0);
    let first_bd = nbirth["bdSeq"].as_i64().expect("bdSeq");
    // Declared by the births at once (with nulls if not read yet), born with values by its
    // first reading.
    let m2 = host.wait(
        |e| {
            e["type"] == "DBIRTH"
                && e["device"] == "m2"
                && metric(e, "t").is_some_and(|m| m["value"] == -5)
        },
        "m2's DBIRTH with its values",
    );
    assert_eq!(metric(&m2, "t").unwrap()["datatype"], "Int16");
    // seq wraps: m1 changes every 20 ms poll.
    host.wait(
        |e| e["event"] == "message" && e["seq"] == 255,
        "seq 255 (a wrap)",
    );

    // A DCMD writes through the validated path; the next DDATA carries the value.
    host.send(json!({"cmd": "dcmd", "device": "m1", "metric": "sp", "value": 7}));
    state
        .wait_for_request(|r| r.is_write() && r.unit == 1 && r.address == 2, WAIT)
        .await;
    assert_eq!(state.holding(1, 2, 1), vec![7]);
    host.wait(
        |e| {
            e["type"] == "DDATA"
                && e["device"] == "m1"
                && metric(e, "sp").is_some_and(|m| m["value"] == 7)
        },
        "a DDATA with sp = 7",
    );
    // One above max is refused: nothing reaches the device, the refusal is a node metric.
    host.send(json!({"cmd": "dcmd", "device": "m1", "metric": "sp", "value": 101}));
    host.wait(
        |e| {
            e["type"] == "NDATA"
                && metric(e, "Gateway/Commands refused").is_some_and(|m| m["value"] == 1)
        },
        "NDATA with Gateway/Commands refused = 1",
    );
    assert_eq!(
        state.writes().len(),
        1,
        "the refused DCMD reached the device"
    );
    assert_eq!(state.holding(1, 2, 1), vec![7]);

    // A device lost and back: DDEATH, then DBIRTH.
    state.set_silent(2, true);
    host.message("DDEATH", Some("m2"), "m2's DDEATH");
    state.set_silent(2, false);
    host.message("DBIRTH", Some("m2"), "m2's DBIRTH again");

    // Rebirth on request.
    host.send(json!({"cmd": "rebirth"}));
    host.message("NBIRTH", None, "the NBIRTH after the rebirth request");
    host.message(
        "DBIRTH",
        Some("m1"),
        "m1's DBIRTH after the rebirth request",
    );

    // An outage on the gateway's side: the broker publishes its will; readings go on.
    relay.cut();
    let death = host.message("NDEATH", None, "the will (NDEATH)");
    assert_eq!(death["bdSeq"].as_i64(), Some(first_bd));
    let polled = state.requests().len();
    state
        .wait_for_count(|r| r.unit == 1 && !r.is_write(), polled + 50, WAIT)
        .await;
    relay.restore();
    let reborn = host.message("NBIRTH", None, "the NBIRTH after the outage");
    // One more per connection attempt (the relay refused several while cut).
    let reborn_bd = reborn["bdSeq"].as_i64().expect("bdSeq");
    assert_ne!(
        reborn_bd, first_bd,
        "bdSeq did not move on after the outage"
    );
    host.wait(
        |e| {
            e["type"] == "DDATA"
                && e["metrics"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["is_historical"] == true))
        },
        "historical DDATA after the outage",
    );
    // Live again: a DDATA that is not historical.
    host.wait(
        |e| {
            e["type"] == "DDATA"
                && e["device"] == "m1"
                && e["metrics"].as_array().is_some_and(|ms| {
                    !ms.is_empty() && ms.iter().all(|m| m["is_historical"] != true)
                })
        },
        "live DDATA after the backlog",
    );

    // A graceful restart: NDEATH (goodbye), then NBIRTH with the next bdSeq, kept on disk.
    gateway.terminate();
    gateway.wait_exit(WAIT).expect("the gateway stops");
    host.message("NDEATH", None, "the NDEATH of a clean stop");
    gateway.restart();
    let third = host.message("NBIRTH", None, "the NBIRTH after the restart");
    assert_eq!(third["bdSeq"].as_i64(), Some((reborn_bd + 1) % 256));
    host.message("DDATA", Some("m1"), "data after the restart");

    let check = host.check();
    assert_eq!(
        check["violations"],
        json!([]),
        "the host application found violations; summary {}",
        check["summary"]
    );
    assert!(check["summary"]["seq_wraps"].as_u64() >= Some(1));

    // Complete: every `count` m1 reported, up to the last one seen, is there (the device
    // counts up by one per poll; every poll is in a DDATA, or in the DBIRTH that a reading
    // after the device came online becomes).
    let mut counts: Vec<i64> = host
        .seen
        .iter()
        .filter(|e| (e["type"] == "DDATA" || e["type"] == "DBIRTH") && e["device"] == "m1")
        .filter_map(|e| metric(e, "count").and_then(|m| m["value"].as_i64()))
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let gaps: Vec<(i64, i64)> = counts
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    assert!(
        gaps.is_empty(),
        "readings missing (gaps in m1's count): {gaps:?} of {} values",
        counts.len()
    );
}

/// With a primary host: nothing is sent before its STATE says online (readings are held back),
/// then births and the held readings as historical data; while the host is offline no DATA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_primary_host_nothing_goes_out_before_its_state_says_online() {
    let broker = Mosquitto::start();
    let state = DeviceState::new(&[1, 2]);
    state.set_auto_increment(1, Kind::HoldingRegister, 0);
    let device = TcpDevice::start(state.clone());
    let mut host = Host::start(broker.port(), &["--host-id", "scada"]);
    let yaml = config(broker.port(), device.port(), 0).replace(
        "edge_node_id: gw1,",
        "edge_node_id: gw1, primary_host_id: scada,",
    );
    let gateway = Gateway::start(&yaml);
    // Connected and polling, but the host has not said online: nothing on spBv1.0.
    gateway.expect_log("waiting for the primary host's STATE online", WAIT);
    let polled = state.requests().len();
    state
        .wait_for_count(|r| r.unit == 1, polled + 25, WAIT)
        .await;
    host.send(json!({"cmd": "state", "online": true}));
    let sent = host.wait(
        |e| e["event"] == "sent" && e["cmd"] == "state",
        "STATE sent",
    );
    let first = host.message("NBIRTH", None, "the NBIRTH after STATE online");
    assert_eq!(
        host.seen
            .iter()
            .filter(|e| e["event"] == "message")
            .map(|e| e["index"].as_u64())
            .min()
            .flatten(),
        first["index"].as_u64(),
        "something came before the NBIRTH (STATE sent: {sent})"
    );
    host.wait(
        |e| {
            e["type"] == "DDATA"
                && e["metrics"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["is_historical"] == true))
        },
        "the readings held back, as historical DDATA",
    );
    // The host goes offline: DATA stops; back online: births again, then data.
    host.send(json!({"cmd": "state", "online": false}));
    host.wait(
        |e| e["event"] == "sent" && e["online"] == false,
        "STATE offline sent",
    );
    gateway.expect_log("primary host offline", WAIT);
    // The node leaves (its will is the NDEATH) and connects again, waiting for the host.
    host.message("NDEATH", None, "the NDEATH after the host went offline");
    gateway.expect_log("waiting for the primary host's STATE online", WAIT);
    host.send(json!({"cmd": "state", "online": true}));
    host.message("NBIRTH", None, "the NBIRTH after the host is back");
    host.message("DDATA", Some("m1"), "data after the host is back");
    let check = host.check();
    assert_eq!(
        check["violations"],
        json!([]),
        "summary {}",
        check["summary"]
    );
}

/// `check` prints the Sparkplug topics, and every metric's alias and datatype.
#[test]
fn check_prints_the_sparkplug_topics_and_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, config(1883, 502, 0).replace("{dir}", "/tmp")).unwrap();
    let out = common::gateway::run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.success(), "{}{}", out.stdout, out.stderr);
    for line in [
        "spBv1.0/plant/NBIRTH/gw1 (seq 0, bdSeq, Node Control/Rebirth)",
        "spBv1.0/plant/NCMD/gw1 (rebirth)",
        "alias     4  UInt64   Gateway/Commands refused",
        "alias   100  UInt16   count",
        "alias   101  Double   volts [V]",
        "alias   102  UInt16   sp (writable: spBv1.0/plant/DCMD/gw1/m1)",
        "alias   103  Int16    t",
        "alias   104  Boolean  run",
    ] {
        assert!(
            out.stdout.contains(line),
            "missing {line:?} in:\n{}",
            out.stdout
        );
    }
}
