//! fieldbridge: a gateway from field devices (Modbus RTU, Modbus TCP, serial sensors) to MQTT.
//!
//! # Layout
//! - [`model`]: the validated configuration every other module runs on (plain data).
//! - [`config`]: YAML loading and validation (raw serde structs → [`model::Config`]), errors with
//!   path, line, column and hint.
//! - [`codec`]: registers ↔ typed values, both directions (pure).
//! - [`plan`]: points → coalesced read blocks within protocol limits; bad ranges (pure).
//! - [`publish`]: topics, payloads and the change filter (pure).
//! - [`modbus`]: one task per bus owning its connection; timeouts, reset after a timeout,
//!   frame gap, reconnect back-off, device scheduling and write priority.
//! - [`link`]: the MQTT link task: owns the rumqttc event loop, tracks every message until
//!   its PUBACK, re-sends after reconnect, bounded queue with a declared policy.
//! - [`app`]: wires buses, publisher and link together; ordered shutdown.
//! - [`cli`]: `run`, `check`, `read` sub-commands.

pub mod app;
pub mod cli;
pub mod codec;
pub mod config;
pub mod link;
pub mod modbus;
pub mod model;
pub mod plan;
pub mod publish;
