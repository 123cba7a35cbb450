//! YAML loading and validation: `fieldbridge.yaml` → [`Config`].
//!
//! Two stages, as in ripgrep's low-level/high-level args:
//! 1. `raw`: serde structs mirroring the YAML, `deny_unknown_fields`, no logic. A YAML syntax
//!    error, an unknown key or a value of the wrong YAML type stops here with one error.
//! 2. Validation (`Validator` below): raw → [`Config`], collecting *every* error, each
//!    with its YAML path, line and column (found by `locate`), what is wrong and a hint.
//!    Nothing is coerced: a QoS of 3 or an address past 65535 is an error, never wrapped.
//!
//! Derived fields (rendered topics, the `default` poll group, the RTU frame gap) are computed
//! here so that runtime code never re-validates.

mod lines;
mod locate;
pub mod profile;
mod raw;
pub mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml::Value;

use crate::model::MqttSession;
use crate::model::{BitWrite, ClockPolicy, DeviceProfile, PointCommand, PointSource, Rate};
use crate::model::{
    Bus, BusKind, Config, DataType, Device, DeviceHa, Durability, Gateway, HomeAssistant, Http,
    HttpAuth, MessageMode, Mqtt, MqttProtocol, MqttTransport, Parity, PayloadFormat, Point,
    PointHa, PollGroup, PublishPolicy, Qos, RegisterKind, Secret, Serial, Server, Sparkplug, Store,
    Synchronous, TlsFiles, WhenFull, WordOrder,
};
use locate::{join_key, Locator};
use profile::{Library, MergedPoint};
use raw::{
    RawBus, RawCommand, RawConfig, RawDevice, RawHomeAssistant, RawHttp, RawMqtt, RawPoint,
    RawPointHa, RawProfileDevice, RawPublish, RawSparkplug, RawStore,
};

/// One problem found in the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// YAML path of the offending node, e.g. `devices[2].points[5].address`.
    pub path: String,
    /// 1-based line and column of the node, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub hint: Option<String>,
    /// The file the error is in when it is not the configuration itself (a profile).
    pub file: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(line), Some(col)) = (self.line, self.column) {
            write!(f, "{line}:{col}: ")?;
        }
        let path = if self.path.is_empty() {
            "(top level)"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// Every problem found in one configuration file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{}: {n} error{}",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            let file = e.file.as_deref().unwrap_or(&self.file);
            if e.line.is_some() {
                write!(f, "\n{file}:{e}")?;
            } else {
                write!(f, "\n{file}: {e}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// `warning: file:line:col: path: message (hint: ...)`, as `check` prints it.
pub fn warning_line(file: &str, w: &ConfigError) -> String {
    if w.line.is_some() {
        format!("warning: {file}:{w}")
    } else {
        format!("warning: {file}: {w}")
    }
}

/// Largest configuration file read, checked before parsing.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;

/// A configuration that loaded, with what is worth a warning (printed by `check`, logged at
/// start). A warning never contains a secret.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<ConfigError>,
}

/// Reads and validates the configuration file at `path`; profiles are looked up in its
/// `profiles/` directory, then in the shipped ones ([`Library::for_config`]).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_warnings(path).map(|l| l.config)
}

/// As [`load`], with the warnings.
pub fn load_with_warnings(path: &Path) -> Result<Loaded, ConfigErrors> {
    let loaded = load_with_library(path, &Library::for_config(path));
    release_freed_memory();
    loaded
}

/// Hands the heap pages freed after a load back to the system. Loading holds the whole
/// document several times over (the YAML events, the raw form, the position index: 18 MiB of
/// heap at 10k points) and frees it all before returning; glibc would keep the freed pages
/// for reuse. Measured with the boxed raw points, at 10k points: anonymous RSS at the end of
/// a run 19.6 -> 17.6 MiB (benches/README.md, issue 16).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// As [`load_with_warnings`], with profiles from `library`.
pub fn load_with_library(path: &Path, library: &Library) -> Result<Loaded, ConfigErrors> {
    let text = read_text(path)?;
    parse_with_library(&text, &path.display().to_string(), library)
}

/// The configuration file's text, at most [`MAX_FILE_BYTES`] of UTF-8.
pub fn read_text(path: &Path) -> Result<String, ConfigErrors> {
    let file = path.display().to_string();
    let whole = |message: String| ConfigErrors {
        file: file.clone(),
        errors: vec![ConfigError {
            path: String::new(),
            line: None,
            column: None,
            message,
            hint: None,
            file: None,
        }],
    };
    // Read at most one byte past the cap, whatever the path is (a FIFO, /dev/zero).
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| {
        use std::io::Read;
        f.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut bytes)
    });
    if let Err(e) = read {
        return Err(whole(format!("cannot read the file: {e}")));
    }
    if bytes.len() > MAX_FILE_BYTES {
        let size = std::fs::metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map_or_else(|| "or more".to_string(), |m| format!("{} bytes", m.len()));
        return Err(too_large(&file, &size));
    }
    String::from_utf8(bytes).map_err(|e| whole(format!("cannot read the file: {e}")))
}

fn too_large(file: &str, size: &str) -> ConfigErrors {
    ConfigErrors {
        file: file.to_string(),
        errors: vec![ConfigError {
            path: String::new(),
            line: None,
            column: None,
            message: format!(
                "the file is larger than {} MiB ({size})",
                MAX_FILE_BYTES >> 20
            ),
            hint: Some(
                "a configuration is a few hundred KiB at most: is this the right file?".into(),
            ),
            file: None,
        }],
    }
}

/// Validates configuration text. `file_name` is only used in messages; relative paths in the
/// text (`password_file`, TLS files) are resolved against the current directory.
pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigErrors> {
    parse_with_warnings(text, file_name).map(|l| l.config)
}

/// As [`parse`], with the warnings. Profiles come from the shipped directory only
/// ([`Library::shipped`]): the text has no directory of its own.
pub fn parse_with_warnings(text: &str, file_name: &str) -> Result<Loaded, ConfigErrors> {
    parse_with_library(text, file_name, &Library::shipped())
}

/// As [`parse_with_warnings`], with profiles from `library`.
pub fn parse_with_library(
    text: &str,
    file_name: &str,
    library: &Library,
) -> Result<Loaded, ConfigErrors> {
    parse_discovered(text, file_name, library, &Discoveries::new())
}

/// As [`parse_with_library`], with the points SunSpec discovery found on the `sunspec: auto`
/// devices named in `discovered`.
pub fn parse_discovered(
    text: &str,
    file_name: &str,
    library: &Library,
    discovered: &Discoveries,
) -> Result<Loaded, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: file_name.to_string(),
        errors,
    };
    if text.len() > MAX_FILE_BYTES {
        return Err(too_large(file_name, &format!("{} bytes", text.len())));
    }
    if text.trim().is_empty() {
        return Err(fail(vec![ConfigError {
            path: String::new(),
            line: None,
            column: None,
            message: "the file is empty".into(),
            hint: Some("start from the commented reference config/fieldbridge.yaml".into()),
            file: None,
        }]));
    }
    // Before the YAML reader, which expands every alias.
    let loc = Locator::new(text);
    if let Some(over) = loc.too_many_nodes {
        let (message, hint) = if over.by_alias {
            (
                format!("aliases expand the file to more than {} YAML nodes", locate::MAX_NODES),
                "each alias (`*name`) repeats the whole node of its anchor: alias smaller nodes, or write the repeated parts out",
            )
        } else {
            (
                format!("the file has more than {} YAML nodes", locate::MAX_NODES),
                "a configuration has a few thousand points at most: is this the right file?",
            )
        };
        return Err(fail(vec![ConfigError {
            path: String::new(),
            line: Some(over.pos.line),
            column: Some(over.pos.column),
            message,
            hint: Some(hint.into()),
            file: None,
        }]));
    }
    let raw: RawConfig = match yaml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(fail(vec![from_serde(&e)])),
    };
    let mut v = Validator {
        loc,
        errors: Vec::new(),
        warnings: Vec::new(),
        library: library.clone(),
        profiles: profile::Cache::new(),
        current: None,
        discovered,
    };
    let config = v.config(raw);
    if v.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: v.warnings,
        })
    } else {
        let mut errors = v.errors;
        // The configuration's errors first, then each profile's; a profile used by several
        // devices reports a problem of its own once.
        errors.sort_by(|a, b| {
            (
                a.file.is_some(),
                &a.file,
                a.line.unwrap_or(usize::MAX),
                a.column.unwrap_or(0),
            )
                .cmp(&(
                    b.file.is_some(),
                    &b.file,
                    b.line.unwrap_or(usize::MAX),
                    b.column.unwrap_or(0),
                ))
        });
        errors.dedup();
        Err(fail(errors))
    }
}

/// The silent interval between RTU frames (3.5 characters; 1.75 ms above 19200 baud), the
/// minimum of a bus's `frame_gap`. One definition, shared with the planner's bus-time estimate.
pub use crate::plan::frame_gap_for_baud;

// ---------------------------------------------------------------------------------------------
// serde errors

/// Turns the YAML reader's error into a [`ConfigError`] with a friendlier message.
fn from_serde(e: &yaml::Error) -> ConfigError {
    let (line, column) = match e.pos {
        Some(p) => (Some(p.line), Some(p.column)),
        None => (None, None),
    };
    let mut path = e.path.clone();
    let mut msg = e.message.clone();
    let mut hint = None;
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (key, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let key = key.to_string();
        let mut h = String::new();
        if let Some(best) = closest(&key, &expected) {
            h.push_str(&format!("did you mean `{best}`? "));
        }
        if !expected.is_empty() {
            h.push_str(&format!("expected one of: {}", expected.join(", ")));
        }
        hint = (!h.is_empty()).then_some(h.trim_end().to_string());
        path = join_key(&path, &key);
        msg = format!("unknown key `{key}`");
    } else if let Some(rest) = msg.strip_prefix("missing field `") {
        let key = rest.trim_end_matches('`').to_string();
        path = join_key(&path, &key);
        msg = format!("required key `{key}` is missing");
    } else if let Some(rest) = msg.strip_prefix("duplicate field `") {
        let key = rest.trim_end_matches('`').to_string();
        path = join_key(&path, &key);
        msg = format!("key `{key}` is given twice");
        hint = Some("keep one of them".into());
    } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        for (from, to) in [
            ("expected i64", "expected an integer"),
            ("expected f64", "expected a number"),
            ("expected a boolean", "expected true or false"),
            (
                "expected a YAML mapping",
                "expected a mapping (`key: value` lines)",
            ),
            ("expected a sequence", "expected a list (`- item` lines)"),
        ] {
            msg = msg.replace(from, to);
        }
        if let Some(i) = msg.find("expected struct Raw") {
            msg.truncate(i);
            msg.push_str("expected a mapping (`key: value` lines)");
        }
        if msg.contains("expected true or false") {
            hint = Some("YAML 1.2: only true and false are booleans (not yes/no/on/off)".into());
        }
    } else if msg.starts_with("duplicate entry") {
        hint = Some("each key may appear once in a mapping".into());
    }
    ConfigError {
        path,
        line,
        column,
        message: msg,
        hint,
        file: None,
    }
}

/// The candidate nearest to `word` by edit distance, if it is plausibly a typo of it.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, c)| *d <= (word.len().max(c.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

// ---------------------------------------------------------------------------------------------
// small validators

/// Upper bounds of config values (README "Limits and bounds"): nothing in the file may stall
/// a task past the watchdog, overflow a wire field, or make the gateway hold unbounded memory.
const MAX_FRAME_GAP: Duration = Duration::from_secs(1);
/// Poll intervals, heartbeats, the stats period and command `max_age`.
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
const INTERVAL_WHY: &str = "poll at least once a day (a slower device's status would go stale)";
/// Modbus request timeout (line devices: 1h, see `lines.rs`).
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Bus reconnect back-off cap (a device's poll back-off: 12 times this).
const MAX_BACKOFF: Duration = Duration::from_secs(300);
pub const MAX_PACKET_SIZE: i64 = 16 * 1024 * 1024;
pub const MAX_QUEUE_CAPACITY: i64 = 200_000;
pub const MAX_SPILL_THRESHOLD: i64 = 100_000;
/// Write Multiple Registers (0x10) carries at most 123 registers (Modbus Application Protocol
/// v1.1b3 §6.12); a read (0x03/0x04) up to 125 (§6.3, §6.4).
pub const MAX_WRITE_REGISTERS: u16 = 123;
/// MQTT strings and binary data have a 2-byte length (MQTT 3.1.1 §1.5.3, §3.1.3.5).
const MAX_MQTT_STRING: usize = 65_535;
/// TLS files (CA bundle, certificate, key), read whole when connecting.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

const DURATION_HINT: &str = "use a number and a unit without spaces: 500ms, 1s, 2m";

/// `500ms`, `1s`, `2m`, `1h`, `7d`, `250us`, or a sum like `1m30s`. No spaces, no fractions.
fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let one = match &rest[..unit_len] {
            "us" | "µs" => Duration::from_micros(1),
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return None,
        };
        total = total.checked_add(one.checked_mul(u32::try_from(n).ok()?)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Short human form of a duration, in the syntax the config accepts.
fn fmt_duration(d: Duration) -> String {
    // Rounded up: a printed minimum must itself be accepted.
    let us = d.as_nanos().div_ceil(1000);
    if !us.is_multiple_of(1000) {
        format!("{us}us")
    } else if !us.is_multiple_of(1_000_000) || us == 0 {
        format!("{}ms", us / 1000)
    } else {
        format!("{}s", us / 1_000_000)
    }
}

/// A bound in the largest unit that states it exactly (`24h`, `5m`, `1s`, `1750us`).
fn fmt_bound(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() == 0 && s > 0 {
        for (unit, n) in [("h", 3600), ("m", 60)] {
            if s.is_multiple_of(n) {
                return format!("{}{unit}", s / n);
            }
        }
    }
    fmt_duration(d)
}

/// A name used as one topic level (gateway id, device and point names).
fn check_level(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_whitespace())
    {
        let shown = match c {
            '\0' => "NUL".to_string(),
            c if c.is_whitespace() => "whitespace".to_string(),
            c => format!("`{c}`"),
        };
        return Err(format!(
            "`{name}` contains {shown}, which a single topic level cannot"
        ));
    }
    Ok(())
}

/// A topic filter (MQTT 3.1.1 §4.7.1): `#` only as the last level, `+` and `#` alone in
/// their level, no NUL, not empty.
fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() || filter.len() > 1024 {
        return Err("a filter is 1 to 1024 bytes".into());
    }
    if filter.contains('\0') {
        return Err(format!("filter `{filter}` contains NUL"));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let wild = l.contains(['+', '#']);
        if wild && l.len() > 1 {
            return Err(format!(
                "filter `{filter}`: `+` and `#` must stand alone in their level"
            ));
        }
        if *l == "#" && i + 1 != levels.len() {
            return Err(format!("filter `{filter}`: `#` must be the last level"));
        }
    }
    Ok(())
}

