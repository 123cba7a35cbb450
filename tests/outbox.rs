//! Store-and-forward under fault injection: the broker killed, the link cut, the gateway
//! stopped, killed (-9) and restarted, a tiny store cap, a corrupt store file. The device
//! serves a counter (one more per read), so a missing or reordered reading shows as a gap.
//!
//! The gateway reaches the broker through a `Relay` so that a test can keep it cut off until
//! the test's own subscriber is back (a subscriber that is not connected would miss messages
//! that the gateway did deliver, which would look like loss).

mod common;

use std::time::Duration;

use common::counter::{assert_in_order, missing};
use common::relay::Relay;
use common::{DeviceState, Gateway, Kind, Mosquitto, MqttProbe, Msg, TcpDevice};

const WAIT: Duration = Duration::from_secs(20);
const TOPIC: &str = "t/d/n";

fn config(broker_port: u16, device_port: u16, interval: &str, store: &str) -> String {
    format!(
        "gateway:\n  id: gw\n  prefix: t\n  stats_interval: 1s\nmqtt:\n  url: mqtt://127.0.0.1:{broker_port}\n  reconnect: {{ min: 50ms, max: 300ms }}\nstore:\n  path: \"{{dir}}/outbox.db\"\n{store}buses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: {device_port} }}\ndevices:\n  - {{ name: d, bus: b, interval: {interval}, points: [ {{ name: n, address: 0 }} ] }}\n"
    )
}

fn counter_device() -> TcpDevice {
    let state = DeviceState::new(&[1]);
    state.set_auto_increment(1, Kind::HoldingRegister, 0);
    TcpDevice::start(state)
}

/// Counter values in arrival order.
fn values(msgs: &[Msg]) -> Vec<u64> {
    msgs.iter()
        .filter(|m| m.topic == TOPIC)
        .map(|m| m.json()["value"].as_u64().expect("counter value"))
        .collect()
}

/// Reads served by the device so far (each returned the counter, then incremented it).
fn served(device: &TcpDevice) -> u64 {
    device
        .state()
        .requests()
        .iter()
        .filter(|r| r.fc == 3)
        .count() as u64
}

/// Collects messages until the value `target` (or a later one) has arrived.
async fn collect_until(probe: &mut MqttProbe, msgs: &mut Vec<Msg>, target: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !values(msgs).iter().any(|&v| v >= target) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match probe.next(left).await {
            Some(m) => msgs.push(m),
            None => {
                let v = values(msgs);
                panic!(
                    "value {target} never arrived; got {} values, last {:?}",
                    v.len(),
                    v.last()
                )
            }
        }
    }
}

/// Every value from the first seen to `last` arrived, in order; duplicates allowed only as
/// repeats (QoS 1), never as going back in time after a later value.
fn assert_complete_in_order(seen: &[u64], last: u64) -> Vec<u64> {
    let mut distinct = seen.to_vec();
    distinct.dedup();
    let missing = missing(seen, last);
    assert!(
        missing.is_empty(),
        "missing {missing:?} of {}..={last}",
        distinct[0]
    );
    distinct
}

