//! The SQLite outbox: messages waiting for the broker, on disk.
//!
//! # Role
//! The link ([`crate::link`]) delivers from memory while the broker is reachable. When it is
//! not (or too many messages await their PUBACK, or `durability: always`), new messages are
//! *spilled* here, and drained back, oldest first, when the link is healthy. A row is deleted
//! only after the broker acknowledged its message.
//!
//! # Schema
//! ```sql
//! CREATE TABLE outbox (
//!     id       INTEGER PRIMARY KEY AUTOINCREMENT, -- delivery order
//!     topic    TEXT    NOT NULL,
//!     payload  BLOB    NOT NULL,
//!     qos      INTEGER NOT NULL,
//!     retain   INTEGER NOT NULL,
//!     created  INTEGER NOT NULL,                  -- wall clock, ms since the epoch
//!     bytes    INTEGER NOT NULL,                  -- what the row counts against the cap
//!     flags    INTEGER NOT NULL DEFAULT 0         -- the encoder's kind << 1 | held back
//! );
//! ```
//! `flags` was added after the first release: a store without it gets it at open
//! (`ALTER TABLE`), its old rows 0 (sent as they are, which is what they were written for).
//! `AUTOINCREMENT` keeps ids increasing even after the table was emptied, so the link's read
//! cursor ("after id N") never misses a row. Messages that must go *before* everything stored
//! (what was in memory at a graceful shutdown during an outage) are inserted with ids below
//! the smallest one ([`StoreRequest::Prepend`]); ids may therefore be negative.
//!
//! # Invariants
//! - Rows are delivered in id order; the link reads them with `id > cursor ORDER BY id`.
//!   Messages a failed write left in memory have ids too and are read in the same order.
//! - A row is deleted only on PUBACK, by the cap / `max_age` policy (counted as dropped), or
//!   when it cannot be delivered at all (counted as unreadable; see "Faults").
//! - One thread owns the connection; everything else sends it requests. Reads see rows not
//!   yet committed (same connection), so draining never waits for a commit.
//!
//! # Durability
//! WAL journal. Writes are group-committed: one transaction per `commit_every` writes or
//! `commit_interval` after the first uncommitted write, so bursts cost one fsync per batch.
//! What survives:
//! - graceful stop (SIGTERM): everything (the link writes what it holds, then the store
//!   commits and checkpoints);
//! - kill -9: every committed row, i.e. all but the last commit window of writes;
//! - power loss: the same with `synchronous: full` (default); with `normal`, possibly less.
//!
//! A delete lost in a crash only means that message is sent again (QoS 1 allows duplicates;
//! consumers de-duplicate on `(topic, ts)`).
//!
//! # Faults
//! - A store that cannot be opened, or fails its integrity check, is moved aside as
//!   `<name>.corrupt-<unix seconds>` (with its `-wal`/`-shm`), a fresh one is created, and the
//!   event is logged as an error. If even a fresh store cannot be opened, the link runs on
//!   its memory queue alone, loudly.
//! - **A row that cannot be delivered** is taken out of the outbox when a read meets it,
//!   counted in [`StoreStats::unreadable`], with one error line per read: a topic that is not
//!   UTF-8, empty, longer than 65535 bytes, or holds NUL or a wildcard; a topic and payload
//!   longer than MQTT carries; a `qos` other than 0, 1, 2; a `retain` other than 0, 1; a
//!   `created` that is not an integer. What rows hold is never trusted: another program, an
//!   older version or a flipped bit may have written them. A negative `bytes` counts as 0.
//! - **A damaged page found after the start-up check** (a read answers "malformed"): the read
//!   goes on around it (the first cursor after which a row can be read again is found by
//!   doubling the step, then halving it), so the link gets every readable row and nothing
//!   waits. After that read, the file is rebuilt: every readable row, under its id, is copied
//!   to `<name>.rebuild`, the damaged file is moved aside as `<name>.corrupt-<unix seconds>`
//!   and the copy takes its place; the rows lost (those on the damaged pages) are counted as
//!   unreadable and logged with the count kept. A rebuild needs room for the copy; if it
//!   fails, the store goes on reading around the damage and tries again after an hour.
//! - **A write that fails** (disk full, I/O error) rolls back. The messages of that
//!   transaction, and every one appended after it until writing works again, stay in the
//!   store thread's memory under the ids they were given, in order: reads return them merged
//!   with the rows (so delivery order is the order they came in, behind every older row),
//!   deletes remove them, and they are written, with any deletes that were rolled back, after
//!   a back-off of 1 s doubling to 30 s. That memory holds at most [`UNSAVED_MAX_BYTES`] (or
//!   `max_bytes` if smaller); beyond it the oldest of those messages are dropped (policy
//!   drop_oldest, counted in `dropped`, logged once per episode). They are lost on kill -9
//!   or power loss (not on SIGTERM if the disk has room again by then). The link is told
//!   once per episode ([`StoreEvent::WriteFailed`]); it hands nothing back and keeps nothing.
//! - When the stored bytes pass `max_bytes`, the oldest rows are dropped, counted, and logged
//!   once per episode.
//! - The store thread beats [`StoreStats::heartbeat`] on every turn (at least every second);
//!   the watchdog withholds its ping while it is older than `health::STORE_STALL_LIMIT`.
//!
//! # Bounds
//! - Requests: the channel to the thread holds [`REQUEST_QUEUE`] requests and
//!   [`QUEUED_BYTES_MAX`] bytes of appends. The link only uses [`StoreHandle::try_send`], which
//!   hands the request back when full: the link keeps the messages (at most
//!   `mqtt.queue.capacity` of them, dropping the oldest beyond, counted) and deletes, and
//!   sends them on a later turn. Nothing in the link's event loop waits for the store.
//! - Events to the link: a channel of 16; an event that does not fit is dropped.
//! - Sweeps (cap, `max_age`) delete at most [`SWEEP_BATCH`] rows per transaction and go on
//!   in the next turns, so a large sweep never becomes one transaction that a nearly full
//!   card refuses again and again.
//!
//! # Disk space
//! Rows count against `max_bytes` by topic + payload + [`ROW_OVERHEAD`]. The WAL: SQLite
//! checkpoints it every 1000 pages (4 MiB at the default page size) and starts it over;
//! `journal_size_limit` cuts the file back to [`WAL_SIZE_LIMIT`] (4 MiB) when it does, and
//! it is truncated to zero every minute, at every flush and at shutdown. So the WAL holds at
//! most 4 MiB plus one transaction: `commit_every` messages or one sweep batch. A checkpoint
//! the disk refuses leaves the WAL as it is until one succeeds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::model::{Qos, Store as StoreConfig, Synchronous};

/// Bytes a row counts against the cap beyond its topic and payload (ids, flags, b-tree cells).
pub const ROW_OVERHEAD: u64 = 40;

/// Requests the store thread's channel holds; a sender finding it full keeps what it meant to
/// send (see [`StoreHandle::try_send`]).
pub const REQUEST_QUEUE: usize = 1024;

/// Bytes of messages in appends sent to the store thread and not yet taken by it.
pub const QUEUED_BYTES_MAX: u64 = 16 << 20;

/// Messages that could not be written (disk full) are kept in memory up to this many bytes (or
/// `max_bytes` when smaller); beyond it the oldest of them are dropped (counted).
pub const UNSAVED_MAX_BYTES: u64 = 8 << 20;

/// Back-off between write attempts after a failed write.
const WRITE_RETRY_MIN: Duration = Duration::from_secs(1);
const WRITE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Rows a cap or `max_age` sweep deletes in one transaction.
pub const SWEEP_BATCH: usize = 1000;

/// The WAL is truncated to zero this often (and after every flush).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// What the WAL is cut back to when SQLite resets it (`PRAGMA journal_size_limit`).
pub const WAL_SIZE_LIMIT: u64 = 4 << 20;

/// A damaged file is rebuilt at most this often (a failed rebuild is not retried at once).
const REBUILD_EVERY: Duration = Duration::from_secs(3600);

/// A message to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
    /// Wall clock ms since the epoch when it was first queued.
    pub created: i64,
    /// The publisher's encoding of the payload and whether the message was held back
    /// (`link::OutMessage::kind`, `link::Announcer::render`): kept so that the encoder can
    /// mark it when it is sent, instead of the store keeping rewritten bytes.
    pub kind: u8,
    pub held: bool,
}

impl NewMessage {
    /// The `flags` column.
    fn flags(&self) -> i64 {
        (i64::from(self.kind) << 1) | i64::from(self.held)
    }
}

impl NewMessage {
    pub fn bytes(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64 + ROW_OVERHEAD
    }
}

