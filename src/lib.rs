//! fieldbridge: a gateway from field devices (Modbus RTU, Modbus TCP, serial sensors) to MQTT.
//!
//! # Layout
//! - [`model`]: the validated configuration every other module runs on (plain data).
//! - [`config`]: YAML loading and validation (raw serde structs → [`model::Config`]), errors with
//!   path, line, column and hint; device profiles (`config::profile`: `profiles/NAME.yaml`
//!   merged into the devices that name them, errors naming the profile file).
//! - [`codec`]: registers ↔ typed values, both directions (pure).
//! - [`plan`]: points → coalesced read blocks within protocol limits; bad ranges (pure).
//! - [`publish`]: the publisher stage, everything between a decoded reading and a message for
//!   the link: the task (`publish::run`: bus events and the router's written values and
//!   results in, messages out), the change filters (`publish::filter`), the payload encoding
//!   behind one seam (`publish::Encoder`: JSON in `publish::json`, Sparkplug B in
//!   `publish::sparkplug` with its payload schema in `publish::sparkplug::proto`), the will,
//!   births, goodbye and rendering at send time (`link::Announcer`, implemented by both
//!   encodings: JSON's `online`/`offline`, the held-back mark and the Home Assistant discovery
//!   configs of `publish::homeassistant`; Sparkplug's NBIRTH/DBIRTH/NDEATH, `seq`, `bdSeq`,
//!   `is_historical`, the primary host's STATE gate), the stats message (`publish::stats`),
//!   the MQTT rules for topics (`publish::topic`).
//! - [`modbus`]: one task per bus owning its connection; timeouts, reset after a timeout,
//!   frame gap (kept with a timerfd, `modbus::precise`: tokio rounds sleeps up to whole
//!   milliseconds), reconnect back-off, device scheduling and write priority.
//! - [`lines`]: serial devices that print lines of text (streamed or polled): pure parsing
//!   and templates in `lines::parse`, one task per port in `lines::task`, same bus interface.
//! - [`link`]: the MQTT link task: owns the rumqttc event loop, tracks every message until
//!   its PUBACK, re-sends after reconnect, bounded queue with a declared policy; payloads are
//!   opaque bytes (what it says around a session, and the mark on a held-back message, it asks
//!   of the publisher stage's `Announcer`); `mqtt.servers` failover; MQTT 3.1.1
//!   or 5 behind one face (`link::proto`), prompt TCP ACKs to the broker (`link::quickack`),
//!   which command filters to subscribe to and how (`link::subscribe`).
//! - [`store`]: the SQLite outbox (one owner thread): spill, drain, cap, crash safety, reading
//!   around damage, disk full.
//! - [`command`]: MQTT command topics → validated writes through the bus queue, a result for
//!   every command (pure: the whole decision in `command::decide`, validation, encoding, the
//!   clock; the router task in `command::router`: routing, refusal budgets, the bus hand-off;
//!   results and written values go to the publisher stage as events).
//! - [`app`]: wires buses, router, publisher stage and link together; reloads; ordered
//!   shutdown.
//! - [`cli`]: `run`, `check`, `read` sub-commands.
//! - [`logging`]: journal (structured fields) under systemd, compact format on a terminal.
//! - [`notify`]: the sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING) over `NOTIFY_SOCKET`.
//! - [`health`]: task heartbeats, the watchdog decision and the status line; the supervisor
//!   task that sends them.

pub mod app;
pub mod cli;
pub mod codec;
pub mod command;
pub mod config;
pub mod health;
pub mod lines;
pub mod link;
pub mod logging;
pub mod modbus;
pub mod model;
pub mod notify;
pub mod plan;
pub mod publish;
pub mod store;
