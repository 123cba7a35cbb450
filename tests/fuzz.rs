//! Property-based fuzzing of everything the network, a device or a config file feeds in:
//! the config loader (YAML bytes, mutated shipped configs), command payloads and the write
//! planner (with the invariant that what is written decodes back to the result's value, within
//! the point's bounds), Modbus register decoding, the line parsers and framer, and the topic
//! handling of received commands. The link's handling of received packets (bytes from the
//! broker through rumqttc's decoder to a command) is fuzzed beside its private code, in
//! `src/link/proto.rs` (`fuzz_` tests).
//!
//! proptest on the stable toolchain, not cargo-fuzz: the machines have one stable toolchain
//! and no nightly can be fetched; proptest shrinks a failure to a small input and runs in the
//! ordinary test suite. The suite's pass is short and deterministic (a fixed seed,
//! `FIELDBRIDGE_FUZZ_CASES` cases per target, 256 by default); `scripts/fuzz` runs each
//! target for a given time with fresh seeds. Every failure found becomes a regression case in
//! `regressions` below.

use std::collections::BTreeMap;

use fieldbridge::codec;
use fieldbridge::command::{self, Step};
use fieldbridge::lines::parse as lines;
use fieldbridge::modbus::Write;
use fieldbridge::model::{
    BitWrite, DataType, LineParser, PayloadFormat, Point, PointCommand, PublishPolicy, Qos,
    RegisterKind, Value, WordOrder,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed};

fn config() -> Config {
    let cases = std::env::var("FIELDBRIDGE_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    let seed = match std::env::var("FIELDBRIDGE_FUZZ_SEED").ok() {
        Some(s) if s == "random" => RngSeed::Random,
        Some(s) => RngSeed::Fixed(s.parse().unwrap_or(1)),
        None => RngSeed::Fixed(0x5eed_f1e1d),
    };
    Config {
        cases,
        rng_seed: seed,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

fn shipped_configs() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut out = Vec::new();
    for dir in [root.clone(), root.join("examples")] {
        for entry in std::fs::read_dir(dir).expect("config dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "yaml") {
                out.push(std::fs::read_to_string(entry.path()).expect("read"));
            }
        }
    }
    out.sort();
    out
}

/// A shipped config with a few byte edits: mostly valid YAML that is wrong in one place.
fn mutated_config() -> impl Strategy<Value = Vec<u8>> {
    let configs = shipped_configs();
    let n = configs.len();
    (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..8),
    )
        .prop_map(move |(i, edits)| {
            let mut bytes = configs[i].clone().into_bytes();
            for (at, kind, b) in edits {
                let at = at.index(bytes.len().max(1));
                match kind {
                    0 if at < bytes.len() => bytes[at] = b,
                    1 => bytes.insert(at.min(bytes.len()), b),
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            bytes
        })
}

/// YAML-ish text: the tokens configs are made of, in any order.
fn yamlish() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "gateway:",
        "mqtt:",
        "buses:",
        "devices:",
        "points:",
        "store:",
        " id: x",
        " name: a",
        "\n",
        "\n  ",
        "\n    ",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ",",
        ": ",
        "&a ",
        "*a",
        "<<: *a",
        "!!str ",
        "address: 70000",
        "type: f32",
        "scale: 1e309",
        "'",
        "\"",
        "#",
        "~",
        "null",
        "true",
        "-1",
        "0x10",
        "interval: 0s",
        "port: 99999",
        "host: 127.0.0.1",
        "?",
        "|",
        ">",
        "---",
        "...",
        "%YAML 1.2",
        "\t",
        "\u{feff}",
        "é",
    ]);
    prop::collection::vec(token, 0..120).prop_map(|t| t.concat())
}

/// Lines as YAML counts them (a lone CR breaks a line too, YAML 1.2 §5.4), plus the end.
fn yaml_lines(text: &str) -> usize {
    text.replace("\r\n", "\n")
        .replace('\r', "\n")
        .lines()
        .count()
        + 1
}

fn data_type() -> impl Strategy<Value = DataType> {
    prop_oneof![
        Just(DataType::U16),
        Just(DataType::I16),
        Just(DataType::U32),
        Just(DataType::I32),
        Just(DataType::U64),
        Just(DataType::I64),
        Just(DataType::F32),
        Just(DataType::F64),
        (0u8..16).prop_map(DataType::Bit),
        (1u16..8).prop_map(DataType::Ascii),
    ]
}

fn scale() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(1.0),
        Just(0.1),
        Just(0.01),
        Just(0.001),
        Just(10.0),
        Just(0.5),
        Just(2.5),
        Just(-0.1),
        (-1e3..1e3f64).prop_filter("non-zero", |s| s.abs() > 1e-6),
    ]
}

