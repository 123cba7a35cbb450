//! Modbus devices for tests: real tokio-modbus servers (TCP, or RTU on a pty) whose data,
//! faults and request log live in a shared [`DeviceState`] the test can inspect and change.
//!
//! Each server runs on a dedicated thread with its own current-thread tokio runtime, so it
//! works from `#[test]` and `#[tokio::test]` alike, and stopping it (dropping that runtime)
//! closes every open connection, like a device that lost power.
//!
//! Semantics, per unit id:
//! - Unset addresses read as 0 / false.
//! - A read or write touching an illegal range of its table, or running past 0xFFFF, answers
//!   exception 0x02 IllegalDataAddress; quantity 0 or above the spec limit (125 registers,
//!   2000 bits, 123 registers per write, 1968 coils per write) answers 0x03 IllegalDataValue.
//! - A unit id not in the state, or marked silent, gets no answer at all (for RTU that is
//!   what a missing slave does; for TCP it models a gateway whose target does not reply).
//! - `auto_increment`: each read covering that address returns the current value, then the
//!   value increments (wrapping), so successive polls see fresh data.
//! - `delay`: the answer is sent after this delay (slow device, timeout tests).
//! - `reject_writes`: a write touching one of these ranges answers 0x03 IllegalDataValue.
//! - Function codes served: 1, 2, 3, 4, 5, 6, 15, 16, 22 (mask write), 23 (read/write), and
//!   43/14 (device identification) for units that have `identification` objects.
//!   Anything else answers 0x01 IllegalFunction.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use super::LOCALHOST;

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Coil,
    DiscreteInput,
    InputRegister,
    HoldingRegister,
}

/// The data and faults of one unit (slave) id.
#[derive(Debug, Clone, Default)]
pub struct Unit {
    pub coils: HashMap<u16, bool>,
    pub discrete_inputs: HashMap<u16, bool>,
    pub input_registers: HashMap<u16, u16>,
    pub holding_registers: HashMap<u16, u16>,
    /// Accesses touching these answer IllegalDataAddress.
    pub illegal: Vec<(Kind, RangeInclusive<u16>)>,
    /// Writes touching these answer IllegalDataValue (reads are served): a device refusing a
    /// value it does not accept.
    pub reject_writes: Vec<(Kind, RangeInclusive<u16>)>,
    /// A register (input or holding) that increments after every read covering it.
    pub auto_increment: Option<(Kind, u16)>,
    /// No answer at all while set.
    pub silent: bool,
    /// Answer after this delay.
    pub delay: Option<Duration>,
    /// The next request starting at one of these addresses is answered after its delay, once
    /// (a late reply: the client gave up on it already).
    pub late_once: Vec<(u16, Duration)>,
    /// Read Device Identification (FC 43 / MEI 14) objects (id, text); empty: the function
    /// answers IllegalFunction, as most meters do. Served as basic conformity (0x81), every
    /// object in one answer.
    pub identification: Vec<(u8, String)>,
}

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Exception(ExceptionCode),
    /// Not answered (silent or unknown unit).
    Silent,
}

/// One request as the device saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    pub at: Instant,
    pub unit: u8,
    /// Function code (3 = read holding registers, 16 = write multiple registers, ...).
    pub fc: u8,
    pub address: u16,
    /// Quantity read or written.
    pub count: u16,
    /// Values written (coils as 0/1); for 22 (mask write): [and_mask, or_mask].
    pub values: Vec<u16>,
    pub outcome: Outcome,
    /// `Debug` of the tokio-modbus request.
    pub debug: String,
}

impl LoggedRequest {
    pub fn is_write(&self) -> bool {
        matches!(self.fc, 5 | 6 | 15 | 16 | 22 | 23)
    }
}

#[derive(Debug, Default)]
pub struct DeviceData {
    pub units: BTreeMap<u8, Unit>,
    pub log: Vec<LoggedRequest>,
}

