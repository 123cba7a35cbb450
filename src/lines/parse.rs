//! Lines of text → typed point values, and values → command lines (pure, no I/O).
//!
//! The stages, each a plain function tested on its own:
//! 1. [`Splitter`]: bytes as they arrive → complete lines (terminator removed); a line longer
//!    than `max_line` is dropped up to its terminator and reported once, so the next line is
//!    intact.
//! 2. [`decode`]: bytes → text (UTF-8, refusing invalid sequences; or Latin-1).
//! 3. [`nmea_body`]: the optional NMEA checksum `*hh`, verified and removed.
//! 4. [`Parser::fields`]: text → named fields (regex captures, `key=value` pairs, a JSON object).
//! 5. [`point_values`]: fields → `(point index, Raw)` by each point's `field` and type.
//!
//! And for commands: [`Template`] renders `SET {value:.1}\r\n` from a raw value.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use regex_lite::Regex;

use crate::codec::Raw;
use crate::model::{Checksum, DataType, Device, Encoding, LineParser};

/// Resolves `\r`, `\n`, `\t`, `\0`, `\\` and `\xHH` (so a query or template can be written in
/// plain or single-quoted YAML, where YAML itself resolves no escapes).
pub fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let byte = u8::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 2)
                    .ok_or_else(|| format!("`\\x{hex}` is not two hex digits"))?;
                out.push(char::from(byte));
            }
            Some(other) => return Err(format!("unknown escape `\\{other}`")),
            None => return Err("a `\\` at the end has nothing to escape".into()),
        }
    }
    Ok(out)
}

/// Text for logs: control characters and non-ASCII escaped, at most `max` characters.
pub fn preview(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &b in bytes.iter().take(max) {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7E => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02X}")),
        }
    }
    if bytes.len() > max {
        out.push('…');
    }
    out
}

/// What the splitter found in the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// A complete line without its terminator (never empty).
    Line(Vec<u8>),
    /// A line longer than `max_line` was dropped; its length so far (at least `max_line + 1`).
    TooLong(usize),
}

/// Cuts a byte stream into lines ending in `end` (`\n`, `\r\n` or `\r`). With `\n` or `\r\n`
/// a stray `\r` before the `\n` is removed either way, so both endings are accepted.
#[derive(Debug)]
pub struct Splitter {
    end: u8,
    max: usize,
    buf: Vec<u8>,
    /// Inside a line already reported too long: dropping bytes until its terminator.
    skipping: Option<usize>,
}

impl Splitter {
    pub fn new(line_end: &[u8], max_line: usize) -> Self {
        Splitter {
            end: *line_end.last().unwrap_or(&b'\n'),
            max: max_line,
            buf: Vec::new(),
            skipping: None,
        }
    }

    /// Forgets a partial line (after the port was reopened).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.skipping = None;
    }

    /// Feeds bytes; returns the lines (and over-long drops) they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Framed> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == self.end {
                if let Some(len) = self.skipping.take() {
                    out.push(Framed::TooLong(len));
                    continue;
                }
                let mut line = std::mem::take(&mut self.buf);
                if self.end == b'\n' && line.last() == Some(&b'\r') {
                    line.pop();
                }
                if self.end == b'\r' && line.first() == Some(&b'\n') {
                    line.remove(0);
                }
                if !line.is_empty() {
                    out.push(Framed::Line(line));
                }
                continue;
            }
            if let Some(len) = &mut self.skipping {
                *len += 1;
                continue;
            }
            self.buf.push(b);
            // One byte of slack for the `\r` of a `\r\n` ending.
            let allowed = self.max + usize::from(b == b'\r');
            if self.buf.len() > allowed {
                self.skipping = Some(self.buf.len());
                self.buf.clear();
            }
        }
        out
    }
}

/// Why a line gave no reading.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BadKind {
    TooLong,
    InvalidUtf8,
    Checksum,
    Unmatched,
}

impl BadKind {
    pub fn name(&self) -> &'static str {
        match self {
            BadKind::TooLong => "too_long",
            BadKind::InvalidUtf8 => "invalid_utf8",
            BadKind::Checksum => "checksum",
            BadKind::Unmatched => "unmatched",
        }
    }
}

/// Bytes → text in the bus's encoding.
pub fn decode(bytes: &[u8], encoding: Encoding) -> Result<String, String> {
    match encoding {
        Encoding::Utf8 => String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to())),
        Encoding::Latin1 => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
    }
}