/// A topic we publish to (MQTT 3.1.1 §4.7: no wildcards in publish topics, no NUL).
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic is empty".into());
    }
    if topic.len() > 65_535 {
        return Err("the topic is longer than 65535 bytes".into());
    }
    if let Some(c) = topic.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        let c = if c == '\0' {
            "NUL".to_string()
        } else {
            format!("`{c}`")
        };
        return Err(format!(
            "topic `{topic}` contains {c}, which is not allowed when publishing"
        ));
    }
    if topic.split('/').any(str::is_empty) {
        return Err(format!(
            "topic `{topic}` has an empty level (leading, trailing or double `/`)"
        ));
    }
    if topic.starts_with('$') {
        return Err(format!(
            "topic `{topic}` starts with `$`, which brokers reserve for themselves"
        ));
    }
    Ok(())
}

/// Substitutes `{name}` placeholders from `vars`; any other placeholder is an error.
fn render(template: &str, vars: &[(&str, &str)]) -> Result<String, (String, String)> {
    let allowed = || {
        vars.iter()
            .map(|(k, _)| format!("{{{k}}}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        out.push_str(&rest[..open]);
        if rest[open..].starts_with('}') {
            return Err((
                "unmatched `}`".into(),
                format!("placeholders are {}", allowed()),
            ));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err((
                "unmatched `{`".into(),
                format!("placeholders are {}", allowed()),
            ));
        };
        let name = &rest[open + 1..open + close];
        match vars.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => out.push_str(v),
            None => {
                return Err((
                    format!("unknown placeholder `{{{name}}}`"),
                    format!("placeholders allowed here: {}", allowed()),
                ))
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// stage 2

struct Validator<'a> {
    loc: Locator,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    library: Library,
    /// Profiles read so far, by name.
    profiles: profile::Cache,
    /// Set while the keys of a profile are checked: errors then name its file and lines.
    current: Option<std::rc::Rc<profile::Source>>,
    /// What SunSpec discovery found on the `sunspec: auto` devices, by (name, bus, unit).
    discovered: &'a Discoveries,
}

/// What SunSpec discovery found, by device (name, bus name, unit), kept by the running
/// gateway: a device moved to another bus or unit is another device, discovered again.
pub type Discoveries = HashMap<(String, String, i64), std::sync::Arc<crate::sunspec::Discovered>>;

/// The [`Discoveries`] keys of a configuration's `sunspec: auto` devices.
pub fn discovery_keys(config: &Config) -> std::collections::HashSet<(String, String, i64)> {
    config
        .devices
        .iter()
        .filter(|d| d.sunspec.is_some())
        .map(|d| {
            let bus = config.buses[d.bus].name.clone();
            (d.name.clone(), bus, i64::from(d.unit))
        })
        .collect()
}

/// How the collision table names command topics (the wildcard check skips them).
const COMMAND_TOPIC_OF: &str = "the command topic of";

/// What a topic in the collision table belongs to.
struct TopicOwner {
    what: String,
    path: String,
}

impl Validator<'_> {
    /// The locator of the file being checked (a profile's, while its keys are), and its name
    /// when it is not the configuration.
    fn here(&self) -> (&Locator, Option<String>) {
        match &self.current {
            Some(s) => (&s.loc, Some(s.file.clone())),
            None => (&self.loc, None),
        }
    }

    fn err(&mut self, path: &str, message: impl Into<String>, hint: Option<String>) {
        let (loc, file) = self.here();
        let pos = loc.value(path);
        self.errors.push(ConfigError {
            path: path.to_string(),
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            message: message.into(),
            hint,
            file,
        });
    }

    fn err_at_key(&mut self, path: &str, message: impl Into<String>, hint: Option<String>) {
        let (loc, file) = self.here();
        let pos = loc.key(path);
        self.errors.push(ConfigError {
            path: path.to_string(),
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            message: message.into(),
            hint,
            file,
        });
    }

    fn int(&mut self, path: &str, v: Option<i64>, default: i64, lo: i64, hi: i64) -> i64 {
        match v {
            None => default,
            Some(n) if (lo..=hi).contains(&n) => n,
            Some(n) => {
                self.err(path, format!("{n} is outside {lo}..={hi}"), None);
                default
            }
        }
    }

    fn duration(&mut self, path: &str, v: Option<&Value>, default: Duration) -> Duration {
        self.opt_duration(path, v).unwrap_or(default)
    }

    fn opt_duration(&mut self, path: &str, v: Option<&Value>) -> Option<Duration> {
        match v? {
            Value::String(s) => match parse_duration(s) {
                Some(d) => Some(d),
                None => {
                    self.err(
                        path,
                        format!("`{s}` is not a duration"),
                        Some(DURATION_HINT.into()),
                    );
                    None
                }
            },
            Value::Number(n) => {
                self.err(
                    path,
                    format!("`{n}` has no unit"),
                    Some(format!("{DURATION_HINT} (e.g. `{n}s` or `{n}ms`)")),
                );
                None
            }
            _ => {
                self.err(path, "expected a duration", Some(DURATION_HINT.into()));
                None
            }
        }
    }

    /// A duration that must be at least `min`.
    fn duration_min(
        &mut self,
        path: &str,
        v: Option<&Value>,
        default: Duration,
        min: Duration,
    ) -> Duration {
        let d = self.duration(path, v, default);
        if d < min {
            self.err(
                path,
                format!(
                    "{} is shorter than the minimum {}",
                    fmt_duration(d),
                    fmt_duration(min)
                ),
                None,
            );
            return default;
        }
        d
    }

    /// A duration between `min` and `max`; `why` says what a longer one would break.
    fn duration_range(
        &mut self,
        path: &str,
        v: Option<&Value>,
        default: Duration,
        min: Duration,
        max: Duration,
        why: &str,
    ) -> Duration {
        let d = self.duration_min(path, v, default, min);
        self.check_max(path, v, d, max, why).unwrap_or(default)
    }

    /// `Some(d)` if `d` is at most `max`, else reported (naming the value as written).
    fn check_max(
        &mut self,
        path: &str,
        v: Option<&Value>,
        d: Duration,
        max: Duration,
        why: &str,
    ) -> Option<Duration> {
        if d <= max {
            return Some(d);
        }
        let shown = match v {
            Some(Value::String(s)) => s.clone(),
            _ => fmt_bound(d),
        };
        self.err(
            path,
            format!("{shown} is longer than the maximum {}", fmt_bound(max)),
            Some(why.to_string()),
        );
        None
    }

    /// An optional duration of at most `max`.
    fn opt_duration_max(
        &mut self,
        path: &str,
        v: Option<&Value>,
        max: Duration,
        why: &str,
    ) -> Option<Duration> {
        let d = self.opt_duration(path, v)?;
        self.check_max(path, v, d, max, why)
    }

    /// An integer in `lo..=hi`, with a hint when it is not.
    fn int_why(
        &mut self,
        path: &str,
        v: Option<i64>,
        default: i64,
        lo: i64,
        hi: i64,
        why: &str,
    ) -> i64 {
        match v {
            Some(n) if !(lo..=hi).contains(&n) => {
                self.err(
                    path,
                    format!("{n} is outside {lo}..={hi}"),
                    Some(why.into()),
                );
                default
            }
            _ => self.int(path, v, default, lo, hi),
        }
    }

    fn warn(&mut self, path: &str, message: impl Into<String>, hint: Option<String>) {
        let (loc, file) = self.here();
        let pos = loc.value(path);
        self.warnings.push(ConfigError {
            path: path.to_string(),
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            message: message.into(),
            hint,
            file,
        });
    }

    fn choice<T: Copy>(
        &mut self,
        path: &str,
        v: Option<&str>,
        default: T,
        allowed: &[(&str, T)],
    ) -> T {
        let Some(s) = v else { return default };
        match allowed.iter().find(|(name, _)| *name == s) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
                self.err(
                    path,
                    format!("`{s}` is not one of {}", names.join(", ")),
                    closest(s, &names).map(|c| format!("did you mean `{c}`?")),
                );
                default
            }
        }
    }

    fn level(&mut self, path: &str, name: &str) {
        if let Err(e) = check_level(name) {
            self.err(
                path,
                format!("name {e}"),
                Some(
                    "names become one MQTT topic level: use letters, digits, `-`, `_`, `.`".into(),
                ),
            );
        }
    }

    /// Renders and checks a topic template; `None` (already reported) when it is not usable.
    fn topic(&mut self, path: &str, template: &str, vars: &[(&str, &str)]) -> Option<String> {
        match render(template, vars) {
            Ok(t) => match check_topic(&t) {
                Ok(()) => Some(t),
                Err(e) => {
                    self.err(path, e, None);
                    None
                }
            },
            Err((msg, hint)) => {
                self.err(path, msg, Some(hint));
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        // gateway
        let g = raw.gateway;
        self.level("gateway.id", &g.id);
        let explicit_prefix = g.prefix.is_some();
        let prefix = g.prefix.unwrap_or_else(|| g.id.clone());
        // A prefix taken from a bad id is already reported as the id.
        let checked = explicit_prefix || check_level(&g.id).is_ok();
        if let (true, Err(e)) = (checked, check_topic(&prefix)) {
            let path = if explicit_prefix {
                "gateway.prefix"
            } else {
                "gateway.id"
            };
            self.err(
                path,
                format!("prefix: {e}"),
                Some("the prefix is one or more topic levels, like plant/hall3".into()),
            );
        }
        let log_level = g.log_level.unwrap_or_else(|| "info".into());
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        // A filter takes a bare word as a target name (`verbose` = all of target `verbose`);
        // here that is almost always a mistyped level.
        if let Some(bad) = log_level
            .split(',')
            .map(str::trim)
            .find(|d| !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()))
        {
            self.err(
                "gateway.log_level",
                format!("`{bad}` is not a level"),
                Some("levels are off, error, warn, info, debug, trace; for one module write e.g. fieldbridge::modbus=debug".into()),
            );
        } else if let Err(e) = crate::logging::parse_filter(&log_level) {
            self.err(
                "gateway.log_level",
                format!("`{log_level}` is not a log filter: {e}"),
                Some("use error, warn, info, debug, trace, or e.g. info,fieldbridge=debug".into()),
            );
        }
        let stats_interval = match &g.stats_interval {
            Some(Value::String(s)) if s == "none" => None,
            v => Some(self.duration_range(
                "gateway.stats_interval",
                v.as_ref(),
                Duration::from_secs(60),
                Duration::from_secs(1),
                MAX_INTERVAL,
                "the stats topic would go stale for more than a day; `none` turns it off",
            )),
        };
        let clock = match g.clock.as_deref() {
            None | Some("ntp") => ClockPolicy::Ntp,
            Some("local") => ClockPolicy::Local,
            Some(other) => {
                self.err(
                    "gateway.clock",
                    format!("`{other}` is not a clock policy"),
                    Some("ntp (default: commands with a time need an NTP-synchronised clock) or local (a real-time clock is trusted)".into()),
                );
                ClockPolicy::Ntp
            }
        };
        let gateway = Gateway {
            id: g.id,
            prefix,
            log_level,
            stats_interval,
            clock,
        };

        let mqtt = self.mqtt(raw.mqtt, &gateway);

        // buses
        let mut buses = Vec::new();
        let mut bus_names: HashMap<String, usize> = HashMap::new();
        for (i, rb) in raw.buses.into_iter().enumerate() {
            let path = format!("buses[{i}]");
            if let Some(first) = bus_names.get(&rb.name) {
                self.err(
                    &format!("{path}.name"),
                    format!("bus name `{}` is already used by buses[{first}]", rb.name),
                    Some("bus names must be unique".into()),
                );
            } else {
                bus_names.insert(rb.name.clone(), i);
            }
            buses.push(self.bus(&path, rb));
        }
        if buses.is_empty() {
            self.err(
                "buses",
                "no bus is defined",
                Some("add a bus (type rtu, tcp, rtu_over_tcp or lines)".into()),
            );
        }

        // devices
        let mut devices = Vec::new();
        let mut device_names: HashMap<String, usize> = HashMap::new();
        let mut units: HashMap<(usize, u8), String> = HashMap::new();
        let mut topics: HashMap<String, TopicOwner> = HashMap::new();
        topics.insert(
            mqtt.status_topic.clone(),
            TopicOwner {
                what: "the gateway status topic".into(),
                path: "mqtt.status_topic".into(),
            },
        );
        for (i, rd) in raw.devices.into_iter().enumerate() {
            let path = format!("devices[{i}]");
            if let Some(first) = device_names.get(&rd.name) {
                self.err(
                    &format!("{path}.name"),
                    format!(
                        "device name `{}` is already used by devices[{first}]",
                        rd.name
                    ),
                    Some("device names must be unique (they are topic levels)".into()),
                );
            } else {
                device_names.insert(rd.name.clone(), i);
            }
            let bus = match bus_names.get(&rd.bus) {
                Some(b) => Some(*b),
                None => {
                    let mut known: Vec<&str> = bus_names.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    self.err(
                        &format!("{path}.bus"),
                        format!("no bus is named `{}`", rd.bus),
                        Some(match closest(&rd.bus, &known) {
                            Some(c) => format!("did you mean `{c}`?"),
                            None => format!("defined buses: {}", known.join(", ")),
                        }),
                    );
                    None
                }
            };
            let duplicate = device_names.get(&rd.name) != Some(&i);
            let (device, unit_ok, point_paths) =
                self.device(&path, rd, bus.map(|b| &buses[b]), &gateway);
            if let (Some(b), true) = (bus, unit_ok) {
                let unit_path = format!("{path}.unit");
                if let Some(other) = units.get(&(b, device.unit)) {
                    self.err(
                        &unit_path,
                        format!(
                            "unit {} on bus `{}` is already used by device `{other}`",
                            device.unit, buses[b].name
                        ),
                        Some("each device on a bus needs its own unit id".into()),
                    );
                } else {
                    units.insert((b, device.unit), device.name.clone());
                }
            }
            if !duplicate {
                // A second device of the same name collides everywhere: said once above.
                self.claim_topics(&path, &device, &point_paths, &mut topics);
            }
            devices.push(Device {
                bus: bus.unwrap_or(0),
                ..device
            });
        }
        if devices.is_empty() {
            self.err(
                "devices",
                "no device is defined",
                Some("add a device with at least one point".into()),
            );
        }

        // The command router also subscribes to the default-template wildcard (so that a
        // command for an unknown or read-only point gets a result): nothing the gateway
        // publishes may match it, or it would read its own messages as commands.
        let filter = crate::command::wildcard_filter(&gateway.prefix);
        let mut shadowed: Vec<(&String, &TopicOwner)> = topics
            .iter()
            .filter(|(t, o)| {
                !o.what.starts_with(COMMAND_TOPIC_OF) && crate::command::topic_matches(&filter, t)
            })
            .collect();
        shadowed.sort_by(|a, b| a.1.path.cmp(&b.1.path));
        let shadowed: Vec<(String, String, String)> = shadowed
            .into_iter()
            .map(|(t, o)| (t.clone(), o.what.clone(), o.path.clone()))
            .collect();
        for (topic, what, path) in shadowed {
            self.err(
                &path,
                format!("topic `{topic}` of {what} matches the command filter `{filter}`"),
                Some("the gateway would receive its own messages as commands: choose a topic that does not end in `/set` three levels below the prefix".into()),
            );
        }

        let store = self.store(raw.store);
        let sparkplug = raw.sparkplug.map(|s| self.sparkplug(s));
        let homeassistant = raw.homeassistant.and_then(|h| self.homeassistant(h));
        if homeassistant.is_some() && sparkplug.is_some() {
            self.err(
                "homeassistant",
                "Home Assistant discovery announces the JSON topics, which Sparkplug mode does not publish",
                Some("use one of `sparkplug` and `homeassistant`".into()),
            );
        }
        if sparkplug.is_some() {
            for (i, d) in devices.iter().enumerate() {
                if d.sunspec.is_some() {
                    self.err(
                        &format!("devices[{i}].sunspec"),
                        "SunSpec discovery changes a device's metrics at run time, which Sparkplug births do not allow",
                        Some("list the device's points (`fieldbridge sunspec` prints them), or use the JSON mode".into()),
                    );
                }
            }
        }
        let http = raw.http.and_then(|h| self.http(h));
        Config {
            gateway,
            mqtt,
            buses,
            devices,
            store,
            sparkplug,
            homeassistant,
            http,
        }
    }

    /// `http:`: where the endpoint listens and the credentials it asks for.
    fn http(&mut self, raw: RawHttp) -> Option<Http> {
        let text = raw.listen.unwrap_or_else(|| "127.0.0.1:9105".into());
        let listen = match text.parse::<std::net::SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    "http.listen",
                    format!("`{text}` is not an address and port"),
                    Some(
                        "e.g. 127.0.0.1:9105 (loopback only) or 0.0.0.0:9105 with token_file"
                            .into(),
                    ),
                );
                None
            }
        };
        let auth = match (&raw.token_file, &raw.basic_auth_file) {
            (Some(_), Some(_)) => {
                self.err(
                    "http.basic_auth_file",
                    "both token_file and basic_auth_file are given",
                    Some("use one of them".into()),
                );
                None
            }
            (Some(f), None) => self
                .secret_file("http.token_file", Path::new(f), &format!("`{f}`"))
                .map(|t| HttpAuth::Bearer(Secret(t))),
            (None, Some(f)) => {
                let pair =
                    self.secret_file("http.basic_auth_file", Path::new(f), &format!("`{f}`"));
                match pair {
                    Some(p) if p.contains(':') && !p.starts_with(':') => {
                        Some(HttpAuth::Basic(Secret(p)))
                    }
                    Some(_) => {
                        self.err(
                            "http.basic_auth_file",
                            format!("`{f}` does not hold `user:password`"),
                            Some("one line: the user name, a colon, the password".into()),
                        );
                        None
                    }
                    None => None,
                }
            }
            (None, None) => None,
        };
        let max_connections = match raw.max_connections {
            None => 8,
            Some(n) if (1..=64).contains(&n) => n as usize,
            Some(n) => {
                self.err(
                    "http.max_connections",
                    format!("{n} is out of range"),
                    Some("1 to 64 (each connection is served in turn; 8 is plenty)".into()),
                );
                8
            }
        };
        let listen = listen?;
        let credentials = raw.token_file.is_some() || raw.basic_auth_file.is_some();
        if !listen.ip().is_loopback() && !credentials {
            self.err(
                "http.listen",
                format!("`{listen}` is reachable from the network, and no credentials are set"),
                Some("add token_file (a bearer token) or basic_auth_file (user:password), or listen on 127.0.0.1".into()),
            );
            return None;
        }
        if credentials && auth.is_none() {
            return None;
        }
        Some(Http {
            listen,
            auth,
            max_connections,
        })
    }

    fn homeassistant(&mut self, raw: RawHomeAssistant) -> Option<HomeAssistant> {
        let prefix = raw.prefix.unwrap_or_else(|| "homeassistant".into());
        if let Err(e) = check_topic(&prefix) {
            self.err("homeassistant.prefix", e, None);
        }
        raw.discovery
            .unwrap_or(true)
            .then_some(HomeAssistant { prefix })
    }

    /// A point's `homeassistant:` (`false`, or overrides).
    fn point_ha(&mut self, path: &str, raw: Option<RawPointHa>) -> PointHa {
        let s = match raw {
            None | Some(RawPointHa::Enabled(true)) => return PointHa::default(),
            Some(RawPointHa::Enabled(false)) => {
                return PointHa {
                    enabled: false,
                    ..PointHa::default()
                }
            }
            Some(RawPointHa::Settings(s)) => s,
        };
        let state_class = s.state_class.map(|c| {
            let allowed = ["measurement", "total", "total_increasing"];
            if !allowed.contains(&c.as_str()) {
                self.err(
                    &format!("{path}.homeassistant.state_class"),
                    format!("`{c}` is not one of {}", allowed.join(", ")),
                    closest(&c, &allowed).map(|a| format!("did you mean `{a}`?")),
                );
            }
            c
        });
        let entity_category = s.entity_category.map(|c| {
            let allowed = ["config", "diagnostic"];
            if !allowed.contains(&c.as_str()) {
                self.err(
                    &format!("{path}.homeassistant.entity_category"),
                    format!("`{c}` is not one of {}", allowed.join(", ")),
                    None,
                );
            }
            c
        });
        for (key, v) in [
            ("device_class", &s.device_class),
            ("icon", &s.icon),
            ("name", &s.name),
        ] {
            if v.as_ref()
                .is_some_and(|v| v.trim().is_empty() || v.len() > 255)
            {
                self.err(
                    &format!("{path}.homeassistant.{key}"),
                    "empty or longer than 255 bytes",
                    None,
                );
            }
        }
        if let Some(icon) = &s.icon {
            if !icon.contains(':') {
                self.err(
                    &format!("{path}.homeassistant.icon"),
                    format!("`{icon}` is not an icon name"),
                    Some("e.g. `mdi:flash`".into()),
                );
            }
        }
        PointHa {
            enabled: true,
            device_class: s.device_class,
            state_class,
            entity_category,
            icon: s.icon,
            name: s.name,
        }
    }

    fn sparkplug(&mut self, raw: RawSparkplug) -> Sparkplug {
        // Sparkplug 3.0 §4.1.1: ids are UTF-8 without `+`, `/` or `#`.
        for (path, id) in [
            ("sparkplug.group_id", Some(&raw.group_id)),
            ("sparkplug.edge_node_id", Some(&raw.edge_node_id)),
            ("sparkplug.primary_host_id", raw.primary_host_id.as_ref()),
        ] {
            if let Some(id) = id {
                self.level(path, id);
            }
        }
        let data_qos = match raw.data_qos {
            None | Some(0) => Qos::AtMostOnce,
            Some(1) => Qos::AtLeastOnce,
            Some(n) => {
                self.err(
                    "sparkplug.data_qos",
                    format!("{n} is not 0 or 1"),
                    Some("0 as the Sparkplug specification demands; 1 (outside it) for PUBACK-tracked delivery".into()),
                );
                Qos::AtMostOnce
            }
        };
        Sparkplug {
            group_id: raw.group_id,
            edge_node_id: raw.edge_node_id,
            primary_host_id: raw.primary_host_id,
            data_qos,
        }
    }

    fn store(&mut self, raw: Option<RawStore>) -> Store {
        let raw = raw.unwrap_or(RawStore {
            path: None,
            max_bytes: None,
            max_age: None,
            durability: None,
            spill_threshold: None,
            commit_every: None,
            commit_interval: None,
            synchronous: None,
        });
        let path = match raw.path.as_deref() {
            None => Some(Store::default_path()),
            Some("none") => None,
            Some("") => {
                self.err(
                    "store.path",
                    "the path is empty",
                    Some("give a file path, or `none` for no store (memory queue only)".into()),
                );
                None
            }
            Some(p) => Some(PathBuf::from(p)),
        };
        const MIB: i64 = 1024 * 1024;
        let max_bytes = self.int(
            "store.max_bytes",
            raw.max_bytes,
            256 * MIB,
            16 * 1024,
            1 << 40,
        ) as u64;
        let max_age = match &raw.max_age {
            Some(Value::String(s)) if s == "none" => None,
            v => self.opt_duration_max(
                "store.max_age",
                v.as_ref(),
                Duration::from_secs(87_600 * 3600),
                "ten years at most; `none` keeps messages until the size cap drops them",
            ),
        };
        let durability = self.choice(
            "store.durability",
            raw.durability.as_deref(),
            Durability::Auto,
            &[("auto", Durability::Auto), ("always", Durability::Always)],
        );
        let spill_threshold = self.int_why(
            "store.spill_threshold",
            raw.spill_threshold,
            256,
            1,
            MAX_SPILL_THRESHOLD,
            "messages below the threshold are held in memory only; a few hundred is plenty",
        ) as usize;
        let commit_every =
            self.int("store.commit_every", raw.commit_every, 1000, 1, 1_000_000) as usize;
        let commit_interval = self.duration_min(
            "store.commit_interval",
            raw.commit_interval.as_ref(),
            Duration::from_millis(100),
            Duration::from_millis(1),
        );
        if commit_interval > Duration::from_secs(10) {
            self.err(
                "store.commit_interval",
                format!("{} is longer than 10s", fmt_duration(commit_interval)),
                Some("kill -9 or a power cut loses up to one commit interval of readings".into()),
            );
        }
        let synchronous = self.choice(
            "store.synchronous",
            raw.synchronous.as_deref(),
            Synchronous::Full,
            &[("full", Synchronous::Full), ("normal", Synchronous::Normal)],
        );
        Store {
            path,
            max_bytes,
            max_age,
            durability,
            spill_threshold,
            commit_every,
            commit_interval,
            synchronous,
        }
    }

    /// `point_paths[j]`: where point `j` is in the configuration (a profile's point: the
    /// device's `profile` key, as its topics are the device's).
    fn claim_topics(
        &mut self,
        path: &str,
        d: &Device,
        point_paths: &[String],
        topics: &mut HashMap<String, TopicOwner>,
    ) {
        let mut claims = vec![(
            d.status_topic.clone(),
            format!("the status topic of device `{}`", d.name),
            format!("{path}.name"),
        )];
        if d.message_mode == MessageMode::PerDevice {
            claims.push((
                d.topic.clone(),
                format!("the topic of device `{}`", d.name),
                self.present_or(&format!("{path}.topic"), &format!("{path}.name")),
            ));
        }
        for (j, p) in d.points.iter().enumerate() {
            let pp = point_paths
                .get(j)
                .cloned()
                .unwrap_or_else(|| format!("{path}.points[{j}]"));
            // A profile's point: its topics are the device's, said at the `profile` key.
            let from_profile = pp.ends_with(".profile");
            let at = |key: &str| {
                if from_profile {
                    pp.clone()
                } else {
                    self.present_or(&format!("{pp}.{key}"), &format!("{pp}.name"))
                }
            };
            claims.push((
                p.topic.clone(),
                format!("point `{}` of device `{}`", p.name, d.name),
                at("topic"),
            ));
            if let Some(c) = d.commands.get(j) {
                if p.writable {
                    claims.push((
                        c.topic.clone(),
                        format!(
                            "{COMMAND_TOPIC_OF} point `{}` of device `{}`",
                            p.name, d.name
                        ),
                        at("command.topic"),
                    ));
                }
                claims.push((
                    c.result_topic.clone(),
                    format!(
                        "the result topic of point `{}` of device `{}`",
                        p.name, d.name
                    ),
                    at("command.result_topic"),
                ));
            }
        }
        for (topic, what, at) in claims {
            if topic.is_empty() {
                continue; // not rendered: already reported
            }
            if let Some(owner) = topics.get(&topic) {
                let msg = format!(
                    "topic `{topic}` of {what} is already used by {} ({})",
                    owner.what, owner.path
                );
                self.err(
                    &at,
                    msg,
                    Some("give one of them its own `topic` or another name".into()),
                );
            } else {
                topics.insert(topic, TopicOwner { what, path: at });
            }
        }
    }

    /// `path` if the YAML has it, else `fallback`.
    fn present_or(&self, path: &str, fallback: &str) -> String {
        if self.loc.has(path) {
            path.to_string()
        } else {
            fallback.to_string()
        }
    }

    fn mqtt(&mut self, m: RawMqtt, gateway: &Gateway) -> Mqtt {
        const TRANSPORTS: [(&str, MqttTransport); 4] = [
            ("tcp", MqttTransport::Tcp),
            ("tls", MqttTransport::Tls),
            ("ws", MqttTransport::Ws),
            ("wss", MqttTransport::Wss),
        ];
        let default_port = |t| match t {
            MqttTransport::Tcp => 1883,
            MqttTransport::Tls => 8883,
            MqttTransport::Ws => 80,
            MqttTransport::Wss => 443,
        };
        let is_ws = |t| matches!(t, MqttTransport::Ws | MqttTransport::Wss);
        // YAML reads `5` as a number and `3.1.1` as a string; `5.0` would be a float.
        let protocol_text = m.protocol.as_ref().map(|v| match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => format!("{other:?}"),
        });
        let protocol = self.choice(
            "mqtt.protocol",
            protocol_text.as_deref(),
            MqttProtocol::V311,
            &[("3.1.1", MqttProtocol::V311), ("5", MqttProtocol::V5)],
        );
        let mut servers = Vec::new();
        let (transport, host, port, ws_path) = if let Some(list) = &m.servers {
            if m.url.is_some()
                || m.host.is_some()
                || m.port.is_some()
                || m.transport.is_some()
                || m.ws_path.is_some()
            {
                self.err(
                    "mqtt.servers",
                    "`servers` cannot be combined with url, host, port, transport or ws_path",
                    Some("list every broker's URL under `servers`".into()),
                );
            }
            if list.is_empty() || list.len() > MAX_SERVERS {
                self.err(
                    "mqtt.servers",
                    format!("{} servers; give 1 to {MAX_SERVERS}", list.len()),
                    None,
                );
            }
            for (i, url) in list.iter().take(MAX_SERVERS).enumerate() {
                let (transport, host, port, ws_path) =
                    self.broker_url(&format!("mqtt.servers[{i}]"), url);
                servers.push(Server {
                    transport,
                    host,
                    port,
                    ws_path,
                });
            }
            match servers.first() {
                Some(s) => (s.transport, s.host.clone(), s.port, s.ws_path.clone()),
                None => (MqttTransport::Tcp, String::new(), 1883, String::new()),
            }
        } else if let Some(url) = &m.url {
            if m.host.is_some() || m.port.is_some() || m.transport.is_some() || m.ws_path.is_some()
            {
                self.err(
                    "mqtt.url",
                    "`url` cannot be combined with host, port, transport or ws_path",
                    Some("give either url, or host with port and transport".into()),
                );
            }
            self.broker_url("mqtt.url", url)
        } else {
            let t = self.choice(
                "mqtt.transport",
                m.transport.as_deref(),
                MqttTransport::Tcp,
                &TRANSPORTS,
            );
            let host = match &m.host {
                Some(h) if !h.is_empty() && !h.contains(['/', ' ']) => h.clone(),
                Some(h) => {
                    self.err(
                        "mqtt.host",
                        format!("`{h}` is not a host name or address"),
                        Some("for a URL use `url:` instead".into()),
                    );
                    String::new()
                }
                None => {
                    self.err(
                        "mqtt",
                        "the broker is not given",
                        Some("set `url: mqtts://broker.example.com:8883`, or `host:` (with port and transport)".into()),
                    );
                    String::new()
                }
            };
            let port = self.int("mqtt.port", m.port, default_port(t).into(), 1, 65535) as u16;
            let ws_path = match (&m.ws_path, is_ws(t)) {
                (Some(p), true) if p.starts_with('/') => p.clone(),
                (Some(p), true) => {
                    self.err(
                        "mqtt.ws_path",
                        format!("`{p}` does not start with `/`"),
                        None,
                    );
                    "/mqtt".into()
                }
                (Some(_), false) => {
                    self.err(
                        "mqtt.ws_path",
                        "ws_path applies only to transport ws or wss",
                        None,
                    );
                    String::new()
                }
                (None, true) => "/mqtt".into(),
                (None, false) => String::new(),
            };
            (t, host, port, ws_path)
        };

        let client_id = m.client_id.clone().unwrap_or_else(|| gateway.id.clone());
        if client_id.is_empty() || client_id.len() > 65_535 {
            self.err(
                "mqtt.client_id",
                "the client id must be 1 to 65535 bytes",
                None,
            );
        }
        let keep_alive = self.duration_min(
            "mqtt.keep_alive",
            m.keep_alive.as_ref(),
            Duration::from_secs(30),
            Duration::from_secs(5),
        );
        if keep_alive.subsec_nanos() != 0 || keep_alive > Duration::from_secs(65_535) {
            self.err(
                "mqtt.keep_alive",
                format!(
                    "{} is not a whole number of seconds up to 65535s",
                    fmt_duration(keep_alive)
                ),
                Some("MQTT sends the keep-alive in whole seconds (MQTT 3.1.1 §3.1.2.10)".into()),
            );
        }
        if let Some(u) = &m.username {
            if u.is_empty() {
                self.err(
                    "mqtt.username",
                    "the username is empty",
                    Some("leave `username` out for none".into()),
                );
            } else if u.len() > MAX_MQTT_STRING {
                self.err(
                    "mqtt.username",
                    "the username is longer than 65535 bytes",
                    Some("MQTT sends it with a 2-byte length (MQTT 3.1.1 §1.5.3)".into()),
                );
            }
        }
        let password = self.password(&m);
        if password.is_some() {
            self.clear_text_warning(&m, transport, &host);
        }
        if password.is_some() && m.username.is_none() {
            self.err(
                "mqtt",
                "a password is given without a username",
                Some(
                    "MQTT 3.1.1 §3.1.2.9 sends a password only with a username: add `username`"
                        .into(),
                ),
            );
        }
        let tls = self.tls(&m, transport);

        let max_packet_size = self.int_why(
            "mqtt.max_packet_size",
            m.max_packet_size,
            262_144,
            1024,
            MAX_PACKET_SIZE,
            "a packet this large from the broker is held in memory whole; readings and commands are a few KiB",
        ) as usize;
        // 64 MiB: a Pi Zero has 512 MiB; readings are small, this bound is for large ones.
        let (queue_capacity, queue_max_bytes, when_full) = match &m.queue {
            None => (100_000, 64 << 20, WhenFull::DropOldest),
            Some(q) => (
                self.int_why(
                    "mqtt.queue.capacity",
                    q.capacity,
                    100_000,
                    1,
                    MAX_QUEUE_CAPACITY,
                    "the queue is held in memory (a few hundred bytes per message, under the unit's MemoryMax); the store keeps long outages on disk",
                ) as usize,
                self.int_why(
                    "mqtt.queue.max_bytes",
                    q.max_bytes,
                    64 << 20,
                    65_536,
                    256 << 20,
                    "the queue is held in memory, under the unit's MemoryMax (128M); the store keeps long outages on disk",
                ) as usize,
                self.choice(
                    "mqtt.queue.when_full",
                    q.when_full.as_deref(),
                    WhenFull::DropOldest,
                    &[("drop_oldest", WhenFull::DropOldest)],
                ),
            ),
        };
        let inflight = self.int("mqtt.inflight", m.inflight, 100, 1, 65_535) as u16;
        let (rmin, rmax) = match &m.reconnect {
            None => (None, None),
            Some(r) => (r.min.as_ref(), r.max.as_ref()),
        };
        let reconnect_min = self.duration_min(
            "mqtt.reconnect.min",
            rmin,
            Duration::from_millis(100),
            Duration::from_millis(1),
        );
        let reconnect_max = self.duration_min(
            "mqtt.reconnect.max",
            rmax,
            Duration::from_secs(1),
            Duration::from_millis(1),
        );
        if reconnect_max > Duration::from_secs(300) {
            self.err(
                "mqtt.reconnect.max",
                format!("{} is longer than 5m", fmt_duration(reconnect_max)),
                Some("a long back-off delays the return of data after an outage".into()),
            );
        }
        if reconnect_min > reconnect_max {
            let at = if rmin.is_some() {
                "mqtt.reconnect.min"
            } else {
                "mqtt.reconnect.max"
            };
            self.err(
                at,
                format!(
                    "reconnect.min {} is longer than reconnect.max {}",
                    fmt_duration(reconnect_min),
                    fmt_duration(reconnect_max)
                ),
                Some("min is the first delay, max its cap: min <= max".into()),
            );
        }
        let status_template = m.status_topic.as_deref().unwrap_or("{prefix}/status");
        let status_topic = self
            .topic(
                "mqtt.status_topic",
                status_template,
                &[("prefix", &gateway.prefix)],
            )
            .unwrap_or_default();
        let mut response_topics = Vec::new();
        for (i, f) in m.response_topics.iter().flatten().enumerate() {
            match check_filter(f) {
                Ok(()) => response_topics.push(f.clone()),
                Err(e) => self.err(
                    &format!("mqtt.response_topics[{i}]"),
                    e,
                    Some("a topic filter such as replies/# or app/+/response".into()),
                ),
            }
        }

        let (session, will_delay) = self.mqtt_session(&m, protocol);

        if servers.is_empty() {
            servers.push(Server {
                transport,
                host: host.clone(),
                port,
                ws_path: ws_path.clone(),
            });
        }
        Mqtt {
            protocol,
            transport,
            host,
            port,
            ws_path,
            client_id,
            keep_alive,
            username: m.username.clone(),
            password,
            tls,
            max_packet_size,
            queue_capacity,
            queue_max_bytes,
            when_full,
            inflight,
            reconnect_min,
            reconnect_max,
            status_topic,
            response_topics,
            servers,
            session,
            will_delay,
        }
    }

    /// `mqtt.session`, `mqtt.session_expiry` and `mqtt.will_delay`, checked together: MQTT 5
    /// publishes a will when its delay passes *or the session ends*, whichever is first
    /// (§3.1.3.2.2), so a delay is only kept by a persistent session that outlives it.
    fn mqtt_session(&mut self, m: &RawMqtt, protocol: MqttProtocol) -> (MqttSession, Duration) {
        let persistent = self.choice(
            "mqtt.session",
            m.session.as_deref(),
            false,
            &[("clean", false), ("persistent", true)],
        );
        let v5 = protocol == MqttProtocol::V5;
        let whole_seconds =
            |d: Duration| d.subsec_nanos() == 0 && d <= Duration::from_secs(u64::from(u32::MAX));
        let mut expiry = Duration::from_secs(3600);
        if let Some(v) = m.session_expiry.as_ref() {
            if !v5 {
                self.err(
                    "mqtt.session_expiry",
                    "the session expiry interval is an MQTT 5 property",
                    Some("with MQTT 3.1.1 a persistent session lasts until the broker drops it: leave session_expiry out, or set `protocol: 5`".into()),
                );
            } else if !persistent {
                self.err(
                    "mqtt.session_expiry",
                    "session_expiry applies only to `session: persistent`",
                    Some("a clean session ends with its connection: set `session: persistent` or leave session_expiry out".into()),
                );
            }
            if let Some(d) = self.opt_duration("mqtt.session_expiry", Some(v)) {
                if d.is_zero() || !whole_seconds(d) {
                    self.err(
                        "mqtt.session_expiry",
                        format!("{} is not a whole number of seconds from 1s", fmt_duration(d)),
                        Some("MQTT 5 sends the session expiry interval in whole seconds (§3.1.2.11.2); 0 would be a clean session".into()),
                    );
                } else {
                    expiry = d;
                }
            }
        }
        let mut will_delay = Duration::ZERO;
        if let Some(v) = m.will_delay.as_ref() {
            if let Some(d) = self.opt_duration("mqtt.will_delay", Some(v)) {
                if !whole_seconds(d) {
                    self.err(
                        "mqtt.will_delay",
                        format!("{} is not a whole number of seconds", fmt_duration(d)),
                        Some(
                            "MQTT 5 sends the will delay interval in whole seconds (§3.1.3.2.2)"
                                .into(),
                        ),
                    );
                } else if !v5 {
                    self.err(
                        "mqtt.will_delay",
                        "the will delay interval is an MQTT 5 property",
                        Some("set `protocol: 5`; MQTT 3.1.1 brokers publish the will as soon as the connection drops".into()),
                    );
                } else if !d.is_zero() && !persistent {
                    self.err(
                        "mqtt.will_delay",
                        "a will delay needs `session: persistent`",
                        Some("the broker publishes the will when the session ends, and a clean session ends with its connection (MQTT 5 §3.1.3.2.2): set `session: persistent`".into()),
                    );
                } else if d > expiry {
                    self.err(
                        "mqtt.will_delay",
                        format!(
                            "{} is longer than the session expiry {}",
                            fmt_duration(d),
                            fmt_duration(expiry)
                        ),
                        Some("the will is published when the session expires, whichever comes first (MQTT 5 §3.1.3.2.2): raise mqtt.session_expiry or shorten will_delay".into()),
                    );
                } else {
                    will_delay = d;
                }
            }
        }
        let session = if persistent {
            MqttSession::Persistent { expiry }
        } else {
            MqttSession::Clean
        };
        (session, will_delay)
    }

    /// A broker URL: transport, host, port (the transport's default if none), WebSocket path.
    fn broker_url(&mut self, path: &str, url: &str) -> (MqttTransport, String, u16, String) {
        let default_port = |t| match t {
            MqttTransport::Tcp => 1883,
            MqttTransport::Tls => 8883,
            MqttTransport::Ws => 80,
            MqttTransport::Wss => 443,
        };
        let is_ws = |t| matches!(t, MqttTransport::Ws | MqttTransport::Wss);
        match parse_url(url) {
            Ok((t, host, port, p)) => {
                let p = if is_ws(t) {
                    p.unwrap_or_else(|| "/mqtt".into())
                } else {
                    if p.is_some() {
                        self.err(path, "a path is only meaningful for ws:// and wss://", None);
                    }
                    String::new()
                };
                (t, host, port.unwrap_or(default_port(t)), p)
            }
            Err((msg, hint)) => {
                self.err(path, msg, Some(hint));
                (MqttTransport::Tcp, String::new(), 1883, String::new())
            }
        }
    }

    fn password(&mut self, m: &RawMqtt) -> Option<Secret> {
        let given = [
            m.password_file.is_some(),
            m.password_env.is_some(),
            m.password_credential.is_some(),
            m.password.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            self.err(
                "mqtt",
                "more than one of password_file, password_env, password_credential and password is given",
                Some("keep one".into()),
            );
            return None;
        }
        let (path, pw) = if let Some(file) = &m.password_file {
            let pw =
                self.secret_file("mqtt.password_file", Path::new(file), &format!("`{file}`"))?;
            self.mode_warning(file);
            ("mqtt.password_file", pw)
        } else if let Some(name) = &m.password_credential {
            ("mqtt.password_credential", self.credential(name)?)
        } else if let Some(var) = &m.password_env {
            let pw = match std::env::var(var) {
                Ok(pw) if !pw.is_empty() => pw,
                Ok(_) => {
                    self.err(
                        "mqtt.password_env",
                        format!("environment variable `{var}` is empty"),
                        None,
                    );
                    return None;
                }
                Err(_) => {
                    self.err(
                        "mqtt.password_env",
                        format!("environment variable `{var}` is not set"),
                        Some(CREDENTIAL_HINT.into()),
                    );
                    return None;
                }
            };
            ("mqtt.password_env", pw)
        } else if let Some(pw) = &m.password {
            if m.allow_inline_password != Some(true) {
                self.err(
                    "mqtt.password",
                    "an inline password is refused",
                    Some("put it in a file readable only by fieldbridge (password_file) or in a systemd credential (password_credential with LoadCredential=); or set allow_inline_password: true".into()),
                );
                return None;
            }
            ("mqtt.password", pw.clone())
        } else {
            return None;
        };
        if pw.len() > MAX_MQTT_STRING {
            self.err(
                path,
                "the password is longer than 65535 bytes",
                Some("MQTT sends it with a 2-byte length (MQTT 3.1.1 §3.1.3.5)".into()),
            );
            return None;
        }
        Some(Secret(pw))
    }

    /// A password kept in a file: read with a bound (the path may be anything, /dev/zero
    /// included), one trailing newline removed. `shown` names it in messages.
    fn secret_file(&mut self, path: &str, file: &Path, shown: &str) -> Option<String> {
        use std::io::Read;
        let mut bytes = Vec::new();
        let read = std::fs::File::open(file)
            .and_then(|f| f.take(MAX_MQTT_STRING as u64 + 3).read_to_end(&mut bytes));
        if let Err(e) = read {
            self.err(
                path,
                format!("cannot read {shown}: {e}"),
                Some("the file must exist and be readable by the fieldbridge user".into()),
            );
            return None;
        }
        let Ok(text) = String::from_utf8(bytes) else {
            self.err(path, format!("{shown} is not UTF-8 text"), None);
            return None;
        };
        let pw = text.strip_suffix('\n').unwrap_or(&text);
        let pw = pw.strip_suffix('\r').unwrap_or(pw);
        if pw.is_empty() {
            self.err(path, format!("{shown} is empty"), None);
            return None;
        }
        if pw.len() > MAX_MQTT_STRING {
            self.err(
                path,
                format!("{shown} is longer than 65535 bytes"),
                Some("MQTT sends a password with a 2-byte length (MQTT 3.1.1 §3.1.3.5)".into()),
            );
            return None;
        }
        Some(pw.to_string())
    }

    /// `$CREDENTIALS_DIRECTORY/NAME`, as systemd's `LoadCredential=NAME:/path` provides it
    /// (a private, read-only directory only the service can read).
    fn credential(&mut self, name: &str) -> Option<String> {
        const AT: &str = "mqtt.password_credential";
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            self.err(
                AT,
                format!("`{name}` is not a credential name"),
                Some("the NAME of LoadCredential=NAME:/path, without `/`".into()),
            );
            return None;
        }
        let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
            self.err(
                AT,
                format!("$CREDENTIALS_DIRECTORY is not set: credential `{name}` is not available"),
                Some(format!("systemd sets it for a unit with LoadCredential={name}:/etc/fieldbridge/mqtt.pass (systemctl edit fieldbridge); outside systemd use password_file")),
            );
            return None;
        };
        self.secret_file(
            AT,
            &Path::new(&dir).join(name),
            &format!("credential `{name}`"),
        )
    }

    /// Warns when a password file can be read (or written) by others than its owner.
    fn mode_warning(&mut self, file: &str) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(file) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            self.warn(
                "mqtt.password_file",
                format!("`{file}` is accessible by group or others (mode {mode:03o})"),
                Some(format!("chmod 600 {file} (owned by the fieldbridge user), or use password_credential with systemd LoadCredential=")),
            );
        }
    }

    /// Warns when the password would cross the network in clear text. A loopback broker is
    /// exempt: the connection never leaves the machine (and reading loopback traffic needs
    /// root).
    fn clear_text_warning(&mut self, m: &RawMqtt, transport: MqttTransport, host: &str) {
        let scheme = match transport {
            MqttTransport::Tcp => "mqtt://",
            MqttTransport::Ws => "ws://",
            MqttTransport::Tls | MqttTransport::Wss => return,
        };
        if is_loopback(host) {
            return;
        }
        let at = if m.url.is_some() {
            "mqtt.url"
        } else {
            "mqtt.transport"
        };
        self.warn(
            at,
            format!("the password is sent to `{host}` without TLS ({scheme}): anyone on the path can read it"),
            Some("use mqtts:// or wss:// with `tls.ca`, or a broker on this machine".into()),
        );
    }

    fn tls(&mut self, m: &RawMqtt, transport: MqttTransport) -> Option<TlsFiles> {
        let needs = matches!(transport, MqttTransport::Tls | MqttTransport::Wss);
        let Some(t) = &m.tls else {
            if needs {
                let at = if m.url.is_some() {
                    "mqtt.url"
                } else {
                    "mqtt.transport"
                };
                self.err(
                    at,
                    "TLS needs `tls.ca`",
                    Some("add `tls: { ca: /etc/fieldbridge/ca.pem }` (the CA that signed the broker's certificate)".into()),
                );
            }
            return None;
        };
        if !needs {
            self.err(
                "mqtt.tls",
                "`tls` is given but the transport is not TLS",
                Some("use mqtts:// or wss:// (or transport tls / wss)".into()),
            );
            return None;
        }
        let file = |v: &mut Self, key: &str, p: &Option<String>| -> Option<PathBuf> {
            let p = p.as_ref()?;
            let path = format!("mqtt.tls.{key}");
            match std::fs::metadata(p) {
                Ok(m) if m.is_file() && m.len() > MAX_PEM_BYTES => v.err(
                    &path,
                    format!("`{p}` is larger than 1 MiB"),
                    Some("a PEM certificate, key or CA bundle is a few KiB".into()),
                ),
                Ok(m) if m.is_file() => {}
                _ => v.err(
                    &path,
                    format!("`{p}` does not exist or is not a file"),
                    None,
                ),
            }
            Some(PathBuf::from(p))
        };
        let ca = file(self, "ca", &t.ca);
        let client_cert = file(self, "client_cert", &t.client_cert);
        let client_key = file(self, "client_key", &t.client_key);
        if client_cert.is_some() != client_key.is_some() {
            let at = if client_cert.is_some() {
                "mqtt.tls.client_cert"
            } else {
                "mqtt.tls.client_key"
            };
            self.err(
                at,
                "client_cert and client_key go together",
                Some("give both for mutual TLS, or neither".into()),
            );
        }
        let Some(ca) = ca else {
            self.err(
                "mqtt.tls.ca",
                "`ca` is missing",
                Some("the CA bundle (PEM) that verifies the broker".into()),
            );
            return None;
        };
        Some(TlsFiles {
            ca,
            client_cert,
            client_key,
        })
    }

    fn bus(&mut self, path: &str, b: RawBus) -> Bus {
        #[derive(Clone, Copy, PartialEq)]
        enum K {
            Rtu,
            Tcp,
            RtuOverTcp,
        }
        if b.kind == "lines" {
            return self.line_bus(path, b);
        }
        self.no_line_bus_keys(path, &b);
        let p = |k: &str| format!("{path}.{k}");
        self.level(&p("name"), &b.name);
        let kind = self.choice(
            &p("type"),
            Some(&b.kind),
            K::Rtu,
            &[
                ("rtu", K::Rtu),
                ("tcp", K::Tcp),
                ("rtu_over_tcp", K::RtuOverTcp),
                // Handled above by `line_bus`; listed for the error message.
                ("lines", K::Rtu),
            ],
        );
        let (connect_delay, reconnect_max) = self.bus_timing(path, &b);
        let user_gap = self.opt_duration_max(
            &p("frame_gap"),
            b.frame_gap.as_ref(),
            MAX_FRAME_GAP,
            "the bus is silent this long before every request (3.5 characters are 32ms even at 1200 baud); a long gap stalls the bus past the watchdog",
        );
        let rtu_only = |v: &mut Self, key: &str, present: bool, also_rtu_over_tcp: bool| {
            let ok = kind == K::Rtu || (also_rtu_over_tcp && kind == K::RtuOverTcp);
            if present && !ok {
                v.err(
                    &format!("{path}.{key}"),
                    format!("`{key}` applies only to rtu buses"),
                    Some(if kind == K::RtuOverTcp {
                        "set the line settings on the serial device server".into()
                    } else {
                        "a Modbus TCP bus has no serial line".into()
                    }),
                );
            }
        };
        rtu_only(self, "baud", b.baud.is_some(), true);
        rtu_only(self, "data_bits", b.data_bits.is_some(), false);
        rtu_only(self, "parity", b.parity.is_some(), false);
        rtu_only(self, "stop_bits", b.stop_bits.is_some(), false);
        let baud = self.int(&p("baud"), b.baud, 9600, 50, 4_000_000) as u32;

        let (kind, frame_gap) = if kind == K::Rtu {
            if b.host.is_some() {
                self.err(
                    &p("host"),
                    "`host` applies to tcp and rtu_over_tcp buses",
                    Some("an rtu bus names its serial device in `port`".into()),
                );
            }
            let port = match &b.port {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(_) => {
                    self.err(
                        &p("port"),
                        "the port of an rtu bus is the serial device path",
                        Some("e.g. port: /dev/ttyUSB0 (or /dev/serial/by-id/...)".into()),
                    );
                    String::new()
                }
                None => {
                    self.err(
                        path,
                        "an rtu bus needs `port`",
                        Some("the serial device, e.g. port: /dev/ttyUSB0".into()),
                    );
                    String::new()
                }
            };
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
            let min_gap = frame_gap_for_baud(baud);
            let gap = match user_gap {
                Some(g) if g < min_gap => {
                    self.err(
                        &p("frame_gap"),
                        format!(
                            "{} is shorter than 3.5 characters at {baud} baud",
                            fmt_duration(g)
                        ),
                        Some(format!(
                            "use at least {}, or leave frame_gap out to get exactly that",
                            fmt_duration(min_gap)
                        )),
                    );
                    min_gap
                }
                Some(g) => g,
                None => min_gap,
            };
            (
                BusKind::Rtu(Serial {
                    port,
                    baud,
                    data_bits,
                    parity,
                    stop_bits,
                }),
                gap,
            )
        } else {
            let host = match &b.host {
                Some(h) if !h.is_empty() && !h.contains(['/', ' ']) => h.clone(),
                Some(h) => {
                    self.err(
                        &p("host"),
                        format!("`{h}` is not a host name or address"),
                        None,
                    );
                    String::new()
                }
                None => {
                    self.err(
                        path,
                        "a tcp bus needs `host`",
                        Some("the device's address, e.g. host: 192.168.1.10".into()),
                    );
                    String::new()
                }
            };
            let port = match &b.port {
                None => 502,
                Some(Value::Number(n)) => {
                    self.int(&p("port"), Some(n.as_i64().unwrap_or(-1)), 502, 1, 65_535) as u16
                }
                Some(_) => {
                    self.err(
                        &p("port"),
                        "the port of a tcp bus is a TCP port number",
                        Some("e.g. port: 502 (the default)".into()),
                    );
                    502
                }
            };
            if kind == K::Tcp {
                if user_gap.is_some() {
                    self.err(
                        &p("frame_gap"),
                        "`frame_gap` applies to rtu and rtu_over_tcp buses",
                        Some("Modbus TCP frames are delimited by their header".into()),
                    );
                }
                (BusKind::Tcp { host, port }, Duration::ZERO)
            } else {
                (
                    BusKind::RtuOverTcp { host, port },
                    user_gap.unwrap_or(Duration::ZERO),
                )
            }
        };
        Bus {
            name: b.name,
            kind,
            frame_gap,
            connect_delay,
            reconnect_max,
        }
    }

    /// `connect_delay` and `reconnect_max` of any bus.
    pub(super) fn bus_timing(&mut self, path: &str, b: &RawBus) -> (Duration, Duration) {
        let connect_delay = self.duration_range(
            &format!("{path}.connect_delay"),
            b.connect_delay.as_ref(),
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(10),
            "the bus waits this long after every (re)connect before its first request, and so do all its devices",
        );
        let reconnect_max = self.duration_range(
            &format!("{path}.reconnect_max"),
            b.reconnect_max.as_ref(),
            Duration::from_secs(5),
            Duration::from_millis(1),
            MAX_BACKOFF,
            "a long back-off delays polling after the line or device comes back",
        );
        (connect_delay, reconnect_max)
    }

    fn publish(
        &mut self,
        path: &str,
        p: Option<&RawPublish>,
        inherited: PublishPolicy,
    ) -> PublishPolicy {
        let Some(p) = p else { return inherited };
        #[derive(Clone, Copy, PartialEq)]
        enum M {
            EveryPoll,
            OnChange,
        }
        let (inh_mode, inh_deadband, inh_heartbeat) = match inherited {
            PublishPolicy::EveryPoll => (M::EveryPoll, 0.0, None),
            PublishPolicy::OnChange {
                deadband,
                heartbeat,
            } => (M::OnChange, deadband, heartbeat),
        };
        let mode = self.choice(
            &format!("{path}.mode"),
            p.mode.as_deref(),
            inh_mode,
            &[("every_poll", M::EveryPoll), ("on_change", M::OnChange)],
        );
        let deadband = match p.deadband {
            Some(d) if !d.is_finite() || d < 0.0 => {
                self.err(&format!("{path}.deadband"), format!("{d} is not a number >= 0"), Some("the deadband is an absolute change in engineering units; 0 publishes any change".into()));
                inh_deadband
            }
            Some(d) => d,
            None => inh_deadband,
        };
        let heartbeat = self
            .opt_duration_max(
                &format!("{path}.heartbeat"),
                p.heartbeat.as_ref(),
                MAX_INTERVAL,
                "an unchanged value is republished at least once a day",
            )
            .or(inh_heartbeat);
        if heartbeat == Some(Duration::ZERO) {
            self.err(
                &format!("{path}.heartbeat"),
                "a heartbeat of 0 would publish continuously",
                Some("leave heartbeat out for none".into()),
            );
        }
        match mode {
            M::EveryPoll => {
                for (key, given) in [
                    ("deadband", p.deadband.is_some()),
                    ("heartbeat", p.heartbeat.is_some()),
                ] {
                    if given {
                        self.err(
                            &format!("{path}.{key}"),
                            format!("`{key}` applies only to mode on_change"),
                            Some("set mode: on_change".into()),
                        );
                    }
                }
                PublishPolicy::EveryPoll
            }
            M::OnChange => PublishPolicy::OnChange {
                deadband,
                heartbeat,
            },
        }
    }

    fn qos(&mut self, path: &str, v: Option<i64>, default: Qos) -> Qos {
        match v {
            None => default,
            Some(0) => Qos::AtMostOnce,
            Some(1) => Qos::AtLeastOnce,
            Some(2) => Qos::ExactlyOnce,
            Some(n) => {
                self.err(
                    path,
                    format!("{n} is not one of 0, 1, 2"),
                    Some("1 (at least once) is what store-and-forward relies on".into()),
                );
                default
            }
        }
    }

    fn payload(&mut self, path: &str, v: Option<&str>, default: PayloadFormat) -> PayloadFormat {
        self.choice(
            path,
            v,
            default,
            &[
                ("json", PayloadFormat::Json),
                ("value", PayloadFormat::Value),
            ],
        )
    }

    /// The device (with `bus: 0`, set by the caller) and whether its unit id is valid.
    /// The keys a device shares with a profile's `device:` defaults.
    fn device_defaults(&mut self, path: &str, d: &RawProfileDevice, line_bus: bool) -> Defaults {
        let p = |k: &str| format!("{path}.{k}");
        let min_interval = Duration::from_millis(10);
        let interval = self.duration_range(
            &p("interval"),
            d.interval.as_ref(),
            Duration::from_secs(1),
            min_interval,
            MAX_INTERVAL,
            INTERVAL_WHY,
        );
        // Line devices have their own bound (`lines.rs`).
        let max_timeout = if line_bus { Duration::MAX } else { MAX_TIMEOUT };
        let timeout = self.duration_range(
            &p("timeout"),
            d.timeout.as_ref(),
            Duration::from_secs(1),
            Duration::from_millis(1),
            max_timeout,
            "a silent device holds the whole bus for its timeout on every poll; Modbus devices answer in well under a second",
        );
        let offline_after = self.int(
            &p("offline_after"),
            d.offline_after,
            3,
            1,
            i64::from(u32::MAX),
        ) as u32;
        let backoff_max = self.duration_range(
            &p("backoff_max"),
            d.backoff_max.as_ref(),
            Duration::from_secs(30),
            Duration::from_millis(1),
            MAX_BACKOFF * 12,
            "a failing device is tried again at least every hour",
        );
        let max_gap = self.int(&p("max_gap"), d.max_gap, 10, 0, 2000) as u16;
        let max_registers = self.int(&p("max_registers"), d.max_registers, 125, 1, 125) as u16;
        let max_bits = self.int(&p("max_bits"), d.max_bits, 2000, 1, 2000) as u16;

        let mut groups = vec![PollGroup {
            name: "default".into(),
            interval,
        }];
        for (k, v) in d.groups.iter().flatten() {
            let Value::String(name) = k else {
                self.err(&p("groups"), "group names are text", None);
                continue;
            };
            let gp = format!("{path}.groups.{name}");
            if name == "default" {
                self.err_at_key(
                    &gp,
                    "the group name `default` is reserved for the device's own interval",
                    Some("set the device's `interval` instead, or pick another name".into()),
                );
                continue;
            }
            if let Err(e) = check_level(name) {
                self.err_at_key(&gp, format!("group name {e}"), None);
            }
            let iv = self.duration_range(
                &gp,
                Some(v),
                interval,
                min_interval,
                MAX_INTERVAL,
                INTERVAL_WHY,
            );
            groups.push(PollGroup {
                name: name.clone(),
                interval: iv,
            });
        }
        let order = match d.order.as_deref() {
            Some(o) if WordOrder::ALL.iter().any(|w| w.name() == o) => Some(o.to_string()),
            Some(o) => {
                self.err(
                    &p("order"),
                    format!("`{o}` is not one of ABCD, CDAB, BADC, DCBA"),
                    Some("the default word order of the multi-register points that give none (letters in capitals)".into()),
                );
                None
            }
            None => None,
        };
        Defaults {
            timeout,
            offline_after,
            backoff_max,
            max_gap,
            max_registers,
            max_bits,
            groups,
            order,
        }
    }

    /// A device; also where each of its points is in the configuration (for topic clashes).
    fn device(
        &mut self,
        path: &str,
        d: RawDevice,
        bus: Option<&Bus>,
        gw: &Gateway,
    ) -> (Device, bool, Vec<String>) {
        let p = |k: &str| format!("{path}.{k}");
        self.level(&p("name"), &d.name);
        let tcp = matches!(bus.map(|b| &b.kind), Some(BusKind::Tcp { .. }));
        let line_bus = lines::is_lines(bus);
        let mut d = d;
        let line_keys = lines::LineKeys::take(&mut d);
        let profile_name = d.profile.take();
        let source = match &profile_name {
            Some(_) if line_bus => {
                self.err(
                    &p("profile"),
                    "profiles describe Modbus devices, not devices of a `lines` bus",
                    Some(
                        "put the device on an rtu, tcp or rtu_over_tcp bus, or list its points"
                            .into(),
                    ),
                );
                None
            }
            Some(name) => self.profile(&p("profile"), name),
            None => None,
        };
        let sunspec = self.sunspec_mode(path, &mut d, line_bus, profile_name.is_some());
        let mut pending_changes: Vec<(usize, RawPoint)> = Vec::new();
        let source = match &sunspec {
            Some(Some(found)) if source.is_none() && profile_name.is_none() => {
                Some(profile::sunspec_source(&d.name, found))
            }
            _ => source,
        };
        let (merged, excluded) = match &source {
            Some(s) => self.merge_profile(path, &mut d, s),
            None => {
                if d.points_exclude.take().is_some() && profile_name.is_none() && sunspec.is_none()
                {
                    self.err(
                        &p("points_exclude"),
                        "`points_exclude` drops points of a profile, and the device has no `profile`",
                        Some("add `profile: NAME`, or remove `points_exclude`".into()),
                    );
                }
                let mut own: Vec<(usize, RawPoint)> = std::mem::take(&mut d.points)
                    .into_iter()
                    .enumerate()
                    .collect();
                if matches!(sunspec, Some(None)) {
                    // Changes to points not discovered yet: checked below, applied once the
                    // device is discovered.
                    let (changes, rest) = own
                        .into_iter()
                        .partition(|(_, r)| r.address.is_none() && r.register.is_none());
                    pending_changes = changes;
                    own = rest;
                }
                let merged = own
                    .into_iter()
                    .map(|(j, raw)| MergedPoint {
                        raw,
                        source: PointSource::Device,
                        path: format!("{path}.points[{j}]"),
                        device_index: Some(j),
                    })
                    .collect();
                (merged, Vec::new())
            }
        };
        let errors_before = self.errors.len();
        let unit = match d.unit {
            Some(_) if line_bus => {
                self.no_unit(path);
                1
            }
            Some(0) => {
                self.err(
                    &p("unit"),
                    "unit 0 is the broadcast address, which never answers",
                    Some("use the device's own unit id, 1..=247".into()),
                );
                1
            }
            Some(255) if tcp => 255,
            Some(n) if (1..=247).contains(&n) => n as u8,
            Some(n) => {
                let range = if tcp { "1..=247 (or 255)" } else { "1..=247" };
                self.err(&p("unit"), format!("{n} is outside {range}"), None);
                1
            }
            None if tcp || bus.is_none() || line_bus => 1,
            None => {
                self.err(
                    path,
                    "a device on an rtu bus needs `unit`",
                    Some("its Modbus slave id, 1..=247, as set on the device".into()),
                );
                1
            }
        };
        // Line devices have no unit: never checked for uniqueness.
        let unit_ok = self.errors.len() == errors_before && !line_bus;
        let shared = RawProfileDevice {
            unit: None,
            interval: d.interval.take(),
            timeout: d.timeout.take(),
            offline_after: d.offline_after,
            backoff_max: d.backoff_max.take(),
            max_gap: d.max_gap,
            max_registers: d.max_registers,
            max_bits: d.max_bits,
            groups: d.groups.take(),
            order: d.order.take(),
        };
        let Defaults {
            mut timeout,
            offline_after,
            backoff_max,
            max_gap,
            max_registers,
            max_bits,
            groups,
            order: default_order,
        } = self.device_defaults(path, &shared, line_bus);

        let message_mode = self.choice(
            &p("message"),
            d.message.as_deref(),
            MessageMode::PerPoint,
            &[
                ("per_point", MessageMode::PerPoint),
                ("per_device", MessageMode::PerDevice),
            ],
        );
        let vars = [("prefix", gw.prefix.as_str()), ("device", d.name.as_str())];
        let topic = self
            .topic(
                &p("topic"),
                d.topic.as_deref().unwrap_or("{prefix}/{device}"),
                &vars,
            )
            .unwrap_or_default();
        let status_topic = render("{prefix}/{device}/status", &vars).unwrap_or_default();
        let payload = self.payload(&p("payload"), d.payload.as_deref(), PayloadFormat::Json);
        let publish = self.publish(&p("publish"), d.publish.as_ref(), PublishPolicy::EveryPoll);
        let qos = self.qos(&p("qos"), d.qos, Qos::AtLeastOnce);
        let retain = d.retain.unwrap_or(false);

        let defaults = PointDefaults {
            payload,
            publish,
            qos,
            retain,
            max_registers,
            max_bits,
        };
        let mut points: Vec<Point> = Vec::new();
        let mut commands: Vec<PointCommand> = Vec::new();
        let command_defaults = self.command_defaults(&p("command"), d.command.as_ref());
        // Name → (path, as messages name it).
        let mut names: HashMap<String, (String, String)> = HashMap::new();
        let mut address_valid: Vec<bool> = Vec::new();
        let mut line_points = Vec::new();
        let mut ha = DeviceHa {
            manufacturer: d.manufacturer.take(),
            model: d.model.take(),
            points: Vec::new(),
        };
        let mut sources = Vec::new();
        let mut point_paths = Vec::new();
        for mp in merged {
            let MergedPoint {
                raw: mut rp,
                source: from,
                path: pp,
                device_index,
            } = mp;
            // A profile's own point is checked in the profile's file.
            let prev = if from == PointSource::Profile {
                self.current
                    .replace(source.clone().expect("profile points need a profile"))
            } else {
                self.current.take()
            };
            sources.push(from);
            point_paths.push(match device_index {
                Some(_) => pp.clone(),
                None => p("profile"),
            });
            if let Some(o) = &default_order {
                let wide = matches!(
                    rp.data_type.as_deref(),
                    Some("u32" | "i32" | "f32" | "u64" | "i64" | "f64")
                );
                if rp.order.is_none() && wide {
                    rp.order = Some(o.clone());
                }
            }
            let raw_command = rp.command.take().map(|c| *c);
            let raw_ha = rp.homeassistant.take().map(|h| *h);
            ha.points.push(self.point_ha(&pp, raw_ha));
            if line_bus {
                line_points.push(self.line_point(&pp, &mut rp, raw_command.as_ref(), bus));
            } else {
                self.no_line_point_keys(&pp, &rp, raw_command.as_ref());
            }
            if let Some((_, first)) = names.get(&rp.name) {
                let first = first.clone();
                self.err(
                    &format!("{pp}.name"),
                    format!(
                        "point name `{}` is already used by {first} of this device",
                        rp.name
                    ),
                    Some("point names must be unique within a device".into()),
                );
            } else {
                let shown = match pp.strip_prefix(&format!("{path}.")) {
                    Some(own) => own.to_string(),
                    None => format!("the profile's {pp}"),
                };
                names.insert(rp.name.clone(), (pp.clone(), shown));
            }
            let duplicate = names.get(&rp.name).map(|(at, _)| at) != Some(&pp);
            let address_ok = !line_bus && rp.address.is_some_and(|a| (0..=65_535).contains(&a));
            let mut point = self.point(&pp, rp, &groups, &defaults, gw, &d.name);
            commands.push(self.point_command(
                &pp,
                raw_command.as_ref(),
                &command_defaults,
                &point,
                gw,
                &d.name,
            ));
            if address_ok {
                self.check_overlap(&pp, &point, &points, &address_valid);
            }
            if duplicate {
                // Its default topic collides with the first one: already said.
                point.topic.clear();
                // So do its command and result topics.
                if let Some(c) = commands.last_mut() {
                    c.topic.clear();
                    c.result_topic.clear();
                }
            }
            address_valid.push(address_ok);
            points.push(point);
            self.current = prev;
        }
        // A SunSpec device's changes to points it has not discovered yet: their keys are
        // checked on a stand-in register (holding, u16), the point itself is left out.
        for (j, change) in pending_changes {
            let stand_in = RawPoint {
                register: Some("holding".into()),
                address: Some(0),
                ..change
            };
            let _ = self.point(
                &format!("{path}.points[{j}]"),
                stand_in,
                &groups,
                &defaults,
                gw,
                &d.name,
            );
        }
        // A profile that failed has said why.
        let broken_profile = profile_name.is_some() && source.is_none();
        // A SunSpec device not discovered yet has no points until the bus discovers it.
        if points.is_empty() && !broken_profile && sunspec.is_none() {
            self.err(
                &p("points"),
                "the device has no points",
                Some("add at least one point to read".into()),
            );
        }
        let line = if line_bus {
            Some(self.line_device(path, line_keys, bus, line_points, &mut timeout))
        } else {
            self.no_line_device_keys(path, &line_keys);
            None
        };
        let mut points_by_name: Vec<usize> = (0..points.len()).collect();
        points_by_name.sort_by(|&a, &b| points[a].name.cmp(&points[b].name));
        let device = Device {
            name: d.name,
            bus: 0,
            unit,
            groups,
            timeout,
            offline_after,
            backoff_max,
            max_gap,
            max_registers,
            max_bits,
            message_mode,
            topic,
            status_topic,
            points,
            points_by_name,
            commands,
            line,
            sunspec: sunspec.map(|found| crate::model::SunSpecDevice { found }),
            ha: DeviceHa {
                points: {
                    // Only points with settings of their own; `homeassistant.rs` takes a
                    // missing entry as the default (every device is held three times over:
                    // 128 bytes a point added 0.2 MiB to W1).
                    let mut v = ha.points;
                    while v.last().is_some_and(|p| *p == PointHa::default()) {
                        v.pop();
                    }
                    v.shrink_to_fit();
                    v
                },
                ..ha
            },
            profile: source.map(|s| DeviceProfile {
                name: s.raw.name.clone(),
                file: s.file.clone(),
                document: s.raw.document.clone(),
                sources,
                excluded,
            }),
        };
        (device, unit_ok, point_paths)
    }

    /// `sunspec:` of a device: `None` without it, else what discovery found so far. Its
    /// `points_exclude` and changes are checked against the discovered points by
    /// `merge_profile` (a name the models lack is a warning there: the models are the
    /// device's, not the file's); before discovery, `points_exclude` waits.
    fn sunspec_mode(
        &mut self,
        path: &str,
        d: &mut RawDevice,
        line_bus: bool,
        profile: bool,
    ) -> Option<Option<std::sync::Arc<crate::sunspec::Discovered>>> {
        let mode = d.sunspec.take()?;
        let at = format!("{path}.sunspec");
        if mode != "auto" {
            self.err(
                &at,
                format!("`{mode}` is not a SunSpec mode"),
                Some(
                    "`sunspec: auto` finds the device's SunSpec models when the gateway runs"
                        .into(),
                ),
            );
        }
        if line_bus {
            self.err(
                &at,
                "SunSpec is Modbus: a device of a `lines` bus cannot be discovered",
                Some("put the device on an rtu, tcp or rtu_over_tcp bus".into()),
            );
        }
        if profile {
            self.err(
                &at,
                "a device takes its points from a profile or from SunSpec discovery, not both",
                Some("remove `profile` (discovery finds the points) or `sunspec`".into()),
            );
        }
        // A change (no `address`) keeps the discovered register, which the bus decodes by its
        // SunSpec definition with the live scale factor: keys that would decode or write it
        // otherwise would be silently wrong, so they are refused.
        for (j, r) in d.points.iter().enumerate() {
            if r.address.is_some() || r.register.is_some() {
                continue;
            }
            let decoding = [
                ("type", r.data_type.is_some()),
                ("bit", r.bit.is_some()),
                ("length", r.length.is_some()),
                ("order", r.order.is_some()),
                ("scale", r.scale.is_some()),
                ("offset", r.offset.is_some()),
                ("writable", r.writable == Some(true)),
            ];
            for (k, given) in decoding {
                if given {
                    self.err(
                        &format!("{path}.points[{j}].{k}"),
                        format!("`{k}` on a discovered SunSpec point: the gateway reads it by its SunSpec definition, with its scale factor register"),
                        Some("to decode or write it yourself, give the point its `address` (and `type`, `scale`: `fieldbridge sunspec` prints them): it is then a point of its own".into()),
                    );
                }
            }
        }
        let key = (d.name.clone(), d.bus.clone(), d.unit.unwrap_or(1));
        let found = self.discovered.get(&key).cloned();
        if found.is_none() {
            // Checked (by `merge_profile`) once discovery has found the points.
            d.points_exclude = None;
        }
        Some(found)
    }

    /// Points of one device and register kind may not share registers, except bit points with
    /// each other (different bits) or with a 16-bit integer of the same register.
    fn check_overlap(&mut self, path: &str, p: &Point, earlier: &[Point], valid: &[bool]) {
        if p.data_type.width() == 0 || u32::from(p.address) + u32::from(p.width()) > 65_536 {
            return; // reported as a range error
        }
        let earlier = earlier
            .iter()
            .zip(valid)
            .filter(|(_, ok)| **ok)
            .map(|(q, _)| q);
        for q in earlier.filter(|q| q.kind == p.kind && q.width() > 0) {
            if u32::from(q.address) + u32::from(q.width()) > 65_536 {
                continue;
            }
            if p.address > q.last_address() || q.address > p.last_address() {
                continue;
            }
            let is_word = |t: DataType| matches!(t, DataType::U16 | DataType::I16);
            let msg = match (p.data_type, q.data_type) {
                (DataType::Bit(a), DataType::Bit(b)) if a != b => continue,
                (DataType::Bit(_), t) | (t, DataType::Bit(_)) if is_word(t) => continue,
                (DataType::Bit(a), DataType::Bit(_)) => {
                    format!(
                        "bit {a} of {} {} is already point `{}`",
                        kind_name(p.kind),
                        p.address,
                        q.name
                    )
                }
                _ => format!(
                    "{} {} overlap point `{}` ({})",
                    kind_name(p.kind),
                    span(p.address, p.width()),
                    q.name,
                    span(q.address, q.width())
                ),
            };
            self.err(
                &format!("{path}.address"),
                msg,
                Some("points may share a register only as bit points, or bit points with the u16/i16 of that register".into()),
            );
            return;
        }
    }

    fn point(
        &mut self,
        path: &str,
        r: RawPoint,
        groups: &[PollGroup],
        dflt: &PointDefaults,
        gw: &Gateway,
        device: &str,
    ) -> Point {
        let p = |k: &str| format!("{path}.{k}");
        self.level(&p("name"), &r.name);
        let kind = self.choice(
            &p("register"),
            r.register.as_deref(),
            RegisterKind::Holding,
            &[
                ("holding", RegisterKind::Holding),
                ("input", RegisterKind::Input),
                ("coil", RegisterKind::Coil),
                ("discrete", RegisterKind::DiscreteInput),
            ],
        );
        let bits = kind.is_bits();
        let type_name = r
            .data_type
            .clone()
            .unwrap_or_else(|| if bits { "bool" } else { "u16" }.to_string());
        let tp = p("type");
        let data_type = match type_name.as_str() {
            "bool" => Some(DataType::Bool),
            "bit" => Some(DataType::Bit(0)),
            "u16" => Some(DataType::U16),
            "i16" => Some(DataType::I16),
            "u32" => Some(DataType::U32),
            "i32" => Some(DataType::I32),
            "u64" => Some(DataType::U64),
            "i64" => Some(DataType::I64),
            "f32" => Some(DataType::F32),
            "f64" => Some(DataType::F64),
            "string" => Some(DataType::Ascii(1)),
            other => {
                let all = [
                    "bool", "bit", "u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64", "string",
                ];
                self.err(
                    &tp,
                    format!("`{other}` is not one of {}", all.join(", ")),
                    closest(other, &all).map(|c| format!("did you mean `{c}`?")),
                );
                None
            }
        };
        let mut data_type = data_type.unwrap_or(if bits { DataType::Bool } else { DataType::U16 });
        match (bits, data_type) {
            (true, DataType::Bool) | (false, DataType::Bit(_)) => {}
            (true, _) => self.err(&tp, format!("type `{type_name}` cannot be read from a {}", kind_name(kind)), Some("coils and discrete inputs hold single bits: use type bool".into())),
            (false, DataType::Bool) => self.err(&tp, format!("type `bool` cannot be read from a {}", kind_name(kind)), Some("use type bit with `bit: 0..15` for one bit of a register, or register: coil / discrete".into())),
            (false, _) => {}
        }

        // bit / length
        match (data_type, r.bit) {
            (DataType::Bit(_), Some(b)) if (0..=15).contains(&b) => {
                data_type = DataType::Bit(b as u8)
            }
            (DataType::Bit(_), Some(b)) => self.err(
                &p("bit"),
                format!("{b} is outside 0..=15"),
                Some("bit 0 is the least significant bit of the register".into()),
            ),
            (DataType::Bit(_), None) => self.err(
                path,
                "type bit needs `bit`",
                Some("the bit number, 0 (least significant) to 15".into()),
            ),
            (_, Some(_)) => self.err(
                &p("bit"),
                format!("`bit` applies only to type bit, not {type_name}"),
                None,
            ),
            _ => {}
        }
        match (data_type, r.length) {
            (DataType::Ascii(_), Some(n)) if (1..=125).contains(&n) => {
                data_type = DataType::Ascii(n as u16)
            }
            (DataType::Ascii(_), Some(n)) => self.err(
                &p("length"),
                format!("{n} is outside 1..=125"),
                Some("length counts registers of two characters each".into()),
            ),
            (DataType::Ascii(_), None) => self.err(
                path,
                "type string needs `length`",
                Some("the number of registers, two characters each".into()),
            ),
            (_, Some(_)) => self.err(
                &p("length"),
                format!("`length` applies only to type string, not {type_name}"),
                None,
            ),
            _ => {}
        }

        // address
        let raw_address = r.address.unwrap_or_else(|| {
            self.err(&p("address"), "required key `address` is missing", None);
            0
        });
        let address = match raw_address {
            a if (0..=65_535).contains(&a) => a as u16,
            a => {
                let hint = if (400_001..=465_536).contains(&a) || (40_001..=49_999).contains(&a) {
                    Some(format!("addresses are 0-based protocol addresses; for 40001-style numbers subtract 40001 (e.g. {} → {})", a, a - if a >= 400_001 { 400_001 } else { 40_001 }))
                } else {
                    Some("addresses are 0-based protocol addresses; for 40001-style numbers subtract 40001".into())
                };
                self.err(&p("address"), format!("{a} is outside 0..=65535"), hint);
                0
            }
        };
        let width = data_type.width();
        let (unit_word, max_read) = if bits {
            ("bits", dflt.max_bits)
        } else {
            ("registers", dflt.max_registers)
        };
        if (0..=65_535).contains(&raw_address) && u32::from(address) + u32::from(width) > 65_536 {
            self.err(
                &p("address"),
                format!(
                    "{type_name} at {address} occupies {unit_word} {}, past 65535",
                    span(address, width)
                ),
                Some("the last address must be at most 65535".into()),
            );
        }
        if width > max_read {
            self.err(
                &p("length"),
                format!("{width} {unit_word} do not fit one read of at most {max_read}"),
                Some("raise the device's max_registers, or shorten the point".into()),
            );
        }

        // order
        let wide = matches!(data_type, DataType::U64 | DataType::I64 | DataType::F64);
        let order = match r.order.as_deref() {
            None => WordOrder::Abcd,
            Some(o) => {
                let four = WordOrder::ALL.iter().find(|w| w.name() == o).copied();
                let eight = [
                    ("ABCDEFGH", WordOrder::Abcd),
                    ("GHEFCDAB", WordOrder::Cdab),
                    ("BADCFEHG", WordOrder::Badc),
                    ("HGFEDCBA", WordOrder::Dcba),
                ]
                .iter()
                .find(|(n, _)| *n == o)
                .map(|(_, w)| *w);
                match (four, eight) {
                    (Some(w), _) => w,
                    (None, Some(w)) if wide => w,
                    (None, Some(_)) => {
                        self.err(
                            &p("order"),
                            format!(
                                "`{o}` is an 8-byte order, but {type_name} is not a 64-bit type"
                            ),
                            Some("use ABCD, CDAB, BADC or DCBA".into()),
                        );
                        WordOrder::Abcd
                    }
                    (None, None) => {
                        self.err(
                            &p("order"),
                            format!("`{o}` is not one of ABCD, CDAB, BADC, DCBA"),
                            Some("for 64-bit types also ABCDEFGH, GHEFCDAB, BADCFEHG, HGFEDCBA (letters in capitals)".into()),
                        );
                        WordOrder::Abcd
                    }
                }
            }
        };

        // numeric transforms
        let numeric = matches!(
            data_type,
            DataType::U16
                | DataType::I16
                | DataType::U32
                | DataType::I32
                | DataType::U64
                | DataType::I64
                | DataType::F32
                | DataType::F64
        );
        let integer = matches!(
            data_type,
            DataType::Bool
                | DataType::Bit(_)
                | DataType::U16
                | DataType::I16
                | DataType::U32
                | DataType::I32
                | DataType::U64
                | DataType::I64
        );
        for (key, given) in [
            ("scale", r.scale.is_some()),
            ("offset", r.offset.is_some()),
            ("min", r.min.is_some()),
            ("max", r.max.is_some()),
        ] {
            if given && !numeric {
                self.err(
                    &p(key),
                    format!("`{key}` applies only to numeric types, not {type_name}"),
                    None,
                );
            }
        }
        let scale = match r.scale {
            Some(s) if !s.is_finite() || s == 0.0 => {
                self.err(
                    &p("scale"),
                    format!("scale {s} is not a finite non-zero number"),
                    Some("the value published is raw × scale + offset".into()),
                );
                1.0
            }
            Some(s) => s,
            None => 1.0,
        };
        let offset = match r.offset {
            Some(o) if !o.is_finite() => {
                self.err(&p("offset"), "offset is not a finite number", None);
                0.0
            }
            Some(o) => o,
            None => 0.0,
        };
        for (key, v) in [("min", r.min), ("max", r.max)] {
            if v.is_some_and(|v| !v.is_finite()) {
                self.err(&p(key), format!("`{key}` is not a finite number"), None);
            }
        }
        if let (Some(lo), Some(hi)) = (r.min, r.max) {
            if lo > hi {
                self.err(
                    &p("min"),
                    format!("min {lo} is greater than max {hi}"),
                    Some("min and max bound written values: min <= max".into()),
                );
            }
        }

        // labels
        let mut labels = BTreeMap::new();
        if let Some(map) = r.labels.as_deref() {
            if !integer {
                self.err(
                    &p("labels"),
                    format!("`labels` apply only to integer and bool types, not {type_name}"),
                    None,
                );
            }
            let (lo, hi): (i128, i128) = match data_type {
                DataType::Bool | DataType::Bit(_) => (0, 1),
                DataType::U16 => (0, 65_535),
                DataType::I16 => (-32_768, 32_767),
                DataType::U32 => (0, u32::MAX.into()),
                DataType::I32 => (i32::MIN.into(), i32::MAX.into()),
                DataType::U64 => (0, i64::MAX.into()),
                _ => (i64::MIN.into(), i64::MAX.into()),
            };
            for (k, v) in map {
                let key = match k {
                    Value::Number(n) => n.as_i64(),
                    Value::Bool(b) if matches!(data_type, DataType::Bool | DataType::Bit(_)) => {
                        Some(i64::from(*b))
                    }
                    _ => None,
                };
                let kp = format!("{path}.labels.{}", scalar_text(k));
                let Some(key) = key else {
                    self.err_at_key(
                        &kp,
                        format!("label key `{}` is not an integer", scalar_text(k)),
                        Some(
                            "labels map raw integer values to text, e.g. { 0: OFF, 1: ON }".into(),
                        ),
                    );
                    continue;
                };
                if !(lo..=hi).contains(&i128::from(key)) && integer {
                    self.err_at_key(
                        &kp,
                        format!("label key {key} is outside {lo}..={hi} for {type_name}"),
                        None,
                    );
                }
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => {
                        self.err(&kp, "a label is text", None);
                        continue;
                    }
                };
                if labels.insert(key, text).is_some() {
                    self.err_at_key(&kp, format!("label key {key} is given twice"), None);
                }
            }
        }

        // group
        let group = match r.group.as_deref() {
            None => 0,
            Some(g) => {
                match groups.iter().position(|x| x.name == g) {
                    Some(i) => i,
                    None => {
                        let names: Vec<&str> = groups.iter().map(|x| x.name.as_str()).collect();
                        self.err(&p("group"), format!("the device has no group `{g}`"), Some(format!("groups of this device: {} (define more under the device's `groups`)", names.join(", "))));
                        0
                    }
                }
            }
        };

        let vars = [
            ("prefix", gw.prefix.as_str()),
            ("device", device),
            ("point", r.name.as_str()),
        ];
        let topic = self
            .topic(
                &p("topic"),
                r.topic.as_deref().unwrap_or("{prefix}/{device}/{point}"),
                &vars,
            )
            .unwrap_or_default();
        let payload = self.payload(&p("payload"), r.payload.as_deref(), dflt.payload);
        let mut publish = self.publish(&p("publish"), r.publish.as_deref(), dflt.publish);
        // A deadband is a numeric distance: a device-wide one is not inherited by bool, bit
        // and string points (they publish on any change); given on such a point, it is an error.
        if !numeric {
            let own = r.publish.as_ref().and_then(|x| x.deadband);
            if own.is_some_and(|d| d > 0.0) {
                self.err(
                    &p("publish.deadband"),
                    format!("a deadband needs a numeric type, not {type_name}"),
                    Some("bool, bit and string points publish on any change".into()),
                );
            }
            if let PublishPolicy::OnChange { deadband, .. } = &mut publish {
                *deadband = 0.0;
            }
        }
        let qos = self.qos(&p("qos"), r.qos, dflt.qos);
        let retain = r.retain.unwrap_or(dflt.retain);
        let writable = r.writable.unwrap_or(false);
        if let (true, DataType::Ascii(n)) = (writable, data_type) {
            if n > MAX_WRITE_REGISTERS {
                self.err(
                    &p("length"),
                    format!("a writable string of {n} registers does not fit one write of at most {MAX_WRITE_REGISTERS} (FC16)"),
                    Some("Write Multiple Registers carries 1..=123 registers (Modbus Application Protocol v1.1b3 §6.12): shorten `length` or make the point read-only".into()),
                );
            }
        }
        if writable && matches!(kind, RegisterKind::Input | RegisterKind::DiscreteInput) {
            self.err(
                &p("writable"),
                format!("{}s are read-only", kind_name(kind)),
                Some("only holding registers and coils can be written".into()),
            );
        }

        Point {
            name: r.name,
            kind,
            address,
            data_type,
            order,
            scale,
            offset,
            unit: r.unit,
            labels,
            group,
            topic,
            payload,
            publish,
            qos,
            retain,
            writable,
            min: r.min,
            max: r.max,
        }
    }
}

