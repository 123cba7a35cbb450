//! `fieldbridge scan`: which unit ids answer on a bus, what they say they are, and a
//! ready-to-paste `devices:` fragment for them.
//!
//! Per unit id (and per baud rate and parity of a serial sweep) one cheap request: read one
//! holding register (FC 3) at address 0. A normal answer or a Modbus exception means "present"
//! (the device answered, it may just have no register 0); exceptions 0x0A/0x0B come from a TCP
//! gateway saying that the target is NOT there, so they count as absent. A timeout or a garbled
//! answer counts as absent; garbled answers are counted and reported (a wrong baud rate or
//! parity looks like that).
//!
//! Then, for each device found: Read Device Identification (FC 43 / MEI 14, Modbus application
//! protocol v1.1b3 §6.21), basic objects and, where the device conforms, regular ones; the
//! SunSpec marker `SunS` at 40000, 0 or 50000 with the common model's manufacturer and model.
//! Profiles are matched by those strings (vendor and model named by the device itself against
//! the profile's `vendor` and `model`): the shipped profiles have no identifying register of
//! their own (most meters of the library have none, their vendors document none).
//!
//! The port: the gateway opens serial ports exclusively (TIOCEXCL and an exclusive, non-blocking
//! `flock`, the serialport crate's default in [`crate::modbus::conn::open_serial`]); the scan
//! opens them the same way, so it is refused with a clear error while the gateway owns the port
//! and the gateway cannot open a port that a scan is using.
//!
//! Everything here but [`run`] is pure (unit specs, matching, the fragment, the progress line).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio_modbus::prelude::{Request, Response};
use tokio_modbus::ExceptionCode;

use crate::modbus::conn::{exception_name, Connection, RequestError};
use crate::model::{BusKind, Parity, RegisterKind, Serial};

/// Most requests of the device-identification exchange (a device whose "more follows" never
/// ends must not keep the scan).
const MAX_ID_REQUESTS: usize = 4;
/// The SunSpec marker `SunS` (SunSpec Information Model Specification §4.2.1).
pub const SUNS: [u16; 2] = [0x5375, 0x6E53];
/// Where SunSpec devices put the marker, in the order the specification lists them.
pub const SUNSPEC_BASES: [u16; 3] = [40000, 0, 50000];

/// What the scan is to try.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The bus as the config names it (`--bus`), or `None` for an ad hoc port or host.
    pub bus_name: Option<String>,
    /// One entry per setting to try (a serial sweep has several; TCP one).
    pub settings: Vec<BusKind>,
    pub units: Vec<u8>,
    pub timeout: Duration,
    pub frame_gap_override: Option<Duration>,
}

/// How a unit answered the probe.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Value(u16),
    Exception(String),
}

/// A device that answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// Index into [`Plan::settings`].
    pub setting: usize,
    pub unit: u8,
    pub probe: Probe,
    /// Device identification objects (id, text), FC 43/14.
    pub identification: Vec<(u8, String)>,
    pub sunspec: Option<SunSpecId>,
    /// Names of the profiles whose vendor and model match what the device says it is.
    pub profiles: Vec<String>,
}

/// The SunSpec marker and the common model's strings.
#[derive(Debug, Clone, PartialEq)]
pub struct SunSpecId {
    pub base: u16,
    pub manufacturer: String,
    pub model: String,
    pub version: String,
    pub serial: String,
    /// The model chain (`1 common (L 66), 103 ...`), and why its walk stopped early if it did.
    pub models: String,
}

/// The scan's outcome.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub found: Vec<Found>,
    pub tried: usize,
    /// Answers that could not be framed (CRC, length): a wrong baud rate or parity.
    pub garbled: usize,
    /// Probes that failed on the connection (lost, refused): those ids are not known absent.
    pub unreachable: usize,
    pub elapsed: Duration,
}

