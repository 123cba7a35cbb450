//! Configuration loading through the public API: the shipped configs load, and each kind of
//! mistake is reported with its path, line and a useful message.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use fieldbridge::config::{self, ConfigError, ConfigErrors};
use fieldbridge::model::{
    BusKind, DataType, MessageMode, MqttProtocol, MqttTransport, Parity, PayloadFormat,
    PublishPolicy, Qos, RegisterKind, WordOrder,
};

fn errors(text: &str) -> Vec<ConfigError> {
    match config::parse(text, "test.yaml") {
        Ok(_) => panic!("expected errors, the config loaded"),
        Err(e) => e.errors,
    }
}

/// The single error of `text`, which must be the only one.
fn one_error(text: &str) -> ConfigError {
    let mut errs = errors(text);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    errs.remove(0)
}

const HEAD: &str = "\
gateway:
  id: gw
mqtt:
  url: mqtt://localhost
buses:
  - name: bus1
    type: rtu
    port: /dev/ttyUSB0
devices:
  - name: dev
    bus: bus1
    unit: 1
    points:
";
// HEAD has 13 lines; the first point line is line 14.

fn with_points(points: &str) -> String {
    format!("{HEAD}{points}")
}

#[test]
fn reference_config_loads() {
    let c = config::load("config/fieldbridge.yaml".as_ref()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.gateway.prefix, "plant/hall3");
    assert_eq!(c.mqtt.status_topic, "plant/hall3/status");
    assert_eq!(c.buses.len(), 3);
    assert_eq!(c.devices.len(), 5);
    // inverter-1: `sunspec: auto`, nothing discovered yet, so no points until the bus runs.
    let inverter = &c.devices[4];
    assert_eq!(inverter.name, "inverter-1");
    assert!(inverter.sunspec.as_ref().is_some_and(|s| s.found.is_none()));
    assert!(inverter.points.is_empty());
    // meter-4: the eastron-sdm630 profile, three points excluded, one changed, one added.
    let profiled = c.devices[3]
        .profile
        .as_ref()
        .expect("meter-4 uses a profile");
    assert_eq!(profiled.name, "eastron-sdm630");
    assert_eq!(profiled.excluded.len(), 3);
    assert_eq!(c.devices[3].points.len(), 42);
    let meter = &c.devices[0];
    assert_eq!(meter.groups[0].name, "default");
    assert_eq!(meter.groups[1].name, "fast");
    assert_eq!(meter.groups[1].interval, Duration::from_millis(200));
    assert_eq!(meter.points[3].data_type, DataType::Ascii(4));
    assert_eq!(meter.points[2].address, 0x156);
    assert_eq!(meter.points[2].publish, PublishPolicy::EveryPoll);
    assert_eq!(
        meter.points[1].publish,
        PublishPolicy::OnChange {
            deadband: 0.05,
            heartbeat: Some(Duration::from_secs(60))
        }
    );
    assert_eq!(c.devices[2].message_mode, MessageMode::PerDevice);
    assert_eq!(c.devices[2].topic, "plant/hall3/drive-1");
    assert_eq!(c.buses[2].frame_gap, Duration::from_millis(2));
    assert_eq!(c.buses[1].frame_gap, Duration::ZERO);
}

#[test]
fn energy_meter_example_loads() {
    let c = config::load("config/examples/energy-meters-rs485.yaml".as_ref())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.devices.len(), 4);
    let units: Vec<u8> = c.devices.iter().map(|d| d.unit).collect();
    assert_eq!(units, [1, 2, 3, 1]);
    // The meters' points come from the eastron-sdm630 profile.
    let point = |d: usize, name: &str| {
        c.devices[d]
            .points
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .clone()
    };
    assert_eq!(
        point(1, "import_active_energy").topic,
        "plant/hall3/meter-2/import_active_energy"
    );
    assert_eq!(point(2, "frequency").address, 0x46);
    assert!(c.devices[..3].iter().all(|d| d
        .profile
        .as_ref()
        .is_some_and(|p| p.name == "eastron-sdm630")));
    assert!(c.devices[0]
        .points
        .iter()
        .all(|p| p.kind == RegisterKind::Input));
    let BusKind::Rtu(serial) = &c.buses[0].kind else {
        panic!("rtu expected")
    };
    assert_eq!((serial.baud, serial.parity), (9600, Parity::None));
    assert_eq!(c.buses[0].frame_gap, config::frame_gap_for_baud(9600));
}

#[test]
fn plc_example_loads() {
    let c = config::load("config/examples/plc-tcp.yaml".as_ref()).unwrap_or_else(|e| panic!("{e}"));
    let plc = &c.devices[0];
    assert_eq!(plc.groups[1].interval, Duration::from_millis(250));
    let setpoint = plc
        .points
        .iter()
        .find(|p| p.name == "tank_setpoint")
        .unwrap();
    assert!(setpoint.writable);
    assert_eq!((setpoint.min, setpoint.max), (Some(0.0), Some(95.0)));
    assert_eq!(setpoint.order, WordOrder::Cdab);
    let pump = plc.points.iter().find(|p| p.name == "pump_1").unwrap();
    assert_eq!(
        (pump.kind, pump.data_type),
        (RegisterKind::Coil, DataType::Bool)
    );
    assert_eq!(pump.labels.get(&1).map(String::as_str), Some("on"));
    let alarm = plc.points.iter().find(|p| p.name == "alarm").unwrap();
    assert_eq!(alarm.data_type, DataType::Bit(1));
    assert_eq!(alarm.topic, "site1/plc-1/alarm");
    assert_eq!(c.mqtt.keep_alive, Duration::from_secs(15));
}

