//! Stage 1: serde structs mirroring the YAML, with no logic.
//!
//! Unknown keys are refused here (`deny_unknown_fields`). Leaves whose checks need a good
//! message (durations, enums, ranges) are kept loose (`String`, `i64`, `Value`) so that stage 2
//! can report every bad value at once, with the allowed list, instead of serde's first error.

use super::yaml::{Mapping, Value};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway: RawGateway,
    pub mqtt: RawMqtt,
    pub buses: Vec<RawBus>,
    pub devices: Vec<RawDevice>,
    pub store: Option<RawStore>,
    pub sparkplug: Option<RawSparkplug>,
    pub homeassistant: Option<RawHomeAssistant>,
    pub http: Option<RawHttp>,
}

/// `http:` the metrics, health and status page endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub listen: Option<String>,
    pub token_file: Option<String>,
    pub basic_auth_file: Option<String>,
    pub max_connections: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHomeAssistant {
    pub discovery: Option<bool>,
    pub prefix: Option<String>,
}

/// A point's Home Assistant settings: `false` (not announced) or overrides.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawPointHa {
    Enabled(bool),
    Settings(RawPointHaSettings),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPointHaSettings {
    pub device_class: Option<String>,
    pub state_class: Option<String>,
    pub entity_category: Option<String>,
    pub icon: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSparkplug {
    pub group_id: String,
    pub edge_node_id: String,
    pub primary_host_id: Option<String>,
    pub data_qos: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// A path, or `none` for no store.
    pub path: Option<String>,
    pub max_bytes: Option<i64>,
    pub max_age: Option<Value>,
    pub durability: Option<String>,
    pub spill_threshold: Option<i64>,
    pub commit_every: Option<i64>,
    pub commit_interval: Option<Value>,
    pub synchronous: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub id: String,
    pub prefix: Option<String>,
    pub log_level: Option<String>,
    pub stats_interval: Option<Value>,
    pub clock: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// `3.1.1` (a string) or `5` (a number in YAML): taken as a value and checked.
    pub protocol: Option<Value>,
    pub url: Option<String>,
    /// Several brokers (a cluster, a standby): URLs tried in turn.
    pub servers: Option<Vec<String>>,
    pub host: Option<String>,
    pub port: Option<i64>,
    pub transport: Option<String>,
    pub ws_path: Option<String>,
    pub client_id: Option<String>,
    pub keep_alive: Option<Value>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    /// A systemd credential (`LoadCredential=NAME:/path`): read from
    /// `$CREDENTIALS_DIRECTORY/NAME`.
    pub password_credential: Option<String>,
    pub password: Option<String>,
    pub allow_inline_password: Option<bool>,
    pub tls: Option<RawTls>,
    pub max_packet_size: Option<i64>,
    pub queue: Option<RawQueue>,
    pub inflight: Option<i64>,
    pub reconnect: Option<RawReconnect>,
    pub status_topic: Option<String>,
    pub response_topics: Option<Vec<String>>,
    /// `clean` (the default) or `persistent`.
    pub session: Option<String>,
    /// MQTT 5 session expiry interval of a persistent session.
    pub session_expiry: Option<Value>,
    /// MQTT 5 will delay interval.
    pub will_delay: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub capacity: Option<i64>,
    pub max_bytes: Option<i64>,
    pub when_full: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReconnect {
    pub min: Option<Value>,
    pub max: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Serial device path (rtu) or TCP port number (tcp kinds).
    pub port: Option<Value>,
    pub baud: Option<i64>,
    pub data_bits: Option<i64>,
    pub parity: Option<String>,
    pub stop_bits: Option<i64>,
    pub frame_gap: Option<Value>,
    pub host: Option<String>,
    pub connect_delay: Option<Value>,
    pub reconnect_max: Option<Value>,
    /// `lines` buses: `\n` (default), `\r\n` or `\r`.
    pub line_end: Option<String>,
    pub max_line: Option<i64>,
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    pub mode: Option<String>,
    pub deadband: Option<f64>,
    pub heartbeat: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    pub name: String,
    pub bus: String,
    pub unit: Option<i64>,
    pub interval: Option<Value>,
    pub timeout: Option<Value>,
    pub offline_after: Option<i64>,
    pub backoff_max: Option<Value>,
    pub max_gap: Option<i64>,
    pub max_registers: Option<i64>,
    pub max_bits: Option<i64>,
    /// Group name → interval, in YAML order.
    pub groups: Option<Mapping>,
    pub message: Option<String>,
    pub topic: Option<String>,
    pub payload: Option<String>,
    pub publish: Option<RawPublish>,
    pub qos: Option<i64>,
    pub retain: Option<bool>,
    /// Defaults for the command settings of this device's writable points.
    pub command: Option<RawCommand>,
    /// Default word order of the multi-register points that give none.
    pub order: Option<String>,
    /// A device profile (`profiles/NAME.yaml`): its points and defaults.
    pub profile: Option<String>,
    /// Names of the profile's points this device does not read.
    pub points_exclude: Option<Vec<String>>,
    /// `auto`: the points come from SunSpec discovery on the device at run time.
    pub sunspec: Option<String>,
    /// May be omitted with a profile or `sunspec`.
    #[serde(default)]
    pub points: Vec<RawPoint>,
    /// Home Assistant's device registry (optional).
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    /// Devices of `lines` buses: `stream` or `poll`.
    pub mode: Option<String>,
    pub query: Option<String>,
    pub parse: Option<RawParse>,
    pub checksum: Option<String>,
    pub sample: Option<String>,
}

/// How a line device's lines are parsed: exactly one of the three.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParse {
    pub regex: Option<String>,
    pub kv: Option<RawKv>,
    pub json: Option<RawJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKv {
    pub separator: Option<String>,
    pub assign: Option<String>,
}

/// `json: {}` (no options yet).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJson {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPoint {
    pub name: String,
    pub register: Option<String>,
    /// Required for Modbus points; line points name a `field` instead.
    pub address: Option<i64>,
    #[serde(rename = "type")]
    pub data_type: Option<String>,
    pub bit: Option<i64>,
    pub length: Option<i64>,
    pub order: Option<String>,
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub unit: Option<String>,
    /// Raw integer → label, in YAML order.
    pub labels: Option<Box<Mapping>>,
    pub group: Option<String>,
    pub topic: Option<String>,
    pub payload: Option<String>,
    pub publish: Option<Box<RawPublish>>,
    pub qos: Option<i64>,
    pub retain: Option<bool>,
    pub writable: Option<bool>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub command: Option<Box<RawCommand>>,
    pub homeassistant: Option<Box<RawPointHa>>,
    /// Line points: capture name, key or JSON pointer.
    pub field: Option<String>,
}

/// Command settings (device defaults or per point).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommand {
    pub topic: Option<String>,
    pub result_topic: Option<String>,
    pub write_multiple: Option<bool>,
    pub bit_write: Option<String>,
    pub read_back: Option<bool>,
    pub max_age: Option<Value>,
    pub rate: Option<String>,
    /// Line points: the command line (`SET {value:.1}\r\n`) and the reply regex.
    pub template: Option<String>,
    pub reply: Option<String>,
}

/// A device profile file (`profiles/NAME.yaml`): metadata, device defaults and points.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub name: String,
    pub vendor: String,
    pub model: String,
    /// The vendor's register-map document and its revision.
    pub document: String,
    /// Anything a user should know (variants, firmware, wiring).
    pub notes: Option<String>,
    pub device: Option<RawProfileDevice>,
    pub points: Vec<RawPoint>,
}

/// What a profile sets that a device may set; the device's own keys win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfileDevice {
    pub unit: Option<i64>,
    pub interval: Option<Value>,
    pub timeout: Option<Value>,
    pub offline_after: Option<i64>,
    pub backoff_max: Option<Value>,
    pub max_gap: Option<i64>,
    pub max_registers: Option<i64>,
    pub max_bits: Option<i64>,
    pub groups: Option<Mapping>,
    pub order: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load holds one `RawPoint` per point (10k points: 10k of them, with the Vec's
    /// doubling); the rarely given sections are boxed so that a plain point stays small. At
    /// 880 bytes inline they were 11 MiB of a 10k-point load's 24 MiB heap peak.
    #[test]
    fn a_raw_point_stays_small() {
        let size = std::mem::size_of::<RawPoint>();
        assert!(size <= 400, "RawPoint is {size} bytes");
    }
}