/// Shared, cloneable device state: what the servers answer from and record into.
#[derive(Clone, Default)]
pub struct DeviceState {
    inner: Arc<Mutex<DeviceData>>,
    changed: Arc<Notify>,
}

impl DeviceState {
    /// A state with the given (empty) unit ids.
    pub fn new(units: &[u8]) -> DeviceState {
        let s = DeviceState::default();
        for &u in units {
            s.lock().units.entry(u).or_default();
        }
        s
    }

    /// Direct access to everything (units, log).
    pub fn lock(&self) -> MutexGuard<'_, DeviceData> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on unit `unit` (created if absent).
    pub fn with_unit<R>(&self, unit: u8, f: impl FnOnce(&mut Unit) -> R) -> R {
        let mut d = self.lock();
        f(d.units.entry(unit).or_default())
    }

    pub fn set_holding(&self, unit: u8, address: u16, values: &[u16]) {
        self.with_unit(unit, |u| put(&mut u.holding_registers, address, values));
    }

    pub fn set_input(&self, unit: u8, address: u16, values: &[u16]) {
        self.with_unit(unit, |u| put(&mut u.input_registers, address, values));
    }

    pub fn set_coils(&self, unit: u8, address: u16, values: &[bool]) {
        self.with_unit(unit, |u| put(&mut u.coils, address, values));
    }

    pub fn set_discrete(&self, unit: u8, address: u16, values: &[bool]) {
        self.with_unit(unit, |u| put(&mut u.discrete_inputs, address, values));
    }

    pub fn holding(&self, unit: u8, address: u16, count: u16) -> Vec<u16> {
        self.with_unit(unit, |u| get(&u.holding_registers, address, count))
    }

    pub fn input(&self, unit: u8, address: u16, count: u16) -> Vec<u16> {
        self.with_unit(unit, |u| get(&u.input_registers, address, count))
    }

    pub fn coils(&self, unit: u8, address: u16, count: u16) -> Vec<bool> {
        self.with_unit(unit, |u| get(&u.coils, address, count))
    }

    pub fn discrete(&self, unit: u8, address: u16, count: u16) -> Vec<bool> {
        self.with_unit(unit, |u| get(&u.discrete_inputs, address, count))
    }

    /// Accesses of `kind` touching `range` on `unit` answer IllegalDataAddress.
    pub fn add_illegal(&self, unit: u8, kind: Kind, range: RangeInclusive<u16>) {
        self.with_unit(unit, |u| u.illegal.push((kind, range)));
    }

    /// Writes of `kind` touching `range` on `unit` answer IllegalDataValue; reads still work.
    pub fn add_reject_writes(&self, unit: u8, kind: Kind, range: RangeInclusive<u16>) {
        self.with_unit(unit, |u| u.reject_writes.push((kind, range)));
    }

    pub fn set_silent(&self, unit: u8, silent: bool) {
        self.with_unit(unit, |u| u.silent = silent);
    }

    pub fn set_delay(&self, unit: u8, delay: Option<Duration>) {
        self.with_unit(unit, |u| u.delay = delay);
    }

    /// The next request to `unit` starting at `address` is answered after `delay`, once.
    pub fn add_late_once(&self, unit: u8, address: u16, delay: Duration) {
        self.with_unit(unit, |u| u.late_once.push((address, delay)));
    }

    /// `kind` must be `InputRegister` or `HoldingRegister`.
    pub fn set_auto_increment(&self, unit: u8, kind: Kind, address: u16) {
        assert!(matches!(kind, Kind::InputRegister | Kind::HoldingRegister));
        self.with_unit(unit, |u| u.auto_increment = Some((kind, address)));
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }

    /// The write requests served so far.
    pub fn writes(&self) -> Vec<LoggedRequest> {
        self.lock()
            .log
            .iter()
            .filter(|r| r.is_write())
            .cloned()
            .collect()
    }

