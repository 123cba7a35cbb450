//! The demo's stand-ins for the outside world: an embedded MQTT broker and two simulated
//! Modbus TCP devices (an energy meter and a tank PLC), all on free loopback ports.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// A port that was free a moment ago on 127.0.0.1 (bind to port 0, read it back, release it).
pub fn free_port() -> io::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// MQTT broker
// ---------------------------------------------------------------------------------------------

/// Starts rumqttd on `127.0.0.1:port` (MQTT 3.1.1) on its own thread and waits until it accepts
/// connections. The thread is never joined: the process exit ends it.
pub fn start_broker(port: u16) -> io::Result<()> {
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = rumqttd::ServerSettings {
        name: "demo-v4".to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 16,
            max_outgoing_packet_count: 500,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("demo-broker".to_string())
        .spawn(move || {
            // `Broker::new` spawns the router thread; `start` blocks on the server threads.
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("embedded broker stopped: {e}");
            }
        })?;

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match StdTcpStream::connect(listen) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated Modbus devices
// ---------------------------------------------------------------------------------------------

/// The data tables of one simulated device.
#[derive(Debug, Default)]
pub struct Tables {
    pub input: Vec<u16>,
    pub holding: Vec<u16>,
    pub coils: Vec<bool>,
    pub discrete: Vec<bool>,
}

pub type SharedTables = Arc<Mutex<Tables>>;

fn slice<T: Clone>(table: &[T], addr: u16, qty: u16) -> Result<Vec<T>, ExceptionCode> {
    let (start, end) = (addr as usize, addr as usize + qty as usize);
    if qty == 0 || end > table.len() {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(table[start..end].to_vec())
}

fn write<T: Clone>(table: &mut [T], addr: u16, values: &[T]) -> Result<(), ExceptionCode> {
    let start = addr as usize;
    let end = start + values.len();
    if values.is_empty() || end > table.len() {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    table[start..end].clone_from_slice(values);
    Ok(())
}

/// One Modbus service per connection, all sharing the device's tables. Answers every unit id.
#[derive(Clone)]
struct Device {
    tables: SharedTables,
}

impl Service for Device {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let mut t = self.tables.lock().unwrap();
        let res = match req.request {
            Request::ReadInputRegisters(a, n) => {
                slice(&t.input, a, n).map(Response::ReadInputRegisters)
            }
            Request::ReadHoldingRegisters(a, n) => {
                slice(&t.holding, a, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadCoils(a, n) => slice(&t.coils, a, n).map(Response::ReadCoils),
            Request::ReadDiscreteInputs(a, n) => {
                slice(&t.discrete, a, n).map(Response::ReadDiscreteInputs)
            }
            Request::WriteSingleCoil(a, v) => {
                write(&mut t.coils, a, &[v]).map(|()| Response::WriteSingleCoil(a, v))
            }
            Request::WriteMultipleCoils(a, ref v) => {
                write(&mut t.coils, a, v).map(|()| Response::WriteMultipleCoils(a, v.len() as u16))
            }
            Request::WriteSingleRegister(a, v) => {
                write(&mut t.holding, a, &[v]).map(|()| Response::WriteSingleRegister(a, v))
            }
            Request::WriteMultipleRegisters(a, ref v) => write(&mut t.holding, a, v)
                .map(|()| Response::WriteMultipleRegisters(a, v.len() as u16)),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        ready(res)
    }
}

/// Binds `127.0.0.1:port` (0 = any free port) with SO_REUSEADDR, so that a device can be
/// restarted on the port it had a moment ago.
pub fn bind(port: u16) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(([127, 0, 0, 1], port).into())?;
    socket.listen(64)
}

/// Serves `tables` as a Modbus TCP device on `listener`. Aborting the returned task closes the
/// listener and every open connection (the server cancels its connection tasks when dropped).
pub fn serve(listener: TcpListener, tables: SharedTables) -> JoinHandle<()> {
    tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = |stream, addr| {
            let device = Device {
                tables: tables.clone(),
            };
            let service = move |_| Ok(Some(device.clone()));
            async move { accept_tcp_connection(stream, addr, service) }
        };
        // Connection errors (a client hanging up mid-frame) are part of the demo; stay quiet.
        if let Err(e) = server.serve(&on_connected, |_err| {}).await {
            eprintln!("modbus server stopped: {e}");
        }
    })
}

/// Tiny xorshift generator: noise for the simulated measurements without a `rand` dependency.
pub struct Noise(u64);

impl Noise {
    pub fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Noise(seed | 1)
    }

    /// Uniform in `[-amplitude, amplitude]`.
    pub fn next(&mut self, amplitude: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        (unit * 2.0 - 1.0) * amplitude
    }
}

/// Big-endian ("ABCD") f32 as two registers, high word first.
pub fn f32_words(value: f32) -> [u16; 2] {
    let bits = value.to_bits();
    [(bits >> 16) as u16, bits as u16]
}

/// Energy meter input registers: 0-1 voltage (V), 2-3 current (A), 4-5 active power (W),
/// each an ABCD f32. Values change every second.
pub fn energy_meter() -> SharedTables {
    let tables = Arc::new(Mutex::new(Tables {
        input: vec![0; 6],
        ..Default::default()
    }));
    let shared = tables.clone();
    tokio::spawn(async move {
        let mut noise = Noise::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut t = 0.0f64;
        loop {
            tick.tick().await;
            let voltage = 230.0 + 1.5 * (t / 7.0).sin() + noise.next(0.4);
            let current = 12.0 + 3.0 * (t / 5.0).sin() + noise.next(0.2);
            let power = voltage * current * 0.95;
            // Round like a real meter's display resolution so the published numbers stay short.
            let words = [
                f32_words(((voltage * 10.0).round() / 10.0) as f32),
                f32_words(((current * 100.0).round() / 100.0) as f32),
                f32_words(power.round() as f32),
            ];
            shared.lock().unwrap().input = words.concat();
            t += 1.0;
        }
    });
    tables
}

/// Tank PLC: holding 0 = tank level in 0.1 % (u16), holding 1 = status word
/// (bit 0 pump running, bit 1 high-level alarm, bit 2 auto mode), coil 0 = pump.
/// The PLC program runs the pump between 30 % and 80 % once a second.
pub fn tank_plc() -> SharedTables {
    let tables = Arc::new(Mutex::new(Tables {
        holding: vec![0; 2],
        coils: vec![false; 1],
        ..Default::default()
    }));
    let shared = tables.clone();
    tokio::spawn(async move {
        let mut noise = Noise::new();
        let mut level: i32 = 650;
        let mut pump = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            level += if pump { 40 } else { -30 } + noise.next(3.0).round() as i32;
            level = level.clamp(0, 1000);
            if level >= 800 {
                pump = false;
            } else if level <= 300 {
                pump = true;
            }
            let status = u16::from(pump) | (u16::from(level > 750) << 1) | (1 << 2);
            let mut t = shared.lock().unwrap();
            t.holding = vec![level as u16, status];
            t.coils = vec![pump];
        }
    });
    tables
}
