//! The Prometheus text exposition format (version 0.0.4) of a [`Snapshot`].
//!
//! Names follow the Prometheus conventions: a `fieldbridge_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters, the standard `process_*` names for the process. Labels are
//! bounded by the configuration (bus, device, point names; fixed kinds and reasons), never by
//! what is read or received.

use std::fmt::Write as _;

use super::{HistogramSnapshot, Snapshot};

/// Writes one metric family: its `# HELP`, `# TYPE` and samples.
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        number(&mut self.text, value);
        self.text.push('\n');
    }

    /// A family with one sample and no labels.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (i, count) in h.cumulative.iter().enumerate() {
            let le = match h.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".to_string(),
            };
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, *count as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_seconds);
        self.sample(&format!("{name}_count"), labels, h.count() as f64);
    }
}

/// Label values: backslash, double quote and line feed escaped.
fn escape(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn number(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The exposition of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut o = Out {
        text: String::with_capacity(4096 + 1024 * s.devices.len()),
    };
    let g = &s.gateway;
    o.family(
        "fieldbridge_build_info",
        "gauge",
        "The running gateway: version, payload mode and gateway id (always 1).",
    );
    o.sample(
        "fieldbridge_build_info",
        &[("version", g.version), ("mode", g.mode), ("gateway", &g.id)],
        1.0,
    );
    o.one(
        "fieldbridge_ready",
        "gauge",
        "1 once the configuration is loaded and the tasks run.",
        flag(g.ready),
    );
    o.one(
        "fieldbridge_tasks_stalled",
        "gauge",
        "Tasks that made no progress within their limit (the watchdog is withheld while > 0).",
        g.stalled.len() as f64,
    );
    o.one(
        "fieldbridge_devices",
        "gauge",
        "Devices configured.",
        g.devices as f64,
    );
    o.one(
        "fieldbridge_devices_online",
        "gauge",
        "Devices answering.",
        g.devices_online as f64,
    );

    // Buses.
    o.family(
        "fieldbridge_bus_polls_total",
        "counter",
        "Polls of a device's poll group.",
    );
    for b in &s.buses {
        o.sample(
            "fieldbridge_bus_polls_total",
            &[("bus", &b.name)],
            b.polls as f64,
        );
    }
    o.family(
        "fieldbridge_bus_polls_failed_total",
        "counter",
        "Polls that failed (timeout, transport or protocol error).",
    );
    for b in &s.buses {
        o.sample(
            "fieldbridge_bus_polls_failed_total",
            &[("bus", &b.name)],
            b.failed_polls as f64,
        );
    }
    o.family(
        "fieldbridge_bus_transactions_total",
        "counter",
        "Modbus transactions on the wire (reads of poll blocks, writes, reads asked by commands).",
    );
    for b in &s.buses {
        o.sample(
            "fieldbridge_bus_transactions_total",
            &[("bus", &b.name)],
            b.transactions as f64,
        );
    }
    o.family(
        "fieldbridge_bus_failures_total",
        "counter",
        "Failed transactions by kind: timeout, exception, protocol, transport.",
    );
    for b in &s.buses {
        for (kind, n) in &b.failures {
            o.sample(
                "fieldbridge_bus_failures_total",
                &[("bus", &b.name), ("kind", kind)],
                *n as f64,
            );
        }
    }
    o.family(
        "fieldbridge_bus_busy_seconds_total",
        "counter",
        "Time spent in transactions; rate() of it is the bus's busy fraction.",
    );
    for b in &s.buses {
        o.sample(
            "fieldbridge_bus_busy_seconds_total",
            &[("bus", &b.name)],
            b.busy_seconds,
        );
    }
    o.family(
        "fieldbridge_bus_skipped_ticks_total",
        "counter",
        "Poll ticks skipped because the bus was still busy with earlier polls.",
    );
    for b in &s.buses {
        o.sample(
            "fieldbridge_bus_skipped_ticks_total",
            &[("bus", &b.name)],
            b.skipped_ticks as f64,
        );
    }
    o.family(
        "fieldbridge_bus_resets_total",
        "counter",
        "Connections (or serial ports) reset after a timeout or error.",
    );
    for b in &s.buses {
        o.sample(
            "fieldbridge_bus_resets_total",
            &[("bus", &b.name)],
            b.resets as f64,
        );
    }
    o.family(
        "fieldbridge_bus_heartbeat_age_seconds",
        "gauge",
        "Time since the bus task last made progress.",
    );
    for b in &s.buses {
        o.sample(
            "fieldbridge_bus_heartbeat_age_seconds",
            &[("bus", &b.name)],
            b.heartbeat_age_seconds,
        );
    }
    o.family(
        "fieldbridge_bus_transaction_seconds",
        "histogram",
        "Duration of a transaction: request, answer and the frame gap.",
    );
    for b in &s.buses {
        o.histogram(
            "fieldbridge_bus_transaction_seconds",
            &[("bus", &b.name)],
            &b.transaction_seconds,
        );
    }
    if s.buses.iter().any(|b| b.bad_lines.is_some()) {
        o.family(
            "fieldbridge_bus_bad_lines_total",
            "counter",
            "Lines of a line-device port that were not used: too_long, invalid_utf8, checksum, unmatched.",
        );
        for b in &s.buses {
            for (kind, n) in b.bad_lines.iter().flatten() {
                o.sample(
                    "fieldbridge_bus_bad_lines_total",
                    &[("bus", &b.name), ("kind", kind)],
                    *n as f64,
                );
            }
        }
    }

    // Devices.
    let device_family =
        |o: &mut Out,
         name: &str,
         kind: &str,
         help: &str,
         f: &dyn Fn(&super::DeviceSnapshot) -> Option<f64>| {
            o.family(name, kind, help);
            for d in &s.devices {
                if let Some(v) = f(d) {
                    o.sample(name, &[("device", &d.name), ("bus", &d.bus)], v);
                }
            }
        };
    device_family(
        &mut o,
        "fieldbridge_device_online",
        "gauge",
        "1 while the device answers; 0 once offline (or before its first poll).",
        &|d| Some(flag(d.online == Some(true))),
    );
    device_family(
        &mut o,
        "fieldbridge_device_polls_total",
        "counter",
        "Polls of the device.",
        &|d| Some(d.polls as f64),
    );
    device_family(
        &mut o,
        "fieldbridge_device_poll_failures_total",
        "counter",
        "Polls of the device that failed.",
        &|d| Some(d.failures as f64),
    );
    device_family(
        &mut o,
        "fieldbridge_device_last_good_read_age_seconds",
        "gauge",
        "Time since the device's last good poll (absent before the first).",
        &|d| d.last_good_age_seconds,
    );
    device_family(
        &mut o,
        "fieldbridge_device_backoff_seconds",
        "gauge",
        "The back-off in force after failures; 0 while polled normally.",
        &|d| Some(d.backoff_seconds),
    );
    device_family(
        &mut o,
        "fieldbridge_device_poll_duration_seconds",
        "gauge",
        "Duration of the device's last poll (all its transactions).",
        &|d| d.poll_ms.map(|ms| ms / 1000.0),
    );
    if s.devices.iter().any(|d| d.points.is_some()) {
        o.family(
            "fieldbridge_point_bad_reads_total",
            "counter",
            "Reads of a point that gave no value (exception, decode error); points with none are left out.",
        );
        for d in &s.devices {
            for p in d.points.iter().flatten().filter(|p| p.bad_reads > 0) {
                o.sample(
                    "fieldbridge_point_bad_reads_total",
                    &[("device", &d.name), ("point", &p.name)],
                    p.bad_reads as f64,
                );
            }
        }
    }

    // The MQTT link.
    let m = &s.mqtt;
    o.one(
        "fieldbridge_mqtt_connected",
        "gauge",
        "1 while connected to the broker.",
        flag(m.connected),
    );
    o.one(
        "fieldbridge_mqtt_connects_total",
        "counter",
        "Sessions established (the first one and every reconnect).",
        m.connects as f64,
    );
    o.one(
        "fieldbridge_mqtt_backlog_messages",
        "gauge",
        "Messages not yet acknowledged by the broker (memory queue, in flight and the store).",
        m.backlog as f64,
    );
    o.one(
        "fieldbridge_mqtt_in_flight_messages",
        "gauge",
        "Messages written to the broker and waiting for their PUBACK.",
        m.in_flight as f64,
    );
    o.one(
        "fieldbridge_mqtt_queued_total",
        "counter",
        "Messages handed to the link.",
        m.queued as f64,
    );
    o.one(
        "fieldbridge_mqtt_delivered_total",
        "counter",
        "Messages the broker acknowledged (QoS 1) or took (QoS 0).",
        m.delivered as f64,
    );
    o.one(
        "fieldbridge_mqtt_resent_total",
        "counter",
        "Messages sent again after a reconnect.",
        m.resent as f64,
    );
    o.family(
        "fieldbridge_mqtt_dropped_total",
        "counter",
        "Messages given up by the link, by reason: queue_full, unsendable, broker_refused.",
    );
    for (reason, n) in &m.dropped_by_reason {
        o.sample(
            "fieldbridge_mqtt_dropped_total",
            &[("reason", reason)],
            *n as f64,
        );
    }
    o.one(
        "fieldbridge_mqtt_protocol_errors_total",
        "counter",
        "Sessions reset because the broker broke the protocol.",
        m.protocol_errors as f64,
    );
    o.family(
        "fieldbridge_mqtt_delivery_seconds",
        "histogram",
        "From a reading (or result) to the broker's acknowledgement.",
    );
    o.histogram(
        "fieldbridge_mqtt_delivery_seconds",
        &[],
        &m.delivery_seconds,
    );

    // The store.
    if let Some(st) = &s.store {
        o.one(
            "fieldbridge_store_backlog_messages",
            "gauge",
            "Messages in the outbox.",
            st.messages as f64,
        );
        o.one(
            "fieldbridge_store_backlog_bytes",
            "gauge",
            "Bytes of the messages in the outbox, as counted against the cap.",
            st.bytes as f64,
        );
        o.one(
            "fieldbridge_store_cap_bytes",
            "gauge",
            "The outbox's byte cap (store.max_bytes).",
            st.cap_bytes as f64,
        );
        o.one(
            "fieldbridge_store_oldest_age_seconds",
            "gauge",
            "Age of the oldest message in the outbox; 0 when empty.",
            st.oldest_age_seconds,
        );
        o.one(
            "fieldbridge_store_writes_total",
            "counter",
            "Messages written to the outbox.",
            st.appended as f64,
        );
        o.one(
            "fieldbridge_store_deletes_total",
            "counter",
            "Messages deleted from the outbox once delivered.",
            st.deleted as f64,
        );
        o.one(
            "fieldbridge_store_commits_total",
            "counter",
            "SQLite transactions committed.",
            st.commits as f64,
        );
        o.one(
            "fieldbridge_store_write_failures_total",
            "counter",
            "Writes to the outbox that failed (disk full, I/O error).",
            st.write_failures as f64,
        );
        o.one(
            "fieldbridge_store_unreadable_total",
            "counter",
            "Rows that could not be read back and were taken out.",
            st.unreadable as f64,
        );
        o.one(
            "fieldbridge_store_dropped_total",
            "counter",
            "Messages dropped by the byte cap or store.max_age.",
            st.dropped as f64,
        );
    }

    // Commands.
    let c = &s.commands;
    o.one(
        "fieldbridge_commands_executed_total",
        "counter",
        "Commands written to a device (or line) and answered ok.",
        c.executed as f64,
    );
    o.family(
        "fieldbridge_commands_refused_total",
        "counter",
        "Commands refused before any write, by the reason of their result.",
    );
    for (reason, n) in &c.refused_by_reason {
        o.sample(
            "fieldbridge_commands_refused_total",
            &[("reason", reason)],
            *n as f64,
        );
    }
    o.one(
        "fieldbridge_commands_failed_total",
        "counter",
        "Commands whose write failed on the bus.",
        c.failed as f64,
    );
    o.one(
        "fieldbridge_commands_dropped_total",
        "counter",
        "Commands dropped unread (queue full, topic too long).",
        c.dropped as f64,
    );
    o.one(
        "fieldbridge_command_results_suppressed_total",
        "counter",
        "Results of refused commands not published because refusals came in a flood.",
        c.suppressed as f64,
    );

    // The process.
    let p = &s.process;
    o.one(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes as f64,
    );
    o.one(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes as f64,
    );
    o.one(
        "fieldbridge_process_peak_resident_memory_bytes",
        "gauge",
        "Peak resident memory size in bytes (VmHWM).",
        p.peak_resident_bytes as f64,
    );
    o.one(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    o.one(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds as f64,
    );
    o.one(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds as f64,
    );
    o.one(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch in seconds.",
        g.start_time_unix,
    );
    o.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_numbers_plain() {
        let mut o = Out {
            text: String::new(),
        };
        o.sample("m", &[("a", "x\"y\\z\nw")], 2.0);
        o.sample("m", &[], 0.25);
        o.sample("m", &[], f64::NAN);
        assert_eq!(o.text, "m{a=\"x\\\"y\\\\z\\nw\"} 2\nm 0.25\nm NaN\n");
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_sum_and_count() {
        let h = super::super::Histogram::new(&[0.1, 1.0]);
        h.record(std::time::Duration::from_millis(50));
        h.record(std::time::Duration::from_secs(3));
        let mut o = Out {
            text: String::new(),
        };
        o.histogram("h_seconds", &[("bus", "b")], &h.read());
        assert_eq!(
            o.text,
            "h_seconds_bucket{bus=\"b\",le=\"0.1\"} 1\n\
             h_seconds_bucket{bus=\"b\",le=\"1\"} 1\n\
             h_seconds_bucket{bus=\"b\",le=\"+Inf\"} 2\n\
             h_seconds_sum{bus=\"b\"} 3.05\n\
             h_seconds_count{bus=\"b\"} 2\n"
        );
    }
}