    pub fn clear_requests(&self) {
        self.lock().log.clear();
    }

    /// Waits (at most `within`) for a logged request matching `pred`, including ones already
    /// logged; returns it, or panics listing the requests seen.
    pub async fn wait_for_request(
        &self,
        pred: impl Fn(&LoggedRequest) -> bool,
        within: Duration,
    ) -> LoggedRequest {
        let r = tokio::time::timeout(within, async {
            loop {
                // Register interest before checking, so a request logged in between wakes us.
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(r) = self.lock().log.iter().find(|r| pred(r)) {
                    return r.clone();
                }
                notified.await;
            }
        })
        .await;
        r.unwrap_or_else(|_| {
            let seen: Vec<String> = self
                .requests()
                .iter()
                .map(|r| {
                    format!(
                        "unit {} fc {} addr {} count {} {:?}",
                        r.unit, r.fc, r.address, r.count, r.outcome
                    )
                })
                .collect();
            panic!(
                "no matching Modbus request within {within:?}; saw:\n  {}",
                seen.join("\n  ")
            )
        })
    }

    /// Waits until at least `n` requests matching `pred` were logged.
    pub async fn wait_for_count(
        &self,
        pred: impl Fn(&LoggedRequest) -> bool,
        n: usize,
        within: Duration,
    ) {
        let r = tokio::time::timeout(within, async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.lock().log.iter().filter(|r| pred(r)).count() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
        if r.is_err() {
            let have = self.lock().log.iter().filter(|r| pred(r)).count();
            panic!("only {have} of {n} matching Modbus requests within {within:?}");
        }
    }

    /// Serves one request: updates the data, logs, and returns the answer and its delay.
    fn handle(
        &self,
        unit_id: u8,
        req: &Request<'_>,
    ) -> (Result<Option<Response>, ExceptionCode>, Option<Duration>) {
        let (fc, address, count, values) = describe(req);
        let mut d = self.lock();
        let (result, delay) = match d.units.get_mut(&unit_id) {
            None => (Ok(None), None),
            Some(u) if u.silent => (Ok(None), None),
            Some(u) => {
                let late = u
                    .late_once
                    .iter()
                    .position(|(a, _)| *a == address)
                    .map(|i| u.late_once.remove(i).1);
                (serve(u, req).map(Some), late.or(u.delay))
            }
        };
        let outcome = match &result {
            Ok(Some(_)) => Outcome::Ok,
            Ok(None) => Outcome::Silent,
            Err(e) => Outcome::Exception(*e),
        };
        d.log.push(LoggedRequest {
            at: Instant::now(),
            unit: unit_id,
            fc,
            address,
            count,
            values,
            outcome,
            debug: format!("{req:?}"),
        });
        drop(d);
        self.changed.notify_waiters();
        (result, delay)
    }
}

fn put<T: Copy>(map: &mut HashMap<u16, T>, address: u16, values: &[T]) {
    for (i, v) in values.iter().enumerate() {
        let a = u16::try_from(usize::from(address) + i).expect("address past 0xFFFF");
        map.insert(a, *v);
    }
}

fn get<T: Copy + Default>(map: &HashMap<u16, T>, address: u16, count: u16) -> Vec<T> {
    (0..count)
        .map(|i| {
            map.get(&address.wrapping_add(i))
                .copied()
                .unwrap_or_default()
        })
        .collect()
}

fn describe(req: &Request<'_>) -> (u8, u16, u16, Vec<u16>) {
    let fc = req.function_code().value();
    let n = |len: usize| u16::try_from(len).unwrap_or(u16::MAX);
    match req {
        Request::ReadCoils(a, q)
        | Request::ReadDiscreteInputs(a, q)
        | Request::ReadInputRegisters(a, q)
        | Request::ReadHoldingRegisters(a, q) => (fc, *a, *q, vec![]),
        Request::WriteSingleCoil(a, v) => (fc, *a, 1, vec![u16::from(*v)]),
        Request::WriteMultipleCoils(a, vs) => (
            fc,
            *a,
            n(vs.len()),
            vs.iter().map(|v| u16::from(*v)).collect(),
        ),
        Request::WriteSingleRegister(a, v) => (fc, *a, 1, vec![*v]),
        Request::WriteMultipleRegisters(a, vs) => (fc, *a, n(vs.len()), vs.to_vec()),
        Request::MaskWriteRegister(a, and, or) => (fc, *a, 1, vec![*and, *or]),
        Request::ReadWriteMultipleRegisters(_, _, wa, vs) => (fc, *wa, n(vs.len()), vs.to_vec()),
        _ => (fc, 0, 0, vec![]),
    }
}

fn check(u: &Unit, kind: Kind, address: u16, count: u16, max: u16) -> Result<(), ExceptionCode> {
    if count == 0 || count > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let last = u32::from(address) + u32::from(count) - 1;
    if last > 0xFFFF {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    let touches = u.illegal.iter().any(|(k, r)| {
        *k == kind && u32::from(*r.start()) <= last && u32::from(*r.end()) >= u32::from(address)
    });
    if touches {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(())
}

fn read_regs(u: &mut Unit, kind: Kind, address: u16, count: u16) -> Vec<u16> {
    let table = match kind {
        Kind::InputRegister => &mut u.input_registers,
        _ => &mut u.holding_registers,
    };
    let values = get(table, address, count);
    if let Some((k, a)) = u.auto_increment {
        if k == kind && a >= address && u32::from(a) < u32::from(address) + u32::from(count) {
            let v = table.entry(a).or_default();
            *v = v.wrapping_add(1);
        }
    }
    values
}

/// The table and range a write request touches.
fn write_target(req: &Request<'_>) -> Option<(Kind, u16, u16)> {
    let n = |len: usize| u16::try_from(len).unwrap_or(u16::MAX);
    Some(match req {
        Request::WriteSingleCoil(a, _) => (Kind::Coil, *a, 1),
        Request::WriteMultipleCoils(a, vs) => (Kind::Coil, *a, n(vs.len())),
        Request::WriteSingleRegister(a, _) | Request::MaskWriteRegister(a, _, _) => {
            (Kind::HoldingRegister, *a, 1)
        }
        Request::WriteMultipleRegisters(a, vs)
        | Request::ReadWriteMultipleRegisters(_, _, a, vs) => {
            (Kind::HoldingRegister, *a, n(vs.len()))
        }
        _ => return None,
    })
}

fn serve(u: &mut Unit, req: &Request<'_>) -> Result<Response, ExceptionCode> {
    use Kind::*;
    if let Some((kind, address, count)) = write_target(req) {
        let last = u32::from(address) + u32::from(count.max(1)) - 1;
        let rejected = u.reject_writes.iter().any(|(k, r)| {
            *k == kind && u32::from(*r.start()) <= last && u32::from(*r.end()) >= u32::from(address)
        });
        if rejected {
            return Err(ExceptionCode::IllegalDataValue);
        }
    }
    match req {
        Request::ReadCoils(a, q) => {
            check(u, Coil, *a, *q, 2000)?;
            Ok(Response::ReadCoils(get(&u.coils, *a, *q)))
        }
        Request::ReadDiscreteInputs(a, q) => {
            check(u, DiscreteInput, *a, *q, 2000)?;
            Ok(Response::ReadDiscreteInputs(get(
                &u.discrete_inputs,
                *a,
                *q,
            )))
        }
        Request::ReadHoldingRegisters(a, q) => {
            check(u, HoldingRegister, *a, *q, 125)?;
            Ok(Response::ReadHoldingRegisters(read_regs(
                u,
                HoldingRegister,
                *a,
                *q,
            )))
        }
        Request::ReadInputRegisters(a, q) => {
            check(u, InputRegister, *a, *q, 125)?;
            Ok(Response::ReadInputRegisters(read_regs(
                u,
                InputRegister,
                *a,
                *q,
            )))
        }
        Request::WriteSingleCoil(a, v) => {
            check(u, Coil, *a, 1, 1)?;
            u.coils.insert(*a, *v);
            Ok(Response::WriteSingleCoil(*a, *v))
        }
        Request::WriteMultipleCoils(a, vs) => {
            let q = u16::try_from(vs.len()).unwrap_or(u16::MAX);
            check(u, Coil, *a, q, 1968)?;
            put(&mut u.coils, *a, vs);
            Ok(Response::WriteMultipleCoils(*a, q))
        }
        Request::WriteSingleRegister(a, v) => {
            check(u, HoldingRegister, *a, 1, 1)?;
            u.holding_registers.insert(*a, *v);
            Ok(Response::WriteSingleRegister(*a, *v))
        }
        Request::WriteMultipleRegisters(a, vs) => {
            let q = u16::try_from(vs.len()).unwrap_or(u16::MAX);
            check(u, HoldingRegister, *a, q, 123)?;
            put(&mut u.holding_registers, *a, vs);
            Ok(Response::WriteMultipleRegisters(*a, q))
        }
        Request::MaskWriteRegister(a, and, or) => {
            check(u, HoldingRegister, *a, 1, 1)?;
            // Modbus Application Protocol v1.1b3 §6.16: (current AND and) OR (or AND NOT and).
            let cur = u.holding_registers.get(a).copied().unwrap_or(0);
            u.holding_registers.insert(*a, (cur & and) | (or & !and));
            Ok(Response::MaskWriteRegister(*a, *and, *or))
        }
        Request::ReadWriteMultipleRegisters(ra, rq, wa, vs) => {
            let wq = u16::try_from(vs.len()).unwrap_or(u16::MAX);
            check(u, HoldingRegister, *wa, wq, 121)?;
            check(u, HoldingRegister, *ra, *rq, 125)?;
            // The write happens before the read (§6.17).
            put(&mut u.holding_registers, *wa, vs);
            Ok(Response::ReadWriteMultipleRegisters(read_regs(
                u,
                HoldingRegister,
                *ra,
                *rq,
            )))
        }
        Request::ReadDeviceIdentification(_, first) if !u.identification.is_empty() => {
            use tokio_modbus::prelude::{
                ConformityLevel, DeviceIdObject, ReadCode, ReadDeviceIdentificationResponse,
            };
            let objects = u
                .identification
                .iter()
                .filter(|(id, _)| id >= first)
                .map(|(id, text)| DeviceIdObject {
                    id: *id,
                    value: bytes::Bytes::from(text.clone().into_bytes()),
                })
                .collect();
            Ok(Response::ReadDeviceIdentification(
                ReadDeviceIdentificationResponse {
                    read_code: ReadCode::Basic,
                    conformity_level: ConformityLevel::BasicIdentification,
                    more_follows: false,
                    next_object_id: 0,
                    device_id_objects: objects,
                },
            ))
        }
        _ => Err(ExceptionCode::IllegalFunction),
    }
}

/// The tokio-modbus service both servers run.
#[derive(Clone)]
struct DeviceService {
    state: DeviceState,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl Service for DeviceService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = BoxFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        let (result, delay) = self.state.handle(req.slave, &req.request);
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            result
        })
    }
}