#[test]
fn defaults_are_filled_in() {
    let c = config::parse(&with_points("      - { name: p, address: 0 }\n"), "t.yaml").unwrap();
    assert_eq!(c.gateway.prefix, "gw");
    assert_eq!(c.gateway.log_level, "info");
    let m = &c.mqtt;
    assert_eq!(
        (m.transport, m.host.as_str(), m.port),
        (MqttTransport::Tcp, "localhost", 1883)
    );
    assert_eq!(m.client_id, "gw");
    assert_eq!(m.keep_alive, Duration::from_secs(30));
    assert_eq!(
        (m.max_packet_size, m.queue_capacity, m.inflight),
        (262_144, 100_000, 100)
    );
    assert_eq!(
        (m.reconnect_min, m.reconnect_max),
        (Duration::from_millis(100), Duration::from_secs(1))
    );
    assert_eq!(m.status_topic, "gw/status");
    let d = &c.devices[0];
    assert_eq!(d.groups.len(), 1);
    assert_eq!(d.groups[0].interval, Duration::from_secs(1));
    assert_eq!(d.timeout, Duration::from_secs(1));
    assert_eq!(
        (d.offline_after, d.max_gap, d.max_registers, d.max_bits),
        (3, 10, 125, 2000)
    );
    assert_eq!(d.topic, "gw/dev");
    assert_eq!(d.status_topic, "gw/dev/status");
    let p = &d.points[0];
    assert_eq!(
        (p.kind, p.data_type, p.order),
        (RegisterKind::Holding, DataType::U16, WordOrder::Abcd)
    );
    assert_eq!(
        (p.scale, p.offset, p.qos, p.retain),
        (1.0, 0.0, Qos::AtLeastOnce, false)
    );
    assert_eq!(
        (p.payload, p.publish),
        (PayloadFormat::Json, PublishPolicy::EveryPoll)
    );
    assert_eq!(p.topic, "gw/dev/p");
    assert_eq!(c.buses[0].frame_gap, config::frame_gap_for_baud(9600));
}

#[test]
fn address_past_65535_names_path_line_and_the_40001_convention() {
    let e = one_error(&with_points(
        "      - name: a\n        address: 0\n      - name: b\n        address: 70000\n",
    ));
    assert_eq!(e.path, "devices[0].points[1].address");
    assert_eq!((e.line, e.column), (Some(17), Some(18)));
    assert_eq!(e.message, "70000 is outside 0..=65535");
    assert!(e.hint.unwrap().contains("subtract 40001"));
}

#[test]
fn modicon_style_address_gets_the_converted_number() {
    let e = one_error(&with_points("      - { name: a, address: 400101 }\n"));
    assert!(e.hint.unwrap().contains("400101 → 100"));
}

#[test]
fn unknown_key_names_the_key_its_line_and_a_suggestion() {
    let e = one_error(&with_points("      - name: a\n        adress: 3\n"));
    assert_eq!(e.path, "devices[0].points[0].adress");
    assert_eq!(e.line, Some(15));
    assert_eq!(e.message, "unknown key `adress`");
    let hint = e.hint.unwrap();
    assert!(hint.starts_with("did you mean `address`?"), "{hint}");
    assert!(
        hint.contains("expected one of: name, register, address"),
        "{hint}"
    );
}

#[test]
fn missing_required_key_is_named() {
    let e = one_error(&with_points("      - name: a\n"));
    assert_eq!(e.path, "devices[0].points[0].address");
    assert_eq!(e.message, "required key `address` is missing");
    assert_eq!(e.line, Some(14));
}

#[test]
fn every_error_of_a_file_is_reported_in_line_order() {
    let text = with_points(concat!(
        "      - name: a\n",
        "        address: 70000\n",
        "      - name: b\n",
        "        address: 1\n",
        "        type: float\n",
        "      - name: c\n",
        "        address: 2\n",
        "        qos: 3\n",
        "        publish: { mode: on_change, heartbeat: 5 sec }\n",
    ));
    let errs = errors(&text);
    let got: Vec<(&str, Option<usize>, &str)> = errs
        .iter()
        .map(|e| (e.path.as_str(), e.line, e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "devices[0].points[0].address",
                Some(15),
                "70000 is outside 0..=65535"
            ),
            (
                "devices[0].points[1].type",
                Some(18),
                "`float` is not one of bool, bit, u16, i16, u32, i32, u64, i64, f32, f64, string"
            ),
            (
                "devices[0].points[2].qos",
                Some(21),
                "3 is not one of 0, 1, 2"
            ),
            (
                "devices[0].points[2].publish.heartbeat",
                Some(22),
                "`5 sec` is not a duration"
            ),
        ]
    );
    assert_eq!(
        errs[3].hint.as_deref(),
        Some("use a number and a unit without spaces: 500ms, 1s, 2m")
    );
}

#[test]
fn display_has_a_count_then_one_line_per_error() {
    let e = config::parse(
        &with_points("      - { name: a, address: 1, bit: 3 }\n      - { name: a, address: 2 }\n"),
        "site.yaml",
    )
    .unwrap_err();
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "site.yaml: 2 errors");
    assert_eq!(
        lines[1],
        "site.yaml:14:37: devices[0].points[0].bit: `bit` applies only to type bit, not u16"
    );
    assert_eq!(
        lines[2],
        "site.yaml:15:17: devices[0].points[1].name: point name `a` is already used by points[0] of this device (hint: point names must be unique within a device)"
    );
    let _: &dyn std::error::Error = &e;
}

fn msg_of(points: &str) -> String {
    one_error(&with_points(points)).message
}

#[test]
fn register_kind_and_type_must_agree() {
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: bool }\n"),
        "type `bool` cannot be read from a holding register"
    );
    assert_eq!(
        msg_of("      - { name: a, register: coil, address: 0, type: u16 }\n"),
        "type `u16` cannot be read from a coil"
    );
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: bit }\n"),
        "type bit needs `bit`"
    );
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: string }\n"),
        "type string needs `length`"
    );
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: bit, bit: 16 }\n"),
        "16 is outside 0..=15"
    );
    assert_eq!(
        msg_of("      - { name: a, register: input, address: 0, writable: true }\n"),
        "input registers are read-only"
    );
}

