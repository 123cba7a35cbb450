//! One Modbus connection (TCP, RTU over serial, RTU over TCP) with the safety rules the field
//! needs: a timeout on every request, the RTU silent interval between frames, and a reset of the
//! connection after anything that can leave the stream out of step.
//!
//! Why reset: tokio-modbus matches a reply to nothing but the next frame read. After a timeout
//! the device may still answer; that late reply would then be taken as the answer to the next
//! request (upstream issue #324, tokio-modbus 0.17). So a timeout, a framing error or a header
//! mismatch drops the connection (TCP: reconnect; serial: reopen the port and clear its buffers).

use std::io;
use std::time::{Duration, Instant};

use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::{Request, Response, Slave, SlaveContext};
use tokio_modbus::ExceptionCode;

use crate::model::{BusKind, Parity, RegisterKind, Serial};

/// What a read returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The device answered with a Modbus exception: the link is fine, the request was not.
    #[error("exception:{}", exception_name(*.0))]
    Exception(ExceptionCode),
    /// No (complete) answer within the device's timeout.
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    /// The answer did not fit the request (wrong unit id, function code, length): the stream is
    /// out of step.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Connect, read or write failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The connection is down and its back-off has not elapsed.
    #[error("not connected: {0}")]
    NotConnected(String),
    /// The request's deadline passed while it waited for the bus: not sent.
    #[error("the command expired while waiting for the bus")]
    Expired,
}

impl RequestError {
    /// Whether the device itself answered (the connection is healthy).
    pub fn is_exception(&self) -> bool {
        matches!(self, RequestError::Exception(_))
    }
    /// Short machine-readable reason for results and bad-quality payloads.
    pub fn reason(&self) -> String {
        match self {
            RequestError::Exception(e) => format!("exception:{}", exception_name(*e)),
            RequestError::Timeout(_) => "timeout".into(),
            RequestError::Protocol(_) => "protocol".into(),
            RequestError::Transport(_) | RequestError::NotConnected(_) => "transport".into(),
            RequestError::Expired => "expired".into(),
        }
    }
}

/// Exception names as the Modbus application protocol v1.1b3 §7 spells them.
pub fn exception_name(e: ExceptionCode) -> &'static str {
    match e {
        ExceptionCode::IllegalFunction => "ILLEGAL_FUNCTION",
        ExceptionCode::IllegalDataAddress => "ILLEGAL_DATA_ADDRESS",
        ExceptionCode::IllegalDataValue => "ILLEGAL_DATA_VALUE",
        ExceptionCode::ServerDeviceFailure => "SERVER_DEVICE_FAILURE",
        ExceptionCode::Acknowledge => "ACKNOWLEDGE",
        ExceptionCode::ServerDeviceBusy => "SERVER_DEVICE_BUSY",
        ExceptionCode::MemoryParityError => "MEMORY_PARITY_ERROR",
        ExceptionCode::GatewayPathUnavailable => "GATEWAY_PATH_UNAVAILABLE",
        ExceptionCode::GatewayTargetDevice => "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
        _ => "UNKNOWN",
    }
}

/// A write request, already encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// FC5
    SingleCoil(u16, bool),
    /// FC15
    MultipleCoils(u16, Vec<bool>),
    /// FC6
    SingleRegister(u16, u16),
    /// FC16
    MultipleRegisters(u16, Vec<u16>),
    /// FC22: `(reg AND and_mask) OR (or_mask AND NOT and_mask)`
    MaskWrite(u16, u16, u16),
}

/// One bus connection with its reconnect state. Owned by exactly one task.
pub struct Connection {
    kind: BusKind,
    frame_gap: Duration,
    connect_delay: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    ctx: Option<Context>,
    /// Earliest time of the next connect attempt.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Before reconnecting after a timeout on an RTU line: the device may still be answering.
    quiet_until: Option<Instant>,
    /// End of the last frame on the wire (for the RTU silent interval).
    last_io: Option<Instant>,
    /// How many times the connection was reset after a timeout or framing error.
    pub resets: u64,
    /// Connect attempts that failed.
    pub connect_failures: u64,
    last_connect_error: String,
}