/// Text → bytes in the bus's encoding (Latin-1 refuses characters above U+00FF).
pub fn encode(text: &str, encoding: Encoding) -> Result<Vec<u8>, String> {
    match encoding {
        Encoding::Utf8 => Ok(text.as_bytes().to_vec()),
        Encoding::Latin1 => text
            .chars()
            .map(|c| u8::try_from(u32::from(c)).map_err(|_| format!("`{c}` is not Latin-1")))
            .collect(),
    }
}

/// Verifies an NMEA 0183 checksum (`$GPGGA,...*47`: XOR of every byte between the `$` or `!`
/// and the `*`, as two hex digits) and returns the sentence without `*hh`.
pub fn nmea_body(line: &str) -> Result<&str, String> {
    let line = line.trim_end();
    let Some(star) = line.rfind('*') else {
        return Err("no `*hh` checksum".into());
    };
    let (body, sum) = (&line[..star], &line[star + 1..]);
    let start = usize::from(body.starts_with(['$', '!']));
    let want = u8::from_str_radix(sum, 16)
        .ok()
        .filter(|_| sum.len() == 2)
        .ok_or_else(|| format!("`{sum}` after `*` is not two hex digits"))?;
    let got = body.as_bytes()[start..].iter().fold(0u8, |acc, b| acc ^ b);
    if got == want {
        Ok(body)
    } else {
        Err(format!("checksum {want:02X} given, {got:02X} computed"))
    }
}

/// One field of a parsed line.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Text(String),
    Json(serde_json::Value),
}

/// The named fields of one line.
#[derive(Debug, Clone, PartialEq)]
pub enum Fields {
    Map(BTreeMap<String, String>),
    Json(serde_json::Value),
}

impl Fields {
    /// A field by name (JSON: a top-level key, or a JSON pointer starting with `/`).
    pub fn get(&self, field: &str) -> Option<FieldValue> {
        match self {
            Fields::Map(m) => m.get(field).cloned().map(FieldValue::Text),
            Fields::Json(v) => {
                let found = if field.starts_with('/') {
                    v.pointer(field)
                } else {
                    v.get(field)
                };
                found
                    .filter(|v| !v.is_null())
                    .cloned()
                    .map(FieldValue::Json)
            }
        }
    }
}

/// A device's parser, compiled once.
#[derive(Debug, Clone)]
pub enum Parser {
    Regex(Regex),
    Kv { separator: String, assign: String },
    Json,
}

impl Parser {
    /// Compiles the model's parser (regexes were validated at load; `Err` only for a config
    /// built by hand).
    pub fn new(p: &LineParser) -> Result<Parser, String> {
        Ok(match p {
            LineParser::Regex(r) => Parser::Regex(Regex::new(r).map_err(|e| e.to_string())?),
            LineParser::Kv { separator, assign } => Parser::Kv {
                separator: separator.clone(),
                assign: assign.clone(),
            },
            LineParser::Json => Parser::Json,
        })
    }