/// Messages in the gateway's store as `fieldbridge status` reads them from the file.
fn stored_backlog(config_path: &str) -> u64 {
    let out = common::run_cli(&["status", "--config", config_path]);
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("backlog: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn wait_for_reads(device: &TcpDevice, n: usize) {
    let before = device.state().requests().len();
    device
        .state()
        .wait_for_count(|_| true, before + n, WAIT)
        .await;
}

fn wait_connected(gateway: &Gateway, times: usize) {
    assert!(
        common::wait_until(WAIT, || gateway.logs().matches("MQTT connected").count()
            >= times),
        "not connected {times} times: {}",
        gateway.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_loses_no_reading_and_order_holds() {
    let mut broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let gateway = Gateway::start(&config(relay.port(), device.port(), "100ms", ""));
    let mut msgs = vec![probe.expect(|t| t == TOPIC, WAIT).await];

    // The broker dies (its session state with it) for well over several poll intervals.
    relay.cut();
    broker.stop();
    wait_for_reads(&device, 25).await;
    broker.restart();
    probe.wait_resubscribed(WAIT).await;
    relay.restore();
    wait_connected(&gateway, 2);
    let last = served(&device) - 1;
    collect_until(&mut probe, &mut msgs, last).await;
    assert_complete_in_order(&values(&msgs), last);
    assert_in_order(&values(&msgs));
    // The readings held back are marked, and keep the time they were read.
    let buffered: Vec<&Msg> = msgs
        .iter()
        .filter(|m| m.topic == TOPIC && m.json()["buffered"] == true)
        .collect();
    assert!(buffered.len() >= 20, "{} buffered", buffered.len());
    drop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_during_an_outage_loses_nothing() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let mut gateway = Gateway::start(&config(relay.port(), device.port(), "50ms", ""));
    let mut msgs = vec![probe.expect(|t| t == TOPIC, WAIT).await];
    relay.cut();
    wait_for_reads(&device, 20).await;
    gateway.terminate();
    let status = gateway.wait_exit(WAIT).expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}: {}", gateway.logs());
    // Stopping while the broker is away does not wait for it: what was held is on disk.
    assert!(
        !gateway.logs().contains("not delivered"),
        "{}",
        gateway.logs()
    );
    let stopped_at = served(&device);
    gateway.restart();
    assert!(
        common::wait_until(WAIT, || gateway.logs().contains("delivering them first")),
        "{}",
        gateway.logs()
    );
    wait_for_reads(&device, 10).await;
    relay.restore();
    let last = served(&device) - 1;
    collect_until(&mut probe, &mut msgs, last).await;
    assert_complete_in_order(&values(&msgs), last);
    assert_in_order(&values(&msgs));
    assert!(stopped_at > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_outage_loses_at_most_the_last_commit_window() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let mut gateway = Gateway::start(&config(
        relay.port(),
        device.port(),
        "50ms",
        "  commit_interval: 100ms\n",
    ));
    let mut msgs = vec![probe.expect(|t| t == TOPIC, WAIT).await];
    relay.cut();
    wait_for_reads(&device, 30).await;
    gateway.kill();
    let killed_at = served(&device);
    let committed = committed_values(gateway.config_path());
    assert!(
        !committed.is_empty(),
        "nothing was committed before the kill"
    );
    gateway.restart();
    wait_for_reads(&device, 10).await;
    relay.restore();
    let last = served(&device) - 1;
    collect_until(&mut probe, &mut msgs, last).await;
    // The commit window is 100 ms = 2 polls, plus the commit's own time (see
    // durability_always_survives_kill_9_while_online): at most half the outage.
    assert_lost_only_the_uncommitted_tail(&values(&msgs), &committed, last, killed_at, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_drain_loses_nothing() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let state = DeviceState::new(&[1]);
    state.set_auto_increment(1, Kind::HoldingRegister, 0);
    let device = TcpDevice::start(state);
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = config(relay.port(), device.port(), "20ms", "");
    let mut gateway = Gateway::start(&yaml);
    let mut msgs = vec![probe.expect(|t| t == TOPIC, WAIT).await];
    relay.cut();
    wait_for_reads(&device, 100).await;
    // Wait until the outage's rows are committed (a reader of the file sees only committed
    // rows), then start the drain and kill the gateway in the middle of it.
    let config_path = gateway.config_path().to_str().unwrap().to_string();
    assert!(
        common::wait_until(WAIT, || stored_backlog(&config_path) >= 90),
        "the outage's readings were never committed to the store"
    );
    relay.restore();
    let first = probe.expect(|t| t == TOPIC, WAIT).await;
    msgs.push(first);
    gateway.kill();
    relay.cut();
    gateway.restart();
    wait_for_reads(&device, 10).await;
    relay.restore();
    let last = served(&device) - 1;
    collect_until(&mut probe, &mut msgs, last).await;
    // Nothing acknowledged was lost and nothing unacknowledged was deleted: every value but
    // those read in the kill's window (polled since the last commit, not yet acknowledged)
    // arrived. That window is one run of consecutive values; its length is the time from the
    // relay's return to the kill, a few polls, up to a second of them on a loaded machine.
    let missing = missing(&values(&msgs), last);
    let contiguous = missing.windows(2).all(|w| w[1] == w[0] + 1);
    assert!(
        contiguous && missing.len() <= 50,
        "lost {} values: {missing:?}",
        missing.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_drops_the_oldest_counts_them_and_keeps_the_newest() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    // 16 KiB holds about 130 of these messages.
    let mut gateway = Gateway::start(&config(
        relay.port(),
        device.port(),
        "10ms",
        "  max_bytes: 16384\n",
    ));
    probe.expect(|t| t == TOPIC, WAIT).await;
    relay.cut();
    wait_for_reads(&device, 400).await;
    assert!(
        common::wait_until(WAIT, || gateway.logs().contains("store full")),
        "{}",
        gateway.logs()
    );
    let last_before = served(&device) - 1;
    probe.drain();
    relay.restore();
    let mut msgs = Vec::new();
    collect_until(&mut probe, &mut msgs, last_before).await;
    let seen = values(&msgs);
    // The newest survived, contiguous up to the end; the oldest were dropped.
    let tail: Vec<u64> = seen.iter().copied().filter(|&v| v <= last_before).collect();
    assert!(tail.len() >= 60 && tail.len() <= 200, "{} kept", tail.len());
    let from = *tail.first().unwrap();
    assert_complete_in_order(&tail, last_before);
    assert!(from > 150, "the oldest were dropped (first kept {from})");
    gateway.terminate();
    gateway.wait_exit(WAIT).expect("exits");
    let logs = gateway.logs();
    assert_eq!(
        logs.matches("store full: dropping").count(),
        1,
        "logged once per episode"
    );
    assert!(logs.contains("store no longer full"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_store_file_is_moved_aside_and_the_gateway_runs() {
    let broker = Mosquitto::start();
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("outbox.db");
    std::fs::write(&store, b"garbage, not SQLite ".repeat(500)).unwrap();
    let yaml = config(broker.port(), device.port(), "100ms", "").replace(
        "  path: \"{dir}/outbox.db\"",
        &format!("  path: \"{}\"", store.display()),
    );
    let gateway = Gateway::start(&yaml);
    probe.expect(|t| t == TOPIC, WAIT).await;
    let logs = gateway.logs();
    assert!(logs.contains("moved aside"), "{logs}");
    assert!(logs.contains("ERROR"), "logged as an error: {logs}");
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .count();
    assert_eq!(aside, 1);
}

/// `durability: always` against kill -9 while online: the link hangs (the relay stalls, so
/// nothing is acknowledged) for 40 readings, then the gateway is killed. Under `auto` those
/// 40 would be in memory only, awaiting their PUBACK, and lost. Under `always` every
/// reading committed before the kill arrives after the restart, and what is lost is only
/// the uncommitted tail: one commit window (`commit_interval` plus the commit itself; one
/// fsync took over 200 ms on a CI disk, so the bound on its length is generous).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_always_survives_kill_9_while_online() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let mut gateway = Gateway::start(&config(
        relay.port(),
        device.port(),
        "50ms",
        "  durability: always\n  commit_interval: 50ms\n",
    ));
    let mut msgs = vec![probe.expect(|t| t == TOPIC, WAIT).await];
    relay.stall();
    wait_for_reads(&device, 40).await;
    gateway.kill();
    let killed_at = served(&device);
    // What the stalled link held is dropped, never forwarded.
    relay.cut();
    let committed = committed_values(gateway.config_path());
    assert!(
        !committed.is_empty(),
        "nothing was committed before the kill"
    );
    gateway.restart();
    relay.restore();
    wait_for_reads(&device, 5).await;
    let last = served(&device) - 1;
    collect_until(&mut probe, &mut msgs, last).await;
    assert_lost_only_the_uncommitted_tail(&values(&msgs), &committed, last, killed_at, 20);
}

/// Counter values of the rows committed to the store of the (stopped) gateway of
/// `config_path`: what a reader of the file sees, i.e. what a kill -9 cannot take back.
fn committed_values(config_path: &std::path::Path) -> Vec<u64> {
    let dir = config_path.parent().unwrap();
    let db = rusqlite::Connection::open_with_flags(
        dir.join("outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the store read-only");
    let mut stmt = db
        .prepare("SELECT payload FROM outbox WHERE topic = ?1 ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([TOPIC], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&p.unwrap()).expect("JSON row");
            v["value"].as_u64().expect("counter value in the row")
        })
        .collect();
    rows
}

/// After a kill -9 at `killed_at` and a restart: every committed reading arrived, the lost
/// ones are one run just before the kill (no hole elsewhere), and no more than `bound`.
fn assert_lost_only_the_uncommitted_tail(
    got: &[u64],
    committed: &[u64],
    last: u64,
    killed_at: u64,
    bound: usize,
) {
    let missing = missing(got, last);
    let lost_committed: Vec<u64> = committed
        .iter()
        .copied()
        .filter(|v| missing.contains(v))
        .collect();
    assert!(
        lost_committed.is_empty(),
        "committed readings lost: {lost_committed:?} (all lost: {missing:?})"
    );
    if let (Some(&first), Some(&end)) = (missing.first(), missing.last()) {
        assert_eq!(
            missing.len() as u64,
            end - first + 1,
            "the lost readings are not one run: {missing:?}"
        );
        assert!(
            end < killed_at && end + 3 >= killed_at,
            "lost {missing:?}, killed after read {killed_at}: only the tail before the kill may be lost"
        );
    }
    assert!(
        missing.len() <= bound,
        "lost {} readings, more than one commit window: {missing:?}",
        missing.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_backlog_of_the_store() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let mut gateway = Gateway::start(&config(relay.port(), device.port(), "20ms", ""));
    probe.expect(|t| t == TOPIC, WAIT).await;
    relay.cut();
    wait_for_reads(&device, 50).await;
    gateway.terminate();
    gateway.wait_exit(WAIT).expect("exits");
    let config_path = gateway.config_path().to_str().unwrap().to_string();
    let out = common::run_cli(&["status", "--config", &config_path]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let backlog = stored_backlog(&config_path);
    assert!(backlog >= 40, "{}", out.stdout);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop; `None` (with a line
/// saying so) when this process may not mount (the suite runs as root).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs (not root?): the disk-full case needs it");
            return None;
        }
        Some(SmallFs { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the filesystem to its last byte; returns the filler.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0]).is_ok() {}
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// The store on a real filesystem that fills up (a tmpfs with `size=`): readings stored
/// while the broker is down, then the disk full, more readings, space back, broker back.
/// Every reading arrives, oldest first: those the disk refused were kept in memory behind
/// the stored ones (far below the 8 MiB that memory holds before dropping the oldest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_delivery_order_and_loses_nothing_once_space_returns() {
    let Some(fs) = SmallFs::mount("4m") else {
        return;
    };
    let mut broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let yaml = config(
        relay.port(),
        device.port(),
        "50ms",
        "  commit_interval: 50ms\n",
    )
    .replace(
        "  path: \"{dir}/outbox.db\"",
        &format!("  path: \"{}/outbox.db\"", fs.path().display()),
    );
    let gateway = Gateway::start(&yaml);
    let mut msgs = vec![probe.expect(|t| t == TOPIC, WAIT).await];

    relay.cut();
    broker.stop();
    let config_path = gateway.config_path().to_str().unwrap().to_string();
    assert!(
        common::wait_until(WAIT, || stored_backlog(&config_path) >= 20),
        "the outage's first readings were never committed"
    );
    let filler = fs.fill();
    wait_for_reads(&device, 40).await;
    assert!(
        gateway.logs().contains("store write failed"),
        "the disk never refused a write: {}",
        gateway.logs()
    );
    std::fs::remove_file(filler).unwrap();
    wait_for_reads(&device, 20).await;
    broker.restart();
    probe.wait_resubscribed(WAIT).await;
    relay.restore();
    let last = served(&device) - 1;
    collect_until(&mut probe, &mut msgs, last).await;
    assert_in_order(&values(&msgs));
    assert_complete_in_order(&values(&msgs), last);
    drop(gateway);
}

/// A row whose topic is not UTF-8 (written by another program, or a flipped bit) in the
/// middle of the backlog: it is taken out, everything else is delivered in order, and the
/// readings that follow are delivered too (they used to queue behind it for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_does_not_stall_delivery() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let mut gateway = Gateway::start(&config(relay.port(), device.port(), "50ms", ""));
    let mut msgs = vec![probe.expect(|t| t == TOPIC, WAIT).await];
    relay.cut();
    wait_for_reads(&device, 30).await;
    gateway.terminate();
    assert!(gateway.wait_exit(WAIT).is_some_and(|s| s.success()));
    let db = rusqlite::Connection::open(gateway.dir().join("outbox.db")).unwrap();
    let (bad_id, bad_value): (i64, String) = db
        .query_row(
            "SELECT id, CAST(payload AS TEXT) FROM outbox WHERE topic = ?1 ORDER BY id LIMIT 1 OFFSET 10",
            [TOPIC],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    db.execute(
        "UPDATE outbox SET topic = CAST(x'74ff2f64' AS TEXT) WHERE id = ?1",
        [bad_id],
    )
    .unwrap();
    drop(db);
    let bad_value = serde_json::from_str::<serde_json::Value>(&bad_value).unwrap()["value"]
        .as_u64()
        .unwrap();
    gateway.restart();
    wait_for_reads(&device, 5).await;
    relay.restore();
    wait_for_reads(&device, 10).await;
    let last = served(&device) - 1;
    collect_until(&mut probe, &mut msgs, last).await;
    let seen = values(&msgs);
    assert_in_order(&seen);
    assert_eq!(
        missing(&seen, last),
        [bad_value],
        "only the unreadable row is lost"
    );
}

/// A store that cannot be read at all (here its table is gone, as after an I/O error that
/// no repair can read around): live readings are still delivered, from memory, while the
/// read is retried; they do not queue behind the rows that cannot be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_read_does_not_stop_live_readings() {
    let broker = Mosquitto::start();
    let relay = Relay::start(broker.port()).await;
    let device = counter_device();
    let mut probe = MqttProbe::connect(broker.port(), "t/#").await;
    let gateway = Gateway::start(&config(relay.port(), device.port(), "50ms", ""));
    probe.expect(|t| t == TOPIC, WAIT).await;
    relay.cut();
    let config_path = gateway.config_path().to_str().unwrap().to_string();
    assert!(
        common::wait_until(WAIT, || stored_backlog(&config_path) >= 10),
        "the outage's readings were never committed"
    );
    let db = rusqlite::Connection::open(gateway.dir().join("outbox.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute_batch("DROP TABLE outbox").unwrap();
    drop(db);
    wait_for_reads(&device, 5).await;
    probe.drain();
    relay.restore();
    let after = served(&device) + 20;
    let mut msgs = Vec::new();
    collect_until(&mut probe, &mut msgs, after).await;
}
