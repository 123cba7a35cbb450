//! Outbox benchmark: prints the store-and-forward figures of issue 3 (this comment is its
//! documentation). Run through `scripts/bench-outbox`, which builds it and the release gateway.
//!
//! One binary (the first argument is the role):
//! - `run`: the harness. Four measurements, each printed with its workload and the load average:
//!   - `ingest`: `store::open` + `StoreRequest::Append` in batches of 1, 10, 100 (as the link
//!     sends whatever accumulated in one turn of its loop), until the `Flush` reply; default
//!     store settings (commit_every 1000, commit_interval 100ms, synchronous full).
//!   - `drain`: a store pre-filled with N rows drained by `link::spawn` (the real link, with its
//!     outbox) to a private mosquitto until `delivered` = N + 1 (the `online` status), against a
//!     bare rumqttc QoS 1 publish loop with the same window (100), to the same broker, rounds
//!     interleaved (bare, link, bare, link).
//!   - `reconnect`: the link with a backlog and no broker for a few seconds (the back-off at its
//!     cap), then mosquitto started on its port; from the first accepted TCP connection (T0) to
//!     the first backlog message acknowledged (`delivered` = 2, after `online`).
//!   - `writes`: the release gateway (`--gateway`) against simulated Modbus TCP devices (threads
//!     of this process) and mosquitto, online, default mode; `/proc/PID/io` and the store files
//!     before/after the window.
//!
//!   Everything it starts is stopped by PID; every wait is bounded.
//! - no argument (what `cargo test --all-targets` does with a `harness = false` bench): prints
//!   the usage and exits 0, so the test suite never runs a benchmark.

#[path = "support/mod.rs"]
mod support;
use support::*;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fieldbridge::link::{self, LinkSettings, Outbox};
use fieldbridge::model::{Config, Qos, Store as StoreConfig};
use fieldbridge::store::{self, NewMessage, StoreHandle, StoreRequest};

/// Per device in the `writes` workload (one FC3 read, one per_device JSON message per poll).
const REGISTERS: u16 = 50;
const USAGE: &str = "\
usage: outbox run [--gateway PATH] [--workdir DIR] [--only ingest,drain,reconnect,writes]
                  [--ingest-n N] [--batches 1,10,100] [--drain-n N] [--drain-rounds N]
                  [--drain-memory on|off]
                  [--reconnect-reps N] [--reconnect-down SECS] [--reconnect-backlog N]
                  [--devices N] [--interval-ms MS] [--warmup SECS] [--measure SECS]
                  [--load-max LOAD] [--load-wait SECS]
Run through scripts/bench-outbox, which builds the release binaries first.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => Opts::parse(&args[1..]).and_then(|o| run(&o)),
        _ => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-outbox: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    gateway: PathBuf,
    workdir: PathBuf,
    only: Vec<String>,
    ingest_n: usize,
    batches: Vec<usize>,
    drain_n: usize,
    drain_rounds: usize,
    drain_memory: bool,
    reconnect_reps: usize,
    reconnect_down: Duration,
    reconnect_backlog: usize,
    devices: usize,
    interval: Duration,
    warmup: Duration,
    measure: Duration,
    load_max: f64,
    load_wait: Duration,
}