fn offset() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(-273.15),
        Just(40.0),
        Just(-40.0),
        -1e4..1e4f64
    ]
}

fn bound() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        Just(None),
        (-1e5..1e5f64).prop_map(Some),
        (-100i32..100).prop_map(|i| Some(f64::from(i))),
        (-100i32..100).prop_map(|i| Some(f64::from(i) / 10.0)),
    ]
}

fn point() -> impl Strategy<Value = Point> {
    (
        data_type(),
        prop::sample::select(WordOrder::ALL.to_vec()),
        scale(),
        offset(),
        bound(),
        bound(),
        prop::bool::ANY,
    )
        .prop_map(|(data_type, order, scale, offset, min, max, labelled)| {
            let mut labels = BTreeMap::new();
            if labelled {
                labels.insert(0, "OFF".to_string());
                labels.insert(1, "ON".to_string());
            }
            let (scale, offset) = match data_type {
                DataType::Bit(_) | DataType::Ascii(_) => (1.0, 0.0),
                _ => (scale, offset),
            };
            Point {
                name: "p".into(),
                kind: RegisterKind::Holding,
                address: 100,
                data_type,
                order,
                scale,
                offset,
                unit: None,
                labels,
                group: 0,
                topic: "t/d/p".into(),
                payload: PayloadFormat::Json,
                publish: PublishPolicy::EveryPoll,
                qos: Qos::AtLeastOnce,
                retain: false,
                writable: true,
                min,
                max,
            }
        })
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::Int),
        (-100_000i64..100_000).prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        any::<f64>().prop_map(Value::Float),
        (-100_000.0..100_000.0f64).prop_map(Value::Float),
        (-10_000i64..10_000).prop_map(|i| Value::Float(i as f64 / 10.0)),
        (-10_000i64..10_000).prop_map(|i| Value::Float(i as f64 / 100.0)),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec!["ON", "OFF", "AUTO", "", "ÄÖ", "FB-01", "x\u{0}"])
            .prop_map(|s| Value::Text(s.into())),
    ]
}

fn settings() -> PointCommand {
    PointCommand {
        topic: "t/d/p/set".into(),
        result_topic: "t/d/p/set/result".into(),
        write_multiple: false,
        bit_write: BitWrite::ReadModifyWrite,
        read_back: false,
        max_age: None,
        rate: None,
    }
}

/// The registers a planned write puts on the wire, for the point's own registers.
fn written_registers(point: &Point, step: &Step) -> Option<Vec<u16>> {
    match step {
        Step::Write(Write::SingleRegister(_, r)) => Some(vec![*r]),
        Step::Write(Write::MultipleRegisters(_, r)) => Some(r.clone()),
        // Bits are written read-modify-write: the value is the bool itself.
        Step::SetBit { .. } | Step::Write(Write::MaskWrite(..)) => None,
        other => panic!("unexpected step {other:?} for {point:?}"),
    }
}

