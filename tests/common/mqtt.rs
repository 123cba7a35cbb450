//! `MqttProbe`: a real MQTT client (rumqttc) that subscribes and records what it sees.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use super::certs::TestCerts;
use super::LOCALHOST;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One publish received by the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: QoS,
}

impl Msg {
    /// The payload as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON; panics with the payload if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {:?}",
                self.topic,
                self.text()
            )
        })
    }

    fn summary(&self) -> String {
        let mut text = self.text();
        if text.len() > 120 {
            let mut cut = 120;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        format!(
            "{} (qos {:?}, retain {}) {text}",
            self.topic, self.qos, self.retain
        )
    }
}

enum Status {
    SubAck(Result<(), String>),
    Error(String),
}

/// Who to connect as: plain TCP, or TLS with a CA and an optional client certificate.
#[derive(Clone)]
pub enum ProbeTls {
    Plain,
    Tls {
        ca_pem: Vec<u8>,
        client: Option<(Vec<u8>, Vec<u8>)>,
    },
}

/// A subscriber whose event loop runs in a spawned task (dropping the probe aborts it).
///
/// It subscribes (QoS 1) with a clean session and re-subscribes after every reconnect, so it
/// follows a broker through `Mosquitto::restart`. Messages published while it was
/// disconnected are not seen unless retained.
pub struct MqttProbe {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    status: mpsc::UnboundedReceiver<Status>,
    task: JoinHandle<()>,
    filter: String,
    client_id: String,
}

impl MqttProbe {
    /// Connects to 127.0.0.1:`port` and subscribes to `filter` ("#" for everything);
    /// returns once the SubAck arrived. Panics if that takes more than 10 s.
    pub async fn connect(port: u16, filter: &str) -> MqttProbe {
        Self::try_connect(port, filter, ProbeTls::Plain)
            .await
            .unwrap_or_else(|e| panic!("MqttProbe could not connect to port {port}: {e}"))
    }

    /// As `connect`, over TLS trusting `certs.ca_cert` and presenting `certs.client_*`.
    pub async fn connect_tls(port: u16, certs: &TestCerts, filter: &str) -> MqttProbe {
        let tls = ProbeTls::Tls {
            ca_pem: TestCerts::read(&certs.ca_cert),
            client: Some((
                TestCerts::read(&certs.client_cert),
                TestCerts::read(&certs.client_key),
            )),
        };
        Self::try_connect(port, filter, tls)
            .await
            .unwrap_or_else(|e| panic!("MqttProbe could not connect over TLS to {port}: {e}"))
    }

    /// As `connect`, logging in with `user` and `password`.
    pub async fn connect_with_credentials(
        port: u16,
        filter: &str,
        user: &str,
        password: &str,
    ) -> MqttProbe {
        Self::try_connect_as(port, filter, ProbeTls::Plain, Some((user, password)))
            .await
            .unwrap_or_else(|e| panic!("MqttProbe could not log in on port {port}: {e}"))
    }

    /// Connects and subscribes; `Err` with the first connection error (e.g. TLS refused) or a
    /// timeout. The failed probe's task is stopped before returning.
    pub async fn try_connect(port: u16, filter: &str, tls: ProbeTls) -> Result<MqttProbe, String> {
        Self::try_connect_as(port, filter, tls, None).await
    }