/// A stored message, with its row id.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub id: i64,
    pub message: NewMessage,
}

/// Requests to the store thread.
#[derive(Debug)]
pub enum StoreRequest {
    /// Store at the end, in order (group-committed).
    Append(Vec<NewMessage>),
    /// Store before everything already stored, in order.
    Prepend(Vec<NewMessage>),
    /// Delete acknowledged rows.
    Delete(Vec<i64>),
    /// Up to `limit` rows with `id > after`, in id order (an error is not an empty store).
    Read {
        after: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<StoredMessage>, String>>,
    },
    /// Commit and checkpoint now; answered when done.
    Flush { reply: oneshot::Sender<()> },
}

/// What the store tells the link on its own (a bounded channel: events are dropped, never
/// waited for, when the link does not take them).
#[derive(Debug)]
pub enum StoreEvent {
    /// Writing failed (disk full, I/O error); sent once per failure episode. Nothing is
    /// handed back: the store keeps the messages in memory, in order, under their ids (they
    /// are read and deleted like rows), and writes them when it can.
    WriteFailed { error: String },
}

/// Counters and levels of the store, readable from any task.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Rows in the store.
    pub backlog: AtomicU64,
    /// Their bytes as counted against the cap.
    pub backlog_bytes: AtomicU64,
    /// `created` of the oldest row (ms since the epoch), 0 when empty.
    pub oldest_created: AtomicI64,
    /// Rows dropped by the cap or `max_age`.
    pub dropped: AtomicU64,
    pub appended: AtomicU64,
    pub deleted: AtomicU64,
    pub commits: AtomicU64,
    pub write_failures: AtomicU64,
    /// Rows that could not be read back (bad contents, a damaged page), taken out of the outbox.
    pub unreadable: AtomicU64,
    /// Beaten on every turn of the store thread's loop (at least every `health::TICK`) and
    /// while it rebuilds a file; the watchdog sees a thread stuck in I/O by its age.
    pub heartbeat: crate::health::Heartbeat,
}

/// Handle to the store thread.
pub struct StoreHandle {
    requests: std_mpsc::SyncSender<StoreRequest>,
    /// Bytes of queued appends (see [`QUEUED_BYTES_MAX`]).
    queued_bytes: Arc<AtomicU64>,
    pub stats: Arc<StoreStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Why [`StoreHandle::try_send`] did not send; the request comes back.
#[derive(Debug)]
pub enum TrySendError {
    /// The channel (or its byte budget for appends) is full: the thread is behind or stuck.
    Full(StoreRequest),
    /// The thread is gone.
    Gone(StoreRequest),
}

impl StoreHandle {
    /// Sends a request, waiting while the channel is full; `false` if the store thread is
    /// gone. Blocks: never from the link's event loop (it uses [`Self::try_send`]).
    pub fn send(&self, request: StoreRequest) -> bool {
        let bytes = append_bytes(&request);
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.requests.send(request).is_ok()
    }

    /// Sends a request without waiting; hands it back when the channel holds
    /// [`REQUEST_QUEUE`] requests or [`QUEUED_BYTES_MAX`] bytes of appends, or the thread is gone.
    pub fn try_send(&self, request: StoreRequest) -> Result<(), TrySendError> {
        let bytes = append_bytes(&request);
        if bytes > 0 && self.queued_bytes.load(Ordering::Relaxed) + bytes > QUEUED_BYTES_MAX {
            return Err(TrySendError::Full(request));
        }
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.requests.try_send(request).map_err(|e| {
            sub(&self.queued_bytes, bytes);
            match e {
                std_mpsc::TrySendError::Full(r) => TrySendError::Full(r),
                std_mpsc::TrySendError::Disconnected(r) => TrySendError::Gone(r),
            }
        })
    }

    /// Sends a request, waiting at most `timeout` for room (the byte budget does not apply:
    /// for what must not be lost, at shutdown); `false` if it could not be sent. Blocks.
    pub fn send_within(&self, request: StoreRequest, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let bytes = append_bytes(&request);
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut request = request;
        loop {
            match self.requests.try_send(request) {
                Ok(()) => return true,
                Err(std_mpsc::TrySendError::Full(r)) if Instant::now() < deadline => {
                    request = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => {
                    sub(&self.queued_bytes, bytes);
                    return false;
                }
            }
        }
    }

    /// Stops the thread after it committed everything. Blocks: call from a blocking context
    /// or at the very end.
    pub fn close(mut self) {
        let (tx, _) = std_mpsc::sync_channel(1);
        // Dropping the only sender ends the thread's loop.
        self.requests = tx;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Io(String),
}

fn append_bytes(request: &StoreRequest) -> u64 {
    match request {
        StoreRequest::Append(m) | StoreRequest::Prepend(m) => m.iter().map(NewMessage::bytes).sum(),
        _ => 0,
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Opens (or creates) the store and starts its thread. A corrupt file is moved aside.
pub fn open(
    config: &StoreConfig,
    path: &Path,
) -> Result<(StoreHandle, mpsc::Receiver<StoreEvent>), StoreError> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Io(format!("{}: {e}", parent.display())))?;
        }
    }
    let db = match open_checked(path, config.synchronous) {
        Ok(db) => db,
        Err(OpenFailure::Corrupt(why)) => {
            let aside = move_aside(path)?;
            tracing::error!(
                store = %path.display(),
                moved_to = %aside.display(),
                error = %why,
                "store file is corrupt or unreadable: moved aside, starting a fresh one"
            );
            open_checked(path, config.synchronous).map_err(|e| match e {
                OpenFailure::Corrupt(why) | OpenFailure::Other(why) => {
                    StoreError::Io(format!("{}: {why}", path.display()))
                }
            })?
        }
        Err(OpenFailure::Other(why)) => {
            return Err(StoreError::Io(format!("{}: {why}", path.display())))
        }
    };
    check_free_space(path, config.max_bytes);
    let stats = Arc::new(StoreStats::default());
    let (tx, rx) = std_mpsc::sync_channel(REQUEST_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(16);
    let queued_bytes = Arc::new(AtomicU64::new(0));
    stats.heartbeat.beat();
    let mut worker = Worker {
        db,
        path: path.to_path_buf(),
        config: config.clone(),
        stats: stats.clone(),
        events: events_tx,
        queued_bytes: queued_bytes.clone(),
        in_tx: false,
        tx_started: None,
        tx_writes: 0,
        tx_messages: Vec::new(),
        tx_deletes: Vec::new(),
        unsaved: BTreeMap::new(),
        unsaved_bytes: 0,
        pending_deletes: Vec::new(),
        write_retry_at: None,
        write_backoff: Duration::ZERO,
        unsaved_dropped: 0,
        next_id: 1,
        bytes: 0,
        full_episode: 0,
        sweep_more: false,
        damaged: false,
        last_rebuild: None,
        last_checkpoint: Instant::now(),
        wal_dirty: false,
    };
    if !worker.load_levels() {
        tracing::warn!(store = %path.display(), "store levels unreadable at start");
    }
    let thread = std::thread::Builder::new()
        .name("fieldbridge-store".into())
        // SQLite needs far less than the default 2 MiB (its deepest recursion is in the parser).
        .stack_size(256 * 1024)
        .spawn(move || worker.run(rx))
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok((
        StoreHandle {
            requests: tx,
            queued_bytes,
            stats,
            thread: Some(thread),
        },
        events_rx,
    ))
}

enum OpenFailure {
    Corrupt(String),
    Other(String),
}

fn open_checked(path: &Path, sync: Synchronous) -> Result<Connection, OpenFailure> {
    use rusqlite::ErrorCode;
    let classify = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            OpenFailure::Corrupt(e.to_string())
        }
        _ => OpenFailure::Other(e.to_string()),
    };
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(classify)?;
    db.pragma_update(None, "journal_mode", "WAL")
        .map_err(classify)?;
    // The WAL is cut back to this after each reset (it restarts after every checkpoint,
    // automatic every 1000 pages or ours); see "Disk space" in the module docs.
    db.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT as i64)
        .map_err(classify)?;
    // Rows are written once and read once, in order: a large page cache buys nothing and
    // costs resident memory on a Pi (SQLite's default is 2 MiB).
    db.pragma_update(None, "cache_size", -256)
        .map_err(classify)?;
    db.pragma_update(
        None,
        "synchronous",
        match sync {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )
    .map_err(classify)?;
    let check: String = db
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(classify)?;
    if check != "ok" {
        return Err(OpenFailure::Corrupt(format!("integrity check: {check}")));
    }
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL,
            retain INTEGER NOT NULL,
            created INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            flags INTEGER NOT NULL DEFAULT 0
        );",
    )
    .map_err(classify)?;
    // A store written before `flags` existed.
    let has_flags = db.prepare("SELECT flags FROM outbox LIMIT 0").is_ok();
    if !has_flags {
        db.execute_batch("ALTER TABLE outbox ADD COLUMN flags INTEGER NOT NULL DEFAULT 0;")
            .map_err(classify)?;
    }
    Ok(db)
}

