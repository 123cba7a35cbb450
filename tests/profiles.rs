//! The shipped device profiles (`profiles/`): every one validates, `check` and `profiles`
//! show them, and the real gateway reads a test device laid out from each profile's declared
//! registers with every value exact.
//!
//! The test devices are built from the profile as validated (address, register kind, type,
//! word order): each point gets a distinct raw value, encoded into registers with the codec's
//! encode side, and the value the gateway must publish is that raw value with the profile's
//! scale. Two points that overlap would clobber each other's registers and come back wrong;
//! a point past the end of the address space would not validate.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{run_cli, DeviceState, Gateway, Mosquitto, MqttProbe, TcpDevice};
use fieldbridge::codec::{self, Raw};
use fieldbridge::config::profile::{self, Library, Origin};
use fieldbridge::model::{DataType, Device, Point, PointSource, RegisterKind, Value};

const WAIT: Duration = Duration::from_secs(30);

fn shipped_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("profiles")
}

fn shipped() -> Library {
    Library {
        dirs: vec![(shipped_dir(), Origin::Shipped)],
    }
}

fn names() -> Vec<String> {
    shipped().list().into_iter().map(|e| e.name).collect()
}

/// A distinct raw value for point `k` of a profile, chosen to exercise sign, word order and
/// the full width of the type; for a labelled point, its first label.
fn raw_for(p: &Point, k: usize) -> Raw {
    if let Some((&key, _)) = p.labels.iter().next() {
        return if key < 0 {
            Raw::I64(key)
        } else {
            Raw::U64(key as u64)
        };
    }
    let k = k as u64;
    match p.data_type {
        DataType::U16 => Raw::U64(1000 + 7 * k),
        DataType::I16 => Raw::I64(-(100 + k as i64)),
        DataType::U32 => Raw::U64(70_000 + 13 * k),
        DataType::I32 => Raw::I64(-70_000 - 13 * k as i64),
        DataType::U64 => Raw::U64(5_000_000_000 + k),
        DataType::I64 => Raw::I64(-5_000_000_000 - k as i64),
        // Exact in f32: quarters below 2^20.
        DataType::F32 | DataType::F64 => Raw::F64(100.25 + 1.5 * k as f64),
        DataType::Bool => Raw::Bool(k % 2 == 1),
        DataType::Bit(_) => Raw::Bool(true),
        DataType::Ascii(_) => Raw::Text(format!("P{k}")),
    }
}

/// The JSON `value` (and, for a labelled point, `raw`) the gateway must publish for `raw`.
fn expected(p: &Point, raw: &Raw) -> (serde_json::Value, Option<serde_json::Value>) {
    let value = codec::to_value(p, raw);
    let json = |v: &Value| match v {
        Value::Bool(b) => serde_json::json!(b),
        Value::Int(i) => serde_json::json!(i),
        Value::UInt(u) => serde_json::json!(u),
        Value::Float(f) => serde_json::json!(f),
        Value::Text(t) => serde_json::json!(t),
    };
    match codec::label(p, raw) {
        Some(l) => (serde_json::json!(l), Some(json(&value))),
        None => (json(&value), None),
    }
}

/// Writes every point of `device` into `state` under `unit`; returns topic-suffix → expected.
#[allow(clippy::type_complexity)]
fn load(
    state: &DeviceState,
    unit: u8,
    device: &Device,
) -> BTreeMap<String, (serde_json::Value, Option<serde_json::Value>)> {
    let mut out = BTreeMap::new();
    for (k, p) in device.points.iter().enumerate() {
        let raw = raw_for(p, k);
        match p.kind {
            RegisterKind::Coil | RegisterKind::DiscreteInput => {
                let on = matches!(raw, Raw::Bool(true));
                if p.kind == RegisterKind::Coil {
                    state.set_coils(unit, p.address, &[on]);
                } else {
                    state.set_discrete(unit, p.address, &[on]);
                }
            }
            RegisterKind::Holding | RegisterKind::Input => {
                let regs = codec::encode(p.data_type, p.order, &raw)
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", device.name, p.name));
                if p.kind == RegisterKind::Holding {
                    state.set_holding(unit, p.address, &regs);
                } else {
                    state.set_input(unit, p.address, &regs);
                }
            }
        }
        out.insert(p.name.clone(), expected(p, &raw));
    }
    out
}

#[test]
fn at_least_twenty_profiles_ship_and_each_names_its_document() {
    let names = names();
    assert!(names.len() >= 20, "{} profiles: {names:?}", names.len());
    for e in shipped().list() {
        let info = profile::info(&e.file).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(info.name, e.name);
        assert!(!info.document.trim().is_empty(), "{}", e.name);
        // Each file says where its map comes from and what disagreed.
        let text = std::fs::read_to_string(&e.file).unwrap();
        assert!(
            text.contains("Vendor document"),
            "{}: no vendor document comment",
            e.name
        );
        assert!(
            text.contains("Cross-check")
                || text.contains("ingle-sourced")
                || text.contains("UNVERIFIED"),
            "{}: no cross-check comment",
            e.name
        );
        assert!(
            (1..=60).contains(&info.points),
            "{}: {} points",
            e.name,
            info.points
        );
    }
}

