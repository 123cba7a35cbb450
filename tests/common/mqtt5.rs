//! `Mqtt5Probe`: an MQTT 5 client (rumqttc `v5`) that subscribes, records what it sees with
//! the properties that matter to request/response, and publishes with properties.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use super::LOCALHOST;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One publish received by the probe, with its MQTT 5 properties.
#[derive(Debug, Clone)]
pub struct Msg5 {
    pub topic: String,
    pub payload: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
    pub response_topic: Option<String>,
}

impl Msg5 {
    /// The payload parsed as JSON; panics with the payload if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {:?}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// An MQTT 5 client on 127.0.0.1 whose event loop runs in a spawned task (aborted on drop).
pub struct Mqtt5Probe {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg5>,
    task: JoinHandle<()>,
}

impl Mqtt5Probe {
    /// Connects with a clean start and subscribes to every filter (QoS 1); returns once the
    /// SUBACK granted them all. Panics after 10 s.
    pub async fn connect(port: u16, filters: &[&str]) -> Mqtt5Probe {
        static N: AtomicU64 = AtomicU64::new(0);
        let id = format!(
            "probe5-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = MqttOptions::new(id, LOCALHOST.to_string(), port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_start(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let sub = client.clone();
        let filters: Vec<Filter> = filters
            .iter()
            .map(|f| Filter::new(*f, QoS::AtLeastOnce))
            .collect();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Err(e) = sub.try_subscribe_many(filters.clone()) {
                            let _ = ready_tx.send(Err(format!("subscribe: {e}")));
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let ok = ack
                            .return_codes
                            .iter()
                            .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                        let _ = ready_tx.send(if ok {
                            Ok(())
                        } else {
                            Err(format!("subscription refused: {:?}", ack.return_codes))
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.as_ref();
                        let _ = tx.send(Msg5 {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            correlation: props
                                .and_then(|p| p.correlation_data.as_ref().map(|d| d.to_vec())),
                            response_topic: props.and_then(|p| p.response_topic.clone()),
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        // rumqttc reconnects on the next poll; do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        match timeout(CONNECT_TIMEOUT, ready.recv()).await {
            Ok(Some(Ok(()))) => {}
            other => {
                task.abort();
                panic!("Mqtt5Probe could not connect and subscribe on port {port}: {other:?}");
            }
        }
        Mqtt5Probe { client, rx, task }
    }

    /// Publishes at QoS 1 with the given properties.
    pub async fn publish(&self, topic: &str, payload: &str, properties: PublishProperties) {
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
                properties,
            )
            .await
            .expect("queue publish");
    }

    /// The first message matching `pred` within `within`; panics otherwise, listing what
    /// arrived meanwhile.
    pub async fn expect(&mut self, pred: impl Fn(&Msg5) -> bool, within: Duration) -> Msg5 {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.rx.recv(),
            )
            .await
            {
                Ok(Some(m)) if pred(&m) => return m,
                Ok(Some(m)) => seen.push(m.topic),
                Ok(None) | Err(_) => panic!(
                    "no expected message within {within:?}; saw {} others: {:?}",
                    seen.len(),
                    seen.iter().rev().take(20).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Whatever has already arrived, without waiting.
    pub fn drain(&mut self) -> Vec<Msg5> {
        let mut out = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            out.push(m);
        }
        out
    }

    /// Everything that arrives within `duration`.
    pub async fn collect_for(&mut self, duration: Duration) -> Vec<Msg5> {
        let deadline = Instant::now() + duration;
        let mut out = Vec::new();
        while let Ok(Some(m)) = timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.rx.recv(),
        )
        .await
        {
            out.push(m);
        }
        out
    }
}

impl Drop for Mqtt5Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
