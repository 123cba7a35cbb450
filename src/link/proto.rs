//! The two MQTT protocol versions behind one face: rumqttc's 3.1.1 client and its `v5` one.
//!
//! The link's logic (what is delivered, what is re-sent) is the same for both; only packets
//! differ. [`Client`] hands requests to either client; [`Session`] turns either event loop's
//! events into the few [`Polled`] outcomes the link acts on. What MQTT 5 adds and we use:
//! - on incoming publishes (commands): response topic, correlation data and the remaining
//!   message expiry interval (MQTT 5 §3.3.2.3.3: the broker forwards what is left of it);
//! - on outgoing publishes: correlation data on a command's response;
//! - reason codes: a PUBACK/PUBREC ≥ 0x80 is a refusal (§3.4.2.1), not a delivery, and a
//!   SUBACK code ≥ 0x80 a refused subscription (§3.9.3);
//! - the broker's Receive Maximum from CONNACK (§3.2.2.3.3) caps our window of messages in
//!   flight (one below it, so that rumqttc always has a free packet id).

use std::time::{Duration, Instant};

use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason, PublishProperties};
use rumqttc::{Event, Incoming, Outgoing, QoS};

use super::{InMessage, LinkError, OutMessage};
use crate::model::{Mqtt, MqttProtocol, MqttSession, Qos};

