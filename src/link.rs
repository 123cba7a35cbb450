//! The MQTT link: delivers every message to the broker and knows which ones were delivered.
//!
//! # Design
//! Two tasks. The *event-loop task* owns rumqttc's `EventLoop` and does nothing but poll it,
//! forward the events that matter over an unbounded channel (so it never awaits a full one) and
//! sleep a capped back-off between reconnect attempts. The *manager task* owns the messages.
//!
//! A message is delivered when the broker acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2;
//! QoS 0 when written), never when `publish()` returned: that only means queued. The manager
//! keeps every message in one of three places, each ordered by a sequence number:
//! - `queue`: not yet handed to rumqttc;
//! - `handed`: handed to rumqttc's request channel, packet id not known yet;
//! - `inflight`: written with a packet id, waiting for its acknowledgement.
//!
//! rumqttc reports `Outgoing::Publish(pkid)` in the order publishes are written, which is the
//! order they were handed, so the front of `handed` gets that packet id; `Incoming::PubAck(pkid)`
//! then completes it. The window `handed + inflight` is capped at `inflight`, below rumqttc's
//! own limit, so rumqttc never holds a request back behind its flow control.
//!
//! # Reconnects
//! The session is clean: on a new session rumqttc throws away its own pending list (and on a
//! connection error it has already drained its request channel into that list). So after a
//! disconnect the manager moves `handed` and `inflight` back to the front of `queue`, in order,
//! and re-sends them after the next CONNACK. To make "what rumqttc holds" exact, handing over
//! happens under a small gate shared with the event-loop task: the event-loop task closes the
//! gate (and drains the request channel with `clean()`) before it reports a disconnect, and
//! opens it with a new generation on CONNACK; the manager hands over only while the gate is
//! open in the generation whose CONNACK it has processed. A message can therefore never be
//! both re-queued by us and still held by rumqttc. QoS 1 allows duplicates: a message whose
//! PUBACK was lost with the connection is sent again.
//!
//! # Bounds
//! At most `queue_capacity` messages, and `queue_max_bytes` bytes of the messages that entered
//! through the inbound channel, are held. When full, the policy is `drop_oldest`: the oldest
//! message not yet handed over is dropped, counted, and logged once per episode. A message that
//! could never be sent (see [`unsendable`]) is dropped before rumqttc sees it.
//!
//! # Faulty brokers
//! Nothing the broker sends may loop, stall or mislead the link, and no reading is dropped on a
//! guess (a session dying with a message in flight proves nothing about it: it is re-sent).
//! A protocol error ends the session like a network error, with its cause logged and counted
//! (`LinkStats::protocol_errors`): rumqttc's own (an ack for nothing in flight, a packet type
//! a server never sends), the CONNACK checks of `connack_problem` (session present on our
//! clean session, Receive Maximum 0), a PUBLISH with a topic alias (`proto`), or an ack the
//! manager cannot match (asked for through `Gate::reset`). Sessions the broker closes right
//! after CONNACK, again and again, are reported as a client-id conflict. A retained message
//! too large for us on a command topic is handled by `subscribe`. MQTT 5 limits of the
//! broker (Maximum Packet Size, Maximum QoS) are respected, since breaking them would end
//! every session.
//!
//! # Shutdown
//! When the inbound channel closes (the publisher is done), the manager keeps delivering until
//! everything is acknowledged or the flush deadline passes, publishes `offline` (retained) on
//! the status topic, disconnects and reports what was left undelivered.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::model::{Durability, Mqtt, MqttTransport, Qos};
use crate::store::{
    NewMessage, StoreEvent, StoreHandle, StoreRequest, StoredMessage, TrySendError,
};

mod proto;
mod quickack;
mod subscribe;
use proto::{Client, Polled, Session};
use quickack::QuickAck;

/// A message for the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct OutMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
    /// When the reading behind it was taken (latency is measured from here to the ack).
    pub created: Instant,
    /// MQTT 5 correlation data: the message answers a request that carried it. Such a
    /// message is kept in memory only (the store keeps no properties).
    pub correlation: Option<Vec<u8>>,
    /// How the publisher encoded the payload, in the publisher's own numbering: opaque to the
    /// link, which keeps it with the message (in the store too) and hands it back to
    /// [`Announcer::render`] when the message is sent. [`AS_IS`]: the bytes are sent as they
    /// are, and the announcer is not asked.
    pub kind: u8,
}

/// [`OutMessage::kind`] of a payload that is sent as it is, held back or not.
pub const AS_IS: u8 = 0;

/// What [`Announcer::render`] makes of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Rendered {
    /// The payload as it is.
    AsIs,
    /// These bytes instead.
    Bytes(Vec<u8>),
    /// Not to be sent at all (superseded: a birth of an earlier session); taken as done.
    Drop,
}

/// A last will: what the broker publishes for us when our connection dies without a
/// DISCONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub retain: bool,
}

/// What the publisher stage says on the link's behalf around each session, and how it marks
/// a message that was held back. The link builds no payload of its own: it asks for these and
/// hands them over as data.
pub trait Announcer: Send + Sync {
    /// The last will set on the connection.
    fn will(&self) -> Option<Will>;
    /// The messages sent first in every new session, before anything queued (the `online`
    /// status). Not kept across a restart, and not re-sent in a later session: the next
    /// CONNACK asks again.
    fn births(&self) -> Vec<OutMessage>;
    /// The messages sent before a clean disconnect (which fires no will).
    fn goodbye(&self) -> Vec<OutMessage>;
    /// What to send for a message of `kind` (never [`AS_IS`]) created at `created`, given
    /// whether it was held back (queued while the broker was unreachable or the link backed
    /// up). Asked once per session for each message (a message rumqttc could not take yet is
    /// sent later as rendered).
    fn render(&self, kind: u8, held: bool, created: Instant, payload: &[u8]) -> Rendered;

    /// Whether the births of the last session all went out (`false`: some were still queued
    /// or unacknowledged when it ended, or a rebirth replaced them): the announcer may want to
    /// say again what they carried.
    fn births_done(&self, _all_sent: bool) {}
    /// A subscribed topic whose messages open and close the way out for the births and
    /// everything after them (Sparkplug's primary host STATE): while it is closed, the link
    /// sends nothing and holds new messages back (the store takes them), as in an outage.
    /// `None`: always open.
    fn gate_topic(&self) -> Option<&str> {
        None
    }
    /// Whether a message on the gate topic opens (`Some(true)`) or closes the gate; `None`:
    /// ignore it (malformed, or older than the last one).
    fn gate(&self, _payload: &[u8]) -> Option<bool> {
        None
    }
}

impl OutMessage {
    /// Whether the message may go to the store: a response to an MQTT 5 request may not
    /// (without its correlation data it answers nobody).
    fn storable(&self) -> bool {
        self.correlation.is_none()
    }
}

/// A message received from the broker (command topics).
#[derive(Debug, Clone)]
pub struct InMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The broker sent it as a retained message (a stored old one, not a live publish).
    pub retain: bool,
    /// MQTT 5: where the sender wants the answer, and the data to echo with it.
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
    /// MQTT 5: the sender's correlation data was over 256 bytes, so it and the response
    /// topic were dropped (no response copy; the result still goes to `{topic}/result`).
    pub correlation_refused: bool,
    /// MQTT 5 message expiry: not to be acted on after this.
    pub expires_at: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Counters of the link, readable from any task.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connected: AtomicU64,
    pub connects: AtomicU64,
    pub queued: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub resent: AtomicU64,
    /// Sessions reset because the broker broke the protocol (see `proto`).
    pub protocol_errors: AtomicU64,
    /// Received commands dropped because the command queue was full.
    pub commands_dropped: AtomicU64,
    /// MQTT 5 requests whose correlation data was too large to keep (no response copy).
    pub correlation_refused: AtomicU64,
    /// Sessions that ended as another client with our client id took the session over
    /// (MQTT 5 reason 0x8E, or the broker closing it right after CONNACK, again and again).
    pub client_id_conflicts: AtomicU64,
    /// Command filters no longer subscribed to (a retained message too large for us).
    pub filters_dropped: AtomicU64,
    /// Messages held (queued, handed, in flight), refreshed every turn of the manager's loop.
    pub backlog: AtomicU64,
    /// Of them, written to the broker and waiting for their acknowledgement.
    pub in_flight: AtomicU64,
    /// `dropped` by reason: no room in the bounded queue (or the store not taking them)...
    pub dropped_queue_full: AtomicU64,
    /// ...that could never be sent (larger than the packet limit, a topic MQTT refuses)...
    pub dropped_unsendable: AtomicU64,
    /// ...refused by the broker (an MQTT 5 error reason code).
    pub dropped_refused: AtomicU64,
    /// Creation (the read, or the command's result) to PUBACK, of every delivered message.
    pub delivery_time: crate::observe::DeliveryTime,
    /// Beaten every turn of the manager's loop, which wakes at least every `health::TICK`.
    pub heartbeat: crate::health::Heartbeat,
}

/// What the link reports when it stops.
#[derive(Debug, Clone)]
pub struct LinkReport {
    pub delivered: u64,
    pub dropped: u64,
    pub undelivered: u64,
    pub latency: LatencyHistogram,
}

