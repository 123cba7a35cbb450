//! A scripted fake MQTT server (3.1.1 and 5) on a free loopback port.
//!
//! A FAKE, used only for faulty-broker behaviour that no real broker shows on demand: a
//! CONNACK with `session_present = 1` on a clean session, MQTT 5 Receive Maximum 0, an
//! unsolicited PUBACK, a PUBLISH with a topic alias we never advertised, a packet type a
//! server never sends (SUBSCRIBE). Everything else is tested against the real mosquitto.
//!
//! Each accepted connection runs the [`Script`] the test's closure returns for its number
//! (0, 1, 2...): what the CONNACK says, what is sent right after it and after the first
//! SUBACK, whether publishes are acknowledged. Every PUBLISH received is recorded, with the
//! number of the connection it came on, and every change wakes [`FakeBroker::wait`].
//! The wire format is written by hand here (MQTT 3.1.1 §2-3, MQTT 5 §2-3): it must be able
//! to send what a correct encoder refuses to.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::LOCALHOST;

/// How one connection behaves.
#[derive(Debug, Clone)]
pub struct Script {
    /// CONNACK's session-present flag (a clean session must get 0).
    pub session_present: bool,
    /// MQTT 5: the Receive Maximum property of the CONNACK.
    pub receive_max: Option<u16>,
    /// MQTT 5: the Server Keep Alive property of the CONNACK (seconds).
    pub server_keep_alive: Option<u16>,
    /// MQTT 5: the Maximum QoS property of the CONNACK (0 or 1).
    pub max_qos: Option<u8>,
    /// Raw packets written right after the CONNACK.
    pub after_connack: Vec<Vec<u8>>,
    /// Raw packets written right after the first SUBACK.
    pub after_suback: Vec<Vec<u8>>,
    /// Answer SUBSCRIBE with SUBACK.
    pub suback: bool,
    /// Answer QoS 1 publishes with PUBACK (and QoS 2 with PUBREC, PUBREL with PUBCOMP).
    pub ack: bool,
    /// Close the connection right after the CONNACK (and `after_connack`).
    pub close_after_connack: bool,
}

impl Default for Script {
    /// A well-behaved broker.
    fn default() -> Script {
        Script {
            session_present: false,
            receive_max: None,
            server_keep_alive: None,
            max_qos: None,
            after_connack: Vec::new(),
            after_suback: Vec::new(),
            suback: true,
            ack: true,
            close_after_connack: false,
        }
    }
}

/// A PUBLISH the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Number of the connection (0 first).
    pub conn: usize,
    pub topic: String,
    pub payload: Vec<u8>,
    pub pkid: u16,
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

#[derive(Debug, Default)]
struct State {
    connections: usize,
    /// MQTT protocol level of each connection's CONNECT (4 = 3.1.1, 5).
    levels: Vec<u8>,
    received: Vec<Received>,
    /// Filters of every SUBSCRIBE, with the connection they came on.
    subscribed: Vec<(usize, String)>,
    /// PINGREQs received.
    pings: usize,
}

