//! The publisher stage: everything between a decoded reading and a message handed to the link.
//!
//! One task ([`run`]) takes the buses' events (readings, device statuses) and the command
//! router's events (written values, results), decides what is worth publishing (the change
//! filters, [`filter`]), and has the configured encoding turn that into messages ([`Encoder`];
//! JSON today, [`json`]). The same encoding announces the gateway on the link's behalf (last
//! will, births, goodbye, the held-back mark: [`crate::link::Announcer`]) and builds the stats
//! message ([`stats`]). No other module builds a payload or a topic for data: the link sends
//! opaque bytes, the router reports events.
//!
//! Topics are resolved from their templates when the configuration is loaded (so a bad one
//! is refused with its line) and kept in the model; [`topic`] holds the MQTT rules for them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde_json::{Map, Value as Json};
use tokio::sync::mpsc;

use crate::codec::{self, Raw};
use crate::command::Reply;
use crate::link::{Announcer, OutMessage};
use crate::modbus::{BusEvent, Reading};
use crate::model::{Config, Device, Value};

pub mod filter;
pub mod homeassistant;
pub mod json;
pub mod sparkplug;
pub mod stats;
pub mod topic;

pub use filter::ChangeFilter;
pub use json::{rfc3339_millis, value_json};

/// A bus event with the configuration (and its generation) its indices refer to: a bus kept
/// across a reload goes on reporting against the configuration it was started with.
pub struct Tagged {
    pub config: Arc<Config>,
    pub generation: u64,
    pub event: BusEvent,
}

/// What the stage is told.
pub enum Input {
    /// From a bus (through its forwarder).
    Bus(Tagged),
    /// The command router wrote `raw` to a point at `at` (indices into `config`).
    Written {
        config: Arc<Config>,
        device: usize,
        point: usize,
        raw: Raw,
        at: SystemTime,
    },
    /// A command's result, for its result topic (and its MQTT 5 response topic).
    Result(CommandResult),
    /// A host application asked for the births again (Sparkplug `Node Control/Rebirth`; Home
    /// Assistant's birth message, for the discovery configs).
    Rebirth,
    /// The configuration was reloaded.
    Reconfigured(Arc<Config>),
}

/// The outcome of one command, as the router decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandResult {
    pub topic: String,
    pub body: Map<String, Json>,
    pub reply: Option<Reply>,
}

/// One point of a reading, as the stage hands it to the encoding (owned, so that the stage
/// reuses one buffer of them for every reading).
pub struct Sample {
    pub point: usize,
    /// Its place in `Reading::values`.
    pub index: usize,
    /// The value; `None`: the point could not be read ([`Sample::error`] says why).
    pub value: Option<Value>,
    /// The point's change filter says it is worth publishing (always, for a bad one).
    pub changed: bool,
}

impl Sample {
    /// The value's enum label, if its point has one.
    pub fn label<'d>(&self, device: &'d Device, reading: &Reading) -> Option<&'d str> {
        let raw = reading.values.get(self.index)?.1.as_ref().ok()?;
        codec::label(&device.points[self.point], raw)
    }

    /// Why the point could not be read.
    pub fn error<'r>(&self, reading: &'r Reading) -> &'r str {
        reading
            .values
            .get(self.index)
            .and_then(|(_, r)| r.as_ref().err())
            .map_or("", String::as_str)
    }
}

/// A payload format: how the stage's decisions become messages.
pub trait Encoder: Send {
    /// The messages for one reading of `device` (`samples` in the reading's order).
    fn reading(
        &mut self,
        device: &Device,
        reading: &Reading,
        samples: &[Sample],
        out: &mut Vec<OutMessage>,
    );
    /// A device went online or offline.
    fn status(&mut self, device: &Device, online: bool, out: &mut Vec<OutMessage>);
    /// Whether a value a command wrote is published at once (then the change filter sees it
    /// first); otherwise the next poll shows it.
    fn publishes_written(&self, device: &Device) -> bool;
    /// A value a command wrote to `device.points[point]` at `at`.
    fn written(
        &mut self,
        device: &Device,
        point: usize,
        value: &Value,
        label: Option<&str>,
        at: SystemTime,
        out: &mut Vec<OutMessage>,
    );
    /// A command's result.
    fn result(&mut self, result: &CommandResult, out: &mut Vec<OutMessage>);
    /// Everything announced at a connect is wanted again (Sparkplug rebirth, Home Assistant's
    /// birth): `true` when the link is to send its births again now.
    fn announce(&mut self) -> bool {
        false
    }
    /// A reload: `true` when the births changed and the link is to send them now.
    fn reconfigure(&mut self, _config: &Config) -> bool {
        false
    }
    /// Once a second, with the gateway's figures.
    fn tick(&mut self, _figures: sparkplug::NodeFigures, _out: &mut Vec<OutMessage>) {}
}