/// A server thread: stop it by sending on `stop` and joining.
struct ServerThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A Modbus TCP device on 127.0.0.1. Dropping it stops the server and closes connections.
pub struct TcpDevice {
    port: u16,
    state: DeviceState,
    server: Option<ServerThread>,
}

impl TcpDevice {
    /// Serves `state` on a free loopback port.
    pub fn start(state: DeviceState) -> TcpDevice {
        let mut last_err = None;
        for _ in 0..3 {
            let port = super::free_port();
            match spawn_tcp(port, state.clone()) {
                Ok(server) => {
                    return TcpDevice {
                        port,
                        state,
                        server: Some(server),
                    }
                }
                Err(e) => last_err = Some(e),
            }
        }
        panic!("TcpDevice could not bind: {last_err:?}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Stops listening and drops every open connection (clients see a reset/EOF).
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
    }

    /// Serves again on the same port (retrying the bind for up to 5 s).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match spawn_tcp(self.port, self.state.clone()) {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("TcpDevice could not rebind port {}: {e}", self.port),
            }
        }
    }
}

impl Drop for TcpDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_tcp(port: u16, state: DeviceState) -> io::Result<ServerThread> {
    // Bind here, so the port accepts connections when `start` returns (std sets SO_REUSEADDR).
    let listener = std::net::TcpListener::bind((LOCALHOST, port))?;
    listener.set_nonblocking(true)?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("modbus-tcp-{port}"))
        .spawn(move || {
            let rt = runtime();
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("register listener");
                let server = tokio_modbus::server::tcp::Server::new(listener);
                let service = DeviceService { state };
                let on_connected = move |stream, addr| {
                    let accepted =
                        tokio_modbus::server::tcp::accept_tcp_connection(stream, addr, |_| {
                            Ok(Some(service.clone()))
                        });
                    async move { accepted }
                };
                let _ = server
                    .serve_until(&on_connected, |_err| {}, async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
            // Dropping the runtime drops every connection task, closing their sockets.
            drop(rt);
        })?;
    Ok(ServerThread {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// A Modbus RTU device (all unit ids in its state, one bus) on a serial port, usually one end
/// of a `PtyPair`. Dropping it stops the server and closes the port.
pub struct RtuDevice {
    path: PathBuf,
    state: DeviceState,
    server: Option<ServerThread>,
}

impl RtuDevice {
    /// Opens `path` (19200 8N1; ptys ignore it) and serves `state` on it. Panics if the port
    /// cannot be opened within 5 s.
    pub fn start(path: &Path, state: DeviceState) -> RtuDevice {
        let server = spawn_rtu(path.to_path_buf(), state.clone());
        RtuDevice {
            path: path.to_path_buf(),
            state,
            server: Some(server),
        }
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and closes the port.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
    }

    /// Reopens the same path (e.g. after `PtyPair::restart`) and serves again.
    pub fn restart(&mut self) {
        self.stop();
        self.server = Some(spawn_rtu(self.path.clone(), self.state.clone()));
    }
}

impl Drop for RtuDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

const RTU_BAUD: u32 = 19_200;

fn spawn_rtu(path: PathBuf, state: DeviceState) -> ServerThread {
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), String>>();
    let name = format!("modbus-rtu-{}", path.display());
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let rt = runtime();
            rt.block_on(async move {
                let service = DeviceService { state };
                let mut ready = Some(ready_tx);
                loop {
                    let builder = tokio_serial::new(path.to_string_lossy(), RTU_BAUD);
                    let serial = match tokio_serial::SerialStream::open(&builder) {
                        Ok(s) => s,
                        Err(e) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(Err(format!("open {}: {e}", path.display())));
                                return;
                            }
                            // Reopening after an error: the pty may be gone for good.
                            tokio::select! {
                                _ = &mut stop_rx => return,
                                () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                            }
                        }
                    };
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                    let server = tokio_modbus::server::rtu::Server::new(serial);
                    tokio::select! {
                        _ = &mut stop_rx => return,
                        // The server ends on an I/O error (e.g. the pty hung up): reopen.
                        _ = server.serve_forever(service.clone()) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
            drop(rt);
        })
        .expect("spawn RTU device thread");
    let mut server = ServerThread {
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => server,
        Ok(Err(e)) => {
            server.stop();
            panic!("RtuDevice: {e}")
        }
        Err(e) => {
            server.stop();
            panic!("RtuDevice did not open the port within 5 s: {e}")
        }
    }
}
