//! SunSpec discovery against an independent peer: a device built by pysunspec2 (the SunSpec
//! Alliance's Python implementation) from the Alliance's model definitions and served over
//! Modbus TCP by pymodbus (tests/sunspec/device.py), read by `fieldbridge sunspec` and by
//! pysunspec2's own client (tests/sunspec/client.py). Every point must agree: names, scale
//! factors applied, "not implemented" as no value. Also: the other two bases, a chain that never
//! ends and a length past the address space (bounded, refused with a reason, the models before
//! kept), and `fieldbridge scan` naming the SunSpec device.
//!
//! The peers are installed by scripts/install-sunspec (scripts/test runs it); a missing venv
//! fails the tests.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, kill_and_reap, port_accepts, run_cli, wait_until};
use serde_json::Value;

const START: Duration = Duration::from_secs(20);

fn python() -> PathBuf {
    let venv = std::env::var_os("FIELDBRIDGE_SUNSPEC_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/fieldbridge/sunspec")
        });
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/install-sunspec",
        py.display()
    );
    py
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sunspec")
        .join(name)
}

/// tests/sunspec/device.py on a free loopback port; killed (by PID) on drop.
struct SunSpecDevice {
    child: Child,
    port: u16,
}

impl SunSpecDevice {
    fn start(args: &[&str]) -> SunSpecDevice {
        let port = free_port();
        let mut child = Command::new(python())
            .arg(script("device.py"))
            .arg("--port")
            .arg(port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn device.py");
        let stdout = child.stdout.take().expect("stdout");
        // "ready" comes before the server binds: wait for both, bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx.recv_timeout(START).unwrap_or_default();
        let mut d = SunSpecDevice { child, port };
        if !ready.starts_with("ready") || !wait_until(START, || port_accepts(port)) {
            kill_and_reap(&mut d.child);
            panic!("device.py {args:?} did not start within {START:?} ({ready:?})");
        }
        d
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for SunSpecDevice {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

fn pysunspec2_reads(port: u16) -> serde_json::Map<String, Value> {
    let started = Instant::now();
    let out = Command::new(python())
        .arg(script("client.py"))
        .arg("--port")
        .arg(port.to_string())
        .output()
        .expect("run client.py");
    assert!(
        out.status.success() && started.elapsed() < Duration::from_secs(60),
        "client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("client.py JSON") {
        Value::Object(m) => m,
        other => panic!("client.py printed {other}"),
    }
}

fn fieldbridge_reads(host: &str) -> serde_json::Map<String, Value> {
    let out = run_cli(&["sunspec", "--host", host, "--json"]);
    assert!(out.success(), "fieldbridge sunspec: {}", out.stderr);
    match serde_json::from_str(&out.stdout).expect("fieldbridge sunspec --json") {
        Value::Object(m) => m,
        other => panic!("fieldbridge printed {other}"),
    }
}

fn agree(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(1.0)
        }
        _ => a == b,
    }
}

#[test]
fn fieldbridge_and_pysunspec2_agree_on_every_point() {
    let device = SunSpecDevice::start(&["--models", "1,103,160:2,203"]);
    let ours = fieldbridge_reads(&device.host());
    let theirs = pysunspec2_reads(device.port);
    let mut missing: Vec<&String> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    missing.sort();
    let mut extra: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "points only pysunspec2 has: {missing:?}; only fieldbridge: {extra:?}"
    );
    let differ: Vec<String> = theirs
        .iter()
        .filter(|(k, v)| !agree(v, &ours[*k]))
        .map(|(k, v)| format!("{k}: pysunspec2 {v}, fieldbridge {}", ours[k]))
        .collect();
    assert!(differ.is_empty(), "values differ:\n{}", differ.join("\n"));
    // The comparison covered what matters: modules by index, phases, sentinels, scaled values.
    for name in [
        "common_Mn",
        "inverter_three_phase_W",
        "mppt_module1_DCW",
        "mppt_module2_DCW",
        "ac_meter_abcn_WphC",
    ] {
        assert!(ours.contains_key(name), "no {name}");
    }
    assert!(
        ours.values().filter(|v| v.is_null()).count() >= 10,
        "too few not-implemented values to test the sentinels"
    );
    assert!(
        ours.values()
            .filter_map(Value::as_f64)
            .any(|v| v.fract() != 0.0),
        "no scale factor below 0 was applied"
    );
}

#[test]
fn the_marker_is_found_at_0_and_at_50000() {
    for base in ["0", "50000"] {
        let device = SunSpecDevice::start(&["--base", base, "--models", "1,101,201"]);
        let out = run_cli(&["sunspec", "--host", &device.host()]);
        assert!(out.success(), "{}", out.stderr);
        let first = out.stdout.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            format!(
                "SunSpec at {base}: 1 common (L 66), 101 inverter_single_phase (L 50), 201 ac_meter_an_or_ab (L 105)"
            )
        );
        assert!(out.stdout.contains("common_Mn"), "{}", out.stdout);
    }
}

#[test]
fn a_chain_without_end_or_with_a_bad_length_is_cut_with_a_reason() {
    let endless = SunSpecDevice::start(&["--models", "1,103", "--fault", "loop"]);
    let out = run_cli(&["sunspec", "--host", &endless.host()]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("model chain cut short: more than 64 models"),
        "{}",
        out.stderr
    );
    // The models before the break are still read.
    assert!(
        out.stdout.contains("inverter_three_phase_W "),
        "{}",
        out.stdout
    );

    let bad = SunSpecDevice::start(&["--models", "1,103", "--fault", "length"]);
    let out = run_cli(&["sunspec", "--host", &bad.host()]);
    assert!(out.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("runs past the address space"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("common_Mn"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("inverter_three_phase_W "),
        "{}",
        out.stdout
    );
}

#[test]
fn scan_names_the_sunspec_device_and_its_models() {
    let device = SunSpecDevice::start(&["--models", "1,103,160:2", "--unit", "3"]);
    let out = run_cli(&[
        "scan",
        "--host",
        &device.host(),
        "--units",
        "1-4",
        "-c",
        "/nonexistent/x.yaml",
    ]);
    assert!(out.success(), "{}", out.stderr);
    let y: serde_yaml::Value = serde_yaml::from_str(&out.stdout).expect("YAML");
    let units: Vec<u64> = y["devices"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|d| d["unit"].as_u64().unwrap())
        .collect();
    assert_eq!(units, vec![3], "{}", out.stdout);
    assert!(
        out.stdout.contains("SunSpec at 40000: Mn1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("models 1 common (L 66), 103 inverter_three_phase (L 50), 160 mppt (L 48)"),
        "{}",
        out.stdout
    );
}

#[test]
fn the_model_table_is_what_the_generator_makes_of_pysunspec2s_definitions() {
    let out = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/sunspec-models"))
        .arg("--check")
        .output()
        .expect("run scripts/sunspec-models");
    assert!(
        out.status.success(),
        "src/sunspec/models.rs is stale: run scripts/sunspec-models\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
