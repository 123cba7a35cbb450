//! Bus efficiency on one RS-485 line at its real speed (issue 16): 10 slaves on one line (the
//! `WireSlave` of tests/common/wire.rs on a socat pty pair), each read as a coalesced block of
//! holding registers, a few input registers and a block of coils, polled as fast as the line
//! allows (`interval: 10ms`, always late), by the real gateway.
//!
//! Figures, per baud rate (9600 and 115200, 8E1: the Modbus default of 11 bits a character):
//! - cycles/s achieved (answered reads at the device ÷ reads per cycle ÷ the window);
//! - the wire limit of the minimal plan: 1 ÷ (the sum over the cycle's reads of request and
//!   answer frame times + the slave's turnaround (3.5 characters) + the 3.5-character silence,
//!   1.75 ms above 19200 baud) and the ratio of the two (goal >= 0.95 at 9600);
//! - `fieldbridge check`'s estimated bus time per cycle (summed over the devices) against the
//!   measured cycle time;
//! - the same line with an 11th, dead slave (silent; the gateway backs it off): the others'
//!   cycle rate with it and without it;
//! - the silences the gateway left before its requests, measured at the device, and the
//!   socat relay latency (the resolution of those measurements).
//!
//! Run with `scripts/bench-wire` (release build); without arguments (as `cargo test
//! --all-targets` runs it) it prints its usage and exits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::wire::{calibrate, request_silences, FrameKind, LineFormat, WireSlave};
use common::{run_cli, Gateway, Mosquitto, PtyPair};

const SLAVES: u8 = 10;
/// Holding points: 12 registers spread over 0..=19 (one coalesced FC3 read of 20).
const HOLDING: [u16; 12] = [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19];
const INPUTS: u16 = 3;
const COILS: u16 = 8;
const READS_PER_SLAVE: usize = 3;

fn usage() {
    println!(
        "usage: wire --run [--secs 20] [--warmup 3] [--bauds 9600,115200] [--no-dead] [--mbpoll]\n\
         (scripts/bench-wire runs it on the release build; see benches/README.md)"
    );
}

struct Opts {
    secs: u64,
    warmup: u64,
    bauds: Vec<u32>,
    dead: bool,
    /// Also poll the same line with mbpoll (Debian's, libmodbus): holding registers only.
    mbpoll: bool,
}

fn parse() -> Option<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--run") {
        return None;
    }
    let mut o = Opts {
        secs: 20,
        warmup: 3,
        bauds: vec![9600, 115_200],
        dead: true,
        mbpoll: false,
    };
    let mut i = 0;
    while i < args.len() {
        let val = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--secs" => {
                o.secs = val().parse().expect("--secs N");
                i += 1;
            }
            "--warmup" => {
                o.warmup = val().parse().expect("--warmup N");
                i += 1;
            }
            "--bauds" => {
                o.bauds = val()
                    .split(',')
                    .map(|b| b.parse().expect("--bauds 9600,115200"))
                    .collect();
                i += 1;
            }
            "--no-dead" => o.dead = false,
            "--mbpoll" => o.mbpoll = true,
            "--run" | "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    Some(o)
}

fn config(broker: u16, port: &str, baud: u32, dead: bool, holding_only: bool) -> String {
    let mut y = format!(
        "gateway:\n  id: gw\n  prefix: bench\nmqtt:\n  url: mqtt://127.0.0.1:{broker}\nbuses:\n  - {{ name: rs485, type: rtu, port: {port}, baud: {baud}, parity: even }}\ndevices:\n"
    );
    let units = if dead { SLAVES + 1 } else { SLAVES };
    for u in 1..=units {
        y.push_str(&format!(
            "  - name: s{u}\n    bus: rs485\n    unit: {u}\n    interval: 10ms\n    timeout: 300ms\n    points:\n"
        ));
        for a in HOLDING {
            y.push_str(&format!("      - {{ name: h{a}, address: {a} }}\n"));
        }
        for a in 0..if holding_only { 0 } else { INPUTS } {
            y.push_str(&format!(
                "      - {{ name: i{a}, register: input, address: {a} }}\n"
            ));
        }
        for a in 0..if holding_only { 0 } else { COILS } {
            y.push_str(&format!(
                "      - {{ name: c{a}, register: coil, address: {a}, type: bool }}\n"
            ));
        }
    }
    y
}