#[test]
fn every_shipped_profile_validates_and_check_shows_the_expanded_devices() {
    let lib = shipped();
    for name in names() {
        let d = profile::expand(&lib, &name).unwrap_or_else(|e| panic!("{e}"));
        let prof = d.profile.as_ref().expect("profile recorded");
        assert!(prof.sources.iter().all(|s| *s == PointSource::Profile));
    }
    // One configuration with every profile, through the real `check`.
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from(
        "gateway: { id: gw }\nmqtt: { host: localhost }\nbuses:\n  - { name: b, type: tcp, host: 127.0.0.1, port: 502 }\ndevices:\n",
    );
    for (i, name) in names().iter().enumerate() {
        yaml.push_str(&format!(
            "  - {{ name: {name}, bus: b, unit: {}, profile: {name} }}\n",
            i + 1
        ));
    }
    // And one that changes, adds and drops points.
    yaml.push_str(&format!(
        "  - name: mine\n    bus: b\n    unit: {}\n    profile: eastron-sdm630\n    points_exclude: [voltage_thd_l1, voltage_thd_l2, voltage_thd_l3]\n    points:\n      - {{ name: frequency, publish: {{ mode: on_change }} }}\n      - {{ name: serial, register: holding, address: 64512, type: u32 }}\n",
        names().len() + 1
    ));
    let config = dir.path().join("fieldbridge.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = run_cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("profile eastron-sdm630 (")
            && out
                .stdout
                .contains("1 changed on the device, 1 of the device's own"),
        "{}",
        out.stdout
    );
    assert!(out
        .stdout
        .contains("excluded: voltage_thd_l1, voltage_thd_l2, voltage_thd_l3"));
    assert!(out.stdout.contains("[profile, changed on the device]"));
    assert!(out.stdout.contains("serial"));
}

#[test]
fn profiles_lists_them_and_show_prints_the_points() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fieldbridge.yaml");
    // A user's profile of the same name as a shipped one hides it.
    std::fs::create_dir(dir.path().join("profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles/eastron-sdm120.yaml"),
        "name: eastron-sdm120\nvendor: Mine\nmodel: Patched\ndocument: my notes\npoints:\n  - { name: voltage, register: input, address: 0, type: f32 }\n",
    )
    .unwrap();
    let out = run_cli(&["profiles", "--config", config.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("eastron-sdm120 "))
        .expect("listed");
    assert!(line.contains("Mine") && line.contains("user"), "{line}");
    assert!(out.stdout.contains("(hides "), "{}", out.stdout);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("eastron-sdm630 "))
        .expect("listed");
    assert!(
        line.contains("Eastron") && line.contains("shipped"),
        "{line}"
    );
    let show = run_cli(&[
        "profiles",
        "--config",
        config.to_str().unwrap(),
        "show",
        "carlo-gavazzi-em24",
    ]);
    assert_eq!(show.code, Some(0), "{}", show.stderr);
    assert!(
        show.stdout.contains("document: Carlo Gavazzi"),
        "{}",
        show.stdout
    );
    assert!(
        show.stdout
            .lines()
            .any(|l| l.contains("voltage_l1 ") && l.contains("CDAB") && l.contains("x0.1 V")),
        "{}",
        show.stdout
    );
    let missing = run_cli(&["profiles", "show", "no-such-meter"]);
    assert_eq!(missing.code, Some(2));
    assert!(missing
        .stderr
        .contains("no profile is named `no-such-meter`"));
}

/// One Modbus TCP endpoint with one unit per profile, read by the real gateway: every value
/// of every profile comes back exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reads_every_profile_exactly() {
    let lib = shipped();
    let names = names();
    let units: Vec<u8> = (1..=names.len() as u8).collect();
    let state = DeviceState::new(&units);
    let mut expect: BTreeMap<String, (serde_json::Value, Option<serde_json::Value>)> =
        BTreeMap::new();
    for (name, &unit) in names.iter().zip(&units) {
        let d = profile::expand(&lib, name).unwrap_or_else(|e| panic!("{e}"));
        for (point, v) in load(&state, unit, &d) {
            expect.insert(format!("plant/{name}/{point}"), v);
        }
    }
    assert!(expect.len() >= 400, "{} points", expect.len());
    let device = TcpDevice::start(state.clone());
    let broker = Mosquitto::start();
    let mut yaml = format!(
        "gateway: {{ id: gw, prefix: plant, clock: local }}\n\
         mqtt: {{ url: \"mqtt://127.0.0.1:{}\", reconnect: {{ min: 100ms, max: 400ms }} }}\n\
         buses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {} }}\ndevices:\n",
        broker.port(),
        device.port()
    );
    for (name, unit) in names.iter().zip(&units) {
        yaml.push_str(&format!(
            "  - {{ name: {name}, bus: b, unit: {unit}, profile: {name}, interval: 500ms }}\n"
        ));
    }
    let mut probe = MqttProbe::connect(broker.port(), "plant/#").await;
    let shipped = shipped_dir();
    let _gateway =
        Gateway::start_with_env(&yaml, &[(profile::PROFILES_ENV, shipped.to_str().unwrap())]);
    let deadline = Instant::now() + WAIT;
    let mut seen: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    while seen.len() < expect.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = probe.next(left).await else {
            let missing: Vec<&String> = expect.keys().filter(|k| !seen.contains_key(*k)).collect();
            panic!(
                "{} of {} points within {WAIT:?}; missing {missing:?}",
                seen.len(),
                expect.len()
            );
        };
        if expect.contains_key(&m.topic) {
            seen.insert(m.topic.clone(), m.json());
        }
    }
    let mut wrong = Vec::new();
    for (topic, (value, raw)) in &expect {
        let got = &seen[topic];
        if &got["value"] != value || raw.as_ref().is_some_and(|r| &got["raw"] != r) {
            wrong.push(format!(
                "{topic}: got {got}, want value {value} raw {raw:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
