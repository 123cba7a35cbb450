//! Logging: the systemd journal with structured fields under systemd, a compact readable format
//! on a terminal.
//!
//! # Journal
//! Chosen when stderr *is* the journal stream (`JOURNAL_STREAM` names the device and inode of
//! stderr, systemd.exec(5)) or when `--journald` is given. Each event becomes one journal entry:
//! - `MESSAGE`: the message followed by its fields as `key=value`, the same line a terminal
//!   shows, so that `journalctl -u fieldbridge` is readable without `-o verbose`;
//! - one field per event field, upper-cased (`DEVICE=`, `BUS=`, `ERROR=`, `TOPIC=`, `POINT=`),
//!   with `unit` renamed `UNIT_ID` (journald's own `UNIT` names a systemd unit), so that
//!   `journalctl -u fieldbridge DEVICE=meter1 -p warning` works;
//! - `PRIORITY` from the level: error 3, warn 4, info 5 (notice), debug 6, trace 7.
//!
//! The entries are sent by systemd-journal-logger's `journal_send` (native protocol, memfd for
//! large entries) from the small [`JournalLayer`] below, not through tracing's `log` bridge,
//! which would flatten fields into the text and log every span enter and exit.
//!
//! If the journal socket cannot be opened, logs go to stderr without colours (which systemd
//! also sends to the journal, only without fields).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Where logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journal,
    Terminal,
}

/// The journal when stderr is connected to it or when forced, else the terminal format.
pub fn choose(force_journald: bool) -> Sink {
    if force_journald || systemd_journal_logger::connected_to_journal() {
        Sink::Journal
    } else {
        Sink::Terminal
    }
}

/// Installs the global subscriber. `RUST_LOG` wins over `default_level` (the config's
/// `gateway.log_level`); an invalid directive falls back to `info`.
pub fn init(default_level: &str, sink: Sink) {
    let filter = || filter_from_env(default_level);
    if sink == Sink::Journal {
        match systemd_journal_logger::JournalLog::new() {
            Ok(journal) => {
                let journal = journal.with_syslog_identifier("fieldbridge".to_string());
                let _ = tracing_subscriber::registry()
                    .with(JournalLayer { journal }.with_filter(filter()))
                    .try_init();
                return;
            }
            Err(e) => eprintln!("fieldbridge: journal not available ({e}); logging to stderr"),
        }
    }
    let ansi = sink == Sink::Terminal
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .compact()
                .with_filter(filter()),
        )
        .try_init();
}

/// `RUST_LOG` if it is set and parses, else `default_level`, else `info`.
pub fn filter_from_env(default_level: &str) -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| parse_filter(&v).ok())
        .or_else(|| parse_filter(default_level).ok())
        .unwrap_or_else(|| Targets::new().with_default(Level::INFO))
}

/// Parses a log filter: `info`, or `info,fieldbridge::modbus=debug` (a default level and
/// per-target levels; a target names a module path and everything under it). The syntax of
/// `RUST_LOG` without span and field directives, which the gateway does not need.
pub fn parse_filter(spec: &str) -> Result<Targets, String> {
    if spec.trim().is_empty() {
        return Err("the filter is empty".into());
    }
    spec.parse::<Targets>().map_err(|e| e.to_string())
}

/// Sends every event to the journal as one entry with fields.
struct JournalLayer {
    journal: systemd_journal_logger::JournalLog,
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let entry = JournalEntry::from_event(event);
        let meta = event.metadata();
        let fields: Vec<(&str, &str)> = entry
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let message = &entry.message;
        // Nowhere to report a failed log call; the process goes on.
        let _ = self.journal.journal_send(
            &log::Record::builder()
                .level(log_level(*meta.level()))
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&fields)
                .args(format_args!("{message}"))
                .build(),
        );
    }
}

fn log_level(level: Level) -> log::Level {
    match level {
        Level::ERROR => log::Level::Error,
        Level::WARN => log::Level::Warn,
        Level::INFO => log::Level::Info,
        Level::DEBUG => log::Level::Debug,
        Level::TRACE => log::Level::Trace,
    }
}

/// What one event becomes in the journal (pure, for tests).
#[derive(Debug, Default, PartialEq)]
pub struct JournalEntry {
    /// The message and its fields, `poll failed device=meter1 error=timeout`.
    pub message: String,
    /// Journal field names (upper case) and values, in the event's order.
    pub fields: Vec<(String, String)>,
}