/// Parses `1-32,40` (inclusive ranges and single ids, 1..=247) into sorted unique ids.
pub fn parse_units(spec: &str) -> Result<Vec<u8>, String> {
    let mut ids = std::collections::BTreeSet::new();
    for part in spec.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |s: &str| -> Result<u8, String> {
            match s.parse::<u16>() {
                Ok(n @ 1..=247) => Ok(n as u8),
                _ => Err(format!(
                    "bad unit id {s:?} in --units {spec:?}: ids are 1..=247 (0 is broadcast, 248-255 reserved)"
                )),
            }
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo > hi {
            return Err(format!("bad range {part:?} in --units: {lo} > {hi}"));
        }
        ids.extend(lo..=hi);
    }
    Ok(ids.into_iter().collect())
}

/// Parses `none,even` into parities.
pub fn parse_parities(spec: &str) -> Result<Vec<Parity>, String> {
    spec.split(',')
        .map(|p| match p.trim() {
            "none" | "n" | "N" => Ok(Parity::None),
            "even" | "e" | "E" => Ok(Parity::Even),
            "odd" | "o" | "O" => Ok(Parity::Odd),
            other => Err(format!("bad parity {other:?}: none, even or odd")),
        })
        .collect()
}

/// Parses `9600,19200` into baud rates.
pub fn parse_bauds(spec: &str) -> Result<Vec<u32>, String> {
    spec.split(',')
        .map(|b| match b.trim().parse::<u32>() {
            Ok(n @ 300..=4_000_000) => Ok(n),
            _ => Err(format!("bad baud rate {b:?}: 300..=4000000")),
        })
        .collect()
}

/// Whether an exception means "the target is not there" (a TCP gateway's answers 0x0A/0x0B)
/// rather than "present, but not this register".
pub fn exception_means_absent(e: ExceptionCode) -> bool {
    matches!(
        e,
        ExceptionCode::GatewayPathUnavailable | ExceptionCode::GatewayTargetDevice
    )
}

/// A SunSpec string register block: two ASCII characters per register, high byte first,
/// padded with NULs (or spaces).
pub fn sunspec_string(regs: &[u16]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end])
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

fn normalize(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether a profile (its `vendor` and `model`) matches what a device says it is. The vendor's
/// first word must appear in the device's vendor string, and one of the model's tokens of three
/// characters or more that contains a digit (`SDM630`, `EM340`, `iEM3155`) must appear in one
/// of its model strings.
pub fn profile_matches(
    vendor: &str,
    model: &str,
    device_vendor: &str,
    device_models: &[&str],
) -> bool {
    let Some(v) = vendor.split_whitespace().next().map(normalize) else {
        return false;
    };
    if v.is_empty() || !normalize(device_vendor).contains(&v) {
        return false;
    }
    let models: Vec<String> = device_models.iter().map(|m| normalize(m)).collect();
    model
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| t.len() >= 3 && t.chars().any(|c| c.is_ascii_digit()))
        .map(normalize)
        .any(|t| models.iter().any(|m| m.contains(&t)))
}

/// The device's vendor and model strings: identification objects 0 (VendorName), 1
/// (ProductCode), 4 (ProductName), 5 (ModelName), then SunSpec's Mn and Md.
fn device_strings(f: &Found) -> (String, Vec<String>) {
    let obj = |id: u8| {
        f.identification
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, s)| s.clone())
    };
    let mut vendor = obj(0).unwrap_or_default();
    let mut models: Vec<String> = [1, 4, 5].iter().filter_map(|&i| obj(i)).collect();
    if let Some(s) = &f.sunspec {
        if vendor.is_empty() {
            vendor = s.manufacturer.clone();
        }
        models.push(s.model.clone());
    }
    (vendor, models)
}

/// Fills `found.profiles` from `(name, vendor, model)` of the library.
pub fn match_profiles(found: &mut Found, profiles: &[(String, String, String)]) {
    let (vendor, models) = device_strings(found);
    if vendor.is_empty() {
        return;
    }
    let models: Vec<&str> = models.iter().map(String::as_str).collect();
    found.profiles = profiles
        .iter()
        .filter(|(_, v, m)| profile_matches(v, m, &vendor, &models))
        .map(|(n, _, _)| n.clone())
        .collect();
}

fn parity_word(p: Parity) -> &'static str {
    match p {
        Parity::None => "none",
        Parity::Even => "even",
        Parity::Odd => "odd",
    }
}

