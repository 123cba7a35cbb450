//! The HTTP endpoint against real clients: a real Prometheus (Debian's `prometheus`, started here
//! on a free loopback port) scrapes `/metrics` and its query API shows the series exist and move
//! (a device taken offline shows in `fieldbridge_device_online`); `promtool check metrics` lints
//! the exposition; Debian's headless Chromium (driven by playwright-core, tests/browser/page.js)
//! renders the status page; the endpoint's bounds and credentials; `fieldbridge status` reads the
//! same snapshot. The peers come from `scripts/install-observability`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, run_cli, wait_until, DeviceState, Gateway, Kind, Mosquitto, TcpDevice};

const WAIT: Duration = Duration::from_secs(20);

/// The test peers, once per test binary (`scripts/test` has usually done it).
fn install() {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = DONE.get_or_init(|| {
        let root = env!("CARGO_MANIFEST_DIR");
        Command::new(format!("{root}/scripts/install-observability"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(*ok, "scripts/install-observability failed");
}

/// A device whose holding register 0 counts up on every read, and one more at 1.
fn counting_device() -> TcpDevice {
    let state = DeviceState::new(&[1]);
    state.set_holding(1, 0, &[100, 7]);
    state.set_auto_increment(1, Kind::HoldingRegister, 0);
    TcpDevice::start(state)
}

/// Two devices: `a` on `port_a`, `b` on a port nothing listens on (offline from the start).
fn config(broker: u16, port_a: u16, port_b: u16, http: &str) -> String {
    format!(
        r#"gateway: {{ id: gw-obs, prefix: obs }}
mqtt: {{ url: "mqtt://127.0.0.1:{broker}" }}
http: {http}
buses:
  - {{ name: line-a, type: tcp, host: 127.0.0.1, port: {port_a} }}
  - {{ name: line-b, type: tcp, host: 127.0.0.1, port: {port_b}, reconnect_max: 1s }}
devices:
  - name: a
    bus: line-a
    interval: 200ms
    points:
      - {{ name: counter, address: 0, unit: kWh }}
      - {{ name: temp, address: 1, scale: 0.5, unit: "°C" }}
  - name: b
    bus: line-b
    interval: 200ms
    timeout: 200ms
    offline_after: 1
    points:
      - {{ name: level, address: 0 }}
"#
    )
}

/// The address the gateway's endpoint listens on (it is told port 0 and logs the real one).
fn endpoint(gateway: &Gateway) -> SocketAddr {
    let mut found = None;
    assert!(
        wait_until(WAIT, || {
            found = gateway.logs().lines().find_map(|l| {
                let rest = l.split("http endpoint listening").nth(1)?;
                let at = rest.split("listen=").nth(1)?;
                at.split_whitespace().next()?.parse().ok()
            });
            found.is_some()
        }),
        "no `http endpoint listening` in the log:\n{}",
        gateway.logs()
    );
    found.expect("found")
}

/// One request; the status code and the body.
fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    // Status 0: nothing listens (yet).
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).expect("send");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// A sample's value in an exposition: `name{labels} value`.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr, token: Option<&str>) -> Prometheus {
        install();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut auth = String::new();
        if let Some(t) = token {
            let file = dir.path().join("token");
            std::fs::write(&file, t).unwrap();
            auth = format!(
                "    authorization: {{ type: Bearer, credentials_file: {} }}\n",
                file.display()
            );
        }
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: fieldbridge\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n{auth}    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("log");
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("start prometheus");
            let up = wait_until(WAIT, || {
                child.try_wait().ok().flatten().is_none()
                    && get(SocketAddr::from(([127, 0, 0, 1], port)), "/-/ready").0 == 200
            });
            if up {
                return Prometheus {
                    child,
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            // The port was taken meanwhile, most likely: another one.
            eprintln!(
                "prometheus on {port} did not come up:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("prometheus did not start");
    }

    /// The value of an instant query with one result series matching `labels`, if any.
    fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        let q: String = expr
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = get(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            &format!("/api/v1/query?query={q}"),
        );
        if status != 200 {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((r["metric"].clone(), value))
            })
            .collect()
    }

    fn value_of(&self, expr: &str) -> Option<f64> {
        self.query(expr).first().map(|(_, v)| *v)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_metrics_and_sees_them_move() {
    install();
    let broker = Mosquitto::start();
    let a = counting_device();
    let dead = free_port();
    let gateway = Gateway::start(&config(
        broker.port(),
        a.port(),
        dead,
        "{ listen: 127.0.0.1:0 }",
    ));
    let addr = endpoint(&gateway);

    // The exposition itself: promtool's linter finds nothing to say.
    let mut body = String::new();
    assert!(
        wait_until(WAIT, || {
            body = get(addr, "/metrics").1;
            sample(
                &body,
                r#"fieldbridge_device_online{device="a",bus="line-a"}"#,
            ) == Some(1.0)
                && sample(
                    &body,
                    r#"fieldbridge_device_online{device="b",bus="line-b"}"#,
                ) == Some(0.0)
        }),
        "device states not in /metrics:\n{body}"
    );
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for family in [
        "fieldbridge_bus_transactions_total",
        "fieldbridge_bus_failures_total",
        "fieldbridge_bus_busy_seconds_total",
        "fieldbridge_bus_skipped_ticks_total",
        "fieldbridge_bus_transaction_seconds_bucket",
        "fieldbridge_device_polls_total",
        "fieldbridge_device_poll_failures_total",
        "fieldbridge_device_last_good_read_age_seconds",
        "fieldbridge_device_backoff_seconds",
        "fieldbridge_mqtt_connected",
        "fieldbridge_mqtt_connects_total",
        "fieldbridge_mqtt_in_flight_messages",
        "fieldbridge_mqtt_delivered_total",
        "fieldbridge_mqtt_dropped_total",
        "fieldbridge_mqtt_delivery_seconds_bucket",
        "fieldbridge_store_backlog_messages",
        "fieldbridge_store_oldest_age_seconds",
        "fieldbridge_store_writes_total",
        "fieldbridge_store_dropped_total",
        "fieldbridge_commands_executed_total",
        "fieldbridge_commands_failed_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "fieldbridge_build_info",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(family)),
            "{family} missing from /metrics:\n{body}"
        );
    }
    assert!(
        sample(
            &body,
            r#"fieldbridge_bus_failures_total{bus="line-b",kind="transport"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "the dead device's failures are counted by kind:\n{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("fieldbridge_build_info{")
                && l.contains(r#"mode="json",gateway="gw-obs"} 1"#)),
        "build info names the gateway:\n{body}"
    );

    // A real Prometheus scrapes it: the series exist and move.
    let prometheus = Prometheus::start(addr, None);
    assert!(
        wait_until(WAIT, || prometheus.value_of(r#"up{job="fieldbridge"}"#)
            == Some(1.0)),
        "Prometheus does not scrape the gateway"
    );
    let polls = r#"fieldbridge_device_polls_total{device="a"}"#;
    let mut first = None;
    assert!(
        wait_until(WAIT, || {
            first = prometheus.value_of(polls);
            first.is_some()
        }),
        "no {polls} in Prometheus"
    );
    assert!(
        wait_until(WAIT, || prometheus.value_of(polls) > first),
        "{polls} does not move in Prometheus"
    );
    assert!(
        wait_until(WAIT, || {
            prometheus.value_of(r#"fieldbridge_device_online{device="a"}"#) == Some(1.0)
                && prometheus.value_of(r#"fieldbridge_device_online{device="b"}"#) == Some(0.0)
        }),
        "device states not in Prometheus"
    );
    // Device a taken offline: Prometheus sees it go to 0.
    let mut a = a;
    a.stop();
    assert!(
        wait_until(Duration::from_secs(40), || {
            prometheus.value_of(r#"fieldbridge_device_online{device="a"}"#) == Some(0.0)
        }),
        "device a's going offline does not show in Prometheus"
    );
    assert_eq!(
        prometheus.value_of("fieldbridge_devices_online"),
        Some(0.0),
        "no device online any more"
    );
    let rate = prometheus.value_of(r#"rate(fieldbridge_bus_transactions_total{bus="line-a"}[5s])"#);
    assert!(rate.is_some(), "rate() over the transactions counter works");
}

#[test]
fn health_and_readiness_follow_the_watchdog_rule() {
    let broker = Mosquitto::start();
    let a = counting_device();
    let gateway = Gateway::start_with_env(
        &config(
            broker.port(),
            a.port(),
            free_port(),
            "{ listen: 127.0.0.1:0 }",
        ),
        // Debug builds only: bus line-a stops beating its heartbeat after its first poll.
        &[("FIELDBRIDGE_TEST_STALL_BUS", "line-a")],
    );
    let addr = endpoint(&gateway);
    assert!(
        wait_until(WAIT, || get(addr, "/readyz").0 == 200),
        "readyz never 200"
    );
    // The stall limit of line-a is a few seconds (a 1 s timeout, ticks, slack): 503 after it.
    let mut last = (0, String::new());
    assert!(
        wait_until(Duration::from_secs(40), || {
            last = get(addr, "/healthz");
            last.0 == 503
        }),
        "healthz never 503 for a stalled bus: {last:?}"
    );
    assert!(last.1.contains("bus line-a"), "{last:?}");
    let snapshot: serde_json::Value =
        serde_json::from_str(&get(addr, "/api/status").1).expect("status JSON");
    assert_eq!(snapshot["gateway"]["stalled"][0], "bus line-a");
}

/// `/healthz` of a gateway answers 200 `ok` all through 12 s, past every bus's stall limit
/// (1 s timeout x 2, ticks, slack: about 9 s); `edit` changes the test config.
fn healthy_throughout(edit: impl Fn(String) -> String) {
    let broker = Mosquitto::start();
    let a = counting_device();
    let yaml = config(
        broker.port(),
        a.port(),
        free_port(),
        "{ listen: 127.0.0.1:0 }",
    );
    let gateway = Gateway::start(&edit(yaml));
    let addr = endpoint(&gateway);
    assert!(wait_until(WAIT, || get(addr, "/readyz").0 == 200));
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let (status, body) = get(addr, "/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{}", gateway.logs());
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn health_is_ok_while_tasks_progress() {
    healthy_throughout(|yaml| yaml);
}

/// A bus polling once a minute sleeps between its polls (no wake-up a second to beat its
/// heartbeat): the watchdog's rule must still see it as alive, well past its stall limit.
#[test]
fn an_idle_bus_between_rare_polls_is_healthy() {
    healthy_throughout(|yaml| yaml.replace("interval: 200ms", "interval: 60s"));
}

#[test]
fn the_status_page_renders_in_a_real_browser() {
    install();
    let broker = Mosquitto::start();
    let a = counting_device();
    let gateway = Gateway::start(&config(
        broker.port(),
        a.port(),
        free_port(),
        "{ listen: 127.0.0.1:0 }",
    ));
    let addr = endpoint(&gateway);
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let root = env!("CARGO_MANIFEST_DIR");
    let child = Command::new("node")
        .arg(format!("{root}/tests/browser/page.js"))
        .arg(format!("http://{addr}/"))
        .arg(&shot)
        .args(["a", "counter", "b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node");
    let pid = child.id();
    // page.js bounds each of its waits; this bounds the whole (a hung browser fails the test).
    let watchdog = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                return;
            }
        }
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let out = child.wait_with_output().unwrap();
    let _ = watchdog.join();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the page did not render as expected: {seen}\n{}\ngateway:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.logs()
    );
    let png = std::fs::read(&shot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
    eprintln!("status page screenshot: {}", shot.display());
}

#[test]
fn credentials_and_bounds_are_enforced() {
    let broker = Mosquitto::start();
    let a = counting_device();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token-for-the-test\n").unwrap();

    // Off loopback without credentials: refused at `check`, with the key and a hint.
    let open = dir.path().join("open.yaml");
    std::fs::write(
        &open,
        config(broker.port(), a.port(), 1, "{ listen: 0.0.0.0:9105 }"),
    )
    .unwrap();
    let out = run_cli(&["check", "-c", open.to_str().unwrap()]);
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains("http.listen") && out.stderr.contains("token_file"),
        "{}",
        out.stderr
    );
    // With a token file it passes, and says so (never the token).
    let guarded = dir.path().join("guarded.yaml");
    std::fs::write(
        &guarded,
        config(
            broker.port(),
            a.port(),
            1,
            &format!(
                "{{ listen: 0.0.0.0:9105, token_file: {} }}",
                token.display()
            ),
        ),
    )
    .unwrap();
    let out = run_cli(&["check", "-c", guarded.to_str().unwrap()]);
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout.contains("bearer token required"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("s3cret"));

    // A running endpoint with a token (on loopback: the tests touch no other interface).
    let gateway = Gateway::start(&config(
        broker.port(),
        a.port(),
        free_port(),
        &format!(
            "{{ listen: 127.0.0.1:0, token_file: {}, max_connections: 2 }}",
            token.display()
        ),
    ));
    let addr = endpoint(&gateway);
    let (status, _) = get(addr, "/metrics");
    assert_eq!(status, 401, "no token");
    let (status, _) = request(
        addr,
        "GET /metrics HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n",
    );
    assert_eq!(status, 401, "wrong token");
    let (status, body) = request(
        addr,
        "GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret-token-for-the-test\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("fieldbridge_build_info"));
    assert!(!body.contains("s3cret"));
    // Read-only.
    let (status, _) = request(
        addr,
        "POST /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret-token-for-the-test\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 405);
    // A request head past 8 KiB is refused, not buffered.
    let big = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(request(addr, &big).0, 431);
    // Connections beyond max_connections get 503 while two idle ones hold the slots.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let mut busy = 0;
    assert!(
        wait_until(WAIT, || {
            busy = get(addr, "/healthz").0;
            busy == 503
        }),
        "a third connection is not refused: {busy}"
    );
    drop(idle);
    assert!(
        wait_until(WAIT, || request(
            addr,
            "GET /healthz HTTP/1.1\r\nAuthorization: Bearer s3cret-token-for-the-test\r\n\r\n"
        )
        .0 == 200),
        "slots freed after the idle connections close"
    );
    // The token never reaches the log.
    assert!(!gateway.logs().contains("s3cret"), "{}", gateway.logs());
}

#[test]
fn status_reads_the_running_gateways_snapshot() {
    let broker = Mosquitto::start();
    let a = counting_device();
    let mut gateway = Gateway::start(&config(
        broker.port(),
        a.port(),
        free_port(),
        "{ listen: 127.0.0.1:0 }",
    ));
    let addr = endpoint(&gateway);
    // `status` reads the config's listen address: give it the real port.
    let yaml = std::fs::read_to_string(gateway.config_path()).unwrap();
    let fixed = gateway.dir().join("status.yaml");
    std::fs::write(&fixed, yaml.replace("127.0.0.1:0", &addr.to_string())).unwrap();
    let mut out = None;
    assert!(
        wait_until(WAIT, || {
            let o = run_cli(&["status", "-c", fixed.to_str().unwrap()]);
            let done = o.stdout.contains("devices: 1/2 online") && o.stdout.contains("OFFLINE");
            out = Some(o);
            done
        }),
        "{out:?}"
    );
    let o = out.unwrap();
    assert!(o.stdout.contains("gateway gw-obs"), "{}", o.stdout);
    assert!(
        o.stdout.contains("mqtt: connected to 127.0.0.1:"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("last error"), "{}", o.stdout);
    // The same figures as the endpoint's snapshot.
    let snapshot: serde_json::Value =
        serde_json::from_str(&get(addr, "/api/status").1).expect("status JSON");
    assert_eq!(snapshot["devices"][1]["online"], false);
    assert_eq!(snapshot["devices"][0]["points"][1]["value"], 3.5);
    assert_eq!(snapshot["devices"][0]["points"][1]["unit"], "°C");
    // Stopped: `status` says so and falls back to the store file.
    gateway.terminate();
    let _ = gateway.wait_exit(WAIT);
    let o = run_cli(&["status", "-c", fixed.to_str().unwrap()]);
    assert!(o.stdout.contains("the gateway does not answer"), "{o:?}");
    assert!(o.stdout.contains("store:"), "{o:?}");
}
