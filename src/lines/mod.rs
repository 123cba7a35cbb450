//! Serial line devices: sensors that print lines of text (`T=23.41;H=45.2`, NMEA sentences,
//! JSON objects) by themselves or when asked, read and written through the same schema as
//! Modbus points.
//!
//! - [`parse`] (pure): bytes → lines → fields → typed point values; command templates.
//! - [`task`]: one task per `lines` bus owning its port: streaming and polled devices, the
//!   write queue, offline detection and port reopen with back-off.
//!
//! The task speaks the bus interface of [`crate::modbus`]: it sends the same
//! [`BusEvent`](crate::modbus::BusEvent)s to the publisher (so points publish, filter and
//! carry heartbeats exactly like Modbus points) and serves [`BusRequest`]s with
//! [`Op::Line`](crate::modbus::Op::Line) from the command router.

pub mod parse;
pub mod task;

use std::fmt::Write as _;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::codec::{self, Raw};
use crate::command::{Plan, Refusal, Step};
use crate::modbus::{BusEvent, BusHandle};
use crate::model::{
    BusKind, Checksum, Config, DataType, Device, Encoding, LineMode, LineParser, Value,
};

/// Starts the task owning a `lines` bus (see [`task`]).
pub fn spawn(
    bus: &crate::model::Bus,
    devices: Vec<(usize, Device)>,
    events: mpsc::Sender<BusEvent>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> BusHandle {
    task::spawn(bus, devices, events, cancel, tracker)
}

fn encoding_of(config: &Config, device: &Device) -> Encoding {
    match &config.buses[device.bus].kind {
        BusKind::Lines(l) => l.encoding,
        _ => Encoding::Utf8,
    }
}

/// Validates a command value for point `p` of line device `d` and renders its line (the
/// line counterpart of [`crate::command::plan`]): bools also take 0 and 1; numbers go
/// through the point's bounds, scale and offset (`raw = (value - offset) / scale`, the
/// device's own units are sent); integer points refuse values that are not a whole step.
pub fn command_plan(config: &Config, d: usize, p: usize, value: &Value) -> Result<Plan, Refusal> {
    let device = &config.devices[d];
    let point = &device.points[p];
    let command = device
        .line
        .as_ref()
        .and_then(|l| l.points.get(p))
        .and_then(|lp| lp.command.as_ref());
    let (true, Some(command)) = (point.writable, command) else {
        return Err(Refusal::new("not_writable", "the point is not writable"));
    };
    let value = match (point.data_type, value) {
        (DataType::Bool, Value::Int(0) | Value::UInt(0)) => Value::Bool(false),
        (DataType::Bool, Value::Int(1) | Value::UInt(1)) => Value::Bool(true),
        _ => value.clone(),
    };
    let raw = match (point.data_type, &value) {
        // A line device's text goes out as text (any length, UTF-8), not into registers;
        // only a control character could end the line early (refused when rendering).
        (DataType::Ascii(_), Value::Text(t)) => Raw::Text(t.clone()),
        _ => codec::from_value(point, &value).map_err(|e| crate::command::refusal_of(&e))?,
    };
    let template = parse::Template::parse(&command.template)
        .map_err(|e| Refusal::new("internal", format!("template: {e}")))?;
    let text = template
        .render(&raw)
        .map_err(|e| Refusal::new("not_representable", e))?;
    let bytes = parse::encode(&text, encoding_of(config, device))
        .map_err(|e| Refusal::new("not_representable", e))?;
    Ok(Plan {
        step: Step::Line {
            bytes,
            reply: command.reply.clone(),
        },
        raw,
    })
}

/// How `line` parses for `device`, for people: each field and the value it publishes.
pub fn explain(device: &Device, line: &str) -> String {
    let mut out = String::new();
    let Some(ld) = &device.line else {
        return format!("{} is not a line device\n", device.name);
    };
    let parser = match parse::Parser::new(&ld.parser) {
        Ok(p) => parse::DeviceParser {
            parser: p,
            checksum: ld.checksum,
        },
        Err(e) => return format!("parser does not compile: {e}\n"),
    };
    let _ = writeln!(out, "      line {:?}", line);
    match parse::point_values(device, &parser, line) {
        Err(e) => {
            let _ = writeln!(out, "      -> no reading ({}): {}", e.kind.name(), e.reason);
        }
        Ok(values) => {
            for (i, (point, lp)) in device.points.iter().zip(&ld.points).enumerate() {
                let shown = match values.iter().find(|(p, _)| *p == i) {
                    None => "(not in this line)".to_string(),
                    Some((_, Ok(raw))) => shown_value(point, raw),
                    Some((_, Err(e))) => format!("bad quality: {e}"),
                };
                let _ = writeln!(out, "      {} <- {:?}: {shown}", point.name, lp.field);
            }
        }
    }
    out
}

fn shown_value(point: &crate::model::Point, raw: &Raw) -> String {
    let value = crate::publish::value_json(&codec::to_value(point, raw));
    let unit = point
        .unit
        .as_deref()
        .map(|u| format!(" {u}"))
        .unwrap_or_default();
    match codec::label(point, raw) {
        Some(label) => format!("{label:?} (raw {value})"),
        None => format!("{value}{unit}"),
    }
}

/// The `check` section of one line device: mode, parser, fields, commands and its sample.
pub fn check_device(device: &Device) -> String {
    let mut out = String::new();
    let Some(ld) = &device.line else {
        return out;
    };
    let mode = match &ld.mode {
        LineMode::Stream => format!(
            "stream, offline after {} x {} silent",
            device.offline_after,
            humantime::format_duration(device.timeout)
        ),
        LineMode::Poll { query } => format!(
            "poll {:?} every {}, timeout {}",
            parse::preview(query, 80),
            humantime::format_duration(device.groups[0].interval),
            humantime::format_duration(device.timeout)
        ),
    };
    let parser = match &ld.parser {
        LineParser::Regex(r) => format!("regex {r:?}"),
        LineParser::Kv { separator, assign } => {
            format!("key{assign}value pairs separated by {separator:?}")
        }
        LineParser::Json => "JSON object per line".into(),
    };
    let checksum = match ld.checksum {
        Some(Checksum::Nmea) => ", NMEA checksum",
        None => "",
    };
    let _ = writeln!(
        out,
        "  device {} (line device: {mode}), {} point(s)\n    parse: {parser}{checksum}",
        device.name,
        device.points.len()
    );
    for (point, lp) in device.points.iter().zip(&ld.points) {
        let _ = write!(
            out,
            "    {} <- field {:?} as {}",
            point.name,
            lp.field,
            line_type_name(point.data_type)
        );
        if let Some(c) = &lp.command {
            let _ = write!(
                out,
                ", writes {:?}",
                parse::preview(c.template.as_bytes(), 80)
            );
            if let Some(r) = &c.reply {
                let _ = write!(out, " expecting {r:?}");
            }
        }
        out.push('\n');
    }
    if let Some(sample) = &ld.sample {
        let _ = writeln!(out, "    sample:");
        out.push_str(&explain(device, sample));
    }
    out
}

/// Type names of line points as the configuration spells them.
pub fn line_type_name(dt: DataType) -> &'static str {
    match dt {
        DataType::F64 => "f64",
        DataType::I64 => "i64",
        DataType::U64 => "u64",
        DataType::Bool => "bool",
        _ => "string",
    }
}