/// Handle to the running link.
pub struct Link {
    pub sender: mpsc::Sender<OutMessage>,
    pub stats: Arc<LinkStats>,
    pub done: tokio::task::JoinHandle<LinkReport>,
    /// The command filters to subscribe to (a reload sends new ones; those added are
    /// subscribed at once in the current session).
    pub subscriptions: tokio::sync::watch::Sender<Vec<String>>,
}

/// Settings derived from the config that the manager needs.
#[derive(Clone)]
pub struct LinkSettings {
    /// The publisher stage's will, births, goodbye and marks (`None`: none of them).
    pub announcer: Option<Arc<dyn Announcer>>,
    /// Notified when the births are wanted again in the current session (Sparkplug rebirth):
    /// they go out ahead of everything queued.
    pub rebirths: Option<Arc<tokio::sync::Notify>>,
    /// For logs (a client-id conflict names it).
    pub client_id: String,
    pub queue_capacity: usize,
    /// Bytes (topic + payload) of the messages held in memory outside the store, at most.
    pub queue_max_bytes: usize,
    pub window: usize,
    pub flush_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Filters to subscribe to after every CONNACK (command topics).
    pub subscriptions: Vec<String>,
    /// When messages go to the store (if there is one).
    pub durability: Durability,
    /// Messages held in memory above which new ones go to the store.
    pub spill_threshold: usize,
    /// Largest packet the broker takes from us; larger messages are refused at the door.
    pub max_packet_size: usize,
}

impl LinkSettings {
    pub fn from_config(mqtt: &Mqtt) -> Self {
        LinkSettings {
            announcer: None,
            rebirths: None,
            client_id: mqtt.client_id.clone(),
            queue_capacity: mqtt.queue_capacity.max(1),
            queue_max_bytes: mqtt.queue_max_bytes.max(1),
            window: usize::from(mqtt.inflight.max(1)),
            flush_timeout: Duration::from_secs(5),
            reconnect_min: mqtt.reconnect_min,
            reconnect_max: mqtt.reconnect_max,
            subscriptions: Vec::new(),
            durability: Durability::Auto,
            spill_threshold: usize::MAX,
            max_packet_size: mqtt.max_packet_size,
        }
    }

    /// Adds the store's settings.
    pub fn with_store(mut self, store: &crate::model::Store) -> Self {
        self.durability = store.durability;
        self.spill_threshold = store.spill_threshold;
        self
    }
}

/// The rumqttc transport and broker address (host, or URL for WebSockets) of the config.
fn transport(mqtt: &Mqtt) -> Result<(rumqttc::Transport, String), LinkError> {
    Ok(match mqtt.transport {
        MqttTransport::Tcp => (rumqttc::Transport::Tcp, mqtt.host.clone()),
        MqttTransport::Tls => (
            rumqttc::Transport::tls_with_config(tls_config(mqtt)?),
            mqtt.host.clone(),
        ),
        MqttTransport::Ws => (
            rumqttc::Transport::Ws,
            format!("ws://{}:{}{}", mqtt.host, mqtt.port, mqtt.ws_path),
        ),
        MqttTransport::Wss => (
            rumqttc::Transport::wss_with_config(tls_config(mqtt)?),
            format!("wss://{}:{}{}", mqtt.host, mqtt.port, mqtt.ws_path),
        ),
    })
}

