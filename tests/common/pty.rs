//! `PtyPair`: two pseudo-terminals joined by socat, a serial "null-modem cable" whose ends
//! are stable symlinks in a tempdir. Baud rate settings are accepted and ignored by ptys.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{find_program, kill_and_reap, read_lossy, wait_until};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running socat joining `a()` and `b()`. Dropping it kills socat (by PID).
pub struct PtyPair {
    child: Option<Child>,
    dir: TempDir,
    a: PathBuf,
    b: PathBuf,
    log: PathBuf,
}

impl PtyPair {
    /// Starts socat and waits (at most 10 s) until both symlinks exist.
    pub fn new() -> PtyPair {
        let dir = tempfile::Builder::new()
            .prefix("fieldbridge-pty-")
            .tempdir()
            .expect("tempdir");
        let mut p = PtyPair {
            child: None,
            a: dir.path().join("a"),
            b: dir.path().join("b"),
            log: dir.path().join("socat.log"),
            dir,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.a);
        let _ = std::fs::remove_file(&self.b);
        let bin = find_program("socat", &["/usr/bin/socat"]);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open socat log");
        let mut child = Command::new(bin)
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", self.a.display()))
            .arg(format!("pty,raw,echo=0,link={}", self.b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn socat");
        let (a, b) = (self.a.clone(), self.b.clone());
        // socat logs "starting data transfer loop" once both ends are set up.
        let log_path = self.log.clone();
        let ready = wait_until(START_TIMEOUT, || {
            a.exists()
                && b.exists()
                && read_lossy(&log_path).contains("starting data transfer loop")
        });
        if !ready {
            kill_and_reap(&mut child);
            panic!(
                "socat did not create {} and {} within {START_TIMEOUT:?}:\n{}",
                a.display(),
                b.display(),
                read_lossy(&self.log)
            );
        }
        self.child = Some(child);
    }

    /// One end (a symlink to /dev/pts/N).
    pub fn a(&self) -> &Path {
        &self.a
    }

    /// The other end.
    pub fn b(&self) -> &Path {
        &self.b
    }

    /// PID of socat, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills socat: both ends see the cable pulled (reads fail or hang up).
    ///
    /// The links go first. Killed by SIGKILL, socat cannot remove them, and the kernel hands
    /// the freed /dev/pts numbers to the next pty opened: a stale link would then lead whoever
    /// reopens it (a gateway, a peer) into the pty pair of another test running beside this one.
    pub fn stop(&mut self) {
        let _ = std::fs::remove_file(&self.a);
        let _ = std::fs::remove_file(&self.b);
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// Kills socat and starts a new one with the same link paths (new /dev/pts devices:
    /// whoever had the old ones open must reopen).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// socat's own log (-d -d).
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

impl Default for PtyPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.stop();
    }
}
