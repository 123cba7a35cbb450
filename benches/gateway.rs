//! Gateway benchmark: prints the figures W1, W2 and W3 of issue 2, and W1 with per-point JSON
//! (`w1p`) and in Sparkplug B mode (`w1s`) with the MQTT bytes per reading of each (see
//! `benches/README.md`).
//!
//! One binary, three roles (the first argument):
//! - `run`: the harness. Starts a private mosquitto on a free loopback port and the simulated
//!   devices (this binary again, `devices`, in its own process so that the gateway's CPU is
//!   measured alone), then for W1 and W2 writes a config, starts `fieldbridge run`, measures it
//!   from `/proc/PID/stat` and `/proc/PID/status`, stops it with SIGTERM and reads its `bus
//!   summary` / `link summary` lines, and counts what a subscriber received (messages, the
//!   values they carry, the bytes of their PUBLISH packets). W3 then compares
//!   request rates on one TCP connection in this process. Everything it starts is stopped by
//!   PID; every wait is bounded.
//! - `devices`: N Modbus TCP servers (tokio-modbus) on free loopback ports, one thread each,
//!   whose holding registers change on every read. Prints `PORTS p1 p2 …`, then serves until
//!   its stdin closes (the harness ended) or `--max-secs` passed.
//! - no argument (what `cargo test --all-targets` does with a `harness = false` bench): prints
//!   the usage and exits 0, so the test suite never runs a benchmark.

#[path = "support/mod.rs"]
mod support;
use support::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use fieldbridge::modbus::Connection;
use fieldbridge::model::{BusKind, RegisterKind};

const REGISTERS: u16 = 50;
/// Simulated devices polled by the gateway; one more serves W3 alone.
const DEVICES: usize = 10;
/// Every workload `--only` accepts, in the order they run (the default is `DEFAULT_ONLY`).
const WORKLOADS: [&str; 7] = ["w1", "w1p", "w1s", "w1h", "w2", "w1n", "w3"];
const DEFAULT_ONLY: [&str; 4] = ["w1", "w2", "w1n", "w3"];
/// W1s: the Sparkplug group and edge node (topics `spBv1.0/bench/…/gw[/devN]`).
const SP_GROUP: &str = "bench";
const SP_NODE: &str = "gw";
const USAGE: &str = "\
usage: gateway run [--gateway PATH] [--warmup SECS] [--measure SECS] [--w3-secs SECS]
                   [--w3-rounds N] [--load-max LOAD] [--load-wait SECS] [--workdir DIR]
                   [--only w1,w2,w1n,w3]   (also: w1p, w1s, w1h)
       gateway devices [--count N] [--max-secs SECS]
Run through scripts/bench, which builds the release binaries first (see benches/README.md).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => Opts::parse(&args[1..]).and_then(|o| run(&o)),
        Some("devices") => devices_main(&args[1..]),
        _ => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    gateway: PathBuf,
    warmup: Duration,
    measure: Duration,
    w3_secs: Duration,
    w3_rounds: usize,
    load_max: f64,
    load_wait: Duration,
    workdir: PathBuf,
    only: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Res<Opts> {
        let mut o = Opts {
            gateway: PathBuf::from("target/release/fieldbridge"),
            warmup: Duration::from_secs(5),
            measure: Duration::from_secs(60),
            w3_secs: Duration::from_secs(5),
            w3_rounds: 2,
            load_max: 1.0,
            load_wait: Duration::from_secs(300),
            workdir: PathBuf::from("target/bench-run"),
            only: DEFAULT_ONLY.map(String::from).to_vec(),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
            let secs = || -> Res<Duration> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| (0.0..=3600.0).contains(s))
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| format!("{flag}: `{value}` is not a number of seconds 0..=3600"))
            };
            match flag.as_str() {
                "--gateway" => o.gateway = PathBuf::from(value),
                "--warmup" => o.warmup = secs()?,
                "--measure" => o.measure = secs()?,
                "--w3-secs" => o.w3_secs = secs()?,
                "--load-wait" => o.load_wait = secs()?,
                "--w3-rounds" => {
                    o.w3_rounds = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=20).contains(n))
                        .ok_or("--w3-rounds: 1..=20")?;
                }
                "--load-max" => {
                    o.load_max = value.parse().map_err(|_| "--load-max: a number")?;
                }
                "--workdir" => o.workdir = PathBuf::from(value),
                "--only" => {
                    o.only = value.split(',').map(str::to_owned).collect();
                    if let Some(bad) = o.only.iter().find(|w| !WORKLOADS.contains(&w.as_str())) {
                        return Err(format!(
                            "--only: unknown workload `{bad}` (known: {})",
                            WORKLOADS.join(",")
                        ));
                    }
                }
                _ => return Err(format!("unknown option {flag}\n{USAGE}")),
            }
        }
        Ok(o)
    }

    fn wants(&self, w: &str) -> bool {
        self.only.iter().any(|x| x == w)
    }
}

// ---------------------------------------------------------------------------------------------
// The harness