    /// The fields of `line`; `Err` with why the line does not fit this parser.
    pub fn fields(&self, line: &str) -> Result<Fields, String> {
        match self {
            Parser::Regex(re) => {
                let caps = re
                    .captures(line)
                    .ok_or_else(|| "does not match the regex".to_string())?;
                let map = re
                    .capture_names()
                    .flatten()
                    .filter_map(|n| {
                        caps.name(n)
                            .map(|m| (n.to_string(), m.as_str().to_string()))
                    })
                    .collect();
                Ok(Fields::Map(map))
            }
            Parser::Kv { separator, assign } => {
                let mut map = BTreeMap::new();
                for pair in line.split(separator.as_str()) {
                    let pair = pair.trim();
                    if pair.is_empty() {
                        continue;
                    }
                    if let Some((k, v)) = pair.split_once(assign.as_str()) {
                        map.insert(k.trim().to_string(), v.trim().to_string());
                    }
                }
                if map.is_empty() {
                    return Err(format!("no `key{assign}value` pair"));
                }
                Ok(Fields::Map(map))
            }
            Parser::Json => match serde_json::from_str::<serde_json::Value>(line.trim()) {
                Ok(v @ serde_json::Value::Object(_)) => Ok(Fields::Json(v)),
                Ok(_) => Err("is JSON but not an object".into()),
                Err(e) => Err(format!("is not JSON: {e}")),
            },
        }
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

/// One field converted to the point's type: `f64`, `i64`, `u64`, `bool` or string (`Ascii`).
pub fn convert(value: &FieldValue, data_type: DataType) -> Result<Raw, String> {
    use serde_json::Value as J;
    let text = match value {
        FieldValue::Text(t) => t.trim().to_string(),
        FieldValue::Json(J::String(s)) => s.trim().to_string(),
        FieldValue::Json(v) => v.to_string(),
    };
    let bad = |what: &str| format!("`{text}` is not {what}");
    match (data_type, value) {
        (DataType::Ascii(_), FieldValue::Json(J::String(s))) => Ok(Raw::Text(s.clone())),
        (DataType::Ascii(_), FieldValue::Text(t)) => Ok(Raw::Text(t.clone())),
        (DataType::Ascii(_), FieldValue::Json(v)) => Ok(Raw::Text(v.to_string())),
        (DataType::Bool, FieldValue::Json(J::Bool(b))) => Ok(Raw::Bool(*b)),
        (DataType::Bool, _) => parse_bool(&text)
            .map(Raw::Bool)
            .ok_or_else(|| bad("a bool (1/0, true/false, on/off, yes/no)")),
        (DataType::I64, _) => text
            .strip_prefix('+')
            .unwrap_or(&text)
            .parse::<i64>()
            .map(Raw::I64)
            .map_err(|_| bad("an integer")),
        (DataType::U64, _) => text
            .strip_prefix('+')
            .unwrap_or(&text)
            .parse::<u64>()
            .map(Raw::U64)
            .map_err(|_| bad("an unsigned integer")),
        _ => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Raw::F64(f)),
            _ => Err(bad("a finite number")),
        },
    }
}

/// A device's compiled line side: parser and checksum.
#[derive(Debug, Clone)]
pub struct DeviceParser {
    pub parser: Parser,
    pub checksum: Option<Checksum>,
}

/// Point index → raw value, or why that field is bad quality (as in a `Reading`).
pub type PointValues = Vec<(usize, Result<Raw, String>)>;

/// Why a line gave no reading for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoMatch {
    pub kind: BadKind,
    pub reason: String,
}

/// The point values of `line` for `device`: every point whose field is in the line (a field
/// present but not convertible is a bad-quality value with the reason). `Err` when the line is
/// not for this device: checksum wrong, parser does not match, or none of its fields present.
pub fn point_values(
    device: &Device,
    parser: &DeviceParser,
    line: &str,
) -> Result<PointValues, NoMatch> {
    let body = match parser.checksum {
        Some(Checksum::Nmea) => nmea_body(line).map_err(|reason| NoMatch {
            kind: BadKind::Checksum,
            reason,
        })?,
        None => line,
    };
    let unmatched = |reason: String| NoMatch {
        kind: BadKind::Unmatched,
        reason,
    };
    let fields = parser.parser.fields(body).map_err(unmatched)?;
    let Some(line_dev) = &device.line else {
        return Err(unmatched("not a line device".into()));
    };
    let mut out = Vec::new();
    for (i, (point, lp)) in device.points.iter().zip(&line_dev.points).enumerate() {
        if let Some(v) = fields.get(&lp.field) {
            out.push((
                i,
                convert(&v, point.data_type).map_err(|e| format!("parse: {e}")),
            ));
        }
    }
    if out.is_empty() {
        return Err(unmatched(
            "none of the device's fields is in the line".into(),
        ));
    }
    Ok(out)
}

/// One piece of a command template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `{value}` or `{value:.N}`.
    Value(Option<usize>),
}

