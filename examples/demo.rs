//! End-to-end demo with nothing installed: `cargo run --example demo`.
//!
//! Starts an embedded MQTT broker (rumqttd) and two simulated Modbus TCP devices on free
//! loopback ports, then runs the gateway in-process for about 30 seconds while a subscriber
//! on `#` prints everything the gateway publishes. Midway the PLC "loses power" (its server
//! stops and connections are refused) and comes back ten seconds later.
//!
//! Logs: the gateway's warnings are shown, the broker's are not; `RUST_LOG` overrides
//! (e.g. `RUST_LOG=info,rumqttd=off`).

#[path = "demo/sim.rs"]
mod sim;

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::prelude::*;

/// When the PLC loses power, when it comes back, when the demo ends (from start).
const POWER_CUT_AT: Duration = Duration::from_secs(8);
const POWER_BACK_AT: Duration = Duration::from_secs(18);
const STOP_AT: Duration = Duration::from_secs(28);

/// The gateway configuration, as a user would write it (see config/fieldbridge.yaml).
fn config_yaml(broker: u16, meter: u16, plc: u16, store: &str) -> String {
    format!(
        r#"
gateway:
  id: demo
mqtt:
  host: 127.0.0.1
  port: {broker}
  keep_alive: 5s
  reconnect: {{ min: 100ms, max: 1s }}
store:
  path: {store}
buses:
  - name: meter-bus
    type: tcp
    host: 127.0.0.1
    port: {meter}
  - name: plc-bus
    type: tcp
    host: 127.0.0.1
    port: {plc}
    reconnect_max: 2s
devices:
  - name: meter-1
    bus: meter-bus
    unit: 1
    interval: 1s
    timeout: 300ms
    offline_after: 2
    points:
      - {{ name: voltage, register: input, address: 0, type: f32, unit: V }}
      - {{ name: current, register: input, address: 2, type: f32, unit: A }}
      - {{ name: power,   register: input, address: 4, type: f32, unit: W }}
  - name: plc
    bus: plc-bus
    unit: 1
    interval: 1s
    timeout: 300ms
    offline_after: 2
    backoff_max: 2s
    publish: {{ mode: on_change }}
    points:
      - {{ name: tank_level, register: holding, address: 0, type: u16, scale: 0.1, unit: "%" }}
      - {{ name: pump_running, register: holding, address: 1, type: bit, bit: 0,
           labels: {{ 0: stopped, 1: running }} }}
      - {{ name: high_level, register: holding, address: 1, type: bit, bit: 1,
           labels: {{ 0: ok, 1: ALARM }} }}
      - {{ name: auto_mode, register: holding, address: 1, type: bit, bit: 2 }}
      - {{ name: pump, register: coil, address: 0, type: bool, labels: {{ 0: "off", 1: "on" }} }}
"#
    )
}

