//! `WireSlave`: Modbus RTU slaves on one end of a pty pair that behave like slaves on a real
//! RS-485 line at its real speed. Shared by the tests (`common::wire`) and the bus benchmark
//! (`benches/wire.rs` includes this file by path); it needs only std and libc.
//!
//! A pty passes bytes instantly whatever the baud rate, so the line is modelled here:
//! - **Receiving.** Each byte that arrives is put on a modelled wire clock: it starts at
//!   `max(arrival, end of the byte before)` and lasts one character time (start bit, data bits,
//!   parity, stop bits at the baud). A request is complete only after 3.5 characters of silence
//!   after its modelled end; a gap of more than 1.5 characters between two bytes of one frame
//!   makes it a broken frame, ignored and counted, as a real slave's UART timer would.
//! - **Answering.** After a configurable turnaround (never less than the 3.5 characters a
//!   slave needs to see the end of the request), the answer is written one character at a time,
//!   each at the moment it would have fully arrived at the master (the end of its character
//!   time), on a precise timer: a `ppoll` on the port until about 150 µs before, then a spin.
//! - **Measuring.** The silence before each request is measured at the device: from the
//!   modelled end of the last activity on the line (the end of the last answer character, or
//!   of the last request) to the arrival of the request's first byte. Every frame is recorded
//!   ([`FrameRecord`]) with its wire time; bytes that arrive while the slave transmits are
//!   counted as collisions (on a half-duplex line both frames would be garbage).
//!
//! Resolution: arrival times are taken when `ppoll` returns (timer slack set to 1 ns for this
//! thread), so they carry the wake-up latency of this thread plus socat's relay latency
//! (`calibrate` measures the round trip through socat). Both make the measured silence longer
//! than the gateway's own, never shorter, as a USB adapter's latency does on a real line.
//! Registers are computed, not stored: holding `unit * 1000 + address`, input the same plus
//! 500, coil/discrete input `(address + unit) % 3 == 0`. Function codes 1-4 only; others are
//! answered with exception 1.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Character format of the line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineFormat {
    pub baud: u32,
    pub data_bits: u8,
    pub parity: bool,
    pub stop_bits: u8,
}

impl LineFormat {
    /// 8 data bits, no parity, 1 stop bit.
    pub fn n81(baud: u32) -> LineFormat {
        LineFormat {
            baud,
            data_bits: 8,
            parity: false,
            stop_bits: 1,
        }
    }

    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits) + u32::from(self.parity) + u32::from(self.stop_bits)
    }

    /// Time of `n` characters on the wire.
    pub fn chars(&self, n: f64) -> Duration {
        Duration::from_secs_f64(n * f64::from(self.bits_per_char()) / f64::from(self.baud))
    }

    pub fn char_time(&self) -> Duration {
        self.chars(1.0)
    }
}

/// What the slave saw on the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A complete request with a good CRC (for one of our units or not).
    Request,
    /// An answer the slave sent.
    Answer,
    /// A frame with a gap of more than 1.5 characters inside: ignored.
    Broken,
    /// A frame with a bad CRC or too short: ignored.
    BadCrc,
}

/// One frame on the modelled wire.
#[derive(Debug, Clone, Copy)]
pub struct FrameRecord {
    pub kind: FrameKind,
    pub unit: u8,
    pub function: u8,
    pub bytes: usize,
    /// Modelled start of the first character and end of the last.
    pub start: Instant,
    pub end: Instant,
    /// Silence on the line before this frame: from the end of the previous frame (either
    /// direction) to this frame's first byte. `None` for the first frame.
    pub silence_before: Option<Duration>,
}

impl FrameRecord {
    pub fn wire_time(&self) -> Duration {
        self.end - self.start
    }
}

/// Behaviour of one unit id on the line.
#[derive(Debug, Clone, Copy)]
pub struct UnitConfig {
    /// From the end of the request to the start of the answer (at least 3.5 characters).
    pub turnaround: Duration,
    /// Never answers (a dead slave).
    pub silent: bool,
}

#[derive(Default)]
struct Shared {
    units: HashMap<u8, UnitConfig>,
    frames: Vec<FrameRecord>,
    dropped_records: u64,
    collisions: u64,
    error: Option<String>,
}