/// A command template: text with `{value}` / `{value:.N}` (N decimals, floats only); `{{`
/// and `}}` for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(i) = rest.find(['{', '}']) {
            text.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("{{") {
                text.push('{');
                rest = after;
                continue;
            }
            if let Some(after) = tail.strip_prefix("}}") {
                text.push('}');
                rest = after;
                continue;
            }
            if tail.starts_with('}') {
                return Err("unmatched `}` (write `}}` for a literal brace)".into());
            }
            let close = tail
                .find('}')
                .ok_or("unmatched `{` (write `{{` for a literal brace)")?;
            let inner = &tail[1..close];
            let precision = match inner {
                "value" => None,
                _ => match inner.strip_prefix("value:.") {
                    Some(n) => Some(
                        n.parse::<usize>()
                            .ok()
                            .filter(|n| *n <= 17)
                            .ok_or_else(|| format!("`{{{inner}}}`: decimals are 0..=17"))?,
                    ),
                    None => {
                        return Err(format!(
                            "unknown placeholder `{{{inner}}}`: use {{value}} or {{value:.N}}"
                        ))
                    }
                },
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Value(precision));
            rest = &tail[close + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Value(_))) {
            return Err("the template has no {value}".into());
        }
        Ok(Template { pieces })
    }

    /// Whether a `{value:.N}` is used (only floats take decimals).
    pub fn has_precision(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Value(Some(_))))
    }

    /// The line for `raw`: floats shortest (or with N decimals), integers as is, bools 1/0,
    /// text as is (refused if it holds a control character: it could end the line early).
    pub fn render(&self, raw: &Raw) -> Result<String, String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Value(precision) => match (raw, precision) {
                    (Raw::F64(f), Some(n)) => {
                        let text = format!("{f:.n$}", n = *n);
                        // What the device is sent must be what the result reports: refuse a
                        // value that these decimals would round (21.46 with `{value:.1}`).
                        let back: f64 = text.parse().unwrap_or(f64::NAN);
                        // Float noise only (0.1 + 0.2 with one decimal is 0.3).
                        if (back - f).abs() > 4.0 * f64::EPSILON * f.abs() {
                            return Err(format!(
                                "{f} does not fit the command's {n} decimal(s) exactly (it would be sent as {text})"
                            ));
                        }
                        out.push_str(&text);
                    }
                    (Raw::F64(f), None) => out.push_str(&f.to_string()),
                    (Raw::I64(i), _) => out.push_str(&i.to_string()),
                    (Raw::U64(u), _) => out.push_str(&u.to_string()),
                    (Raw::Bool(b), _) => out.push(if *b { '1' } else { '0' }),
                    (Raw::Text(t), _) => {
                        if t.chars().any(char::is_control) {
                            return Err("text with a control character (line break, tab…) cannot be sent inside a line".into());
                        }
                        out.push_str(t);
                    }
                },
            }
        }
        Ok(out)
    }
}

/// Rate-limited reporting of bad lines: the first of each kind is logged in full, the rest
/// counted and summarised at most once per `every`.
#[derive(Debug)]
pub struct BadLines {
    every: Duration,
    /// Kind → (count since the last summary, total).
    counts: BTreeMap<BadKind, (u64, u64)>,
    last_summary: Instant,
}

impl BadLines {
    pub fn new(every: Duration, now: Instant) -> Self {
        BadLines {
            every,
            counts: BTreeMap::new(),
            last_summary: now,
        }
    }

    /// Counts one bad line; `true` when it should be logged in full (the first of its kind).
    pub fn note(&mut self, kind: BadKind) -> bool {
        let c = self.counts.entry(kind).or_default();
        c.0 += 1;
        c.1 += 1;
        c.1 == 1
    }

    /// Total of one kind.
    pub fn total(&self, kind: &BadKind) -> u64 {
        self.counts.get(kind).map_or(0, |c| c.1)
    }

    /// A summary (`unmatched=12 too_long=1`) of what was counted since the last one, when
    /// `every` has passed and there is something to say; resets the window.
    pub fn summary(&mut self, now: Instant) -> Option<String> {
        if now.duration_since(self.last_summary) < self.every {
            return None;
        }
        self.last_summary = now;
        let parts: Vec<String> = self
            .counts
            .iter()
            .filter(|(_, c)| c.0 > 0)
            .map(|(k, c)| format!("{}={}", k.name(), c.0))
            .collect();
        for c in self.counts.values_mut() {
            c.0 = 0;
        }
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &mut Splitter, bytes: &[u8]) -> Vec<Framed> {
        s.push(bytes)
    }

    #[test]
    fn escapes_resolve_to_control_bytes() {
        assert_eq!(unescape(r"READ?\r\n").unwrap(), "READ?\r\n");
        assert_eq!(unescape(r"a\tb\\c\x02").unwrap(), "a\tb\\c\u{2}");
        assert!(unescape(r"bad\q").is_err());
        assert!(unescape(r"bad\x4").is_err());
        assert!(unescape("end\\").is_err());
    }

    #[test]
    fn the_splitter_accepts_lf_and_crlf_and_keeps_partial_lines() {
        let mut s = Splitter::new(b"\n", 16);
        assert_eq!(
            lines(&mut s, b"T=1\r\nT="),
            vec![Framed::Line(b"T=1".to_vec())]
        );
        assert_eq!(
            lines(&mut s, b"2\n\n\nT=3\n"),
            vec![Framed::Line(b"T=2".to_vec()), Framed::Line(b"T=3".to_vec())]
        );
        let mut cr = Splitter::new(b"\r", 16);
        assert_eq!(
            lines(&mut cr, b"a\rb\r\nc\r"),
            vec![
                Framed::Line(b"a".to_vec()),
                Framed::Line(b"b".to_vec()),
                Framed::Line(b"c".to_vec())
            ]
        );
    }