fn run(o: &Opts) -> Res<()> {
    let gateway = std::fs::canonicalize(&o.gateway)
        .map_err(|e| format!("gateway binary {}: {e}", o.gateway.display()))?;
    std::fs::create_dir_all(&o.workdir).map_err(|e| format!("{}: {e}", o.workdir.display()))?;
    let workdir = std::fs::canonicalize(&o.workdir).map_err(|e| e.to_string())?;

    println!("== machine");
    let version = Command::new(&gateway)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("gateway      {} ({version})", gateway.display());
    println!("cpu          {} x {}", nproc(), cpu_model());
    println!("kernel       {}", read_trim("/proc/sys/kernel/osrelease"));
    println!("load before  {}", loadavg_text());
    let load_before = loadavg_text();

    let mut devices = Devices::start(DEVICES + 1)?;
    println!(
        "devices      pid {} ports {:?}",
        devices.child.id(),
        devices.ports
    );

    let mut results = Vec::new();
    // w1n: W1 against a mosquitto with `set_tcp_nodelay true` (its default is false, and then
    // its PUBACKs wait on Nagle's algorithm; see benches/README.md). w1p and w1s: W1 with
    // per-point JSON and in Sparkplug mode, run next to W1 so that their figures compare.
    let second = Duration::from_secs(1);
    for (w, interval, nodelay, format) in [
        ("w1", second, false, Format::PerDevice),
        ("w1p", second, false, Format::PerPoint),
        ("w1s", second, false, Format::Sparkplug),
        ("w1h", second, false, Format::PerDevice),
        ("w2", Duration::from_millis(100), false, Format::PerDevice),
        ("w1n", second, true, Format::PerDevice),
    ] {
        if !o.wants(w) {
            continue;
        }
        wait_for_quiet(o.load_max, o.load_wait);
        let broker = Mosquitto::start(&workdir, nodelay)?;
        let r = gateway_workload(
            o,
            w,
            interval,
            format,
            &gateway,
            &workdir,
            broker.port,
            &devices.ports[..DEVICES],
            devices.child.id(),
            broker.child.id(),
        )?;
        if let Some(mut r) = r {
            r.broker_nodelay = nodelay;
            results.push(r);
        }
    }
    let w3 = if o.wants("w3") {
        Some(w3(o, devices.ports[DEVICES])?)
    } else {
        None
    };
    devices.check_alive()?;
    drop(devices);

    println!("\n== summary");
    println!("load before {load_before}; after {}", loadavg_text());
    for r in &results {
        r.print_summary();
    }
    print_comparison(&results);
    if let Some(w3) = w3 {
        w3.print_summary();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// W1 / W2: the gateway process against 10 devices and mosquitto

/// How the gateway publishes the readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `message: per_device`: one JSON message per device and poll on `bench/devN`.
    PerDevice,
    /// `message: per_point`: one JSON message per point and poll on `bench/devN/rM`.
    PerPoint,
    /// A `sparkplug` section: protobuf on `spBv1.0/bench/{NBIRTH|DBIRTH|DDATA|…}/gw[/devN]`.
    Sparkplug,
}

impl Format {
    fn describe(self) -> &'static str {
        match self {
            Format::PerDevice => "per_device JSON, QoS 1",
            Format::PerPoint => "per_point JSON, QoS 1",
            Format::Sparkplug => "Sparkplug B (births QoS 0, DDATA data_qos 0)",
        }
    }

    /// What the subscriber subscribes to. In Sparkplug mode also `bench/#`, to see anything the
    /// gateway still publishes under its JSON prefix.
    fn filters(self) -> &'static [&'static str] {
        match self {
            Format::PerDevice | Format::PerPoint => &["bench/#"],
            Format::Sparkplug => &["spBv1.0/#", "bench/#"],
        }
    }

    /// The device whose readings a message on `topic` carries (`None`: not a data message, such
    /// as a status, a birth or a node message).
    fn data_device(self, topic: &str) -> Option<usize> {
        let rest = match self {
            Format::PerDevice => topic.strip_prefix("bench/dev")?,
            Format::PerPoint => {
                let (dev, point) = topic.strip_prefix("bench/dev")?.split_once('/')?;
                point.strip_prefix('r')?.parse::<u16>().ok()?;
                dev
            }
            Format::Sparkplug => {
                let mut l = topic.split('/');
                match [l.next(), l.next(), l.next(), l.next(), l.next(), l.next()] {
                    [Some("spBv1.0"), Some(SP_GROUP), Some("DDATA"), Some(SP_NODE), Some(d), None] => {
                        d.strip_prefix("dev")?
                    }
                    _ => return None,
                }
            }
        };
        rest.parse().ok()
    }

    /// The kind of message on `topic`, for the byte breakdown: `data`, else the Sparkplug
    /// message type (`NBIRTH`, `DBIRTH`, …) or the last topic level (`status`, …).
    fn category(self, topic: &str) -> String {
        if self.data_device(topic).is_some() {
            return "data".into();
        }
        match topic.strip_prefix("spBv1.0/") {
            Some(rest) => rest.split('/').nth(1).unwrap_or(rest).to_owned(),
            None => topic.rsplit('/').next().unwrap_or(topic).to_owned(),
        }
    }
}

struct Workload {
    name: String,
    interval: Duration,
    format: Format,
    measured: Duration,
    cpu_pct: f64,
    devices_cpu_pct: f64,
    broker_cpu_pct: f64,
    /// mosquitto's `set_tcp_nodelay`.
    broker_nodelay: bool,
    hwm_kib: u64,
    rss_kib: u64,
    /// VmRSS at the end split: anonymous (heap, stacks) and file-backed (the binary's pages).
    anon_kib: u64,
    file_kib: u64,
    /// w1h: the gateway's CPU per `/metrics` scrape, µs.
    scrape_us: Option<f64>,
    load: Vec<[f64; 3]>,
    buses: Vec<BTreeMap<String, String>>,
    link: BTreeMap<String, String>,
    /// What the subscriber received, per topic.
    received: Received,
    exit: String,
    log: PathBuf,
}