#[test]
fn overlapping_points_are_refused_except_bits() {
    let e = one_error(&with_points(
        "      - { name: a, address: 10, type: f32 }\n      - { name: b, address: 11 }\n",
    ));
    assert_eq!(e.path, "devices[0].points[1].address");
    assert_eq!(e.line, Some(15));
    assert_eq!(e.message, "holding register 11 overlap point `a` (10..=11)");
    // bits with each other and with the u16 of their register: fine
    config::parse(
        &with_points(
            "      - { name: w, address: 10 }\n      - { name: b0, address: 10, type: bit, bit: 0 }\n      - { name: b1, address: 10, type: bit, bit: 1 }\n",
        ),
        "t",
    )
    .unwrap();
    // the same bit twice is not
    assert_eq!(
        msg_of("      - { name: b0, address: 10, type: bit, bit: 0 }\n      - { name: b1, address: 10, type: bit, bit: 0 }\n"),
        "bit 0 of holding register 10 is already point `b0`"
    );
    // a bit inside a u32 is not
    assert!(msg_of("      - { name: w, address: 10, type: u32 }\n      - { name: b, address: 11, type: bit, bit: 0 }\n")
        .contains("overlap point `w`"));
    // same address, different kinds: fine
    config::parse(
        &with_points(
            "      - { name: a, address: 0 }\n      - { name: b, register: input, address: 0 }\n",
        ),
        "t",
    )
    .unwrap();
}

#[test]
fn a_value_running_past_65535_is_refused() {
    assert_eq!(
        msg_of("      - { name: a, address: 65534, type: f64 }\n"),
        "f64 at 65534 occupies registers 65534..=65537, past 65535"
    );
}

#[test]
fn eight_byte_orders_only_for_64_bit_types() {
    let c = config::parse(
        &with_points("      - { name: a, address: 0, type: f64, order: GHEFCDAB }\n"),
        "t",
    )
    .unwrap();
    assert_eq!(c.devices[0].points[0].order, WordOrder::Cdab);
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: f32, order: GHEFCDAB }\n"),
        "`GHEFCDAB` is an 8-byte order, but f32 is not a 64-bit type"
    );
    // meaningless but harmless
    config::parse(
        &with_points("      - { name: a, address: 0, order: CDAB }\n"),
        "t",
    )
    .unwrap();
}

#[test]
fn durations_must_have_a_unit_and_intervals_a_minimum() {
    let text = HEAD.replace(
        "    unit: 1\n",
        "    unit: 1\n    interval: 0s\n    timeout: 5\n",
    ) + "      - { name: a, address: 0 }\n";
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!(errs[0].message, "0ms is shorter than the minimum 10ms");
    assert_eq!(errs[0].line, Some(13));
    assert_eq!(errs[1].message, "`5` has no unit");
    assert!(errs[1].hint.as_deref().unwrap().contains("`5s`"));
}

#[test]
fn enums_list_their_allowed_values() {
    let text = HEAD.replace(
        "    port: /dev/ttyUSB0\n",
        "    port: /dev/ttyUSB0\n    parity: x\n",
    ) + "      - { name: a, address: 0 }\n";
    let e = one_error(&text);
    assert_eq!(e.path, "buses[0].parity");
    assert_eq!(e.message, "`x` is not one of none, even, odd");
    assert_eq!(e.line, Some(9));
}

#[test]
fn mqtt_protocol_is_3_1_1_by_default_5_on_request_and_nothing_else() {
    let point = "      - { name: a, address: 0 }\n";
    let c = config::parse(&with_points(point), "t.yaml").unwrap();
    assert_eq!(c.mqtt.protocol, MqttProtocol::V311);
    for (given, want) in [("5", MqttProtocol::V5), ("\"3.1.1\"", MqttProtocol::V311)] {
        let text = HEAD.replace("mqtt:\n", &format!("mqtt:\n  protocol: {given}\n")) + point;
        let c = config::parse(&text, "t.yaml").unwrap();
        assert_eq!(c.mqtt.protocol, want, "{given}");
    }
    let text = HEAD.replace("mqtt:\n", "mqtt:\n  protocol: 3.1\n") + point;
    let e = one_error(&text);
    assert_eq!(e.path, "mqtt.protocol");
    assert_eq!(e.message, "`3.1` is not one of 3.1.1, 5");
    assert_eq!(e.line, Some(4));
}

#[test]
fn frame_gap_below_3_5_characters_is_refused_with_the_minimum() {
    let text = HEAD.replace(
        "    port: /dev/ttyUSB0\n",
        "    port: /dev/ttyUSB0\n    frame_gap: 1ms\n",
    ) + "      - { name: a, address: 0 }\n";
    let e = one_error(&text);
    assert_eq!(e.message, "1ms is shorter than 3.5 characters at 9600 baud");
    assert!(e.hint.unwrap().contains("at least 4011us"));
    let text = HEAD.replace(
        "    port: /dev/ttyUSB0\n",
        "    port: /dev/ttyUSB0\n    frame_gap: 5ms\n",
    ) + "      - { name: a, address: 0 }\n";
    let c = config::parse(&text, "t").unwrap();
    assert_eq!(c.buses[0].frame_gap, Duration::from_millis(5));
}