    #[test]
    fn an_over_long_line_is_dropped_and_the_next_line_survives() {
        let mut s = Splitter::new(b"\r\n", 8);
        let mut input = vec![b'x'; 30];
        input.extend_from_slice(b"\r\nT=1\r\n");
        assert_eq!(
            lines(&mut s, &input),
            vec![Framed::TooLong(31), Framed::Line(b"T=1".to_vec())]
        );
        // Exactly max_line bytes plus CRLF is fine.
        assert_eq!(
            lines(&mut s, b"12345678\r\n"),
            vec![Framed::Line(b"12345678".to_vec())]
        );
        // Over-long across several pushes.
        assert_eq!(lines(&mut s, &[b'y'; 5]), vec![]);
        assert_eq!(lines(&mut s, &[b'y'; 5]), vec![]);
        assert_eq!(
            lines(&mut s, b"yy\nok\n"),
            vec![Framed::TooLong(12), Framed::Line(b"ok".to_vec())]
        );
    }

    #[test]
    fn invalid_utf8_is_refused_and_latin1_never_is() {
        assert!(decode(b"T=\xff", Encoding::Utf8).is_err());
        assert_eq!(decode(b"T=\xb0C", Encoding::Latin1).unwrap(), "T=°C");
        assert_eq!(decode("é".as_bytes(), Encoding::Utf8).unwrap(), "é");
        assert_eq!(encode("°", Encoding::Latin1).unwrap(), vec![0xB0]);
        assert!(encode("€", Encoding::Latin1).is_err());
    }

    #[test]
    fn nmea_checksums_are_verified_and_stripped() {
        let gga = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47";
        assert_eq!(
            nmea_body(gga).unwrap(),
            "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
        );
        assert!(nmea_body(&gga.replace("*47", "*48"))
            .unwrap_err()
            .contains("47 computed"));
        assert!(nmea_body("$GPGGA,1,2").is_err());
        assert!(nmea_body("$GPGGA,1*4").is_err());
        assert!(nmea_body("$GPGGA,1*zz").is_err());
        // Lowercase hex is accepted.
        assert!(nmea_body("$AB*03").is_ok());
        assert!(nmea_body("$AB*3").is_err());
    }

    fn map(pairs: &[(&str, &str)]) -> Fields {
        Fields::Map(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        )
    }

    #[test]
    fn parsers_turn_lines_into_named_fields() {
        let cases: Vec<(Parser, &str, Result<Fields, ()>)> = vec![
            (
                Parser::new(&LineParser::Regex(
                    r"T=(?P<temp>[-0-9.]+);H=(?P<hum>[0-9.]+)(;E=(?P<err>\d+))?".into(),
                ))
                .unwrap(),
                "T=-3.5;H=45.2",
                Ok(map(&[("temp", "-3.5"), ("hum", "45.2")])),
            ),
            (
                Parser::new(&LineParser::Regex(r"T=(?P<temp>[-0-9.]+)".into())).unwrap(),
                "garbage",
                Err(()),
            ),
            (
                Parser::Kv {
                    separator: ";".into(),
                    assign: "=".into(),
                },
                "T=23.41; H = 45.2;;flag",
                Ok(map(&[("T", "23.41"), ("H", "45.2")])),
            ),
            (
                Parser::Kv {
                    separator: ",".into(),
                    assign: ":".into(),
                },
                "no pairs here",
                Err(()),
            ),
            (
                Parser::Json,
                r#"{"t": 21.5, "s": {"ok": true}}"#,
                Ok(Fields::Json(
                    serde_json::json!({"t": 21.5, "s": {"ok": true}}),
                )),
            ),
            (Parser::Json, "[1, 2]", Err(())),
            (Parser::Json, "{\"t\": ", Err(())),
        ];
        for (parser, line, want) in cases {
            let got = parser.fields(line);
            match want {
                Ok(f) => assert_eq!(got.as_ref(), Ok(&f), "{line}"),
                Err(()) => assert!(got.is_err(), "{line}: {got:?}"),
            }
        }
    }