/// What [`Validator::device_defaults`] found.
struct Defaults {
    timeout: Duration,
    offline_after: u32,
    backoff_max: Duration,
    max_gap: u16,
    max_registers: u16,
    max_bits: u16,
    groups: Vec<PollGroup>,
    order: Option<String>,
}

struct PointDefaults {
    payload: PayloadFormat,
    publish: PublishPolicy,
    qos: Qos,
    retain: bool,
    max_registers: u16,
    max_bits: u16,
}

fn kind_name(k: RegisterKind) -> &'static str {
    match k {
        RegisterKind::Coil => "coil",
        RegisterKind::DiscreteInput => "discrete input",
        RegisterKind::Holding => "holding register",
        RegisterKind::Input => "input register",
    }
}

/// `10..=11`, or `10` for one register.
fn span(address: u16, width: u16) -> String {
    let last = u32::from(address) + u32::from(width.max(1)) - 1;
    if width <= 1 {
        address.to_string()
    } else {
        format!("{address}..={last}")
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        _ => "?".into(),
    }
}

/// `localhost`, 127.0.0.0/8 or ::1.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

const CREDENTIAL_HINT: &str = "under systemd prefer password_credential with LoadCredential= (variables set in a unit can be read by any local user through systemctl show)";

/// Transport, host, port and path of a broker URL.
type BrokerUrl = (MqttTransport, String, Option<u16>, Option<String>);