/// Wire time of one cycle of the minimal plan for the live slaves.
fn wire_limit(f: LineFormat) -> Duration {
    let silence = if f.baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        f.chars(3.5)
    };
    let turnaround = f.chars(3.5);
    let holding = 8.0 + 5.0 + 2.0 * 20.0;
    let inputs = 8.0 + 5.0 + 2.0 * f64::from(INPUTS);
    let coils = 8.0 + 5.0 + (f64::from(COILS) / 8.0).ceil();
    let frames = f.chars(holding + inputs + coils);
    (frames + (turnaround + silence) * READS_PER_SLAVE as u32) * u32::from(SLAVES)
}

/// The same for a plan of the holding block alone (what mbpoll polls).
fn wire_limit_holding(f: LineFormat) -> Duration {
    let silence = if f.baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        f.chars(3.5)
    };
    (f.chars(8.0 + 5.0 + 40.0) + f.chars(3.5) + silence) * u32::from(SLAVES)
}

/// `check`'s estimated bus time per cycle, summed over the live slaves.
fn check_estimate(config_path: &std::path::Path, slaves: u8) -> Option<Duration> {
    let out = run_cli(&["check", "--config", &config_path.display().to_string()]);
    let mut per_device = Vec::new();
    for line in out.stdout.lines() {
        if let Some(rest) = line.trim().strip_prefix("estimated bus time per cycle: ") {
            let ms: f64 = rest.trim_end_matches(" ms").trim().parse().ok()?;
            per_device.push(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    if per_device.is_empty() {
        println!("check printed no estimate:\n{}{}", out.stdout, out.stderr);
        return None;
    }
    Some(per_device.iter().take(usize::from(slaves)).sum())
}

struct Run {
    cycles_per_s: f64,
    limit: Duration,
    estimate: Option<Duration>,
}

fn run(baud: u32, dead: bool, holding_only: bool, o: &Opts) -> Run {
    let f = LineFormat {
        baud,
        data_bits: 8,
        parity: true,
        stop_bits: 1,
    };
    let broker = Mosquitto::start();
    let pty = PtyPair::new();
    let (relay_median, relay_max) =
        calibrate(pty.a(), pty.b(), 200).expect("calibrate the socat relay");
    let units: Vec<u8> = (1..=SLAVES + u8::from(dead)).collect();
    let slave = WireSlave::start(pty.a(), f, &units, Duration::ZERO);
    if dead {
        slave.set_silent(SLAVES + 1, true);
    }
    let yaml = config(
        broker.port(),
        &pty.b().display().to_string(),
        baud,
        dead,
        holding_only,
    );
    let reads = if holding_only { 1 } else { READS_PER_SLAVE };
    let gateway = Gateway::start_with_env(&yaml, &[("RUST_LOG", "info")]);
    let estimate = check_estimate(gateway.config_path(), SLAVES);
    std::thread::sleep(Duration::from_secs(o.warmup));
    slave.clear();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(o.secs));
    let window = t0.elapsed();
    let frames = slave.frames();
    let answered = frames
        .iter()
        .filter(|r| r.kind == FrameKind::Answer && r.unit <= SLAVES)
        .count();
    let dead_requests = frames
        .iter()
        .filter(|r| r.kind == FrameKind::Request && r.unit > SLAVES)
        .count();
    let ignored = frames
        .iter()
        .filter(|r| matches!(r.kind, FrameKind::Broken | FrameKind::BadCrc))
        .count();
    let cycles = answered as f64 / (reads * usize::from(SLAVES)) as f64;
    let cycles_per_s = cycles / window.as_secs_f64();
    let limit = if holding_only {
        wire_limit_holding(f)
    } else {
        wire_limit(f)
    };
    let wire: Duration = frames.iter().map(|r| r.wire_time()).sum();
    let s = request_silences(&frames);
    println!(
        "{baud} 8E1{}{}: {answered} answers in {window:.1?}, {cycles:.1} cycles, {cycles_per_s:.3} cycles/s; wire limit {:.3} cycles/s ({:.1} ms a cycle); ratio {:.3}",
        if dead { " + 1 dead slave" } else { "" },
        if holding_only { " (FC3 x 20 only)" } else { "" },
        1.0 / limit.as_secs_f64(),
        ms(limit),
        cycles_per_s * limit.as_secs_f64(),
    );
    println!(
        "    frames on the wire {:.1} % of the window; requests to the dead slave {dead_requests}; broken/bad-CRC frames {ignored}; collisions {}",
        100.0 * wire.as_secs_f64() / window.as_secs_f64(),
        slave.collisions()
    );
    if let Some(s) = s {
        println!(
            "    silence before requests (at the device): min {:.3?} median {:.3?} max {:.3?} over {} (3.5 chars {:.3?}); socat relay median {relay_median:.1?}, max {relay_max:.1?}",
            s.min,
            s.median,
            s.max,
            s.count,
            f.chars(3.5)
        );
    }
    if let Some(e) = estimate {
        let measured = Duration::from_secs_f64(1.0 / cycles_per_s);
        println!(
            "    check's estimated bus time per cycle {:.1} ms vs measured {:.1} ms: estimate/measured {:.3}",
            ms(e),
            ms(measured),
            e.as_secs_f64() / measured.as_secs_f64()
        );
    }
    if let Some(e) = slave.error() {
        println!("    slave error: {e}");
    }
    drop(gateway);
    Run {
        cycles_per_s,
        limit,
        estimate,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A child process killed (by PID) and reaped when dropped.
struct Kill(std::process::Child);

impl Kill {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        self.stop();
    }
}

/// mbpoll (libmodbus) polling the 10 slaves' block of 20 holding registers in a loop
/// (`-l 10`, its shortest poll period), against the same wire slave: answers/s, cycles/s of
/// that one-read plan and its ratio to the plan's wire limit.
fn peer_mbpoll(baud: u32, o: &Opts) {
    let f = LineFormat {
        baud,
        data_bits: 8,
        parity: true,
        stop_bits: 1,
    };
    let pty = PtyPair::new();
    let units: Vec<u8> = (1..=SLAVES).collect();
    let slave = WireSlave::start(pty.a(), f, &units, Duration::ZERO);
    let child = std::process::Command::new("mbpoll")
        .args([
            "-m",
            "rtu",
            "-b",
            &baud.to_string(),
            "-P",
            "even",
            "-a",
            "1:10",
        ])
        .args([
            "-0", "-r", "0", "-c", "20", "-t", "4", "-l", "10", "-o", "0.3",
        ])
        .arg(pty.b())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(child) = child else {
        println!("mbpoll not found (apt-get install mbpoll): peer skipped");
        return;
    };
    let mut child = Kill(child);
    std::thread::sleep(Duration::from_secs(o.warmup));
    slave.clear();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(o.secs));
    let window = t0.elapsed();
    let frames = slave.frames();
    child.stop();
    drop(child);
    let answered = frames
        .iter()
        .filter(|r| r.kind == FrameKind::Answer)
        .count();
    let cycles_per_s = answered as f64 / f64::from(SLAVES) / window.as_secs_f64();
    let limit = wire_limit_holding(f);
    let s = request_silences(&frames);
    println!(
        "{baud} 8E1 mbpoll (FC3 x 20 only): {answered} answers, {cycles_per_s:.3} cycles/s; wire limit of that plan {:.3} cycles/s; ratio {:.3}; median silence {:.3?}",
        1.0 / limit.as_secs_f64(),
        cycles_per_s * limit.as_secs_f64(),
        s.map(|s| s.median).unwrap_or_default()
    );
}

fn main() {
    let Some(o) = parse() else {
        usage();
        return;
    };
    println!(
        "machine: {} cores, load {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for &baud in &o.bauds {
        let alone = run(baud, false, false, &o);
        if o.dead {
            let with_dead = run(baud, true, false, &o);
            println!(
                "{baud}: cycles/s of the 10 live slaves with a dead one {:.3} vs without {:.3}: {:.3}",
                with_dead.cycles_per_s,
                alone.cycles_per_s,
                with_dead.cycles_per_s / alone.cycles_per_s
            );
        }
        let _ = (alone.limit, alone.estimate);
        if o.mbpoll {
            run(baud, false, true, &o);
            peer_mbpoll(baud, &o);
        }
    }
    println!(
        "load after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