fn parity_letter(p: Parity) -> char {
    match p {
        Parity::None => 'N',
        Parity::Even => 'E',
        Parity::Odd => 'O',
    }
}

/// `9600 8N1`, `tcp 127.0.0.1:502`.
pub fn setting_name(kind: &BusKind) -> String {
    match kind {
        BusKind::Rtu(s) => format!(
            "{} {}{}{}",
            s.baud,
            s.data_bits,
            parity_letter(s.parity),
            s.stop_bits
        ),
        BusKind::Tcp { host, port } => format!("tcp {host}:{port}"),
        BusKind::RtuOverTcp { host, port } => format!("rtu over tcp {host}:{port}"),
        BusKind::Lines(_) => "lines".into(),
    }
}

/// The name of the bus a found device goes on in the fragment.
fn bus_for(plan: &Plan, setting: usize) -> String {
    if let Some(b) = &plan.bus_name {
        return b.clone();
    }
    match &plan.settings[setting] {
        BusKind::Rtu(s) if plan.settings.len() > 1 => format!(
            "scan-{}-{}{}{}",
            s.baud,
            s.data_bits,
            parity_letter(s.parity).to_ascii_lowercase(),
            s.stop_bits
        ),
        _ => "scan".into(),
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The report as YAML: comments describing every device found, then (for an ad hoc port or
/// host) a `buses:` section and the `devices:` fragment.
pub fn fragment(plan: &Plan, report: &Report) -> String {
    let mut out = String::new();
    let what = match &plan.bus_name {
        Some(b) => format!("bus {b}"),
        None => match plan.settings.first() {
            Some(BusKind::Rtu(s)) => s.port.clone(),
            Some(k) => crate::modbus::conn::endpoint(k),
            None => String::new(),
        },
    };
    let _ = writeln!(
        out,
        "# fieldbridge scan of {what}: {} request(s), {} device(s) found in {:.1} s{}",
        report.tried,
        report.found.len(),
        report.elapsed.as_secs_f64(),
        if report.garbled > 0 {
            format!(
                "; {} garbled answer(s) (wrong baud rate or parity?)",
                report.garbled
            )
        } else {
            String::new()
        }
    );
    if report.unreachable > 0 {
        let _ = writeln!(
            out,
            "# WARNING: {} probe(s) failed on the connection (lost or refused): scan again",
            report.unreachable
        );
    }
    for f in &report.found {
        let mut line = format!("# unit {}", f.unit);
        if plan.settings.len() > 1 {
            let _ = write!(line, " at {}", setting_name(&plan.settings[f.setting]));
        }
        match &f.probe {
            Probe::Value(v) => {
                let _ = write!(line, ": register 0 = 0x{v:04X}");
            }
            Probe::Exception(e) => {
                let _ = write!(line, ": answered {e} (present)");
            }
        }
        if !f.identification.is_empty() {
            let ids: Vec<&str> = f.identification.iter().map(|(_, s)| s.as_str()).collect();
            let _ = write!(line, "; identification: {}", ids.join(" / "));
        }
        if let Some(s) = &f.sunspec {
            let _ = write!(
                line,
                "; SunSpec at {}: {} {} {} serial {}; models {}",
                s.base, s.manufacturer, s.model, s.version, s.serial, s.models
            );
        }
        if !f.profiles.is_empty() {
            let _ = write!(line, "; profile(s): {}", f.profiles.join(", "));
        }
        let _ = writeln!(out, "{line}");
    }
    if report.found.is_empty() {
        return out;
    }
    if plan.bus_name.is_none() {
        let mut used: Vec<usize> = report.found.iter().map(|f| f.setting).collect();
        used.sort_unstable();
        used.dedup();
        let _ = writeln!(out, "buses:");
        for s in used {
            let _ = writeln!(out, "  - name: {}", bus_for(plan, s));
            match &plan.settings[s] {
                BusKind::Rtu(serial) => {
                    let _ = writeln!(out, "    type: rtu");
                    let _ = writeln!(out, "    port: {}", yaml_str(&serial.port));
                    let _ = writeln!(out, "    baud: {}", serial.baud);
                    let _ = writeln!(out, "    parity: {}", parity_word(serial.parity));
                    if serial.data_bits != 8 {
                        let _ = writeln!(out, "    data_bits: {}", serial.data_bits);
                    }
                    if serial.stop_bits != 1 {
                        let _ = writeln!(out, "    stop_bits: {}", serial.stop_bits);
                    }
                }
                BusKind::Tcp { host, port } => {
                    let _ = writeln!(out, "    type: tcp");
                    let _ = writeln!(out, "    host: {}", yaml_str(host));
                    let _ = writeln!(out, "    port: {port}");
                }
                BusKind::RtuOverTcp { host, port } => {
                    let _ = writeln!(out, "    type: rtu_over_tcp");
                    let _ = writeln!(out, "    host: {}", yaml_str(host));
                    let _ = writeln!(out, "    port: {port}");
                }
                BusKind::Lines(_) => {}
            }
        }
    }
    let _ = writeln!(out, "devices:");
    let mut names = std::collections::BTreeSet::new();
    for f in &report.found {
        let stem = match f.profiles.first() {
            Some(p) => format!("{p}-{}", f.unit),
            None => format!("unit-{}", f.unit),
        };
        let mut name = stem.clone();
        let mut n = 2;
        while !names.insert(name.clone()) {
            name = format!("{stem}-{n}");
            n += 1;
        }
        let _ = writeln!(out, "  - name: {name}");
        let _ = writeln!(out, "    bus: {}", bus_for(plan, f.setting));
        let _ = writeln!(out, "    unit: {}", f.unit);
        if let Some(p) = f.profiles.first() {
            let _ = writeln!(out, "    profile: {p}");
            for other in f.profiles.iter().skip(1) {
                let _ = writeln!(out, "    # or: profile: {other}");
            }
        } else {
            if let Some(s) = &f.sunspec {
                let _ = writeln!(
                    out,
                    "    # SunSpec device (marker at {}): `fieldbridge sunspec --unit {}` lists its points",
                    s.base, f.unit
                );
            }
            let _ = writeln!(
                out,
                "    points:                 # unknown device: replace with its register map"
            );
            let _ = writeln!(
                out,
                "      - {{name: register_0, register: holding, address: 0, type: u16}}"
            );
        }
    }
    out
}

/// The progress line: `9600 8N1: 57/247 ids, 2 found, ~28 s left`.
pub fn progress_line(
    setting: &str,
    tried: usize,
    total: usize,
    found: usize,
    elapsed: Duration,
) -> String {
    let left = if tried == 0 {
        "?".into()
    } else {
        let per = elapsed.as_secs_f64() / tried as f64;
        format!("~{:.0} s", per * (total - tried.min(total)) as f64)
    };
    format!("scan {setting}: {tried}/{total} ids tried, {found} found, {left} left")
}

/// Why the port cannot be used, in words, if an open error says it is taken.
pub fn port_busy(port: &str, e: &std::io::Error) -> Option<String> {
    const EBUSY: i32 = 16;
    let text = e.to_string();
    if e.raw_os_error() == Some(EBUSY)
        || text.contains("exclusive lock")
        || text.contains("Device or resource busy")
    {
        Some(format!(
            "{port} is in use by another process (the fieldbridge service?): stop it first \
             (`systemctl stop fieldbridge`), then scan"
        ))
    } else {
        None
    }
}

/// Scans: every setting, every unit; then identification of each device found. `progress` is
/// called after every unit tried (with the line to show).
pub async fn run(plan: &Plan, mut progress: impl FnMut(&str)) -> Result<Report, String> {
    let started = Instant::now();
    let mut report = Report::default();
    let total = plan.settings.len() * plan.units.len();
    for (s, kind) in plan.settings.iter().enumerate() {
        if let BusKind::Rtu(serial) = kind {
            // Opened once here to say clearly when the gateway holds the port.
            if let Err(e) = crate::modbus::conn::open_serial(serial) {
                return Err(port_busy(&serial.port, &e)
                    .unwrap_or_else(|| format!("cannot open {}: {e}", serial.port)));
            }
        }
        let gap = match kind {
            BusKind::Rtu(serial) => plan
                .frame_gap_override
                .unwrap_or_else(|| crate::plan::frame_gap_for_baud(serial.baud)),
            _ => Duration::ZERO,
        };
        let mut conn = Connection::new(kind.clone(), gap, Duration::ZERO, Duration::from_secs(1));
        let name = setting_name(kind);
        if let Err(e) = conn
            .ensure_connected(plan.timeout.max(Duration::from_secs(1)))
            .await
        {
            return Err(format!("cannot reach {}: {e}", conn.endpoint()));
        }
        for &unit in &plan.units {
            report.tried += 1;
            match conn
                .read(unit, RegisterKind::Holding, 0, 1, plan.timeout)
                .await
            {
                Ok(crate::modbus::Data::Words(w)) => report.found.push(Found {
                    setting: s,
                    unit,
                    probe: Probe::Value(w[0]),
                    identification: vec![],
                    sunspec: None,
                    profiles: vec![],
                }),
                Ok(crate::modbus::Data::Bits(_)) => {}
                Err(RequestError::Exception(e)) if !exception_means_absent(e) => {
                    report.found.push(Found {
                        setting: s,
                        unit,
                        probe: Probe::Exception(exception_name(e).into()),
                        identification: vec![],
                        sunspec: None,
                        profiles: vec![],
                    });
                }
                Err(RequestError::Protocol(_)) => report.garbled += 1,
                Err(RequestError::Transport(_) | RequestError::NotConnected(_)) => {
                    report.unreachable += 1;
                }
                Err(_) => {}
            }
            progress(&progress_line(
                &name,
                report.tried,
                total,
                report.found.len(),
                started.elapsed(),
            ));
        }
        for f in report.found.iter_mut().filter(|f| f.setting == s) {
            f.identification = identify(&mut conn, f.unit, plan.timeout).await;
            f.sunspec = sunspec_marker(&mut conn, f.unit, plan.timeout).await;
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// FC 43 / MEI 14: the basic objects, then the regular ones if the device conforms to that
/// level. Empty when unsupported.
pub async fn identify(conn: &mut Connection, unit: u8, timeout: Duration) -> Vec<(u8, String)> {
    use tokio_modbus::prelude::{ConformityLevel, ReadCode};
    let mut objects: Vec<(u8, String)> = Vec::new();
    let mut code = ReadCode::Basic;
    let mut next = 0u8;
    for _ in 0..MAX_ID_REQUESTS {
        let Ok(Response::ReadDeviceIdentification(r)) = conn
            .call(unit, Request::ReadDeviceIdentification(code, next), timeout)
            .await
        else {
            break;
        };
        for o in &r.device_id_objects {
            if objects.iter().all(|(i, _)| *i != o.id) {
                let text: String = String::from_utf8_lossy(&o.value)
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(64)
                    .collect();
                objects.push((o.id, text.trim().to_owned()));
            }
        }
        if r.more_follows && r.next_object_id > next {
            next = r.next_object_id;
            continue;
        }
        let regular = matches!(
            r.conformity_level,
            ConformityLevel::RegularIdentification
                | ConformityLevel::RegularIdentificationStreamOnly
                | ConformityLevel::ExtendedIdentification
                | ConformityLevel::ExtendedIdentificationStreamOnly
        );
        if code == ReadCode::Basic && regular {
            code = ReadCode::Regular;
            next = 3;
            continue;
        }
        break;
    }
    objects.sort_by_key(|(i, _)| *i);
    objects
}

/// The SunSpec marker at 40000, 0 or 50000 and, if the first model is the common model (1),
/// its manufacturer (Mn), model (Md), version (Vr) and serial number (SN).
pub async fn sunspec_marker(
    conn: &mut Connection,
    unit: u8,
    timeout: Duration,
) -> Option<SunSpecId> {
    for base in SUNSPEC_BASES {
        let Ok(crate::modbus::Data::Words(w)) = conn
            .read(unit, RegisterKind::Holding, base, 2, timeout)
            .await
        else {
            continue;
        };
        if w != SUNS {
            continue;
        }
        let mut id = SunSpecId {
            base,
            manufacturer: String::new(),
            model: String::new(),
            version: String::new(),
            serial: String::new(),
            models: String::new(),
        };
        // Model 1: ID, L, Mn (16 registers), Md (16), Opt (8), Vr (8), SN (16).
        if let Ok(crate::modbus::Data::Words(c)) = conn
            .read(unit, RegisterKind::Holding, base + 2, 66, timeout)
            .await
        {
            if c[0] == 1 && c[1] >= 64 {
                id.manufacturer = sunspec_string(&c[2..18]);
                id.model = sunspec_string(&c[18..34]);
                id.version = sunspec_string(&c[42..50]);
                id.serial = sunspec_string(&c[50..66]);
            }
        }
        let mut src = crate::sunspec::Modbus {
            conn,
            unit,
            timeout,
        };
        if let Ok(d) = crate::sunspec::discover(&mut src).await {
            id.models = crate::sunspec::chain_line(&d);
            if let Some(why) = d.stopped {
                id.models.push_str(&format!(" (stopped: {why})"));
            }
        }
        return Some(id);
    }
    None
}

/// The serial settings of a sweep: every baud rate with every parity.
pub fn sweep(base: &Serial, bauds: &[u32], parities: &[Parity]) -> Vec<BusKind> {
    let mut out = Vec::new();
    for &baud in bauds {
        for &parity in parities {
            out.push(BusKind::Rtu(Serial {
                baud,
                parity,
                ..base.clone()
            }));
        }
    }
    out
}

/// `fieldbridge scan` arguments (`crate::args` has their help): one of `--bus`, `--port`,
/// `--host`.
#[derive(Debug, PartialEq)]
pub struct Args {
    /// The configuration whose bus `--bus` names (and whose profiles are matched).
    pub config: std::path::PathBuf,
    /// Scan this bus of the configuration.
    pub bus: Option<String>,
    /// Scan this serial port (Modbus RTU).
    pub port: Option<String>,
    /// Scan this Modbus TCP endpoint, HOST:PORT (port 502 when omitted).
    pub host: Option<String>,
    /// Unit ids to try: ranges and single ids, e.g. 1-32,40.
    pub units: String,
    /// Serial: baud rates to try, e.g. 9600,19200 (default: the bus's, or 9600).
    pub baud: Option<String>,
    /// Serial: parities to try, e.g. none,even (default: the bus's, or none).
    pub parity: Option<String>,
    /// Serial: data bits (7 or 8).
    pub data_bits: u8,
    /// Serial: stop bits (1 or 2).
    pub stop_bits: u8,
    /// How long to wait for each unit's answer.
    pub timeout: String,
}

pub fn tcp_target(spec: &str) -> Result<BusKind, String> {
    let (host, port) = match spec.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            p.parse::<u16>()
                .map_err(|_| format!("bad port in --host {spec:?}"))?,
        ),
        None => (spec.to_owned(), 502),
    };
    if host.is_empty() {
        return Err(format!("no host in --host {spec:?}"));
    }
    Ok(BusKind::Tcp { host, port })
}

/// Builds the plan from the arguments (and the config for `--bus`); the library's
/// `(name, vendor, model)` for matching.
/// `(name, vendor, model)` of every profile of the library.
type ProfileIds = Vec<(String, String, String)>;

fn plan_of(args: &Args) -> Result<(Plan, ProfileIds), (i32, String)> {
    use crate::cli::EXIT_CONFIG;
    let bad = |m: String| (EXIT_CONFIG, m);
    let units = parse_units(&args.units).map_err(bad)?;
    let timeout = humantime::parse_duration(&args.timeout)
        .map_err(|e| bad(format!("bad --timeout {:?}: {e}", args.timeout)))?;
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        return Err(bad("--timeout must be above 0 and at most 10s".into()));
    }
    let library = crate::config::profile::Library::for_config(&args.config);
    let profiles: ProfileIds = library
        .list()
        .iter()
        .filter_map(|e| crate::config::profile::info(&e.file).ok())
        .map(|i| (i.name, i.vendor, i.model))
        .collect();
    let mut bus_name = None;
    let mut frame_gap_override = None;
    let base: BusKind = if let Some(name) = &args.bus {
        let config = crate::config::load(&args.config).map_err(|e| bad(e.to_string()))?;
        let Some(bus) = config.buses.iter().find(|b| &b.name == name) else {
            let names: Vec<&str> = config.buses.iter().map(|b| b.name.as_str()).collect();
            return Err(bad(format!(
                "no bus named {name:?} in {}; buses: {}",
                args.config.display(),
                names.join(", ")
            )));
        };
        if matches!(bus.kind, BusKind::Lines(_)) {
            return Err(bad(format!(
                "bus {name} is a lines bus: scan speaks Modbus"
            )));
        }
        bus_name = Some(name.clone());
        if matches!(bus.kind, BusKind::Rtu(_)) && args.baud.is_none() {
            frame_gap_override = Some(bus.frame_gap);
        }
        bus.kind.clone()
    } else if let Some(port) = &args.port {
        if !matches!(args.data_bits, 7 | 8) || !matches!(args.stop_bits, 1 | 2) {
            return Err(bad("--data-bits is 7 or 8, --stop-bits 1 or 2".into()));
        }
        BusKind::Rtu(Serial {
            port: port.clone(),
            baud: 9600,
            data_bits: args.data_bits,
            parity: Parity::None,
            stop_bits: args.stop_bits,
        })
    } else if let Some(host) = &args.host {
        tcp_target(host).map_err(bad)?
    } else {
        return Err(bad(
            "say what to scan: --bus NAME (of the config), --port /dev/ttyX or --host HOST:PORT"
                .into(),
        ));
    };
    let settings = match &base {
        BusKind::Rtu(serial) => {
            let bauds = match &args.baud {
                Some(b) => parse_bauds(b).map_err(bad)?,
                None => vec![serial.baud],
            };
            let parities = match &args.parity {
                Some(p) => parse_parities(p).map_err(bad)?,
                None => vec![serial.parity],
            };
            sweep(serial, &bauds, &parities)
        }
        other => {
            if args.baud.is_some() || args.parity.is_some() {
                return Err(bad("--baud and --parity are for serial lines".into()));
            }
            vec![other.clone()]
        }
    };
    Ok((
        Plan {
            bus_name,
            settings,
            units,
            timeout,
            frame_gap_override,
        },
        profiles,
    ))
}

/// `fieldbridge scan`: prints the fragment on stdout; the progress line on stderr when it is a
/// terminal.
pub fn main(args: &Args) -> i32 {
    use std::io::{IsTerminal, Write};
    let (plan, profiles) = match plan_of(args) {
        Ok(p) => p,
        Err((code, message)) => {
            eprintln!("{message}");
            return code;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return crate::cli::EXIT_RUNTIME;
        }
    };
    let tty = std::io::stderr().is_terminal();
    let outcome = rt.block_on(run(&plan, |line| {
        if tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        }
    }));
    if tty {
        eprintln!();
    }
    match outcome {
        Ok(mut report) => {
            for f in &mut report.found {
                match_profiles(f, &profiles);
            }
            let _ = std::io::stdout()
                .lock()
                .write_all(fragment(&plan, &report).as_bytes());
            crate::cli::EXIT_OK
        }
        Err(message) => {
            eprintln!("{message}");
            crate::cli::EXIT_RUNTIME
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_specs_take_ranges_and_single_ids_sorted_and_unique() {
        assert_eq!(parse_units("3,1-2,2").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_units("1-247").unwrap().len(), 247);
        assert!(parse_units("0-3").is_err());
        assert!(parse_units("248").is_err());
        assert!(parse_units("5-2").is_err());
        assert!(parse_units("a").is_err());
    }

    #[test]
    fn gateway_exceptions_mean_absent_others_present() {
        assert!(exception_means_absent(ExceptionCode::GatewayTargetDevice));
        assert!(exception_means_absent(
            ExceptionCode::GatewayPathUnavailable
        ));
        assert!(!exception_means_absent(ExceptionCode::IllegalDataAddress));
        assert!(!exception_means_absent(ExceptionCode::IllegalFunction));
    }

    #[test]
    fn sunspec_strings_stop_at_the_first_nul() {
        let regs = [0x5341, 0x4D50, 0x4C45, 0x0000, 0x4142];
        assert_eq!(sunspec_string(&regs), "SAMPLE");
    }

    #[test]
    fn profiles_match_on_vendor_and_a_model_token_with_a_digit() {
        assert!(profile_matches(
            "Eastron",
            "SDM630-Modbus V2",
            "EASTRON ELECTRONIC",
            &["SDM630"]
        ));
        assert!(!profile_matches(
            "Eastron",
            "SDM630-Modbus V2",
            "Eastron",
            &["SDM120"]
        ));
        assert!(!profile_matches(
            "Carlo Gavazzi",
            "EM340",
            "Eastron",
            &["EM340"]
        ));
        // "V2" is too short to identify anything.
        assert!(!profile_matches("Eastron", "SDM630 V2", "Eastron", &["V2"]));
    }

    #[test]
    fn the_progress_line_estimates_the_time_left() {
        let line = progress_line("9600 8N1", 10, 40, 1, Duration::from_secs(5));
        assert_eq!(line, "scan 9600 8N1: 10/40 ids tried, 1 found, ~15 s left");
    }

    #[test]
    fn a_busy_port_is_said_so() {
        let e = std::io::Error::from_raw_os_error(16);
        assert!(port_busy("/dev/ttyUSB0", &e).unwrap().contains("in use"));
        let e = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "Unable to acquire exclusive lock on serial port",
        );
        assert!(port_busy("/dev/ttyUSB0", &e).is_some());
        let e = std::io::Error::from_raw_os_error(2);
        assert!(port_busy("/dev/ttyUSB0", &e).is_none());
    }

    #[test]
    fn the_fragment_names_buses_and_devices() {
        let plan = Plan {
            bus_name: None,
            settings: vec![BusKind::Tcp {
                host: "127.0.0.1".into(),
                port: 1502,
            }],
            units: vec![1, 2],
            timeout: Duration::from_millis(100),
            frame_gap_override: None,
        };
        let report = Report {
            found: vec![
                Found {
                    setting: 0,
                    unit: 1,
                    probe: Probe::Value(7),
                    identification: vec![],
                    sunspec: None,
                    profiles: vec!["eastron-sdm630".into()],
                },
                Found {
                    setting: 0,
                    unit: 2,
                    probe: Probe::Exception("ILLEGAL_DATA_ADDRESS".into()),
                    identification: vec![],
                    sunspec: None,
                    profiles: vec![],
                },
            ],
            tried: 2,
            garbled: 0,
            unreachable: 0,
            elapsed: Duration::from_millis(300),
        };
        let y = fragment(&plan, &report);
        assert!(y.contains("  - name: scan\n    type: tcp\n"), "{y}");
        assert!(y.contains("  - name: eastron-sdm630-1\n    bus: scan\n    unit: 1\n    profile: eastron-sdm630\n"), "{y}");
        assert!(y.contains("  - name: unit-2\n"), "{y}");
        let parsed: crate::config::yaml::Value =
            crate::config::yaml::from_str(&y).expect("valid YAML");
        assert_eq!(parsed["devices"].as_sequence().unwrap().len(), 2);
    }

    #[test]
    fn probes_lost_on_the_connection_are_said_not_taken_for_absent_devices() {
        let plan = Plan {
            bus_name: Some("plc".into()),
            settings: vec![BusKind::Tcp {
                host: "127.0.0.1".into(),
                port: 1502,
            }],
            units: vec![1, 2, 3],
            timeout: Duration::from_millis(100),
            frame_gap_override: None,
        };
        let report = Report {
            tried: 3,
            unreachable: 2,
            ..Report::default()
        };
        let y = fragment(&plan, &report);
        assert!(
            y.contains("# WARNING: 2 probe(s) failed on the connection"),
            "{y}"
        );
    }
}