impl Connection {
    pub fn new(
        kind: BusKind,
        frame_gap: Duration,
        connect_delay: Duration,
        reconnect_max: Duration,
    ) -> Self {
        let reconnect_min = Duration::from_millis(100).min(reconnect_max);
        Connection {
            kind,
            frame_gap,
            connect_delay,
            reconnect_min,
            reconnect_max,
            ctx: None,
            retry_at: None,
            quiet_until: None,
            backoff: reconnect_min,
            last_io: None,
            resets: 0,
            connect_failures: 0,
            last_connect_error: String::new(),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.ctx.is_some()
    }

    /// Human-readable endpoint (`tcp://127.0.0.1:502`, `/dev/ttyUSB0@9600`).
    pub fn endpoint(&self) -> String {
        endpoint(&self.kind)
    }

    /// Connects if not connected and the back-off allows. `connect_timeout` bounds the attempt.
    pub async fn ensure_connected(
        &mut self,
        connect_timeout: Duration,
    ) -> Result<(), RequestError> {
        if self.ctx.is_some() {
            return Ok(());
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return Err(RequestError::NotConnected(self.last_connect_error.clone()));
            }
        }
        if let Some(wait) = self
            .quiet_until
            .take()
            .and_then(|t| t.checked_duration_since(Instant::now()))
        {
            // A late reply then lands on the closed port and is thrown away, instead of being
            // read as the answer to the next request (possibly another device's).
            tokio::time::sleep(wait).await;
        }
        let attempt = tokio::time::timeout(connect_timeout, open(&self.kind)).await;
        let result = match attempt {
            Ok(Ok(ctx)) => Ok(ctx),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("connect timed out after {connect_timeout:?}")),
        };
        match result {
            Ok(ctx) => {
                if !self.connect_delay.is_zero() {
                    tokio::time::sleep(self.connect_delay).await;
                }
                self.ctx = Some(ctx);
                self.retry_at = None;
                self.backoff = self.reconnect_min;
                tracing::debug!(endpoint = %self.endpoint(), "bus connected");
                Ok(())
            }
            Err(e) => {
                self.connect_failures += 1;
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(self.reconnect_max);
                self.last_connect_error = e.clone();
                Err(RequestError::Transport(e))
            }
        }
    }

    /// Drops the connection so that the next request starts on a clean stream.
    pub fn reset(&mut self) {
        if self.ctx.take().is_some() {
            self.resets += 1;
        }
        // Reconnect at once the first time; repeated connect failures back off.
        self.retry_at = None;
    }

    /// How long to wait to keep the RTU silent interval (3.5 character times) since the last
    /// frame. (Computed, not awaited here: `Context` is not `Sync`, so no `&self` may be held
    /// across an await.)
    fn frame_gap_wait(&self) -> Option<Duration> {
        let ready = self.last_io? + self.frame_gap;
        ready.checked_duration_since(Instant::now())
    }

    /// Sends one request to `unit` and waits at most `timeout` for its answer. Resets the
    /// connection after a timeout, transport or protocol error.
    pub async fn call(
        &mut self,
        unit: u8,
        request: Request<'_>,
        timeout: Duration,
    ) -> Result<Response, RequestError> {
        self.ensure_connected(timeout.max(Duration::from_secs(1)))
            .await?;
        if let Some(wait) = self.frame_gap_wait() {
            // Not tokio's sleep: it rounds up to whole milliseconds (see `precise`).
            super::precise::sleep(wait).await;
        }
        let ctx = self.ctx.as_mut().expect("connected above");
        // Never the broadcast default: every request names its unit.
        ctx.set_slave(Slave(unit));
        let outcome = tokio::time::timeout(timeout, ctx.call(request)).await;
        self.last_io = Some(Instant::now());
        let error = match outcome {
            Ok(Ok(Ok(response))) => return Ok(response),
            Ok(Ok(Err(exception))) => return Err(RequestError::Exception(exception)),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => RequestError::Protocol(e.to_string()),
            Ok(Err(tokio_modbus::Error::Transport(e))) => transport_error(e),
            Err(_) => RequestError::Timeout(timeout),
        };
        if matches!(error, RequestError::Timeout(_))
            && matches!(self.kind, BusKind::Rtu(_) | BusKind::RtuOverTcp { .. })
        {
            self.quiet_until = Some(Instant::now() + late_reply_guard(self.frame_gap, timeout));
        }
        self.reset();
        Err(error)
    }

    /// Reads `count` registers or bits of `kind` starting at `start`.
    pub async fn read(
        &mut self,
        unit: u8,
        kind: RegisterKind,
        start: u16,
        count: u16,
        timeout: Duration,
    ) -> Result<Data, RequestError> {
        let request = match kind {
            RegisterKind::Coil => Request::ReadCoils(start, count),
            RegisterKind::DiscreteInput => Request::ReadDiscreteInputs(start, count),
            RegisterKind::Holding => Request::ReadHoldingRegisters(start, count),
            RegisterKind::Input => Request::ReadInputRegisters(start, count),
        };
        let response = self.call(unit, request, timeout).await?;
        let data = match response {
            Response::ReadCoils(mut bits) | Response::ReadDiscreteInputs(mut bits) => {
                if bits.len() < count as usize {
                    return Err(
                        self.out_of_step(format!("{} bits answered, {count} asked", bits.len()))
                    );
                }
                bits.truncate(count as usize);
                Data::Bits(bits)
            }
            Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
                if words.len() != count as usize {
                    return Err(self.out_of_step(format!(
                        "{} registers answered, {count} asked",
                        words.len()
                    )));
                }
                Data::Words(words)
            }
            other => return Err(self.out_of_step(format!("unexpected response {other:?}"))),
        };
        Ok(data)
    }

    /// Performs one write.
    pub async fn write(
        &mut self,
        unit: u8,
        write: &Write,
        timeout: Duration,
    ) -> Result<(), RequestError> {
        let request = match write {
            Write::SingleCoil(a, v) => Request::WriteSingleCoil(*a, *v),
            Write::MultipleCoils(a, v) => Request::WriteMultipleCoils(*a, v.as_slice().into()),
            Write::SingleRegister(a, v) => Request::WriteSingleRegister(*a, *v),
            Write::MultipleRegisters(a, v) => {
                Request::WriteMultipleRegisters(*a, v.as_slice().into())
            }
            Write::MaskWrite(a, and, or) => Request::MaskWriteRegister(*a, *and, *or),
        };
        self.call(unit, request, timeout).await.map(|_| ())
    }

    fn out_of_step(&mut self, message: String) -> RequestError {
        self.reset();
        RequestError::Protocol(message)
    }
}