#[test]
fn references_and_duplicates_are_checked() {
    let text = "\
gateway: { id: gw }
mqtt: { url: 'mqtt://localhost' }
buses:
  - { name: b, type: rtu, port: /dev/ttyUSB0 }
  - { name: b, type: tcp, host: 10.0.0.1 }
devices:
  - { name: d, bus: b, unit: 1, points: [ { name: p, address: 0 } ] }
  - { name: d, bus: b, unit: 1, points: [ { name: p, address: 0 } ] }
  - { name: e, bus: nope, unit: 0, points: [ { name: p, address: 0 } ] }
  - { name: f, bus: b, points: [ { name: p, address: 0 } ] }
";
    let got: Vec<(String, String)> = errors(text)
        .into_iter()
        .map(|e| (e.path, e.message))
        .collect();
    let expect = [
        ("buses[1].name", "bus name `b` is already used by buses[0]"),
        (
            "devices[1].name",
            "device name `d` is already used by devices[0]",
        ),
        (
            "devices[1].unit",
            "unit 1 on bus `b` is already used by device `d`",
        ),
        ("devices[2].bus", "no bus is named `nope`"),
        (
            "devices[2].unit",
            "unit 0 is the broadcast address, which never answers",
        ),
        ("devices[3]", "a device on an rtu bus needs `unit`"),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for (path, msg) in expect {
        assert!(
            got.iter().any(|(p, m)| p == path && m == msg),
            "missing {path}: {msg} in {got:#?}"
        );
    }
}

#[test]
fn point_topics_may_not_collide_with_status_topics() {
    let e = one_error(&with_points("      - { name: status, address: 0 }\n"));
    assert_eq!(e.path, "devices[0].points[0].name");
    assert_eq!(
        e.message,
        "topic `gw/dev/status` of point `status` of device `dev` is already used by the status topic of device `dev` (devices[0].name)"
    );
    let e = one_error(&with_points(
        "      - { name: a, address: 0, topic: \"{prefix}/status\" }\n",
    ));
    assert!(
        e.message.contains("the gateway status topic"),
        "{}",
        e.message
    );
    assert_eq!(e.path, "devices[0].points[0].topic");
}

#[test]
fn topic_templates_are_checked() {
    assert_eq!(
        msg_of("      - { name: a, address: 0, topic: \"{prefix}/{dev}\" }\n"),
        "unknown placeholder `{dev}`"
    );
    assert!(
        msg_of("      - { name: a, address: 0, topic: \"{prefix}/+/x\" }\n")
            .contains("contains `+`")
    );
    assert!(
        msg_of("      - { name: a, address: 0, topic: \"{prefix}//x\" }\n").contains("empty level")
    );
    assert!(msg_of("      - { name: 'a b', address: 0 }\n").contains("whitespace"));
    assert!(msg_of("      - { name: a/b, address: 0 }\n").contains("`/`"));
}

#[test]
fn labels_need_integer_keys_in_range_for_integer_types() {
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: f32, labels: { 0: x } }\n"),
        "`labels` apply only to integer and bool types, not f32"
    );
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: i16, labels: { 40000: x } }\n"),
        "label key 40000 is outside -32768..=32767 for i16"
    );
    let e = one_error(&with_points(
        "      - { name: a, address: 0, labels: { 1: x, 1: y } }\n",
    ));
    assert!(e.message.contains("duplicate entry"), "{}", e.message);
}

#[test]
fn min_greater_than_max_is_refused() {
    assert_eq!(
        msg_of("      - { name: a, address: 0, writable: true, min: 10, max: 1 }\n"),
        "min 10 is greater than max 1"
    );
}

#[test]
fn unknown_group_lists_the_groups() {
    let e = one_error(&with_points(
        "      - { name: a, address: 0, group: fast }\n",
    ));
    assert_eq!(e.message, "the device has no group `fast`");
    assert!(e
        .hint
        .unwrap()
        .starts_with("groups of this device: default"));
}

const MQTT_ONLY: &str = "\
gateway: { id: gw }
buses: [ { name: b, type: tcp, host: 10.0.0.1 } ]
devices: [ { name: d, bus: b, points: [ { name: p, address: 0 } ] } ]
mqtt:
";

#[test]
fn inline_password_needs_consent_and_is_never_printed() {
    let text =
        format!("{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password: hunter2-secret\n");
    let e = config::parse(&text, "t").unwrap_err();
    assert_eq!(e.errors.len(), 1);
    assert_eq!(e.errors[0].message, "an inline password is refused");
    assert_eq!(e.errors[0].line, Some(7));
    assert!(e.errors[0]
        .hint
        .as_deref()
        .unwrap()
        .contains("password_file"));
    assert!(!format!("{e}{e:?}").contains("hunter2"));

    let text = format!("{text}  allow_inline_password: true\n");
    let c = config::parse(&text, "t").unwrap();
    assert_eq!(c.mqtt.password.as_ref().unwrap().0, "hunter2-secret");
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn password_file_is_read_and_trimmed_and_its_absence_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mqtt.pass");
    std::fs::write(&file, "hunter2-secret\n").unwrap();
    let text = format!(
        "{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password_file: {}\n",
        file.display()
    );
    let c = config::parse(&text, "t").unwrap();
    assert_eq!(c.mqtt.password.as_ref().unwrap().0, "hunter2-secret");
    assert!(!format!("{c:?}").contains("hunter2"));

    let missing = dir.path().join("nope.pass");
    let text = format!(
        "{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password_file: {}\n",
        missing.display()
    );
    let e = one_error(&text);
    assert_eq!(e.path, "mqtt.password_file");
    assert!(
        e.message
            .starts_with(&format!("cannot read `{}`", missing.display())),
        "{}",
        e.message
    );
}

#[test]
fn password_env_must_be_set() {
    let text = format!("{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password_env: FIELDBRIDGE_TEST_SURELY_UNSET\n");
    assert_eq!(
        one_error(&text).message,
        "environment variable `FIELDBRIDGE_TEST_SURELY_UNSET` is not set"
    );
    std::env::set_var("FIELDBRIDGE_TEST_PW_SET", "hunter2-secret");
    let text = format!("{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password_env: FIELDBRIDGE_TEST_PW_SET\n");
    let c = config::parse(&text, "t").unwrap();
    assert_eq!(c.mqtt.password.unwrap().0, "hunter2-secret");
}

#[test]
fn tls_urls_need_existing_ca_files() {
    let text = format!("{MQTT_ONLY}  url: mqtts://broker.example.com\n");
    assert_eq!(one_error(&text).message, "TLS needs `tls.ca`");
    let text = format!("{MQTT_ONLY}  url: mqtts://broker.example.com\n  tls: {{ ca: /nonexistent/ca.pem, client_cert: /nonexistent/c.pem }}\n");
    let errs: Vec<String> = errors(&text).into_iter().map(|e| e.message).collect();
    assert!(
        errs.contains(&"`/nonexistent/ca.pem` does not exist or is not a file".to_string()),
        "{errs:?}"
    );
    assert!(
        errs.contains(&"client_cert and client_key go together".to_string()),
        "{errs:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    let text = format!(
        "{MQTT_ONLY}  url: wss://broker.example.com\n  tls: {{ ca: {} }}\n",
        ca.display()
    );
    let c = config::parse(&text, "t").unwrap();
    assert_eq!(
        (c.mqtt.transport, c.mqtt.port, c.mqtt.ws_path.as_str()),
        (MqttTransport::Wss, 443, "/mqtt")
    );
    assert_eq!(c.mqtt.tls.unwrap().ca, ca);
}