/// Renames a bad store (and its WAL and shared-memory files) out of the way.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &aside)
        .map_err(|e| StoreError::Io(format!("moving {} aside: {e}", path.display())))?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
        }
    }
    Ok(aside)
}

/// Warns when the filesystem cannot hold the configured cap.
fn check_free_space(path: &Path, max_bytes: u64) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(free) = free_bytes(dir) {
        // The file needs some room beyond the counted bytes (pages, WAL).
        let needed = max_bytes + max_bytes / 4;
        if free < needed {
            tracing::warn!(
                store = %path.display(),
                free_mib = free / (1024 * 1024),
                max_mib = max_bytes / (1024 * 1024),
                "store cap does not fit the free space: lower store.max_bytes or free the disk; a full disk makes the gateway keep messages in memory only"
            );
        }
    }
}

/// Free bytes available to this user on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

/// Backlog of a store file, read without disturbing a running gateway (for `status`).
pub fn inspect(path: &Path) -> Result<(u64, u64, Option<i64>), StoreError> {
    let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| {
        StoreError::Sqlite {
            path: path.display().to_string(),
            source: e,
        }
    })?;
    db.query_row(
        "SELECT COUNT(*), COALESCE(SUM(MAX(bytes, 0)), 0), MIN(created) FROM outbox",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get(2)?,
            ))
        },
    )
    .map_err(|e| StoreError::Sqlite {
        path: path.display().to_string(),
        source: e,
    })
}

struct Worker {
    db: Connection,
    path: PathBuf,
    config: StoreConfig,
    stats: Arc<StoreStats>,
    events: mpsc::Sender<StoreEvent>,
    /// Bytes of appends sent to the thread and not yet taken (shared with the handle).
    queued_bytes: Arc<AtomicU64>,
    in_tx: bool,
    tx_started: Option<Instant>,
    tx_writes: usize,
    /// Messages written in the open transaction; back to `unsaved` if it fails.
    tx_messages: Vec<StoredMessage>,
    /// Id runs deleted in the open transaction; back to `pending_deletes` if it fails.
    tx_deletes: Vec<(i64, i64)>,
    /// Messages that could not be written (disk full), with their ids, in id order: read and
    /// deleted like rows, written first when writing works again.
    unsaved: BTreeMap<i64, NewMessage>,
    unsaved_bytes: u64,
    /// Acknowledged id runs whose delete was rolled back, applied with the next write.
    pending_deletes: Vec<(i64, i64)>,
    /// After a failed write, none is tried before this (back-off).
    write_retry_at: Option<Instant>,
    write_backoff: Duration,
    /// Messages dropped from `unsaved` in the current failure episode.
    unsaved_dropped: u64,
    /// Id of the next appended row; only ever grows (see `insert`).
    next_id: i64,
    bytes: u64,
    /// Rows dropped in the current over-cap episode.
    full_episode: u64,
    /// A cap or `max_age` sweep stopped at its batch size: more to do at once.
    sweep_more: bool,
    /// A read met a damaged page: the file is rebuilt after the read is answered.
    damaged: bool,
    last_rebuild: Option<Instant>,
    last_checkpoint: Instant,
    /// Something was committed since the last checkpoint (an idle store is not touched: no
    /// SD-card writes while online).
    wal_dirty: bool,
}

/// How a read ended.
enum ReadEnd {
    /// Fewer rows than asked: nothing more after them.
    Short,
    Full,
}

