//! Validation of `lines` buses, their devices and points (serial devices that print lines).
//!
//! A line point reuses the Modbus point validation for everything they share (name, topic,
//! payload, publish policy, scale, offset, labels, bounds): its line-only keys are checked
//! here, then it is handed to `Validator::point` dressed as a register point of the matching
//! type. Keys that only make sense on the other kind are refused on both sides.

use std::time::Duration;

use super::yaml::Value;

use super::raw::{RawBus, RawCommand, RawDevice, RawParse, RawPoint};
use super::{closest, fmt_duration, Validator};
use crate::lines::parse::{unescape, Template};
use crate::model::{
    Bus, BusKind, Checksum, Encoding, LineBus, LineCommand, LineDevice, LineMode, LineParser,
    LinePoint, Parity, Serial,
};

const LINE_TYPES: [&str; 5] = ["f64", "i64", "u64", "bool", "string"];

/// The device keys of line devices, taken out of the raw device before the shared checks.
pub(super) struct LineKeys {
    mode: Option<String>,
    query: Option<String>,
    parse: Option<RawParse>,
    checksum: Option<String>,
    sample: Option<String>,
    interval: bool,
    timeout: bool,
    groups: bool,
    max_gap: bool,
    max_registers: bool,
    max_bits: bool,
    command: Vec<&'static str>,
}

impl LineKeys {
    pub(super) fn take(d: &mut RawDevice) -> LineKeys {
        let c = d.command.as_ref();
        let mut command = Vec::new();
        for (key, given) in [
            (
                "write_multiple",
                c.is_some_and(|c| c.write_multiple.is_some()),
            ),
            ("bit_write", c.is_some_and(|c| c.bit_write.is_some())),
            ("read_back", c.is_some_and(|c| c.read_back.is_some())),
            ("template", c.is_some_and(|c| c.template.is_some())),
            ("reply", c.is_some_and(|c| c.reply.is_some())),
        ] {
            if given {
                command.push(key);
            }
        }
        LineKeys {
            mode: d.mode.take(),
            query: d.query.take(),
            parse: d.parse.take(),
            checksum: d.checksum.take(),
            sample: d.sample.take(),
            interval: d.interval.is_some(),
            timeout: d.timeout.is_some(),
            groups: d.groups.is_some(),
            max_gap: d.max_gap.is_some(),
            max_registers: d.max_registers.is_some(),
            max_bits: d.max_bits.is_some(),
            command,
        }
    }
}

/// Whether `bus` is a `lines` bus.
pub(super) fn is_lines(bus: Option<&Bus>) -> bool {
    matches!(bus.map(|b| &b.kind), Some(BusKind::Lines(_)))
}

/// `\n`, `\r\n` or `\r` as the bus writes it (for appending to queries and templates).
fn line_end_text(bus: Option<&Bus>) -> String {
    match bus.map(|b| &b.kind) {
        Some(BusKind::Lines(l)) => String::from_utf8_lossy(&l.line_end).into_owned(),
        _ => "\n".into(),
    }
}

/// Appends the bus's line end unless `s` already ends a line.
fn terminated(mut s: String, end: &str) -> String {
    if !s.ends_with(['\n', '\r']) {
        s.push_str(end);
    }
    s
}