#[test]
fn mqtt_limits_are_enforced() {
    let text = format!(
        "{MQTT_ONLY}  host: b\n  transport: tcp\n  keep_alive: 2s\n  inflight: 0\n  reconnect: {{ min: 2s, max: 1s }}\n  max_packet_size: 10\n"
    );
    let msgs: Vec<String> = errors(&text).into_iter().map(|e| e.message).collect();
    assert_eq!(
        msgs,
        [
            "2s is shorter than the minimum 5s",
            "0 is outside 1..=65535",
            "reconnect.min 2s is longer than reconnect.max 1s",
            "10 is outside 1024..=16777216",
        ]
    );
    let text = format!("{MQTT_ONLY}  url: mqtt://b\n  host: c\n");
    assert!(one_error(&text).message.contains("cannot be combined"));
}

#[test]
fn wrong_yaml_types_are_reported_with_a_line() {
    let e = one_error(&with_points("      - { name: a, address: zero }\n"));
    assert_eq!(e.path, "devices[0].points[0].address");
    assert_eq!(e.line, Some(14));
    assert!(e.message.contains("expected an integer"), "{}", e.message);
    let e = one_error(&with_points(
        "      - { name: a, address: 0, writable: yes }\n",
    ));
    assert!(e.hint.unwrap().contains("true and false"));
}

#[test]
fn yaml_syntax_errors_have_a_line() {
    let e = one_error("gateway:\n  id: [unclosed\nmqtt: {}\n");
    assert!(e.line.is_some(), "{e:?}");
}

#[test]
fn load_names_a_missing_file() {
    let e: ConfigErrors = config::load("/nonexistent/fieldbridge.yaml".as_ref()).unwrap_err();
    assert_eq!(e.file, "/nonexistent/fieldbridge.yaml");
    assert!(e.errors[0].message.starts_with("cannot read the file"));
}

#[test]
fn log_level_typos_are_refused() {
    let text = HEAD.replace("  id: gw\n", "  id: gw\n  log_level: verbose\n")
        + "      - { name: a, address: 0 }\n";
    let e = one_error(&text);
    assert_eq!((e.path.as_str(), e.line), ("gateway.log_level", Some(3)));
    assert_eq!(e.message, "`verbose` is not a level");
    let text = HEAD.replace(
        "  id: gw\n",
        "  id: gw\n  log_level: info,fieldbridge::modbus=debug\n",
    ) + "      - { name: a, address: 0 }\n";
    config::parse(&text, "t").unwrap();
}

#[test]
fn device_deadband_is_not_inherited_by_bool_and_string_points() {
    let text = HEAD.replace("    unit: 1\n", "    unit: 1\n    publish: { mode: on_change, deadband: 2 }\n")
        + "      - { name: a, address: 0, type: string, length: 2 }\n      - { name: b, register: coil, address: 0 }\n      - { name: c, address: 5 }\n";
    let c = config::parse(&text, "t").unwrap();
    let p = &c.devices[0].points;
    let on_change = |deadband| PublishPolicy::OnChange {
        deadband,
        heartbeat: None,
    };
    assert_eq!(
        [p[0].publish, p[1].publish, p[2].publish],
        [on_change(0.0), on_change(0.0), on_change(2.0)]
    );
    assert_eq!(
        msg_of("      - { name: a, address: 0, type: string, length: 2, publish: { mode: on_change, deadband: 1 } }\n"),
        "a deadband needs a numeric type, not string"
    );
}

// ---------------------------------------------------------------------------------------------
// Limits and bounds (issue 10): nothing in the file can stall a task past the watchdog,
// overflow a wire field or exhaust memory.

/// HEAD on a given bus and device setting, with one point.
fn bus_and_device(bus_line: &str, device_line: &str) -> String {
    HEAD.replace(
        "    port: /dev/ttyUSB0\n",
        &format!("    port: /dev/ttyUSB0\n{bus_line}"),
    )
    .replace("    unit: 1\n", &format!("    unit: 1\n{device_line}"))
        + "      - { name: a, address: 0 }\n"
}

#[test]
fn frame_gap_above_one_second_is_refused() {
    // The 3.5-character gap at 1200 baud is about 32 ms: a second is far above any real line.
    let e = one_error(&bus_and_device("    frame_gap: 2s\n", ""));
    assert_eq!(e.path, "buses[0].frame_gap");
    assert_eq!(e.line, Some(9));
    assert_eq!(e.message, "2s is longer than the maximum 1s");
    assert!(e.hint.as_deref().unwrap().contains("watchdog"), "{e:?}");
    config::parse(&bus_and_device("    frame_gap: 1s\n", ""), "t").unwrap();
    // rtu_over_tcp takes the gap the user gives: bounded the same way.
    let text = "gateway: { id: gw }\nmqtt: { url: 'mqtt://localhost' }\nbuses: [ { name: b, type: rtu_over_tcp, host: 10.0.0.1, frame_gap: 1h } ]\ndevices: [ { name: d, bus: b, unit: 1, points: [ { name: p, address: 0 } ] } ]\n";
    assert_eq!(one_error(text).message, "1h is longer than the maximum 1s");
}

