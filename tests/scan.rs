//! `fieldbridge scan` against real devices: a Modbus TCP endpoint serving several unit ids, a
//! real RTU line (socat pty pair) with three slaves and a silent range, and a line held by a
//! running gateway. The ids found must be exactly the ones that answer, and the fragment the
//! scan prints must pass `fieldbridge check` as it is.

mod common;

use std::time::Duration;

use common::device::Kind;
use common::{free_port, run_cli, DeviceState, Gateway, PtyPair, RtuDevice, TcpDevice};

const WAIT: Duration = Duration::from_secs(20);

/// The unit ids of the scan's `devices:` fragment.
fn units_found(stdout: &str) -> Vec<u64> {
    let y: fieldbridge::config::yaml::Value = fieldbridge::config::yaml::from_str(stdout)
        .unwrap_or_else(|e| panic!("scan output is not YAML ({e}):\n{stdout}"));
    y["devices"]
        .as_sequence()
        .map(|s| {
            s.iter()
                .map(|d| d["unit"].as_u64().expect("unit"))
                .collect()
        })
        .unwrap_or_default()
}

/// The fragment completed with a gateway and a broker, as a user pastes it.
fn check_fragment(fragment: &str, buses: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    let yaml = format!(
        "gateway: {{id: scan-test}}\nmqtt: {{url: \"mqtt://127.0.0.1:{}\"}}\nstore: {{path: none}}\n{buses}{fragment}",
        free_port()
    );
    std::fs::write(&path, &yaml).expect("write config");
    let out = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert!(
        out.success(),
        "the scan's fragment does not check:\n{yaml}\n{}",
        out.stderr
    );
}

#[test]
fn tcp_scan_finds_exactly_the_answering_units_and_its_fragment_checks() {
    let state = DeviceState::new(&[1, 5, 17]);
    state.set_holding(1, 0, &[0x1234]);
    // Present, but with no register 0: an exception still counts.
    state.add_illegal(5, Kind::HoldingRegister, 0..=9);
    state.with_unit(17, |u| {
        u.identification = vec![
            (0, "Eastron Electronic".into()),
            (1, "SDM630".into()),
            (2, "1.02".into()),
        ];
    });
    let device = TcpDevice::start(state.clone());
    let host = format!("127.0.0.1:{}", device.port());
    let out = run_cli(&[
        "scan",
        "--host",
        &host,
        "--units",
        "1-20",
        "--timeout",
        "100ms",
        "-c",
        "/nonexistent/fieldbridge.yaml",
    ]);
    assert!(out.success(), "scan failed: {}\n{}", out.stderr, out.stdout);
    assert_eq!(units_found(&out.stdout), vec![1, 5, 17], "{}", out.stdout);
    assert!(out.stdout.contains("register 0 = 0x1234"), "{}", out.stdout);
    assert!(
        out.stdout.contains("ILLEGAL_DATA_ADDRESS (present)"),
        "{}",
        out.stdout
    );
    // Matched by what the device says it is (FC 43/14), against the profile's vendor/model.
    assert!(
        out.stdout.contains("profile: eastron-sdm630"),
        "{}",
        out.stdout
    );
    // Quiet when stderr is not a terminal: no progress line.
    assert!(!out.stderr.contains("ids tried"), "{}", out.stderr);
    // Every id was tried once (20 probes), plus the identification of the three found.
    let probes = state
        .requests()
        .iter()
        .filter(|r| r.fc == 3 && r.address == 0 && r.count == 1)
        .count();
    assert_eq!(probes, 20);
    check_fragment(&out.stdout, "");
}

#[test]
fn rtu_scan_finds_three_slaves_on_a_line_with_a_silent_range() {
    let pty = PtyPair::new();
    // Units 3, 9 and 12 answer; 1-2, 4-8, 10-11 and 13-16 are silent.
    let state = DeviceState::new(&[3, 9, 12]);
    state.add_illegal(9, Kind::HoldingRegister, 0..=0);
    let _slaves = RtuDevice::start(pty.b(), state.clone());
    let port = pty.a().to_str().unwrap().to_owned();
    let out = run_cli(&[
        "scan",
        "--port",
        &port,
        "--baud",
        "19200",
        "--units",
        "1-16",
        "--timeout",
        "60ms",
        "-c",
        "/nonexistent/fieldbridge.yaml",
    ]);
    assert!(out.success(), "scan failed: {}\n{}", out.stderr, out.stdout);
    assert_eq!(units_found(&out.stdout), vec![3, 9, 12], "{}", out.stdout);
    assert!(out.stdout.contains("    type: rtu\n"), "{}", out.stdout);
    assert!(out.stdout.contains("    baud: 19200\n"), "{}", out.stdout);
    check_fragment(&out.stdout, "");
}