impl Validator<'_> {
    /// A `type: lines` bus.
    pub(super) fn line_bus(&mut self, path: &str, b: RawBus) -> Bus {
        let p = |k: &str| format!("{path}.{k}");
        self.level(&p("name"), &b.name);
        for (key, given, hint) in [
            (
                "host",
                b.host.is_some(),
                "a lines bus names its serial device in `port`",
            ),
            (
                "frame_gap",
                b.frame_gap.is_some(),
                "lines are delimited by `line_end`, not by silence",
            ),
        ] {
            if given {
                self.err(
                    &p(key),
                    format!("`{key}` does not apply to lines buses"),
                    Some(hint.into()),
                );
            }
        }
        let (connect_delay, reconnect_max) = self.bus_timing(path, &b);
        let port = match &b.port {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => {
                self.err(
                    &p("port"),
                    "the port of a lines bus is the serial device path",
                    Some("e.g. port: /dev/ttyUSB0 (or /dev/serial/by-id/...)".into()),
                );
                String::new()
            }
            None => {
                self.err(
                    path,
                    "a lines bus needs `port`",
                    Some("the serial device, e.g. port: /dev/ttyUSB0".into()),
                );
                String::new()
            }
        };
        let baud = self.int(&p("baud"), b.baud, 9600, 50, 4_000_000) as u32;
        let data_bits = self.int(&p("data_bits"), b.data_bits, 8, 7, 8) as u8;
        let parity = self.choice(
            &p("parity"),
            b.parity.as_deref(),
            Parity::None,
            &[
                ("none", Parity::None),
                ("even", Parity::Even),
                ("odd", Parity::Odd),
            ],
        );
        let stop_bits = self.int(&p("stop_bits"), b.stop_bits, 1, 1, 2) as u8;
        let line_end = match b.line_end.as_deref().map(unescape) {
            None => b"\n".to_vec(),
            Some(Ok(e)) if matches!(e.as_str(), "\n" | "\r\n" | "\r") => e.into_bytes(),
            Some(_) => {
                self.err(
                    &p("line_end"),
                    format!(
                        "`{}` is not one of \\n, \\r\\n, \\r",
                        b.line_end.as_deref().unwrap_or_default().escape_debug()
                    ),
                    Some("write it with escapes: line_end: \"\\r\\n\"".into()),
                );
                b"\n".to_vec()
            }
        };
        let max_line = self.int(&p("max_line"), b.max_line, 512, 8, 65_536) as usize;
        let encoding = self.choice(
            &p("encoding"),
            b.encoding.as_deref(),
            Encoding::Utf8,
            &[("utf8", Encoding::Utf8), ("latin1", Encoding::Latin1)],
        );
        Bus {
            name: b.name,
            kind: BusKind::Lines(LineBus {
                serial: Serial {
                    port,
                    baud,
                    data_bits,
                    parity,
                    stop_bits,
                },
                line_end,
                max_line,
                encoding,
            }),
            frame_gap: Duration::ZERO,
            connect_delay,
            reconnect_max,
        }
    }

    /// Keys of lines buses given on a Modbus bus.
    pub(super) fn no_line_bus_keys(&mut self, path: &str, b: &RawBus) {
        for (key, given) in [
            ("line_end", b.line_end.is_some()),
            ("max_line", b.max_line.is_some()),
            ("encoding", b.encoding.is_some()),
        ] {
            if given {
                self.err(
                    &format!("{path}.{key}"),
                    format!("`{key}` applies only to lines buses"),
                    Some("set `type: lines` for a device that prints lines of text".into()),
                );
            }
        }
    }

    /// Keys of line devices given on a Modbus device.
    pub(super) fn no_line_device_keys(&mut self, path: &str, k: &LineKeys) {
        for (key, given) in [
            ("mode", k.mode.is_some()),
            ("query", k.query.is_some()),
            ("parse", k.parse.is_some()),
            ("checksum", k.checksum.is_some()),
            ("sample", k.sample.is_some()),
        ] {
            if given {
                self.err(
                    &format!("{path}.{key}"),
                    format!("`{key}` applies only to devices on lines buses"),
                    None,
                );
            }
        }
        for key in &k.command {
            if matches!(*key, "template" | "reply") {
                self.err(
                    &format!("{path}.command.{key}"),
                    format!("`{key}` applies only to points of devices on lines buses"),
                    None,
                );
            }
        }
    }

    /// Line keys on a Modbus point (`field`, `command.template`, `command.reply`).
    pub(super) fn no_line_point_keys(&mut self, path: &str, r: &RawPoint, c: Option<&RawCommand>) {
        if r.field.is_some() {
            self.err(
                &format!("{path}.field"),
                "`field` applies only to points of devices on lines buses",
                Some("a Modbus point names its `register` and `address`".into()),
            );
        }
        for (key, given) in [
            ("template", c.is_some_and(|c| c.template.is_some())),
            ("reply", c.is_some_and(|c| c.reply.is_some())),
        ] {
            if given {
                self.err(
                    &format!("{path}.command.{key}"),
                    format!("`{key}` applies only to points of devices on lines buses"),
                    None,
                );
            }
        }
    }

    /// `unit` on a line device.
    pub(super) fn no_unit(&mut self, path: &str) {
        self.err(
            &format!("{path}.unit"),
            "`unit` applies only to Modbus devices",
            Some("devices on a lines bus are told apart by their `query` and answer".into()),
        );
    }

    /// The line keys of one point (`field`, type, `command.template` / `reply`); dresses `r`
    /// as a register point so that `Validator::point` checks the shared keys.
    pub(super) fn line_point(
        &mut self,
        path: &str,
        r: &mut RawPoint,
        c: Option<&RawCommand>,
        bus: Option<&Bus>,
    ) -> LinePoint {
        let p = |k: &str| format!("{path}.{k}");
        for (key, given) in [
            ("register", r.register.is_some()),
            ("address", r.address.is_some()),
            ("bit", r.bit.is_some()),
            ("length", r.length.is_some()),
            ("order", r.order.is_some()),
        ] {
            if given {
                self.err(
                    &p(key),
                    format!("`{key}` does not apply to a point of a line device"),
                    Some("a line point names the `field` it reads from the line".into()),
                );
            }
        }
        r.bit = None;
        r.order = None;
        let field = match r.field.take() {
            Some(f) if f.is_empty() => {
                self.err(&p("field"), "the field name is empty", None);
                f
            }
            Some(f) => f,
            None => r.name.clone(),
        };
        let type_name = r.data_type.clone().unwrap_or_else(|| "f64".into());
        let type_name = if LINE_TYPES.contains(&type_name.as_str()) {
            type_name
        } else {
            self.err(
                &p("type"),
                format!(
                    "`{type_name}` is not one of {} (for a line device)",
                    LINE_TYPES.join(", ")
                ),
                closest(&type_name, &LINE_TYPES).map(|c| format!("did you mean `{c}`?")),
            );
            "f64".into()
        };
        // Dressed as a register point of the same type for the shared checks.
        let (register, length) = match type_name.as_str() {
            "bool" => ("coil", None),
            "string" => ("holding", Some(1)),
            _ => ("holding", None),
        };
        r.register = Some(register.into());
        r.length = length;
        r.address = Some(0);
        r.data_type = Some(type_name.clone());

        let cp = p("command");
        for (key, given) in [
            (
                "write_multiple",
                c.is_some_and(|c| c.write_multiple.is_some()),
            ),
            ("bit_write", c.is_some_and(|c| c.bit_write.is_some())),
            ("read_back", c.is_some_and(|c| c.read_back.is_some())),
        ] {
            if given {
                self.err(
                    &format!("{cp}.{key}"),
                    format!("`{key}` does not apply to a point of a line device"),
                    Some("a line point is written with `command.template`".into()),
                );
            }
        }
        let writable = r.writable.unwrap_or(false);
        let template = c.and_then(|c| c.template.as_deref());
        let command = match (writable, template) {
            (true, None) => {
                self.err(
                    path,
                    "a writable point of a line device needs `command.template`",
                    Some(
                        "the line to send, e.g. command: { template: \"SET {value:.1}\\r\\n\" }"
                            .into(),
                    ),
                );
                None
            }
            (false, Some(_)) => None, // `command` on a read-only point: reported with it
            (false, None) => None,
            (true, Some(t)) => {
                let tp = format!("{cp}.template");
                let checked =
                    unescape(t).and_then(|t| Template::parse(&t).map(|parsed| (t, parsed)));
                let template = match checked {
                    Ok((text, parsed)) => {
                        if parsed.has_precision() && type_name != "f64" {
                            self.err(
                                &tp,
                                format!("`{{value:.N}}` takes decimals, which a {type_name} point has none of"),
                                Some("use {value}".into()),
                            );
                        }
                        Some(terminated(text, &line_end_text(bus)))
                    }
                    Err(e) => {
                        self.err(
                            &tp,
                            e,
                            Some("placeholders: {value}, {value:.N} (N decimals); escapes \\r \\n \\t \\\\ \\xHH; {{ and }} for braces".into()),
                        );
                        None
                    }
                };
                let reply = c.and_then(|c| c.reply.clone());
                if let Some(re) = &reply {
                    if let Err(e) = regex_lite::Regex::new(re) {
                        self.err(
                            &format!("{cp}.reply"),
                            format!("not a regular expression: {}", first_line(&e.to_string())),
                            None,
                        );
                    }
                }
                template.map(|template| LineCommand { template, reply })
            }
        };
        LinePoint { field, command }
    }

    /// The device keys of a line device, and the checks across its points.
    pub(super) fn line_device(
        &mut self,
        path: &str,
        k: LineKeys,
        bus: Option<&Bus>,
        line_points: Vec<LinePoint>,
        timeout: &mut Duration,
    ) -> LineDevice {
        let p = |key: &str| format!("{path}.{key}");
        for (key, given, hint) in [
            ("groups", k.groups, "a line device has one interval"),
            ("max_gap", k.max_gap, "it applies to Modbus reads"),
            (
                "max_registers",
                k.max_registers,
                "it applies to Modbus reads",
            ),
            ("max_bits", k.max_bits, "it applies to Modbus reads"),
        ] {
            if given {
                self.err(
                    &p(key),
                    format!("`{key}` does not apply to a line device"),
                    Some(hint.into()),
                );
            }
        }
        for key in &k.command {
            self.err(
                &p(&format!("command.{key}")),
                format!("`{key}` cannot be set for a whole line device"),
                Some(if matches!(*key, "template" | "reply") {
                    "set it on each writable point".into()
                } else {
                    "line points are written with their command.template".into()
                }),
            );
        }
        let poll = self.choice(
            &p("mode"),
            k.mode.as_deref(),
            false,
            &[("stream", false), ("poll", true)],
        );
        let mode = if poll {
            match k.query.as_deref().map(unescape) {
                Some(Ok(q)) if !q.is_empty() => LineMode::Poll {
                    query: terminated(q, &line_end_text(bus)).into_bytes(),
                },
                Some(Ok(_)) => {
                    self.err(&p("query"), "the query is empty", None);
                    LineMode::Stream
                }
                Some(Err(e)) => {
                    self.err(
                        &p("query"),
                        e,
                        Some("escapes: \\r \\n \\t \\\\ \\xHH".into()),
                    );
                    LineMode::Stream
                }
                None => {
                    self.err(
                        path,
                        "a device with mode poll needs `query`",
                        Some(
                            "the line that asks for a reading, e.g. query: \"READ?\\r\\n\"".into(),
                        ),
                    );
                    LineMode::Stream
                }
            }
        } else {
            if k.query.is_some() {
                self.err(
                    &p("query"),
                    "`query` applies only to mode poll",
                    Some("set mode: poll to send it every interval".into()),
                );
            }
            if k.interval {
                self.err(
                    &p("interval"),
                    "`interval` applies only to mode poll",
                    Some("a streaming device sets its own pace; `timeout` is the longest silence allowed".into()),
                );
            }
            if !k.timeout {
                // A device talking by itself may pause for a while between lines.
                *timeout = Duration::from_secs(5);
            }
            LineMode::Stream
        };
        let checksum = self.choice(
            &p("checksum"),
            k.checksum.as_deref(),
            None,
            &[("nmea", Some(Checksum::Nmea))],
        );
        let parser = self.line_parser(path, k.parse.as_ref());
        if let Some(LineParser::Regex(re)) = &parser {
            if let Ok(re) = regex_lite::Regex::new(re) {
                let names: Vec<&str> = re.capture_names().flatten().collect();
                for (j, lp) in line_points.iter().enumerate() {
                    if !names.contains(&lp.field.as_str()) {
                        let at = self.present_or(
                            &format!("{path}.points[{j}].field"),
                            &format!("{path}.points[{j}].name"),
                        );
                        self.err(
                            &at,
                            format!("the regex has no capture named `{}`", lp.field),
                            Some(if names.is_empty() {
                                "name the captures: (?P<temp>[-0-9.]+)".into()
                            } else {
                                format!(
                                    "captures: {}{}",
                                    names.join(", "),
                                    closest(&lp.field, &names)
                                        .map(|c| format!("; did you mean `{c}`?"))
                                        .unwrap_or_default()
                                )
                            }),
                        );
                    }
                }
            }
        }
        if *timeout > Duration::from_secs(3600) {
            self.err(
                &p("timeout"),
                format!("{} is longer than 1h", fmt_duration(*timeout)),
                None,
            );
        }
        LineDevice {
            mode,
            parser: parser.unwrap_or(LineParser::Json),
            checksum,
            sample: k.sample,
            points: line_points,
        }
    }

    fn line_parser(&mut self, path: &str, parse: Option<&RawParse>) -> Option<LineParser> {
        let pp = format!("{path}.parse");
        let Some(r) = parse else {
            self.err(
                path,
                "a line device needs `parse`",
                Some("one of: parse: { regex: \"T=(?P<temp>[-0-9.]+)\" }, parse: { kv: { separator: \";\", assign: \"=\" } }, parse: { json: {} }".into()),
            );
            return None;
        };
        let given = [r.regex.is_some(), r.kv.is_some(), r.json.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            self.err(
                &pp,
                "give exactly one of regex, kv, json",
                Some("e.g. parse: { regex: \"T=(?P<temp>[-0-9.]+)\" }".into()),
            );
            return None;
        }
        if let Some(re) = &r.regex {
            return match regex_lite::Regex::new(re) {
                Ok(compiled) if compiled.capture_names().flatten().next().is_some() => {
                    Some(LineParser::Regex(re.clone()))
                }
                Ok(_) => {
                    self.err(
                        &format!("{pp}.regex"),
                        "the regex has no named capture",
                        Some("each point reads a named capture: (?P<temp>[-0-9.]+)".into()),
                    );
                    None
                }
                Err(e) => {
                    self.err(
                        &format!("{pp}.regex"),
                        format!("not a regular expression: {}", first_line(&e.to_string())),
                        Some("Rust regex syntax (ASCII classes, no \\p{...}); named captures are (?P<name>...)".into()),
                    );
                    None
                }
            };
        }
        if let Some(kv) = &r.kv {
            let separator = kv.separator.clone().unwrap_or_else(|| ";".into());
            let assign = kv.assign.clone().unwrap_or_else(|| "=".into());
            for (key, v) in [("separator", &separator), ("assign", &assign)] {
                if v.is_empty() {
                    self.err(
                        &format!("{pp}.kv.{key}"),
                        format!("the {key} is empty"),
                        None,
                    );
                }
            }
            if !separator.is_empty() && separator == assign {
                self.err(
                    &format!("{pp}.kv.assign"),
                    "separator and assign are the same",
                    Some("e.g. separator \";\" between pairs, assign \"=\" inside a pair".into()),
                );
            }
            return Some(LineParser::Kv { separator, assign });
        }
        Some(LineParser::Json)
    }
}

/// The regex crate's errors span several lines (pattern, caret, message): keep the message.
fn first_line(e: &str) -> String {
    e.lines()
        .rev()
        .find(|l| l.trim_start().starts_with("error:"))
        .map(|l| {
            l.trim_start()
                .trim_start_matches("error:")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| e.lines().next().unwrap_or_default().to_string())
}
