//! Which command filters to subscribe to, and how: the defence against a retained message
//! that ends every session.
//!
//! A retained message larger than our incoming packet limit (`mqtt.max_packet_size`) on a
//! topic one of our filters matches is sent by the broker after every SUBSCRIBE to that filter,
//! and rumqttc ends the session on it (it cannot skip a packet it refuses to read). MQTT 5
//! tells the broker our limit in CONNECT (Maximum Packet Size, §3.1.2.11.4), so a correct
//! broker never sends it; MQTT 3.1.1 has no way to, so without this the link would reconnect
//! for ever.
//!
//! Normal sessions subscribe to every filter at once (a few SUBSCRIBE packets). When a session
//! ends on an oversized packet, the next ones *probe*: they subscribe one filter at a time,
//! each after the previous SUBACK, with the link's publishes held back until all are done.
//! A broker sends a filter's retained messages right after its SUBACK (and before it reads our
//! next SUBSCRIBE), so when a probing session ends on an oversized packet soon after a SUBACK,
//! the filter of that SUBACK brought it: it is not subscribed again (until a restart), and
//! the caller logs how to clear the message. A probing session that gets through every filter
//! ends the probing. Pure state, no I/O: the event-loop task sends what this returns.

use std::time::{Duration, Instant};

/// An oversized packet this soon after a SUBACK is taken as one of that filter's retained
/// messages. A broker writes them right after the SUBACK; rumqttc refuses a packet as soon as
/// its fixed header says how long it is.
pub(super) const BLAME_WITHIN: Duration = Duration::from_secs(5);

/// Filters per SUBSCRIBE packet in a normal session (the request channel is small).
const CHUNK: usize = 32;

#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// The filters still subscribed to, in the configured order.
    active: Vec<String>,
    /// The next sessions subscribe one filter at a time.
    probing: bool,
    /// The current session is a probing one; `next` is the filter to subscribe after the
    /// pending SUBACK, `acked` the last filter whose SUBACK came, and when.
    session_probing: bool,
    next: usize,
    acked: Option<(usize, Instant)>,
    /// SUBACKs still expected in this session.
    awaiting: usize,
    /// Filters found to bring an oversized retained message: not subscribed again, also when
    /// a reload names them.
    blamed: Vec<String>,
}

/// What to do at a CONNACK.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Start {
    /// SUBSCRIBE packets to send now, each a list of filters.
    pub packets: Vec<Vec<String>>,
    /// Hold the link's publishes back until [`Subscriptions::ready`].
    pub hold: bool,
}

impl Subscriptions {
    pub(super) fn new(filters: Vec<String>) -> Subscriptions {
        Subscriptions {
            active: filters,
            ..Subscriptions::default()
        }
    }

    /// A new session: what to subscribe to now.
    pub(super) fn on_connack(&mut self) -> Start {
        self.session_probing = self.probing && !self.active.is_empty();
        self.acked = None;
        self.next = 0;
        if self.session_probing {
            self.next = 1;
            self.awaiting = 1;
            return Start {
                packets: vec![vec![self.active[0].clone()]],
                hold: true,
            };
        }
        self.awaiting = self.active.len().div_ceil(CHUNK);
        Start {
            packets: self.active.chunks(CHUNK).map(<[String]>::to_vec).collect(),
            hold: false,
        }
    }

    /// A SUBACK came: the filter to subscribe to next, when probing.
    pub(super) fn on_suback(&mut self, now: Instant) -> Option<String> {
        self.awaiting = self.awaiting.saturating_sub(1);
        if !self.session_probing {
            return None;
        }
        self.acked = Some((self.next - 1, now));
        let next = self.active.get(self.next).cloned();
        if next.is_some() {
            self.next += 1;
            self.awaiting += 1;
        } else {
            // Every filter went through: the next sessions subscribe normally again.
            self.probing = false;
        }
        next
    }

    /// Every SUBACK of this session came (the link's publishes may go).
    pub(super) fn ready(&self) -> bool {
        self.awaiting == 0
    }

    /// The session ended; `too_large` when on a packet over our limit. Returns the filter
    /// that is no longer subscribed to, when one is found to bring the packet.
    pub(super) fn on_session_end(&mut self, too_large: bool, now: Instant) -> Option<String> {
        if !too_large {
            return None;
        }
        let blamed = match self.acked {
            Some((i, at)) if self.session_probing && now.duration_since(at) <= BLAME_WITHIN => {
                Some(self.active.remove(i))
            }
            _ => None,
        };
        self.blamed.extend(blamed.iter().cloned());
        // Probe (again) in the next session: there may be more than one such message, or this
        // one came with a filter subscribed all at once.
        self.probing = !self.active.is_empty();
        blamed
    }

