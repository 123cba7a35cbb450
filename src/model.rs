//! The validated configuration: what the rest of the gateway runs on.
//!
//! Built by [`crate::config`] from the raw YAML structs; every value here has already been
//! checked (ranges, references, topics), so runtime code never re-validates. Indices
//! (`Device::bus`, `Point::group`) point into sibling vectors and are guaranteed in range.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub gateway: Gateway,
    pub mqtt: Mqtt,
    pub buses: Vec<Bus>,
    pub devices: Vec<Device>,
    pub store: Store,
    /// Sparkplug B edge node mode (`sparkplug:`); `None`: JSON topics and payloads.
    pub sparkplug: Option<Sparkplug>,
    /// Home Assistant MQTT discovery (`homeassistant: { discovery: true }`).
    pub homeassistant: Option<HomeAssistant>,
    /// The HTTP endpoint (`http:`): metrics, health, the status page. Off when `None`.
    pub http: Option<Http>,
}

/// The HTTP endpoint's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Http {
    pub listen: std::net::SocketAddr,
    /// Required for a listener that is not on loopback.
    pub auth: Option<HttpAuth>,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
}

/// Credentials a request must carry (`Authorization:`), read from a file at load time.
#[derive(Debug, Clone, PartialEq)]
pub enum HttpAuth {
    /// `Authorization: Bearer TOKEN`.
    Bearer(Secret),
    /// `Authorization: Basic base64(user:password)`: the file holds `user:password`.
    Basic(Secret),
}

/// Home Assistant MQTT discovery: every device and point announced under `prefix`.
#[derive(Debug, Clone, PartialEq)]
pub struct HomeAssistant {
    pub prefix: String,
}

/// A device's Home Assistant settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceHa {
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    /// By point index.
    pub points: Vec<PointHa>,
}

/// A point's Home Assistant settings (overrides of what the gateway derives).
#[derive(Debug, Clone, PartialEq)]
pub struct PointHa {
    /// Announced at all (`homeassistant: false` opts out).
    pub enabled: bool,
    pub device_class: Option<String>,
    pub state_class: Option<String>,
    pub entity_category: Option<String>,
    pub icon: Option<String>,
    /// The entity's name in Home Assistant (default: the point's name).
    pub name: Option<String>,
}

impl Default for PointHa {
    fn default() -> Self {
        PointHa {
            enabled: true,
            device_class: None,
            state_class: None,
            entity_category: None,
            icon: None,
            name: None,
        }
    }
}

/// Sparkplug B 3.0: the gateway is edge node `edge_node_id` of group `group_id`; every device
/// is a Sparkplug device, every point a metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparkplug {
    pub group_id: String,
    pub edge_node_id: String,
    /// Births wait for this host application's STATE `online` (Sparkplug 3.0 primary host).
    pub primary_host_id: Option<String>,
    /// QoS of NDATA and DDATA: 0 as the specification demands, or 1 (outside it) for the
    /// PUBACK-tracked delivery of the JSON mode. Births and deaths are QoS 0 always.
    pub data_qos: Qos,
}

/// When readings are written to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Only while the broker is unreachable or the link is backed up (no SD-card writes while
    /// healthy). kill -9 while online loses what was not yet acknowledged (at most
    /// `spill_threshold` messages).
    Auto,
    /// Every reading is written to the store first. kill -9 loses at most the last group
    /// commit window.
    Always,
}

/// SQLite `synchronous` setting of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit: survives power loss up to the last commit.
    Full,
    /// fsync at checkpoints only: survives a crash of the process, not always a power loss.
    Normal,
}

/// The store-and-forward outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// SQLite file. `None`: no store, the in-memory queue only.
    pub path: Option<PathBuf>,
    /// Cap of the stored messages (topic + payload + row overhead), bytes.
    pub max_bytes: u64,
    /// Messages older than this are dropped (counted), if set.
    pub max_age: Option<Duration>,
    pub durability: Durability,
    /// Unacknowledged messages in memory above which new ones go to the store.
    pub spill_threshold: usize,
    /// Group commit: after this many writes ...
    pub commit_every: usize,
    /// ... or this long after the first uncommitted write, whichever comes first.
    pub commit_interval: Duration,
    pub synchronous: Synchronous,
}