#[test]
fn every_duration_and_count_has_an_upper_bound() {
    let cases: &[(&str, &str, &str, &str)] = &[
        // (bus line, device line, path, message)
        (
            "    connect_delay: 11s\n",
            "",
            "buses[0].connect_delay",
            "11s is longer than the maximum 10s",
        ),
        (
            "    reconnect_max: 6m\n",
            "",
            "buses[0].reconnect_max",
            "6m is longer than the maximum 5m",
        ),
        (
            "",
            "    interval: 25h\n",
            "devices[0].interval",
            "25h is longer than the maximum 24h",
        ),
        (
            "",
            "    groups: { slow: 2d }\n",
            "devices[0].groups.slow",
            "2d is longer than the maximum 24h",
        ),
        (
            "",
            "    timeout: 61s\n",
            "devices[0].timeout",
            "61s is longer than the maximum 1m",
        ),
        (
            "",
            "    backoff_max: 2h\n",
            "devices[0].backoff_max",
            "2h is longer than the maximum 1h",
        ),
        (
            "",
            "    publish: { mode: on_change, heartbeat: 25h }\n",
            "devices[0].publish.heartbeat",
            "25h is longer than the maximum 24h",
        ),
        (
            "",
            "    command: { max_age: 25h }\n",
            "devices[0].command.max_age",
            "25h is longer than the maximum 24h",
        ),
    ];
    for (bus, device, path, message) in cases {
        let e = one_error(&bus_and_device(bus, device));
        assert_eq!((e.path.as_str(), e.message.as_str()), (*path, *message));
        assert!(e.line.is_some(), "{e:?}");
    }

    let gateway = HEAD.replace("  id: gw\n", "  id: gw\n  stats_interval: 25h\n")
        + "      - { name: a, address: 0 }\n";
    assert_eq!(
        one_error(&gateway).message,
        "25h is longer than the maximum 24h"
    );
    let mqtt_cases = [
        (
            "  max_packet_size: 16777217\n",
            "mqtt.max_packet_size",
            "16777217 is outside 1024..=16777216",
        ),
        (
            "  queue: { capacity: 200001 }\n",
            "mqtt.queue.capacity",
            "200001 is outside 1..=200000",
        ),
    ];
    for (line, path, message) in mqtt_cases {
        let text = HEAD.replace("mqtt:\n", &format!("mqtt:\n{line}"))
            + "      - { name: a, address: 0 }\n";
        let e = one_error(&text);
        assert_eq!((e.path.as_str(), e.message.as_str()), (path, message));
        assert!(e.hint.is_some(), "{e:?}");
    }
    let store_cases = [
        (
            "  spill_threshold: 100001\n",
            "store.spill_threshold",
            "100001 is outside 1..=100000",
        ),
        (
            "  max_age: 87601h\n",
            "store.max_age",
            "87601h is longer than the maximum 87600h",
        ),
    ];
    for (line, path, message) in store_cases {
        let text = with_points("      - { name: a, address: 0 }\n") + "store:\n" + line;
        let e = one_error(&text);
        assert_eq!((e.path.as_str(), e.message.as_str()), (path, message));
    }
    // A sum of many huge terms must not overflow into a panic (Instant + Duration).
    let huge = "4294967295h".repeat(4);
    let e = one_error(&bus_and_device("", &format!("    interval: {huge}\n")));
    assert_eq!(e.path, "devices[0].interval");
}

#[test]
fn names_sent_in_a_length_prefixed_mqtt_string_fit_65535_bytes() {
    let long = "u".repeat(65_536);
    let text = format!("{MQTT_ONLY}  url: mqtt://localhost\n  username: {long}\n");
    let e = one_error(&text);
    assert_eq!(e.path, "mqtt.username");
    assert_eq!(e.message, "the username is longer than 65535 bytes");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.pass");
    std::fs::write(&file, "p".repeat(70_000)).unwrap();
    let text = format!(
        "{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password_file: {}\n",
        file.display()
    );
    let e = one_error(&text);
    assert_eq!(e.path, "mqtt.password_file");
    assert!(
        e.message.contains("longer than 65535 bytes"),
        "{}",
        e.message
    );
}

#[test]
fn writable_string_wider_than_one_fc16_write_is_refused() {
    // Modbus Application Protocol v1.1b3 §6.12: one Write Multiple Registers carries at most
    // 123 registers (0x7B); a read may be 125 (§6.3).
    let e = one_error(&with_points(
        "      - { name: s, address: 0, type: string, length: 124, writable: true }\n",
    ));
    assert_eq!(e.path, "devices[0].points[0].length");
    assert_eq!(e.line, Some(14));
    assert_eq!(
        e.message,
        "a writable string of 124 registers does not fit one write of at most 123 (FC16)"
    );
    config::parse(
        &with_points(
            "      - { name: s, address: 0, type: string, length: 123, writable: true }\n",
        ),
        "t",
    )
    .unwrap();
    config::parse(
        &with_points("      - { name: s, address: 0, type: string, length: 125 }\n"),
        "t",
    )
    .unwrap();
}

#[test]
fn a_file_above_4_mib_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    // A valid config padded with comments: only its size is wrong.
    let mut text = with_points("      - { name: a, address: 0 }\n");
    let pad = format!("# {}\n", "x".repeat(1021));
    while text.len() <= config::MAX_FILE_BYTES {
        text.push_str(&pad);
    }
    std::fs::write(&path, &text).unwrap();
    let e = config::load(&path).unwrap_err();
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(
        e.errors[0].message,
        format!(
            "the file is larger than 4 MiB ({} bytes)",
            std::fs::metadata(&path).unwrap().len()
        )
    );
    assert!(config::parse(&text, "t").is_err());
}

