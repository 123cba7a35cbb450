//! The change filter: which readings are worth publishing (pure).

use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{Config, Device, PublishPolicy, Value};

/// Decides, per point, whether a reading is worth publishing under its [`PublishPolicy`].
#[derive(Debug, Clone)]
pub struct ChangeFilter {
    policy: PublishPolicy,
    /// Last published value and when.
    last: Option<(Value, Instant)>,
}

impl ChangeFilter {
    pub fn new(policy: PublishPolicy) -> Self {
        ChangeFilter { policy, last: None }
    }

    /// Whether to publish `value` read at `now`; records it as the last published value when the
    /// answer is yes.
    ///
    /// `EveryPoll`: always. `OnChange`: the first value; a number that moved by more than
    /// `deadband` from the last published one (any change when the deadband is 0); a bool or
    /// text that changed at all; a change of kind (number ↔ text); or `heartbeat` elapsed since
    /// the last publish. NaN equals NaN here, so a stuck NaN is not republished every poll.
    pub fn should_publish(&mut self, value: &Value, now: Instant) -> bool {
        let publish = match (self.policy, &self.last) {
            (PublishPolicy::EveryPoll, _) | (PublishPolicy::OnChange { .. }, None) => true,
            (
                PublishPolicy::OnChange {
                    deadband,
                    heartbeat,
                },
                Some((last, at)),
            ) => {
                heartbeat.is_some_and(|h| now.saturating_duration_since(*at) >= h)
                    || changed(last, value, deadband)
            }
        };
        if publish {
            self.last = Some((value.clone(), now));
        }
        publish
    }

    /// Forgets the last published value, so that the next reading is published (after a bad
    /// reading, or when the broker session was lost).
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// Time since the last publish, if any.
    pub fn since_last(&self, now: Instant) -> Option<Duration> {
        self.last
            .as_ref()
            .map(|(_, at)| now.saturating_duration_since(*at))
    }
}

fn changed(last: &Value, new: &Value, deadband: f64) -> bool {
    match (last, new) {
        (Value::Bool(a), Value::Bool(b)) => a != b,
        (Value::Text(a), Value::Text(b)) => a != b,
        (Value::Bool(_) | Value::Text(_), _) | (_, Value::Bool(_) | Value::Text(_)) => true,
        // Exact comparison of integers: u64/i64 beyond 2^53 would collapse as f64.
        (Value::Int(a), Value::Int(b)) if deadband <= 0.0 => a != b,
        (Value::UInt(a), Value::UInt(b)) if deadband <= 0.0 => a != b,
        _ => {
            let (a, b) = (
                last.as_f64().expect("numeric"),
                new.as_f64().expect("numeric"),
            );
            match (a.is_nan(), b.is_nan()) {
                (true, true) => false,
                (true, false) | (false, true) => true,
                // Infinities: inf - inf is NaN, so compare them directly.
                _ if a.is_infinite() || b.is_infinite() => a != b,
                #[allow(clippy::float_cmp)] // deadband 0 means any change at all
                _ if deadband <= 0.0 => a != b,
                _ => (b - a).abs() > deadband,
            }
        }
    }
}

/// The change filters of one configuration generation's points, by device and point index
/// (this runs for every reading: a hash lookup per point was a measurable part of the
/// gateway's CPU).
pub struct Filters {
    devices: Vec<Vec<ChangeFilter>>,
    /// The stage's event count when a device's readings last went through these.
    device_used: Vec<u64>,
    /// The stage's event count when these were last used.
    last_used: u64,
}

impl Filters {
    pub fn new(config: &Config) -> Filters {
        Filters {
            devices: config.devices.iter().map(device_filters).collect(),
            device_used: vec![0; config.devices.len()],
            last_used: 0,
        }
    }

    /// Forgets a device's filters: every value is published again on its next reading.
    pub fn forget(&mut self, config: &Config, device: usize) {
        self.devices[device] = device_filters(&config.devices[device]);
    }

    /// The filters of a device's points, by point index.
    pub fn device(&mut self, device: usize) -> &mut [ChangeFilter] {
        &mut self.devices[device]
    }

    /// A reading of `device` went through these at event `now`.
    pub fn used_by(&mut self, device: usize, now: u64) {
        self.device_used[device] = now;
    }
}

fn device_filters(device: &Device) -> Vec<ChangeFilter> {
    device
        .points
        .iter()
        .map(|p| ChangeFilter::new(p.publish))
        .collect()
}

/// Generations whose filters the stage keeps. Buses kept across reloads keep their
/// generation, so several can be live at once; without a bound every reload would leave its
/// filters behind for good. A live generation dropped costs only a full publish of its
/// devices' next readings, as after an offline.
pub const KEPT_GENERATIONS: usize = 8;

/// The filters of `generation` (whose configuration is `config`), made room for by dropping
/// the least recently used generation's when [`KEPT_GENERATIONS`] are kept already.
pub fn generation_filters<'a>(
    all: &'a mut HashMap<u64, Filters>,
    generation: u64,
    config: &Config,
    now: u64,
) -> &'a mut Filters {
    if !all.contains_key(&generation) && all.len() >= KEPT_GENERATIONS {
        if let Some(oldest) = all.iter().min_by_key(|(_, f)| f.last_used).map(|(g, _)| *g) {
            all.remove(&oldest);
        }
    }
    let filters = all
        .entry(generation)
        .or_insert_with(|| Filters::new(config));
    filters.last_used = now;
    filters
}