/// The running fake; dropping it stops the accept loop and every connection.
pub struct FakeBroker {
    port: u16,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    kill: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeBroker {
    /// Listens on a free loopback port; `script(n)` says how connection `n` behaves.
    pub async fn start(script: impl Fn(usize) -> Script + Send + Sync + 'static) -> FakeBroker {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind fake");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(Mutex::new(State::default()));
        let changed = Arc::new(Notify::new());
        let script = Arc::new(script);
        let (kill, killed) = tokio::sync::watch::channel(0u64);
        let task = {
            let state = state.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        break;
                    };
                    let n = {
                        let mut s = state.lock().unwrap();
                        s.connections += 1;
                        s.connections - 1
                    };
                    changed.notify_waiters();
                    let sc = script(n);
                    conns.spawn(serve(
                        stream,
                        n,
                        sc,
                        state.clone(),
                        changed.clone(),
                        killed.clone(),
                    ));
                    // Reap finished connections.
                    while conns.try_join_next().is_some() {}
                }
            })
        };
        FakeBroker {
            port,
            state,
            changed,
            kill,
            task,
        }
    }

    /// Closes every open connection (a network blip); new ones are accepted as before.
    pub fn close_all(&self) {
        self.kill.send_modify(|n| *n += 1);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Protocol level of each connection's CONNECT.
    pub fn levels(&self) -> Vec<u8> {
        self.state.lock().unwrap().levels.clone()
    }

    /// Every PUBLISH received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// PINGREQs received so far.
    pub fn pings(&self) -> usize {
        self.state.lock().unwrap().pings
    }

    /// Every filter subscribed so far, with its connection.
    pub fn subscribed(&self) -> Vec<(usize, String)> {
        self.state.lock().unwrap().subscribed.clone()
    }

    /// Waits until `cond` holds (checked on every change), at most `within`.
    pub async fn wait(&self, within: Duration, mut cond: impl FnMut(&FakeBroker) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            if cond(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return cond(self);
            }
        }
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    conn: usize,
    script: Script,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    mut killed: tokio::sync::watch::Receiver<u64>,
) {
    killed.mark_unchanged();
    let _ = stream.set_nodelay(true);
    let Some((0x10, connect)) = read_packet(&mut stream).await else {
        return;
    };
    // Protocol name (2 + 4 bytes "MQTT"), then the level.
    let level = connect.get(6).copied().unwrap_or(4);
    let v5 = level == 5;
    state.lock().unwrap().levels.push(level);
    let mut connack = vec![u8::from(script.session_present), 0];
    if v5 {
        let mut props = Vec::new();
        if let Some(r) = script.receive_max {
            props.push(0x21);
            props.extend_from_slice(&r.to_be_bytes());
        }
        if let Some(q) = script.max_qos {
            props.push(0x24);
            props.push(q);
        }
        if let Some(k) = script.server_keep_alive {
            props.push(0x13);
            props.extend_from_slice(&k.to_be_bytes());
        }
        connack.extend(varint(props.len()));
        connack.extend(props);
    }
    if write_all(&mut stream, &packet(0x20, &connack), &script.after_connack)
        .await
        .is_err()
        || script.close_after_connack
    {
        changed.notify_waiters();
        return;
    }
    let mut subacked = false;
    loop {
        let (header, body) = tokio::select! {
            p = read_packet(&mut stream) => match p {
                Some(p) => p,
                None => break,
            },
            _ = killed.changed() => break,
        };
        let reply = match header >> 4 {
            3 => {
                let (p, qos) = parse_publish(conn, header, &body, v5);
                let pkid = p.pkid;
                state.lock().unwrap().received.push(p);
                changed.notify_waiters();
                match qos {
                    1 if script.ack => puback(pkid),
                    2 if script.ack => packet(0x50, &pkid.to_be_bytes()),
                    _ => continue,
                }
            }
            // PUBREL: complete the QoS 2 exchange.
            6 if script.ack => packet(0x70, &body[..2.min(body.len())]),
            8 => {
                let pkid = u16::from_be_bytes([body[0], body[1]]);
                let mut at = 2;
                if v5 {
                    let (len, n) = read_varint(&body[at..]);
                    at += n + len;
                }
                let mut codes = Vec::new();
                while at + 2 <= body.len() {
                    let len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
                    let filter = String::from_utf8_lossy(&body[at + 2..at + 2 + len]).into_owned();
                    state.lock().unwrap().subscribed.push((conn, filter));
                    at += 2 + len + 1;
                    codes.push(1);
                }
                changed.notify_waiters();
                if !script.suback {
                    continue;
                }
                let mut b = pkid.to_be_bytes().to_vec();
                if v5 {
                    b.push(0);
                }
                b.extend(codes);
                let suback = packet(0x90, &b);
                let extra = if subacked {
                    &[][..]
                } else {
                    &script.after_suback[..]
                };
                subacked = true;
                if write_all(&mut stream, &suback, extra).await.is_err() {
                    break;
                }
                continue;
            }
            12 => {
                state.lock().unwrap().pings += 1;
                vec![0xD0, 0]
            }
            14 => break,
            _ => continue,
        };
        if stream.write_all(&reply).await.is_err() {
            break;
        }
    }
    changed.notify_waiters();
}

async fn write_all(stream: &mut TcpStream, first: &[u8], rest: &[Vec<u8>]) -> std::io::Result<()> {
    stream.write_all(first).await?;
    for p in rest {
        stream.write_all(p).await?;
    }
    stream.flush().await
}

/// Reads one packet: its first byte and its body. `None` at EOF or on a malformed length.
async fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let header = stream.read_u8().await.ok()?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = stream.read_u8().await.ok()?;
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let mut body = vec![0; len];
            tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut body))
                .await
                .ok()?
                .ok()?;
            return Some((header, body));
        }
    }
    None
}

fn parse_publish(conn: usize, header: u8, body: &[u8], v5: bool) -> (Received, u8) {
    let qos = (header >> 1) & 3;
    let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
    let mut at = 2 + tlen;
    let mut pkid = 0;
    if qos > 0 {
        pkid = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    if v5 {
        let (len, n) = read_varint(&body[at..]);
        at += n + len;
    }
    (
        Received {
            conn,
            topic,
            payload: body[at..].to_vec(),
            pkid,
            qos,
            dup: header & 0x08 != 0,
            retain: header & 1 != 0,
        },
        qos,
    )
}

fn read_varint(b: &[u8]) -> (usize, usize) {
    let mut len = 0usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return (len, i + 1);
        }
    }
    (len, 4)
}

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A packet from its first byte and body.
pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    p.extend(varint(body.len()));
    p.extend_from_slice(body);
    p
}

/// PUBACK for `pkid` (3.1.1 form, valid in 5 too: reason 0 and no properties are implied).
pub fn puback(pkid: u16) -> Vec<u8> {
    packet(0x40, &pkid.to_be_bytes())
}

/// A QoS 1 PUBLISH from the server, 3.1.1 (no properties).
pub fn publish_v3(topic: &str, payload: &[u8], pkid: u16, retain: bool) -> Vec<u8> {
    let mut b = (topic.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&pkid.to_be_bytes());
    b.extend_from_slice(payload);
    packet(0x32 | u8::from(retain), &b)
}

/// A QoS 1 PUBLISH from the server, MQTT 5, with a Topic Alias property (§3.3.2.3.4).
pub fn publish_v5_with_alias(topic: &str, payload: &[u8], pkid: u16, alias: u16) -> Vec<u8> {
    let mut b = (topic.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(&pkid.to_be_bytes());
    b.extend(varint(3));
    b.push(0x23);
    b.extend_from_slice(&alias.to_be_bytes());
    b.extend_from_slice(payload);
    packet(0x32, &b)
}

/// A SUBSCRIBE sent by the server: a packet type only clients send (3.1.1 §3.8).
pub fn subscribe_from_server(pkid: u16, filter: &str) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    b.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    b.extend_from_slice(filter.as_bytes());
    b.push(1);
    packet(0x82, &b)
}