    pub(super) fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// A reload changed the filters: they apply from now on. Returns the filters to subscribe
    /// to now in a normal session (new ones, not blamed); a probing session leaves them to
    /// the next session's start. Filters no longer wanted are not unsubscribed: commands on
    /// them are answered as for an unknown point.
    pub(super) fn replace(&mut self, filters: Vec<String>) -> Vec<Vec<String>> {
        let added: Vec<String> = filters
            .iter()
            .filter(|f| !self.active.contains(f) && !self.blamed.contains(f))
            .cloned()
            .collect();
        self.active = filters
            .into_iter()
            .filter(|f| !self.blamed.contains(f))
            .collect();
        if self.session_probing {
            return Vec::new();
        }
        added.chunks(CHUNK).map(<[String]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(n: usize) -> Subscriptions {
        Subscriptions::new((0..n).map(|i| format!("f{i}")).collect())
    }

    #[test]
    fn a_normal_session_subscribes_everything_at_once() {
        let mut s = subs(40);
        let start = s.on_connack();
        assert!(!start.hold);
        assert_eq!(start.packets.len(), 2);
        assert_eq!(start.packets[0].len(), 32);
        assert!(!s.ready());
        let now = Instant::now();
        assert_eq!(s.on_suback(now), None);
        assert_eq!(s.on_suback(now), None);
        assert!(s.ready());
        // A session ending otherwise changes nothing.
        assert_eq!(s.on_session_end(false, now), None);
        assert!(!s.on_connack().hold);
    }

    #[test]
    fn the_filter_whose_suback_preceded_an_oversized_packet_is_dropped() {
        let mut s = subs(3);
        s.on_connack();
        let now = Instant::now();
        s.on_suback(now);
        // Session 1 dies on the oversized retained message: nothing to blame yet.
        assert_eq!(s.on_session_end(true, now), None);
        // Session 2 probes, one filter at a time, publishes held back.
        let start = s.on_connack();
        assert_eq!(start.packets, vec![vec!["f0".to_string()]]);
        assert!(start.hold);
        assert_eq!(s.on_suback(now).as_deref(), Some("f1"));
        assert!(!s.ready());
        // The retained message of f1 follows its SUBACK.
        assert_eq!(s.on_suback(now).as_deref(), Some("f2"));
        assert_eq!(s.on_session_end(true, now).as_deref(), Some("f1"));
        // Session 3 probes the rest and gets through: probing ends.
        assert_eq!(s.on_connack().packets, vec![vec!["f0".to_string()]]);
        assert_eq!(s.on_suback(now).as_deref(), Some("f2"));
        assert_eq!(s.on_suback(now), None);
        assert!(s.ready());
        let start = s.on_connack();
        assert!(!start.hold);
        assert_eq!(
            start.packets,
            vec![vec!["f0".to_string(), "f2".to_string()]]
        );
    }

    #[test]
    fn an_oversized_packet_long_after_the_last_suback_blames_no_filter() {
        let mut s = subs(2);
        s.on_connack();
        let t0 = Instant::now();
        s.on_suback(t0);
        s.on_session_end(true, t0);
        s.on_connack();
        s.on_suback(t0);
        s.on_suback(t0);
        assert_eq!(s.on_session_end(true, t0 + BLAME_WITHIN * 2), None);
        assert!(!s.is_empty());
    }

    #[test]
    fn a_reload_subscribes_the_new_filters_but_never_a_blamed_one() {
        let mut s = subs(2);
        s.on_connack();
        let now = Instant::now();
        s.on_suback(now);
        s.on_session_end(true, now);
        s.on_connack();
        s.on_suback(now);
        assert_eq!(s.on_suback(now), None);
        assert_eq!(s.on_session_end(true, now).as_deref(), Some("f1"));
        // A probing session gets through (probing ends), then a normal one.
        s.on_connack();
        assert_eq!(s.on_suback(now), None);
        s.on_connack();
        s.on_suback(now);
        assert!(s.ready());
        let now_subscribe = s.replace(vec!["f0".into(), "f1".into(), "f9".into()]);
        assert_eq!(now_subscribe, vec![vec!["f9".to_string()]]);
        assert_eq!(
            s.on_connack().packets,
            vec![vec!["f0".to_string(), "f9".to_string()]]
        );
    }

    #[test]
    fn no_filters_no_subscribe_and_ready_at_once() {
        let mut s = subs(0);
        let start = s.on_connack();
        assert!(start.packets.is_empty() && !start.hold);
        assert!(s.ready());
        assert_eq!(s.on_session_end(true, Instant::now()), None);
        assert!(!s.on_connack().hold);
    }
}
