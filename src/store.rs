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
//!     bytes    INTEGER NOT NULL                   -- what the row counts against the cap
//! );
//! ```
//! `AUTOINCREMENT` keeps ids increasing even after the table was emptied, so the link's read
//! cursor ("after id N") never misses a row. Messages that must go *before* everything stored
//! (what was in memory at a graceful shutdown during an outage) are inserted with ids below
//! the smallest one ([`StoreRequest::Prepend`]); ids may therefore be negative.
//!
//! # Invariants
//! - Rows are delivered in id order; the link reads them with `id > cursor ORDER BY id`.
//! - A row is deleted only on PUBACK (or by the cap / `max_age` policy, counted as dropped).
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
//! - A write that fails (disk full) rolls back; the messages of that transaction are handed
//!   back to the link ([`StoreEvent::WriteFailed`]), which keeps them in memory.
//! - When the stored bytes pass `max_bytes`, the oldest rows are dropped, counted, and logged
//!   once per episode.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::model::{Qos, Store as StoreConfig, Synchronous};

/// Bytes a row counts against the cap beyond its topic and payload (ids, flags, b-tree cells).
pub const ROW_OVERHEAD: u64 = 40;

/// A message to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
    /// Wall clock ms since the epoch when it was first queued.
    pub created: i64,
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

/// What the store tells the link on its own.
#[derive(Debug)]
pub enum StoreEvent {
    /// A transaction failed (disk full, I/O error): its messages were not stored. Each comes
    /// with the row id it had in the rolled-back transaction (the link may have read it
    /// already), or `i64::MIN` when it never got one. Those ids are never used again.
    WriteFailed {
        returned: Vec<StoredMessage>,
        error: String,
    },
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
}