impl Opts {
    fn parse(args: &[String]) -> Res<Opts> {
        let mut o = Opts {
            gateway: PathBuf::from("target/bench-outbox/fieldbridge"),
            workdir: PathBuf::from("target/bench-outbox/run"),
            only: ["ingest", "drain", "reconnect", "writes"]
                .map(String::from)
                .to_vec(),
            ingest_n: 1_000_000,
            batches: vec![1, 10, 100],
            drain_n: 1_000_000,
            drain_rounds: 2,
            drain_memory: true,
            reconnect_reps: 5,
            reconnect_down: Duration::from_secs(5),
            reconnect_backlog: 10_000,
            devices: 10,
            interval: Duration::from_secs(1),
            warmup: Duration::from_secs(5),
            measure: Duration::from_secs(60),
            load_max: 1.5,
            load_wait: Duration::from_secs(60),
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
            let count = |max: usize| -> Res<usize> {
                value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| format!("{flag}: `{value}` is not a count 1..={max}"))
            };
            match flag.as_str() {
                "--gateway" => o.gateway = PathBuf::from(value),
                "--workdir" => o.workdir = PathBuf::from(value),
                "--only" => o.only = value.split(',').map(str::to_owned).collect(),
                "--ingest-n" => o.ingest_n = count(10_000_000)?,
                "--batches" => {
                    o.batches = value
                        .split(',')
                        .map(|b| b.parse().ok().filter(|n| (1..=100_000).contains(n)))
                        .collect::<Option<_>>()
                        .ok_or("--batches: counts 1..=100000, comma-separated")?;
                }
                "--drain-n" => o.drain_n = count(10_000_000)?,
                "--drain-rounds" => o.drain_rounds = count(10)?,
                "--drain-memory" => {
                    o.drain_memory = match value.as_str() {
                        "on" => true,
                        "off" => false,
                        _ => return Err("--drain-memory: on | off".into()),
                    };
                }
                "--reconnect-reps" => o.reconnect_reps = count(50)?,
                "--reconnect-down" => o.reconnect_down = secs()?,
                "--reconnect-backlog" => o.reconnect_backlog = count(10_000_000)?,
                "--devices" => o.devices = count(100)?,
                "--interval-ms" => {
                    o.interval = Duration::from_millis(count(3_600_000)? as u64);
                }
                "--warmup" => o.warmup = secs()?,
                "--measure" => o.measure = secs()?,
                "--load-max" => {
                    o.load_max = value.parse().map_err(|_| "--load-max: a number")?;
                }
                "--load-wait" => o.load_wait = secs()?,
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
    std::fs::create_dir_all(&o.workdir).map_err(|e| format!("{}: {e}", o.workdir.display()))?;
    let workdir = std::fs::canonicalize(&o.workdir).map_err(|e| e.to_string())?;
    println!("== machine");
    println!("cpu          {} x {}", nproc(), cpu_model());
    println!("kernel       {}", read_trim("/proc/sys/kernel/osrelease"));
    println!("workdir      {} ({})", workdir.display(), fs_type(&workdir));
    println!("load before  {}", loadavg_text());
    let mut summary = Vec::new();
    if o.wants("ingest") {
        wait_for_quiet(o.load_max, o.load_wait);
        summary.extend(ingest(o, &workdir)?);
    }
    if o.wants("drain") {
        wait_for_quiet(o.load_max, o.load_wait);
        summary.extend(drain(o, &workdir)?);
    }
    if o.wants("reconnect") {
        wait_for_quiet(o.load_max, o.load_wait);
        summary.extend(reconnect(o, &workdir)?);
    }
    if o.wants("writes") {
        wait_for_quiet(o.load_max, o.load_wait);
        summary.extend(writes(o, &workdir)?);
    }
    println!("\n== summary (load after: {})", loadavg_text());
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// The config the link-level workloads use: defaults except broker, store path and client id.
fn link_config(broker: u16, store: &Path, client_id: &str) -> Res<Config> {
    config_with(broker, &store.display().to_string(), client_id, "")
}

/// `store`: a path or `none`; `mqtt_extra`: more `mqtt` keys, indented by two spaces.
fn config_with(broker: u16, store: &str, client_id: &str, mqtt_extra: &str) -> Res<Config> {
    let yaml = format!(
        "gateway:\n  id: bench-outbox\n  prefix: bench\nmqtt:\n  host: {LOCALHOST}\n  port: {broker}\n  \
         client_id: {client_id}\n{mqtt_extra}store:\n  path: {store}\n\
         buses:\n  - {{ name: b, type: tcp, host: {LOCALHOST}, port: 1502 }}\n\
         devices:\n  - {{ name: d, bus: b, points: [ {{ name: n, address: 0 }} ] }}\n"
    );
    fieldbridge::config::parse(&yaml, "bench-outbox.yaml").map_err(|e| e.to_string())
}

fn store_settings(s: &StoreConfig) -> String {
    format!(
        "commit_every {}, commit_interval {:?}, synchronous {:?}, durability {:?}, max_bytes {} MiB",
        s.commit_every,
        s.commit_interval,
        s.synchronous,
        s.durability,
        s.max_bytes >> 20
    )
}

/// A realistic reading as the link stores it: ~31-byte topic, ~74-byte JSON payload marked
/// `buffered`.
fn message(i: usize) -> NewMessage {
    let topic = format!("plant/hall3/meter-{:02}/voltage_l{}", i % 10, i % 3 + 1);
    let ms = i % 1000;
    let s = (i / 1000) % 60;
    let payload = format!(
        "{{\"buffered\":true,\"ts\":\"2026-11-21T10:{:02}:{s:02}.{ms:03}Z\",\"unit\":\"V\",\"value\":{}.{}}}",
        (i / 60_000) % 60,
        220 + i % 20,
        i % 10
    );
    NewMessage {
        topic,
        payload: payload.into_bytes(),
        qos: Qos::AtLeastOnce,
        retain: false,
        created: store::now_ms(),
        kind: 0,
        held: false,
    }
}

fn remove_store(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn flush(h: &StoreHandle, within: Duration) -> Res<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if !h.send(StoreRequest::Flush { reply: tx }) {
        return Err("store thread gone".into());
    }
    // The store thread answers once it committed and checkpointed; a thread that hangs would
    // never answer, so wait on another thread with a bound.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(rx.blocking_recv().is_ok());
    });
    match done_rx.recv_timeout(within) {
        Ok(true) => Ok(()),
        Ok(false) => Err("store dropped the flush reply".into()),
        Err(_) => Err(format!("no flush reply within {within:?}")),
    }
}

/// Writes `n` messages to a fresh store at `path` in batches of 1000, flushes and closes it.
fn prefill(config: &StoreConfig, path: &Path, n: usize) -> Res<Duration> {
    remove_store(path);
    let t = Instant::now();
    let (h, _events) = store::open(config, path).map_err(|e| e.to_string())?;
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        h.send(StoreRequest::Append((i..end).map(message).collect()));
        i = end;
    }
    flush(&h, Duration::from_secs(600))?;
    let rows = h.stats.backlog.load(Ordering::Relaxed);
    h.close();
    if rows != n as u64 {
        return Err(format!("prefill: {rows} rows in the store, {n} written"));
    }
    Ok(t.elapsed())
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

// ---------------------------------------------------------------------------------------------
// 1. Offline ingest

fn ingest(o: &Opts, workdir: &Path) -> Res<Vec<String>> {
    let n = o.ingest_n;
    let cfg = link_config(1883, &workdir.join("ingest.db"), "bench-ingest")?.store;
    let sample = message(12345);
    println!(
        "\n== ingest: {n} messages into a fresh store, StoreRequest::Append in batches of {:?}, \
         until the Flush reply (commit + checkpoint)\n   store: {}\n   message: topic {} B \
         ({}), payload {} B ({})",
        o.batches,
        store_settings(&cfg),
        sample.topic.len(),
        sample.topic,
        sample.payload.len(),
        String::from_utf8_lossy(&sample.payload)
    );
    let mut out = Vec::new();
    for &batch in &o.batches {
        let path = workdir.join(format!("ingest-b{batch}.db"));
        remove_store(&path);
        // Built before the clock starts: the link builds its messages anyway; this measures
        // the store thread.
        let mut batches = Vec::with_capacity(n / batch + 1);
        let mut i = 0;
        while i < n {
            let end = (i + batch).min(n);
            batches.push((i..end).map(message).collect::<Vec<_>>());
            i = end;
        }
        let (h, _events) = store::open(&cfg, &path).map_err(|e| e.to_string())?;
        let load0 = loadavg_text();
        let t = Instant::now();
        for b in batches {
            if !h.send(StoreRequest::Append(b)) {
                return Err("store thread gone".into());
            }
        }
        let sent = t.elapsed();
        flush(&h, Duration::from_secs(600))?;
        let elapsed = t.elapsed();
        let rows = h.stats.backlog.load(Ordering::Relaxed);
        let commits = h.stats.commits.load(Ordering::Relaxed);
        let failures = h.stats.write_failures.load(Ordering::Relaxed);
        h.close();
        let rate = n as f64 / elapsed.as_secs_f64();
        let line = format!(
            "ingest  batch {batch:>4}: {rate:>9.0} msg/s ({n} in {elapsed:.2?}; sends done after \
             {sent:.2?}; {commits} commits, {rows} rows, {failures} write failures, file {:.1} MiB) \
             target >= 100000: {}  [load {load0} -> {}]",
            file_size(&path) as f64 / 1048576.0,
            verdict(rate >= 100_000.0 && rows == n as u64),
            loadavg_text()
        );
        println!("{line}");
        out.push(line);
        remove_store(&path);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 2. Drain vs a bare rumqttc publish loop

fn drain(o: &Opts, workdir: &Path) -> Res<Vec<String>> {
    let n = o.drain_n;
    let broker = Mosquitto::start(workdir, None)?;
    let backlog = workdir.join("drain-backlog.db");
    let run_path = workdir.join("drain-run.db");
    let cfg = link_config(broker.port, &run_path, "bench-outbox-link")?;
    println!(
        "\n== drain: {n}-message backlog delivered by the link (link::spawn + Outbox, QoS 1, \
         window {}) to mosquitto (pid {}, port {}, set_tcp_nodelay true, persistence false, no \
         subscriber) until delivered = {n} + 1 (`online`), vs a bare rumqttc AsyncClient::publish \
         loop (QoS 1, inflight {}, tcp_nodelay) until {n} PUBACKs; rounds interleaved\n   store: {}",
        cfg.mqtt.inflight,
        broker.child.id(),
        broker.port,
        cfg.mqtt.inflight,
        store_settings(&cfg.store)
    );
    let took = prefill(&cfg.store, &backlog, n)?;
    println!(
        "prefilled {} with {n} rows in {took:.2?} ({:.1} MiB)",
        backlog.display(),
        file_size(&backlog) as f64 / 1048576.0
    );
    let mut out = Vec::new();
    // The store's side of a drain without MQTT: what its thread can serve.
    for k in [1, 10, 100] {
        let load0 = loadavg_text();
        let (t, cpu) = store_alone(&cfg.store, &backlog, &run_path, n, k)?;
        let line = format!(
            "drain   store alone (Read 400 after the cursor, then Delete of those ids in requests \
             of {k:>3}, as the link would; no MQTT): {:>8.0} msg/s ({n} in {t:.2?}; store thread \
             CPU {:.2} s = {:.2} us/msg)  [load {load0} -> {}]",
            n as f64 / t.as_secs_f64(),
            secs(cpu),
            secs(cpu) * 1e6 / n as f64,
            loadavg_text()
        );
        println!("{line}");
        out.push(line);
    }
    let mut bare_rates = Vec::new();
    let mut link_rates = Vec::new();
    for round in 1..=o.drain_rounds {
        let load0 = loadavg_text();
        let cpu0 = (thread_ticks(), cpu_ticks(broker.child.id())?);
        let t = bare_loop(broker.port, n, cfg.mqtt.inflight)?;
        let cpu1 = (thread_ticks(), cpu_ticks(broker.child.id())?);
        let rate = n as f64 / t.as_secs_f64();
        bare_rates.push(rate);
        let line = format!(
            "drain   round {round} bare rumqttc: {rate:>8.0} msg/s ({n} PUBACKs in {t:.2?}; CPU s: \
             client thread {:.2}, mosquitto {:.2})  [load {load0} -> {}]",
            secs(cpu1.0 - cpu0.0),
            secs(cpu1.1 - cpu0.1),
            loadavg_text()
        );
        println!("{line}");
        out.push(line);

        remove_store(&run_path);
        std::fs::copy(&backlog, &run_path).map_err(|e| format!("copy backlog: {e}"))?;
        let load0 = loadavg_text();
        let b0 = cpu_ticks(broker.child.id())?;
        let r = drain_link(&cfg, &run_path, n)?;
        let b1 = cpu_ticks(broker.child.id())?;
        let rate = n as f64 / r.elapsed.as_secs_f64();
        link_rates.push(rate);
        let line = format!(
            "drain   round {round} link:         {rate:>8.0} msg/s ({} delivered in {:.2?}; first \
             backlog PUBACK after {:.2?}; CPU s: link thread {:.2}, store thread {:.2}, mosquitto \
             {:.2}; store afterwards: {} rows, {} deleted, {} commits; link stopped in {:.2?})  \
             [load {load0} -> {}]",
            r.delivered,
            r.elapsed,
            r.first,
            secs(r.link_cpu),
            secs(r.store_cpu),
            secs(b1 - b0),
            r.rows_left,
            r.deleted,
            r.commits,
            r.stop,
            loadavg_text()
        );
        println!("{line}");
        out.push(line);
        if o.drain_memory {
            let mem = config_with(
                broker.port,
                "none",
                "bench-outbox-mem",
                "  queue:\n    capacity: 2000000\n",
            )?;
            let load0 = loadavg_text();
            let b0 = cpu_ticks(broker.child.id())?;
            let r = drain_memory(&mem, n)?;
            let b1 = cpu_ticks(broker.child.id())?;
            let rate = n as f64 / r.elapsed.as_secs_f64();
            let line = format!(
                "drain   round {round} link, no store (for comparison: {n} messages sent into the \
                 link's memory queue by a task on the same thread): {rate:>8.0} msg/s ({} delivered \
                 in {:.2?}; CPU s: link thread {:.2}, mosquitto {:.2})  [load {load0} -> {}]",
                r.delivered,
                r.elapsed,
                secs(r.link_cpu),
                secs(b1 - b0),
                loadavg_text()
            );
            println!("{line}");
            out.push(line);
        }
    }
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let ratio = sum(&link_rates) / sum(&bare_rates);
    let per_round: Vec<String> = link_rates
        .iter()
        .zip(&bare_rates)
        .map(|(l, b)| format!("{:.2}", l / b))
        .collect();
    let line = format!(
        "drain   ratio link/bare: {ratio:.2} (per round {}) target >= 0.5: {}",
        per_round.join(", "),
        verdict(ratio >= 0.5)
    );
    println!("{line}");
    out.push(line);
    remove_store(&run_path);
    remove_store(&backlog);
    Ok(out)
}

async fn bare_publish(port: u16, n: usize, inflight: u16) -> Res<Duration> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(
        format!("bench-bare-{}", std::process::id()),
        LOCALHOST,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(inflight)
        .set_max_packet_size(1 << 18, 1 << 18);
    let (client, mut eventloop) = AsyncClient::new(opts, usize::from(inflight) + 16);
    eventloop.network_options.set_tcp_nodelay(true);
    // A pool of ready messages, cloned per publish (the link clones too).
    let pool: Vec<NewMessage> = (0..1000).map(message).collect();
    let t = Instant::now();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            let m = &pool[i % pool.len()];
            client
                .publish(m.topic.clone(), QoS::AtLeastOnce, false, m.payload.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(client)
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("bare loop: {e} after {acked} PUBACKs")),
            Err(_) => return Err(format!("bare loop: only {acked} PUBACKs within 600 s")),
        }
    }
    let elapsed = t.elapsed();
    let client = publisher.await.map_err(|e| e.to_string())??;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(elapsed)
}

/// Drains a copy of `backlog` through the store thread alone: reads of 400 rows after a cursor,
/// each followed by Delete requests of `k` ids. Returns the time and the store thread's CPU ticks.
fn store_alone(
    cfg: &StoreConfig,
    backlog: &Path,
    path: &Path,
    n: usize,
    k: usize,
) -> Res<(Duration, u64)> {
    remove_store(path);
    std::fs::copy(backlog, path).map_err(|e| format!("copy backlog: {e}"))?;
    let rt = current_thread()?;
    let (h, _events) = store::open(cfg, path).map_err(|e| e.to_string())?;
    let cpu0 = store_thread_ticks();
    let t = Instant::now();
    let mut cursor = i64::MIN;
    let mut done = 0;
    // Bounded: one read per 400 rows, and a deadline.
    for _ in 0..=n / 400 + 1 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !h.send(StoreRequest::Read {
            after: cursor,
            limit: 400,
            reply: tx,
        }) {
            return Err("store thread gone".into());
        }
        let rows = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), rx).await })
            .map_err(|_| "store read: no reply within 60 s")?
            .map_err(|_| "store read: reply dropped")?
            .map_err(|e| format!("store read: {e}"))?;
        let Some(last) = rows.last() else { break };
        cursor = last.id;
        done += rows.len();
        for chunk in rows.chunks(k) {
            h.send(StoreRequest::Delete(chunk.iter().map(|r| r.id).collect()));
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err("store alone: not done within 600 s".into());
        }
    }
    flush(&h, Duration::from_secs(600))?;
    let elapsed = t.elapsed();
    let cpu = store_thread_ticks() - cpu0;
    let left = h.stats.backlog.load(Ordering::Relaxed);
    h.close();
    remove_store(path);
    if done != n || left != 0 {
        return Err(format!("store alone: read {done} of {n}, {left} rows left"));
    }
    Ok((elapsed, cpu))
}