impl Store {
    /// Defaults used when the YAML has no `store` section; the path is
    /// `$STATE_DIRECTORY/outbox.db` under systemd, else `/var/lib/fieldbridge/outbox.db`.
    pub fn default_path() -> PathBuf {
        match std::env::var_os("STATE_DIRECTORY") {
            // systemd may list several directories separated by ':'; the first is ours.
            Some(dirs) => {
                let dirs = dirs.to_string_lossy().into_owned();
                let first = dirs.split(':').next().unwrap_or("").to_string();
                PathBuf::from(first).join("outbox.db")
            }
            None => PathBuf::from("/var/lib/fieldbridge/outbox.db"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    /// Gateway identity; also the default MQTT client id and topic prefix.
    pub id: String,
    /// Topic prefix (`{prefix}` in templates). Defaults to `id`.
    pub prefix: String,
    /// `tracing` filter directive (e.g. `info`, `fieldbridge=debug`); `RUST_LOG` overrides it.
    pub log_level: String,
    /// Period of the statistics message on `{prefix}/status/stats`; `None`: not published.
    pub stats_interval: Option<Duration>,
    /// Which wall clock commands that carry a time (`ts`, `expires`, `max_age`) trust.
    pub clock: ClockPolicy,
}

/// When the wall clock is good enough to judge a command's age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockPolicy {
    /// Only while the kernel reports the clock synchronised (an NTP client such as
    /// systemd-timesyncd or chrony has set it), and never before the build date.
    #[default]
    Ntp,
    /// The local clock is trusted (a real-time clock, no NTP client), except before the
    /// build date.
    Local,
}

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttProtocol {
    /// MQTT 3.1.1: every broker speaks it.
    #[default]
    V311,
    /// MQTT 5: request/response (response topic, correlation data), message expiry on
    /// commands, reason codes on PUBACK, the broker's receive maximum.
    V5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttTransport {
    Tcp,
    Tls,
    Ws,
    Wss,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle (PEM) used to verify the broker. `None`: the system roots are not used;
    /// a CA is required for TLS (validated at load).
    pub ca: PathBuf,
    /// Client certificate chain and key (PEM) for mutual TLS; both or neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A secret string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

/// What happens when the in-memory queue of unacknowledged messages is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the oldest queued message (counted and logged once per episode).
    DropOldest,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mqtt {
    pub protocol: MqttProtocol,
    pub transport: MqttTransport,
    pub host: String,
    pub port: u16,
    /// Path for WebSocket transports (e.g. `/mqtt`).
    pub ws_path: String,
    pub client_id: String,
    pub keep_alive: Duration,
    pub username: Option<String>,
    /// Resolved at load time from `password_file` / `password_env` (or inline if the user insists).
    pub password: Option<Secret>,
    pub tls: Option<TlsFiles>,
    /// Largest MQTT packet accepted or sent, bytes.
    pub max_packet_size: usize,
    /// Messages the link keeps in memory waiting for delivery (not yet PUBACKed).
    pub queue_capacity: usize,
    /// Bytes (topic + payload) of the messages the link keeps in memory, at most.
    pub queue_max_bytes: usize,
    pub when_full: WhenFull,
    /// Messages on the wire awaiting PUBACK at once.
    pub inflight: u16,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Gateway status topic (last will `offline`, `online` on connect, retained).
    pub status_topic: String,
    /// MQTT 5 response topics a command may ask its result to be copied to (filters); empty:
    /// any topic outside the gateway's own. Never one the gateway itself publishes or reads.
    pub response_topics: Vec<String>,
    /// Every broker to try, in turn (`mqtt.servers`); the first is `transport`, `host`,
    /// `port`, `ws_path` above. One entry without `servers`.
    pub servers: Vec<Server>,
    /// `mqtt.session`: what the broker keeps for us between connections.
    pub session: MqttSession,
    /// MQTT 5 will delay interval (`mqtt.will_delay`, whole seconds): zero fires the will as
    /// soon as the connection drops.
    pub will_delay: Duration,
}

/// `mqtt.session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttSession {
    /// Clean session (3.1.1) / Clean Start with session expiry 0 (MQTT 5): the broker keeps
    /// nothing once the connection drops.
    Clean,
    /// 3.1.1 clean session false; MQTT 5 Clean Start 0 with this session expiry interval
    /// (whole seconds). The broker keeps our subscriptions and queues QoS 1 commands
    /// published while we are away.
    Persistent { expiry: Duration },
}

/// One broker of `mqtt.servers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub transport: MqttTransport,
    pub host: String,
    pub port: u16,
    pub ws_path: String,
}

impl Mqtt {
    /// The same settings, for broker `s`.
    pub fn with_server(&self, s: &Server) -> Mqtt {
        Mqtt {
            transport: s.transport,
            host: s.host.clone(),
            port: s.port,
            ws_path: s.ws_path.clone(),
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Serial {
    pub port: String,
    pub baud: u32,
    /// 7 or 8.
    pub data_bits: u8,
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BusKind {
    /// Modbus RTU over a serial line.
    Rtu(Serial),
    /// Modbus TCP (MBAP framing).
    Tcp { host: String, port: u16 },
    /// Modbus RTU frames carried over a TCP connection (serial device servers).
    RtuOverTcp { host: String, port: u16 },
    /// A serial port of devices that print lines of text (see [`crate::lines`]).
    Lines(LineBus),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    pub name: String,
    pub kind: BusKind,
    /// Silent interval kept between frames (RTU kinds): 3.5 character times computed from the
    /// baud rate, 1.75 ms above 19200 baud, or the user's larger value. Zero for TCP.
    pub frame_gap: Duration,
    /// Pause after connecting before the first request (some serial servers need it).
    pub connect_delay: Duration,
    /// Cap of the reconnect back-off.
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RegisterKind {
    /// Coils, read with FC1, written with FC5/FC15.
    Coil,
    /// Discrete inputs, read with FC2.
    DiscreteInput,
    /// Holding registers, read with FC3, written with FC6/FC16.
    Holding,
    /// Input registers, read with FC4.
    Input,
}

impl RegisterKind {
    pub fn is_bits(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::DiscreteInput)
    }
    /// Function code used to read this kind.
    pub fn read_function(self) -> u8 {
        match self {
            RegisterKind::Coil => 1,
            RegisterKind::DiscreteInput => 2,
            RegisterKind::Holding => 3,
            RegisterKind::Input => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// A coil or discrete input.
    Bool,
    /// One bit (0 = least significant) of a 16-bit register.
    Bit(u8),
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// ASCII text in N registers, two characters per register; trailing NULs and spaces trimmed.
    Ascii(u16),
}

impl DataType {
    /// Registers (or bits, for `Bool`) this type occupies.
    pub fn width(self) -> u16 {
        match self {
            DataType::Bool | DataType::Bit(_) | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::Ascii(n) => n,
        }
    }
}

/// Byte and word order of a multi-register value, named after how the bytes of a 32-bit value
/// `A B C D` (A most significant) appear on the wire. It is two independent swaps, so the same
/// four names cover 16-, 32- and 64-bit values:
/// - `Abcd`: big-endian words, big-endian bytes (the Modbus default).
/// - `Cdab`: word order reversed (low word first), bytes big-endian within each word.
/// - `Badc`: bytes swapped within each word, words big-endian.
/// - `Dcba`: both (fully little-endian).
///
/// For 64-bit values these are `ABCDEFGH`, `GHEFCDAB`, `BADCFEHG`, `HGFEDCBA`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WordOrder {
    #[default]
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl WordOrder {
    pub const ALL: [WordOrder; 4] = [
        WordOrder::Abcd,
        WordOrder::Cdab,
        WordOrder::Badc,
        WordOrder::Dcba,
    ];
    pub fn word_swap(self) -> bool {
        matches!(self, WordOrder::Cdab | WordOrder::Dcba)
    }
    pub fn byte_swap(self) -> bool {
        matches!(self, WordOrder::Badc | WordOrder::Dcba)
    }
    pub fn name(self) -> &'static str {
        match self {
            WordOrder::Abcd => "ABCD",
            WordOrder::Cdab => "CDAB",
            WordOrder::Badc => "BADC",
            WordOrder::Dcba => "DCBA",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `{"value": 230.1, "unit": "V", "ts": "2026-11-21T10:00:00.123Z"}`
    Json,
    /// The bare value as text: `230.1`.
    Value,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PublishPolicy {
    /// Publish every reading.
    EveryPoll,
    /// Publish when the value moved by more than `deadband` (absolute; 0 = any change) since the
    /// last published value, or `heartbeat` has passed since the last publish.
    OnChange {
        deadband: f64,
        heartbeat: Option<Duration>,
    },
}

/// How readings of a device are grouped into MQTT messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageMode {
    /// One message per point on the point's topic.
    PerPoint,
    /// One JSON message per device and poll group on the device topic with every point's value.
    PerDevice,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PollGroup {
    /// `default` for the device's own interval.
    pub name: String,
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub name: String,
    /// Index into `Config::buses`.
    pub bus: usize,
    /// Modbus unit (slave) id, 1..=247 (0 is broadcast and never used for reads).
    pub unit: u8,
    /// Poll groups; index 0 is the device's `default` group with its own interval.
    pub groups: Vec<PollGroup>,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Consecutive failed polls after which the device is reported offline.
    pub offline_after: u32,
    /// Cap of the back-off applied to a failing device's polls.
    pub backoff_max: Duration,
    /// Largest run of unused registers (or bits) bridged when coalescing reads.
    pub max_gap: u16,
    /// Largest read, registers (<= 125) and bits (<= 2000).
    pub max_registers: u16,
    pub max_bits: u16,
    pub message_mode: MessageMode,
    /// Topic of per-device messages (`MessageMode::PerDevice`).
    pub topic: String,
    /// `{prefix}/{device}/status`: `online` / `offline`, retained.
    pub status_topic: String,
    pub points: Vec<Point>,
    /// Indices of `points` sorted by name: the order of a per-device message's values.
    pub points_by_name: Vec<usize>,
    /// Command settings of each point: `commands[i]` belongs to `points[i]` (same length).
    pub commands: Vec<PointCommand>,
    /// Set for the devices of a `lines` bus (their points have no register: `kind` and
    /// `address` are unused, the field each point reads is in `LineDevice::points`).
    pub line: Option<LineDevice>,
    /// Home Assistant discovery settings.
    pub ha: DeviceHa,
    /// The profile the device's points came from, if any.
    pub profile: Option<DeviceProfile>,
    /// `sunspec: auto`: the device's models are discovered at run time.
    pub sunspec: Option<SunSpecDevice>,
}

/// A device whose points come from SunSpec discovery (`sunspec: auto`).
#[derive(Debug, Clone, PartialEq)]
pub struct SunSpecDevice {
    /// What discovery found, once it has run: its points are then among the device's (as
    /// profile points, [`DeviceProfile`]). `None`: not discovered yet, the bus discovers.
    pub found: Option<std::sync::Arc<crate::sunspec::Discovered>>,
}

/// A device's profile as `check` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProfile {
    pub name: String,
    /// The profile file read.
    pub file: String,
    pub document: String,
    /// Where each point came from: `sources[i]` belongs to `points[i]`.
    pub sources: Vec<PointSource>,
    /// Profile points left out by `points_exclude`.
    pub excluded: Vec<String>,
}

/// Where a point of a device with a profile came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSource {
    Profile,
    /// A profile point that the device replaces or changes by name.
    Overridden,
    /// A point of the device's own.
    Device,
}

/// How a bit inside a register is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BitWrite {
    /// Read the register (FC3), set the bit, write it back (FC6, or FC16 with
    /// `write_multiple`). Works with every device; another writer changing the same register
    /// between the read and the write loses its change.
    #[default]
    ReadModifyWrite,
    /// FC22 mask write register: atomic on the device, which must support it.
    Mask,
}

/// At most `count` commands per `per` for one point (a token bucket of `count` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// What the command path needs to know about one point (see [`crate::command`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PointCommand {
    /// Rendered command topic (`{prefix}/{device}/{point}/set` by default).
    pub topic: String,
    /// Rendered result topic (`{prefix}/{device}/{point}/set/result` by default).
    pub result_topic: String,
    /// FC16 (registers) or FC15 (coils) even for a single register or coil.
    pub write_multiple: bool,
    pub bit_write: BitWrite,
    /// Read the point again after the write and report/publish what the device holds.
    pub read_back: bool,
    /// Commands older than this (by their `ts`) are refused; needs `ts` or `expires`.
    pub max_age: Option<Duration>,
    pub rate: Option<Rate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: String,
    pub kind: RegisterKind,
    pub address: u16,
    pub data_type: DataType,
    pub order: WordOrder,
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
    /// Raw integer value -> label. When present the label is published as the value.
    pub labels: BTreeMap<i64, String>,
    /// Index into `Device::groups`.
    pub group: usize,
    /// Rendered topic.
    pub topic: String,
    pub payload: PayloadFormat,
    pub publish: PublishPolicy,
    pub qos: Qos,
    pub retain: bool,
    /// Accepts commands (holding registers and coils only). Used by the command path.
    pub writable: bool,
    /// Engineering-unit bounds for writes.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Point {
    /// Registers (or bits) this point occupies starting at `address`.
    pub fn width(&self) -> u16 {
        self.data_type.width()
    }
    /// Last address used (inclusive). Validation guarantees no overflow.
    pub fn last_address(&self) -> u16 {
        self.address + (self.width() - 1)
    }
}

/// A decoded, scaled reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
}

impl Value {
    /// Numeric view for deadband comparison; `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(i as f64),
            Value::UInt(u) => Some(u as f64),
            Value::Float(f) => Some(f),
            Value::Text(_) => None,
        }
    }
}

/// Text encoding of a line bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lines that are not valid UTF-8 are counted and dropped.
    Utf8,
    /// Every byte is one character (ISO 8859-1): never invalid.
    Latin1,
}

/// A serial port of text devices (`type: lines`).
#[derive(Debug, Clone, PartialEq)]
pub struct LineBus {
    pub serial: Serial,
    /// Terminator of received lines and the default of sent ones: `\n`, `\r\n` or `\r`.
    pub line_end: Vec<u8>,
    /// Longest line accepted, bytes (terminator excluded); longer ones are dropped, counted.
    pub max_line: usize,
    pub encoding: Encoding,
}

/// How a line device talks.
#[derive(Debug, Clone, PartialEq)]
pub enum LineMode {
    /// The device prints lines by itself; `Device::timeout` is the longest expected silence.
    Stream,
    /// The gateway sends `query` every `interval` and waits `timeout` for the answer line.
    Poll { query: Vec<u8> },
}

/// How one line becomes named fields.
#[derive(Debug, Clone, PartialEq)]
pub enum LineParser {
    /// A regular expression with named captures (validated at load).
    Regex(String),
    /// `key=value` pairs separated by `separator`; `assign` between key and value.
    Kv { separator: String, assign: String },
    /// One JSON object per line; fields are top-level keys or JSON pointers (`/a/0/b`).
    Json,
}

/// An optional integrity check of each line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// NMEA 0183: `$...*hh`, XOR of the bytes between `$` (or `!`) and `*`, two hex digits.
    Nmea,
}

/// What a line device needs beyond a Modbus device.
#[derive(Debug, Clone, PartialEq)]
pub struct LineDevice {
    pub mode: LineMode,
    pub parser: LineParser,
    pub checksum: Option<Checksum>,
    /// A sample line shown parsed by `fieldbridge check`.
    pub sample: Option<String>,
    /// `points[i]` belongs to `Device::points[i]`.
    pub points: Vec<LinePoint>,
}

/// The line side of one point.
#[derive(Debug, Clone, PartialEq)]
pub struct LinePoint {
    /// Capture name (regex), key (kv), key or JSON pointer (json).
    pub field: String,
    /// For writable points: the line sent.
    pub command: Option<LineCommand>,
}

/// A templated command line (`SET {value:.1}\r\n`) and the reply it expects.
#[derive(Debug, Clone, PartialEq)]
pub struct LineCommand {
    /// With escapes already resolved; `{value}` / `{value:.N}` placeholders (validated).
    pub template: String,
    /// Regular expression a reply line must match (validated); `None`: no reply awaited.
    pub reply: Option<String>,
}