/// `check --sample DEVICE LINE`: how `line` parses for the named device.
pub fn sample_report(config: &Config, device: &str, line: &str) -> Result<String, String> {
    let Some(d) = config.devices.iter().find(|d| d.name == device) else {
        let names: Vec<&str> = config
            .devices
            .iter()
            .filter(|d| d.line.is_some())
            .map(|d| d.name.as_str())
            .collect();
        return Err(format!(
            "no device named {device:?}; line devices: {}",
            names.join(", ")
        ));
    };
    if d.line.is_none() {
        return Err(format!("{device} is a Modbus device, not a line device"));
    }
    let line = parse::unescape(line).unwrap_or_else(|_| line.to_string());
    let line = line.trim_end_matches(['\r', '\n']);
    Ok(format!("sample for {device}:\n{}", explain(d, line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heater(points: &str) -> Config {
        crate::config::parse(
            &format!("gateway: {{ id: gw, prefix: t }}\nmqtt: {{ host: 127.0.0.1 }}\nbuses:\n  - {{ name: s, type: lines, port: /dev/ttyUSB0 }}\ndevices:\n  - name: h\n    bus: s\n    mode: poll\n    query: 'S?'\n    parse: {{ regex: '^SP=(?P<sp>[0-9.]+) M=(?P<m>\\S+)$' }}\n    points:\n{points}"),
            "t.yaml",
        )
        .unwrap()
    }

    fn sent(config: &Config, value: Value) -> Result<String, String> {
        command_plan(config, 0, 0, &value)
            .map(|p| match p.step {
                Step::Line { bytes, .. } => String::from_utf8(bytes).unwrap(),
                other => panic!("{other:?}"),
            })
            .map_err(|r| r.reason)
    }

    #[test]
    fn a_string_command_goes_out_as_text_of_any_length() {
        let config = heater("      - { name: mode, field: m, type: string, writable: true, command: { template: 'MODE {value}' } }\n");
        assert_eq!(
            sent(&config, Value::Text("AUTO".into())).as_deref(),
            Ok("MODE AUTO\n")
        );
        assert_eq!(
            sent(&config, Value::Text("Stufe 2 ü".into())).as_deref(),
            Ok("MODE Stufe 2 ü\n")
        );
        assert!(sent(&config, Value::Text("A\nB".into())).is_err());
    }

    #[test]
    fn a_number_goes_out_exactly_or_not_at_all() {
        let config = heater("      - { name: sp, field: sp, writable: true, command: { template: 'SET {value:.1}' } }\n");
        assert_eq!(
            sent(&config, Value::Float(21.5)).as_deref(),
            Ok("SET 21.5\n")
        );
        assert_eq!(
            sent(&config, Value::Float(0.1 + 0.2)).as_deref(),
            Ok("SET 0.3\n")
        );
        assert_eq!(
            sent(&config, Value::Float(21.46)),
            Err("not_representable".into())
        );
        // A tolerance relative to the value would let large ones be rounded.
        assert_eq!(
            sent(&config, Value::Float(1_000_000_000.04)),
            Err("not_representable".into())
        );
    }
}
