//! The subcommands `run`, `check`, `read`, `status`, `profiles` (`scan` and `sunspec` in their
//! modules; [`crate::args`] parses the command line). Exit codes: 0 ok, 2 configuration error
//! or bad arguments, 1 runtime failure.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::args::{self, Command, Parsed};
use crate::modbus::{Connection, Data};
use crate::model::{BusKind, Config, Device, Parity, RegisterKind};
use crate::{app, codec, config, plan};

pub const EXIT_OK: i32 = 0;
pub const EXIT_RUNTIME: i32 = 1;
pub const EXIT_CONFIG: i32 = 2;

/// What [`out!`] writes with. A reader that went away (EPIPE) ends the process with 141, as
/// SIGPIPE would under a shell; a stdout that cannot be written at all (a full disk, say)
/// with a line on stderr and 1. Neither is a panic.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_BROKEN_PIPE);
        }
        let _ = writeln!(
            std::io::stderr(),
            "fieldbridge: cannot write to stdout: {e}"
        );
        std::process::exit(EXIT_RUNTIME);
    }
}

/// Exit code when stdout's reader went away (128 + SIGPIPE, what a shell reports).
pub const EXIT_BROKEN_PIPE: i32 = 141;

pub fn main() -> i32 {
    let command = match args::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Command(c)) => c,
        Ok(Parsed::Print(text)) => {
            out!("{}", text.trim_end());
            return EXIT_OK;
        }
        Err(args::Error(e)) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    let path = match &command {
        Command::Run { config, .. }
        | Command::Check { config, .. }
        | Command::Status { config }
        | Command::Read { config, .. } => config.clone(),
        Command::Scan(args) => return crate::scan::main(args),
        Command::Sunspec(args) => return crate::sunspec::cli::main(args),
        Command::Profiles { config, show } => {
            let library = config::profile::Library::for_config(config);
            return match show {
                None => {
                    out!("{}", profiles_report(&library));
                    EXIT_OK
                }
                Some(name) => match profile_show(&library, name) {
                    Ok(report) => {
                        out!("{report}");
                        EXIT_OK
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        EXIT_CONFIG
                    }
                },
            };
        }
    };
    let (config, warnings) = match config::load_with_warnings(&path) {
        Ok(l) => (l.config, l.warnings),
        Err(errors) => {
            eprintln!("{errors}");
            return EXIT_CONFIG;
        }
    };
    let shown = path.display().to_string();
    match command {
        Command::Check { sample, .. } => {
            for w in &warnings {
                eprintln!("{}", config::warning_line(&shown, w));
            }
            out!("{}", check_report(&path, &config));
            match &sample {
                Some((device, line)) => match crate::lines::sample_report(&config, device, line) {
                    Ok(report) => {
                        out!("\n{report}");
                        EXIT_OK
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        EXIT_CONFIG
                    }
                },
                _ => EXIT_OK,
            }
        }
        Command::Run { journald, .. } => {
            crate::logging::init(&config.gateway.log_level, crate::logging::choose(journald));
            for w in &warnings {
                tracing::warn!("{}", config::warning_line(&shown, w));
            }
            run(config, path)
        }
        Command::Status { .. } => status(&config),
        Command::Read { device, point, .. } => {
            crate::logging::init("warn", crate::logging::Sink::Terminal);
            read(&config, &device, point.as_deref())
        }
        Command::Profiles { .. } | Command::Scan(_) | Command::Sunspec(_) => {
            unreachable!("answered before the config is loaded")
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // glibc gives every thread that allocates its own malloc arena; with the store's thread
    // that is resident memory for nothing in a process this small.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; it is called before the runtime starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // One thread is plenty for a gateway and keeps memory small on a Pi.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .thread_stack_size(256 * 1024)
        .build()
}

fn run(config: Config, path: PathBuf) -> i32 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return EXIT_RUNTIME;
        }
    };
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        let signals = cancel.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        // SIGHUP reloads the configuration file (systemd's ExecReload sends it).
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let shown = path.display().to_string();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!(config = %shown, "SIGHUP: reloading the configuration");
                // One pending reload is enough: a second SIGHUP meanwhile reads the same file.
                let _ = reload_tx.try_send(());
            }
        });
        let reload = app::Reload {
            path: path.clone(),
            requests: reload_rx,
        };
        match app::run_with_reload(config, cancel, Some(reload)).await {
            Ok(_) => EXIT_OK,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                EXIT_RUNTIME
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on the default action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn parity_letter(p: Parity) -> char {
    match p {
        Parity::None => 'N',
        Parity::Even => 'E',
        Parity::Odd => 'O',
    }
}

fn kind_name(k: RegisterKind) -> &'static str {
    match k {
        RegisterKind::Coil => "coils",
        RegisterKind::DiscreteInput => "discrete inputs",
        RegisterKind::Holding => "holding",
        RegisterKind::Input => "input",
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The `check` report: devices, read blocks per cycle, topics, bus time per cycle.
pub fn check_report(path: &Path, config: &Config) -> String {
    let mut out = String::new();
    let points: usize = config.devices.iter().map(|d| d.points.len()).sum();
    let _ = writeln!(
        out,
        "{}: OK (gateway {}, {} bus(es), {} device(s), {} point(s))",
        path.display(),
        config.gateway.id,
        config.buses.len(),
        config.devices.len(),
        points
    );
    let _ = writeln!(
        out,
        "mqtt: {:?} {}:{} as {}, status topic {}",
        config.mqtt.transport,
        config.mqtt.host,
        config.mqtt.port,
        config.mqtt.client_id,
        config.mqtt.status_topic
    );
    if let Some(http) = &config.http {
        let _ = writeln!(
            out,
            "http: http://{}/ (status page), /metrics, /healthz, /readyz; {}",
            http.listen,
            match &http.auth {
                Some(crate::model::HttpAuth::Bearer(_)) => "bearer token required",
                Some(crate::model::HttpAuth::Basic(_)) => "basic auth required",
                None => "loopback only, no credentials",
            }
        );
    }
    for (b, bus) in config.buses.iter().enumerate() {
        let serial = match &bus.kind {
            BusKind::Rtu(s) => {
                let _ = writeln!(
                    out,
                    "\nbus {} (rtu {} {} {}{}{}, frame gap {})",
                    bus.name,
                    s.port,
                    s.baud,
                    s.data_bits,
                    parity_letter(s.parity),
                    s.stop_bits,
                    ms(bus.frame_gap)
                );
                Some(s)
            }
            BusKind::Tcp { host, port } => {
                let _ = writeln!(out, "\nbus {} (modbus tcp {host}:{port})", bus.name);
                None
            }
            BusKind::RtuOverTcp { host, port } => {
                let _ = writeln!(out, "\nbus {} (rtu over tcp {host}:{port})", bus.name);
                None
            }
            BusKind::Lines(l) => {
                let s = &l.serial;
                let _ = writeln!(
                    out,
                    "\nbus {} (lines {} {} {}{}{}, line end {:?}, max line {} bytes, {:?})",
                    bus.name,
                    s.port,
                    s.baud,
                    s.data_bits,
                    parity_letter(s.parity),
                    s.stop_bits,
                    String::from_utf8_lossy(&l.line_end),
                    l.max_line,
                    l.encoding
                );
                None
            }
        };
        let mut load = 0.0f64;
        for device in config.devices.iter().filter(|d| d.bus == b) {
            if device.line.is_some() {
                out.push_str(&crate::lines::check_device(device));
                continue;
            }
            let _ = writeln!(
                out,
                "  device {} unit {} timeout {}, {} point(s)",
                device.name,
                device.unit,
                humantime::format_duration(device.timeout),
                device.points.len()
            );
            if device.sunspec.is_some() {
                let _ = writeln!(
                    out,
                    "    sunspec: auto: the SunSpec models' points are added when the gateway discovers the device (`fieldbridge sunspec` shows them now); the bus time below leaves them out"
                );
            }
            if let Some(prof) = &device.profile {
                profile_points(&mut out, device, prof);
            }
            for (g, group) in device.groups.iter().enumerate() {
                let selected: Vec<usize> = device
                    .points
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.group == g)
                    .map(|(i, _)| i)
                    .collect();
                if selected.is_empty() {
                    continue;
                }
                let blocks = plan::plan(
                    &device.points,
                    &selected,
                    plan::Limits::of(device),
                    &plan::BadRanges::default(),
                );
                let _ = writeln!(
                    out,
                    "    group {} every {}: {} read(s) per cycle",
                    group.name,
                    humantime::format_duration(group.interval),
                    blocks.len()
                );
                let mut cycle = Duration::ZERO;
                for block in &blocks {
                    let names: Vec<&str> = block
                        .points
                        .iter()
                        .map(|&p| device.points[p].name.as_str())
                        .collect();
                    let _ = writeln!(
                        out,
                        "      FC{} {} {}..={} ({}) -> {}",
                        block.kind.read_function(),
                        kind_name(block.kind),
                        block.start,
                        block.start + (block.count - 1),
                        block.count,
                        names.join(", ")
                    );
                    if let Some(s) = serial {
                        cycle += plan::estimate_rtu_time(
                            block,
                            s.baud,
                            s.data_bits,
                            s.parity != Parity::None,
                            s.stop_bits,
                            bus.frame_gap,
                        );
                    }
                }
                if serial.is_some() {
                    load += cycle.as_secs_f64() / group.interval.as_secs_f64();
                    let _ = writeln!(out, "      estimated bus time per cycle: {}", ms(cycle));
                }
            }
        }
        if serial.is_some() {
            let _ = writeln!(
                out,
                "  estimated bus load: {:.1} % of the line{}",
                load * 100.0,
                if load > 0.8 {
                    " (WARNING: above 80 %; raise intervals or the baud rate)"
                } else {
                    ""
                }
            );
        }
    }
    if let Some(topics) = crate::publish::sparkplug::Topics::new(config) {
        sparkplug_topics(&mut out, config, &topics);
        return out;
    }
    let entities = crate::publish::homeassistant::entities(config);
    if !entities.is_empty() {
        let _ = writeln!(out, "\nhome assistant entities (retained configs):");
        for e in &entities {
            let what = match (&e.device, &e.point) {
                (Some(d), Some(p)) => format!("{d}/{p}"),
                _ => "the gateway".into(),
            };
            let detail: Vec<String> = ["device_class", "unit_of_measurement", "state_class"]
                .iter()
                .filter_map(|k| {
                    e.payload
                        .get(*k)
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                })
                .collect();
            let _ = writeln!(
                out,
                "  {:<13} {} ({what}{}{})",
                e.component,
                e.topic,
                if detail.is_empty() { "" } else { ", " },
                detail.join(", ")
            );
        }
    }
    let _ = writeln!(out, "\ntopics:");
    for device in &config.devices {
        let _ = writeln!(out, "  {} (device status, retained)", device.status_topic);
        match device.message_mode {
            crate::model::MessageMode::PerDevice => {
                let _ = writeln!(out, "  {} (all points of {})", device.topic, device.name);
            }
            crate::model::MessageMode::PerPoint => {
                for p in &device.points {
                    let _ = writeln!(
                        out,
                        "  {} (qos {}{}{})",
                        p.topic,
                        p.qos as u8,
                        if p.retain { ", retained" } else { "" },
                        if p.writable { ", writable" } else { "" }
                    );
                }
            }
        }
    }
    out
}

/// What a Sparkplug host will see: the node's and devices' topics, every metric's alias and
/// datatype.
fn sparkplug_topics(out: &mut String, config: &Config, topics: &crate::publish::sparkplug::Topics) {
    use crate::publish::sparkplug::{aliases, point_datatype, proto::datatype, NODE_METRICS};
    let s = config.sparkplug.as_ref().expect("sparkplug mode");
    let _ = writeln!(
        out,
        "\nsparkplug: edge node {}/{} (data QoS {}{})",
        s.group_id,
        s.edge_node_id,
        s.data_qos as u8,
        s.primary_host_id
            .as_ref()
            .map(|h| format!(", primary host {h}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "  {} (seq 0, bdSeq, Node Control/Rebirth)",
        topics.nbirth
    );
    let _ = writeln!(out, "  {} (the last will: bdSeq)", topics.ndeath);
    let _ = writeln!(out, "  {} (node metrics)", topics.ndata);
    for (name, alias) in NODE_METRICS {
        let _ = writeln!(out, "    alias {alias:>5}  UInt64   {name}");
    }
    let _ = writeln!(out, "  {} (rebirth)", topics.ncmd);
    if let Some(state) = &topics.state {
        let _ = writeln!(out, "  {state} (the primary host's STATE, subscribed)");
    }
    let aliases = aliases(config);
    for (d, device) in config.devices.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {} | {} | {}",
            topics.dbirth[d], topics.ddata[d], topics.ddeath[d]
        );
        for (p, point) in device.points.iter().enumerate() {
            let _ = writeln!(
                out,
                "    alias {:>5}  {:<8} {}{}{}",
                aliases[d][p],
                datatype::name(point_datatype(point)),
                point.name,
                point
                    .unit
                    .as_ref()
                    .map(|u| format!(" [{u}]"))
                    .unwrap_or_default(),
                if point.writable {
                    format!(" (writable: {})", topics.dcmd[d])
                } else {
                    String::new()
                }
            );
        }
    }
}

fn read(config: &Config, device_name: &str, point: Option<&str>) -> i32 {
    let Some(device) = config.devices.iter().find(|d| d.name == device_name) else {
        let names: Vec<&str> = config.devices.iter().map(|d| d.name.as_str()).collect();
        eprintln!(
            "no device named {device_name:?}; devices: {}",
            names.join(", ")
        );
        return EXIT_CONFIG;
    };
    if device.line.is_some() {
        eprintln!(
            "{device_name} is a line device: `read` speaks Modbus; use `check --sample {device_name} 'LINE'` to test its parser"
        );
        return EXIT_CONFIG;
    }
    let selected: Vec<usize> = match point {
        Some(name) => match device.points.iter().position(|p| p.name == name) {
            Some(i) => vec![i],
            None => {
                let names: Vec<&str> = device.points.iter().map(|p| p.name.as_str()).collect();
                eprintln!(
                    "device {device_name} has no point {name:?}; points: {}",
                    names.join(", ")
                );
                return EXIT_CONFIG;
            }
        },
        None => (0..device.points.len()).collect(),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    let bus = &config.buses[device.bus];
    rt.block_on(async {
        let mut conn = Connection::new(
            bus.kind.clone(),
            bus.frame_gap,
            bus.connect_delay,
            bus.reconnect_max,
        );
        read_points(&mut conn, device, &selected).await
    })
}

async fn read_points(conn: &mut Connection, device: &Device, selected: &[usize]) -> i32 {
    let mut failed = false;
    for &p in selected {
        let point = &device.points[p];
        let result = conn
            .read(
                device.unit,
                point.kind,
                point.address,
                point.width(),
                device.timeout,
            )
            .await;
        match result {
            Ok(Data::Words(regs)) => {
                let hex: Vec<String> = regs.iter().map(|r| format!("0x{r:04X}")).collect();
                match codec::decode(point.data_type, point.order, &regs) {
                    Ok(raw) => outln!(
                        "{} = {} {}  (registers {} at {})",
                        point.name,
                        crate::publish::value_json(&codec::to_value(point, &raw)),
                        point.unit.as_deref().unwrap_or(""),
                        hex.join(" "),
                        point.address
                    ),
                    Err(e) => outln!("{}: cannot decode {}: {e}", point.name, hex.join(" ")),
                }
                for (way, value) in codec::decode_all_ways(&regs) {
                    outln!("    {way:<12} {value}");
                }
            }
            Ok(Data::Bits(bits)) => {
                outln!("{} = {}  (bit at {})", point.name, bits[0], point.address);
            }
            Err(e) => {
                failed = true;
                outln!("{}: {e}", point.name);
            }
        }
    }
    if failed {
        EXIT_RUNTIME
    } else {
        EXIT_OK
    }
}

/// `status`: the running gateway's snapshot from its HTTP endpoint (the same figures as the
/// stats topic and `/metrics`), when `http:` is configured; then, or else, the store's backlog
/// read from the file (a running gateway is not disturbed).
fn status(config: &Config) -> i32 {
    match &config.http {
        Some(http) => match crate::http::get(http, "/api/status") {
            Ok(body) => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(s) => {
                    out!("{}", live_report(&s));
                    return EXIT_OK;
                }
                Err(e) => outln!("live figures: unreadable answer from the gateway ({e})"),
            },
            Err(e) => outln!("live figures: the gateway does not answer ({e}); is it running?"),
        },
        None => {
            outln!("live figures: off (add `http: {{ listen: 127.0.0.1:9105 }}` to see them here)")
        }
    }
    store_status(config)
}

/// The human form of a running gateway's `/api/status`.
pub fn live_report(s: &serde_json::Value) -> String {
    let mut out = String::new();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let age = |v: &serde_json::Value| match v.as_f64() {
        Some(s) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(s as u64))
        ),
        None => "never".to_string(),
    };
    let g = &s["gateway"];
    let m = &s["mqtt"];
    let _ = writeln!(
        out,
        "gateway {} (fieldbridge {}, {}), up {}{}",
        g["id"].as_str().unwrap_or(""),
        g["version"].as_str().unwrap_or(""),
        g["mode"].as_str().unwrap_or(""),
        humantime::format_duration(Duration::from_secs(f(&g["uptime_seconds"]) as u64)),
        match g["stalled"].as_array() {
            Some(a) if !a.is_empty() => format!(
                ", STALLED: {}",
                a.iter()
                    .filter_map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        out,
        "mqtt: {} {}, backlog {}, in flight {}, delivered {}, dropped {}, reconnects {}",
        if m["connected"].as_bool() == Some(true) {
            "connected to"
        } else {
            "DISCONNECTED from"
        },
        m["broker"].as_str().unwrap_or(""),
        u(&m["backlog"]),
        u(&m["in_flight"]),
        u(&m["delivered"]),
        u(&m["dropped"]),
        u(&m["connects"]).saturating_sub(1),
    );
    match s["store"].as_object() {
        Some(st) => {
            let _ = writeln!(
                out,
                "store: {} messages, {:.1} KiB of {:.1} MiB cap{}",
                u(&st["messages"]),
                f(&st["bytes"]) / 1024.0,
                f(&st["cap_bytes"]) / (1024.0 * 1024.0),
                if u(&st["messages"]) > 0 {
                    format!(", oldest {}", age(&st["oldest_age_seconds"]))
                } else {
                    String::new()
                }
            );
        }
        None => {
            let _ = writeln!(out, "store: none (memory queue only)");
        }
    }
    let c = &s["commands"];
    let _ = writeln!(
        out,
        "commands: {} executed, {} refused, {} failed",
        u(&c["executed"]),
        u(&c["refused"]),
        u(&c["failed"])
    );
    let _ = writeln!(
        out,
        "devices: {}/{} online",
        u(&g["devices_online"]),
        u(&g["devices"])
    );
    for d in s["devices"].as_array().into_iter().flatten() {
        let state = match d["online"].as_bool() {
            Some(true) => "online",
            Some(false) => "OFFLINE",
            None => "unknown",
        };
        let _ = write!(
            out,
            "  {:<20} {:<8} bus {} unit {}, last good {}, {} failures / {} polls",
            d["name"].as_str().unwrap_or(""),
            state,
            d["bus"].as_str().unwrap_or(""),
            u(&d["unit"]),
            age(&d["last_good_age_seconds"]),
            u(&d["failures"]),
            u(&d["polls"]),
        );
        if let Some(ms) = d["poll_ms"].as_f64() {
            let _ = write!(out, ", poll {ms:.1} ms");
        }
        if let Some(e) = d["last_error"].as_str() {
            let _ = write!(
                out,
                "\n  {:<20} last error ({}): {e}",
                "",
                age(&d["last_error_age_seconds"])
            );
        }
        out.push('\n');
    }
    out
}

/// The store's backlog, read from the file.
fn store_status(config: &Config) -> i32 {
    let Some(path) = &config.store.path else {
        outln!("store: none (store.path: none); messages are kept in memory only");
        return EXIT_OK;
    };
    if !path.exists() {
        outln!(
            "store: {} (not created yet)\nbacklog: 0 messages",
            path.display()
        );
        return EXIT_OK;
    }
    match crate::store::inspect(path) {
        Ok((messages, bytes, oldest)) => {
            outln!("store: {}", path.display());
            outln!(
                "backlog: {messages} messages, {:.1} KiB of {:.1} MiB cap",
                bytes as f64 / 1024.0,
                config.store.max_bytes as f64 / (1024.0 * 1024.0)
            );
            if let Some(created) = oldest {
                let age_ms = crate::store::now_ms().saturating_sub(created).max(0) as u64;
                outln!(
                    "oldest: {} ago",
                    humantime::format_duration(Duration::from_secs(age_ms / 1000))
                );
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("cannot read the store: {e}");
            EXIT_RUNTIME
        }
    }
}

/// `fieldbridge profiles`: every profile with its vendor, model, points, document and file.
pub fn profiles_report(library: &config::profile::Library) -> String {
    let mut out = String::new();
    let entries = library.list();
    let _ = writeln!(
        out,
        "{:<24} {:<18} {:<28} {:>6}  {:<7}  DOCUMENT",
        "NAME", "VENDOR", "MODEL", "POINTS", "FROM"
    );
    for e in &entries {
        match config::profile::info(&e.file) {
            Ok(i) => {
                let _ = writeln!(
                    out,
                    "{:<24} {:<18} {:<28} {:>6}  {:<7}  {}",
                    e.name,
                    i.vendor,
                    i.model,
                    i.points,
                    e.origin.name(),
                    i.document
                );
            }
            Err(err) => {
                let _ = writeln!(out, "{:<24} (does not load: {err})", e.name);
            }
        }
        for shadowed in &e.shadows {
            let _ = writeln!(out, "{:<24} (hides {})", "", shadowed.display());
        }
    }
    let _ = writeln!(out, "\n{} profile(s), searched in order:", entries.len());
    for (dir, origin) in &library.dirs {
        let state = if dir.is_dir() { "" } else { " (absent)" };
        let _ = writeln!(out, "  {} ({}){state}", dir.display(), origin.name());
    }
    out
}

/// `fieldbridge profiles show NAME`: the profile validated, its defaults and points.
fn profile_show(
    library: &config::profile::Library,
    name: &str,
) -> Result<String, config::ConfigErrors> {
    let device = config::profile::expand(library, name)?;
    let mut out = String::new();
    if let Some((file, origin)) = library.find(name) {
        let i = config::profile::info(&file)?;
        let _ = writeln!(out, "profile {name}: {} {}", i.vendor, i.model);
        let _ = writeln!(out, "file: {} ({})", file.display(), origin.name());
        let _ = writeln!(out, "document: {}", i.document);
        if let Some(n) = &i.notes {
            let _ = writeln!(out, "notes: {}", n.trim());
        }
    }
    let groups: Vec<String> = device
        .groups
        .iter()
        .map(|g| {
            format!(
                "{} every {}",
                g.name,
                humantime::format_duration(g.interval)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "defaults: unit {}, timeout {}, groups: {}",
        device.unit,
        humantime::format_duration(device.timeout),
        groups.join(", ")
    );
    let _ = writeln!(out, "{} point(s):", device.points.len());
    for p in &device.points {
        let _ = writeln!(out, "  {}", point_line(&device, p));
    }
    Ok(out)
}

/// One point as `check` and `profiles show` print it.
fn point_line(device: &Device, p: &crate::model::Point) -> String {
    let mut s = format!(
        "{:<28} {} {:<5} {:<6}",
        p.name,
        kind_name(p.kind),
        p.address,
        codec::type_name(p.data_type)
    );
    match p.data_type {
        crate::model::DataType::Bit(b) => {
            let _ = write!(s, " bit {b}");
        }
        crate::model::DataType::Ascii(n) => {
            let _ = write!(s, " {n} regs");
        }
        t if t.width() > 1 => {
            let _ = write!(s, " {}", p.order.name());
        }
        _ => {}
    }
    if p.scale != 1.0 {
        let _ = write!(s, " x{}", p.scale);
    }
    if p.offset != 0.0 {
        let _ = write!(s, " {:+}", p.offset);
    }
    if let Some(u) = &p.unit {
        let _ = write!(s, " {u}");
    }
    if p.group != 0 {
        if let Some(g) = device.groups.get(p.group) {
            let _ = write!(s, " (group {})", g.name);
        }
    }
    if p.writable {
        s.push_str(" writable");
    }
    s
}

/// The expanded points of a device with a profile, each saying where it came from.
fn profile_points(out: &mut String, device: &Device, prof: &crate::model::DeviceProfile) {
    use crate::model::PointSource;
    let count = |k: PointSource| prof.sources.iter().filter(|s| **s == k).count();
    let _ = writeln!(
        out,
        "    profile {} ({}; {}): {} point(s) from the profile, {} changed on the device, {} of the device's own",
        prof.name,
        prof.file,
        prof.document,
        count(PointSource::Profile),
        count(PointSource::Overridden),
        count(PointSource::Device)
    );
    if !prof.excluded.is_empty() {
        let _ = writeln!(out, "    excluded: {}", prof.excluded.join(", "));
    }
    for (p, src) in device.points.iter().zip(&prof.sources) {
        let from = match src {
            PointSource::Profile => "profile",
            PointSource::Overridden => "profile, changed on the device",
            PointSource::Device => "device",
        };
        let _ = writeln!(out, "      {} [{from}]", point_line(device, p));
    }
}