/// rustls client configuration with the ring provider (no aws-lc, no OpenSSL).
fn tls_config(mqtt: &Mqtt) -> Result<rumqttc::TlsConfiguration, LinkError> {
    let files = mqtt
        .tls
        .as_ref()
        .ok_or_else(|| LinkError::Tls("TLS transport without a `tls` section".into()))?;
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| LinkError::Tls(format!("{}: {e}", path.display())))
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read(&files.ca)?;
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        let cert = cert.map_err(|e| LinkError::Tls(format!("{}: {e}", files.ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| LinkError::Tls(format!("{}: {e}", files.ca.display())))?;
    }
    if roots.is_empty() {
        return Err(LinkError::Tls(format!(
            "{}: no certificate found",
            files.ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut read(cert)?.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| LinkError::Tls(format!("{}: {e}", cert.display())))?;
            let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
                .map_err(|e| LinkError::Tls(format!("{}: {e}", key.display())))?
                .ok_or_else(|| {
                    LinkError::Tls(format!("{}: no private key found", key.display()))
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| LinkError::Tls(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

/// Shared between the two tasks: whether rumqttc may be handed requests, and in which session.
#[derive(Debug, Default)]
struct Gate {
    open: bool,
    generation: u64,
    /// Set by the manager to end the session of that generation, with the reason (a protocol
    /// error only it can see, e.g. an acknowledgement for nothing in flight).
    reset: Option<(u64, String, proto::Cause)>,
}

enum LinkEvent {
    Connected {
        generation: u64,
        receive_max: Option<u16>,
        /// MQTT 5: the largest packet the broker takes.
        max_packet: Option<u32>,
        /// The highest QoS the broker takes (MQTT 5 Maximum QoS; 2 when it says nothing).
        max_qos: Qos,
        quick: QuickAck,
    },
    /// Every SUBACK of a probing session came: publishes may go (see `subscribe`).
    Ready,
    /// A command filter is no longer subscribed to (see `subscribe`).
    FilterDropped,
    Disconnected {
        error: String,
        cause: proto::Cause,
    },
    Written {
        pkid: u16,
    },
    Acked {
        pkid: u16,
        refused: Option<String>,
    },
    SubscribeRefused {
        refused: usize,
        codes: Vec<String>,
    },
    Incoming(InMessage),
    Stopped,
}

/// The store the link spills to, with its event channel.
pub struct Outbox {
    pub store: StoreHandle,
    pub events: mpsc::Receiver<StoreEvent>,
}

/// Starts the link. `commands` receives publishes on subscribed topics; `outbox` is the
/// SQLite store (or `None`: memory queue only).
pub fn spawn(
    mqtt: &Mqtt,
    settings: LinkSettings,
    outbox: Option<Outbox>,
    commands: Option<mpsc::Sender<InMessage>>,
    inbound_capacity: usize,
) -> Result<Link, LinkError> {
    let will = settings.announcer.as_ref().and_then(|a| a.will());
    let (client, eventloop) = proto::connect(mqtt, will.as_ref())?;
    let gate = Arc::new(Mutex::new(Gate::default()));
    let (filters_tx, filters_rx) = tokio::sync::watch::channel(settings.subscriptions.clone());
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let reset = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(drive_eventloop(
        eventloop,
        Driver {
            broker: (mqtt.host.clone(), mqtt.port),
            gate: gate.clone(),
            events: events_tx,
            stop: stop.clone(),
            reset: reset.clone(),
            reconnect_min: settings.reconnect_min,
            reconnect_max: settings.reconnect_max,
            client: client.clone(),
            subscriptions: subscribe::Subscriptions::new(settings.subscriptions.clone()),
            filters: filters_rx,
            max_packet_size: settings.max_packet_size,
            keep_alive: mqtt.keep_alive,
            announcer: settings.announcer.clone(),
            mqtt: mqtt.clone(),
            server: 0,
        },
    ));
    let (sender, inbound) = mpsc::channel(inbound_capacity.max(1));
    let stats = Arc::new(LinkStats::default());
    let (store, store_events) = match outbox {
        Some(o) => (Some(o.store), Some(o.events)),
        None => (None, None),
    };
    let always = store.is_some() && settings.durability == Durability::Always;
    // Until a CONNACK says otherwise (MQTT 5 Receive Maximum).
    let window = settings.window;
    let manager = Manager {
        client,
        gate,
        settings,
        stats: stats.clone(),
        queue: VecDeque::new(),
        handed: VecDeque::new(),
        inflight: BTreeMap::new(),
        generation: None,
        next_seq: 1,
        dropping: 0,
        held_bytes: 0,
        latency: LatencyHistogram::default(),
        commands,
        window,
        refused: 0,
        quick: QuickAck::default(),
        store,
        spill: always,
        always,
        store_failed_at: None,
        cursor: i64::MIN,
        read_pending: None,
        read_retry_at: None,
        read_failures: 0,
        unread_in_store: false,
        to_store_dropped: 0,
        read_limit: 0,
        appends_since_read: 0,
        last_read_short: false,
        to_store: VecDeque::new(),
        to_delete: Vec::new(),
        suspect: None,
        reset,
        connected_at: None,
        broker_max_packet: None,
        max_qos: Qos::ExactlyOnce,
        short_closes: 0,
        last_lost: String::new(),
        refused_locally: 0,
        protocol_errors: 0,
        attempted: false,
        deletes_sent: Instant::now(),
        gate_open: false,
    };
    let done = tokio::spawn(manager.run(inbound, events_rx, store_events, stop));
    Ok(Link {
        sender,
        stats,
        done,
        subscriptions: filters_tx,
    })
}

/// What the event-loop task needs besides the event loop.
struct Driver {
    broker: (String, u16),
    gate: Arc<Mutex<Gate>>,
    events: mpsc::UnboundedSender<LinkEvent>,
    stop: CancellationToken,
    /// Woken by the manager to end the session (see [`Gate::reset`]).
    reset: Arc<tokio::sync::Notify>,
    reconnect_min: Duration,
    reconnect_max: Duration,
    /// For SUBSCRIBE requests (the manager hands publishes).
    client: Client,
    subscriptions: subscribe::Subscriptions,
    /// New filters from a reload.
    filters: tokio::sync::watch::Receiver<Vec<String>>,
    max_packet_size: usize,
    keep_alive: Duration,
    announcer: Option<Arc<dyn Announcer>>,
    /// The configuration (for the options of the next server) and which of `mqtt.servers`
    /// the current or next connection goes to.
    mqtt: Mqtt,
    server: usize,
}

/// What a CONNACK may not say to us, and why (each is a protocol error that ends the session).
fn connack_problem(clean: bool, session_present: bool, receive_max: Option<u16>) -> Option<String> {
    // With `mqtt.session: persistent` a present session is what we asked for: it holds our
    // subscriptions and the commands queued while we were away. rumqttc's own replay of the
    // old session's publishes is emptied at every session end (`Session::reset`), so only
    // the link re-sends, as after a clean one.
    if session_present && clean {
        // rumqttc would replay the old session's publishes under their old packet ids while
        // the link re-sends them: acknowledgements would complete the wrong messages.
        return Some(
            "the broker said a session was present although we asked for a clean one \
             (MQTT 3.1.1 §3.2.2.2, MQTT 5 §3.2.2.1.1): a faulty broker, or someone on the path \
             of an unencrypted connection"
                .into(),
        );
    }
    if receive_max == Some(0) {
        return Some(
            "the broker sent Receive Maximum 0, which MQTT 5 forbids (§3.2.2.3.3): nothing \
             could be published in this session"
                .into(),
        );
    }
    None
}

/// Polls the event loop forever; forwards what the manager needs.
async fn drive_eventloop(mut session: Session, mut d: Driver) {
    let clean = d.mqtt.session == crate::model::MqttSession::Clean;
    let mut backoff = d.reconnect_min;
    let mut generation = 0u64;
    let mut connected = false;
    // A probing session holds publishes back until its last SUBACK, but not for ever (a
    // broker that never answers a SUBSCRIBE must not silence the link).
    let mut hold_until: Option<tokio::time::Instant> = None;
    loop {
        let polled = tokio::select! {
            biased;
            _ = d.stop.cancelled() => break,
            _ = tokio::time::sleep_until(hold_until.unwrap_or_else(tokio::time::Instant::now)), if hold_until.is_some() => {
                hold_until = None;
                tracing::warn!("command subscriptions not all acknowledged within 10 s: publishing anyway");
                let mut g = d.gate.lock().expect("gate poisoned");
                if !g.open && g.generation == generation && connected {
                    g.open = true;
                    drop(g);
                    if d.events.send(LinkEvent::Ready).is_err() {
                        break;
                    }
                }
                continue;
            }
            Ok(()) = d.filters.changed() => {
                let filters = d.filters.borrow_and_update().clone();
                for packet in d.subscriptions.replace(filters) {
                    if connected && d.client.try_subscribe(&packet).is_err() {
                        tracing::error!(filters = packet.len(), "could not subscribe to the reload's new command topics in this session");
                    }
                }
                continue;
            }
            _ = d.reset.notified() => {
                let request = d.gate.lock().expect("gate poisoned").reset.take();
                match request {
                    Some((g, why, cause)) if connected && g == generation => {
                        Err(proto::Ended { error: why, cause })
                    }
                    _ => continue,
                }
            }
            polled = session.poll() => polled,
        };
        let polled = match polled {
            Ok(Polled::RefusedAtPubRec { pkid, reason }) => {
                let refused = LinkEvent::Acked {
                    pkid,
                    refused: Some(reason),
                };
                if d.events.send(refused).is_err() {
                    break;
                }
                Err(proto::Ended {
                    error: "session reset after a QoS 2 publish refused at PUBREC (rumqttc would keep its in-flight slot)".to_string(),
                    cause: proto::Cause::Network,
                })
            }
            Ok(Polled::ConnAck {
                session_present,
                receive_max,
                ..
            }) if connack_problem(clean, session_present, receive_max).is_some() => {
                Err(proto::Ended::protocol(
                    connack_problem(clean, session_present, receive_max).expect("some"),
                ))
            }
            other => other,
        };
        let event = match polled {
            Ok(Polled::ConnAck {
                receive_max,
                max_packet,
                max_qos,
                ..
            }) => {
                backoff = d.reconnect_min;
                generation += 1;
                connected = true;
                if session.keep_own_keep_alive(d.keep_alive) {
                    tracing::warn!(
                        keep_alive_s = d.keep_alive.as_secs(),
                        "the broker sent Server Keep Alive 0: keeping our own keep-alive interval"
                    );
                }
                // Events rumqttc queued in the dead session (an `Outgoing::Publish` whose flush
                // failed) would be matched against this session's messages.
                forward_stale(&mut session, &d.events);
                // Subscriptions first, while the request channel is empty (the gate is shut).
                let start = d.subscriptions.on_connack();
                for packet in &start.packets {
                    if d.client.try_subscribe(packet).is_err() {
                        tracing::error!(
                            filters = packet.len(),
                            "could not subscribe to command topics in this session"
                        );
                    }
                }
                hold_until = start
                    .hold
                    .then(|| tokio::time::Instant::now() + Duration::from_secs(10));
                let mut g = d.gate.lock().expect("gate poisoned");
                g.open = !start.hold;
                g.generation = generation;
                LinkEvent::Connected {
                    generation,
                    receive_max,
                    max_packet,
                    max_qos: match max_qos {
                        Some(0) => Qos::AtMostOnce,
                        Some(1) => Qos::AtLeastOnce,
                        _ => Qos::ExactlyOnce,
                    },
                    quick: QuickAck::find(&d.broker.0, d.broker.1),
                }
            }
            Ok(Polled::SubAck { refused, codes }) => {
                if let Some(next) = d.subscriptions.on_suback(Instant::now()) {
                    if d.client.try_subscribe(std::slice::from_ref(&next)).is_err() {
                        tracing::error!(filter = %next, "could not subscribe to a command topic in this session");
                    }
                }
                if d.subscriptions.ready() {
                    hold_until = None;
                    let mut g = d.gate.lock().expect("gate poisoned");
                    if !g.open && g.generation == generation {
                        g.open = true;
                        drop(g);
                        if d.events.send(LinkEvent::Ready).is_err() {
                            break;
                        }
                    }
                }
                if refused == 0 {
                    continue;
                }
                LinkEvent::SubscribeRefused { refused, codes }
            }
            Ok(Polled::Written(pkid)) => LinkEvent::Written { pkid },
            Ok(Polled::Acked { pkid, refused }) => LinkEvent::Acked { pkid, refused },
            // Turned into an error above.
            Ok(Polled::RefusedAtPubRec { .. }) => continue,
            Ok(Polled::Received(msg)) => LinkEvent::Incoming(msg),
            Ok(Polled::Disconnected) => {
                let _ = d.events.send(LinkEvent::Stopped);
                break;
            }
            Ok(Polled::Other) => continue,
            Err(ended) => {
                connected = false;
                hold_until = None;
                {
                    let mut g = d.gate.lock().expect("gate poisoned");
                    g.open = false;
                    // Anything handed over since rumqttc's own clean-up is drained now, under
                    // the gate, so that rumqttc holds nothing the manager will re-send.
                    session.reset();
                }
                // SUBACKs read in the batch that ended with the error came before it.
                let now = Instant::now();
                for _ in 0..forward_stale(&mut session, &d.events) {
                    d.subscriptions.on_suback(now);
                }
                let too_large = ended.cause == proto::Cause::TooLarge;
                if let Some(filter) = d.subscriptions.on_session_end(too_large, now) {
                    tracing::error!(
                        filter = %filter,
                        max_packet_size = d.max_packet_size,
                        "a retained message larger than mqtt.max_packet_size on a topic matching this command filter ended every session: no longer subscribing to it (until a restart); commands on it will not arrive. Clear the retained message (publish an empty retained message to its topic, e.g. `mosquitto_pub -r -n -t <topic>`) or raise mqtt.max_packet_size"
                    );
                    if d.events.send(LinkEvent::FilterDropped).is_err() {
                        break;
                    }
                } else if too_large && !d.subscriptions.is_empty() {
                    tracing::warn!(
                        "the broker sent a packet larger than mqtt.max_packet_size; the next sessions subscribe to command topics one at a time to find a retained one"
                    );
                }
                let event = LinkEvent::Disconnected {
                    error: ended.error,
                    cause: ended.cause,
                };
                if d.events.send(event).is_err() {
                    break;
                }
                tokio::select! {
                    _ = d.stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(d.reconnect_max);
                // The next connection attempt carries the announcer's will for it (Sparkplug's
                // NDEATH counts `bdSeq` up per attempt), and goes to the next broker of
                // `mqtt.servers` (a dead one is left within the back-off).
                let will = d.announcer.as_ref().and_then(|a| a.will());
                if d.mqtt.servers.len() > 1 {
                    d.server = (d.server + 1) % d.mqtt.servers.len();
                    let next = d.mqtt.with_server(&d.mqtt.servers[d.server]);
                    match proto::options(&next, will.as_ref()) {
                        Ok(o) => {
                            session.set_options(o);
                            d.broker = (next.host.clone(), next.port);
                            tracing::info!(broker = %format!("{}:{}", next.host, next.port), "trying the next MQTT server");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot use the next MQTT server");
                            if let Some(will) = &will {
                                session.set_will(will);
                            }
                        }
                    }
                } else if let Some(will) = will {
                    session.set_will(&will);
                }
                continue;
            }
        };
        if d.events.send(event).is_err() {
            break;
        }
    }
}

/// Drops the events rumqttc still buffers from a session that ended (they refer to packet
/// ids of that session), forwarding received publishes, which are still valid commands.
/// Returns how many SUBACKs were among them.
fn forward_stale(session: &mut Session, events: &mpsc::UnboundedSender<LinkEvent>) -> usize {
    let (received, subacks) = session.take_stale();
    for msg in received {
        let _ = events.send(LinkEvent::Incoming(msg));
    }
    subacks
}

struct Entry {
    seq: u64,
    msg: OutMessage,
    /// Row id when the message is (also) in the store; its row is deleted on PUBACK.
    store_id: Option<i64>,
    /// Not worth keeping across a restart, nor re-sending in a later session (the births).
    volatile: bool,
    /// Queued while the broker was unreachable or the link backed up (see
    /// [`Announcer::render`]); kept in the store with the row.
    held: bool,
    /// What `render` gave in session (generation) `.0`, when rumqttc could not take it yet.
    rendered: Option<(u64, Vec<u8>)>,
    /// Bytes counted in `Manager::held_bytes` for it (messages that entered through
    /// `enqueue`; rows read back from the store are bounded by the read size instead).
    bytes: usize,
}

struct Manager {
    client: Client,
    gate: Arc<Mutex<Gate>>,
    settings: LinkSettings,
    stats: Arc<LinkStats>,
    queue: VecDeque<Entry>,
    handed: VecDeque<Entry>,
    inflight: BTreeMap<u16, Entry>,
    /// Generation of the CONNACK processed last; `None` while disconnected.
    generation: Option<u64>,
    next_seq: u64,
    /// Messages dropped in the current full-queue episode.
    dropping: u64,
    /// Bytes of the entries that count against `settings.queue_max_bytes`.
    held_bytes: usize,
    latency: LatencyHistogram,
    commands: Option<mpsc::Sender<InMessage>>,
    /// Messages on the wire at once in this session: `settings.window`, or less when the
    /// broker's MQTT 5 Receive Maximum is lower.
    window: usize,
    /// Publishes the broker refused with an MQTT 5 reason code (they are not retried).
    refused: u64,
    /// The broker connection's socket, for prompt ACKs (see `quickack`).
    quick: QuickAck,
    // --- the outbox (see the module docs) ---
    store: Option<StoreHandle>,
    /// New messages go to the store (and come back through reads) instead of `queue`.
    spill: bool,
    /// `durability: always`: spilling never ends.
    always: bool,
    /// The store could not be read, or could not take requests: new messages stay in memory
    /// (bounded by `queue_capacity`) until [`STORE_RETRY`] has passed.
    store_failed_at: Option<Instant>,
    /// Largest row id read back so far.
    cursor: i64,
    read_pending: Option<oneshot::Receiver<Result<Vec<StoredMessage>, String>>>,
    /// After a failed read, no new one before this.
    read_retry_at: Option<Instant>,
    /// Reads that failed in a row (their back-off doubles, up to [`STORE_RETRY`]).
    read_failures: u32,
    /// Rows after `cursor` wait in the store although spilling ended (a read failed): they are
    /// read, and delivered behind what memory holds, once reading works again.
    unread_in_store: bool,
    /// Messages dropped from `to_store` while the store thread could not take them (episode).
    to_store_dropped: u64,
    read_limit: usize,
    /// Messages sent to the store since the pending read was asked for.
    appends_since_read: u64,
    /// The last read returned fewer rows than asked: the store had nothing more then.
    last_read_short: bool,
    to_store: VecDeque<NewMessage>,
    to_delete: Vec<i64>,
    /// The oldest written-but-unacknowledged message when the last connections died, and how
    /// many in a row. Only logged: that a session died with a message in flight proves
    /// nothing about the message (a flapping link, two gateways sharing a client id), so it is
    /// never dropped on that guess.
    suspect: Option<(u64, u32)>,
    /// Asks the event-loop task to end the session (with `Gate::reset`).
    reset: Arc<tokio::sync::Notify>,
    /// When the current session's CONNACK came.
    connected_at: Option<Instant>,
    /// MQTT 5: the largest packet the broker takes in this session.
    broker_max_packet: Option<usize>,
    /// The highest QoS the broker takes in this session: higher ones are sent at it (a QoS 2
    /// publish to a broker without QoS 2, such as AWS IoT, is a protocol error that would end
    /// every session).
    max_qos: Qos,
    /// Sessions in a row the broker closed soon after their CONNACK.
    short_closes: u32,
    /// The error that ended the last session.
    last_lost: String,
    /// Messages refused before they were handed to rumqttc (topic or size).
    refused_locally: u64,
    /// Protocol errors of the broker, for rate-limited logs.
    protocol_errors: u64,
    /// A first connection attempt has ended (in success or failure).
    attempted: bool,
    /// When acknowledged rows were last sent for deletion (they are batched).
    deletes_sent: Instant,
    /// The announcer's gate (`Announcer::gate_topic`) is open in this session: births and
    /// messages may go out. Always true without a gate topic, once connected.
    gate_open: bool,
}

/// Sessions in a row that die with the same message as the oldest unacknowledged one before
/// that is logged (the message is kept: see `Manager::suspect`).
const POISON_SESSIONS: u32 = 5;

/// How long the link waits at shutdown for the store thread to take what memory holds
/// (`STORE_PARK_TIMEOUT`), then to commit and stop: with the flush timeout (5 s) within the
/// unit's `TimeoutStopSec=20s`.
const STORE_PARK_TIMEOUT: Duration = Duration::from_secs(3);
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(8);

/// A session the broker closes sooner than this after its CONNACK is "closed right away".
const SHORT_SESSION: Duration = Duration::from_secs(10);

/// Sessions in a row closed right away by the broker before we call it a client-id conflict.
const SHORT_CLOSES: u32 = 3;

/// For rate-limited logs: true for the 1st, 2nd, 4th, 8th... occurrence.
fn worth_logging(n: u64) -> bool {
    n.is_power_of_two()
}

/// How long a failed store is left alone before new messages are tried on it again.
const STORE_RETRY: Duration = Duration::from_secs(30);

impl Manager {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<OutMessage>,
        mut events: mpsc::UnboundedReceiver<LinkEvent>,
        mut store_events: Option<mpsc::Receiver<StoreEvent>>,
        stop: CancellationToken,
    ) -> LinkReport {
        let mut inbound_open = true;
        let mut flush_deadline: Option<Instant> = None;
        let mut down_since: Option<Instant> = Some(Instant::now());
        let mut last_error = String::new();
        if self.backlog_in_store() > 0 {
            // Left over from before a restart: it goes out first.
            self.spill = true;
            tracing::info!(
                backlog = self.backlog_in_store(),
                "store holds messages from before: delivering them first"
            );
        }
        loop {
            if !inbound_open {
                let deadline = *flush_deadline
                    .get_or_insert_with(|| Instant::now() + self.settings.flush_timeout);
                // With a store, nothing waits for a broker that is not there.
                let parked = self.generation.is_none() && self.store_usable();
                if self.pending() == 0 || parked || Instant::now() >= deadline {
                    break;
                }
            }
            self.stats.heartbeat.beat();
            self.stats.backlog.store(
                (self.pending() as u64) + self.backlog_in_store(),
                Ordering::Relaxed,
            );
            self.stats
                .in_flight
                .store(self.inflight.len() as u64, Ordering::Relaxed);
            let sleep_until = flush_deadline
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                .min(Instant::now() + crate::health::TICK);
            let reading = self.read_pending.is_some();
            let rebirths = self.settings.rebirths.clone();
            tokio::select! {
                biased;
                () = async { rebirths.as_ref().expect("guarded").notified().await }, if rebirths.is_some() => {
                    self.rebirth();
                }
                event = events.recv() => match event {
                    Some(event) => self.on_event(event, &mut down_since, &mut last_error),
                    None => break,
                },
                rows = async { self.read_pending.as_mut().expect("guarded").await }, if reading => {
                    self.read_pending = None;
                    match rows {
                        Ok(Ok(rows)) => self.on_rows(rows),
                        Ok(Err(e)) => self.on_read_failed(&e),
                        Err(_) => self.on_store_gone(),
                    }
                }
                event = async { store_events.as_mut().expect("guarded").recv().await },
                    if store_events.is_some() =>
                {
                    match event {
                        Some(StoreEvent::WriteFailed { error }) => self.on_store_failed(&error),
                        None => store_events = None,
                    }
                }
                msg = inbound.recv(), if inbound_open => match msg {
                    Some(msg) => {
                        self.enqueue(msg);
                        // Take whatever else is already waiting, without yielding.
                        while let Ok(msg) = inbound.try_recv() {
                            self.enqueue(msg);
                        }
                    }
                    None => inbound_open = false,
                },
                _ = tokio::time::sleep_until(sleep_until.into()) => {}
            }
            self.pump();
            self.sync_store();
        }
        let undelivered = self.park();
        self.goodbye(&mut events).await;
        stop.cancel();
        if let Some(store) = self.store.take() {
            // Joining the store thread blocks, on a thread of its own: a store stuck in I/O
            // must not keep the gateway from exiting (what it did not commit is lost then).
            let (done_tx, done_rx) = oneshot::channel();
            std::thread::spawn(move || {
                store.close();
                let _ = done_tx.send(());
            });
            if tokio::time::timeout(STORE_CLOSE_TIMEOUT, done_rx)
                .await
                .is_err()
            {
                tracing::error!(
                    timeout_s = STORE_CLOSE_TIMEOUT.as_secs(),
                    "store thread did not stop in time (stuck in I/O?): exiting without it; its last uncommitted writes are lost"
                );
            }
        }
        LinkReport {
            delivered: self.stats.delivered.load(Ordering::Relaxed),
            dropped: self.stats.dropped.load(Ordering::Relaxed),
            undelivered,
            latency: self.latency.clone(),
        }
    }

    fn backlog_in_store(&self) -> u64 {
        self.store
            .as_ref()
            .map_or(0, |s| s.stats.backlog.load(Ordering::Relaxed))
    }

    fn store_usable(&self) -> bool {
        self.store.is_some()
            && self
                .store_failed_at
                .is_none_or(|t| t.elapsed() >= STORE_RETRY)
    }

    /// At shutdown: writes what is held in memory to the store, in delivery order, and
    /// commits. Returns how many messages could not be kept (no store).
    fn park(&mut self) -> u64 {
        let mut held: Vec<Entry> = self.handed.drain(..).collect();
        held.extend(std::mem::take(&mut self.inflight).into_values());
        held.extend(self.queue.drain(..));
        held.sort_by_key(|e| e.seq);
        // Responses to MQTT 5 requests are not kept: the store has no room for their
        // correlation data, and without it a response answers nobody.
        held.retain(|e| !e.volatile && e.msg.storable());
        // A store whose reads failed may still write (and keeps in memory what it cannot).
        if self.store.is_none() {
            let lost = held.iter().filter(|e| e.store_id.is_none()).count() as u64
                + self.to_store.len() as u64;
            if lost > 0 {
                tracing::warn!(
                    undelivered = lost,
                    "MQTT link stopping with messages not delivered and no store to keep them"
                );
            }
            return lost;
        }
        let store = self.store.as_ref().expect("checked above");
        // Messages older than every stored row (before the first one that has a row) go in
        // front of the store; the rest after it.
        let first_stored = held.iter().position(|e| e.store_id.is_some());
        let (mut front, mut back) = (Vec::new(), Vec::new());
        for (i, e) in held.into_iter().enumerate() {
            if e.store_id.is_some() {
                continue;
            }
            let m = new_message(&e.msg, e.held);
            match first_stored {
                Some(first) if i < first => front.push(m),
                Some(_) => back.push(m),
                None if self.spill => front.push(m),
                None => back.push(m),
            }
        }
        back.extend(self.to_store.drain(..));
        let kept = front.len() + back.len();
        // Waits (bounded) for room: the event loop is done, and these must not be lost.
        if !self.to_delete.is_empty() {
            let deletes = std::mem::take(&mut self.to_delete);
            store.send_within(StoreRequest::Delete(deletes), STORE_PARK_TIMEOUT);
        }
        let sent = store.send_within(StoreRequest::Prepend(front), STORE_PARK_TIMEOUT)
            && store.send_within(StoreRequest::Append(back), STORE_PARK_TIMEOUT);
        if !sent {
            tracing::error!(
                undelivered = kept,
                "store thread not taking requests (stuck in I/O?): messages held in memory are lost"
            );
            return kept as u64;
        }
        if kept > 0 {
            tracing::info!(kept, "messages not yet delivered written to the store");
        }
        0
    }

    /// Publishes the announcer's goodbye (the retained `offline` status: a clean disconnect
    /// sends no last will) and disconnects, waiting briefly for both.
    async fn goodbye(&mut self, events: &mut mpsc::UnboundedReceiver<LinkEvent>) {
        if self.generation.is_none() {
            return;
        }
        let goodbye = self.settings.announcer.as_ref().map(|a| a.goodbye());
        let goodbye = goodbye.unwrap_or_default();
        let mut waiting = 0usize;
        for m in &goodbye {
            let qos = m.qos.min(self.max_qos);
            if self.client.try_publish(m, m.payload.clone(), qos).is_err() {
                return;
            }
            waiting += 1;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        // Each is written, then (at QoS 1) acknowledged; QoS 0 ones are done when written.
        let mut written = Vec::new();
        while waiting > 0 {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(LinkEvent::Written { pkid: 0 })) => waiting -= 1,
                Ok(Some(LinkEvent::Written { pkid })) => written.push(pkid),
                Ok(Some(LinkEvent::Acked { pkid, .. })) if written.contains(&pkid) => {
                    written.retain(|&p| p != pkid);
                    waiting -= 1;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(event) = events.recv().await {
                if matches!(event, LinkEvent::Stopped | LinkEvent::Disconnected { .. }) {
                    break;
                }
            }
        })
        .await;
    }

    /// Messages held in memory (queued, handed, in flight).
    fn pending(&self) -> usize {
        self.queue.len() + self.handed.len() + self.inflight.len()
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn enqueue(&mut self, msg: OutMessage) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if let Some(why) = unsendable(&msg, self.settings.max_packet_size) {
            self.refuse_locally(&msg, &why);
            return;
        }
        // Held back: the broker is known to be unreachable (not merely not connected yet at start,
        // which would write every start's first readings to the SD card), or backed up.
        let held_back = (self.generation.is_none() && self.attempted)
            || (self.generation.is_some() && !self.gate_open)
            || self.pending() >= self.settings.spill_threshold;
        if self.store_usable() && (self.spill || held_back) && msg.storable() {
            if !self.spill {
                self.start_spill();
            }
            self.push_to_store(new_message(&msg, held_back));
            return;
        }
        let bytes = msg.topic.len() + msg.payload.len();
        // The byte bound: the oldest messages not on the wire make room, as for the count.
        while self.held_bytes + bytes > self.settings.queue_max_bytes {
            let victim = self.queue.iter().position(|e| e.bytes > 0);
            let dropped = match victim.and_then(|i| self.queue.remove(i)) {
                Some(old) => {
                    self.held_bytes = self.held_bytes.saturating_sub(old.bytes);
                    false
                }
                None => true,
            };
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            if self.dropping == 0 {
                tracing::warn!(
                    max_bytes = self.settings.queue_max_bytes,
                    "MQTT queue full (mqtt.queue.max_bytes): dropping the oldest messages (policy drop_oldest)"
                );
            }
            self.dropping += 1;
            if dropped {
                return;
            }
        }
        if self.pending() >= self.settings.queue_capacity {
            // Only what is not on the wire can be dropped; the oldest goes first.
            let victim = self.queue.iter().position(|e| e.store_id.is_none());
            if let Some(i) = victim {
                if let Some(old) = self.queue.remove(i) {
                    self.held_bytes = self.held_bytes.saturating_sub(old.bytes);
                }
            }
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            if self.dropping == 0 {
                tracing::warn!(
                    capacity = self.settings.queue_capacity,
                    "MQTT queue full: dropping the oldest messages (policy drop_oldest)"
                );
            }
            self.dropping += 1;
            if victim.is_none() {
                return;
            }
        } else if self.dropping > 0 && self.pending() < self.settings.queue_capacity / 2 {
            tracing::warn!(dropped = self.dropping, "MQTT queue no longer full");
            self.dropping = 0;
        }
        let seq = self.next_seq();
        self.held_bytes += bytes;
        self.queue.push_back(Entry {
            seq,
            msg,
            store_id: None,
            volatile: false,
            held: held_back,
            rendered: None,
            bytes,
        });
    }

    /// From now on new messages go to the store. Messages queued after the last stored one
    /// go there first, so that the store's order is the delivery order.
    fn start_spill(&mut self) {
        self.spill = true;
        self.last_read_short = false;
        // Entries up to the last stored one are older than anything still unread in the
        // store and stay in front; everything after it moves to the store, in order.
        let keep = self
            .queue
            .iter()
            .rposition(|e| e.store_id.is_some())
            .map_or(0, |i| i + 1);
        let moved: Vec<Entry> = self.queue.drain(keep..).collect();
        for e in moved {
            if e.volatile || !e.msg.storable() {
                self.queue.push_back(e);
            } else {
                self.held_bytes = self.held_bytes.saturating_sub(e.bytes);
                self.to_store.push_back(new_message(&e.msg, e.held));
                self.appends_since_read += 1;
            }
        }
        tracing::debug!(to_store = self.to_store.len(), "spilling to the store");
    }

    /// Sends batched appends and deletes to the store, and asks for more rows when draining.
    /// Never waits: what the store thread cannot take now stays here and goes next turn.
    fn sync_store(&mut self) {
        let Some(store) = &self.store else { return };
        let mut gone = false;
        if !self.to_store.is_empty() && self.store_usable() {
            let batch = Vec::from(std::mem::take(&mut self.to_store));
            match store.try_send(StoreRequest::Append(batch)) {
                Ok(()) => {}
                Err(TrySendError::Full(StoreRequest::Append(back))) => self.to_store = back.into(),
                Err(TrySendError::Gone(StoreRequest::Append(back))) => {
                    self.to_store = back.into();
                    gone = true;
                }
                Err(_) => unreachable!("the request handed back is the one sent"),
            }
        }
        // Deletes are batched (a few per second, or when many are waiting, or when idle):
        // one request per acknowledgement would wake the store thread for every message.
        let idle = self.handed.is_empty() && self.inflight.is_empty();
        if !gone
            && !self.to_delete.is_empty()
            && (self.to_delete.len() >= 256
                || idle
                || self.deletes_sent.elapsed() >= Duration::from_millis(100))
        {
            match store.try_send(StoreRequest::Delete(std::mem::take(&mut self.to_delete))) {
                Ok(()) => self.deletes_sent = Instant::now(),
                Err(TrySendError::Full(StoreRequest::Delete(back))) => self.to_delete = back,
                Err(TrySendError::Gone(StoreRequest::Delete(back))) => {
                    self.to_delete = back;
                    gone = true;
                }
                Err(_) => unreachable!("the request handed back is the one sent"),
            }
        }
        let drained = self.last_read_short && self.appends_since_read == 0;
        let room = (self.window * 4).saturating_sub(self.queue.len());
        if !gone
            && (self.spill || self.unread_in_store)
            && self.read_pending.is_none()
            && self.read_retry_at.is_none_or(|t| Instant::now() >= t)
            && self.generation.is_some()
            && self.gate_open
            && !drained
            && room >= self.window
        {
            let (tx, rx) = oneshot::channel();
            match store.try_send(StoreRequest::Read {
                after: self.cursor,
                limit: room,
                reply: tx,
            }) {
                Ok(()) => {
                    self.read_pending = Some(rx);
                    self.read_limit = room;
                    self.appends_since_read = 0;
                }
                Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Gone(_)) => gone = true,
            }
        }
        if gone {
            self.on_store_gone();
        }
    }

    /// A message for the store; while the store thread cannot take them, at most
    /// `queue_capacity` wait here (policy drop_oldest, counted as dropped by the link).
    fn push_to_store(&mut self, m: NewMessage) {
        let capacity = self.settings.queue_capacity;
        if self.to_store_dropped > 0 && self.to_store.len() < capacity / 2 {
            tracing::warn!(
                dropped = self.to_store_dropped,
                "store taking messages again"
            );
            self.to_store_dropped = 0;
        }
        if push_bounded(&mut self.to_store, m, capacity) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            if self.to_store_dropped == 0 {
                tracing::warn!(
                    capacity,
                    "store is not taking messages: dropping the oldest waiting for it (policy drop_oldest)"
                );
            }
            self.to_store_dropped += 1;
        }
        self.appends_since_read += 1;
    }

    /// A read failed although the store repairs what it can (bad rows, damaged pages): an I/O
    /// error. New messages must not queue behind rows that cannot be read: they stay in
    /// memory and are delivered; the read is retried with a back-off, and what it returns is
    /// delivered behind them.
    fn on_read_failed(&mut self, error: &str) {
        self.read_failures = self.read_failures.saturating_add(1);
        let backoff =
            Duration::from_secs(1 << self.read_failures.min(5).saturating_sub(1)).min(STORE_RETRY);
        if self.read_failures == 1 {
            tracing::error!(
                error,
                "store read failed: new messages are delivered from memory meanwhile (bounded by mqtt.queue.capacity); retrying the read"
            );
        } else {
            tracing::debug!(
                error,
                failures = self.read_failures,
                "store read failed again"
            );
        }
        self.read_retry_at = Some(Instant::now() + backoff);
        self.store_failed_at = Some(Instant::now());
        self.unread_in_store = true;
        if self.spill {
            self.spill = false;
            // What was bound for the store is newer than everything in it: keep it in order.
            let now_ms = crate::store::now_ms();
            for m in std::mem::take(&mut self.to_store) {
                let entry = self.entry(m, None, now_ms);
                self.queue.push_back(entry);
            }
            self.trim_queue();
        }
    }

    /// The store thread ended (it panicked): from now on the link runs on memory alone.
    fn on_store_gone(&mut self) {
        if self.store.take().is_none() {
            return;
        }
        tracing::error!(
            "store thread gone: running WITHOUT store-and-forward (memory queue only) until restart"
        );
        self.spill = false;
        self.unread_in_store = false;
        self.read_pending = None;
        self.to_delete.clear();
        let now_ms = crate::store::now_ms();
        for m in std::mem::take(&mut self.to_store) {
            let entry = self.entry(m, None, now_ms);
            self.queue.push_back(entry);
        }
        self.trim_queue();
    }

    /// Drops the oldest messages not on the wire beyond `queue_capacity`.
    fn trim_queue(&mut self) {
        while self.pending() > self.settings.queue_capacity {
            let Some(i) = self.queue.iter().position(|e| e.store_id.is_none()) else {
                break;
            };
            self.queue.remove(i);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            self.dropping += 1;
        }
    }

    /// Rows read back from the store join the queue, in order.
    fn on_rows(&mut self, rows: Vec<StoredMessage>) {
        self.read_failures = 0;
        if self.always {
            // A failed read paused it (`on_read_failed`).
            self.spill = true;
        }
        self.last_read_short = rows.len() < self.read_limit;
        let now_ms = crate::store::now_ms();
        let mut too_large = 0u64;
        for row in rows {
            self.cursor = self.cursor.max(row.id);
            // Stored under another configuration (a larger mqtt.max_packet_size): it could
            // never be delivered now, and would stop every session that tried.
            let size = row.message.topic.len() + row.message.payload.len() + 9;
            if size > self.settings.max_packet_size {
                too_large += 1;
                self.to_delete.push(row.id);
                continue;
            }
            let entry = self.entry(row.message, Some(row.id), now_ms);
            self.queue.push_back(entry);
        }
        if too_large > 0 {
            self.stats
                .dropped_unsendable
                .fetch_add(too_large, Ordering::Relaxed);
            let n = self.stats.dropped.fetch_add(too_large, Ordering::Relaxed);
            tracing::error!(
                rows = too_large,
                max = self.settings.max_packet_size,
                dropped_total = n + too_large,
                "stored messages larger than mqtt.max_packet_size: dropped (they could never be delivered)"
            );
        }
        if self.last_read_short && self.appends_since_read == 0 {
            self.unread_in_store = false;
            if !self.always {
                // Everything stored is in memory now: new messages can go straight to the
                // queue, behind it.
                self.spill = false;
                tracing::debug!("store drained; back to direct delivery");
            }
        }
    }

    /// The store keeps what it could not write, in order, and retries by itself (see
    /// `store`'s "Faults"); it has logged the failure.
    fn on_store_failed(&mut self, error: &str) {
        tracing::debug!(
            error,
            "store write failed; the store keeps the messages in order"
        );
    }

    /// A queue entry for a message that was (or was meant to be) stored; its age is kept, so
    /// latency counts from the reading.
    fn entry(&mut self, m: NewMessage, store_id: Option<i64>, now_ms: i64) -> Entry {
        let age = Duration::from_millis(now_ms.saturating_sub(m.created).max(0) as u64);
        Entry {
            seq: self.next_seq(),
            msg: OutMessage {
                topic: m.topic,
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                created: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                correlation: None,
                kind: m.kind,
            },
            store_id,
            volatile: false,
            held: m.held,
            rendered: None,
            bytes: 0,
        }
    }

    /// The births again, ahead of everything queued (not of what rumqttc already has), when
    /// connected; otherwise the next CONNACK sends them anyway.
    fn rebirth(&mut self) {
        if self.generation.is_none() || !self.gate_open {
            return;
        }
        self.births_replaced();
        let births = self.settings.announcer.as_ref().map(|a| a.births());
        for msg in births.unwrap_or_default().into_iter().rev() {
            self.queue.push_front(Entry {
                seq: 0,
                msg,
                store_id: None,
                volatile: true,
                held: false,
                rendered: None,
                bytes: 0,
            });
        }
    }

    /// Drops the births still queued (a new set replaces them) and tells the announcer whether
    /// the last ones all went out.
    fn births_replaced(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|e| !e.volatile);
        if let Some(a) = &self.settings.announcer {
            a.births_done(self.queue.len() == before);
        }
    }

    fn on_event(
        &mut self,
        event: LinkEvent,
        down_since: &mut Option<Instant>,
        last_error: &mut String,
    ) {
        match event {
            LinkEvent::Connected {
                generation,
                receive_max,
                max_packet,
                max_qos,
                quick,
            } => {
                if max_qos < Qos::AtLeastOnce && self.max_qos >= Qos::AtLeastOnce {
                    tracing::warn!(
                        "the broker takes QoS 0 only (MQTT 5 Maximum QoS 0): messages are sent at QoS 0, without acknowledgement"
                    );
                }
                self.max_qos = max_qos;
                self.attempted = true;
                if quick.is_empty() {
                    tracing::debug!("broker socket not found: no prompt ACKs in this session");
                }
                self.quick = quick;
                // ACK the CONNACK now: the `online` status follows at once, and its PUBACK
                // would otherwise wait for the delayed ACK of the CONNACK at a Nagle-ing broker.
                self.quick.poke();
                // One below the broker's Receive Maximum: rumqttc then always has a free
                // packet id, as with 3.1.1 (where its limit is our window + 1), and never
                // holds a publish back on a packet-id collision.
                self.window = self
                    .settings
                    .window
                    .min(receive_max.map_or(usize::MAX, |r| usize::from(r).saturating_sub(1)))
                    .max(1);
                self.broker_max_packet = max_packet.map(|m| m as usize);
                self.generation = Some(generation);
                self.connected_at = Some(Instant::now());
                self.stats.connected.store(1, Ordering::Relaxed);
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                let down = down_since.take().map(|t| t.elapsed()).unwrap_or_default();
                tracing::info!(
                    backlog = self.pending() as u64 + self.backlog_in_store(),
                    down_ms = down.as_millis() as u64,
                    "MQTT connected"
                );
                last_error.clear();
                // The births (the retained `online` status) go first, tracked like any message
                // so that packet ids stay in step. The event-loop task subscribes. With a gate
                // (a primary host), they wait until its STATE opens it in this session.
                let gated = self
                    .settings
                    .announcer
                    .as_ref()
                    .and_then(|a| a.gate_topic());
                self.gate_open = gated.is_none();
                if gated.is_some() {
                    tracing::info!("waiting for the primary host's STATE online before the births");
                }
                self.rebirth();
            }
            LinkEvent::Ready => {}
            LinkEvent::FilterDropped => {
                self.stats.filters_dropped.fetch_add(1, Ordering::Relaxed);
            }
            LinkEvent::Disconnected { error, cause } => {
                self.attempted = true;
                let lived = self.connected_at.take().map(|t| t.elapsed());
                if cause == proto::Cause::Protocol {
                    self.protocol_errors += 1;
                    self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    if worth_logging(self.protocol_errors) {
                        tracing::error!(
                            error = %error,
                            protocol_errors = self.protocol_errors,
                            "MQTT protocol error by the broker: connection reset (nothing is taken as delivered without its acknowledgement)"
                        );
                    }
                }
                self.on_session_closed(cause, lived);
                if self.generation.take().is_some() {
                    // A session that flaps (a client-id conflict, a broker refusing something)
                    // would log this every few hundred milliseconds: the same error again after
                    // a short session is a debug line; the conflict has its own error.
                    let again = lived.is_some_and(|d| d < SHORT_SESSION) && self.last_lost == error;
                    if again {
                        tracing::debug!(error = %error, "MQTT connection lost again");
                    } else {
                        tracing::warn!(error = %error, "MQTT connection lost");
                    }
                    self.last_lost.clone_from(&error);
                    *down_since = Some(Instant::now());
                } else if *last_error != error {
                    tracing::warn!(error = %error, "MQTT connect failed");
                } else {
                    tracing::debug!(error = %error, "MQTT connect failed again");
                }
                *last_error = error;
                self.stats.connected.store(0, Ordering::Relaxed);
                self.quick = QuickAck::default();
                self.check_poison();
                // Whatever rumqttc held is gone with the session: re-send it, in order.
                let mut back: Vec<Entry> = self.handed.drain(..).collect();
                back.extend(std::mem::take(&mut self.inflight).into_values());
                back.sort_by_key(|e| e.seq);
                self.stats
                    .resent
                    .fetch_add(back.len() as u64, Ordering::Relaxed);
                for entry in back.into_iter().rev() {
                    self.queue.push_front(entry);
                }
                // Stale births are not re-sent; the next CONNACK queues fresh ones.
                self.births_replaced();
            }
            LinkEvent::Written { pkid } => match self.handed.pop_front() {
                Some(entry) if entry.msg.qos == Qos::AtMostOnce || pkid == 0 => {
                    self.delivered(entry)
                }
                Some(entry) => {
                    if let Some(old) = self.inflight.insert(pkid, entry) {
                        // Cannot happen while ids are matched correctly; never lose the message.
                        tracing::error!(pkid, "packet id reused while in flight; re-queueing");
                        self.queue.push_front(old);
                    }
                }
                None => tracing::error!(pkid, "publish written that was not handed over"),
            },
            LinkEvent::Acked { pkid, refused } => {
                match (self.inflight.remove(&pkid), refused) {
                    (Some(entry), None) => self.delivered(entry),
                    (Some(entry), Some(reason)) => self.on_refused(entry, &reason),
                    // Nothing of ours is in flight under that id: the acknowledgement cannot
                    // be matched to a message, and the ones that follow may not be either.
                    (None, _) => self.request_reset(format!(
                        "the broker acknowledged packet id {pkid}, which no publish of ours in flight has"
                    )),
                }
                // More acknowledgements are due and no publish of ours is about to carry our
                // ACK of this one: send it now, or a Nagle-ing broker holds the next PUBACK
                // back until our delayed ACK fires (up to 40 ms).
                if !self.inflight.is_empty() && self.handed.is_empty() && self.queue.is_empty() {
                    self.quick.poke();
                }
            }
            LinkEvent::SubscribeRefused { refused, codes } => tracing::error!(
                refused,
                first_codes = %codes.join(","),
                "the broker refused subscriptions to command topics: commands on them will not arrive (check the broker's ACL)"
            ),
            LinkEvent::Incoming(msg) => {
                if let Some(a) = &self.settings.announcer {
                    if a.gate_topic() == Some(msg.topic.as_str()) {
                        match a.gate(&msg.payload) {
                            Some(true) if !self.gate_open => {
                                tracing::info!(
                                    "primary host online: births, then what was held back"
                                );
                                self.gate_open = true;
                                self.rebirth();
                            }
                            Some(false) if self.gate_open => {
                                // Sparkplug 3.0: the node publishes its NDEATH and disconnects
                                // (ending the session without DISCONNECT fires the will, which
                                // is the NDEATH), then connects again and waits for the host.
                                tracing::warn!("primary host offline: NDEATH, connecting again (to the next server if several); data held back until the host is online");
                                self.gate_open = false;
                                self.end_session(
                                    "the primary host went offline".into(),
                                    proto::Cause::Network,
                                );
                            }
                            _ => {}
                        }
                        return;
                    }
                }
                if msg.correlation_refused {
                    let n = self
                        .stats
                        .correlation_refused
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    if worth_logging(n) {
                        tracing::warn!(
                            max_bytes = proto::MAX_CORRELATION,
                            refused_total = n,
                            "MQTT 5 request with oversized correlation data: no response copy (its result still goes to the result topic)"
                        );
                    }
                }
                if let Some(commands) = &self.commands {
                    if commands.try_send(msg).is_err() {
                        let n = self.stats.commands_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                        if worth_logging(n) {
                            tracing::warn!(
                                dropped_total = n,
                                "command queue full: command dropped"
                            );
                        }
                    }
                }
            }
            LinkEvent::Stopped => {}
        }
    }

    /// Asks the event-loop task to end the current session (a protocol error it cannot see).
    fn request_reset(&mut self, why: String) {
        self.end_session(why, proto::Cause::Protocol);
    }

    /// Ends the current session without a DISCONNECT (so the broker publishes the will); the
    /// event loop connects again after the back-off, to the next server if there are several.
    fn end_session(&mut self, why: String, cause: proto::Cause) {
        let Some(generation) = self.generation else {
            return;
        };
        let mut gate = self.gate.lock().expect("gate poisoned");
        if gate.reset.is_none() {
            gate.reset = Some((generation, why, cause));
            self.reset.notify_one();
        }
    }

    /// A session ended with `cause` after `lived` (`None`: it never got its CONNACK). Sessions
    /// the broker keeps closing right after CONNACK are what a second client with our client
    /// id causes: each connection takes the session over from the other (MQTT 3.1.1 §3.1.4,
    /// MQTT 5 §3.1.4 and reason 0x8E).
    fn on_session_closed(&mut self, cause: proto::Cause, lived: Option<Duration>) {
        let taken_over = cause == proto::Cause::TakenOver;
        let closed_early = matches!(cause, proto::Cause::Closed | proto::Cause::TakenOver)
            && lived.is_some_and(|d| d < SHORT_SESSION);
        if lived.is_none() {
            return;
        }
        self.short_closes = if closed_early {
            self.short_closes + 1
        } else {
            0
        };
        if taken_over || self.short_closes >= SHORT_CLOSES {
            let n = self
                .stats
                .client_id_conflicts
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if !worth_logging(n) {
                return;
            }
            if taken_over {
                tracing::error!(
                    client_id = %self.settings.client_id,
                    sessions = n,
                    "the broker says another connection took our session over (MQTT 5 reason 0x8E): another client uses our client id (a second gateway, e.g. from a cloned SD card?). Give each gateway its own mqtt.client_id; no reading is dropped meanwhile"
                );
            } else {
                tracing::error!(
                    client_id = %self.settings.client_id,
                    sessions = n,
                    in_a_row = self.short_closes,
                    "the broker keeps closing our sessions right after they start: most likely another client uses our client id (a second gateway, e.g. from a cloned SD card?). Give each gateway its own mqtt.client_id; no reading is dropped meanwhile"
                );
            }
        }
    }

    /// Called when a session died: logs when the oldest unacknowledged message was the oldest
    /// one in `POISON_SESSIONS` dead sessions in a row. The message is kept: that proves
    /// nothing about it (see `suspect`).
    fn check_poison(&mut self) {
        let Some(oldest) = self.inflight.values().map(|e| e.seq).min() else {
            return;
        };
        let count = match self.suspect {
            Some((seq, n)) if seq == oldest => n + 1,
            _ => 1,
        };
        self.suspect = Some((oldest, count));
        if count >= POISON_SESSIONS
            && worth_logging(u64::from(count / POISON_SESSIONS))
            && count % POISON_SESSIONS == 0
        {
            if let Some(entry) = self.inflight.values().find(|e| e.seq == oldest) {
                tracing::error!(
                    topic = %entry.msg.topic,
                    bytes = entry.msg.payload.len(),
                    sessions = count,
                    "every connection died with this message unacknowledged (is the broker refusing it? check its log); it is kept and re-sent"
                );
            }
        }
    }

    /// The broker answered a publish with an MQTT 5 error reason code (not authorised,
    /// topic name invalid, quota exceeded...): it will not take the message, so it is not
    /// retried. Counted as dropped; logged for the 1st, 2nd, 4th, 8th... refusal.
    fn on_refused(&mut self, entry: Entry, reason: &str) {
        self.finished(&entry);
        self.refused += 1;
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.stats.dropped_refused.fetch_add(1, Ordering::Relaxed);
        if self.refused.is_power_of_two() {
            tracing::error!(
                topic = %entry.msg.topic,
                reason,
                refused_total = self.refused,
                "the broker refused a message: dropped (check the broker's ACL and limits)"
            );
        }
    }

    fn delivered(&mut self, entry: Entry) {
        self.finished(&entry);
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        let took = entry.msg.created.elapsed();
        self.latency.record(took);
        self.stats.delivery_time.0.record(took);
    }

    /// The broker answered for `entry` (either way): it is no suspect, and its row goes.
    fn finished(&mut self, entry: &Entry) {
        self.held_bytes = self.held_bytes.saturating_sub(entry.bytes);
        if self.suspect.is_some_and(|(seq, _)| seq == entry.seq) {
            self.suspect = None;
        }
        if let Some(id) = entry.store_id {
            self.to_delete.push(id);
        }
    }

    /// A message that could never be delivered (see [`unsendable`]) is dropped before rumqttc
    /// sees it: counted, logged for the 1st, 2nd, 4th... one. Its row (if any) goes: this is
    /// proven here, not guessed.
    fn refuse_locally(&mut self, msg: &OutMessage, why: &str) {
        self.refused_locally += 1;
        self.stats
            .dropped_unsendable
            .fetch_add(1, Ordering::Relaxed);
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if worth_logging(self.refused_locally) {
            let shown: String = msg.topic.chars().take(128).collect();
            tracing::error!(
                topic = %shown,
                topic_bytes = msg.topic.len(),
                why,
                refused_total = self.refused_locally,
                dropped_total = n,
                "message that cannot be sent: dropped (it could never be delivered)"
            );
        }
    }

    /// Hands queued messages to rumqttc while connected and the window has room.
    fn pump(&mut self) {
        let Some(generation) = self.generation else {
            return;
        };
        if self.queue.is_empty() || !self.gate_open {
            return;
        }
        let gate = self.gate.clone();
        let gate = gate.lock().expect("gate poisoned");
        if !gate.open || gate.generation != generation {
            return;
        }
        while self.handed.len() + self.inflight.len() < self.window {
            let Some(entry) = self.queue.pop_front() else {
                break;
            };
            // MQTT 5: this broker's own limit, known since its CONNACK; rumqttc would end the
            // session on a larger packet, and again in every session.
            if let Some(max) = self.broker_max_packet {
                if publish_size(&entry.msg) > max {
                    let why = format!("larger than the broker's Maximum Packet Size ({max} bytes)");
                    self.refuse_locally(&entry.msg, &why);
                    self.finished(&entry);
                    continue;
                }
            }
            let mut entry = entry;
            let (payload, rendered) = match (entry.rendered.take(), &self.settings.announcer) {
                (Some((g, p)), _) if g == generation => (p.clone(), Some(p)),
                (_, Some(a)) if entry.msg.kind != AS_IS => {
                    let (kind, held, created) = (entry.msg.kind, entry.held, entry.msg.created);
                    match a.render(kind, held, created, &entry.msg.payload) {
                        Rendered::AsIs => (entry.msg.payload.clone(), None),
                        Rendered::Bytes(p) => (p.clone(), Some(p)),
                        Rendered::Drop => {
                            tracing::debug!(topic = %entry.msg.topic, "superseded by this session's births: not sent");
                            self.finished(&entry);
                            continue;
                        }
                    }
                }
                _ => (entry.msg.payload.clone(), None),
            };
            match self
                .client
                .try_publish(&entry.msg, payload, entry.msg.qos.min(self.max_qos))
            {
                Ok(()) => self.handed.push_back(entry),
                Err(e) => {
                    tracing::debug!(error = %e, "rumqttc request channel full; retrying later");
                    // Sent later as rendered now (a Sparkplug `seq` is given once).
                    entry.rendered = rendered.map(|p| (generation, p));
                    self.queue.push_front(entry);
                    break;
                }
            }
        }
    }
}

/// Bytes of the PUBLISH packet that carries `m`, at most: fixed header (up to 5), topic
/// length (2), packet id (2), MQTT 5 properties (correlation data: 1 + 2 + its bytes, and
/// the property length, up to 4), and room for the held-back mark.
fn publish_size(m: &OutMessage) -> usize {
    let props = m.correlation.as_ref().map_or(0, |c| 3 + c.len()) + 4;
    m.topic.len() + m.payload.len() + 9 + props + 16
}

/// Why `m` can never be published, if it cannot: its topic is not a valid topic name (empty,
/// over the 65535 bytes a UTF-8 string can carry, with a wildcard or a NUL: MQTT 3.1.1
/// §1.5.3, §3.3.2.1, §4.7.3), or its packet is over `max_packet` bytes. rumqttc checks none
/// of the topic rules: it writes a longer topic's length as `len as u16`, a malformed packet
/// that ends the session, and the link would send it again in every new one.
fn unsendable(m: &OutMessage, max_packet: usize) -> Option<String> {
    let t = &m.topic;
    if t.is_empty() {
        return Some("empty topic".into());
    }
    if t.len() > usize::from(u16::MAX) {
        return Some(format!("topic of {} bytes (at most 65535)", t.len()));
    }
    if t.contains(['+', '#']) {
        return Some("wildcard in the topic".into());
    }
    if t.contains('\0') {
        return Some("NUL character in the topic".into());
    }
    let size = publish_size(m);
    if size > max_packet {
        return Some(format!(
            "packet of {size} bytes, larger than mqtt.max_packet_size ({max_packet})"
        ));
    }
    None
}

fn new_message(m: &OutMessage, held: bool) -> NewMessage {
    let age = m.created.elapsed().as_millis() as i64;
    NewMessage {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: m.qos,
        retain: m.retain,
        created: crate::store::now_ms() - age,
        kind: m.kind,
        held,
    }
}

/// Latency histogram with 5 % wide buckets from 1 µs to about 5 minutes.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
}

const BUCKET_RATIO: f64 = 1.05;
const BUCKETS: usize = 400;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: vec![0; BUCKETS],
            count: 0,
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().max(1) as f64;
        let i = (us.ln() / BUCKET_RATIO.ln()) as usize;
        self.buckets[i.min(BUCKETS - 1)] += 1;
        self.count += 1;
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Upper bound of the bucket holding the `q` quantile (0..=1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let us = BUCKET_RATIO.powi(i as i32 + 1);
                return Some(Duration::from_micros(us as u64));
            }
        }
        None
    }
}

