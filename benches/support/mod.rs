//! What both benchmark binaries (`gateway`, `outbox`) need: a process guard that stops what
//! it started by PID, load and CPU figures from /proc, a free loopback port, and the simulated
//! Modbus register table. Included by each with `#[path = "support/mod.rs"] mod support;`
//! (a subdirectory, so that cargo does not take it for a benchmark of its own).
#![allow(dead_code, unused_imports)]

use std::net::TcpListener;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

pub const LOCALHOST: &str = "127.0.0.1";

pub type Res<T> = Result<T, String>;

/// Waits (at most `max_wait`) for the 1-minute load average to drop below `max`.
pub fn wait_for_quiet(max: f64, max_wait: Duration) {
    let start = Instant::now();
    let mut said = false;
    loop {
        let load = loadavg()[0];
        if load < max {
            if said {
                println!(
                    "load {load:.2} < {max}: going on after {:.0?}",
                    start.elapsed()
                );
            }
            return;
        }
        if start.elapsed() >= max_wait {
            println!(
                "load still {load:.2} >= {max} after {max_wait:?}: measuring anyway (see the load figures)"
            );
            return;
        }
        if !said {
            println!("load {load:.2} >= {max}: waiting up to {max_wait:?} for it to drop");
            said = true;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// A child process, stopped by PID (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    what: &'static str,
}

impl Proc {
    pub fn new(child: Child, what: &'static str) -> Proc {
        Proc { child, what }
    }

    /// SIGTERM, then wait at most `within`, then SIGKILL. Returns how it ended.
    pub fn terminate(&mut self, within: Duration) -> String {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("{status} after SIGTERM, in {:.2?}", start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("did not stop within {within:?} of SIGTERM; killed")
    }

    pub fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(s)) => Err(format!(
                "{} (pid {}) exited: {s}",
                self.what,
                self.child.id()
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub fn sleep_checking(p: &mut Proc, d: Duration) -> Res<()> {
    let end = Instant::now() + d;
    loop {
        p.check_alive()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(500)));
    }
}

pub fn free_port() -> Res<u16> {
    let l = TcpListener::bind((LOCALHOST, 0)).map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Holding registers whose values change on every read: register `a` reads `seed + a`, and the
/// seed moves on after each read. Any address answers; other function codes are refused.
pub struct Registers {
    pub seed: AtomicU32,
}

impl tokio_modbus::server::Service for Registers {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        std::future::ready(match req.request {
            Request::ReadHoldingRegisters(address, count) if (1..=125).contains(&count) => {
                let seed = self.seed.fetch_add(1, Ordering::Relaxed);
                let words = (0..count)
                    .map(|i| (seed.wrapping_add(u32::from(address) + u32::from(i))) as u16)
                    .collect();
                Ok(Response::ReadHoldingRegisters(words))
            }
            Request::ReadHoldingRegisters(..) => Err(ExceptionCode::IllegalDataValue),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

pub fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "?".into(), |(_, m)| m.trim().to_owned())
}

pub fn loadavg() -> [f64; 3] {
    let text = read_trim("/proc/loadavg");
    let mut it = text
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}