/// The filter that the readings of point `point` of device `device` (by name) went through
/// last: that of the generation whose readings of the device came most recently.
pub fn reading_filter<'a>(
    all: &'a mut HashMap<u64, Filters>,
    configs: &HashMap<u64, Arc<Config>>,
    device: &str,
    point: &str,
) -> Option<&'a mut ChangeFilter> {
    let mut best: Option<(u64, u64, usize, usize)> = None;
    for (g, f) in all.iter() {
        let Some(config) = configs.get(g) else {
            continue;
        };
        let Some(d) = config.devices.iter().position(|d| d.name == device) else {
            continue;
        };
        let Some(p) = config.devices[d]
            .points
            .iter()
            .position(|p| p.name == point)
        else {
            continue;
        };
        let used = f.device_used[d];
        if used > 0 && best.is_none_or(|b| used > b.1) {
            best = Some((*g, used, d, p));
        }
    }
    let (g, _, d, p) = best?;
    all.get_mut(&g).map(|f| &mut f.devices[d][p])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_change(deadband: f64, heartbeat: Option<Duration>) -> ChangeFilter {
        ChangeFilter::new(PublishPolicy::OnChange {
            deadband,
            heartbeat,
        })
    }

    #[test]
    fn every_poll_publishes_everything() {
        let mut f = ChangeFilter::new(PublishPolicy::EveryPoll);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Int(1), t0));
        assert!(f.should_publish(&Value::Int(1), t0));
    }

    #[test]
    fn on_change_publishes_moves_beyond_the_deadband_from_the_last_published_value() {
        let mut f = on_change(0.5, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Float(230.0), t0));
        assert!(!f.should_publish(&Value::Float(230.3), t0));
        assert!(!f.should_publish(&Value::Float(230.5), t0)); // not more than the deadband
                                                              // Creeping does not escape the deadband: compared with 230.0, not 230.5.
        assert!(f.should_publish(&Value::Float(230.6), t0));
        assert!(!f.should_publish(&Value::Float(230.2), t0));
        assert!(f.should_publish(&Value::Float(230.0), t0));
    }

    #[test]
    fn a_zero_deadband_publishes_any_change() {
        let mut f = on_change(0.0, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::UInt(u64::MAX), t0));
        assert!(!f.should_publish(&Value::UInt(u64::MAX), t0));
        assert!(f.should_publish(&Value::UInt(u64::MAX - 1), t0));
        assert!(f.should_publish(&Value::Float(1.0), t0));
        assert!(!f.should_publish(&Value::Float(1.0), t0));
        assert!(f.should_publish(&Value::Float(1.000_001), t0));
        assert!(f.should_publish(&Value::Float(f64::NAN), t0));
        assert!(!f.should_publish(&Value::Float(f64::NAN), t0));
        assert!(f.should_publish(&Value::Float(f64::INFINITY), t0));
        assert!(!f.should_publish(&Value::Float(f64::INFINITY), t0));
    }

    #[test]
    fn bools_and_text_publish_on_any_change_whatever_the_deadband() {
        let mut f = on_change(10.0, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Bool(false), t0));
        assert!(!f.should_publish(&Value::Bool(false), t0));
        assert!(f.should_publish(&Value::Bool(true), t0));
        assert!(f.should_publish(&Value::Text("run".into()), t0));
        assert!(!f.should_publish(&Value::Text("run".into()), t0));
        assert!(f.should_publish(&Value::Text("stop".into()), t0));
        assert!(f.should_publish(&Value::Int(1), t0));
    }

    #[test]
    fn the_heartbeat_republishes_an_unchanged_value() {
        let mut f = on_change(1.0, Some(Duration::from_secs(60)));
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Int(5), t0));
        assert!(!f.should_publish(&Value::Int(5), t0 + Duration::from_secs(59)));
        assert!(f.should_publish(&Value::Int(5), t0 + Duration::from_secs(60)));
        // The heartbeat counts from the last publish, whatever triggered it.
        assert!(f.should_publish(&Value::Int(9), t0 + Duration::from_secs(90)));
        assert!(!f.should_publish(&Value::Int(9), t0 + Duration::from_secs(149)));
        assert!(f.should_publish(&Value::Int(9), t0 + Duration::from_secs(150)));
        assert_eq!(
            f.since_last(t0 + Duration::from_secs(151)),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn reset_makes_the_next_value_publish() {
        let mut f = on_change(1.0, None);
        let t0 = Instant::now();
        assert!(f.should_publish(&Value::Int(5), t0));
        assert!(!f.should_publish(&Value::Int(5), t0));
        f.reset();
        assert_eq!(f.since_last(t0), None);
        assert!(f.should_publish(&Value::Int(5), t0));
    }

    use crate::publish::tests::PER_DEVICE;

    #[test]
    fn old_generations_filters_are_dropped_least_recently_used_first() {
        let config = crate::config::parse(PER_DEVICE, "test.yaml").expect("config loads");
        let mut all = HashMap::new();
        let mut now = 0;
        for generation in 1..=KEPT_GENERATIONS as u64 {
            now += 1;
            generation_filters(&mut all, generation, &config, now);
        }
        // Generation 1 is still in use (a bus kept across the reloads); 2 is not.
        now += 1;
        generation_filters(&mut all, 1, &config, now).forget(&config, 0);
        now += 1;
        generation_filters(&mut all, 99, &config, now);
        assert_eq!(all.len(), KEPT_GENERATIONS);
        assert!(all.contains_key(&1) && all.contains_key(&99));
        assert!(!all.contains_key(&2));
    }
}