/// `mqtt://host[:port]`, `mqtts://…`, `ws://host[:port][/path]`, `wss://…`.
/// Brokers `mqtt.servers` may list.
const MAX_SERVERS: usize = 16;

fn parse_url(url: &str) -> Result<BrokerUrl, (String, String)> {
    let hint = "e.g. mqtts://broker.example.com:8883 or wss://broker.example.com/mqtt".to_string();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err((format!("`{url}` is not a URL"), hint));
    };
    let transport = match scheme {
        "mqtt" | "tcp" => MqttTransport::Tcp,
        "mqtts" | "ssl" => MqttTransport::Tls,
        "ws" => MqttTransport::Ws,
        "wss" => MqttTransport::Wss,
        _ => {
            return Err((
                format!("scheme `{scheme}` is not one of mqtt, mqtts, ws, wss"),
                hint,
            ))
        }
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    if authority.contains('@') {
        return Err((
            "credentials in the URL are refused".into(),
            "use username with password_file or password_env".into(),
        ));
    }
    if rest.contains(['?', '#']) {
        return Err((
            "query strings and fragments are not supported in the URL".into(),
            hint,
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err((format!("`{url}` has an unclosed `[`"), hint));
        };
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err((format!("`{url}` has no host"), hint));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err((format!("port `{p}` is not a number in 1..=65535"), hint)),
        },
    };
    let path = path.filter(|p| *p != "/").map(str::to_string);
    Ok((transport, host.to_string(), port, path))
}

