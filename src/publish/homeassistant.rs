//! Home Assistant MQTT discovery: every device and point announced as an entity of the right
//! kind, with its unit, controls and availability (pure: configuration → config messages).
//!
//! One retained config topic per entity (`{prefix}/{component}/{node}/{object}/config`), which
//! every Home Assistant version reads (device-based discovery came only in 2024.12). The
//! gateway is a device too, announced first (a `via_device` link needs its parent to exist),
//! with diagnostic entities. See README "Home Assistant".

use std::collections::BTreeMap;

use serde_json::{json, Map, Value as Json};

use crate::model::{Config, DataType, Device, MessageMode, PayloadFormat, Point, PointHa};

/// One entity: its config topic and payload, and what `check` says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub topic: String,
    pub payload: Json,
    pub component: &'static str,
    /// The device and point it shows (`None` for the gateway's own).
    pub device: Option<String>,
    pub point: Option<String>,
}

/// A name as a discovery id: `[A-Za-z0-9_-]`, everything else `_`.
fn id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The gateway's node id in discovery topics and the prefix of every unique id.
fn node_id(config: &Config) -> String {
    format!("fieldbridge_{}", id(&config.gateway.id))
}

/// The Home Assistant device class of a unit, where the unit says it unambiguously.
pub fn device_class(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "V" | "mV" | "kV" => "voltage",
        "A" | "mA" => "current",
        "W" | "kW" | "MW" => "power",
        "Wh" | "kWh" | "MWh" => "energy",
        "°C" | "°F" | "K" => "temperature",
        "Hz" => "frequency",
        "%RH" => "humidity",
        "bar" | "mbar" | "Pa" | "hPa" | "kPa" | "psi" => "pressure",
        "VA" | "kVA" => "apparent_power",
        "var" | "kvar" => "reactive_power",
        _ => return None,
    })
}

/// Home Assistant's unit for ours, where they spell it differently.
fn ha_unit(unit: &str) -> &str {
    match unit {
        "%RH" => "%",
        other => other,
    }
}

/// Decimals worth showing for a point: those of its scale (0.1 → 1, 0.01 → 2), none for an
/// unscaled integer; `None` for floats (their own).
fn precision(point: &Point) -> Option<u32> {
    let integer = !matches!(point.data_type, DataType::F32 | DataType::F64);
    #[allow(clippy::float_cmp)]
    if point.scale == 1.0 && point.offset == 0.0 {
        return integer.then_some(0);
    }
    let mut d = 0;
    let mut s = point.scale.abs();
    while d < 6 && (s - s.round()).abs() > 1e-9 {
        s *= 10.0;
        d += 1;
    }
    Some(d)
}

fn is_bool(point: &Point) -> bool {
    matches!(point.data_type, DataType::Bool | DataType::Bit(_))
}

fn is_text(point: &Point) -> bool {
    matches!(point.data_type, DataType::Ascii(_))
}