    async fn try_connect_as(
        port: u16,
        filter: &str,
        tls: ProbeTls,
        credentials: Option<(&str, &str)>,
    ) -> Result<MqttProbe, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let client_id = format!(
            "probe-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = MqttOptions::new(&client_id, LOCALHOST.to_string(), port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(true);
        opts.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        if let Some((user, password)) = credentials {
            opts.set_credentials(user, password);
        }
        if let ProbeTls::Tls { ca_pem, client } = tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: ca_pem,
                alpn: None,
                client_auth: client,
            }));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // Nagle off, as in the gateway: latency measurements must not include delayed ACKs.
        eventloop.network_options.set_tcp_nodelay(true);
        let (tx, rx) = mpsc::unbounded_channel();
        let (status_tx, mut status) = mpsc::unbounded_channel();
        let sub_client = client.clone();
        let sub_filter = filter.to_string();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // Clean session: (re)subscribe on every connection. try_subscribe, as
                        // awaiting a full request channel inside the event loop would deadlock.
                        if let Err(e) = sub_client.try_subscribe(&sub_filter, QoS::AtLeastOnce) {
                            let _ = status_tx.send(Status::Error(format!("subscribe: {e}")));
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let ok = ack
                            .return_codes
                            .iter()
                            .all(|c| !matches!(c, SubscribeReasonCode::Failure));
                        let r = if ok {
                            Ok(())
                        } else {
                            Err(format!("subscription refused: {:?}", ack.return_codes))
                        };
                        let _ = status_tx.send(Status::SubAck(r));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            qos: p.qos,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = status_tx.send(Status::Error(e.to_string()));
                        // rumqttc reconnects on the next poll; do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let waited = timeout(CONNECT_TIMEOUT, async {
            match status.recv().await {
                Some(Status::SubAck(r)) => r,
                Some(Status::Error(e)) => Err(e),
                None => Err("probe task ended".to_string()),
            }
        })
        .await;
        let result = match waited {
            Ok(r) => r,
            Err(_) => Err(format!("no SubAck within {CONNECT_TIMEOUT:?}")),
        };
        match result {
            Ok(()) => Ok(MqttProbe {
                client,
                rx,
                status,
                task,
                filter: filter.to_string(),
                client_id,
            }),
            Err(e) => {
                task.abort();
                Err(e)
            }
        }
    }

    /// The next message, or `None` if none arrives within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Msg> {
        timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// The first message whose topic satisfies `topic_pred`, skipping (and discarding) others.
    /// Panics after `within`, listing every message seen while waiting.
    pub async fn expect(&mut self, topic_pred: impl Fn(&str) -> bool, within: Duration) -> Msg {
        self.expect_msg(|m| topic_pred(&m.topic), within).await
    }

    /// As `expect`, with a predicate over the whole message (topic, payload, retain, qos).
    pub async fn expect_msg(&mut self, pred: impl Fn(&Msg) -> bool, within: Duration) -> Msg {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if pred(&m) => return m,
                Ok(Some(m)) => seen.push(m.summary()),
                Ok(None) | Err(_) => break,
            }
        }
        panic!(
            "MqttProbe ({}, filter {:?}): no matching message within {within:?}; saw {} other(s):\n  {}",
            self.client_id,
            self.filter,
            seen.len(),
            seen.join("\n  ")
        );
    }

    /// Everything that arrives during `duration` (always waits the full duration).
    pub async fn collect_for(&mut self, duration: Duration) -> Vec<Msg> {
        let deadline = Instant::now() + duration;
        let mut out = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push(m);
        }
        out
    }

    /// Whatever has already arrived, without waiting.
    pub fn drain(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
        out
    }

    /// Queues a publish (returns when queued, not when acknowledged).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: QoS, retain: bool) {
        timeout(
            CONNECT_TIMEOUT,
            self.client.publish(topic, qos, retain, payload.into()),
        )
        .await
        .expect("publish queue stayed full")
        .expect("publish request");
    }

    /// Connection errors reported by the event loop since the last call (drains them).
    pub fn errors(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(s) = self.status.try_recv() {
            if let Status::Error(e) = s {
                out.push(e);
            }
        }
        out
    }

    /// Publishes a command for a point no gateway has (`{prefix}/ready/check/set`) until its
    /// `unknown_point` result comes back: the gateway is then connected and subscribed. Each
    /// try waits its whole 300 ms (the probe's own publish comes back first), so this never
    /// floods the gateway. Panics after `within`.
    pub async fn wait_gateway_answers(&mut self, prefix: &str, within: Duration) {
        let topic = format!("{prefix}/ready/check/set");
        let result = format!("{topic}/result");
        let deadline = Instant::now() + within;
        loop {
            self.publish(&topic, "1", QoS::AtLeastOnce, false).await;
            let got = self.collect_for(Duration::from_millis(300)).await;
            if got.iter().any(|m| m.topic == result) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway never answered a command"
            );
        }
    }

    /// Waits until the probe has re-subscribed after a reconnect (e.g. a broker restart).
    pub async fn wait_resubscribed(&mut self, within: Duration) {
        let r = timeout(within, async {
            loop {
                match self.status.recv().await {
                    Some(Status::SubAck(Ok(()))) => return,
                    Some(_) => {}
                    None => panic!("probe task ended"),
                }
            }
        })
        .await;
        r.unwrap_or_else(|_| panic!("MqttProbe not re-subscribed within {within:?}"));
    }

    /// The underlying client, e.g. for extra subscriptions.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for MqttProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