impl Worker {
    fn run(mut self, requests: std_mpsc::Receiver<StoreRequest>) {
        let mut last_sweep = Instant::now();
        loop {
            self.stats.heartbeat.beat();
            if test_stall_hook() {
                // Stuck as a thread in uninterruptible I/O would be (see `test_stall_hook`).
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            let mut wait = match self.tx_started {
                Some(t) => self.config.commit_interval.saturating_sub(t.elapsed()),
                None => crate::health::TICK,
            };
            if let Some(at) = self.write_retry_at.filter(|_| !self.unsaved.is_empty()) {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            if self.sweep_more {
                wait = Duration::ZERO;
            }
            match requests.recv_timeout(wait) {
                Ok(request) => {
                    if let StoreRequest::Append(m) | StoreRequest::Prepend(m) = &request {
                        let bytes = m.iter().map(NewMessage::bytes).sum();
                        sub(&self.queued_bytes, bytes);
                    }
                    self.handle(request);
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.damaged {
                // After the read that found it was answered.
                self.damaged = false;
                self.rebuild_once();
            }
            if self.write_due() && self.has_unwritten() {
                self.write_unsaved();
            }
            if self.tx_writes >= self.config.commit_every
                || self
                    .tx_started
                    .is_some_and(|t| t.elapsed() >= self.config.commit_interval)
            {
                self.commit();
            }
            if self.sweep_more {
                self.sweep_more = false;
                if self.bytes > self.target_bytes() {
                    self.enforce_cap();
                }
                self.sweep_age();
                self.commit();
            } else if last_sweep.elapsed() >= Duration::from_secs(1) {
                last_sweep = Instant::now();
                self.sweep_age();
            }
            if self.wal_dirty && !self.in_tx && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                self.checkpoint();
            }
        }
        self.commit();
        if self.has_unwritten() {
            self.write_unsaved();
        }
        if !self.unsaved.is_empty() {
            tracing::error!(
                lost = self.unsaved.len(),
                "store stopping with messages it could not write (disk full?): they are lost"
            );
        }
        self.checkpoint();
    }

    fn handle(&mut self, request: StoreRequest) {
        match request {
            StoreRequest::Append(messages) => self.insert(messages, false),
            StoreRequest::Prepend(messages) => self.insert(messages, true),
            StoreRequest::Delete(ids) => self.delete(&ids),
            StoreRequest::Read {
                after,
                limit,
                reply,
            } => {
                let rows = self.read(after, limit).map_err(|e| e.to_string());
                let _ = reply.send(rows);
            }
            StoreRequest::Flush { reply } => {
                self.commit();
                if self.has_unwritten() {
                    self.write_unsaved();
                }
                self.checkpoint();
                let _ = reply.send(());
            }
        }
    }

    fn begin(&mut self) -> rusqlite::Result<()> {
        if !self.in_tx {
            self.db.execute_batch("BEGIN")?;
            self.in_tx = true;
            self.tx_started = Some(Instant::now());
        }
        Ok(())
    }

    fn has_unwritten(&self) -> bool {
        !self.unsaved.is_empty() || !self.pending_deletes.is_empty()
    }

    fn write_due(&self) -> bool {
        self.write_retry_at.is_none_or(|t| Instant::now() >= t)
    }

    fn insert(&mut self, messages: Vec<NewMessage>, front: bool) {
        if messages.is_empty() {
            return;
        }
        let n = messages.len() as i64;
        // Ids come from our own counter, never from SQLite: a rolled-back transaction would
        // let SQLite hand out the same ids again, and the link may already hold (and later
        // delete) rows under them.
        let first = if front {
            let min: Option<i64> = self
                .db
                .query_row("SELECT MIN(id) FROM outbox", [], |r| r.get(0))
                .unwrap_or(None);
            let lowest = match (min, self.unsaved.keys().next()) {
                (Some(a), Some(&b)) => Some(a.min(b)),
                (a, b) => a.or(b.copied()),
            };
            // Ids a damaged or foreign file left at the bottom of the range: at the end then.
            lowest.map_or(self.next_id, |l| l.checked_sub(n).unwrap_or(self.next_id))
        } else {
            self.next_id
        };
        if first == self.next_id {
            let Some(next) = self.next_id.checked_add(n) else {
                // Only a damaged or foreign file has ids up there; never wrap around.
                tracing::error!(
                    dropped = n,
                    "store: row ids exhausted (a row near id 2^63 in the file): messages dropped; move the store file aside"
                );
                self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                return;
            };
            self.next_id = next;
        }
        let rows: Vec<StoredMessage> = messages
            .into_iter()
            .enumerate()
            .map(|(i, message)| StoredMessage {
                id: first + i as i64,
                message,
            })
            .collect();
        self.stats.appended.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.backlog.fetch_add(n as u64, Ordering::Relaxed);
        if !self.unsaved.is_empty() && self.write_due() {
            self.write_unsaved();
        }
        if !self.unsaved.is_empty() || !self.write_due() {
            // Behind what could not be written: in id order, written with it.
            self.keep_unsaved(rows);
            return;
        }
        match self.write_rows(&rows) {
            Ok(added) => {
                self.tx_writes += rows.len();
                self.tx_messages.extend(rows);
                self.bytes += added;
                self.publish_bytes();
                if self.bytes > self.config.max_bytes {
                    self.enforce_cap();
                }
            }
            Err(e) => self.fail(e, rows),
        }
    }

    /// Inserts rows under their ids in the open transaction; the bytes they count.
    fn write_rows(&mut self, rows: &[StoredMessage]) -> rusqlite::Result<u64> {
        self.begin()?;
        let mut stmt = self.db.prepare_cached(
            "INSERT INTO outbox (id, topic, payload, qos, retain, created, bytes, flags)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut added = 0u64;
        for row in rows {
            let m = &row.message;
            let bytes = m.bytes();
            stmt.execute(params![
                row.id,
                m.topic,
                m.payload,
                m.qos as u8,
                m.retain,
                m.created,
                bytes as i64,
                m.flags()
            ])?;
            added += bytes;
        }
        Ok(added)
    }

    /// Keeps messages that could not be written, dropping the oldest of them beyond
    /// [`UNSAVED_MAX_BYTES`] (the cap policy, applied to what memory holds).
    fn keep_unsaved(&mut self, rows: Vec<StoredMessage>) {
        for row in rows {
            self.unsaved_bytes += row.message.bytes();
            self.unsaved.insert(row.id, row.message);
        }
        let limit = self.unsaved_limit();
        let mut dropped = 0u64;
        while self.unsaved_bytes > limit {
            let Some((_, m)) = self.unsaved.pop_first() else {
                break;
            };
            self.unsaved_bytes = self.unsaved_bytes.saturating_sub(m.bytes());
            dropped += 1;
        }
        if dropped > 0 {
            if self.unsaved_dropped == 0 {
                tracing::warn!(
                    limit_bytes = limit,
                    "store cannot write and its memory for unwritten messages is full: dropping the oldest of them (policy drop_oldest)"
                );
            }
            self.unsaved_dropped += dropped;
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            sub(&self.stats.backlog, dropped);
        }
        self.publish_bytes();
    }

    fn unsaved_limit(&self) -> u64 {
        UNSAVED_MAX_BYTES.min(self.config.max_bytes)
    }

    /// Writes what failed before (deletes, then messages) in one transaction, committed at
    /// once so that success is known.
    fn write_unsaved(&mut self) {
        let rows: Vec<StoredMessage> = std::mem::take(&mut self.unsaved)
            .into_iter()
            .map(|(id, message)| StoredMessage { id, message })
            .collect();
        let count = rows.len();
        self.unsaved_bytes = 0;
        let deletes = std::mem::take(&mut self.pending_deletes);
        let result = self.delete_runs(&deletes).and_then(|(n, freed)| {
            let added = self.write_rows(&rows)?;
            Ok((n, freed, added))
        });
        match result {
            Ok((deleted, freed, added)) => {
                self.tx_deletes.extend(deletes);
                self.tx_messages.extend(rows);
                self.bytes = (self.bytes + added).saturating_sub(freed);
                sub(&self.stats.backlog, deleted);
                self.stats.deleted.fetch_add(deleted, Ordering::Relaxed);
                let failures = self.stats.write_failures.load(Ordering::Relaxed);
                self.commit();
                if self.stats.write_failures.load(Ordering::Relaxed) != failures {
                    return; // the commit failed: everything went back
                }
                if count > 0 {
                    tracing::debug!(written = count, "messages kept in memory are stored");
                }
                if self.bytes > self.config.max_bytes {
                    self.enforce_cap();
                }
            }
            Err(e) => {
                self.pending_deletes.extend(deletes);
                self.fail(e, rows);
            }
        }
    }

    /// A write failed: roll back; what the transaction held is kept in memory, in order,
    /// and written again after a back-off.
    fn fail(&mut self, e: rusqlite::Error, rows: Vec<StoredMessage>) {
        if self.in_tx {
            let _ = self.db.execute_batch("ROLLBACK");
        }
        self.in_tx = false;
        self.tx_started = None;
        self.tx_writes = 0;
        let mut back = std::mem::take(&mut self.tx_messages);
        back.extend(rows);
        self.pending_deletes.append(&mut self.tx_deletes);
        self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        let first = self.write_retry_at.is_none();
        self.write_backoff = (self.write_backoff * 2).clamp(WRITE_RETRY_MIN, WRITE_RETRY_MAX);
        self.write_retry_at = Some(Instant::now() + self.write_backoff);
        if is_corrupt(&e) {
            self.damaged = true;
        }
        if first {
            tracing::error!(
                error = %e,
                kept_in_memory = back.len() + self.unsaved.len(),
                limit_bytes = self.unsaved_limit(),
                "store write failed (disk full?): keeping new messages in memory, in order, and retrying"
            );
            let _ = self.events.try_send(StoreEvent::WriteFailed {
                error: e.to_string(),
            });
        }
        self.keep_unsaved(back);
        if self.load_levels() {
            // The levels now count the file only; what memory holds is part of the backlog.
            self.stats
                .backlog
                .fetch_add(self.unsaved.len() as u64, Ordering::Relaxed);
        }
    }

    fn delete(&mut self, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        // Acknowledgements come in order, so the ids form a few contiguous runs; each run is
        // one range delete (every id inside a run was acknowledged).
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut from_memory = 0u64;
        if !self.unsaved.is_empty() {
            sorted.retain(|id| match self.unsaved.remove(id) {
                Some(m) => {
                    self.unsaved_bytes = self.unsaved_bytes.saturating_sub(m.bytes());
                    from_memory += 1;
                    false
                }
                None => true,
            });
        }
        let mut runs: Vec<(i64, i64)> = Vec::new();
        for id in sorted {
            match runs.last_mut() {
                Some((_, hi)) if *hi + 1 == id => *hi = id,
                _ => runs.push((id, id)),
            }
        }
        self.stats.deleted.fetch_add(from_memory, Ordering::Relaxed);
        sub(&self.stats.backlog, from_memory);
        if !self.write_due() {
            // Applied with the next write.
            self.pending_deletes.extend(runs);
            self.publish_bytes();
            return;
        }
        match self.delete_runs(&runs) {
            Ok((rows, freed)) => {
                self.tx_deletes.extend(runs);
                self.tx_writes += ids.len();
                self.bytes = self.bytes.saturating_sub(freed);
                self.stats.deleted.fetch_add(rows, Ordering::Relaxed);
                sub(&self.stats.backlog, rows);
                self.publish_bytes();
                self.end_full_episode();
            }
            Err(e) => {
                self.pending_deletes.extend(runs);
                self.fail(e, Vec::new());
            }
        }
    }

    /// Deletes id runs in the open transaction; the rows and bytes they held.
    fn delete_runs(&mut self, runs: &[(i64, i64)]) -> rusqlite::Result<(u64, u64)> {
        if runs.is_empty() {
            return Ok((0, 0));
        }
        self.begin()?;
        let mut measure = self.db.prepare_cached(
            "SELECT COUNT(*), COALESCE(SUM(MAX(bytes, 0)), 0) FROM outbox WHERE id BETWEEN ?1 AND ?2",
        )?;
        let mut delete = self
            .db
            .prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2")?;
        let (mut rows, mut freed) = (0u64, 0u64);
        for (lo, hi) in runs {
            let (n, bytes): (i64, i64) =
                measure.query_row(params![lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))?;
            if n > 0 {
                delete.execute(params![lo, hi])?;
                rows += n as u64;
                freed += bytes as u64;
            }
        }
        Ok((rows, freed))
    }

    fn publish_bytes(&self) {
        self.stats
            .backlog_bytes
            .store(self.bytes + self.unsaved_bytes, Ordering::Relaxed);
    }

    /// Up to `limit` deliverable messages after `after`, from the file and from memory, in id
    /// order. Rows that cannot be delivered are taken out (counted, one line per read); a
    /// damaged page is read around and marks the file for a rebuild.
    fn read(&mut self, after: i64, limit: usize) -> rusqlite::Result<Vec<StoredMessage>> {
        let mut rows = Vec::with_capacity(limit.min(4096));
        let mut bad: Vec<(i64, &'static str)> = Vec::new();
        let mut cursor = after;
        while rows.len() < limit {
            match self.read_page(&mut cursor, limit - rows.len(), &mut rows, &mut bad) {
                Ok(ReadEnd::Short) => break,
                Ok(ReadEnd::Full) => {}
                Err(e) if is_corrupt(&e) => {
                    if self
                        .last_rebuild
                        .is_none_or(|t| t.elapsed() >= REBUILD_EVERY)
                    {
                        tracing::error!(error = %e, after = cursor, "store: damaged page found while reading; reading around it");
                    }
                    self.damaged = true;
                    match self.skip_damage(cursor) {
                        Some(next) => cursor = next,
                        None => break,
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if !bad.is_empty() {
            self.take_out_unreadable(&bad);
        }
        if !self.unsaved.is_empty() {
            rows.extend(
                self.unsaved
                    .range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(&id, m)| StoredMessage {
                        id,
                        message: m.clone(),
                    }),
            );
            rows.sort_unstable_by_key(|r| r.id);
            rows.truncate(limit);
        }
        Ok(rows)
    }

    /// Reads rows after `*cursor`, moving it past every row seen (good or bad).
    fn read_page(
        &mut self,
        cursor: &mut i64,
        limit: usize,
        rows: &mut Vec<StoredMessage>,
        bad: &mut Vec<(i64, &'static str)>,
    ) -> rusqlite::Result<ReadEnd> {
        let mut stmt = self.db.prepare_cached(
            "SELECT id, topic, payload, qos, retain, created, flags FROM outbox
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let mut q = stmt.query(params![*cursor, limit as i64])?;
        let mut seen = 0usize;
        while let Some(r) = q.next()? {
            seen += 1;
            let id: i64 = r.get(0)?;
            *cursor = id;
            match decode_row(r) {
                Ok(message) => rows.push(StoredMessage { id, message }),
                Err(why) => bad.push((id, why)),
            }
        }
        Ok(if seen < limit {
            ReadEnd::Short
        } else {
            ReadEnd::Full
        })
    }

    /// Whether the first row after `after` can be read in full.
    fn probe(&mut self, after: i64) -> bool {
        let mut rows = Vec::new();
        let mut bad = Vec::new();
        let mut c = after;
        self.read_page(&mut c, 1, &mut rows, &mut bad).is_ok()
    }

    /// The smallest cursor past `after` from which reading works again (the damaged range
    /// is what lies between); `None` when nothing after it can be read.
    fn skip_damage(&mut self, after: i64) -> Option<i64> {
        // Double the step until a read works, then narrow down to the first cursor that works.
        let at = |step: i128| (i128::from(after) + step).min(i128::from(i64::MAX)) as i64;
        let mut step: i128 = 1;
        let mut bad = after;
        let good = loop {
            let p = at(step);
            if self.probe(p) {
                break p;
            }
            if p == i64::MAX {
                return None;
            }
            bad = p;
            step *= 2;
        };
        let (mut lo, mut hi) = (bad, good);
        while i128::from(hi) - i128::from(lo) > 1 {
            let mid = ((i128::from(lo) + i128::from(hi)) / 2) as i64;
            if self.probe(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    fn take_out_unreadable(&mut self, bad: &[(i64, &'static str)]) {
        let result = self.begin().and_then(|()| {
            let mut del = self.db.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            let mut freed = 0u64;
            for (id, _) in bad {
                let bytes: i64 = self
                    .db
                    .query_row(
                        "SELECT MAX(bytes, 0) FROM outbox WHERE id = ?1",
                        params![id],
                        |r| r.get(0),
                    )
                    .unwrap_or(0);
                del.execute(params![id])?;
                freed += bytes as u64;
            }
            Ok(freed)
        });
        let n = bad.len() as u64;
        tracing::error!(
            rows = n,
            first_id = bad[0].0,
            reason = bad[0].1,
            "store: rows that cannot be delivered taken out of the outbox"
        );
        self.stats.unreadable.fetch_add(n, Ordering::Relaxed);
        match result {
            Ok(freed) => {
                self.tx_writes += bad.len();
                self.bytes = self.bytes.saturating_sub(freed);
                sub(&self.stats.backlog, n);
                self.publish_bytes();
            }
            // They stay in the file, behind the link's cursor: never read again this run.
            Err(e) => self.fail(e, Vec::new()),
        }
    }

    /// Rebuilds a damaged file (at most once per [`REBUILD_EVERY`]): every readable row is
    /// copied to a fresh file, the damaged one is moved aside, the fresh one takes its place.
    fn rebuild_once(&mut self) {
        if self
            .last_rebuild
            .is_some_and(|t| t.elapsed() < REBUILD_EVERY)
        {
            return;
        }
        self.last_rebuild = Some(Instant::now());
        match self.rebuild() {
            Ok((copied, lost, aside)) => {
                self.stats.unreadable.fetch_add(lost, Ordering::Relaxed);
                tracing::error!(
                    store = %self.path.display(),
                    moved_to = %aside.display(),
                    kept = copied,
                    lost,
                    "store file was damaged: rebuilt from every readable row"
                );
            }
            Err(e) => tracing::error!(
                store = %self.path.display(),
                error = %e,
                "store file is damaged and could not be rebuilt: reading around the damage"
            ),
        }
    }

    fn rebuild(&mut self) -> Result<(u64, u64, PathBuf), String> {
        let fresh = PathBuf::from(format!("{}.rebuild", self.path.display()));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", fresh.display()));
        }
        let rows_before = self
            .stats
            .backlog
            .load(Ordering::Relaxed)
            .saturating_sub(self.unsaved.len() as u64);
        let mut out = match open_checked(&fresh, self.config.synchronous) {
            Ok(c) => c,
            Err(OpenFailure::Corrupt(e) | OpenFailure::Other(e)) => return Err(e),
        };
        let mut copied = 0u64;
        let mut cursor = i64::MIN;
        let copy = (|| -> Result<(), String> {
            let tx = out.transaction().map_err(|e| e.to_string())?;
            loop {
                self.stats.heartbeat.beat();
                let page = self
                    .read_file_only(cursor, 1000)
                    .map_err(|e| e.to_string())?;
                let Some(last) = page.last() else { break };
                cursor = last.id;
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO outbox (id, topic, payload, qos, retain, created, bytes, flags)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .map_err(|e| e.to_string())?;
                for row in &page {
                    let m = &row.message;
                    stmt.execute(params![
                        row.id,
                        m.topic,
                        m.payload,
                        m.qos as u8,
                        m.retain,
                        m.created,
                        m.bytes() as i64,
                        m.flags()
                    ])
                    .map_err(|e| e.to_string())?;
                    copied += 1;
                }
            }
            tx.commit().map_err(|e| e.to_string())
        })();
        if let Err(e) = copy {
            drop(out);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", fresh.display()));
            }
            return Err(format!("copying the readable rows: {e}"));
        }
        let _ = out.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        drop(out);
        // The old connection goes (its open transaction was copied with the rest).
        let old = std::mem::replace(
            &mut self.db,
            Connection::open_in_memory().map_err(|e| e.to_string())?,
        );
        drop(old);
        self.in_tx = false;
        self.tx_started = None;
        self.tx_writes = 0;
        self.tx_messages.clear();
        self.tx_deletes.clear();
        let aside = move_aside(&self.path).map_err(|e| e.to_string());
        let renamed = std::fs::rename(&fresh, &self.path).map_err(|e| e.to_string());
        self.db = match open_checked(&self.path, self.config.synchronous) {
            Ok(c) => c,
            Err(OpenFailure::Corrupt(e) | OpenFailure::Other(e)) => {
                return Err(format!("reopening the rebuilt store: {e}"))
            }
        };
        let aside = aside?;
        renamed?;
        if self.load_levels() {
            self.stats
                .backlog
                .fetch_add(self.unsaved.len() as u64, Ordering::Relaxed);
        }
        self.publish_bytes();
        Ok((copied, rows_before.saturating_sub(copied), aside))
    }

    /// Rows of the file only (not of memory), reading around damage and skipping bad rows.
    fn read_file_only(&mut self, after: i64, limit: usize) -> rusqlite::Result<Vec<StoredMessage>> {
        let mut rows = Vec::new();
        let mut bad = Vec::new();
        let mut cursor = after;
        while rows.len() < limit {
            match self.read_page(&mut cursor, limit - rows.len(), &mut rows, &mut bad) {
                Ok(ReadEnd::Short) => break,
                Ok(ReadEnd::Full) => {}
                Err(e) if is_corrupt(&e) => match self.skip_damage(cursor) {
                    Some(next) => cursor = next,
                    None => break,
                },
                Err(e) => return Err(e),
            }
        }
        self.stats
            .unreadable
            .fetch_add(bad.len() as u64, Ordering::Relaxed);
        Ok(rows)
    }

    fn commit(&mut self) {
        if !self.in_tx {
            return;
        }
        match self.db.execute_batch("COMMIT") {
            Ok(()) => {
                self.in_tx = false;
                self.tx_started = None;
                self.tx_writes = 0;
                self.tx_messages.clear();
                self.tx_deletes.clear();
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.wal_dirty = true;
                self.refresh_oldest();
                if !self.has_unwritten() && self.write_retry_at.take().is_some() {
                    tracing::warn!(
                        dropped = self.unsaved_dropped,
                        "store writable again: messages kept in memory are stored"
                    );
                    self.write_backoff = Duration::ZERO;
                    self.unsaved_dropped = 0;
                }
            }
            Err(e) => self.fail(e, Vec::new()),
        }
    }

    fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        self.wal_dirty = false;
        if let Err(e) = self
            .db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::debug!(error = %e, "store checkpoint failed");
        }
    }

    /// Reads the levels from the file (at start and after a rollback); `false` when the file
    /// could not tell (the levels are left as they were).
    fn load_levels(&mut self) -> bool {
        let max_id: i64 = self
            .db
            .query_row("SELECT COALESCE(MAX(id), 0) FROM outbox", [], |r| r.get(0))
            .unwrap_or(0);
        let seq: i64 = self
            .db
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'",
                [],
                |r| r.get(0),
            )
            .unwrap_or(0);
        self.next_id = self.next_id.max(max_id.max(seq).saturating_add(1));
        // A negative `bytes` (a damaged or foreign row) must not wrap the level.
        let levels = self.db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(MAX(bytes, 0)), 0) FROM outbox",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        );
        self.refresh_oldest();
        match levels {
            Ok((rows, bytes)) => {
                self.bytes = bytes as u64;
                self.stats.backlog.store(rows as u64, Ordering::Relaxed);
                self.publish_bytes();
                true
            }
            Err(_) => false,
        }
    }

    fn refresh_oldest(&mut self) {
        let oldest: Option<i64> = self
            .db
            .query_row("SELECT created FROM outbox ORDER BY id LIMIT 1", [], |r| {
                r.get(0)
            })
            .ok();
        self.stats
            .oldest_created
            .store(oldest.unwrap_or(0), Ordering::Relaxed);
    }

    fn target_bytes(&self) -> u64 {
        self.config.max_bytes - self.config.max_bytes / 20
    }

    /// Drops the oldest rows until the stored bytes are back under the cap, at most
    /// [`SWEEP_BATCH`] rows per transaction (the rest in the next turns).
    fn enforce_cap(&mut self) {
        let to_free = self.bytes.saturating_sub(self.target_bytes());
        let result = self.begin().and_then(|()| {
            let mut freed = 0u64;
            let mut last_id = None;
            let mut rows = 0u64;
            {
                let mut stmt = self
                    .db
                    .prepare_cached("SELECT id, MAX(bytes, 0) FROM outbox ORDER BY id LIMIT ?1")?;
                let mut q = stmt.query(params![SWEEP_BATCH as i64])?;
                while let Some(row) = q.next()? {
                    freed += row.get::<_, i64>(1)? as u64;
                    last_id = Some(row.get::<_, i64>(0)?);
                    rows += 1;
                    if freed >= to_free {
                        break;
                    }
                }
            }
            if let Some(last) = last_id {
                self.db
                    .execute("DELETE FROM outbox WHERE id <= ?1", params![last])?;
            }
            Ok((rows, freed))
        });
        match result {
            Ok((rows, freed)) => {
                self.bytes = self.bytes.saturating_sub(freed);
                self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                sub(&self.stats.backlog, rows);
                self.publish_bytes();
                if self.full_episode == 0 && rows > 0 {
                    tracing::warn!(
                        max_bytes = self.config.max_bytes,
                        "store full: dropping the oldest messages (policy drop_oldest)"
                    );
                }
                self.full_episode += rows;
                self.tx_writes += rows as usize;
                if freed < to_free && rows == SWEEP_BATCH as u64 {
                    self.sweep_more = true;
                }
            }
            Err(e) => self.fail(e, Vec::new()),
        }
    }

    /// Ends a full-store episode once there is room again, with the count of that episode.
    fn end_full_episode(&mut self) {
        if self.full_episode > 0 && self.bytes < self.config.max_bytes * 9 / 10 {
            tracing::warn!(
                dropped = self.full_episode,
                "store no longer full; messages dropped in that episode"
            );
            self.full_episode = 0;
        }
    }

    /// Drops rows older than `max_age` (at most [`SWEEP_BATCH`] per transaction), and ends a
    /// full-store episode when there is room.
    fn sweep_age(&mut self) {
        self.end_full_episode();
        let Some(max_age) = self.config.max_age else {
            return;
        };
        if !self.write_due() {
            return;
        }
        let cutoff = now_ms() - max_age.as_millis() as i64;
        let result = self.begin().and_then(|()| {
            let (rows, bytes): (i64, i64) = self.db.query_row(
                "SELECT COUNT(*), COALESCE(SUM(MAX(bytes, 0)), 0) FROM (
                     SELECT bytes FROM outbox WHERE created < ?1 ORDER BY id LIMIT ?2)",
                params![cutoff, SWEEP_BATCH as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if rows > 0 {
                self.db.execute(
                    "DELETE FROM outbox WHERE id IN (
                         SELECT id FROM outbox WHERE created < ?1 ORDER BY id LIMIT ?2)",
                    params![cutoff, SWEEP_BATCH as i64],
                )?;
            }
            Ok((rows as u64, bytes as u64))
        });
        match result {
            Ok((rows, bytes)) => {
                if rows > 0 {
                    self.bytes = self.bytes.saturating_sub(bytes);
                    self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                    sub(&self.stats.backlog, rows);
                    self.publish_bytes();
                    tracing::warn!(dropped = rows, "store: messages older than max_age dropped");
                    self.tx_writes += rows as usize;
                    if rows == SWEEP_BATCH as u64 {
                        self.sweep_more = true;
                    }
                }
            }
            Err(e) => self.fail(e, Vec::new()),
        }
    }
}

/// SQLite found a damaged page (or a file that is not a database any more).
fn is_corrupt(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// The largest topic MQTT can carry (a two-byte length, 3.1.1 §1.5.3).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// The largest payload MQTT can carry (the remaining length's limit, 3.1.1 §2.2.3).
pub const MAX_PAYLOAD_BYTES: usize = 268_435_455;

/// A row as the link may deliver it, or why it cannot be: what the row holds is not trusted
/// (another program, an older version or a flipped bit may have written it).
fn decode_row(r: &rusqlite::Row<'_>) -> Result<NewMessage, &'static str> {
    use rusqlite::types::ValueRef;
    let topic = match r.get_ref(1).map_err(|_| "topic unreadable")? {
        ValueRef::Text(t) | ValueRef::Blob(t) => t,
        _ => return Err("topic is not text"),
    };
    let topic = std::str::from_utf8(topic).map_err(|_| "topic is not UTF-8")?;
    // MQTT 3.1.1 §4.7.3: at least one character, no NUL, no wildcards in a topic name.
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        return Err("topic empty or longer than MQTT allows");
    }
    if topic.contains(['\0', '+', '#']) {
        return Err("topic holds NUL or a wildcard");
    }
    let payload = match r.get_ref(2).map_err(|_| "payload unreadable")? {
        ValueRef::Text(p) | ValueRef::Blob(p) => p,
        ValueRef::Null => return Err("payload is NULL"),
        _ => return Err("payload is not bytes"),
    };
    if topic.len() + payload.len() > MAX_PAYLOAD_BYTES {
        return Err("payload larger than MQTT allows");
    }
    let qos = match r.get_ref(3).map_err(|_| "qos unreadable")? {
        ValueRef::Integer(0) => Qos::AtMostOnce,
        ValueRef::Integer(1) => Qos::AtLeastOnce,
        ValueRef::Integer(2) => Qos::ExactlyOnce,
        _ => return Err("qos is not 0, 1 or 2"),
    };
    let retain = match r.get_ref(4).map_err(|_| "retain unreadable")? {
        ValueRef::Integer(0) => false,
        ValueRef::Integer(1) => true,
        _ => return Err("retain is not 0 or 1"),
    };
    let created = match r.get_ref(5).map_err(|_| "created unreadable")? {
        ValueRef::Integer(c) => c,
        _ => return Err("created is not a time"),
    };
    // Damage here only loses the mark: the payload is sent as it is.
    let flags = match r.get_ref(6) {
        Ok(ValueRef::Integer(f)) if (0..512).contains(&f) => f,
        _ => 0,
    };
    Ok(NewMessage {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos,
        retain,
        created,
        kind: (flags >> 1) as u8,
        held: flags & 1 == 1,
    })
}

/// `FIELDBRIDGE_TEST_STALL_STORE=1` makes the store thread hang on its first turn, as a
/// thread stuck in I/O on a dying card would (no real file does it on demand). Compiled into
/// debug builds only.
fn test_stall_hook() -> bool {
    cfg!(debug_assertions) && std::env::var_os("FIELDBRIDGE_TEST_STALL_STORE").is_some()
}

fn sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Durability;

    fn config(max_bytes: u64) -> StoreConfig {
        StoreConfig {
            path: None,
            max_bytes,
            max_age: None,
            durability: Durability::Auto,
            spill_threshold: 10,
            commit_every: 100,
            commit_interval: Duration::from_millis(5),
            synchronous: Synchronous::Normal,
        }
    }

    fn msg(i: usize) -> NewMessage {
        NewMessage {
            topic: format!("t/{i}"),
            payload: format!("{{\"value\":{i}}}").into_bytes(),
            qos: Qos::AtLeastOnce,
            retain: false,
            created: now_ms(),
            kind: 0,
            held: false,
        }
    }

    fn read(h: &StoreHandle, after: i64, limit: usize) -> Vec<StoredMessage> {
        let (tx, rx) = oneshot::channel();
        assert!(h.send(StoreRequest::Read {
            after,
            limit,
            reply: tx
        }));
        rx.blocking_recv().expect("reply").expect("read")
    }

    fn flush(h: &StoreHandle) {
        let (tx, rx) = oneshot::channel();
        assert!(h.send(StoreRequest::Flush { reply: tx }));
        rx.blocking_recv().expect("flushed");
    }

    #[test]
    fn rows_come_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let (h, _events) = open(&config(1 << 30), &path).unwrap();
        h.send(StoreRequest::Append((0..5).map(msg).collect()));
        let rows = read(&h, i64::MIN, 10);
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0].message.topic, "t/0");
        h.send(StoreRequest::Delete(vec![rows[0].id, rows[1].id]));
        h.close();

        let (h, _events) = open(&config(1 << 30), &path).unwrap();
        let rows = read(&h, i64::MIN, 10);
        let topics: Vec<_> = rows.iter().map(|r| r.message.topic.as_str()).collect();
        assert_eq!(topics, ["t/2", "t/3", "t/4"]);
        assert_eq!(h.stats.backlog.load(Ordering::Relaxed), 3);
        h.close();
    }

    #[test]
    fn deleting_runs_of_ids_removes_exactly_those_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _e) = open(&config(1 << 30), &dir.path().join("o.db")).unwrap();
        h.send(StoreRequest::Append((0..10).map(msg).collect()));
        let ids: Vec<i64> = read(&h, i64::MIN, 10).iter().map(|r| r.id).collect();
        // Two runs and a single id, out of order, with a duplicate.
        h.send(StoreRequest::Delete(vec![
            ids[3], ids[0], ids[1], ids[2], ids[7], ids[5], ids[5],
        ]));
        let left: Vec<String> = read(&h, i64::MIN, 10)
            .into_iter()
            .map(|r| r.message.topic)
            .collect();
        assert_eq!(left, ["t/4", "t/6", "t/8", "t/9"]);
        assert_eq!(h.stats.backlog.load(Ordering::Relaxed), 4);
        assert_eq!(
            h.stats.backlog_bytes.load(Ordering::Relaxed),
            4 * msg(4).bytes()
        );
        h.close();
    }

    #[test]
    fn prepended_rows_go_before_everything_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _e) = open(&config(1 << 30), &dir.path().join("o.db")).unwrap();
        h.send(StoreRequest::Append(vec![msg(3), msg(4)]));
        h.send(StoreRequest::Prepend(vec![msg(1), msg(2)]));
        let rows = read(&h, i64::MIN, 10);
        let topics: Vec<_> = rows.iter().map(|r| r.message.topic.as_str()).collect();
        assert_eq!(topics, ["t/1", "t/2", "t/3", "t/4"]);
        // The cursor keeps working across the prepended (lower) ids.
        let after_first = read(&h, rows[0].id, 10);
        assert_eq!(after_first.len(), 3);
        h.close();
    }

    #[test]
    fn ids_keep_increasing_after_the_table_was_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _e) = open(&config(1 << 30), &dir.path().join("o.db")).unwrap();
        h.send(StoreRequest::Append(vec![msg(1)]));
        let first = read(&h, i64::MIN, 1)[0].id;
        h.send(StoreRequest::Delete(vec![first]));
        flush(&h);
        h.send(StoreRequest::Append(vec![msg(2)]));
        let rows = read(&h, first, 10);
        assert_eq!(
            rows.len(),
            1,
            "a cursor at the old id still sees the new row"
        );
        assert!(rows[0].id > first);
        h.close();
    }