/// Every entity the configuration announces, the gateway's own first.
pub fn entities(config: &Config) -> Vec<Entity> {
    let Some(ha) = &config.homeassistant else {
        return Vec::new();
    };
    let node = node_id(config);
    let gateway_device = json!({
        "identifiers": [node.clone()],
        "name": format!("fieldbridge {}", config.gateway.id),
        "manufacturer": "fieldbridge",
        "model": "Modbus/serial to MQTT gateway",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let mut out = Vec::new();
    let status = &config.mqtt.status_topic;
    // The gateway: connected (its own status), and figures from the stats message.
    out.push(Entity {
        topic: format!("{}/binary_sensor/{node}/connected/config", ha.prefix),
        payload: json!({
            "name": "MQTT connected",
            "unique_id": format!("{node}_connected"),
            "object_id": format!("{node}_connected"),
            "state_topic": status,
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "device": gateway_device,
        }),
        component: "binary_sensor",
        device: None,
        point: None,
    });
    if config.gateway.stats_interval.is_some() {
        let stats = format!("{}/status/stats", config.gateway.prefix);
        for (key, name) in [
            ("backlog", "Backlog"),
            ("dropped", "Dropped"),
            ("devices_online", "Devices online"),
        ] {
            out.push(Entity {
                topic: format!("{}/sensor/{node}/{key}/config", ha.prefix),
                payload: json!({
                    "name": name,
                    "unique_id": format!("{node}_{key}"),
                    "object_id": format!("{node}_{key}"),
                    "state_topic": stats,
                    "value_template": format!("{{{{ value_json.{key} }}}}"),
                    "state_class": "measurement",
                    "entity_category": "diagnostic",
                    "availability_topic": status,
                    "device": { "identifiers": [node.clone()] },
                }),
                component: "sensor",
                device: None,
                point: None,
            });
        }
    }
    for device in &config.devices {
        // Discovered SunSpec points the bus scales by a scale-factor register: their decimals
        // are the device's (49.98 Hz is not to be shown as 50).
        let scaled: Vec<&str> = match device.sunspec.as_ref().and_then(|s| s.found.as_ref()) {
            Some(f) => {
                let (layout, _) = crate::sunspec::points(&f.discovery);
                device
                    .points
                    .iter()
                    .filter(|p| {
                        layout.iter().any(|sp| {
                            sp.sf.is_some() && sp.name == p.name && sp.address == p.address
                        })
                    })
                    .map(|p| p.name.as_str())
                    .collect()
            }
            None => Vec::new(),
        };
        for (p, point) in device.points.iter().enumerate() {
            let settings = device.ha.points.get(p).cloned().unwrap_or_default();
            if !settings.enabled
                || point.topic.is_empty() && device.message_mode == MessageMode::PerPoint
            {
                continue;
            }
            let scaled = scaled.contains(&point.name.as_str());
            out.push(entity(
                config, &ha.prefix, &node, device, p, &settings, scaled,
            ));
        }
    }
    out
}

/// The entity of one point.
fn entity(
    config: &Config,
    prefix: &str,
    node: &str,
    device: &Device,
    p: usize,
    settings: &PointHa,
    device_scaled: bool,
) -> Entity {
    let point = &device.points[p];
    let command = device
        .commands
        .get(p)
        .filter(|c| point.writable && !c.topic.is_empty());
    let labels = !point.labels.is_empty();
    let component = match (command.is_some(), is_bool(point), labels, is_text(point)) {
        (true, true, _, _) => "switch",
        (true, false, true, _) => "select",
        (true, false, false, false) => "number",
        (true, false, false, true) => "text",
        (false, true, _, _) => "binary_sensor",
        (false, false, _, _) => "sensor",
    };
    let object = format!("{}_{}", id(&device.name), id(&point.name));
    let unique = format!("{node}_{object}");
    let mut c = Map::new();
    c.insert(
        "name".into(),
        json!(settings.name.clone().unwrap_or_else(|| point.name.clone())),
    );
    c.insert("unique_id".into(), json!(unique));
    c.insert("object_id".into(), json!(unique));
    // Where the value is, and how to read it: bad quality (`null`) renders `None`, which Home
    // Assistant takes as unknown (not 0).
    let (state_topic, value) = match device.message_mode {
        MessageMode::PerDevice => (
            device.topic.clone(),
            format!(
                "value_json['values']['{}']",
                point.name.replace('\'', "\\'")
            ),
        ),
        MessageMode::PerPoint => (point.topic.clone(), "value_json.value".to_string()),
    };
    let bare =
        device.message_mode == MessageMode::PerPoint && point.payload == PayloadFormat::Value;
    c.insert("state_topic".into(), json!(state_topic));
    let mut template = match (component, bare) {
        ("binary_sensor" | "switch", true) => {
            "{{ 'ON' if value == 'true' else 'OFF' }}".to_string()
        }
        ("binary_sensor" | "switch", false) => {
            format!("{{{{ None if {value} is none else ('ON' if {value} else 'OFF') }}}}")
        }
        (_, true) => "{{ value }}".to_string(),
        (_, false) => format!("{{{{ None if {value} is none else {value} }}}}"),
    };
    if device.message_mode == MessageMode::PerDevice {
        // A device message carries the points of the group that was read: another group's
        // message renders nothing, which Home Assistant ignores (the state stays).
        let key = point.name.replace('\'', "\\'");
        template = format!("{{% if '{key}' in value_json['values'] %}}{template}{{% endif %}}");
    }
    c.insert("value_template".into(), json!(template));
    match component {
        "switch" => {
            let command = command.expect("writable");
            c.insert("command_topic".into(), json!(command.topic));
            c.insert("payload_on".into(), json!("true"));
            c.insert("payload_off".into(), json!("false"));
            c.insert("state_on".into(), json!("ON"));
            c.insert("state_off".into(), json!("OFF"));
        }
        "binary_sensor" => {
            c.insert("payload_on".into(), json!("ON"));
            c.insert("payload_off".into(), json!("OFF"));
        }
        "select" => {
            let command = command.expect("writable");
            c.insert("command_topic".into(), json!(command.topic));
            // As a JSON string: a label `2` sent bare would be read as the number 2.
            c.insert("command_template".into(), json!("{{ value | tojson }}"));
            c.insert(
                "options".into(),
                json!(point.labels.values().collect::<Vec<_>>()),
            );
        }
        "number" => {
            let command = command.expect("writable");
            c.insert("command_topic".into(), json!(command.topic));
            let (lo, hi) = number_range(point);
            c.insert("min".into(), json!(lo));
            c.insert("max".into(), json!(hi));
            // What one raw step is worth (the gateway refuses values between); Home
            // Assistant takes no step below 0.001.
            let step = match point.data_type {
                DataType::F32 | DataType::F64 => 0.001,
                _ => point.scale.abs().max(0.001),
            };
            c.insert("step".into(), json!(step));
            c.insert("mode".into(), json!("box"));
        }
        "text" => {
            let command = command.expect("writable");
            c.insert("command_topic".into(), json!(command.topic));
            c.insert("command_template".into(), json!("{{ value | tojson }}"));
            if let DataType::Ascii(n) = point.data_type {
                c.insert("max".into(), json!(usize::from(n) * 2));
            }
        }
        _ => {}
    }
    let numeric = matches!(component, "sensor" | "number") && !labels && !is_text(point);
    if numeric {
        if let Some(unit) = &point.unit {
            c.insert("unit_of_measurement".into(), json!(ha_unit(unit)));
        }
        if let Some(d) = precision(point).filter(|_| !device_scaled) {
            c.insert("suggested_display_precision".into(), json!(d));
        }
    }
    let derived_class = point
        .unit
        .as_deref()
        .and_then(device_class)
        .filter(|_| numeric);
    let class = settings.device_class.clone().or_else(|| {
        if component == "sensor" && labels {
            Some("enum".into())
        } else {
            derived_class.map(str::to_owned)
        }
    });
    if let Some(class) = &class {
        c.insert("device_class".into(), json!(class));
    }
    if component == "sensor" && labels {
        c.insert(
            "options".into(),
            json!(point.labels.values().collect::<Vec<_>>()),
        );
    }
    if component == "sensor" && numeric {
        let state_class = settings.state_class.clone().unwrap_or_else(|| {
            if class.as_deref() == Some("energy") {
                "total_increasing".into()
            } else {
                "measurement".into()
            }
        });
        c.insert("state_class".into(), json!(state_class));
    }
    if let Some(cat) = &settings.entity_category {
        c.insert("entity_category".into(), json!(cat));
    }
    if let Some(icon) = &settings.icon {
        c.insert("icon".into(), json!(icon));
    }
    // Unavailable when the gateway is gone or its device is offline.
    c.insert(
        "availability".into(),
        json!([
            { "topic": config.mqtt.status_topic },
            { "topic": device.status_topic },
        ]),
    );
    c.insert("availability_mode".into(), json!("all"));
    let mut dev = Map::new();
    dev.insert(
        "identifiers".into(),
        json!([format!("{node}_{}", id(&device.name))]),
    );
    dev.insert("name".into(), json!(device.name));
    if let Some(m) = &device.ha.manufacturer {
        dev.insert("manufacturer".into(), json!(m));
    }
    if let Some(m) = &device.ha.model {
        dev.insert("model".into(), json!(m));
    }
    dev.insert("via_device".into(), json!(node));
    c.insert("device".into(), Json::Object(dev));
    Entity {
        topic: format!("{prefix}/{component}/{node}/{object}/config"),
        payload: Json::Object(c),
        component,
        device: Some(device.name.clone()),
        point: Some(point.name.clone()),
    }
}

/// A `number`'s bounds: the point's `min`/`max`, else what its type and scale can hold.
fn number_range(point: &Point) -> (f64, f64) {
    let (lo, hi) = match point.data_type {
        DataType::U16 => (0.0, 65_535.0),
        DataType::I16 => (-32_768.0, 32_767.0),
        DataType::U32 => (0.0, 4_294_967_295.0),
        DataType::I32 => (-2_147_483_648.0, 2_147_483_647.0),
        DataType::U64 => (0.0, 1.8e19),
        DataType::I64 => (-9.2e18, 9.2e18),
        _ => (-1e15, 1e15),
    };
    let (a, b) = (
        lo * point.scale + point.offset,
        hi * point.scale + point.offset,
    );
    let (lo, hi) = (a.min(b), a.max(b));
    (point.min.unwrap_or(lo), point.max.unwrap_or(hi))
}

/// The config messages to send: every entity of `now` whose payload is not what `announced`
/// says was sent (all of them with `force`), and an empty payload for every topic announced
/// before that `now` has not (removed from the configuration). `announced` becomes `now`.
pub fn changes(
    now: &[Entity],
    announced: &mut BTreeMap<String, String>,
    force: bool,
) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let current: BTreeMap<&str, String> = now
        .iter()
        .map(|e| (e.topic.as_str(), e.payload.to_string()))
        .collect();
    // Removed ones first: a point renamed to another component must not exist twice.
    for topic in announced.keys() {
        if !current.contains_key(topic.as_str()) {
            out.push((topic.clone(), Vec::new()));
        }
    }
    for e in now {
        let payload = &current[e.topic.as_str()];
        if force || announced.get(&e.topic) != Some(payload) {
            out.push((e.topic.clone(), payload.clone().into_bytes()));
        }
    }
    *announced = current
        .into_iter()
        .map(|(t, p)| (t.to_owned(), p))
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
gateway: { id: gw1, prefix: plant }
mqtt: { url: "mqtt://127.0.0.1:1883" }
homeassistant: { discovery: true }
buses:
  - { name: b, type: tcp, host: 127.0.0.1 }
devices:
  - name: meter
    bus: b
    manufacturer: Eastron
    model: SDM120
    points:
      - { name: voltage, address: 0, type: f32, unit: V }
      - { name: energy, address: 2, type: u32, scale: 0.01, unit: kWh }
      - { name: temp, address: 4, type: i16, scale: 0.1, unit: "°C", homeassistant: { icon: "mdi:thermometer" } }
      - { name: mode, address: 5, type: u16, labels: { 0: "OFF", 1: "ON" } }
      - { name: hidden, address: 6, type: u16, homeassistant: false }
      - { name: serial, address: 7, type: string, length: 4 }
  - name: plc
    bus: b
    unit: 2
    message: per_device
    points:
      - { name: run, register: coil, address: 0, writable: true }
      - { name: fault, register: discrete, address: 0 }
      - { name: setpoint, address: 0, type: u16, scale: 0.5, min: 0, max: 50, writable: true }
      - { name: program, address: 1, type: u16, labels: { 0: "A", 1: "B" }, writable: true }
"#;

    fn by_name<'a>(all: &'a [Entity], point: &str) -> &'a Entity {
        all.iter()
            .find(|e| e.point.as_deref() == Some(point))
            .unwrap_or_else(|| panic!("no entity for {point}"))
    }

    #[test]
    fn every_point_becomes_an_entity_of_the_right_kind() {
        let config = crate::config::parse(CONFIG, "t.yaml").expect("config loads");
        let all = entities(&config);
        assert_eq!(all[0].component, "binary_sensor", "the gateway's own first");
        assert_eq!(
            all[0].payload["device"]["identifiers"][0],
            "fieldbridge_gw1"
        );
        let v = by_name(&all, "voltage");
        assert_eq!(
            v.topic,
            "homeassistant/sensor/fieldbridge_gw1/meter_voltage/config"
        );
        assert_eq!(v.payload["device_class"], "voltage");
        assert_eq!(v.payload["state_class"], "measurement");
        assert_eq!(v.payload["unit_of_measurement"], "V");
        assert_eq!(v.payload["state_topic"], "plant/meter/voltage");
        assert_eq!(v.payload["availability_mode"], "all");
        assert_eq!(v.payload["availability"][1]["topic"], "plant/meter/status");
        assert_eq!(v.payload["device"]["manufacturer"], "Eastron");
        assert_eq!(v.payload["device"]["via_device"], "fieldbridge_gw1");
        let e = by_name(&all, "energy");
        assert_eq!(e.payload["device_class"], "energy");
        assert_eq!(e.payload["state_class"], "total_increasing");
        assert_eq!(e.payload["suggested_display_precision"], 2);
        let t = by_name(&all, "temp");
        assert_eq!(t.payload["device_class"], "temperature");
        assert_eq!(t.payload["icon"], "mdi:thermometer");
        assert_eq!(t.payload["suggested_display_precision"], 1);
        let m = by_name(&all, "mode");
        assert_eq!(
            (m.component, &m.payload["device_class"]),
            ("sensor", &json!("enum"))
        );
        assert_eq!(m.payload["options"], json!(["OFF", "ON"]));
        assert!(all.iter().all(|e| e.point.as_deref() != Some("hidden")));
        let s = by_name(&all, "serial");
        assert_eq!(s.component, "sensor");
        assert!(s.payload.get("unit_of_measurement").is_none());
        assert!(s.payload.get("state_class").is_none());
        let run = by_name(&all, "run");
        assert_eq!(run.component, "switch");
        assert_eq!(run.payload["command_topic"], "plant/plc/run/set");
        assert_eq!(run.payload["state_topic"], "plant/plc");
        assert_eq!(
            run.payload["value_template"],
            "{% if 'run' in value_json['values'] %}{{ None if value_json['values']['run'] is none else ('ON' if value_json['values']['run'] else 'OFF') }}{% endif %}"
        );
        assert_eq!(by_name(&all, "fault").component, "binary_sensor");
        let sp = by_name(&all, "setpoint");
        assert_eq!(sp.component, "number");
        assert_eq!(
            (sp.payload["min"].as_f64(), sp.payload["max"].as_f64()),
            (Some(0.0), Some(50.0))
        );
        assert_eq!(sp.payload["step"], 0.5, "one raw step");
        let pr = by_name(&all, "program");
        assert_eq!(pr.component, "select");
        assert_eq!(pr.payload["options"], json!(["A", "B"]));
        assert_eq!(pr.payload["command_template"], "{{ value | tojson }}");
    }

    #[test]
    fn discovered_sunspec_points_scaled_by_the_device_get_no_rounding_precision() {
        let text = "gateway: { id: gw1 }\nmqtt: { url: \"mqtt://127.0.0.1:1883\" }\nhomeassistant: { discovery: true }\nbuses:\n  - { name: b, type: tcp, host: 127.0.0.1 }\ndevices:\n  - { name: inv, bus: b, sunspec: auto }\n";
        let mut found = crate::config::Discoveries::new();
        found.insert(
            ("inv".into(), "b".into(), 1),
            std::sync::Arc::new(crate::sunspec::example_discovered()),
        );
        let library = crate::config::profile::Library { dirs: Vec::new() };
        let loaded = crate::config::parse_discovered(text, "t.yaml", &library, &found)
            .unwrap_or_else(|e| panic!("{e}"));
        let all = entities(&loaded.config);
        // Hz with a scale-factor register (10^-2 on most inverters): the device's decimals.
        let hz = by_name(&all, "inverter_three_phase_Hz");
        assert_eq!(hz.payload["unit_of_measurement"], "Hz");
        assert!(
            hz.payload.get("suggested_display_precision").is_none(),
            "{}",
            hz.payload
        );
        // An unscaled integer (the operating state) keeps "no decimals".
        let id = by_name(&all, "inverter_three_phase_St");
        assert_eq!(
            id.payload["suggested_display_precision"], 0,
            "{}",
            id.payload
        );
    }

    #[test]
    fn changes_send_what_changed_and_clear_what_was_removed() {
        let config = crate::config::parse(CONFIG, "t.yaml").unwrap();
        let all = entities(&config);
        let mut announced = BTreeMap::new();
        announced.insert("homeassistant/sensor/old/config".to_string(), String::new());
        let first = changes(&all, &mut announced, true);
        assert_eq!(
            first[0],
            ("homeassistant/sensor/old/config".to_string(), Vec::new())
        );
        assert_eq!(first.len(), all.len() + 1);
        assert!(
            changes(&all, &mut announced, false).is_empty(),
            "nothing changed"
        );
        assert_eq!(changes(&all, &mut announced, true).len(), all.len());
        let fewer: Vec<Entity> = all
            .iter()
            .filter(|e| e.point.as_deref() != Some("temp"))
            .cloned()
            .collect();
        let cleared = changes(&fewer, &mut announced, false);
        assert_eq!(cleared.len(), 1);
        assert!(cleared[0].0.ends_with("/meter_temp/config") && cleared[0].1.is_empty());
    }
}