impl JournalEntry {
    pub fn from_event(event: &Event<'_>) -> JournalEntry {
        let mut visitor = EntryVisitor::default();
        event.record(&mut visitor);
        let mut message = visitor.message;
        for (name, value) in &visitor.pairs {
            if !message.is_empty() {
                message.push(' ');
            }
            message.push_str(name);
            message.push('=');
            message.push_str(value);
        }
        let fields = visitor
            .pairs
            .into_iter()
            .map(|(name, value)| (journal_key(name), value))
            .collect();
        JournalEntry { message, fields }
    }
}

/// Journal field name of a tracing field: upper case, and names journald gives a meaning of
/// its own renamed (`UNIT` is the systemd unit, `PRIORITY`, `MESSAGE` are standard).
pub fn journal_key(name: &str) -> String {
    match name {
        "unit" => "UNIT_ID".to_string(),
        "priority" | "message" | "message_id" | "code_file" | "code_line" | "target" => {
            format!("FB_{}", name.to_ascii_uppercase())
        }
        _ => name
            .chars()
            .map(|c| match c {
                'a'..='z' => c.to_ascii_uppercase(),
                'A'..='Z' | '0'..='9' => c,
                _ => '_',
            })
            .collect(),
    }
}

#[derive(Default)]
struct EntryVisitor {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Visit for EntryVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.pairs.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.pairs.push((field.name(), format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Captures the journal entries of the events emitted inside `f`.
    fn capture(f: impl FnOnce()) -> Vec<(Level, JournalEntry)> {
        struct Capture(Arc<Mutex<Vec<(Level, JournalEntry)>>>);
        impl<S: Subscriber> Layer<S> for Capture {
            fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
                let entry = JournalEntry::from_event(event);
                self.0
                    .lock()
                    .unwrap()
                    .push((*event.metadata().level(), entry));
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(seen.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let out = std::mem::take(&mut *seen.lock().unwrap());
        out
    }

    #[test]
    fn event_fields_become_journal_fields_and_stay_in_the_message() {
        let seen = capture(|| {
            let error = "timeout after 1s";
            tracing::warn!(device = %"meter1", bus = %"rs485", unit = 3u8, error = %error, "poll failed");
        });
        let (level, entry) = &seen[0];
        assert_eq!(*level, Level::WARN);
        assert_eq!(
            entry.message,
            "poll failed device=meter1 bus=rs485 unit=3 error=timeout after 1s"
        );
        let fields: Vec<(&str, &str)> = entry
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("DEVICE", "meter1"),
                ("BUS", "rs485"),
                ("UNIT_ID", "3"),
                ("ERROR", "timeout after 1s")
            ]
        );
    }

    #[test]
    fn field_names_journald_reserves_are_renamed() {
        assert_eq!(journal_key("topic"), "TOPIC");
        assert_eq!(journal_key("point"), "POINT");
        assert_eq!(journal_key("latency_p50_ms"), "LATENCY_P50_MS");
        assert_eq!(journal_key("unit"), "UNIT_ID");
        assert_eq!(journal_key("priority"), "FB_PRIORITY");
        assert_eq!(journal_key("link.state"), "LINK_STATE");
    }

    #[test]
    fn levels_map_to_syslog_priorities_through_log_levels() {
        // systemd-journal-logger: Error 3, Warn 4, Info 5, Debug 6, Trace 7.
        assert_eq!(log_level(Level::ERROR), log::Level::Error);
        assert_eq!(log_level(Level::WARN), log::Level::Warn);
        assert_eq!(log_level(Level::INFO), log::Level::Info);
        assert_eq!(log_level(Level::DEBUG), log::Level::Debug);
    }

    #[test]
    fn a_message_without_fields_is_left_alone() {
        let seen = capture(|| tracing::info!("fieldbridge started"));
        assert_eq!(seen[0].1.message, "fieldbridge started");
        assert!(seen[0].1.fields.is_empty());
    }

    #[test]
    fn filters_take_a_default_and_per_module_levels_covering_submodules() {
        let f = parse_filter("warn,fieldbridge::modbus=debug").unwrap();
        assert!(f.would_enable("fieldbridge::modbus::rtu", &Level::DEBUG));
        assert!(!f.would_enable("fieldbridge::modbus::rtu", &Level::TRACE));
        assert!(!f.would_enable("fieldbridge::link", &Level::INFO));
        assert!(f.would_enable("fieldbridge::link", &Level::WARN));
        assert!(f.would_enable("rumqttc::state", &Level::WARN));
        let off = parse_filter("off").unwrap();
        assert!(!off.would_enable("fieldbridge", &Level::ERROR));
        assert!(parse_filter("").is_err());
        assert!(parse_filter("fieldbridge=loud").is_err());
    }
}