/// How long an RTU line is left alone after a timeout before the port is reopened (reopening
/// throws away whatever arrived meanwhile): as long as the timeout itself, at most 1 s, never
/// less than two frame gaps. So a reply up to twice the timeout after its request is thrown
/// away instead of being read as the answer to the next request (possibly another device's);
/// libmodbus' link recovery waits the same. The cost: a silent device costs the others its
/// timeout twice per failed poll, and a failing device's polls are spaced out by its back-off.
/// Half the timeout capped at 100 ms was too short: libmodbus' unit-test server's slow
/// register (500 ms against a 300 ms timeout) failed the next request.
pub fn late_reply_guard(frame_gap: Duration, timeout: Duration) -> Duration {
    timeout.min(Duration::from_secs(1)).max(frame_gap * 2)
}

fn transport_error(e: io::Error) -> RequestError {
    // tokio-modbus 0.17 reports a stream that ended (the device closed the connection) as
    // `io::Error::last_os_error()`, i.e. whatever errno was left over: usually EAGAIN or
    // EINPROGRESS. Say what happened instead of a misleading OS message.
    const EINPROGRESS: i32 = 115;
    if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(EINPROGRESS) {
        return RequestError::Transport("connection closed by the device".into());
    }
    if e.kind() == io::ErrorKind::InvalidData {
        // The codec could not frame what arrived (bad CRC, garbage, short frame).
        RequestError::Protocol(e.to_string())
    } else {
        RequestError::Transport(e.to_string())
    }
}

pub fn endpoint(kind: &BusKind) -> String {
    match kind {
        BusKind::Rtu(s) => format!("{}@{}", s.port, s.baud),
        BusKind::Tcp { host, port } => format!("tcp://{host}:{port}"),
        BusKind::RtuOverTcp { host, port } => format!("rtu+tcp://{host}:{port}"),
        BusKind::Lines(l) => format!("{}@{} (lines)", l.serial.port, l.serial.baud),
    }
}

async fn open(kind: &BusKind) -> io::Result<Context> {
    // The unit is set on every call; the one given here is never used for a request.
    let placeholder = Slave(1);
    match kind {
        BusKind::Tcp { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Ok(tokio_modbus::client::tcp::attach_slave(stream, placeholder))
        }
        BusKind::RtuOverTcp { host, port } => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Ok(tokio_modbus::client::rtu::attach_slave(stream, placeholder))
        }
        BusKind::Rtu(serial) => {
            let port = open_serial(serial)?;
            Ok(tokio_modbus::client::rtu::attach_slave(port, placeholder))
        }
        BusKind::Lines(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a lines bus carries no Modbus",
        )),
    }
}

/// Opens a serial port and throws away whatever was buffered (a late reply from before a
/// reset must not be read as the next answer).
pub fn open_serial(serial: &Serial) -> io::Result<tokio_serial::SerialStream> {
    use tokio_serial::SerialPort;
    let builder = tokio_serial::new(&serial.port, serial.baud)
        .data_bits(match serial.data_bits {
            7 => tokio_serial::DataBits::Seven,
            _ => tokio_serial::DataBits::Eight,
        })
        .parity(match serial.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(match serial.stop_bits {
            2 => tokio_serial::StopBits::Two,
            _ => tokio_serial::StopBits::One,
        })
        .timeout(Duration::from_millis(100));
    let port = tokio_serial::SerialStream::open(&builder).map_err(io::Error::from)?;
    // Some pseudo-terminals refuse the flush ioctl; a failed flush is not a failed open.
    let _ = port.clear(tokio_serial::ClearBuffer::All);
    Ok(port)
}