#[test]
fn aliases_expanding_past_the_node_bound_are_refused_at_the_alias() {
    // 2000 points behind one anchor, aliased by 120 devices: 240 000 points once expanded
    // (before the bound, `check` took 25 s and 300 MiB on it).
    let mut text = String::from(
        "gateway: { id: gw }\nmqtt: { url: 'mqtt://localhost' }\nbuses: [ { name: b, type: tcp, host: 10.0.0.1 } ]\ndevices:\n  - name: d0\n    bus: b\n    points: &p\n",
    );
    for i in 0..2000 {
        text.push_str(&format!("      - {{ name: p{i}, address: {i} }}\n"));
    }
    let first_alias_line = text.lines().count() + 1;
    for d in 1..120 {
        text.push_str(&format!("  - {{ name: d{d}, bus: b, points: *p }}\n"));
    }
    let started = std::time::Instant::now();
    let e = config::parse(&text, "t").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(e.errors.len(), 1, "{e}");
    let e = &e.errors[0];
    assert!(
        e.message
            .starts_with("aliases expand the file to more than 300000 YAML nodes"),
        "{}",
        e.message
    );
    let line = e.line.unwrap();
    assert!(line > first_alias_line, "{e:?}");
    assert!(e.hint.as_deref().unwrap().contains("alias"), "{e:?}");

    // A few aliases are fine.
    let mut small = String::from(
        "gateway: { id: gw }\nmqtt: { url: 'mqtt://localhost' }\nbuses: [ { name: b, type: tcp, host: 10.0.0.1 } ]\ndevices:\n  - { name: d0, bus: b, unit: 1, points: &p [ { name: v, address: 0 } ] }\n",
    );
    for d in 1..5 {
        small.push_str(&format!(
            "  - {{ name: d{d}, bus: b, unit: {}, points: *p }}\n",
            d + 1
        ));
    }
    let c = config::parse(&small, "t").unwrap();
    assert_eq!(c.devices.len(), 5);
}

#[test]
fn billion_laughs_is_refused() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let e = one_error(&text);
    assert!(
        e.message.starts_with("aliases expand the file"),
        "{}",
        e.message
    );
}

// ---------------------------------------------------------------------------------------------
// Secrets: warnings at load (printed by `check`, logged by `run`), never with the secret.

fn warnings(text: &str) -> Vec<ConfigError> {
    match config::parse_with_warnings(text, "t.yaml") {
        Ok(loaded) => loaded.warnings,
        Err(e) => panic!("expected the config to load: {e}"),
    }
}

/// A password file with `mode`, and the `mqtt:` lines that use it with `url`.
fn password_file_config(dir: &std::path::Path, mode: u32, url: &str) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("mqtt.pass");
    std::fs::write(&file, "hunter2-secret\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    let text = format!(
        "{MQTT_ONLY}  url: {url}\n  username: u\n  password_file: {}\n",
        file.display()
    );
    (file, text)
}

#[test]
fn a_password_in_clear_text_is_warned_except_to_loopback() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["mqtt://broker.example.com", "ws://10.0.0.5:8080/mqtt"] {
        let (_, text) = password_file_config(dir.path(), 0o600, url);
        let w = warnings(&text);
        assert_eq!(w.len(), 1, "{url}: {w:#?}");
        assert_eq!(w[0].path, "mqtt.url");
        assert_eq!(w[0].line, Some(5));
        assert!(
            w[0].message.contains("without TLS"),
            "{url}: {}",
            w[0].message
        );
        assert!(w[0].hint.as_deref().unwrap().contains("mqtts://"), "{w:?}");
        assert!(!format!("{w:?}").contains("hunter2"));
    }
    for url in [
        "mqtt://localhost",
        "mqtt://127.0.0.1:1884",
        "mqtt://[::1]",
        "ws://127.0.0.2/mqtt",
    ] {
        let (_, text) = password_file_config(dir.path(), 0o600, url);
        assert_eq!(warnings(&text), [], "{url}");
    }
    // No password, nothing to warn about.
    let text = format!("{MQTT_ONLY}  url: mqtt://broker.example.com\n  username: u\n");
    assert_eq!(warnings(&text), []);
}

#[test]
fn a_password_file_readable_by_others_is_warned_with_chmod_600() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660] {
        let (file, text) = password_file_config(dir.path(), mode, "mqtt://localhost");
        let w = warnings(&text);
        assert_eq!(w.len(), 1, "{mode:o}: {w:#?}");
        assert_eq!(w[0].path, "mqtt.password_file");
        assert_eq!(
            w[0].message,
            format!(
                "`{}` is accessible by group or others (mode {mode:03o})",
                file.display()
            )
        );
        assert!(
            w[0].hint
                .as_deref()
                .unwrap()
                .contains(&format!("chmod 600 {}", file.display())),
            "{w:?}"
        );
    }
    for mode in [0o600, 0o400] {
        let (_, text) = password_file_config(dir.path(), mode, "mqtt://localhost");
        assert_eq!(warnings(&text), [], "{mode:o}");
    }
}

#[test]
fn password_credential_reads_the_systemd_credential() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mqtt-password"), "hunter2-secret\n").unwrap();
    let text = format!(
        "{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password_credential: mqtt-password\n"
    );
    // The only test that touches CREDENTIALS_DIRECTORY.
    std::env::remove_var("CREDENTIALS_DIRECTORY");
    let e = one_error(&text);
    assert_eq!(e.path, "mqtt.password_credential");
    assert_eq!(
        e.message,
        "$CREDENTIALS_DIRECTORY is not set: credential `mqtt-password` is not available"
    );
    assert!(
        e.hint
            .as_deref()
            .unwrap()
            .contains("LoadCredential=mqtt-password:"),
        "{e:?}"
    );

    std::env::set_var("CREDENTIALS_DIRECTORY", dir.path());
    let c = config::parse(&text, "t").unwrap();
    assert_eq!(c.mqtt.password.as_ref().unwrap().0, "hunter2-secret");
    let missing = text.replace("mqtt-password", "other");
    let e = one_error(&missing);
    assert!(
        e.message.starts_with("cannot read credential `other`"),
        "{e:?}"
    );
    let bad = text.replace("mqtt-password", "../etc/passwd");
    let e = one_error(&bad);
    assert_eq!(e.path, "mqtt.password_credential");
    assert!(e.message.contains("not a credential name"), "{e:?}");
    std::env::remove_var("CREDENTIALS_DIRECTORY");
}

#[test]
fn no_hint_recommends_environment_for_secrets() {
    let text = format!("{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password_env: FIELDBRIDGE_TEST_SURELY_UNSET_2\n");
    let hint = one_error(&text).hint.unwrap();
    assert!(!hint.contains("Environment="), "{hint}");
    assert!(hint.contains("LoadCredential="), "{hint}");
    let text =
        format!("{MQTT_ONLY}  url: mqtt://localhost\n  username: u\n  password: hunter2-secret\n");
    let hint = one_error(&text).hint.unwrap();
    assert!(hint.contains("password_credential"), "{hint}");
}