/// The gateway's config. `store`: the outbox file (the default settings otherwise), or `None`
/// for a gateway that has no `store` section (before store-and-forward). Sparkplug: the same
/// config plus `sparkplug: { group_id, edge_node_id }` (`data_qos` its default, 0); the
/// devices' `message` is then not used.
fn gateway_config(
    broker: u16,
    ports: &[u16],
    interval: Duration,
    store: Option<&Path>,
    format: Format,
    http: Option<u16>,
) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "gateway:\n  id: bench-gw\n  prefix: bench\n  log_level: info\n\
         mqtt:\n  host: {LOCALHOST}\n  port: {broker}\n"
    );
    if let Some(store) = store {
        let _ = write!(y, "store:\n  path: {}\n", store.display());
    }
    if format == Format::Sparkplug {
        let _ = writeln!(
            y,
            "sparkplug: {{ group_id: {SP_GROUP}, edge_node_id: {SP_NODE} }}"
        );
    }
    if let Some(port) = http {
        let _ = writeln!(y, "http: {{ listen: \"{LOCALHOST}:{port}\" }}");
    }
    y.push_str("buses:\n");
    for (i, port) in ports.iter().enumerate() {
        let _ = writeln!(
            y,
            "  - {{ name: bus{i}, type: tcp, host: {LOCALHOST}, port: {port} }}"
        );
    }
    y.push_str("devices:\n");
    for i in 0..ports.len() {
        let _ = write!(
            y,
            "  - name: dev{i}\n    bus: bus{i}\n    unit: 1\n    interval: {}ms\n    \
             timeout: 500ms\n    message: {}\n    points:\n",
            interval.as_millis(),
            if format == Format::PerPoint {
                "per_point"
            } else {
                "per_device"
            }
        );
        for r in 0..REGISTERS {
            let _ = writeln!(y, "      - {{ name: r{r}, address: {r} }}");
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn gateway_workload(
    o: &Opts,
    name: &str,
    interval: Duration,
    format: Format,
    gateway: &Path,
    workdir: &Path,
    broker: u16,
    ports: &[u16],
    devices_pid: u32,
    broker_pid: u32,
) -> Res<Option<Workload>> {
    println!(
        "\n== {name}: {} devices x {REGISTERS} holding registers every {interval:?}, \
         {}; warm-up {:?}, measure {:?}",
        ports.len(),
        format.describe(),
        o.warmup,
        o.measure
    );
    let config = workdir.join(format!("{name}.yaml"));
    // Never the default store path (/var/lib/...): the outbox lives in the work directory.
    let store = workdir.join(format!("{name}.outbox.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", store.display()));
    }
    // w1h: W1 with the HTTP endpoint on, /metrics scraped every 5 s (issue 14's figure).
    let http = if name == "w1h" {
        Some(free_port()?)
    } else {
        None
    };
    std::fs::write(
        &config,
        gateway_config(broker, ports, interval, Some(&store), format, http),
    )
    .map_err(|e| format!("{}: {e}", config.display()))?;
    let check = Command::new(gateway)
        .args(["check", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} check: {e}", gateway.display()))?;
    if !check.status.success() {
        let text = String::from_utf8_lossy(&check.stderr).into_owned()
            + &String::from_utf8_lossy(&check.stdout);
        if format == Format::Sparkplug && text.contains("sparkplug") {
            println!("this gateway has no Sparkplug mode: {name} skipped\n{text}");
            return Ok(None);
        }
        if http.is_some() && text.contains("http") {
            println!("this gateway has no HTTP endpoint: {name} skipped\n{text}");
            return Ok(None);
        }
        if !text.contains("store") {
            return Err(format!(
                "fieldbridge check refused {}:\n{text}",
                config.display()
            ));
        }
        println!("this gateway has no `store` section: config without it");
        std::fs::write(
            &config,
            gateway_config(broker, ports, interval, None, format, http),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
    }
    let log = workdir.join(format!("{name}.gateway.log"));

    let sub = Subscriber::start(broker, format.filters())?;
    let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let child = Command::new(gateway)
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("start {}: {e}", gateway.display()))?;
    let mut gw = Proc::new(child, "gateway");
    let pid = gw.child.id();
    println!(
        "gateway pid {pid}, mosquitto pid {broker_pid} port {broker}, config {}, log {}",
        config.display(),
        log.display()
    );

    sleep_checking(&mut gw, o.warmup)?;
    let scraper = http.map(Scraper::start);
    let t0 = Instant::now();
    let cpu0 = cpu_ticks(pid)?;
    let ns0 = cpu_ns(pid);
    let dev0 = cpu_ticks(devices_pid)?;
    let brk0 = cpu_ticks(broker_pid)?;
    let mut load = vec![loadavg()];
    // Bounded: one sample per 5 s until the window ends.
    while t0.elapsed() < o.measure {
        let left = o.measure.saturating_sub(t0.elapsed());
        sleep_checking(&mut gw, left.min(Duration::from_secs(5)))?;
        load.push(loadavg());
    }
    let cpu1 = cpu_ticks(pid)?;
    let ns1 = cpu_ns(pid);
    let dev1 = cpu_ticks(devices_pid)?;
    let brk1 = cpu_ticks(broker_pid)?;
    let measured = t0.elapsed();
    let Memory {
        hwm_kib,
        rss_kib,
        anon_kib,
        file_kib,
    } = memory_kib(pid)?;
    // Where the resident pages are, mapping by mapping, for when the RSS moves.
    let _ = std::fs::copy(
        format!("/proc/{pid}/smaps"),
        workdir.join(format!("{name}.smaps")),
    );
    if let Some(s) = scraper {
        let (ok, failed, bytes) = s.stop();
        println!("scraped /metrics every 5 s: {ok} ok, {failed} failed, last {bytes} bytes");
    }
    // The endpoint's share apart from the run-to-run noise of two gateway processes: the
    // gateway's CPU per scrape, from back-to-back scrapes after the window (the background
    // rate of the window taken out).
    let scrape_us = match (http, ns0, ns1) {
        (Some(port), Some(a), Some(b)) => {
            let background_ns_per_s = (b - a) as f64 / measured.as_secs_f64();
            let (n, t, c0) = (SCRAPES, Instant::now(), cpu_ns(pid));
            let mut got = 0;
            for _ in 0..n {
                if Scraper::once(port).is_ok() {
                    got += 1;
                }
            }
            let (took, c1) = (t.elapsed(), cpu_ns(pid));
            match (c0, c1) {
                (Some(c0), Some(c1)) if got == n => {
                    let ns = (c1 - c0) as f64 - background_ns_per_s * took.as_secs_f64();
                    let us = ns / f64::from(n) / 1e3;
                    println!(
                        "scrape cost: {us:.0} µs of gateway CPU a /metrics ({n} back to back in {:.2} s, background taken out); one per 5 s is {:.4} % of a core",
                        took.as_secs_f64(),
                        us / 5e6 * 100.0
                    );
                    Some(us)
                }
                _ => {
                    println!("scrape cost: {got} of {n} scrapes answered, not measured");
                    None
                }
            }
        }
        _ => None,
    };
    let pct =
        |a: u64, b: u64| (b - a) as f64 / clock_ticks_per_sec() / measured.as_secs_f64() * 100.0;

    let exit = gw.terminate(Duration::from_secs(15));
    // Messages the gateway flushed on its way out are on their way to the subscriber.
    std::thread::sleep(Duration::from_millis(1000));
    let received = sub.stop()?;
    let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
    let buses: Vec<_> = text
        .lines()
        .filter(|l| l.contains("bus summary"))
        .map(fields)
        .collect();
    let link = text
        .lines()
        .find(|l| l.contains("link summary"))
        .map(fields)
        .unwrap_or_default();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    if !warnings.is_empty() {
        println!("gateway warnings/errors ({}), first ones:", warnings.len());
        for w in warnings.iter().take(5) {
            println!("  {w}");
        }
    }
    let w = Workload {
        name: name.to_owned(),
        interval,
        format,
        measured,
        // The gateway's own CPU from its threads' schedstat (nanoseconds) where it can be read:
        // ticks (10 ms) are too coarse for a 0.25 % load over a minute (about 15 ticks).
        cpu_pct: match (ns0, ns1) {
            (Some(a), Some(b)) if b >= a => (b - a) as f64 / 1e9 / measured.as_secs_f64() * 100.0,
            _ => pct(cpu0, cpu1),
        },
        devices_cpu_pct: pct(dev0, dev1),
        broker_cpu_pct: pct(brk0, brk1),
        broker_nodelay: false,
        hwm_kib,
        rss_kib,
        anon_kib,
        file_kib,
        scrape_us,
        load,
        buses,
        link,
        received,
        exit,
        log,
    };
    w.print_detail();
    Ok(Some(w))
}

impl Workload {
    fn link_f(&self, key: &str) -> f64 {
        self.link
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    fn bus_u(&self, bus: usize, key: &str) -> u64 {
        self.buses
            .iter()
            .find(|b| b.get("bus").map(String::as_str) == Some(&format!("bus{bus}")))
            .and_then(|b| b.get(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// What the subscriber received of device `b`'s readings: its data messages (the device
    /// topic; its point topics; its DDATA).
    fn device(&self, b: usize) -> TopicCount {
        let mut c = TopicCount::default();
        for (t, n) in &self.received.topics {
            if self.format.data_device(t) == Some(b) {
                c += *n;
            }
        }
        c
    }

    /// (polls, skipped ticks, data messages received, their distinct timestamps).
    fn totals(&self) -> (u64, u64, u64, u64) {
        let n = self.buses.len();
        let polls = (0..n).map(|b| self.bus_u(b, "polls")).sum();
        let skipped = (0..n).map(|b| self.bus_u(b, "skipped_ticks")).sum();
        let received = (0..n).map(|b| self.device(b).messages).sum();
        let distinct = (0..n).map(|b| self.device(b).distinct).sum();
        (polls, skipped, received, distinct)
    }

    /// Point values the gateway read: polls (one device per bus) x points.
    fn readings(&self) -> u64 {
        self.totals().0 * u64::from(REGISTERS)
    }

    /// Every PUBLISH received, and those that carried readings (`data`).
    fn bytes(&self) -> (TopicCount, TopicCount) {
        let (mut all, mut data) = (TopicCount::default(), TopicCount::default());
        for (t, n) in &self.received.topics {
            all += *n;
            if self.format.data_device(t).is_some() {
                data += *n;
            }
        }
        (all, data)
    }

    /// Upstream MQTT bytes per reading: (every PUBLISH, the data messages only).
    fn bytes_per_reading(&self) -> (f64, f64) {
        let (all, data) = self.bytes();
        let r = self.readings().max(1) as f64;
        (all.bytes as f64 / r, data.bytes as f64 / r)
    }

    fn load_max(&self) -> f64 {
        self.load.iter().map(|l| l[0]).fold(0.0, f64::max)
    }

    fn print_detail(&self) {
        println!(
            "gateway exit: {}; measured {:.1} s",
            self.exit,
            self.measured.as_secs_f64()
        );
        println!(
            "{:<6} {:>7} {:>7} {:>8} {:>9} {:>9} {:>10} {:>8} {:>11}",
            "device",
            "polls",
            "skipped",
            "failed",
            "received",
            "distinct",
            "rcvd/polls",
            "values",
            "values/read"
        );
        for b in 0..self.buses.len() {
            let polls = self.bus_u(b, "polls");
            let c = self.device(b);
            println!(
                "{:<6} {:>7} {:>7} {:>8} {:>9} {:>9} {:>10.4} {:>8} {:>11.4}",
                format!("dev{b}"),
                polls,
                self.bus_u(b, "skipped_ticks"),
                self.bus_u(b, "failed"),
                c.messages,
                c.distinct,
                c.messages as f64 / polls.max(1) as f64,
                c.values,
                c.values as f64 / (polls * u64::from(REGISTERS)).max(1) as f64
            );
        }
        // The upstream bytes by kind of message.
        let mut kinds: BTreeMap<String, TopicCount> = BTreeMap::new();
        for (t, n) in &self.received.topics {
            *kinds.entry(self.format.category(t)).or_default() += *n;
        }
        let list: Vec<String> = kinds
            .iter()
            .map(|(k, n)| {
                format!(
                    "{k} {} msgs / {} B (values {})",
                    n.messages, n.bytes, n.values
                )
            })
            .collect();
        println!("PUBLISH packets received by kind: {}", list.join("; "));
        let (all, data) = self.bytes();
        let (per, per_data) = self.bytes_per_reading();
        println!(
            "upstream MQTT bytes: {} in {} PUBLISH packets ({} in data messages) over {} \
             readings (polls x {REGISTERS} points): {per:.2} bytes/reading, data messages \
             only {per_data:.2}",
            all.bytes,
            all.messages,
            data.bytes,
            self.readings()
        );
        if self.format == Format::Sparkplug {
            println!(
                "Sparkplug seq: {} messages with a seq, {} not following the one before; \
                 readings are what the gateway read: DDATA carries the changed metrics only, \
                 and a device's first poll goes out as its DBIRTH",
                self.received.seq_messages, self.received.seq_breaks
            );
        }
        println!("link summary: {:?}", self.link);
        let loads: Vec<String> = self.load.iter().map(|l| format!("{:.2}", l[0])).collect();
        println!("load (1 min) during the window: {}", loads.join(" "));
        println!(
            "gateway CPU {:.3} % of one core; VmHWM {} KiB ({:.2} MiB), VmRSS at end {} KiB \
             (anonymous {} KiB, file-backed {} KiB); (devices process {:.2} %, mosquitto {:.2} %)",
            self.cpu_pct,
            self.hwm_kib,
            self.hwm_kib as f64 / 1024.0,
            self.rss_kib,
            self.anon_kib,
            self.file_kib,
            self.devices_cpu_pct,
            self.broker_cpu_pct
        );
    }

    fn print_summary(&self) {
        let (polls, skipped, received, distinct) = self.totals();
        let mib = self.hwm_kib as f64 / 1024.0;
        let p50 = self.link_f("latency_p50_ms");
        let p99 = self.link_f("latency_p99_ms");
        let (cpu_target, extra) = if self.interval >= Duration::from_secs(1) {
            (
                0.5,
                format!(
                    "; RSS {mib:.2} MiB (target <= 8: {}); p99 {p99:.2} ms (target <= 10: {})",
                    verdict(mib <= 8.0),
                    verdict(p99 <= 10.0)
                ),
            )
        } else {
            (
                3.0,
                format!(
                    "; every poll delivered: {}",
                    verdict(received == polls && distinct == polls && skipped == 0)
                ),
            )
        };
        println!(
            "{} ({:?}, mosquitto set_tcp_nodelay {}): CPU {:.3} % of one core | peak RSS {mib:.2} MiB | latency read->PUBACK \
             p50 {p50:.2} ms, p99 {p99:.2} ms | polls {polls}, skipped ticks {skipped}, link \
             delivered {} dropped {} undelivered {}, subscriber received {received} ({distinct} \
             distinct) = {:.4} of polls | load max {:.2} during the window",
            self.name.to_uppercase(),
            self.interval,
            self.broker_nodelay,
            self.cpu_pct,
            self.link.get("delivered").map_or("?", String::as_str),
            self.link.get("dropped").map_or("?", String::as_str),
            self.link.get("undelivered").map_or("?", String::as_str),
            received as f64 / polls.max(1) as f64,
            self.load_max()
        );
        println!(
            "    targets: CPU <= {cpu_target} %: {}{extra}   (log: {})",
            verdict(self.cpu_pct <= cpu_target),
            self.log.display()
        );
        let (per, per_data) = self.bytes_per_reading();
        let (_, data) = self.bytes();
        let readings = self.readings();
        let note = match self.format {
            Format::Sparkplug => {
                " (readings = what the gateway read; DDATA carries changed metrics only and \
                 each device's first poll is its DBIRTH)"
            }
            _ => "",
        };
        println!(
            "    {}: {per:.2} bytes/reading upstream (data messages only {per_data:.2}); values \
             received {} of {readings} read = {:.4}{note}",
            self.format.describe(),
            data.values,
            data.values as f64 / readings.max(1) as f64
        );
        if self.format == Format::Sparkplug && self.received.seq_breaks > 0 {
            println!(
                "    Sparkplug seq broken {} times in {} messages",
                self.received.seq_breaks, self.received.seq_messages
            );
        }
    }
}

/// W1 in its three encodings side by side: bytes per reading, and CPU and peak RSS against
/// JSON per device.
fn print_comparison(results: &[Workload]) {
    let find = |name: &str| results.iter().find(|r| r.name == name);
    let w1 = [find("w1p"), find("w1"), find("w1s")];
    if w1.iter().flatten().count() > 1 {
        let show = |w: Option<&Workload>, data: bool| {
            w.map_or("-".to_owned(), |w| {
                let (all, d) = w.bytes_per_reading();
                format!("{:.2}", if data { d } else { all })
            })
        };
        println!(
            "W1 bytes per reading: JSON per point {} | JSON per device {} | Sparkplug {}",
            show(w1[0], false),
            show(w1[1], false),
            show(w1[2], false)
        );
        println!(
            "    data messages only: JSON per point {} | JSON per device {} | Sparkplug {}   \
             (MQTT 3.1.1 PUBLISH packets: header, topic, packet id, payload; readings = \
             devices x points x polls the gateway read)",
            show(w1[0], true),
            show(w1[1], true),
            show(w1[2], true)
        );
    }
    let Some(base) = w1[1] else { return };
    for (w, label, within) in [
        (w1[2], "Sparkplug", Some(1.10)),
        (w1[0], "JSON per point", None),
        (find("w1h"), "HTTP endpoint on, scraped every 5 s", None),
    ] {
        let Some(w) = w else { continue };
        let cpu = w.cpu_pct / base.cpu_pct;
        let rss = w.hwm_kib as f64 / base.hwm_kib.max(1) as f64;
        let target = match (within, w.name.as_str()) {
            (Some(t), _) => format!(
                " (target within 10 %: CPU {}, RSS {})",
                verdict(cpu <= t),
                verdict(rss <= t)
            ),
            // Issue 14: CPU + <= 5 %, RSS + <= 0.5 MiB.
            (None, "w1h") => format!(
                " (targets CPU +5 %: {}, RSS +0.5 MiB: {})",
                verdict(cpu <= 1.05),
                verdict(w.hwm_kib <= base.hwm_kib + 512)
            ),
            _ => String::new(),
        };
        println!(
            "{label} / JSON per device: CPU {cpu:.2}, RSS {rss:.2}{target}   ({:.3} vs {:.3} % of \
             one core, {:.2} vs {:.2} MiB)",
            w.cpu_pct,
            base.cpu_pct,
            w.hwm_kib as f64 / 1024.0,
            base.hwm_kib as f64 / 1024.0
        );
        if let Some(us) = w.scrape_us {
            // One scrape per 5 s, as a share of W1's own CPU: the endpoint's cost without the
            // noise between two processes' runs (the recording of last values per reading and
            // the 2 s latency sampling come on top; they are within that noise).
            let share = us / 5e6 * 100.0 / base.cpu_pct;
            println!(
                "{label}: {us:.0} µs a scrape, one per 5 s = +{:.1} % of W1's CPU (target +5 %: {})",
                share * 100.0,
                verdict(share <= 0.05)
            );
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// `key=value` pairs of a tracing log line (values without spaces; quotes removed).
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// W3: requests per second on one TCP connection

struct W3 {
    secs: Duration,
    fieldbridge: Vec<f64>,
    bare: Vec<f64>,
    bus_task: Vec<f64>,
}

impl W3 {
    fn print_summary(&self) {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (fb, bare) = (mean(&self.fieldbridge), mean(&self.bare));
        println!(
            "W3 (one TCP connection, FC3 x {REGISTERS} registers, {:?} per round, rounds \
             alternated): fieldbridge Connection {fb:.0} req/s, bare tokio-modbus {bare:.0} \
             req/s, ratio {:.3} (target >= 0.9: {})",
            self.secs,
            fb / bare,
            verdict(fb / bare >= 0.9)
        );
        if !self.bus_task.is_empty() {
            let bt = mean(&self.bus_task);
            println!(
                "    full bus task path (BusRequest over mpsc, answer on oneshot): {bt:.0} req/s, \
                 ratio to bare {:.3}",
                bt / bare
            );
        }
    }
}

fn w3(o: &Opts, port: u16) -> Res<W3> {
    println!(
        "\n== w3: requests/s on one TCP connection to a local tokio-modbus server (port {port}), \
         {:?} per round, {} rounds each, alternating",
        o.w3_secs, o.w3_rounds
    );
    println!("load before {}", loadavg_text());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let secs = o.w3_secs;
    let mut r = W3 {
        secs,
        fieldbridge: vec![],
        bare: vec![],
        bus_task: vec![],
    };
    rt.block_on(async {
        for round in 1..=o.w3_rounds {
            let fb = rate_connection(port, secs).await?;
            println!("round {round}: fieldbridge Connection  {fb:>9.0} req/s");
            r.fieldbridge.push(fb);
            let bare = rate_bare(port, secs).await?;
            println!("round {round}: bare tokio-modbus       {bare:>9.0} req/s");
            r.bare.push(bare);
        }
        match rate_bus_task(port, secs).await {
            Ok(bt) => {
                println!("bus task path (mpsc + oneshot) {bt:>9.0} req/s");
                r.bus_task.push(bt);
            }
            Err(e) => println!("bus task path skipped: {e}"),
        }
        Ok::<(), String>(())
    })?;
    println!("load after {}", loadavg_text());
    Ok(r)
}

const W3_TIMEOUT: Duration = Duration::from_secs(1);
const W3_MAX_ERRORS: u64 = 100;

fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

async fn rate_connection(port: u16, secs: Duration) -> Res<f64> {
    let kind = BusKind::Tcp {
        host: LOCALHOST.into(),
        port,
    };
    let mut conn = Connection::new(kind, Duration::ZERO, Duration::ZERO, Duration::from_secs(1));
    // Connect outside the timed loop, as the bare client does.
    conn.read(1, RegisterKind::Holding, 0, REGISTERS, W3_TIMEOUT)
        .await
        .map_err(|e| format!("fieldbridge Connection: {e}"))?;
    let (mut n, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < secs {
        match conn
            .read(1, RegisterKind::Holding, 0, REGISTERS, W3_TIMEOUT)
            .await
        {
            Ok(_) => n += 1,
            Err(e) => {
                errors += 1;
                if errors > W3_MAX_ERRORS {
                    return Err(format!("fieldbridge Connection: {errors} errors, last {e}"));
                }
            }
        }
    }
    Ok(rate(n, start.elapsed()))
}

async fn rate_bare(port: u16, secs: Duration) -> Res<f64> {
    use tokio_modbus::client::Reader;
    let addr: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, port).into();
    let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(1))
        .await
        .map_err(|e| format!("bare connect: {e}"))?;
    let (mut n, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < secs {
        match ctx.read_holding_registers(0, REGISTERS).await {
            Ok(Ok(words)) if words.len() == usize::from(REGISTERS) => n += 1,
            other => {
                errors += 1;
                if errors > W3_MAX_ERRORS {
                    return Err(format!(
                        "bare tokio-modbus: {errors} errors, last {other:?}"
                    ));
                }
            }
        }
    }
    Ok(rate(n, start.elapsed()))
}

/// The path a `fieldbridge read` or a command takes: a request on the bus task's queue,
/// answered on a oneshot. The device's own poll runs once at start (interval 1h).
async fn rate_bus_task(port: u16, secs: Duration) -> Res<f64> {
    use fieldbridge::modbus::{self, BusRequest, Op};
    let yaml = format!(
        "gateway:\n  id: w3\nmqtt:\n  host: {LOCALHOST}\n  port: 1\nbuses:\n  - {{ name: b, type: tcp, \
         host: {LOCALHOST}, port: {port} }}\ndevices:\n  - name: d\n    bus: b\n    interval: 1h\n    \
         points:\n      - {{ name: r0, address: 0 }}\n"
    );
    let config = fieldbridge::config::parse(&yaml, "w3.yaml").map_err(|e| format!("{e:?}"))?;
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(16);
    let drain = tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let devices = vec![(0, config.devices[0].clone())];
    let handle = modbus::spawn(
        &config.buses[0],
        devices,
        events_tx,
        cancel.clone(),
        &tracker,
    );
    tracker.close();
    let call = || async {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let req = BusRequest {
            unit: 1,
            op: Op::Read {
                kind: RegisterKind::Holding,
                start: 0,
                count: REGISTERS,
            },
            timeout: W3_TIMEOUT,
            not_after: None,
            reply,
        };
        handle
            .requests
            .send(req)
            .await
            .map_err(|_| "bus task gone")?;
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".to_owned()),
        }
    };
    call().await?;
    let (mut n, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < secs {
        match call().await {
            Ok(()) => n += 1,
            Err(e) => {
                errors += 1;
                if errors > W3_MAX_ERRORS {
                    return Err(format!("bus task: {errors} errors, last {e}"));
                }
            }
        }
    }
    let r = rate(n, start.elapsed());
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    drop(handle);
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Child processes

struct Devices {
    child: Child,
    ports: Vec<u16>,
}

impl Devices {
    fn start(count: usize) -> Res<Devices> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(["devices", "--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start devices: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut devices = Devices {
            child,
            ports: vec![],
        };
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "devices did not report their ports within 10 s")?;
        devices.ports = line
            .strip_prefix("PORTS ")
            .ok_or_else(|| format!("devices said {line:?}"))?
            .split_whitespace()
            .map(|p| p.parse().map_err(|_| format!("bad port {p}")))
            .collect::<Res<_>>()?;
        if devices.ports.len() != count {
            return Err(format!("devices reported {line:?}"));
        }
        Ok(devices)
    }

    fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            other => Err(format!("devices process ended early: {other:?}")),
        }
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        // Closing its stdin asks it to stop; the kill is for a process that does not.
        drop(self.child.stdin.take());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    fn start(workdir: &Path, nodelay: bool) -> Res<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or(
                "mosquitto not found (apt-get install mosquitto, or scripts/install-test-deps)",
            )?;
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let conf = workdir.join("mosquitto.conf");
            let log = workdir.join("mosquitto.log");
            let _ = std::fs::remove_file(&log);
            std::fs::write(
                &conf,
                format!(
                    "listener {port} {LOCALHOST}\nallow_anonymous true\npersistence false\n\
                     log_dest file {}\nlog_type error\nlog_type warning\n\
                     max_queued_messages 100000\nset_tcp_nodelay {nodelay}\n",
                    log.display()
                ),
            )
            .map_err(|e| e.to_string())?;
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("start mosquitto: {e}"))?;
            let mut m = Mosquitto { child, port };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(s)) = m.child.try_wait() {
                    last = format!("exited {s}: {}", read_trim(&log.to_string_lossy()));
                    break;
                }
                if TcpStream::connect((LOCALHOST, port)).is_ok() {
                    return Ok(m);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if last.is_empty() {
                last = "did not accept within 10 s".into();
            }
        }
        Err(format!("mosquitto did not start: {last}"))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The subscriber: per topic, the messages, their distinct timestamps (to see duplicates), the
// values they carry and the bytes of their PUBLISH packets

/// What the subscriber counted on one topic.
#[derive(Debug, Default, Clone, Copy)]
struct TopicCount {
    messages: u64,
    /// Distinct timestamps (JSON `ts`, Sparkplug payload `timestamp`): fewer than `messages`
    /// when a message came twice.
    distinct: u64,
    /// Point values carried: the entries of a per-device JSON `values` object, 1 for a
    /// per-point JSON `value`, the metrics of a Sparkplug payload.
    values: u64,
    /// The PUBLISH packets, MQTT 3.1.1: fixed header, topic, packet id, payload.
    bytes: u64,
}

impl std::ops::AddAssign for TopicCount {
    fn add_assign(&mut self, o: TopicCount) {
        self.messages += o.messages;
        self.distinct += o.distinct;
        self.values += o.values;
        self.bytes += o.bytes;
    }
}

#[derive(Debug, Default)]
struct Received {
    topics: BTreeMap<String, TopicCount>,
    /// Sparkplug messages that carry a `seq`, and how many of them did not follow the one
    /// received before (an NBIRTH starts again at 0): a message lost or reordered on the way.
    seq_messages: u64,
    seq_breaks: u64,
}

/// Bytes of an MQTT 3.1.1 PUBLISH packet: the fixed header (1 byte, and the remaining length
/// as a 1-4 byte varint), the topic (2-byte length, then its bytes), the packet id at QoS 1
/// and 2, the payload. The broker forwards the gateway's packet with the same topic and
/// payload, at the publish's QoS (the subscription's is 1): the same size as what the gateway
/// sent.
fn publish_bytes(topic: usize, payload: usize, qos_above_0: bool) -> u64 {
    let remaining = 2 + topic + if qos_above_0 { 2 } else { 0 } + payload;
    let varint = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    (1 + varint + remaining) as u64
}

/// The top-level fields of a Sparkplug B payload the harness needs: `timestamp` (field 1),
/// the number of `metrics` (field 2) and `seq` (field 3). The protobuf wire format read by
/// hand rather than with the gateway's `proto` module, so that `scripts/bench --rev` still
/// builds this harness against commits from before Sparkplug. `None`: not a protobuf message.
fn sparkplug_fields(mut b: &[u8]) -> Option<(Option<u64>, u64, Option<u64>)> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let (mut ts, mut metrics, mut seq) = (None, 0, None);
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let field = key >> 3;
        match key & 7 {
            0 => {
                let v = varint(&mut b)?;
                match field {
                    1 => ts = Some(v),
                    3 => seq = Some(v),
                    _ => {}
                }
            }
            1 => b = b.get(8..)?,
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                b = b.get(n..)?;
                if field == 2 {
                    metrics += 1;
                }
            }
            5 => b = b.get(4..)?,
            _ => return None,
        }
    }
    Some((ts, metrics, seq))
}

/// (distinct key, values carried) of a JSON payload: `ts`, and the entries of `values` (per
/// device) or 1 for a `value` (per point).
fn json_fields(payload: &[u8]) -> (String, u64) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return (String::new(), 0);
    };
    let ts = v
        .get("ts")
        .and_then(|t| t.as_str())
        .unwrap_or_default()
        .to_owned();
    let values = match (v.get("values"), v.get("value")) {
        (Some(serde_json::Value::Object(m)), _) => m.len() as u64,
        (None, Some(_)) => 1,
        _ => 0,
    };
    (ts, values)
}

struct Subscriber {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Res<Received>>,
}

impl Subscriber {
    fn start(port: u16, filters: &[&str]) -> Res<Subscriber> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std_mpsc::channel::<()>();
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(subscribe(port, filters, stop2, ready_tx))
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(Subscriber { stop, thread }),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                let r = thread.join();
                Err(format!("subscriber not subscribed within 10 s: {r:?}"))
            }
        }
    }

    fn stop(self) -> Res<Received> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| "subscriber panicked")?
    }
}