/// The encoding chosen by the configuration, and its announcer for the link.
pub fn encoding(config: &Config) -> (Box<dyn Encoder>, Arc<dyn Announcer>) {
    match sparkplug::Node::new(config) {
        Some(node) => (Box::new(sparkplug::Encoding::new(node.clone())), node),
        None => {
            let gateway = Arc::new(json::Gateway::new(config));
            let encoding = json::JsonEncoding {
                gateway: Some(gateway.clone()),
            };
            (Box::new(encoding), gateway)
        }
    }
}

/// Where the gateway's figures come from, for encodings that publish them (`Encoder::tick`).
pub type Figures = Box<dyn Fn() -> sparkplug::NodeFigures + Send>;

/// The stage's task: runs until every sender of `inputs` is gone, then says `offline` for the
/// devices it said were online.
pub async fn run(
    mut inputs: mpsc::Receiver<Input>,
    mut encoder: Box<dyn Encoder>,
    figures: Option<Figures>,
    rebirths: Option<Arc<tokio::sync::Notify>>,
    live: Option<Arc<crate::observe::Live>>,
    link: mpsc::Sender<OutMessage>,
) {
    let mut stage = Stage {
        rebirths,
        live,
        ..Stage::default()
    };
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            input = inputs.recv() => match input {
                Some(input) => stage.on_input(input, encoder.as_mut(), &mut out),
                None => break,
            },
            _ = tick.tick(), if figures.is_some() => {
                let f = figures.as_ref().expect("guarded");
                encoder.tick(f(), &mut out);
            }
        }
        for m in out.drain(..) {
            if link.send(m).await.is_err() {
                return;
            }
        }
    }
    // Polling has stopped: the retained device statuses must not keep saying `online`.
    stage.stopped(encoder.as_mut(), &mut out);
    for m in out.drain(..) {
        if link.send(m).await.is_err() {
            return;
        }
    }
}

/// The stage's state: change filters per configuration generation, which devices are online.
#[derive(Default)]
pub struct Stage {
    filters: HashMap<u64, filter::Filters>,
    /// The configuration of each generation whose filters are kept.
    configs: HashMap<u64, Arc<Config>>,
    events_seen: u64,
    /// Devices currently online, by status topic (a device kept across reloads is one device).
    online: BTreeMap<String, (Arc<Config>, usize)>,
    /// Reused for every reading.
    samples: Vec<Sample>,
    /// The link's rebirth request (`link::LinkSettings::rebirths`), when it has one.
    pub rebirths: Option<Arc<tokio::sync::Notify>>,
    /// The last values for the status page, while the HTTP endpoint is on.
    pub live: Option<Arc<crate::observe::Live>>,
}

impl Stage {
    /// Handles one input; the messages to publish are appended to `out`.
    pub fn on_input(&mut self, input: Input, encoder: &mut dyn Encoder, out: &mut Vec<OutMessage>) {
        self.events_seen += 1;
        match input {
            Input::Bus(Tagged {
                config,
                generation,
                event,
            }) => {
                if !self.configs.contains_key(&generation) {
                    // Made room for first, as `generation_filters` will (it drops the least
                    // recently used generation).
                    filter::generation_filters(
                        &mut self.filters,
                        generation,
                        &config,
                        self.events_seen,
                    );
                    let kept = &self.filters;
                    self.configs.retain(|g, _| kept.contains_key(g));
                    self.configs.insert(generation, config.clone());
                }
                let filters = filter::generation_filters(
                    &mut self.filters,
                    generation,
                    &config,
                    self.events_seen,
                );
                match event {
                    BusEvent::Status { device, online, .. } => {
                        let d = &config.devices[device];
                        if online {
                            self.online
                                .insert(d.status_topic.clone(), (config.clone(), device));
                        } else {
                            self.online.remove(&d.status_topic);
                            // A consumer that saw `offline` gets every value again when the
                            // device returns, not only those that changed meanwhile.
                            filters.forget(&config, device);
                        }
                        encoder.status(d, online, out);
                    }
                    // The application's (it reconfigures); the bus forwarder keeps it.
                    BusEvent::Discovered { .. } => {}
                    BusEvent::Reading(reading) => {
                        filters.used_by(reading.device, self.events_seen);
                        render(&config, &reading, filters, &mut self.samples, encoder, out);
                        if let Some(live) = &self.live {
                            let device = &config.devices[reading.device];
                            live.record(
                                device,
                                reading.ts,
                                self.samples.iter().map(|s| {
                                    (s.point, s.value.as_ref(), s.label(device, &reading))
                                }),
                            );
                        }
                    }
                }
            }
            Input::Written {
                config,
                device,
                point,
                raw,
                at,
            } => {
                let d = &config.devices[device];
                let p = &d.points[point];
                if !encoder.publishes_written(d) {
                    return;
                }
                let value = codec::to_value(p, &raw);
                if let Some(live) = &self.live {
                    let label = codec::label(p, &raw);
                    live.record(d, at, std::iter::once((point, Some(&value), label)));
                }
                // Through the filter the device's readings go through (a bus kept across a
                // reload reports under the generation it was started with, not the
                // router's), so that the next poll does not publish the same value again.
                let filter =
                    filter::reading_filter(&mut self.filters, &self.configs, &d.name, &p.name);
                if filter.is_none_or(|f| f.should_publish(&value, Instant::now())) {
                    encoder.written(d, point, &value, codec::label(p, &raw), at, out);
                }
            }
            Input::Result(r) => encoder.result(&r, out),
            // The link puts the births ahead of what it has queued.
            Input::Rebirth => {
                if encoder.announce() {
                    if let Some(link) = &self.rebirths {
                        link.notify_one();
                    }
                }
            }
            Input::Reconfigured(config) => {
                if let Some(live) = &self.live {
                    live.retain(&config);
                }
                if encoder.reconfigure(&config) {
                    if let Some(link) = &self.rebirths {
                        link.notify_one();
                    }
                }
            }
        }
    }