/// Command settings given at device level, inherited by its points.
struct CommandDefaults {
    topic: String,
    result_topic: String,
    write_multiple: bool,
    bit_write: Option<BitWrite>,
    read_back: bool,
    max_age: Option<Duration>,
    rate: Option<Rate>,
}

const DEFAULT_COMMAND_TOPIC: &str = "{prefix}/{device}/{point}/set";
const DEFAULT_RESULT_TOPIC: &str = "{prefix}/{device}/{point}/set/result";
const DEFAULT_RATE: Rate = Rate {
    count: 10,
    per: Duration::from_secs(1),
};
const RATE_HINT: &str = "a count per unit: 10/s, 30/m, 100/h; or `none` for no limit";

/// `devices[2]` of `devices[2].points[5]`.
fn device_path(point_path: &str) -> &str {
    point_path.split(".points[").next().unwrap_or(point_path)
}

/// `10/s`, `30/m`, `100/h` (`none` for no limit: `Ok(None)`).
fn parse_rate(s: &str) -> Result<Option<Rate>, String> {
    if s == "none" {
        return Ok(None);
    }
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a rate"))?;
    let count: u32 = n
        .parse()
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| format!("`{n}` is not a whole number above 0"))?;
    let per = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(format!("`{unit}` is not one of s, m, h")),
    };
    Ok(Some(Rate { count, per }))
}

