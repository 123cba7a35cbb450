//! `fieldbridge sunspec`: discover a SunSpec device and print every mapped point once (the
//! commissioning view of what discovery finds: models, names, values with their scale factors
//! applied, "not implemented" as `-`, or `null` in `--json`).

use std::fmt::Write as _;
use std::time::Duration;

use crate::model::{BusKind, Parity, Serial};

/// `fieldbridge sunspec` arguments (`crate::args` has their help): one of `--bus`, `--port`,
/// `--host`.
#[derive(Debug, PartialEq)]
pub struct Args {
    /// The configuration whose bus `--bus` names.
    pub config: std::path::PathBuf,
    /// A bus of the configuration.
    pub bus: Option<String>,
    /// A serial port (Modbus RTU).
    pub port: Option<String>,
    /// A Modbus TCP endpoint, HOST:PORT (port 502 when omitted).
    pub host: Option<String>,
    /// Serial: baud rate.
    pub baud: u32,
    /// Serial: parity (none, even, odd).
    pub parity: String,
    /// The device's unit id.
    pub unit: u8,
    /// How long to wait for each answer.
    pub timeout: String,
    /// One JSON object, point name -> value (null: not implemented).
    pub json: bool,
}

fn target(args: &Args) -> Result<(BusKind, Duration), String> {
    if let Some(name) = &args.bus {
        let config = crate::config::load(&args.config).map_err(|e| e.to_string())?;
        let bus = config
            .buses
            .iter()
            .find(|b| &b.name == name)
            .ok_or_else(|| format!("no bus named {name:?} in {}", args.config.display()))?;
        if matches!(bus.kind, BusKind::Lines(_)) {
            return Err(format!("bus {name} is a lines bus: SunSpec is Modbus"));
        }
        return Ok((bus.kind.clone(), bus.frame_gap));
    }
    if let Some(port) = &args.port {
        let parity = crate::scan::parse_parities(&args.parity)?;
        let [parity] = parity[..] else {
            return Err("one --parity".into());
        };
        let kind = BusKind::Rtu(Serial {
            port: port.clone(),
            baud: args.baud,
            data_bits: 8,
            parity,
            stop_bits: 1,
        });
        return Ok((kind, crate::plan::frame_gap_for_baud(args.baud)));
    }
    if let Some(host) = &args.host {
        return Ok((crate::scan::tcp_target(host)?, Duration::ZERO));
    }
    let _ = Parity::None;
    Err("say where the device is: --bus NAME, --port /dev/ttyX or --host HOST:PORT".into())
}

pub fn main(args: &Args) -> i32 {
    use crate::cli::{EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME};
    let (kind, gap) = match target(args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    let timeout = match humantime::parse_duration(&args.timeout) {
        Ok(t) if !t.is_zero() && t <= Duration::from_secs(10) => t,
        _ => {
            eprintln!("bad --timeout {:?}: above 0, at most 10s", args.timeout);
            return EXIT_CONFIG;
        }
    };
    if !(1..=247).contains(&args.unit) {
        eprintln!("--unit is 1..=247");
        return EXIT_CONFIG;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    rt.block_on(async {
        if let BusKind::Rtu(s) = &kind {
            if let Err(e) = crate::modbus::conn::open_serial(s) {
                eprintln!(
                    "{}",
                    crate::scan::port_busy(&s.port, &e)
                        .unwrap_or_else(|| format!("cannot open {}: {e}", s.port))
                );
                return EXIT_RUNTIME;
            }
        }
        let mut conn =
            crate::modbus::Connection::new(kind, gap, Duration::ZERO, Duration::from_secs(1));
        let mut src = super::Modbus {
            conn: &mut conn,
            unit: args.unit,
            timeout,
        };
        let d = match super::discover(&mut src).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("unit {}: {e}", args.unit);
                return EXIT_RUNTIME;
            }
        };
        if let Some(why) = &d.stopped {
            eprintln!("model chain cut short: {why}");
        }
        let values = match super::read_all(&mut src, &d).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("unit {}: {e}", args.unit);
                return EXIT_RUNTIME;
            }
        };
        let mut out = String::new();
        if args.json {
            let mut o = serde_json::Map::new();
            for (p, v) in &values {
                let j = match v {
                    None => serde_json::Value::Null,
                    Some(super::Value::Text(t)) => t.clone().into(),
                    Some(super::Value::Number(n)) => serde_json::Number::from_f64(*n)
                        .map_or(serde_json::Value::Null, serde_json::Value::Number),
                };
                o.insert(p.name.clone(), j);
            }
            let _ = writeln!(out, "{}", serde_json::Value::Object(o));
        } else {
            let _ = writeln!(out, "SunSpec at {}: {}", d.base, super::chain_line(&d));
            for (p, v) in &values {
                let shown = match v {
                    None => "-".to_string(),
                    Some(super::Value::Text(t)) => format!("{t:?}"),
                    Some(super::Value::Number(n)) => format!("{n} {}", p.units),
                };
                let _ = writeln!(
                    out,
                    "  {:<40} {:>6}  {}",
                    p.name,
                    p.address,
                    shown.trim_end()
                );
            }
        }
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
        EXIT_OK
    })
}