    /// Polling has stopped: `offline` for every device that was said to be online.
    pub fn stopped(&mut self, encoder: &mut dyn Encoder, out: &mut Vec<OutMessage>) {
        for (config, device) in std::mem::take(&mut self.online).into_values() {
            encoder.status(&config.devices[device], false, out);
        }
    }
}

/// One reading through the change filters, then the encoding.
fn render(
    config: &Config,
    reading: &Reading,
    filters: &mut filter::Filters,
    samples: &mut Vec<Sample>,
    encoder: &mut dyn Encoder,
    out: &mut Vec<OutMessage>,
) {
    let device = &config.devices[reading.device];
    let now = Instant::now();
    let points = filters.device(reading.device);
    samples.clear();
    for (index, (p, raw)) in reading.values.iter().enumerate() {
        let point = &device.points[*p];
        samples.push(match raw {
            Ok(raw) => {
                let value = codec::to_value(point, raw);
                let changed = points[*p].should_publish(&value, now);
                Sample {
                    point: *p,
                    index,
                    value: Some(value),
                    changed,
                }
            }
            Err(_) => {
                // The next good value is news even if it equals the one before the fault.
                points[*p].reset();
                Sample {
                    point: *p,
                    index,
                    value: None,
                    changed: true,
                }
            }
        });
    }
    encoder.reading(device, reading, samples, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Shared with `filter`'s tests.
    pub(super) const PER_DEVICE: &str = r#"
gateway: { id: gw, prefix: t }
mqtt: { url: "mqtt://127.0.0.1:1883" }
buses:
  - { name: b, type: tcp, host: 127.0.0.1 }
devices:
  - name: d
    bus: b
    message: per_device
    publish: { mode: on_change }
    points:
      - { name: zeta, address: 0, type: u16 }
      - { name: alpha, address: 1, type: u16 }
      - { name: mid, address: 2, type: u16 }
"#;

    const PER_POINT: &str = r#"
gateway: { id: gw, prefix: t }
mqtt: { url: "mqtt://127.0.0.1:1883" }
buses:
  - { name: b, type: tcp, host: 127.0.0.1 }
devices:
  - name: d
    bus: b
    publish: { mode: on_change }
    points:
      - { name: sp, address: 0, type: u16, writable: true }
"#;

    fn reading(values: Vec<(usize, Result<Raw, String>)>) -> Reading {
        Reading {
            device: 0,
            group: 0,
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            read_at: Instant::now(),
            values,
        }
    }

    /// Runs `inputs` through a stage with the JSON encoding; the payloads published.
    fn publish(stage: &mut Stage, inputs: Vec<Input>) -> Vec<String> {
        let mut encoder = json::JsonEncoding::default();
        let mut out = Vec::new();
        for input in inputs {
            stage.on_input(input, &mut encoder, &mut out);
        }
        out.into_iter()
            .map(|m| String::from_utf8(m.payload).unwrap())
            .collect()
    }

    fn bus(config: &Arc<Config>, generation: u64, event: BusEvent) -> Input {
        Input::Bus(Tagged {
            config: config.clone(),
            generation,
            event,
        })
    }

    #[test]
    fn per_device_payloads_list_points_by_name_and_filter_on_change() {
        let config = Arc::new(crate::config::parse(PER_DEVICE, "test.yaml").expect("config loads"));
        let mut stage = Stage::default();
        let values = || {
            vec![
                (0, Ok(Raw::U64(1))),
                (1, Ok(Raw::U64(2))),
                (2, Err("timeout".to_string())),
            ]
        };
        let read = |v| bus(&config, 1, BusEvent::Reading(reading(v)));
        let first = publish(&mut stage, vec![read(values())]);
        assert_eq!(
            first,
            [
                r#"{"device":"d","ts":"2023-11-14T22:13:20.123Z","values":{"alpha":2,"mid":null,"zeta":1}}"#
            ]
        );
        // Unchanged, but a point is still bad: published.
        assert_eq!(publish(&mut stage, vec![read(values())]).len(), 1);
        // Unchanged and every point good: not published.
        let good = || vec![(0, Ok(Raw::U64(1))), (1, Ok(Raw::U64(2)))];
        assert!(publish(&mut stage, vec![read(good())]).is_empty());
        // After the device went offline, the same values are published again.
        let offline = bus(
            &config,
            1,
            BusEvent::Status {
                device: 0,
                online: false,
                reason: String::new(),
            },
        );
        assert_eq!(publish(&mut stage, vec![offline]), ["offline"]);
        let again = publish(&mut stage, vec![read(good())]);
        assert_eq!(
            again,
            [r#"{"device":"d","ts":"2023-11-14T22:13:20.123Z","values":{"alpha":2,"zeta":1}}"#]
        );
    }

    /// A value a command wrote goes through the point's change filter: published once, and
    /// not again by the next poll that reads the same value (the router used to publish it
    /// past the filter). The readings come from a bus kept across a reload (generation 1)
    /// while the router runs on the reloaded configuration (generation 2).
    #[test]
    fn a_written_value_goes_through_the_change_filter_of_the_readings() {
        let old = Arc::new(crate::config::parse(PER_POINT, "test.yaml").expect("config loads"));
        let new = Arc::new(crate::config::parse(PER_POINT, "test.yaml").expect("config loads"));
        let mut stage = Stage::default();
        let read = |v: u64| {
            bus(
                &old,
                1,
                BusEvent::Reading(reading(vec![(0, Ok(Raw::U64(v)))])),
            )
        };
        let written = |v: u64| Input::Written {
            config: new.clone(),
            device: 0,
            point: 0,
            raw: Raw::U64(v),
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500),
        };
        assert_eq!(publish(&mut stage, vec![read(5)]).len(), 1);
        let after_write = publish(&mut stage, vec![written(7)]);
        assert_eq!(after_write.len(), 1);
        assert!(after_write[0].contains(r#""value":7"#), "{after_write:?}");
        assert!(
            publish(&mut stage, vec![read(7)]).is_empty(),
            "the poll after the write published the written value again"
        );
        // Writing the value the point already has publishes nothing new either.
        assert!(publish(&mut stage, vec![written(7)]).is_empty());
        assert_eq!(publish(&mut stage, vec![read(8)]).len(), 1);
    }

    /// After a bad reading, the next good one is published even if it equals the value
    /// before the fault (the consumer last saw `quality: bad`).
    #[test]
    fn a_good_value_after_a_bad_reading_is_published_even_if_unchanged() {
        let config = Arc::new(crate::config::parse(PER_POINT, "test.yaml").expect("config loads"));
        let mut stage = Stage::default();
        let read =
            |v: Result<Raw, String>| bus(&config, 1, BusEvent::Reading(reading(vec![(0, v)])));
        assert_eq!(publish(&mut stage, vec![read(Ok(Raw::U64(5)))]).len(), 1);
        let bad = publish(&mut stage, vec![read(Err("timeout".into()))]);
        assert!(bad[0].contains(r#""quality":"bad""#), "{bad:?}");
        let good = publish(&mut stage, vec![read(Ok(Raw::U64(5)))]);
        assert_eq!(good.len(), 1, "the value after the fault was not published");
    }

    #[test]
    fn statuses_of_devices_online_at_the_stop_turn_offline() {
        let config = Arc::new(crate::config::parse(PER_POINT, "test.yaml").expect("config loads"));
        let mut stage = Stage::default();
        let online = bus(
            &config,
            1,
            BusEvent::Status {
                device: 0,
                online: true,
                reason: String::new(),
            },
        );
        assert_eq!(publish(&mut stage, vec![online]), ["online"]);
        let mut out = Vec::new();
        stage.stopped(&mut json::JsonEncoding::default(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, config.devices[0].status_topic);
        assert_eq!(out[0].payload, b"offline");
        assert!(out[0].retain);
    }
}