/// Appends `item`, dropping the oldest first when `queue` already holds `capacity`; whether
/// one was dropped.
fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, capacity: usize) -> bool {
    let full = queue.len() >= capacity.max(1);
    if full {
        queue.pop_front();
    }
    queue.push_back(item);
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_present_session_is_a_protocol_error_only_on_a_clean_one() {
        assert!(connack_problem(true, true, None).is_some());
        assert_eq!(connack_problem(false, true, None), None);
        assert_eq!(connack_problem(true, false, Some(10)), None);
        assert!(
            connack_problem(false, true, Some(0)).is_some(),
            "Receive Maximum 0 still is"
        );
    }

    #[test]
    fn messages_waiting_for_a_store_that_takes_none_stay_within_the_queue_capacity() {
        let mut q = VecDeque::new();
        let dropped = (0..1000).filter(|&i| push_bounded(&mut q, i, 100)).count();
        assert_eq!(dropped, 900);
        assert_eq!(q.len(), 100);
        assert_eq!(q.front(), Some(&900), "the oldest go first");
        assert_eq!(q.back(), Some(&999));
    }

    #[test]
    fn histogram_quantiles_are_within_five_percent() {
        let mut h = LatencyHistogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_micros() as f64;
        let p99 = h.quantile(0.99).unwrap().as_micros() as f64;
        assert!((50_000.0..=52_500.0).contains(&p50), "{p50}");
        assert!((99_000.0..=104_000.0).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }
}