async fn subscribe(
    port: u16,
    filters: Vec<String>,
    stop: Arc<AtomicBool>,
    ready: std_mpsc::Sender<()>,
) -> Res<Received> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter};
    let mut opts = MqttOptions::new(format!("bench-sub-{}", std::process::id()), LOCALHOST, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    // One SUBSCRIBE for all filters: one SUBACK says they all hold.
    client
        .subscribe_many(
            filters
                .into_iter()
                .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce)),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut seen: HashMap<String, (TopicCount, HashSet<String>)> = HashMap::new();
    let (mut seq_messages, mut seq_breaks, mut last_seq) = (0u64, 0u64, None::<u64>);
    let mut errors = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let event = match tokio::time::timeout(Duration::from_millis(100), eventloop.poll()).await {
            Err(_) => continue,
            Ok(e) => e,
        };
        match event {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                let _ = ready.send(());
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let bytes = publish_bytes(p.topic.len(), p.payload.len(), p.qos != QoS::AtMostOnce);
                let (key, values) = if p.topic.starts_with("spBv1.0/") {
                    let (ts, metrics, seq) = sparkplug_fields(&p.payload).unwrap_or_default();
                    if let Some(seq) = seq {
                        let nbirth = p.topic.split('/').nth(2) == Some("NBIRTH");
                        let follows = if nbirth {
                            seq == 0
                        } else {
                            last_seq.is_some_and(|l| seq == (l + 1) % 256)
                        };
                        seq_messages += 1;
                        seq_breaks += u64::from(!follows);
                        last_seq = Some(seq);
                    }
                    (ts.map(|t| t.to_string()).unwrap_or_default(), metrics)
                } else {
                    json_fields(&p.payload)
                };
                let e = seen.entry(p.topic).or_default();
                e.0.messages += 1;
                e.0.values += values;
                e.0.bytes += bytes;
                e.1.insert(key);
            }
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                if errors > 20 {
                    return Err(format!("subscriber: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
    Ok(Received {
        topics: seen
            .into_iter()
            .map(|(t, (mut c, keys))| {
                c.distinct = keys.len() as u64;
                (t, c)
            })
            .collect(),
        seq_messages,
        seq_breaks,
    })
}

// ---------------------------------------------------------------------------------------------
// The simulated devices

fn devices_main(args: &[String]) -> Res<()> {
    let mut count = DEVICES + 1;
    let mut max_secs = 3600u64;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or("devices: option without value")?;
        match flag.as_str() {
            "--count" => count = v.parse().map_err(|_| "--count: a number")?,
            "--max-secs" => max_secs = v.parse().map_err(|_| "--max-secs: a number")?,
            _ => return Err(format!("devices: unknown option {flag}")),
        }
    }
    let mut ports = Vec::new();
    for i in 0..count {
        let listener = TcpListener::bind((LOCALHOST, 0)).map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        ports.push(listener.local_addr().map_err(|e| e.to_string())?.port());
        std::thread::Builder::new()
            .name(format!("device-{i}"))
            .spawn(move || serve_device(listener, i))
            .map_err(|e| e.to_string())?;
    }
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    println!("PORTS {}", list.join(" "));
    // Serve until the harness closes our stdin (or ends), at most `max_secs`.
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(max_secs));
    Ok(())
}

