//! `Relay`: a TCP relay on loopback between the gateway and the real broker, which a test can
//! cut (every open connection closed, new ones refused) and restore. It stands for a network
//! outage: unlike a broker restart, the broker and the test's probe keep their sessions, so a
//! test can check that every message sent during the outage arrives afterwards.
//!
//! It can also *stall*: connections stay open but nothing the gateway sends goes on (no
//! PUBLISH reaches the broker, so no PUBACK comes back), as on a link that hangs without
//! closing. A `cut` drops what was held, never forwarding it; a `restore` without a cut lets
//! it go on, as a link that recovers by itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    stalled: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays 127.0.0.1:<new port> to 127.0.0.1:`upstream`. Call from a tokio runtime.
    pub async fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let (stalled, _) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = {
            let cut = cut.clone();
            let generation = generation.clone();
            let stalled = stalled.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut cancelled = generation.subscribe();
                    let stalled = stalled.subscribe();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        // A cut is abortive (RST), as when a broker is killed mid-stream: a
                        // write in progress fails instead of draining.
                        // (Deprecated because a non-zero linger blocks on drop; zero does not.)
                        #[allow(deprecated)]
                        {
                            let _ = client.set_linger(Some(std::time::Duration::ZERO));
                            let _ = server.set_linger(Some(std::time::Duration::ZERO));
                        }
                        let (mut cr, mut cw) = client.into_split();
                        let (mut sr, mut sw) = server.into_split();
                        tokio::select! {
                            _ = pump_unless_stalled(&mut cr, &mut sw, stalled) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                            _ = cancelled.changed() => {}
                        }
                    });
                }
            })
        };
        Relay {
            port,
            cut,
            stalled,
            generation,
            accepted,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every relayed connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.stalled.send_replace(false);
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Stops forwarding what the gateway sends (connections stay open) until `restore`;
    /// a `cut` in between drops what was held.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Connections relayed so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, holding each chunk while `stalled` says so; a `cut` then drops it.
async fn pump_unless_stalled(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut stalled: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