fn banner(start: Instant, text: &str) {
    println!(
        "[{:>5.1}s] ---------- {text} ----------",
        start.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
}

/// Subscribes to `#` and prints every message with the time since `start`. Returns once the
/// subscription is acknowledged, so nothing the gateway publishes afterwards is missed.
async fn watch(broker: u16, start: Instant) -> anyhow::Result<()> {
    let mut options = MqttOptions::new("demo-watcher", "127.0.0.1", broker);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, mut events) = AsyncClient::new(options, 16);
    client.subscribe("#", QoS::AtMostOnce).await?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client; // keep the request channel open
        let mut ready = Some(ready_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let retained = if p.retain { "  (retained)" } else { "" };
                    println!(
                        "[{:>5.1}s]   {:<24} {}{retained}",
                        start.elapsed().as_secs_f64(),
                        p.topic,
                        String::from_utf8_lossy(&p.payload)
                    );
                    let _ = std::io::stdout().flush();
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("watcher: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx)
        .await
        .context("no SUBACK from the embedded broker within 5 s")?
        .context("watcher stopped")?;
    Ok(())
}

/// The retained messages on the broker: a fresh client subscribes to `#` and collects what
/// arrives flagged as retained within half a second of its SUBACK.
async fn retained(broker: u16) -> anyhow::Result<Vec<(String, String)>> {
    let mut options = MqttOptions::new("demo-late-joiner", "127.0.0.1", broker);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 16);
    client.subscribe("#", QoS::AtMostOnce).await?;
    let mut found = Vec::new();
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let event = match tokio::time::timeout_at(deadline, events.poll()).await {
            Err(_) => break,
            Ok(event) => event?,
        };
        match event {
            Event::Incoming(Packet::SubAck(_)) => {
                deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            }
            Event::Incoming(Packet::Publish(p)) if p.retain => found.push((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )),
            _ => {}
        }
    }
    let _ = client.try_disconnect();
    found.sort();
    Ok(found)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = fieldbridge::logging::filter_from_env("warn,rumqttd=off,rumqttc=off");
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_timer(tracing_subscriber::fmt::time::Uptime::default())
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter),
        )
        .init();

    println!(
        "fieldbridge demo (about 30 s, nothing to install)\n\
         \n\
         An embedded MQTT broker and two simulated Modbus TCP devices run on loopback:\n\
         \x20 meter-1  energy meter: voltage, current, power (f32 input registers, ABCD)\n\
         \x20 plc      tank PLC: level (u16 holding, scale 0.1), status bits, pump coil\n\
         The gateway polls both every second and publishes JSON readings; every message the\n\
         broker receives is printed below. At {}s the PLC loses power (connections refused):\n\
         watch demo/plc/status go `offline`. At {}s it comes back: `online` and readings again.\n",
        POWER_CUT_AT.as_secs(),
        POWER_BACK_AT.as_secs()
    );

    let start = Instant::now();

    // 1. Broker.
    let broker_port = sim::free_port()?;
    sim::start_broker(broker_port).context("starting the embedded MQTT broker")?;

    // 2. Devices. The PLC's tables outlive its server, so a restart resumes the same process.
    let meter_listener = sim::bind(0)?;
    let meter_port = meter_listener.local_addr()?.port();
    let _meter = sim::serve(meter_listener, sim::energy_meter());
    let plc_tables = sim::tank_plc();
    let plc_listener = sim::bind(0)?;
    let plc_port = plc_listener.local_addr()?.port();
    let plc = sim::serve(plc_listener, plc_tables.clone());
    println!(
        "broker   mqtt://127.0.0.1:{broker_port}\n\
         meter-1  modbus tcp 127.0.0.1:{meter_port}\n\
         plc      modbus tcp 127.0.0.1:{plc_port}\n"
    );

    // 3. Configuration, through the same parser and validation as a file.
    // The store-and-forward outbox lives in a temporary directory for the demo.
    let store_dir = std::env::temp_dir().join(format!("fieldbridge-demo-{}", std::process::id()));
    let store = store_dir.join("outbox.db");
    let yaml = config_yaml(
        broker_port,
        meter_port,
        plc_port,
        &store.display().to_string(),
    );
    let config = match fieldbridge::config::parse(&yaml, "demo.yaml") {
        Ok(config) => config,
        Err(errors) => anyhow::bail!("the demo configuration is invalid:\n{errors}"),
    };

    // 5. (before 4, so the first messages are not missed) The subscriber.
    watch(broker_port, start).await?;

    // 4. The gateway.
    let cancel = CancellationToken::new();
    let gateway = tokio::spawn(fieldbridge::app::run(config, cancel.clone()));
    banner(start, "gateway started");

    // 6. The script.
    tokio::time::sleep_until((start + POWER_CUT_AT).into()).await;
    plc.abort();
    let _ = plc.await; // listener and open connections are closed once the task is gone
    banner(start, "simulating a PLC power cut");

    tokio::time::sleep_until((start + POWER_BACK_AT).into()).await;
    let plc = sim::serve(
        sim::bind(plc_port).context("re-binding the PLC port")?,
        plc_tables,
    );
    banner(start, "PLC power restored");

    tokio::time::sleep_until((start + STOP_AT).into()).await;
    banner(start, "stopping the gateway");
    cancel.cancel();
    let report = tokio::time::timeout(Duration::from_secs(15), gateway)
        .await
        .context("the gateway did not stop within 15 s of cancellation")?
        .context("the gateway task panicked")?
        .context("the gateway failed")?;
    // Let the watcher print the gateway's last words (its `offline` status).
    tokio::time::sleep(Duration::from_millis(300)).await;
    plc.abort();

    println!("\nretained on the broker now (what a dashboard connecting later sees):");
    for (topic, payload) in retained(broker_port).await? {
        println!("  {topic:<24} {payload}");
    }

    println!(
        "\ndone in {:.1}s: {} messages delivered (PUBACKed) by the gateway, {} dropped, {} undelivered",
        start.elapsed().as_secs_f64(),
        report.link.delivered,
        report.link.dropped,
        report.link.undelivered
    );
    let _ = std::fs::remove_dir_all(&store_dir);
    // The broker thread is not joined: leaving main ends the process.
    Ok(())
}