/// One device: its own thread and current-thread runtime, like a device with its own CPU.
fn serve_device(listener: TcpListener, index: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("device runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let service = Arc::new(Registers {
            seed: AtomicU32::new(index as u32 * 1000),
        });
        let on_connected = move |stream, addr| {
            let service = service.clone();
            let accepted =
                tokio_modbus::server::tcp::accept_tcp_connection(stream, addr, move |_| {
                    Ok(Some(service.clone()))
                });
            async move { accepted }
        };
        let _ = server.serve(&on_connected, |_e| {}).await;
    });
}

// ---------------------------------------------------------------------------------------------
// /proc

fn loadavg_text() -> String {
    let [a, b, c] = loadavg();
    format!("{a:.2} {b:.2} {c:.2} (1/5/15 min)")
}

/// utime + stime of a process, all threads, in clock ticks (`proc(5)`: fields 14 and 15).
fn cpu_ticks(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // The command name (field 2) may hold spaces; count from the closing parenthesis.
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // `rest` starts at field 3, so field 14 is index 11.
    Ok(n(11) + n(12))
}

/// On-CPU time of every thread of `pid` (`/proc/PID/task/*/schedstat`, first field, ns);
/// `None` where the kernel does not provide it. Threads that ended are not counted (the
/// gateway's threads live as long as it does).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A process's memory from /proc/PID/status, in KiB.
struct Memory {
    hwm_kib: u64,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

fn memory_kib(pid: u32) -> Res<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let get = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        hwm_kib: get("VmHWM:"),
        rss_kib: get("VmRSS:"),
        anon_kib: get("RssAnon:"),
        file_kib: get("RssFile:"),
    })
}

/// Back-to-back scrapes after the w1h window that measure the CPU of one.
const SCRAPES: u32 = 200;

/// Scrapes `GET /metrics` every 5 s, as a Prometheus would (w1h).
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64, usize)>,
}

impl Scraper {
    fn start(port: u16) -> Scraper {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed, mut bytes) = (0, 0, 0);
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    next += Duration::from_secs(5);
                    match Scraper::once(port) {
                        Ok(b) => {
                            ok += 1;
                            bytes = b.len();
                        }
                        _ => failed += 1,
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (ok, failed, bytes)
        });
        Scraper { stop, thread }
    }

    /// One `GET /metrics`: the whole response.
    fn once(port: u16) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect((LOCALHOST, port))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut body = Vec::new();
        c.read_to_end(&mut body)?;
        if body.starts_with(b"HTTP/1.1 200") {
            Ok(body)
        } else {
            Err(std::io::Error::other("not 200"))
        }
    }

    fn stop(self) -> (u64, u64, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0, 0))
    }
}