/// What went on the wire, decoded as a reading would be, against what the result reports.
fn check_planned(point: &Point, value: &Value) -> Result<(), TestCaseError> {
    let Ok(planned) = command::plan(point, &settings(), value) else {
        return Ok(());
    };
    let reported = command::value_json(point, &planned.raw).0;
    let Some(regs) = written_registers(point, &planned.step) else {
        return Ok(());
    };
    prop_assert_eq!(regs.len(), usize::from(point.data_type.width()));
    let raw = codec::decode(point.data_type, point.order, &regs)
        .map_err(|e| TestCaseError::fail(format!("written registers do not decode: {e}")))?;
    let wire = codec::to_value(point, &raw);
    let shown = command::value_json(point, &raw).0;
    prop_assert_eq!(
        &shown,
        &reported,
        "result says {} but {} went on the wire ({:?} from {:?})",
        reported,
        shown,
        regs,
        value
    );
    // What was asked is what was written: only an f32 register narrows a number (and the
    // result then says so).
    let exact_type = !matches!(
        point.data_type,
        DataType::F32 | DataType::Bit(_) | DataType::Ascii(_)
    );
    if let (true, Some(asked), Some(f)) = (
        exact_type && matches!(value, Value::Int(_) | Value::UInt(_) | Value::Float(_)),
        value.as_f64(),
        wire.as_f64(),
    ) {
        prop_assert!(
            // Float noise: relative, with the codec's floor of 1e-9 of a raw step.
            (asked - f).abs()
                <= (1e-12 * (asked.abs() + point.offset.abs())).max(2e-9 * point.scale.abs()),
            "asked {} but {} was written",
            asked,
            f
        );
    }
    if let Some(f) = wire.as_f64() {
        prop_assert!(
            point.min.is_none_or(|m| f >= m) && point.max.is_none_or(|m| f <= m),
            "{} written outside [{:?}, {:?}] from {:?}",
            f,
            point.min,
            point.max,
            value
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_loader_survives_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = fieldbridge::config::parse(&text, "fuzz.yaml");
    }

    #[test]
    fn config_loader_survives_yamlish_text(text in yamlish()) {
        if let Err(errors) = fieldbridge::config::parse(&text, "fuzz.yaml") {
            prop_assert!(!errors.to_string().is_empty());
        }
    }

    #[test]
    fn config_loader_reports_mutated_configs(bytes in mutated_config()) {
        let text = String::from_utf8_lossy(&bytes);
        let lines = yaml_lines(&text);
        if let Err(errors) = fieldbridge::config::parse(&text, "fuzz.yaml") {
            let shown = errors.to_string();
            prop_assert!(shown.contains("fuzz.yaml"), "{}", shown);
            for e in &errors.errors {
                prop_assert!(!e.message.is_empty());
                // An error in a device profile (a device of the mutated file names one) points
                // into that file: its lines are counted there.
                let lines = match &e.file {
                    Some(f) => yaml_lines(&std::fs::read_to_string(f).unwrap_or_default()),
                    None => lines,
                };
                if let Some(line) = e.line {
                    prop_assert!(line <= lines, "line {} of {} ({:?}): {}", line, lines, e.file, e.message);
                }
            }
        }
    }

    #[test]
    fn command_payloads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = command::parse_payload(&bytes);
    }

    #[test]
    fn json_command_payloads_never_panic(
        value in prop::sample::select(vec!["1", "-1", "1e308", "1e309", "-0", "0.1", "true", "\"ON\"", "null", "[1]", "{}", "18446744073709551616", "-9223372036854775809"]),
        key in prop::sample::select(vec!["value", "id", "ts", "expires", "x", ""]),
        extra in prop::sample::select(vec!["", ",\"id\":\"a\"", ",\"ts\":\"9999-12-31T23:59:59Z\"", ",\"expires\":\"0000-01-01T00:00:00Z\"", ",\"ts\":\"2026-01-01T00:00:00+99:99\"", ",\"expires\":\"2026-13-45T25:61:61Z\""]),
    ) {
        let payload = format!("{{\"{key}\":{value}{extra}}}");
        if let Ok(cmd) = command::parse_payload(payload.as_bytes()) {
            let clock = command::Clock { now: std::time::SystemTime::now(), synchronised: true };
            let _ = command::check_expiry(&cmd, Some(std::time::Duration::from_secs(10)), clock);
            let _ = command::deadline(&cmd, Some(std::time::Duration::MAX), None, clock, std::time::Instant::now());
        }
    }

    #[test]
    fn accepted_writes_put_the_reported_value_on_the_wire(point in point(), value in value()) {
        check_planned(&point, &value)?;
    }

    #[test]
    fn register_decoding_survives_any_words(
        dt in data_type(),
        order in prop::sample::select(WordOrder::ALL.to_vec()),
        words in prop::collection::vec(any::<u16>(), 0..10),
        point in point(),
    ) {
        if let Ok(raw) = codec::decode(dt, order, &words) {
            let mut p = point;
            p.data_type = dt;
            let _ = codec::to_value(&p, &raw);
            let _ = codec::label(&p, &raw);
            let _ = command::value_json(&p, &raw);
        }
    }

    #[test]
    fn line_parsers_survive_any_line(
        line in prop::collection::vec(any::<char>(), 0..300).prop_map(|c| c.into_iter().collect::<String>()),
        which in 0u8..3,
        dt in prop_oneof![Just(DataType::Bool), Just(DataType::I64), Just(DataType::U64), Just(DataType::F64), Just(DataType::Ascii(8))],
    ) {
        let parser = match which {
            0 => LineParser::Kv { separator: ",".into(), assign: "=".into() },
            1 => LineParser::Json,
            _ => LineParser::Regex(r"^T=(?P<t>[-0-9.]+) H=(?P<h>\S+)".into()),
        };
        let parser = lines::Parser::new(&parser).expect("compiles");
        if let Ok(fields) = parser.fields(&line) {
            for f in ["t", "h", "a", "/a/0", ""] {
                if let Some(v) = fields.get(f) {
                    let _ = lines::convert(&v, dt);
                }
            }
        }
        let _ = lines::nmea_body(&line);
        let _ = lines::unescape(&line);
        let _ = lines::Template::parse(&line).map(|t| t.render(&codec::Raw::F64(1.5)));
    }

    #[test]
    fn the_line_framer_bounds_every_line(
        chunks in prop::collection::vec(prop::collection::vec(prop_oneof![Just(b'\n'), Just(b'\r'), any::<u8>()], 0..200), 0..20),
        max_line in 1usize..256,
    ) {
        let mut splitter = lines::Splitter::new(b"\r\n", max_line);
        for chunk in &chunks {
            for framed in splitter.push(chunk) {
                if let lines::Framed::Line(l) = framed {
                    prop_assert!(l.len() <= max_line, "{} > {}", l.len(), max_line);
                }
            }
        }
    }

    #[test]
    fn received_topics_never_panic_the_router_helpers(
        topic in prop::collection::vec(prop_oneof![Just('/'), Just('+'), Just('#'), Just('$'), any::<char>()], 0..80)
            .prop_map(|c| c.into_iter().collect::<String>()),
    ) {
        let _ = command::parse_default_topic("t", &topic);
        let _ = command::topic_matches("t/+/+/set", &topic);
        let _ = command::topic_matches(&topic, "t/a/b/set");
        let _ = command::valid_response_topic(&topic);
        let _ = command::log_topic(&topic);
    }
}