const MAX_RECORDS: usize = 500_000;

/// Several Modbus RTU slaves on one modelled line, run by one thread on one end of a pty.
/// Dropping it stops the thread (within 50 ms) and closes the port.
pub struct WireSlave {
    format: LineFormat,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WireSlave {
    /// Opens `path` (one end of a pty pair) and serves `units`, each with `turnaround`.
    pub fn start(path: &Path, format: LineFormat, units: &[u8], turnaround: Duration) -> WireSlave {
        let fd = open_raw(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut shared = Shared::default();
        for &u in units {
            shared.units.insert(
                u,
                UnitConfig {
                    turnaround,
                    silent: false,
                },
            );
        }
        let shared = Arc::new(Mutex::new(shared));
        let stop = Arc::new(AtomicBool::new(false));
        let mut line = Line {
            fd,
            format,
            shared: shared.clone(),
            stop: stop.clone(),
            rx: Vec::new(),
            rx_start: None,
            rx_end: None,
            rx_broken: false,
            idle_since: None,
        };
        let thread = std::thread::Builder::new()
            .name("wire-slave".into())
            .spawn(move || {
                // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
                if let Err(e) = line.run() {
                    line.shared.lock().unwrap().error = Some(e.to_string());
                }
                // SAFETY: the fd is owned by this thread and closed once.
                unsafe { libc::close(line.fd) };
            })
            .expect("spawn wire slave");
        WireSlave {
            format,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    pub fn format(&self) -> LineFormat {
        self.format
    }

    /// Makes `unit` silent (dead) or alive again.
    pub fn set_silent(&self, unit: u8, silent: bool) {
        if let Some(u) = self.shared.lock().unwrap().units.get_mut(&unit) {
            u.silent = silent;
        }
    }

    pub fn set_turnaround(&self, unit: u8, turnaround: Duration) {
        if let Some(u) = self.shared.lock().unwrap().units.get_mut(&unit) {
            u.turnaround = turnaround;
        }
    }

    /// Every frame seen or sent so far.
    pub fn frames(&self) -> Vec<FrameRecord> {
        self.shared.lock().unwrap().frames.clone()
    }

    /// Forgets the frames recorded so far (start of a measuring window).
    pub fn clear(&self) {
        self.shared.lock().unwrap().frames.clear();
    }

    /// Request bytes that arrived while the slave was transmitting.
    pub fn collisions(&self) -> u64 {
        self.shared.lock().unwrap().collisions
    }

    /// An I/O error that stopped the slave's thread, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.lock().unwrap().error.clone()
    }

    /// Waits (at most `timeout`) until `cond` holds over the frames; returns whether it did.
    pub fn wait_frames(&self, timeout: Duration, cond: impl Fn(&[FrameRecord]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&self.shared.lock().unwrap().frames) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for WireSlave {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Summary of the silences before requests among `frames`.
#[derive(Debug, Clone, Copy)]
pub struct Silences {
    pub count: usize,
    pub min: Duration,
    pub median: Duration,
    pub max: Duration,
}

/// Silences before the requests (the first frame has none).
pub fn request_silences(frames: &[FrameRecord]) -> Option<Silences> {
    let mut s: Vec<Duration> = frames
        .iter()
        .filter(|f| f.kind == FrameKind::Request)
        .filter_map(|f| f.silence_before)
        .collect();
    if s.is_empty() {
        return None;
    }
    s.sort();
    Some(Silences {
        count: s.len(),
        min: s[0],
        median: s[s.len() / 2],
        max: s[s.len() - 1],
    })
}

/// Round trip through socat: writes one byte on `a`, reads it on `b`, `rounds` times; returns
/// the median and the maximum one-way time (half the round trip measured from `a`'s side is not
/// available, so this is the time from the write on `a` to the read on `b`).
pub fn calibrate(a: &Path, b: &Path, rounds: usize) -> std::io::Result<(Duration, Duration)> {
    let fa = open_raw(a)?;
    let fb = open_raw(b)?;
    let mut times = Vec::with_capacity(rounds);
    let mut result = Ok(());
    for _ in 0..rounds {
        let t0 = Instant::now();
        if let Err(e) = write_all(fa, &[0x55]) {
            result = Err(e);
            break;
        }
        let mut buf = [0u8; 16];
        match wait_readable(fb, Some(Duration::from_millis(500))) {
            Ok(true) => {
                let _ = read_some(fb, &mut buf);
                times.push(t0.elapsed());
            }
            Ok(false) => {
                result = Err(std::io::Error::other("no byte through socat within 500 ms"));
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: both fds were opened above and are closed once.
    unsafe {
        libc::close(fa);
        libc::close(fb);
    }
    result?;
    times.sort();
    Ok((times[times.len() / 2], times[times.len() - 1]))
}

struct Line {
    fd: i32,
    format: LineFormat,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    rx: Vec<u8>,
    rx_start: Option<Instant>,
    /// Modelled end of the last byte received in the current frame.
    rx_end: Option<Instant>,
    rx_broken: bool,
    /// Modelled end of the last frame on the line (either direction).
    idle_since: Option<Instant>,
}

impl Line {
    fn run(&mut self) -> std::io::Result<()> {
        let t35 = self.format.chars(3.5);
        while !self.stop.load(Ordering::Relaxed) {
            let wait = match self.rx_end {
                Some(end) => {
                    let done = end + t35;
                    let now = Instant::now();
                    if now >= done {
                        self.complete_frame()?;
                        continue;
                    }
                    done - now
                }
                None => Duration::from_millis(50),
            };
            if wait_readable(self.fd, Some(wait))? {
                self.receive(Instant::now())?;
            }
        }
        Ok(())
    }

    /// Reads what is there and puts it on the modelled wire clock, arrival time `t`.
    fn receive(&mut self, t: Instant) -> std::io::Result<()> {
        let mut buf = [0u8; 512];
        let n = read_some(self.fd, &mut buf)?;
        let ct = self.format.char_time();
        for &b in &buf[..n] {
            if let Some(end) = self.rx_end {
                if t > end + self.format.chars(3.5) {
                    // Our own poll woke late: the frame before was complete already.
                    self.complete_frame()?;
                }
            }
            match self.rx_end {
                None => {
                    self.rx_start = Some(t);
                    self.rx_end = Some(t + ct);
                    self.rx.clear();
                    self.rx_broken = false;
                }
                Some(end) => {
                    if t > end + self.format.chars(1.5) {
                        self.rx_broken = true;
                    }
                    self.rx_end = Some(t.max(end) + ct);
                }
            }
            if self.rx.len() < 512 {
                self.rx.push(b);
            } else {
                self.rx_broken = true;
            }
        }
        Ok(())
    }

    fn record(&self, rec: FrameRecord) {
        let mut s = self.shared.lock().unwrap();
        if s.frames.len() < MAX_RECORDS {
            s.frames.push(rec);
        } else {
            s.dropped_records += 1;
        }
    }

    fn complete_frame(&mut self) -> std::io::Result<()> {
        let (Some(start), Some(end)) = (self.rx_start.take(), self.rx_end.take()) else {
            return Ok(());
        };
        let frame = std::mem::take(&mut self.rx);
        let silence_before = self.idle_since.map(|i| start.saturating_duration_since(i));
        self.idle_since = Some(end);
        let good_crc = frame.len() >= 4 && {
            let (body, crc) = frame.split_at(frame.len() - 2);
            crc16(body).to_le_bytes() == [crc[0], crc[1]]
        };
        let kind = if self.rx_broken {
            FrameKind::Broken
        } else if !good_crc {
            FrameKind::BadCrc
        } else {
            FrameKind::Request
        };
        self.record(FrameRecord {
            kind,
            unit: frame.first().copied().unwrap_or(0),
            function: frame.get(1).copied().unwrap_or(0),
            bytes: frame.len(),
            start,
            end,
            silence_before,
        });
        if kind != FrameKind::Request {
            return Ok(());
        }
        let unit = frame[0];
        let cfg = self.shared.lock().unwrap().units.get(&unit).copied();
        let Some(cfg) = cfg else { return Ok(()) };
        if cfg.silent {
            return Ok(());
        }
        let answer = answer(&frame[..frame.len() - 2]);
        let first = end + cfg.turnaround.max(self.format.chars(3.5));
        self.transmit(&answer, first)
    }

    /// Writes `frame` one character at a time, each at the end of its character time, the
    /// first character starting at `start`.
    fn transmit(&mut self, frame: &[u8], start: Instant) -> std::io::Result<()> {
        let ct = self.format.char_time();
        for (i, b) in frame.iter().enumerate() {
            let at = start + ct * (i as u32 + 1);
            self.sleep_until(at)?;
            write_all(self.fd, std::slice::from_ref(b))?;
        }
        let end = start + ct * frame.len() as u32;
        let silence_before = self.idle_since.map(|i| start.saturating_duration_since(i));
        self.idle_since = Some(end);
        self.record(FrameRecord {
            kind: FrameKind::Answer,
            unit: frame[0],
            function: frame[1],
            bytes: frame.len(),
            start,
            end,
            silence_before,
        });
        Ok(())
    }

    /// Sleeps until `at`: ppoll on the port until ~150 µs before (bytes that arrive meanwhile
    /// are collisions: read, counted, dropped), then spins.
    fn sleep_until(&mut self, at: Instant) -> std::io::Result<()> {
        const SPIN: Duration = Duration::from_micros(150);
        loop {
            let now = Instant::now();
            if now >= at {
                return Ok(());
            }
            let left = at - now;
            if left > SPIN {
                if wait_readable(self.fd, Some(left - SPIN))? {
                    let mut buf = [0u8; 512];
                    let n = read_some(self.fd, &mut buf)?;
                    self.shared.lock().unwrap().collisions += n as u64;
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// The answer to a request (without its CRC), CRC appended.
fn answer(req: &[u8]) -> Vec<u8> {
    let unit = req[0];
    let fc = req[1];
    let exception = |code: u8| vec![unit, fc | 0x80, code];
    let mut out = if req.len() != 6 || !(1..=4).contains(&fc) {
        exception(1)
    } else {
        let addr = u16::from_be_bytes([req[2], req[3]]);
        let count = u16::from_be_bytes([req[4], req[5]]);
        let max = if fc <= 2 { 2000 } else { 125 };
        if count == 0 || count > max {
            exception(3)
        } else if u32::from(addr) + u32::from(count) > 0x1_0000 {
            exception(2)
        } else if fc <= 2 {
            let mut bytes = vec![0u8; usize::from(count).div_ceil(8)];
            for i in 0..count {
                if (u32::from(addr) + u32::from(i) + u32::from(unit)) % 3 == 0 {
                    bytes[usize::from(i / 8)] |= 1 << (i % 8);
                }
            }
            let mut v = vec![unit, fc, bytes.len() as u8];
            v.extend(bytes);
            v
        } else {
            let mut v = vec![unit, fc, (count * 2) as u8];
            for i in 0..count {
                let r = register(unit, fc, addr.wrapping_add(i));
                v.extend(r.to_be_bytes());
            }
            v
        }
    };
    let crc = crc16(&out);
    out.extend(crc.to_le_bytes());
    out
}

/// The value of a register: holding `unit * 1000 + address`, input the same plus 500.
pub fn register(unit: u8, function: u8, address: u16) -> u16 {
    let base = u16::from(unit).wrapping_mul(1000).wrapping_add(address);
    if function == 4 {
        base.wrapping_add(500)
    } else {
        base
    }
}

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn open_raw(path: &Path) -> std::io::Result<i32> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; the returned fd is owned by the caller.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
    Ok(fd)
}

/// Whether `fd` became readable within `timeout` (ppoll: nanosecond timeout, no ms rounding).
fn wait_readable(fd: i32, timeout: Option<Duration>) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: one valid pollfd, a valid or null timespec, no signal mask change.
    let r = unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    if r > 0
        && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
        && pfd.revents & libc::POLLIN == 0
    {
        // The other end is closed (no gateway yet, or socat gone): do not spin on it.
        std::thread::sleep(Duration::from_millis(5));
        return Ok(false);
    }
    Ok(r > 0)
}

fn read_some(fd: i32, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ) || e.raw_os_error() == Some(libc::EIO)
        {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

fn write_all(fd: i32, mut data: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !data.is_empty() {
        // SAFETY: data is valid for data.len() bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}