/// Handle to the store thread.
pub struct StoreHandle {
    requests: std_mpsc::Sender<StoreRequest>,
    pub stats: Arc<StoreStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreHandle {
    /// Sends a request; `false` if the store thread is gone.
    pub fn send(&self, request: StoreRequest) -> bool {
        self.requests.send(request).is_ok()
    }

    /// Stops the thread after it committed everything. Blocks: call from a blocking context
    /// or at the very end.
    pub fn close(mut self) {
        let (tx, _) = std_mpsc::channel();
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
) -> Result<(StoreHandle, mpsc::UnboundedReceiver<StoreEvent>), StoreError> {
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
    let (tx, rx) = std_mpsc::channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut worker = Worker {
        db,
        config: config.clone(),
        stats: stats.clone(),
        events: events_tx,
        in_tx: false,
        tx_started: None,
        tx_writes: 0,
        tx_messages: Vec::new(),
        next_id: 1,
        bytes: 0,
        full_episode: 0,
    };
    worker.load_levels();
    let thread = std::thread::Builder::new()
        .name("fieldbridge-store".into())
        // SQLite needs far less than the default 2 MiB (its deepest recursion is in the parser).
        .stack_size(256 * 1024)
        .spawn(move || worker.run(rx))
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok((
        StoreHandle {
            requests: tx,
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
            bytes INTEGER NOT NULL
        );",
    )
    .map_err(classify)?;
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
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(created) FROM outbox",
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
    config: StoreConfig,
    stats: Arc<StoreStats>,
    events: mpsc::UnboundedSender<StoreEvent>,
    in_tx: bool,
    tx_started: Option<Instant>,
    tx_writes: usize,
    /// Messages written in the open transaction, handed back if it fails.
    tx_messages: Vec<StoredMessage>,
    /// Id of the next appended row; only ever grows (see `insert`).
    next_id: i64,
    bytes: u64,
    /// Rows dropped in the current over-cap episode.
    full_episode: u64,
}

impl Worker {
    fn run(mut self, requests: std_mpsc::Receiver<StoreRequest>) {
        let mut last_sweep = Instant::now();
        loop {
            let wait = match self.tx_started {
                Some(t) => self.config.commit_interval.saturating_sub(t.elapsed()),
                None => Duration::from_secs(1),
            };
            match requests.recv_timeout(wait) {
                Ok(request) => self.handle(request),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.tx_writes >= self.config.commit_every
                || self
                    .tx_started
                    .is_some_and(|t| t.elapsed() >= self.config.commit_interval)
            {
                self.commit();
            }
            if last_sweep.elapsed() >= Duration::from_secs(1) {
                last_sweep = Instant::now();
                self.sweep_age();
            }
        }
        self.commit();
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

    fn insert(&mut self, messages: Vec<NewMessage>, front: bool) {
        if messages.is_empty() {
            return;
        }
        let n = messages.len() as i64;
        let result = self.begin().and_then(|()| {
            // Ids come from our own counter, never from SQLite: a rolled-back transaction
            // would let SQLite hand out the same ids again, and the link may already hold
            // (and later delete) rows under them.
            let min: Option<i64> = if front {
                self.db
                    .query_row("SELECT MIN(id) FROM outbox", [], |r| r.get(0))?
            } else {
                None
            };
            let first = match min {
                Some(min) => min - n,
                None => self.next_id,
            };
            let mut stmt = self.db.prepare_cached(
                "INSERT INTO outbox (id, topic, payload, qos, retain, created, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut added = 0u64;
            for (i, m) in messages.iter().enumerate() {
                let bytes = m.bytes();
                stmt.execute(params![
                    first + i as i64,
                    m.topic,
                    m.payload,
                    m.qos as u8,
                    m.retain,
                    m.created,
                    bytes as i64
                ])?;
                added += bytes;
            }
            Ok((first, added))
        });
        match result {
            Ok((first, added)) => {
                if first == self.next_id {
                    self.next_id += n;
                }
                self.tx_writes += messages.len();
                self.tx_messages
                    .extend(
                        messages
                            .into_iter()
                            .enumerate()
                            .map(|(i, message)| StoredMessage {
                                id: first + i as i64,
                                message,
                            }),
                    );
                self.bytes += added;
                self.stats.appended.fetch_add(n as u64, Ordering::Relaxed);
                self.stats.backlog.fetch_add(n as u64, Ordering::Relaxed);
                self.stats
                    .backlog_bytes
                    .store(self.bytes, Ordering::Relaxed);
                if self.bytes > self.config.max_bytes {
                    self.enforce_cap();
                }
            }
            Err(e) => {
                let mut returned = std::mem::take(&mut self.tx_messages);
                // Never written: no row id.
                returned.extend(messages.into_iter().map(|message| StoredMessage {
                    id: i64::MIN,
                    message,
                }));
                // Ids used in the failed transaction are not used again.
                self.next_id += n;
                self.fail(e, returned);
            }
        }
    }

    /// A write failed: roll back and hand the transaction's messages back.
    fn fail(&mut self, e: rusqlite::Error, returned: Vec<StoredMessage>) {
        if self.in_tx {
            let _ = self.db.execute_batch("ROLLBACK");
        }
        self.in_tx = false;
        self.tx_started = None;
        self.tx_writes = 0;
        self.tx_messages.clear();
        self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, returned = returned.len(), "store write failed; messages kept in memory");
        self.load_levels();
        let _ = self.events.send(StoreEvent::WriteFailed {
            returned,
            error: e.to_string(),
        });
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
        let mut runs: Vec<(i64, i64)> = Vec::new();
        for id in sorted {
            match runs.last_mut() {
                Some((_, hi)) if *hi + 1 == id => *hi = id,
                _ => runs.push((id, id)),
            }
        }
        let result = self.begin().and_then(|()| {
            let mut measure = self.db.prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox WHERE id BETWEEN ?1 AND ?2",
            )?;
            let mut delete = self
                .db
                .prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2")?;
            let (mut rows, mut freed) = (0u64, 0u64);
            for (lo, hi) in &runs {
                let (n, bytes): (i64, i64) =
                    measure.query_row(params![lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))?;
                if n > 0 {
                    delete.execute(params![lo, hi])?;
                    rows += n as u64;
                    freed += bytes as u64;
                }
            }
            Ok((rows, freed))
        });
        match result {
            Ok((rows, freed)) => {
                self.tx_writes += ids.len();
                self.bytes = self.bytes.saturating_sub(freed);
                self.stats.deleted.fetch_add(rows, Ordering::Relaxed);
                sub(&self.stats.backlog, rows);
                self.stats
                    .backlog_bytes
                    .store(self.bytes, Ordering::Relaxed);
                self.end_full_episode();
            }
            Err(e) => {
                let returned = std::mem::take(&mut self.tx_messages);
                self.fail(e, returned);
            }
        }
    }

    fn read(&mut self, after: i64, limit: usize) -> rusqlite::Result<Vec<StoredMessage>> {
        let mut stmt = self.db.prepare_cached(
            "SELECT id, topic, payload, qos, retain, created FROM outbox
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(StoredMessage {
                id: r.get(0)?,
                message: NewMessage {
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    qos: match r.get::<_, i64>(3)? {
                        0 => Qos::AtMostOnce,
                        2 => Qos::ExactlyOnce,
                        _ => Qos::AtLeastOnce,
                    },
                    retain: r.get(4)?,
                    created: r.get(5)?,
                },
            })
        })?;
        rows.collect()
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
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.refresh_oldest();
            }
            Err(e) => {
                let returned = std::mem::take(&mut self.tx_messages);
                self.fail(e, returned);
            }
        }
    }

    fn checkpoint(&mut self) {
        if let Err(e) = self
            .db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "store checkpoint failed");
        }
    }

    /// Reads the levels from the file (at start and after a rollback).
    fn load_levels(&mut self) {
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
        self.next_id = self.next_id.max(max_id.max(seq) + 1);
        let levels = self.db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        );
        if let Ok((rows, bytes)) = levels {
            self.bytes = bytes as u64;
            self.stats.backlog.store(rows as u64, Ordering::Relaxed);
            self.stats
                .backlog_bytes
                .store(self.bytes, Ordering::Relaxed);
        }
        self.refresh_oldest();
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

    /// Drops the oldest rows until the stored bytes are back under the cap.
    fn enforce_cap(&mut self) {
        let target = self.config.max_bytes - self.config.max_bytes / 20;
        let to_free = self.bytes.saturating_sub(target);
        let result = (|| -> rusqlite::Result<(u64, u64)> {
            let mut freed = 0u64;
            let mut last_id = None;
            let mut rows = 0u64;
            {
                let mut stmt = self
                    .db
                    .prepare_cached("SELECT id, bytes FROM outbox ORDER BY id")?;
                let mut q = stmt.query([])?;
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
        })();
        match result {
            Ok((rows, freed)) => {
                self.bytes = self.bytes.saturating_sub(freed);
                self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                sub(&self.stats.backlog, rows);
                self.stats
                    .backlog_bytes
                    .store(self.bytes, Ordering::Relaxed);
                if self.full_episode == 0 {
                    tracing::warn!(
                        max_bytes = self.config.max_bytes,
                        "store full: dropping the oldest messages (policy drop_oldest)"
                    );
                }
                self.full_episode += rows;
            }
            Err(e) => tracing::error!(error = %e, "store cap enforcement failed"),
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

    /// Drops rows older than `max_age`, and ends a full-store episode when there is room.
    fn sweep_age(&mut self) {
        self.end_full_episode();
        let Some(max_age) = self.config.max_age else {
            return;
        };
        let cutoff = now_ms() - max_age.as_millis() as i64;
        let result = self.begin().and_then(|()| {
            let (rows, bytes): (i64, i64) = self.db.query_row(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox WHERE created < ?1",
                params![cutoff],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if rows > 0 {
                self.db
                    .execute("DELETE FROM outbox WHERE created < ?1", params![cutoff])?;
            }
            Ok((rows as u64, bytes as u64))
        });
        if let Ok((rows, bytes)) = result {
            if rows > 0 {
                self.bytes = self.bytes.saturating_sub(bytes);
                self.stats.dropped.fetch_add(rows, Ordering::Relaxed);
                sub(&self.stats.backlog, rows);
                self.stats
                    .backlog_bytes
                    .store(self.bytes, Ordering::Relaxed);
                tracing::warn!(dropped = rows, "store: messages older than max_age dropped");
                self.tx_writes += rows as usize;
            }
        }
    }
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

    #[test]
    fn a_failed_write_hands_its_messages_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let (h, mut events) = open(&config(1 << 30), &path).unwrap();
        // Make every further write fail as it would on a full disk: the table is gone.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("DROP TABLE outbox").unwrap();
        drop(other);
        h.send(StoreRequest::Append(vec![msg(7)]));
        let event = events.blocking_recv().expect("event");
        let StoreEvent::WriteFailed { returned, .. } = event;
        assert_eq!(returned.len(), 1);
        assert_eq!(returned[0].message.topic, "t/7");
        h.close();
    }
}