    #[test]
    fn over_the_cap_the_oldest_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let one = msg(0).bytes();
        // Room for about 100 messages.
        let (h, _e) = open(&config(one * 100), &dir.path().join("o.db")).unwrap();
        for chunk in 0..10 {
            h.send(StoreRequest::Append(
                (chunk * 30..chunk * 30 + 30).map(msg).collect(),
            ));
        }
        flush(&h);
        let rows = read(&h, i64::MIN, 1000);
        let dropped = h.stats.dropped.load(Ordering::Relaxed);
        assert!(rows.len() <= 100, "{} rows kept", rows.len());
        assert_eq!(rows.len() as u64 + dropped, 300);
        // The newest survive.
        assert_eq!(rows.last().unwrap().message.topic, "t/299");
        assert!(h.stats.backlog_bytes.load(Ordering::Relaxed) <= one * 100);
        h.close();
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_a_fresh_store_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        std::fs::write(&path, b"this is not a database, it is garbage ".repeat(200)).unwrap();
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        h.send(StoreRequest::Append(vec![msg(1)]));
        assert_eq!(read(&h, i64::MIN, 10).len(), 1);
        h.close();
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("outbox.db.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
    }

    #[test]
    fn messages_older_than_max_age_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(1 << 30);
        c.max_age = Some(Duration::from_secs(60));
        let (h, _e) = open(&c, &dir.path().join("o.db")).unwrap();
        let mut old = msg(1);
        old.created = now_ms() - 120_000;
        h.send(StoreRequest::Append(vec![old, msg(2)]));
        // The sweep runs about once a second; bounded wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.stats.dropped.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let rows = read(&h, i64::MIN, 10);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].message.topic, "t/2");
        h.close();
    }

    /// Every row in the store, read the way the link reads it (in pages after a cursor).
    fn read_all(h: &StoreHandle) -> Vec<StoredMessage> {
        let mut all: Vec<StoredMessage> = Vec::new();
        let mut cursor = i64::MIN;
        loop {
            let page = read(h, cursor, 500);
            let Some(last) = page.last() else { break };
            cursor = last.id;
            all.extend(page);
        }
        all
    }

    fn topic_numbers(rows: &[StoredMessage]) -> Vec<usize> {
        rows.iter()
            .map(|r| r.message.topic[2..].parse().expect("t/N"))
            .collect()
    }

    #[test]
    fn rows_that_cannot_be_delivered_are_taken_out_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        h.send(StoreRequest::Append((0..8).map(msg).collect()));
        flush(&h);
        let ids: Vec<i64> = read(&h, i64::MIN, 10).iter().map(|r| r.id).collect();
        // What another program, an older version or a flipped bit could leave in a row.
        let other = Connection::open(&path).unwrap();
        let damage = [
            "UPDATE outbox SET topic = CAST(x'74ff2f31' AS TEXT) WHERE id = ?1",
            "UPDATE outbox SET qos = 7 WHERE id = ?1",
            "UPDATE outbox SET topic = '' WHERE id = ?1",
            "UPDATE outbox SET topic = 't/+/x' WHERE id = ?1",
            "UPDATE outbox SET topic = printf('%.70000c', 'a') WHERE id = ?1",
            "UPDATE outbox SET payload = 'text, not a blob', bytes = -5 WHERE id = ?1",
        ];
        for (i, sql) in damage.iter().enumerate() {
            other.execute(sql, params![ids[i + 1]]).unwrap();
        }
        drop(other);
        let rows = read_all(&h);
        // A payload stored as text is still its bytes; everything else listed is unreadable.
        assert_eq!(topic_numbers(&rows), [0, 6, 7]);
        assert_eq!(h.stats.unreadable.load(Ordering::Relaxed), 5);
        assert_eq!(h.stats.backlog.load(Ordering::Relaxed), 3);
        flush(&h);
        let (left, bytes, _) = inspect(&path).unwrap();
        assert_eq!(left, 3, "unreadable rows leave the outbox");
        // The row that claims -5 bytes counts as 0, for `status` too.
        assert_eq!(bytes, msg(0).bytes() + msg(7).bytes());
        h.close();
    }

    /// Overwrites the table-leaf page of the outbox nearest the middle of the file with
    /// garbage; returns how many pages the file has.
    fn corrupt_a_leaf_page(path: &Path) -> usize {
        use std::io::{Seek, SeekFrom, Write};
        let bytes = std::fs::read(path).unwrap();
        let page = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
        let pages = bytes.len() / page;
        let leaf = (pages / 2..pages)
            .find(|&p| bytes[p * page] == 0x0D)
            .expect("a table leaf page");
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start((leaf * page) as u64)).unwrap();
        f.write_all(&vec![0xA5; page]).unwrap();
        f.sync_all().unwrap();
        pages
    }

    #[test]
    fn corruption_found_after_open_is_read_around_and_the_store_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        let n = 20_000;
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            h.send(StoreRequest::Append(
                chunk.iter().map(|&i| msg(i)).collect(),
            ));
        }
        flush(&h);
        // Found after the start-up check: the store is running when the page goes bad.
        corrupt_a_leaf_page(&path);
        let rows = read_all(&h);
        let got = topic_numbers(&rows);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
        // One page holds a few dozen of these rows: only those are lost.
        assert!(got.len() >= n - 100, "{} of {n} rows read", got.len());
        assert!(h.stats.unreadable.load(Ordering::Relaxed) >= (n - got.len()) as u64);
        // The store goes on, in a rebuilt file; the damaged one is kept aside for a post-mortem.
        h.send(StoreRequest::Append(vec![msg(n)]));
        let after = read(&h, rows.last().unwrap().id, 10);
        assert_eq!(topic_numbers(&after), [n]);
        h.close();
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .count();
        assert_eq!(aside, 1);
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        assert_eq!(
            read_all(&h).len(),
            got.len() + 1,
            "the rebuilt file holds them all"
        );
        h.close();
    }

    /// A tmpfs of `size` mounted on a fresh directory (tests run as root); `None` when this
    /// process may not mount.
    pub(crate) struct SmallFs {
        dir: tempfile::TempDir,
    }

    impl SmallFs {
        pub(crate) fn mount(size: &str) -> Option<SmallFs> {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here (tests need root for the disk-full case)"
                );
                return None;
            }
            Some(SmallFs { dir })
        }

        pub(crate) fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Fills the filesystem to the last byte; returns the filler's path.
        pub(crate) fn fill(&self) -> PathBuf {
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

    #[test]
    fn after_a_failed_write_rows_keep_their_order_and_are_stored_once_space_returns() {
        let Some(fs) = SmallFs::mount("2m") else {
            return;
        };
        let path = fs.path().join("o.db");
        let mut c = config(1 << 30);
        c.commit_every = 10;
        let (h, _events) = open(&c, &path).unwrap();
        h.send(StoreRequest::Append((0..50).map(msg).collect()));
        flush(&h);
        // The link has read (and holds) the first rows; the others wait in the store.
        let first = read(&h, i64::MIN, 20);
        let filler = fs.fill();
        for i in 50..150 {
            h.send(StoreRequest::Append(vec![msg(i)]));
        }
        flush(&h);
        assert!(
            h.stats.write_failures.load(Ordering::Relaxed) > 0,
            "the disk was full"
        );
        // Reads still see every message, in the order they came.
        let rest = read_all_after(&h, first.last().unwrap().id);
        assert_eq!(topic_numbers(&rest), (20..150).collect::<Vec<_>>());
        std::fs::remove_file(filler).unwrap();
        h.send(StoreRequest::Append(vec![msg(150)]));
        flush(&h);
        h.close();
        let (h, _e) = open(&c, &path).unwrap();
        assert_eq!(topic_numbers(&read_all(&h)), (0..151).collect::<Vec<_>>());
        h.close();
    }

    fn read_all_after(h: &StoreHandle, mut cursor: i64) -> Vec<StoredMessage> {
        let mut all: Vec<StoredMessage> = Vec::new();
        loop {
            let page = read(h, cursor, 500);
            let Some(last) = page.last() else { break };
            cursor = last.id;
            all.extend(page);
        }
        all
    }

    #[test]
    fn a_store_thread_that_is_behind_hands_requests_back_instead_of_blocking() {
        // A handle whose thread takes nothing, as when it is stuck in I/O.
        let (tx, _rx) = std_mpsc::sync_channel(REQUEST_QUEUE);
        let h = StoreHandle {
            requests: tx,
            queued_bytes: Arc::new(AtomicU64::new(0)),
            stats: Arc::new(StoreStats::default()),
            thread: None,
        };
        let big = NewMessage {
            payload: vec![0; QUEUED_BYTES_MAX as usize],
            ..msg(0)
        };
        match h.try_send(StoreRequest::Append(vec![big])) {
            Err(TrySendError::Full(StoreRequest::Append(back))) => assert_eq!(back.len(), 1),
            other => panic!("an append over the byte budget must come back: {other:?}"),
        }
        for _ in 0..REQUEST_QUEUE {
            assert!(h.try_send(StoreRequest::Delete(vec![1])).is_ok());
        }
        assert!(matches!(
            h.try_send(StoreRequest::Append(vec![msg(1)])),
            Err(TrySendError::Full(StoreRequest::Append(_)))
        ));
        drop(_rx);
        assert!(matches!(
            h.try_send(StoreRequest::Delete(vec![1])),
            Err(TrySendError::Gone(_))
        ));
    }

    /// A store written before the `flags` column existed opens, gets the column, and its
    /// rows come back unmarked (sent as they are); new rows keep their kind and held flag.
    #[test]
    fn a_store_from_before_flags_gets_the_column_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                topic TEXT NOT NULL,
                payload BLOB NOT NULL,
                qos INTEGER NOT NULL,
                retain INTEGER NOT NULL,
                created INTEGER NOT NULL,
                bytes INTEGER NOT NULL
            );
            INSERT INTO outbox (topic, payload, qos, retain, created, bytes)
                VALUES ('t/old', '{\"buffered\":true,\"value\":1}', 1, 0, 1700000000000, 60);",
        )
        .unwrap();
        drop(old);
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        let marked = NewMessage {
            kind: 3,
            held: true,
            ..msg(2)
        };
        h.send(StoreRequest::Append(vec![marked.clone()]));
        let rows = read_all(&h);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].message.topic, "t/old");
        assert_eq!(rows[0].message.payload, br#"{"buffered":true,"value":1}"#);
        assert_eq!((rows[0].message.kind, rows[0].message.held), (0, false));
        assert_eq!(rows[1].message, marked);
        h.close();
        // And again once the column is there.
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        assert_eq!(read_all(&h)[1].message, marked);
        h.close();
    }

    #[test]
    fn ids_at_the_ends_of_the_range_neither_wrap_nor_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        h.close();
        let other = Connection::open(&path).unwrap();
        for id in [i64::MIN + 1, i64::MAX - 1] {
            other
                .execute(
                    "INSERT INTO outbox (id, topic, payload, qos, retain, created, bytes)
                     VALUES (?1, 't/x', x'', 1, 0, ?2, 45)",
                    params![id, i64::MIN],
                )
                .unwrap();
        }
        drop(other);
        let (h, _e) = open(&config(1 << 30), &path).unwrap();
        h.send(StoreRequest::Prepend(vec![msg(1), msg(2)]));
        h.send(StoreRequest::Append(vec![msg(3), msg(4)]));
        let rows = read_all(&h);
        // No id is left above the top row: the messages are dropped, counted, not wrapped
        // around to the bottom (where they would overtake everything).
        assert_eq!(rows.len(), 2);
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(h.stats.dropped.load(Ordering::Relaxed), 4);
        h.close();
    }

    #[test]
    fn a_failed_write_is_announced_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let (h, mut events) = open(&config(1 << 30), &path).unwrap();
        // Make every further write fail: the table is gone.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("DROP TABLE outbox").unwrap();
        drop(other);
        h.send(StoreRequest::Append(vec![msg(7)]));
        h.send(StoreRequest::Append(vec![msg(8)]));
        flush(&h);
        let event = events.blocking_recv().expect("event");
        assert!(matches!(event, StoreEvent::WriteFailed { .. }));
        assert!(events.try_recv().is_err(), "once per episode");
        assert!(h.stats.write_failures.load(Ordering::Relaxed) >= 1);
        assert_eq!(h.stats.backlog.load(Ordering::Relaxed), 2, "kept in memory");
        h.close();
    }
}