fn bare_loop(port: u16, n: usize, inflight: u16) -> Res<Duration> {
    current_thread()?.block_on(bare_publish(port, n, inflight))
}

fn current_thread() -> Res<tokio::runtime::Runtime> {
    // Like the gateway (src/cli.rs): one thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

struct DrainRun {
    elapsed: Duration,
    /// CPU ticks of the thread running the link (this one) and of the store thread.
    link_cpu: u64,
    store_cpu: u64,
    first: Duration,
    delivered: u64,
    rows_left: u64,
    deleted: u64,
    commits: u64,
    stop: Duration,
}

fn drain_link(cfg: &Config, path: &Path, n: usize) -> Res<DrainRun> {
    current_thread()?.block_on(async {
        let (store, events) = store::open(&cfg.store, path).map_err(|e| e.to_string())?;
        let store_stats = store.stats.clone();
        let backlog = store_stats.backlog.load(Ordering::Relaxed);
        if backlog != n as u64 {
            return Err(format!("drain: the store holds {backlog} rows, not {n}"));
        }
        let mut settings = LinkSettings::from_config(&cfg.mqtt).with_store(&cfg.store);
        // As the gateway runs it (the retained `online` first, the held-back mark).
        settings.announcer = Some(fieldbridge::publish::encoding(cfg).1);
        let cpu0 = (thread_ticks(), store_thread_ticks());
        let t = Instant::now();
        let link = link::spawn(
            &cfg.mqtt,
            settings,
            Some(Outbox { store, events }),
            None,
            1024,
        )
        .map_err(|e| e.to_string())?;
        let target = n as u64 + 1;
        let deadline = t + Duration::from_secs(600);
        let mut first = None;
        loop {
            let d = link.stats.delivered.load(Ordering::Relaxed);
            if first.is_none() && d >= 2 {
                first = Some(t.elapsed());
            }
            if d >= target {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("drain: {d} of {target} delivered within 600 s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = t.elapsed();
        let cpu1 = (thread_ticks(), store_thread_ticks());
        let delivered = link.stats.delivered.load(Ordering::Relaxed);
        let t_stop = Instant::now();
        drop(link.sender);
        let _ = tokio::time::timeout(Duration::from_secs(30), link.done).await;
        Ok(DrainRun {
            elapsed,
            link_cpu: cpu1.0 - cpu0.0,
            store_cpu: cpu1.1 - cpu0.1,
            first: first.unwrap_or(elapsed),
            delivered,
            rows_left: store_stats.backlog.load(Ordering::Relaxed),
            deleted: store_stats.deleted.load(Ordering::Relaxed),
            commits: store_stats.commits.load(Ordering::Relaxed),
            stop: t_stop.elapsed(),
        })
    })
}

/// The link without a store: `n` messages sent into its memory queue (capacity above `n`) by a
/// task on the same thread, delivered from memory. Shows what the store path adds.
fn drain_memory(cfg: &Config, n: usize) -> Res<DrainRun> {
    current_thread()?.block_on(async {
        let mut settings = LinkSettings::from_config(&cfg.mqtt);
        // As the gateway runs it (the retained `online` first, the held-back mark).
        settings.announcer = Some(fieldbridge::publish::encoding(cfg).1);
        let pool: Vec<NewMessage> = (0..1000).map(message).collect();
        let cpu0 = thread_ticks();
        let t = Instant::now();
        let link = link::spawn(&cfg.mqtt, settings, None, None, 1024).map_err(|e| e.to_string())?;
        let sender = link.sender.clone();
        let producer = tokio::spawn(async move {
            for i in 0..n {
                let m = &pool[i % pool.len()];
                let out = link::OutMessage {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                    qos: Qos::AtLeastOnce,
                    retain: false,
                    created: Instant::now(),
                    correlation: None,
                    kind: link::AS_IS,
                };
                if sender.send(out).await.is_err() {
                    break;
                }
            }
        });
        let target = n as u64 + 1;
        let deadline = t + Duration::from_secs(600);
        loop {
            let d = link.stats.delivered.load(Ordering::Relaxed);
            if d >= target {
                break;
            }
            if Instant::now() >= deadline {
                producer.abort();
                return Err(format!(
                    "drain (memory): {d} of {target} delivered within 600 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = t.elapsed();
        let cpu1 = thread_ticks();
        let delivered = link.stats.delivered.load(Ordering::Relaxed);
        let _ = producer.await;
        let t_stop = Instant::now();
        drop(link.sender);
        let _ = tokio::time::timeout(Duration::from_secs(30), link.done).await;
        Ok(DrainRun {
            elapsed,
            link_cpu: cpu1 - cpu0,
            store_cpu: 0,
            first: elapsed,
            delivered,
            rows_left: 0,
            deleted: 0,
            commits: 0,
            stop: t_stop.elapsed(),
        })
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Broker back -> first backlog message delivered

fn reconnect(o: &Opts, workdir: &Path) -> Res<Vec<String>> {
    let backlog = workdir.join("reconnect-backlog.db");
    let run_path = workdir.join("reconnect-run.db");
    let probe = link_config(1883, &run_path, "x")?;
    println!(
        "\n== reconnect: the link with a {}-row backlog and no broker for {:?} (reconnect min \
         {:?} max {:?}, the defaults), then mosquitto started on its port; T0 = first TCP \
         connect accepted (probed every 1 ms), T1 = `delivered` reaches 2 (`online`, then the \
         first backlog message, PUBACKed); {} repetitions, the outage lengthened by \
         (rep-1)/reps x reconnect max so that the broker returns at spread phases of the back-off",
        o.reconnect_backlog,
        o.reconnect_down,
        probe.mqtt.reconnect_min,
        probe.mqtt.reconnect_max,
        o.reconnect_reps
    );
    prefill(&probe.store, &backlog, o.reconnect_backlog)?;
    let mut samples = Vec::new();
    let mut out = Vec::new();
    for rep in 1..=o.reconnect_reps {
        remove_store(&run_path);
        std::fs::copy(&backlog, &run_path).map_err(|e| format!("copy backlog: {e}"))?;
        let port = free_port()?;
        let cfg = link_config(port, &run_path, &format!("bench-outbox-rc{rep}"))?;
        let load0 = loadavg_text();
        // The broker comes back at a different point of the capped back-off period each time
        // (a fixed outage would always hit the same phase of the retry schedule).
        let phase = cfg.mqtt.reconnect_max * (rep - 1) as u32 / o.reconnect_reps as u32;
        let r = reconnect_once(o, workdir, &cfg, port, phase)?;
        let line = format!(
            "reconnect rep {rep} (phase +{phase:.0?}): T1-T0 {:>7.1} ms (CONNACK processed at +{:.1} ms; broker down {:.1?}, ~{} connect \
             attempts by the back-off schedule; mosquitto took {:.1?} to accept)  [load {load0} -> {}]",
            ms(r.first),
            ms(r.connected),
            r.down,
            r.failures,
            r.broker_start,
            loadavg_text()
        );
        println!("{line}");
        out.push(line);
        samples.push(r.first);
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let max = *samples.last().expect("reps >= 1");
    let line = format!(
        "reconnect broker up -> first backlog PUBACK over {} reps: median {:.1} ms, max {:.1} ms \
         (min {:.1} ms) target <= 1000 ms: {}",
        samples.len(),
        ms(median),
        ms(max),
        ms(samples[0]),
        verdict(max <= Duration::from_secs(1))
    );
    println!("{line}");
    out.push(line);
    remove_store(&run_path);
    remove_store(&backlog);
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Reconnect {
    first: Duration,
    connected: Duration,
    failures: u64,
    down: Duration,
    broker_start: Duration,
}

fn reconnect_once(
    o: &Opts,
    workdir: &Path,
    cfg: &Config,
    port: u16,
    phase: Duration,
) -> Res<Reconnect> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (stats_tx, stats_rx) = std::sync::mpsc::channel();
    let cfg2 = cfg.clone();
    let thread = std::thread::spawn(move || -> Res<()> {
        current_thread()?.block_on(async move {
            let path = cfg2.store.path.clone().expect("path");
            let (store, events) = store::open(&cfg2.store, &path).map_err(|e| e.to_string())?;
            let mut settings = LinkSettings::from_config(&cfg2.mqtt).with_store(&cfg2.store);
            // As the gateway runs it (the retained `online` first, the held-back mark).
            settings.announcer = Some(fieldbridge::publish::encoding(&cfg2).1);
            let link = link::spawn(
                &cfg2.mqtt,
                settings,
                Some(Outbox { store, events }),
                None,
                1024,
            )
            .map_err(|e| e.to_string())?;
            let _ = stats_tx.send(link.stats.clone());
            let _ = tokio::time::timeout(Duration::from_secs(120), stop_rx).await;
            drop(link.sender);
            let _ = tokio::time::timeout(Duration::from_secs(10), link.done).await;
            Ok(())
        })
    });
    let stats = stats_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "link did not start within 30 s")?;
    let started = Instant::now();
    std::thread::sleep(o.reconnect_down + phase);
    let down = started.elapsed();
    if stats.connects.load(Ordering::Relaxed) != 0 {
        return Err("the link connected while no broker was up (port taken?)".into());
    }
    let spawn_at = Instant::now();
    let broker = Mosquitto::start(workdir, Some(port))?;
    let t0 = broker.accepted_at;
    let broker_start = t0 - spawn_at;
    let deadline = t0 + Duration::from_secs(30);
    let mut connected = None;
    let first = loop {
        if connected.is_none() && stats.connects.load(Ordering::Relaxed) > 0 {
            connected = Some(t0.elapsed());
        }
        if stats.delivered.load(Ordering::Relaxed) >= 2 {
            break t0.elapsed();
        }
        if Instant::now() >= deadline {
            let _ = stop_tx.send(());
            let _ = thread.join();
            return Err("reconnect: no backlog message delivered within 30 s".into());
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let _ = stop_tx.send(());
    // The link now delivers what it holds (up to its 5 s flush) and disconnects.
    thread.join().map_err(|_| "link thread panicked")??;
    drop(broker);
    // Failed connects: the link logs them, it has no counter; count the back-off steps instead.
    let failures = backoff_attempts(down, cfg.mqtt.reconnect_min, cfg.mqtt.reconnect_max);
    Ok(Reconnect {
        first,
        connected: connected.unwrap_or(first),
        failures,
        down,
        broker_start,
    })
}

/// Connect attempts a doubling back-off makes in `d` (attempts themselves taken as instant).
fn backoff_attempts(d: Duration, min: Duration, max: Duration) -> u64 {
    let (mut t, mut b, mut n) = (Duration::ZERO, min, 1);
    while t + b <= d {
        t += b;
        n += 1;
        b = (b * 2).min(max);
    }
    n
}

// ---------------------------------------------------------------------------------------------
// 4. Disk writes while online (the release gateway)

fn writes(o: &Opts, workdir: &Path) -> Res<Vec<String>> {
    let gateway = std::fs::canonicalize(&o.gateway)
        .map_err(|e| format!("gateway binary {}: {e}", o.gateway.display()))?;
    let broker = Mosquitto::start(workdir, None)?;
    let devices = DeviceThreads::start(o.devices)?;
    let dir = workdir.join("writes");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let store = dir.join("outbox.db");
    let config = dir.join("writes.yaml");
    std::fs::write(
        &config,
        gateway_config(broker.port, &devices.ports, o.interval, &store),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "\n== writes: release gateway {} online, default mode (store defaults, path {}), \
         {} TCP devices x {REGISTERS} holding registers every {:?}, per_device JSON, QoS 1, \
         mosquitto pid {} port {} (set_tcp_nodelay true); warm-up {:?}, measure {:?}",
        gateway.display(),
        store.display(),
        o.devices,
        o.interval,
        broker.child.id(),
        broker.port,
        o.warmup,
        o.measure
    );
    let log = dir.join("gateway.log");
    let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let child = Command::new(&gateway)
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("start {}: {e}", gateway.display()))?;
    let mut gw = Proc::new(child, "gateway");
    let pid = gw.child.id();
    println!(
        "gateway pid {pid}, config {}, log {}",
        config.display(),
        log.display()
    );
    sleep_checking(&mut gw, o.warmup)?;
    let io0 = proc_io(pid)?;
    let files0 = store_files(&store);
    let sub = Subscriber::start(broker.port, "bench/+")?;
    let load0 = loadavg_text();
    let t = Instant::now();
    sleep_checking(&mut gw, o.measure)?;
    let measured = t.elapsed();
    let io1 = proc_io(pid)?;
    let files1 = store_files(&store);
    let received = sub.stop()?;
    let load1 = loadavg_text();
    let exit = gw.terminate(Duration::from_secs(15));
    let readings: u64 = received
        .iter()
        .filter(|(t, _)| t.starts_with("bench/dev"))
        .map(|(_, n)| n)
        .sum();
    let d = |k: &str| io1.get(k).copied().unwrap_or(0) - io0.get(k).copied().unwrap_or(0);
    println!(
        "io at warm-up end (since the gateway started): {}",
        fmt_io(&io0)
    );
    println!(
        "io during the window:                          {}",
        fmt_diff(&io0, &io1)
    );
    println!("store files before the window: {files0}");
    println!("store files after the window:  {files1}");
    let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
    for l in text
        .lines()
        .filter(|l| l.contains("link summary") || l.contains("WARN") || l.contains("ERROR"))
        .take(6)
    {
        println!("  log: {l}");
    }
    println!("gateway: {exit}");
    let wb = d("write_bytes");
    let line = format!(
        "writes  online {:?}: {readings} readings (messages received), disk write_bytes {wb} \
         ({:.3} B/reading), syscw {} (sockets and log included), store files {}; \
         target none: {}  [load {load0} -> {load1}]",
        measured,
        wb as f64 / readings.max(1) as f64,
        d("syscw"),
        if files0 == files1 {
            "unchanged"
        } else {
            "CHANGED"
        },
        verdict(wb == 0 && files0 == files1 && readings > 0)
    );
    println!("{line}");
    Ok(vec![line])
}

fn gateway_config(broker: u16, ports: &[u16], interval: Duration, store: &Path) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "gateway:\n  id: bench-gw\n  prefix: bench\n  log_level: info\n\
         mqtt:\n  host: {LOCALHOST}\n  port: {broker}\nstore:\n  path: {}\nbuses:\n",
        store.display()
    );
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
             timeout: 500ms\n    message: per_device\n    points:\n",
            interval.as_millis()
        );
        for r in 0..REGISTERS {
            let _ = writeln!(y, "      - {{ name: r{r}, address: {r} }}");
        }
    }
    y
}

fn proc_io(pid: u32) -> Res<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .map_err(|e| format!("/proc/{pid}/io: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter_map(|(k, v)| Some((k.trim().to_owned(), v.trim().parse().ok()?)))
        .collect())
}

fn fmt_io(io: &BTreeMap<String, u64>) -> String {
    ["write_bytes", "syscw", "wchar", "cancelled_write_bytes"]
        .iter()
        .map(|k| format!("{k} {}", io.get(*k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_diff(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> String {
    ["write_bytes", "syscw", "wchar", "cancelled_write_bytes"]
        .iter()
        .map(|k| {
            format!(
                "{k} +{}",
                b.get(*k).copied().unwrap_or(0) - a.get(*k).copied().unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Size and mtime (ns) of the store file and its WAL and shared-memory files.
fn store_files(store: &Path) -> String {
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| {
            let p = format!("{}{s}", store.display());
            let name = Path::new(&p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match std::fs::metadata(&p) {
                Ok(m) => {
                    let mtime = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    format!("{name} {} B mtime {mtime}", m.len())
                }
                Err(_) => format!("{name} absent"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------------------------
// Child processes (as in benches/gateway.rs)

/// A private mosquitto on loopback, `set_tcp_nodelay true`, killed by PID when dropped.
struct Mosquitto {
    child: Child,
    port: u16,
    /// When a TCP connect to it first succeeded.
    accepted_at: Instant,
}

impl Mosquitto {
    /// On a free port, or on `port` (which someone else is about to connect to).
    fn start(workdir: &Path, port: Option<u16>) -> Res<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or(
                "mosquitto not found (apt-get install mosquitto, or scripts/install-test-deps)",
            )?;
        let mut last = String::new();
        for _ in 0..3 {
            let port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            let conf = workdir.join(format!("mosquitto-{port}.conf"));
            let log = workdir.join(format!("mosquitto-{port}.log"));
            let _ = std::fs::remove_file(&log);
            // No subscriber in the drain: nothing is queued; max_queued_messages only matters
            // for the writes run's subscriber. Incoming QoS 1 (MQTT 3.1.1) has no broker-side
            // receive window.
            std::fs::write(
                &conf,
                format!(
                    "listener {port} {LOCALHOST}\nallow_anonymous true\npersistence false\n\
                     log_dest file {}\nlog_type error\nlog_type warning\n\
                     max_queued_messages 100000\nmax_inflight_messages 0\nset_tcp_nodelay true\n",
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
            let mut m = Mosquitto {
                child,
                port,
                accepted_at: Instant::now(),
            };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(s)) = m.child.try_wait() {
                    last = format!("exited {s}: {}", read_trim(&log.to_string_lossy()));
                    break;
                }
                if TcpStream::connect((LOCALHOST, port)).is_ok() {
                    m.accepted_at = Instant::now();
                    return Ok(m);
                }
                std::thread::sleep(Duration::from_millis(1));
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
// The subscriber: messages per topic (as in benches/gateway.rs, without the `ts` sets)

struct Subscriber {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Res<BTreeMap<String, u64>>>,
}

impl Subscriber {
    fn start(port: u16, filter: &str) -> Res<Subscriber> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let filter = filter.to_owned();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            current_thread()?.block_on(subscribe(port, filter, stop2, ready_tx))
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

    fn stop(self) -> Res<BTreeMap<String, u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| "subscriber panicked")?
    }
}

async fn subscribe(
    port: u16,
    filter: String,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<()>,
) -> Res<BTreeMap<String, u64>> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(format!("bench-sub-{}", std::process::id()), LOCALHOST, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
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
                // Retained messages from before the window are not readings of the window.
                if !p.retain {
                    *seen.entry(p.topic).or_default() += 1;
                }
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
    Ok(seen)
}

// ---------------------------------------------------------------------------------------------
// Simulated devices (as in benches/gateway.rs, as threads of this process: only the gateway's
// own I/O is measured)

struct DeviceThreads {
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DeviceThreads {
    fn start(count: usize) -> Res<DeviceThreads> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count {
            let listener = TcpListener::bind((LOCALHOST, 0)).map_err(|e| e.to_string())?;
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            ports.push(listener.local_addr().map_err(|e| e.to_string())?.port());
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("device-{i}"))
                    .spawn(move || serve_device(listener, i, stop))
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(DeviceThreads {
            ports,
            stop,
            threads,
        })
    }
}

impl Drop for DeviceThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One device: its own thread and current-thread runtime; ends within 100 ms of `stop`.
fn serve_device(listener: TcpListener, index: usize, stop: Arc<AtomicBool>) {
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
        let stopped = async {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = server.serve(&on_connected, |_e| {}) => {}
            _ = stopped => {}
        }
    });
}

// ---------------------------------------------------------------------------------------------
// /proc

/// The filesystem type holding `dir` (from /proc/mounts, longest matching mount point).
fn fs_type(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let d = dir.to_string_lossy();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && d.starts_with(f[1])).then(|| (f[1].len(), f[2].to_owned()))
        })
        .max()
        .map_or_else(|| "?".into(), |(_, t)| t)
}

/// utime + stime of a process, all threads, in clock ticks (`proc(5)`: fields 14 and 15).
fn cpu_ticks(pid: u32) -> Res<u64> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// utime + stime of the calling thread, in clock ticks (0 if unreadable).
fn thread_ticks() -> u64 {
    stat_ticks("/proc/thread-self/stat").unwrap_or(0)
}

/// utime + stime of the store's thread (`fieldbridge-store`, its name cut to 15 bytes by the
/// kernel) in this process, 0 when there is none.
fn store_thread_ticks() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim() == "fieldbridge-sto")
        })
        .filter_map(|e| stat_ticks(&e.path().join("stat").to_string_lossy()).ok())
        .sum()
}

fn stat_ticks(path: &str) -> Res<u64> {
    let stat = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    // The command name (field 2) may hold spaces; count from the closing parenthesis.
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // `rest` starts at field 3, so field 14 is index 11.
    Ok(n(11) + n(12))
}

/// Clock ticks as seconds.
fn secs(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

fn loadavg_text() -> String {
    let [a, b, c] = loadavg();
    format!("{a:.2} {b:.2} {c:.2}")
}