#[test]
fn a_scan_of_a_bus_of_the_config_goes_on_that_bus() {
    let state = DeviceState::new(&[2]);
    let device = TcpDevice::start(state);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    let buses = format!(
        "buses:\n  - {{name: plc, type: tcp, host: 127.0.0.1, port: {}}}\n",
        device.port()
    );
    let yaml = format!(
        "gateway: {{id: scan-test}}\nmqtt: {{url: \"mqtt://127.0.0.1:{}\"}}\nstore: {{path: none}}\n{buses}devices:\n  - name: other\n    bus: plc\n    unit: 9\n    points: [{{name: x, address: 0, type: u16}}]\n",
        free_port()
    );
    std::fs::write(&config, yaml).expect("write config");
    let out = run_cli(&[
        "scan",
        "-c",
        config.to_str().unwrap(),
        "--bus",
        "plc",
        "--units",
        "1-3",
    ]);
    assert!(out.success(), "scan failed: {}\n{}", out.stderr, out.stdout);
    assert_eq!(units_found(&out.stdout), vec![2], "{}", out.stdout);
    assert!(out.stdout.contains("    bus: plc\n"), "{}", out.stdout);
    assert!(!out.stdout.contains("buses:"), "{}", out.stdout);
    check_fragment(&out.stdout, &buses);
}

#[test]
fn a_scan_is_refused_while_the_gateway_owns_the_port() {
    let pty = PtyPair::new();
    let state = DeviceState::new(&[1]);
    let slave = RtuDevice::start(pty.b(), state.clone());
    let port = pty.a().to_str().unwrap().to_owned();
    let _gateway = Gateway::start(&format!(
        "gateway: {{id: scan-owner}}\nmqtt: {{url: \"mqtt://127.0.0.1:{}\"}}\n\
         buses:\n  - {{name: line, type: rtu, port: \"{port}\", baud: 19200}}\n\
         devices:\n  - name: d\n    bus: line\n    unit: 1\n    interval: 100ms\n    points: [{{name: x, address: 0, type: u16}}]\n",
        free_port()
    ));
    // The gateway has the port open once its polls reach the slave.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(slave.state().wait_for_count(|r| r.unit == 1, 1, WAIT));
    let out = run_cli(&[
        "scan",
        "--port",
        &port,
        "--units",
        "1-2",
        "-c",
        "/nonexistent/x.yaml",
    ]);
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("is in use by another process"),
        "{}",
        out.stderr
    );
    // The scan did not take the line from the gateway: its polls go on.
    let before = state.requests().len();
    rt.block_on(
        slave
            .state()
            .wait_for_count(|r| r.unit == 1, before + 2, WAIT),
    );
}

/// A sweep tries every baud rate with every parity. A pty ignores line settings, so the slave
/// answers at all four: the fragment gets one bus per setting and still checks.
#[test]
fn a_serial_sweep_tries_every_setting_and_names_a_bus_for_each() {
    let pty = PtyPair::new();
    let _slave = RtuDevice::start(pty.b(), DeviceState::new(&[3]));
    let port = pty.a().to_str().unwrap().to_owned();
    let out = run_cli(&[
        "scan",
        "--port",
        &port,
        "--baud",
        "9600,19200",
        "--parity",
        "none,even",
        "--units",
        "2-4",
        "--timeout",
        "60ms",
        "-c",
        "/nonexistent/fieldbridge.yaml",
    ]);
    assert!(out.success(), "scan failed: {}\n{}", out.stderr, out.stdout);
    assert_eq!(units_found(&out.stdout), vec![3, 3, 3, 3], "{}", out.stdout);
    for bus in [
        "scan-9600-8n1",
        "scan-9600-8e1",
        "scan-19200-8n1",
        "scan-19200-8e1",
    ] {
        assert!(
            out.stdout.contains(&format!("  - name: {bus}\n")),
            "no bus {bus}:\n{}",
            out.stdout
        );
    }
    assert!(out.stdout.contains("12 request(s)"), "{}", out.stdout);
    check_fragment(&out.stdout, "");
}