impl Validator<'_> {
    fn bit_write(&mut self, path: &str, v: Option<&str>) -> Option<BitWrite> {
        v.map(|v| {
            self.choice(
                path,
                Some(v),
                BitWrite::ReadModifyWrite,
                &[
                    ("read_modify_write", BitWrite::ReadModifyWrite),
                    ("mask", BitWrite::Mask),
                ],
            )
        })
    }

    fn rate(&mut self, path: &str, v: Option<&str>) -> Option<Option<Rate>> {
        match parse_rate(v?) {
            Ok(r) => Some(r),
            Err(e) => {
                self.err(path, e, Some(RATE_HINT.into()));
                None
            }
        }
    }

    fn max_age(&mut self, path: &str, v: Option<&Value>) -> Option<Option<Duration>> {
        match v? {
            Value::String(s) if s == "none" => Some(None),
            v => self
                .opt_duration_max(
                    path,
                    Some(v),
                    MAX_INTERVAL,
                    "a command a day old is not fresh; `none` for no age check",
                )
                .map(Some),
        }
    }

    fn command_defaults(&mut self, path: &str, c: Option<&RawCommand>) -> CommandDefaults {
        let mut d = CommandDefaults {
            topic: DEFAULT_COMMAND_TOPIC.into(),
            result_topic: DEFAULT_RESULT_TOPIC.into(),
            write_multiple: false,
            bit_write: None,
            read_back: false,
            max_age: None,
            rate: Some(DEFAULT_RATE),
        };
        let Some(c) = c else { return d };
        if let Some(t) = &c.topic {
            d.topic = t.clone();
        }
        if let Some(t) = &c.result_topic {
            d.result_topic = t.clone();
        }
        d.write_multiple = c.write_multiple.unwrap_or(false);
        d.bit_write = self.bit_write(&format!("{path}.bit_write"), c.bit_write.as_deref());
        d.read_back = c.read_back.unwrap_or(false);
        if let Some(m) = self.max_age(&format!("{path}.max_age"), c.max_age.as_ref()) {
            d.max_age = m;
        }
        if let Some(r) = self.rate(&format!("{path}.rate"), c.rate.as_deref()) {
            d.rate = r;
        }
        d
    }

    fn point_command(
        &mut self,
        path: &str,
        c: Option<&RawCommand>,
        dflt: &CommandDefaults,
        point: &Point,
        gw: &Gateway,
        device: &str,
    ) -> PointCommand {
        let cp = format!("{path}.command");
        if c.is_some() && !point.writable {
            self.err(
                &cp,
                "`command` applies only to writable points",
                Some("add `writable: true` (holding registers and coils only)".into()),
            );
        }
        let is_bit = matches!(point.data_type, DataType::Bit(_));
        if let Some(bw) = c.and_then(|c| c.bit_write.as_ref()) {
            if !is_bit {
                self.err(
                    &format!("{cp}.bit_write"),
                    format!("`bit_write` applies only to type bit, not `{bw}` on this point"),
                    None,
                );
            }
        }
        let vars = [
            ("prefix", gw.prefix.as_str()),
            ("device", device),
            ("point", point.name.as_str()),
        ];
        let topic_template = c.and_then(|c| c.topic.as_deref()).unwrap_or(&dflt.topic);
        let at = if c.and_then(|c| c.topic.as_ref()).is_some() {
            format!("{cp}.topic")
        } else {
            // Inherited from the device (or the default): reported at the device's key.
            format!("{}.command.topic", device_path(path))
        };
        let topic = self.topic(&at, topic_template, &vars).unwrap_or_default();
        let result_template = c
            .and_then(|c| c.result_topic.as_deref())
            .unwrap_or(&dflt.result_topic);
        let at = if c.and_then(|c| c.result_topic.as_ref()).is_some() {
            format!("{cp}.result_topic")
        } else {
            format!("{}.command.result_topic", device_path(path))
        };
        let result_topic = self.topic(&at, result_template, &vars).unwrap_or_default();
        let mut out = PointCommand {
            topic,
            result_topic,
            write_multiple: dflt.write_multiple,
            bit_write: dflt.bit_write.unwrap_or_default(),
            read_back: dflt.read_back,
            max_age: dflt.max_age,
            rate: dflt.rate,
        };
        let Some(c) = c else { return out };
        if let Some(w) = c.write_multiple {
            out.write_multiple = w;
        }
        if let Some(b) = self.bit_write(&format!("{cp}.bit_write"), c.bit_write.as_deref()) {
            out.bit_write = b;
        }
        if let Some(r) = c.read_back {
            out.read_back = r;
        }
        if let Some(m) = self.max_age(&format!("{cp}.max_age"), c.max_age.as_ref()) {
            out.max_age = m;
        }
        if let Some(r) = self.rate(&format!("{cp}.rate"), c.rate.as_deref()) {
            out.rate = r;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_a_count_per_unit() {
        assert_eq!(
            parse_rate("10/s"),
            Ok(Some(Rate {
                count: 10,
                per: Duration::from_secs(1)
            }))
        );
        assert_eq!(parse_rate("none"), Ok(None));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("10/d").is_err());
    }

    #[test]
    fn frame_gap_follows_the_serial_line_spec() {
        assert_eq!(fmt_duration(frame_gap_for_baud(9600)), "4011us");
        assert_eq!(fmt_duration(frame_gap_for_baud(19_200)), "2006us");
        assert_eq!(frame_gap_for_baud(38_400), Duration::from_micros(1750));
        assert_eq!(frame_gap_for_baud(115_200), Duration::from_micros(1750));
    }

    #[test]
    fn durations_need_a_unit_and_no_spaces() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(fmt_bound(Duration::from_secs(86_400)), "24h");
        assert_eq!(fmt_bound(Duration::from_secs(90)), "90s");
        assert_eq!(fmt_bound(Duration::from_secs(300)), "5m");
        assert_eq!(parse_duration("5 sec"), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn templates_render_known_placeholders_only() {
        let vars = [("prefix", "p/q"), ("device", "d")];
        assert_eq!(render("{prefix}/{device}/x", &vars).unwrap(), "p/q/d/x");
        assert!(render("{prefix}/{point}", &vars)
            .unwrap_err()
            .0
            .contains("{point}"));
        assert!(render("{prefix", &vars).is_err());
        assert!(render("a}", &vars).is_err());
    }

    #[test]
    fn topics_refuse_wildcards_and_empty_levels() {
        assert!(check_topic("a/b").is_ok());
        assert!(check_topic("a/+/b").is_err());
        assert!(check_topic("a/#").is_err());
        assert!(check_topic("/a").is_err());
        assert!(check_topic("a//b").is_err());
        assert!(check_topic("a/").is_err());
        assert!(check_level("a b").is_err());
        assert!(check_level("a/b").is_err());
        assert!(check_level("meter-1").is_ok());
    }

    #[test]
    fn urls_give_transport_host_port_and_path() {
        let (t, h, p, path) = parse_url("mqtts://broker.example.com:8883").unwrap();
        assert_eq!(
            (t, h.as_str(), p, path),
            (MqttTransport::Tls, "broker.example.com", Some(8883), None)
        );
        let (t, _, p, path) = parse_url("wss://b.example.com/ws").unwrap();
        assert_eq!(
            (t, p, path.as_deref()),
            (MqttTransport::Wss, None, Some("/ws"))
        );
        assert!(parse_url("mqtt://user:pw@host").is_err());
        assert!(parse_url("http://host").is_err());
        let (_, h, p, _) = parse_url("mqtt://[::1]:1884").unwrap();
        assert_eq!((h.as_str(), p), ("::1", Some(1884)));
    }

    #[test]
    fn typos_find_their_key() {
        assert_eq!(
            closest("adress", &["name", "address", "type"]),
            Some("address")
        );
        assert_eq!(closest("zzzzzz", &["name", "address"]), None);
    }

    #[test]
    fn servers_list_every_broker_and_exclude_url() {
        let text = |mqtt: &str| {
            format!("gateway: {{ id: gw }}\nmqtt: {mqtt}\nbuses:\n  - {{ name: b, type: tcp, host: 127.0.0.1 }}\ndevices:\n  - {{ name: d, bus: b, points: [ {{ name: p, address: 0 }} ] }}\n")
        };
        let ok = parse(
            &text(r#"{ servers: ["mqtt://a.example:1884", "mqtts://b.example"] }"#),
            "t.yaml",
        )
        .expect("two servers");
        assert_eq!(ok.mqtt.servers.len(), 2);
        assert_eq!((ok.mqtt.host.as_str(), ok.mqtt.port), ("a.example", 1884));
        assert_eq!(ok.mqtt.servers[1].transport, MqttTransport::Tls);
        assert_eq!(ok.mqtt.servers[1].port, 8883);
        let one = parse(&text(r#"{ url: "mqtt://a.example" }"#), "t.yaml").unwrap();
        assert_eq!(one.mqtt.servers.len(), 1);
        let both = parse(
            &text(r#"{ url: "mqtt://a.example", servers: ["mqtt://b.example"] }"#),
            "t.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(both.contains("cannot be combined"), "{both}");
        let bad = parse(
            &text(r#"{ servers: ["mqtt://a.example", "ftp://b"] }"#),
            "t.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("mqtt.servers[1]"), "{bad}");
    }
}