    #[test]
    fn json_fields_are_keys_or_pointers() {
        let f = Fields::Json(serde_json::json!({"t": 1, "a": [{"b": "x"}], "n": null}));
        assert_eq!(f.get("t"), Some(FieldValue::Json(serde_json::json!(1))));
        assert_eq!(
            f.get("/a/0/b"),
            Some(FieldValue::Json(serde_json::json!("x")))
        );
        assert_eq!(f.get("/a/1"), None);
        assert_eq!(f.get("n"), None, "null is absent");
    }

    #[test]
    fn fields_convert_to_the_point_type_or_say_why_not() {
        let t = |s: &str| FieldValue::Text(s.into());
        let j = FieldValue::Json;
        let ok = [
            (t(" 23.41 "), DataType::F64, Raw::F64(23.41)),
            (t("-4"), DataType::F64, Raw::F64(-4.0)),
            (t("+7"), DataType::I64, Raw::I64(7)),
            (t("-7"), DataType::I64, Raw::I64(-7)),
            (t("18446744073709551615"), DataType::U64, Raw::U64(u64::MAX)),
            (t("ON"), DataType::Bool, Raw::Bool(true)),
            (t("0"), DataType::Bool, Raw::Bool(false)),
            (t("ab c"), DataType::Ascii(1), Raw::Text("ab c".into())),
            (j(serde_json::json!(1.5)), DataType::F64, Raw::F64(1.5)),
            (j(serde_json::json!(3)), DataType::I64, Raw::I64(3)),
            (j(serde_json::json!(true)), DataType::Bool, Raw::Bool(true)),
            (j(serde_json::json!("21.5")), DataType::F64, Raw::F64(21.5)),
            (
                j(serde_json::json!("x")),
                DataType::Ascii(1),
                Raw::Text("x".into()),
            ),
            (
                j(serde_json::json!(2)),
                DataType::Ascii(1),
                Raw::Text("2".into()),
            ),
        ];
        for (v, dt, want) in ok {
            assert_eq!(convert(&v, dt), Ok(want), "{v:?} as {dt:?}");
        }
        for (v, dt) in [
            (t("abc"), DataType::F64),
            (t("nan"), DataType::F64),
            (t("inf"), DataType::F64),
            (t("1.5"), DataType::I64),
            (t("-1"), DataType::U64),
            (t("maybe"), DataType::Bool),
            (j(serde_json::json!(1.5)), DataType::I64),
        ] {
            assert!(convert(&v, dt).is_err(), "{v:?} as {dt:?}");
        }
    }

    #[test]
    fn templates_render_values_with_their_precision() {
        let t = Template::parse("SET {value:.1}\r\n").unwrap();
        assert!(t.has_precision());
        assert_eq!(t.render(&Raw::F64(21.5)).unwrap(), "SET 21.5\r\n");
        assert_eq!(t.render(&Raw::F64(21.0)).unwrap(), "SET 21.0\r\n");
        // 21.46 would go out as 21.5 while the result said 21.46: refused instead.
        assert!(t.render(&Raw::F64(21.46)).is_err());
        let t = Template::parse("R{{1}}={value}").unwrap();
        assert!(!t.has_precision());
        assert_eq!(t.render(&Raw::F64(0.1)).unwrap(), "R{1}=0.1");
        assert_eq!(t.render(&Raw::I64(-3)).unwrap(), "R{1}=-3");
        assert_eq!(t.render(&Raw::Bool(true)).unwrap(), "R{1}=1");
        assert_eq!(t.render(&Raw::Text("A B".into())).unwrap(), "R{1}=A B");
        assert!(t.render(&Raw::Text("A\nB".into())).is_err());
        for bad in [
            "SET",
            "SET {val}",
            "SET {value",
            "SET }",
            "{value:.x}",
            "{value:.99}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_lines_are_logged_once_per_kind_then_summarised() {
        let t0 = Instant::now();
        let mut b = BadLines::new(Duration::from_secs(60), t0);
        assert!(b.note(BadKind::Unmatched));
        assert!(!b.note(BadKind::Unmatched));
        assert!(b.note(BadKind::TooLong));
        assert_eq!(b.summary(t0 + Duration::from_secs(1)), None);
        assert_eq!(
            b.summary(t0 + Duration::from_secs(61)).as_deref(),
            Some("too_long=1 unmatched=2")
        );
        assert_eq!(b.summary(t0 + Duration::from_secs(200)), None);
        assert!(!b.note(BadKind::Unmatched));
        assert_eq!(b.total(&BadKind::Unmatched), 3);
    }
}