/// The request side of either client.
#[derive(Clone)]
pub(super) enum Client {
    V3(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// What one poll of an event loop means to the link.
pub(super) enum Polled {
    /// A new session. `receive_max` is the broker's limit on QoS>0 publishes in flight and
    /// `max_packet` the largest packet it takes (MQTT 5 only, §3.2.2.3.3, §3.2.2.3.6).
    ConnAck {
        session_present: bool,
        receive_max: Option<u16>,
        max_packet: Option<u32>,
        /// MQTT 5: the highest QoS the broker takes (§3.2.2.3.4).
        max_qos: Option<u8>,
    },
    /// A publish was written with this packet id (0 for QoS 0).
    Written(u16),
    /// The broker answered the publish with this packet id; `refused` carries the reason
    /// code when it did not take it (MQTT 5 only).
    Acked { pkid: u16, refused: Option<String> },
    /// A publish on a subscribed topic.
    Received(InMessage),
    /// MQTT 5: the broker refused a QoS 2 publish at its PUBREC. rumqttc 0.25's v5 state then
    /// never frees that publish's in-flight slot (it does so on PUBCOMP only, and none
    /// follows), so after as many refusals as the broker's Receive Maximum it would take no
    /// more requests: the session has to be reset after this one.
    RefusedAtPubRec { pkid: u16, reason: String },
    /// A SUBACK; `refused` counts the filters it refused, `codes` holds the first few of
    /// their codes.
    SubAck { refused: usize, codes: Vec<String> },
    /// Our DISCONNECT was written: the session ended on our request.
    Disconnected,
    /// Nothing the link acts on.
    Other,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// The network, a timeout, a refused connection: nothing the broker did wrong.
    Network,
    /// The broker closed the connection (end of stream, reset, or an MQTT 5 DISCONNECT).
    Closed,
    /// MQTT 5: the broker said another connection took the session over (reason 0x8E).
    TakenOver,
    /// The broker sent a packet larger than our incoming limit.
    TooLarge,
    /// The broker broke the protocol (an ack for nothing in flight, a packet type a server
    /// never sends, a forbidden property...).
    Protocol,
}

/// A session that ended: what rumqttc (or the link's own checks) said, and its cause.
#[derive(Debug, Clone)]
pub(super) struct Ended {
    pub error: String,
    pub cause: Cause,
}

impl Ended {
    pub(super) fn protocol(error: String) -> Ended {
        Ended {
            error,
            cause: Cause::Protocol,
        }
    }
}

/// Largest MQTT 5 correlation data we keep (the spec allows 65535 bytes, attacker-sized): a
/// request carrying more gets no response copy on its response topic (its result is still
/// published on `{topic}/result`).
pub(super) const MAX_CORRELATION: usize = 256;

/// The event-loop side of either client.
pub(super) enum Session {
    V3(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// rumqttc's options for either protocol.
pub(super) enum Options {
    V3(Box<rumqttc::MqttOptions>),
    V5(Box<v5::MqttOptions>),
}

/// The options of a connection to the broker `mqtt` names, with `will` as the last will (the
/// publisher stage's, handed over as data).
pub(super) fn options(mqtt: &Mqtt, will: Option<&super::Will>) -> Result<Options, LinkError> {
    let cap = usize::from(mqtt.inflight) + 16;
    let (transport, broker) = super::transport(mqtt)?;
    let password = mqtt
        .password
        .as_ref()
        .map(|s| s.0.clone())
        .unwrap_or_default();
    Ok(match mqtt.protocol {
        MqttProtocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(mqtt.client_id.clone(), broker, mqtt.port);
            options
                .set_transport(transport)
                .set_keep_alive(mqtt.keep_alive)
                .set_clean_session(mqtt.session == MqttSession::Clean)
                .set_max_packet_size(mqtt.max_packet_size, mqtt.max_packet_size)
                // One more than our window: rumqttc's flow control never holds a request back.
                .set_inflight(mqtt.inflight.saturating_add(1))
                .set_request_channel_capacity(cap);
            if let Some(w) = will {
                options.set_last_will(rumqttc::LastWill::new(
                    w.topic.clone(),
                    w.payload.clone(),
                    qos3(w.qos),
                    w.retain,
                ));
            }
            if let Some(user) = &mqtt.username {
                options.set_credentials(user.clone(), password);
            }
            Options::V3(Box::new(options))
        }
        MqttProtocol::V5 => {
            let mut options = v5::MqttOptions::new(mqtt.client_id.clone(), broker, mqtt.port);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_tcp_nodelay(true);
            let max_packet = u32::try_from(mqtt.max_packet_size).unwrap_or(u32::MAX);
            options
                .set_transport(transport)
                .set_keep_alive(mqtt.keep_alive)
                .set_clean_start(mqtt.session == MqttSession::Clean)
                .set_session_expiry_interval(session_expiry(mqtt.session))
                .set_max_packet_size(Some(max_packet))
                .set_outgoing_inflight_upper_limit(mqtt.inflight.saturating_add(1))
                .set_request_channel_capacity(cap)
                .set_network_options(network);
            if let Some(w) = will {
                options.set_last_will(will5(w, mqtt.will_delay));
            }
            if let Some(user) = &mqtt.username {
                options.set_credentials(user.clone(), password);
            }
            Options::V5(Box::new(options))
        }
    })
}

/// Builds the client and its event loop for the configured protocol (see [`options`]).
pub(super) fn connect(
    mqtt: &Mqtt,
    will: Option<&super::Will>,
) -> Result<(Client, Session), LinkError> {
    let cap = usize::from(mqtt.inflight) + 16;
    Ok(match options(mqtt, will)? {
        Options::V3(options) => {
            let (client, mut eventloop) = rumqttc::AsyncClient::new(*options, cap);
            // rumqttc leaves Nagle on: a small publish (a command result, a PUBACK) then waits
            // for the peer's delayed ACK, about 40 ms per hop on Linux.
            eventloop.network_options.set_tcp_nodelay(true);
            (Client::V3(client), Session::V3(Box::new(eventloop)))
        }
        Options::V5(options) => {
            let (client, eventloop) = v5::AsyncClient::new(*options, cap);
            (Client::V5(client), Session::V5(Box::new(eventloop)))
        }
    })
}

/// MQTT 5 Session Expiry Interval (§3.1.2.11.2): none (0) for a clean session.
fn session_expiry(s: MqttSession) -> Option<u32> {
    match s {
        MqttSession::Clean => None,
        MqttSession::Persistent { expiry } => {
            Some(u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX))
        }
    }
}

/// The MQTT 5 will of `w`, with a Will Delay Interval (§3.1.3.2.2) unless `delay` is zero.
fn will5(w: &super::Will, delay: Duration) -> v5::mqttbytes::v5::LastWill {
    let secs = u32::try_from(delay.as_secs()).unwrap_or(u32::MAX);
    v5::mqttbytes::v5::LastWill::new(
        w.topic.clone(),
        w.payload.clone(),
        qos5(w.qos),
        w.retain,
        (secs > 0).then(|| will_properties(secs)),
    )
}

fn will_properties(delay_s: u32) -> v5::mqttbytes::v5::LastWillProperties {
    v5::mqttbytes::v5::LastWillProperties {
        delay_interval: Some(delay_s),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    }
}

fn qos3(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos5(q: Qos) -> v5::mqttbytes::QoS {
    match q {
        Qos::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
        Qos::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
        Qos::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Client {
    /// Hands a publish over at `qos` without waiting; fails when rumqttc's request channel is
    /// full.
    /// `payload` is what goes on the wire for `m` (see `Announcer::render`).
    pub(super) fn try_publish(
        &self,
        m: &OutMessage,
        payload: Vec<u8>,
        qos: Qos,
    ) -> Result<(), String> {
        match self {
            // 3.1.1 has no properties: correlation data cannot be carried (and is never set,
            // since no 3.1.1 command carries any).
            Client::V3(c) => c
                .try_publish(&m.topic, qos3(qos), m.retain, payload)
                .map_err(|e| e.to_string()),
            // No properties and empty ones are the same bytes on the wire (length 0).
            Client::V5(c) => c
                .try_publish_with_properties(
                    &m.topic,
                    qos5(qos),
                    m.retain,
                    payload,
                    PublishProperties {
                        correlation_data: m.correlation.clone().map(Into::into),
                        ..PublishProperties::default()
                    },
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Subscribes to `filters` at QoS 1 in one SUBSCRIBE.
    pub(super) fn try_subscribe(&self, filters: &[String]) -> Result<(), String> {
        match self {
            Client::V3(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(|f| {
                    v5::mqttbytes::v5::Filter::new(f.clone(), v5::mqttbytes::QoS::AtLeastOnce)
                }))
                .map_err(|e| e.to_string()),
        }
    }

    pub(super) fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V3(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl Session {
    /// The broker (and everything else) of the next connection rumqttc makes.
    pub(super) fn set_options(&mut self, options: Options) {
        match (self, options) {
            (Session::V3(eventloop), Options::V3(o)) => eventloop.mqtt_options = *o,
            (Session::V5(eventloop), Options::V5(o)) => eventloop.options = *o,
            // The protocol is the configuration's, the same for every server.
            _ => {}
        }
    }

    /// The last will of the next connection rumqttc makes.
    pub(super) fn set_will(&mut self, w: &super::Will) {
        match self {
            Session::V3(eventloop) => {
                eventloop.mqtt_options.set_last_will(rumqttc::LastWill::new(
                    w.topic.clone(),
                    w.payload.clone(),
                    qos3(w.qos),
                    w.retain,
                ));
            }
            Session::V5(eventloop) => {
                // The delay is the configuration's, kept from the connection's first options.
                let delay = eventloop
                    .options
                    .last_will()
                    .and_then(|l| l.properties)
                    .and_then(|p| p.delay_interval);
                let mut will = will5(w, Duration::ZERO);
                if let Some(d) = delay {
                    will.properties = Some(will_properties(d));
                }
                eventloop.options.set_last_will(will);
            }
        }
    }

    /// The next event; an error ends the session (rumqttc reconnects on the next poll).
    pub(super) async fn poll(&mut self) -> Result<Polled, Ended> {
        match self {
            Session::V3(eventloop) => poll_v3(eventloop).await,
            Session::V5(eventloop) => poll_v5(eventloop).await,
        }
    }

    /// After an error, or to end a session the link refuses: drops the connection and
    /// whatever rumqttc still holds for the session, so that it holds nothing the link will
    /// re-send, and its packet-id collision state: rumqttc keeps a collision across sessions,
    /// which would disable its request branch for good; the link re-sends that message anyway.
    /// rumqttc's `pending` list (what it would replay if a CONNACK said `session_present`) is
    /// emptied too: our sessions are clean, and the link alone re-sends.
    pub(super) fn reset(&mut self) {
        match self {
            Session::V3(e) => {
                e.clean();
                e.pending.clear();
                e.state.collision = None;
                e.state.collision_ping_count = 0;
            }
            Session::V5(e) => {
                e.clean();
                e.pending.clear();
                // A fresh state for the next session, but for the events still to be read:
                // rumqttc keeps the broker's Receive Maximum (a 0 would silence every later
                // session, whose CONNACK may not repeat it) and the topic aliases across
                // sessions.
                let events = std::mem::take(&mut e.state.events);
                let limit = e
                    .options
                    .get_outgoing_inflight_upper_limit()
                    .unwrap_or(u16::MAX);
                e.state = v5::MqttState::new(limit, e.options.manual_acks());
                e.state.events = events;
            }
        }
    }

    /// After a CONNACK. MQTT 5: a Server Keep Alive of 0 (the server turns keep-alive off,
    /// §3.2.2.3.14) becomes rumqttc's ping interval as is: a PINGREQ on every turn of its
    /// loop until "last ping not acknowledged" ends the session, and in its next CONNECT.
    /// We keep our own interval then (a server answers PINGREQ in any case); returns whether
    /// that happened.
    pub(super) fn keep_own_keep_alive(&mut self, configured: Duration) -> bool {
        match self {
            Session::V3(_) => false,
            Session::V5(e) => {
                let zero = e.options.keep_alive().is_zero();
                if zero {
                    // Our configured interval is at least 5 s (the config says so), as
                    // `set_keep_alive` asserts.
                    e.options
                        .set_keep_alive(configured.max(Duration::from_secs(5)));
                }
                zero
            }
        }
    }

    /// Events rumqttc queued in a session that ended: their packet ids mean nothing in the
    /// next one. Received publishes among them are still valid commands and are returned,
    /// with the number of SUBACKs among them (read in the same batch as the packet that
    /// ended the session, before it).
    pub(super) fn take_stale(&mut self) -> (Vec<InMessage>, usize) {
        let mut received = Vec::new();
        let mut subacks = 0;
        match self {
            Session::V3(e) => {
                for event in e.state.events.drain(..) {
                    match event {
                        Event::Incoming(Incoming::Publish(p)) => received.push(received_v3(&p)),
                        Event::Incoming(Incoming::SubAck(_)) => subacks += 1,
                        _ => {}
                    }
                }
            }
            Session::V5(e) => {
                for event in e.state.events.drain(..) {
                    match event {
                        // An aliased one is a protocol error already reported: never handed on.
                        v5::Event::Incoming(Packet::Publish(p)) => {
                            received.extend(received_v5(&p).ok());
                        }
                        v5::Event::Incoming(Packet::SubAck(_)) => subacks += 1,
                        _ => {}
                    }
                }
            }
        }
        (received, subacks)
    }
}

async fn poll_v3(eventloop: &mut rumqttc::EventLoop) -> Result<Polled, Ended> {
    let event = eventloop.poll().await.map_err(|e| ended_v3(&e))?;
    Ok(match event {
        Event::Incoming(Incoming::ConnAck(ack)) => Polled::ConnAck {
            session_present: ack.session_present,
            receive_max: None,
            max_packet: None,
            max_qos: None,
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => Polled::Written(pkid),
        Event::Incoming(Incoming::PubAck(ack)) => Polled::Acked {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Incoming::PubComp(comp)) => Polled::Acked {
            pkid: comp.pkid,
            refused: None,
        },
        Event::Incoming(Incoming::Publish(p)) => Polled::Received(received_v3(&p)),
        Event::Incoming(Incoming::SubAck(ack)) => suback(
            ack.return_codes
                .iter()
                .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .map(|c| format!("{c:?}")),
        ),
        Event::Outgoing(Outgoing::Disconnect) => Polled::Disconnected,
        _ => Polled::Other,
    })
}

async fn poll_v5(eventloop: &mut v5::EventLoop) -> Result<Polled, Ended> {
    let event = eventloop.poll().await.map_err(|e| ended_v5(&e))?;
    Ok(match event {
        v5::Event::Incoming(Packet::ConnAck(ack)) => Polled::ConnAck {
            session_present: ack.session_present,
            receive_max: ack.properties.as_ref().and_then(|p| p.receive_max),
            max_packet: ack.properties.as_ref().and_then(|p| p.max_packet_size),
            max_qos: ack.properties.as_ref().and_then(|p| p.max_qos),
        },
        v5::Event::Outgoing(Outgoing::Publish(pkid)) => Polled::Written(pkid),
        v5::Event::Incoming(Packet::PubAck(ack)) => Polled::Acked {
            pkid: ack.pkid,
            refused: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                other => Some(format!("{other:?}")),
            },
        },
        // A refused QoS 2 publish ends at its PUBREC: no PUBCOMP follows (§4.3.3).
        v5::Event::Incoming(Packet::PubRec(rec))
            if !matches!(
                rec.reason,
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers
            ) =>
        {
            Polled::RefusedAtPubRec {
                pkid: rec.pkid,
                reason: format!("{:?}", rec.reason),
            }
        }
        v5::Event::Incoming(Packet::PubComp(comp)) => Polled::Acked {
            pkid: comp.pkid,
            refused: None,
        },
        v5::Event::Incoming(Packet::Publish(p)) => Polled::Received(received_v5(&p)?),
        v5::Event::Incoming(Packet::SubAck(ack)) => suback(
            ack.return_codes
                .iter()
                .filter(|c| !matches!(c, v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                .map(|c| format!("{c:?}")),
        ),
        v5::Event::Outgoing(Outgoing::Disconnect) => Polled::Disconnected,
        _ => Polled::Other,
    })
}

/// A SUBACK, given the codes of the filters it refused.
/// A SUBACK, given its refused codes; the first few are kept for the log (a SUBACK may
/// carry as many codes as fit in the packet).
fn suback(refused: impl Iterator<Item = String>) -> Polled {
    let mut count = 0;
    let mut codes = Vec::new();
    for code in refused {
        count += 1;
        if codes.len() < 8 {
            codes.push(code);
        }
    }
    Polled::SubAck {
        refused: count,
        codes,
    }
}

/// Why a 3.1.1 session ended.
fn ended_v3(e: &rumqttc::ConnectionError) -> Ended {
    use rumqttc::{ConnectionError as C, StateError as S};
    let cause = match e {
        C::MqttState(S::Deserialization(rumqttc::Error::PayloadSizeLimitExceeded(_))) => {
            Cause::TooLarge
        }
        // rumqttc wraps a read that failed (a reset, an end of stream) as a deserialization
        // error: the cause is the I/O, not the broker's bytes.
        C::MqttState(S::Deserialization(rumqttc::Error::Io(io))) => io_cause(io),
        C::MqttState(
            S::Unsolicited(_) | S::WrongPacket | S::InvalidState | S::Deserialization(_),
        )
        | C::NotConnAck(_) => Cause::Protocol,
        C::MqttState(S::ConnectionAborted) => Cause::Closed,
        C::MqttState(S::Io(io)) | C::Io(io) => io_cause(io),
        _ => Cause::Network,
    };
    Ended {
        error: e.to_string(),
        cause,
    }
}

/// Why an MQTT 5 session ended.
fn ended_v5(e: &v5::ConnectionError) -> Ended {
    use v5::mqttbytes::v5::DisconnectReasonCode as D;
    use v5::{ConnectionError as C, StateError as S};
    let cause = match e {
        C::MqttState(S::IncomingPacketTooLarge { .. })
        | C::MqttState(S::Deserialization(v5::mqttbytes::Error::PayloadSizeLimitExceeded {
            ..
        })) => Cause::TooLarge,
        C::MqttState(S::ServerDisconnect {
            reason_code: D::SessionTakenOver,
            ..
        }) => Cause::TakenOver,
        C::MqttState(S::ServerDisconnect { .. } | S::ConnectionAborted) => Cause::Closed,
        C::MqttState(S::Deserialization(v5::mqttbytes::Error::Io(io))) => io_cause(io),
        C::MqttState(
            S::Unsolicited(_) | S::WrongPacket | S::InvalidState | S::Deserialization(_),
        )
        | C::NotConnAck(_) => Cause::Protocol,
        C::MqttState(S::Io(io)) | C::Io(io) => io_cause(io),
        _ => Cause::Network,
    };
    Ended {
        error: e.to_string(),
        cause,
    }
}

fn io_cause(e: &std::io::Error) -> Cause {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
            Cause::Closed
        }
        _ => Cause::Network,
    }
}

fn received_v3(p: &rumqttc::Publish) -> InMessage {
    InMessage {
        topic: p.topic.to_string(),
        payload: p.payload.to_vec(),
        retain: p.retain,
        response_topic: None,
        correlation: None,
        correlation_refused: false,
        expires_at: None,
    }
}

/// A received MQTT 5 publish. One with a Topic Alias is a protocol error: we advertise no
/// Topic Alias Maximum (0, §3.1.2.11.8), so the broker must send none (§3.3.2.3.4), and
/// rumqttc would keep every alias it is sent. Correlation data over [`MAX_CORRELATION`]
/// bytes is not kept, and neither is the response topic then (no response without it).
fn received_v5(p: &v5::mqttbytes::v5::Publish) -> Result<InMessage, Ended> {
    let props = p.properties.as_ref();
    if let Some(alias) = props.and_then(|p| p.topic_alias) {
        return Err(Ended::protocol(format!(
            "the broker sent a PUBLISH with topic alias {alias}, though we allow none (MQTT 5 §3.3.2.3.4)"
        )));
    }
    let correlation = props.and_then(|p| p.correlation_data.as_ref());
    let oversized = correlation.is_some_and(|d| d.len() > MAX_CORRELATION);
    Ok(InMessage {
        topic: String::from_utf8_lossy(&p.topic).into_owned(),
        payload: p.payload.to_vec(),
        retain: p.retain,
        response_topic: props
            .and_then(|p| p.response_topic.clone())
            .filter(|_| !oversized),
        correlation: correlation.filter(|_| !oversized).map(|d| d.to_vec()),
        correlation_refused: oversized,
        // What is left of the sender's expiry when the broker forwarded it.
        expires_at: props
            .and_then(|p| p.message_expiry_interval)
            .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mqtt_of(keys: &str) -> Mqtt {
        let yaml = format!(
            "gateway: {{ id: gw }}\nmqtt:\n  url: mqtt://127.0.0.1:1883\n{keys}buses:\n  - {{ name: b, type: tcp, host: 127.0.0.1, port: 502 }}\ndevices:\n  - name: d\n    bus: b\n    points:\n      - {{ name: p, address: 0 }}\n"
        );
        crate::config::parse(&yaml, "t.yaml").expect("config").mqtt
    }

    fn will() -> super::super::Will {
        super::super::Will {
            topic: "t/status".into(),
            payload: b"offline".to_vec(),
            qos: Qos::AtLeastOnce,
            retain: true,
        }
    }

    #[test]
    fn a_persistent_session_reaches_the_connect_options_of_both_protocols() {
        let Options::V3(o) = options(&mqtt_of(""), Some(&will())).unwrap() else {
            panic!("3.1.1")
        };
        assert!(o.clean_session());
        let Options::V3(o) = options(&mqtt_of("  session: persistent\n"), None).unwrap() else {
            panic!("3.1.1")
        };
        assert!(!o.clean_session());

        let Options::V5(o) = options(&mqtt_of("  protocol: 5\n"), Some(&will())).unwrap() else {
            panic!("5")
        };
        assert!(o.clean_start());
        assert_eq!(o.session_expiry_interval(), None);
        assert_eq!(
            o.last_will().unwrap().properties,
            None,
            "no delay: no will properties"
        );
        let keys =
            "  protocol: 5\n  session: persistent\n  session_expiry: 10m\n  will_delay: 30s\n";
        let Options::V5(o) = options(&mqtt_of(keys), Some(&will())).unwrap() else {
            panic!("5")
        };
        assert!(!o.clean_start());
        assert_eq!(o.session_expiry_interval(), Some(600));
        let delay = o
            .last_will()
            .unwrap()
            .properties
            .and_then(|p| p.delay_interval);
        assert_eq!(delay, Some(30));
    }

    /// The fuzz pass of the received side: any bytes from the broker, read by rumqttc's
    /// decoder as our event loop reads them, then turned into a command. Nothing may panic (a
    /// panic aborts the gateway), and what becomes a command is bounded by the packet limit.
    /// `scripts/fuzz` runs it for longer (`FIELDBRIDGE_FUZZ_CASES`, `FIELDBRIDGE_FUZZ_SEED`).
    fn fuzz_config() -> proptest::test_runner::Config {
        let cases = std::env::var("FIELDBRIDGE_FUZZ_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256);
        let rng_seed = match std::env::var("FIELDBRIDGE_FUZZ_SEED").ok().as_deref() {
            Some("random") => proptest::test_runner::RngSeed::Random,
            _ => proptest::test_runner::RngSeed::Fixed(0x5eed_f1e1d),
        };
        proptest::test_runner::Config {
            cases,
            rng_seed,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        }
    }

    /// A valid PUBLISH (3.1.1 or 5, with properties) with some of its bytes changed.
    fn publish_bytes() -> impl Strategy<Value = (bool, Vec<u8>)> {
        (
            any::<bool>(),
            "[a-z/+#$]{0,40}",
            prop::collection::vec(any::<u8>(), 0..64),
            any::<Option<u16>>(),
            any::<Option<u32>>(),
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        )
            .prop_map(|(v5, topic, payload, alias, expiry, correlation, edits)| {
                let mut buf = bytes::BytesMut::new();
                if v5 {
                    let props = PublishProperties {
                        topic_alias: alias,
                        message_expiry_interval: expiry,
                        correlation_data: Some(correlation.into()),
                        response_topic: Some("r/x".into()),
                        ..PublishProperties::default()
                    };
                    let mut p = v5::mqttbytes::v5::Publish::new(
                        topic,
                        v5::mqttbytes::QoS::AtLeastOnce,
                        payload,
                        Some(props),
                    );
                    p.pkid = 1;
                    let _ = p.write(&mut buf);
                } else {
                    let mut p = rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload);
                    p.pkid = 1;
                    let _ = p.write(&mut buf);
                }
                let mut bytes = buf.to_vec();
                for (at, b) in edits {
                    if !bytes.is_empty() {
                        let i = at.index(bytes.len());
                        bytes[i] = b;
                    }
                }
                (v5, bytes)
            })
    }

    fn read_all(v5: bool, bytes: &[u8]) {
        const MAX: usize = 1024;
        let mut buf = bytes::BytesMut::from(bytes);
        for _ in 0..16 {
            if v5 {
                match v5::mqttbytes::v5::Packet::read(&mut buf, Some(MAX as u32)) {
                    Ok(v5::mqttbytes::v5::Packet::Publish(p)) => {
                        if let Ok(m) = received_v5(&p) {
                            assert!(m.topic.len() + m.payload.len() <= MAX);
                            assert!(m
                                .correlation
                                .as_ref()
                                .is_none_or(|c| c.len() <= MAX_CORRELATION));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            } else {
                match rumqttc::Packet::read(&mut buf, MAX) {
                    Ok(rumqttc::Packet::Publish(p)) => {
                        let m = received_v3(&p);
                        assert!(m.topic.len() + m.payload.len() <= MAX);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    }

    proptest! {
        #![proptest_config(fuzz_config())]

        #[test]
        fn fuzz_received_bytes_never_panic(v5 in any::<bool>(), bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            read_all(v5, &bytes);
        }

        #[test]
        fn fuzz_received_publishes_never_panic((v5, bytes) in publish_bytes()) {
            read_all(v5, &bytes);
        }
    }

    #[test]
    fn a_suback_refusing_many_filters_keeps_a_few_codes_for_the_log() {
        let Polled::SubAck { refused, codes } = suback((0..100_000).map(|i| format!("{i}"))) else {
            panic!("not a SubAck");
        };
        assert_eq!(refused, 100_000);
        assert_eq!(codes.len(), 8);
    }

    #[test]
    fn an_aliased_publish_is_a_protocol_error_and_big_correlation_data_is_not_kept() {
        use v5::mqttbytes::v5::Publish;
        let props = |alias: Option<u16>, correlation: usize| PublishProperties {
            topic_alias: alias,
            response_topic: Some("r".into()),
            correlation_data: Some(vec![1u8; correlation].into()),
            ..PublishProperties::default()
        };
        let publish = |p| Publish::new("t/a/b/set", v5::mqttbytes::QoS::AtLeastOnce, "1", Some(p));
        let e = received_v5(&publish(props(Some(1), 1))).unwrap_err();
        assert_eq!(e.cause, Cause::Protocol);
        let m = received_v5(&publish(props(None, MAX_CORRELATION))).unwrap();
        assert_eq!(m.correlation.map(|c| c.len()), Some(MAX_CORRELATION));
        let m = received_v5(&publish(props(None, MAX_CORRELATION + 1))).unwrap();
        assert!(m.correlation.is_none() && m.response_topic.is_none() && m.correlation_refused);
    }

    /// A reset or end of stream while rumqttc reads a packet reaches us wrapped as a
    /// deserialization error: it is the broker (or the network) closing, not a protocol
    /// error, so it must not be logged as one or counted in `protocol_errors`.
    #[test]
    fn a_reset_while_reading_a_packet_is_a_close_not_a_protocol_error() {
        use std::io::{Error as IoError, ErrorKind};
        for kind in [ErrorKind::ConnectionReset, ErrorKind::UnexpectedEof] {
            let e3 = rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                rumqttc::Error::Io(IoError::from(kind)),
            ));
            assert_eq!(ended_v3(&e3).cause, Cause::Closed, "{e3}");
            let e5 = v5::ConnectionError::MqttState(v5::StateError::Deserialization(
                v5::mqttbytes::Error::Io(IoError::from(kind)),
            ));
            assert_eq!(ended_v5(&e5).cause, Cause::Closed, "{e5}");
        }
        // A malformed packet still is one.
        let bad = rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::Error::MalformedPacket,
        ));
        assert_eq!(ended_v3(&bad).cause, Cause::Protocol);
    }
}