#[test]
fn check_prints_the_warnings_and_passes_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mqtt) = password_file_config(dir.path(), 0o644, "mqtt://broker.example.com");
    let path = dir.path().join("fieldbridge.yaml");
    std::fs::write(&path, mqtt).unwrap();
    let out = common::gateway::run_cli(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("warning:"), "{out:?}");
    assert!(out.stderr.contains("without TLS"), "{out:?}");
    assert!(out.stderr.contains("chmod 600"), "{out:?}");
    assert!(!format!("{out:?}").contains("hunter2"), "{out:?}");
}

/// The same warnings are logged when the gateway starts (here: a real mosquitto on loopback,
/// which takes any username and password).
#[test]
fn run_logs_the_warnings_at_start_without_the_secret() {
    let broker = common::Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (_, mqtt) = password_file_config(
        dir.path(),
        0o644,
        &format!("mqtt://127.0.0.1:{}", broker.port()),
    );
    let gateway = common::Gateway::start(&mqtt.replace(
        "buses: [ { name: b, type: tcp, host: 10.0.0.1 } ]",
        "buses: [ { name: b, type: tcp, host: 127.0.0.1, port: 1 } ]",
    ));
    gateway.expect_log("chmod 600", Duration::from_secs(10));
    assert!(!gateway.logs().contains("hunter2"), "{}", gateway.logs());
}

#[test]
fn mqtt_session_is_clean_by_default_and_persistent_on_request_with_its_expiry() {
    use fieldbridge::model::MqttSession;
    let point = "      - { name: p, address: 0, type: u16 }\n";
    let c = config::parse(&with_points(point), "test.yaml").unwrap();
    assert_eq!(c.mqtt.session, MqttSession::Clean);
    assert_eq!(c.mqtt.will_delay, Duration::ZERO);
    let text = HEAD.replace("mqtt:\n", "mqtt:\n  session: persistent\n") + point;
    let c = config::parse(&text, "test.yaml").unwrap();
    assert_eq!(
        c.mqtt.session,
        MqttSession::Persistent {
            expiry: Duration::from_secs(3600)
        }
    );
    let text = HEAD.replace(
        "mqtt:\n",
        "mqtt:\n  protocol: 5\n  session: persistent\n  session_expiry: 10m\n  will_delay: 30s\n",
    ) + point;
    let c = config::parse(&text, "test.yaml").unwrap();
    assert_eq!(
        c.mqtt.session,
        MqttSession::Persistent {
            expiry: Duration::from_secs(600)
        }
    );
    assert_eq!(c.mqtt.will_delay, Duration::from_secs(30));
}

#[test]
fn bad_session_and_will_delay_values_are_refused_with_line_and_hint() {
    let point = "      - { name: p, address: 0, type: u16 }\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            "  session: durable\n",
            "mqtt.session",
            "not one of clean, persistent",
        ),
        (
            "  session: persistent\n  session_expiry: 1h\n",
            "mqtt.session_expiry",
            "MQTT 5",
        ),
        (
            "  protocol: 5\n  session_expiry: 1h\n",
            "mqtt.session_expiry",
            "session: persistent",
        ),
        (
            "  protocol: 5\n  session: persistent\n  session_expiry: 0s\n",
            "mqtt.session_expiry",
            "whole number",
        ),
        (
            "  protocol: 5\n  session: persistent\n  session_expiry: 1500ms\n",
            "mqtt.session_expiry",
            "whole number",
        ),
        (
            "  session: persistent\n  will_delay: 10s\n",
            "mqtt.will_delay",
            "MQTT 5",
        ),
        (
            "  protocol: 5\n  will_delay: 10s\n",
            "mqtt.will_delay",
            "session: persistent",
        ),
        (
            "  protocol: 5\n  session: persistent\n  will_delay: 2500ms\n",
            "mqtt.will_delay",
            "whole number",
        ),
        (
            "  protocol: 5\n  session: persistent\n  session_expiry: 10s\n  will_delay: 20s\n",
            "mqtt.will_delay",
            "longer than the session expiry",
        ),
        (
            "  protocol: 5\n  session: persistent\n  will_delay: 10\n",
            "mqtt.will_delay",
            "no unit",
        ),
    ];
    for (keys, path, says) in cases {
        let text = HEAD.replace("mqtt:\n", &format!("mqtt:\n{keys}")) + point;
        let e = one_error(&text);
        assert_eq!(e.path, *path, "{keys}");
        assert!(
            e.message.contains(says) || e.hint.as_deref().unwrap_or("").contains(says),
            "{keys}: {e:?}"
        );
        assert!(e.line.is_some(), "{keys}: no line in {e:?}");
        assert!(
            e.hint.is_some() || *path == "mqtt.session",
            "{keys}: no hint in {e:?}"
        );
    }
}

/// `fieldbridge check … | head` and the like: a reader that goes away early ends the command
/// with the code a shell gives a broken pipe (141), never with a panic ("failed printing to stdout") and
/// an abort. The pipe's read end is closed before the command starts, so every write fails.
#[test]
fn a_closed_stdout_ends_a_command_quietly_not_with_a_panic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shipped = root.join("config/fieldbridge.yaml");
    let commands: [&[&str]; 3] = [
        &["check", "--config", shipped.to_str().unwrap()],
        &["profiles"],
        &["profiles", "show", "eastron-sdm630"],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let mut child = std::process::Command::new(common::gateway::BIN)
            .args(args)
            .env("FIELDBRIDGE_PROFILES", root.join("profiles"))
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn fieldbridge");
        let status = common::wait_child(&mut child, Duration::from_secs(20)).expect("exits");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            status.code() == Some(fieldbridge::cli::EXIT_BROKEN_PIPE) || status.code() == Some(0),
            "{args:?}: ended with {status:?}: {stderr}"
        );
    }
}
