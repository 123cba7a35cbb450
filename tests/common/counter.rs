//! Checks on the values of a counter register as they arrive over MQTT: the device returns one
//! more on every read, so a lost reading is a gap and a reordering is a step back.

/// Order per topic: every new value is larger than all before it; going back is allowed only
/// to repeat a value already delivered, from within the in-flight window (QoS 1 re-sends
/// what was unacknowledged when a connection died).
pub fn assert_in_order(seen: &[u64]) {
    const WINDOW: u64 = 100;
    let mut max = None;
    let mut delivered = std::collections::HashSet::new();
    for (i, &v) in seen.iter().enumerate() {
        match max {
            Some(m) if v <= m => assert!(
                delivered.contains(&v) && m - v < WINDOW,
                "value {v} at {i} goes back from {m} and is not a re-delivery: {seen:?}"
            ),
            _ => max = Some(v),
        }
        delivered.insert(v);
    }
}

/// Values from the first seen up to `last` that never arrived.
pub fn missing(seen: &[u64], last: u64) -> Vec<u64> {
    let mut seen = seen.to_vec();
    seen.sort_unstable();
    seen.dedup();
    (seen[0]..=last)
        .filter(|v| seen.binary_search(v).is_err())
        .collect()
}