/// Inputs the fuzz targets found, kept as plain tests.
mod regressions {
    use super::*;

    fn p(
        data_type: DataType,
        scale: f64,
        offset: f64,
        min: Option<f64>,
        max: Option<f64>,
    ) -> Point {
        let mut point = point()
            .new_tree(&mut proptest::test_runner::TestRunner::deterministic())
            .unwrap()
            .current();
        point.data_type = data_type;
        point.order = WordOrder::Abcd;
        point.scale = scale;
        point.offset = offset;
        point.min = min;
        point.max = max;
        point.labels.clear();
        point
    }

    #[test]
    fn an_f32_at_its_max_is_compared_as_the_register_holds_it() {
        // Found before the fix: 50.0 on an f32 point with max 50 wrote 50.0000000000001.
        let point = p(DataType::F32, 0.1, 0.0, None, Some(50.0));
        check_planned(&point, &Value::Float(50.0)).unwrap();
    }

    #[test]
    fn an_error_in_a_profile_is_counted_in_the_profile_s_lines() {
        // Found by config_loader_reports_mutated_configs (scripts/fuzz 150): "line 42 of 41".
        // `name: &eter-1` (an anchor, no name) made every point a profile brings report its
        // topic, at its line in the profile file; the oracle counted the configuration's lines.
        let root = env!("CARGO_MANIFEST_DIR");
        let example = std::fs::read_to_string(format!(
            "{root}/config/examples/energy-meters-profiles.yaml"
        ))
        .unwrap();
        let text = example.replacen("name: meter-1", "name: &eter-1", 1);
        assert_ne!(text, example, "the example changed: update this test");
        let errors = fieldbridge::config::parse(&text, &format!("{root}/config/examples/x.yaml"))
            .unwrap_err();
        let in_profile: Vec<_> = errors.errors.iter().filter(|e| e.file.is_some()).collect();
        assert!(!in_profile.is_empty(), "{errors}");
        for e in in_profile {
            let file = e.file.as_deref().unwrap();
            let lines = std::fs::read_to_string(file).unwrap().lines().count();
            assert!(e.line.is_some_and(|l| l <= lines), "{file}: {e:?}");
        }
    }

    #[test]
    fn an_error_line_counts_a_lone_cr_as_yaml_does() {
        // Found by config_loader_reports_mutated_configs: an error "on line 315 of 314"; the
        // oracle counted lines as Rust's str::lines() does, YAML also breaks at a lone CR.
        let text = "gateway:\r  id: x\rmqtt: {\r";
        let errors = fieldbridge::config::parse(text, "fuzz.yaml").unwrap_err();
        for e in &errors.errors {
            if let Some(line) = e.line {
                assert!(line <= yaml_lines(text), "line {line}: {}", e.message);
            }
        }
    }

    #[test]
    fn a_string_command_reports_what_the_register_holds() {
        // Found by accepted_writes_put_the_reported_value_on_the_wire: "x\0" wrote "x" while
        // the result said "x\u0000"; a NUL or line break is now refused, trailing spaces are
        // reported trimmed, as a reading shows them.
        let point = p(DataType::Ascii(2), 1.0, 0.0, None, None);
        assert!(command::plan(&point, &settings(), &Value::Text("x\0".into())).is_err());
        assert!(command::plan(&point, &settings(), &Value::Text("a\nb".into())).is_err());
        let planned = command::plan(&point, &settings(), &Value::Text("AB ".into())).unwrap();
        assert_eq!(
            command::value_json(&point, &planned.raw).0,
            serde_json::json!("AB")
        );
        check_planned(&point, &Value::Text("AB ".into())).unwrap();
    }
}
