//! `Relay`: a TCP relay on loopback between the gateway and the real broker, which a test can
//! cut (every open connection closed, new ones refused) and restore. It stands for a network
//! outage: unlike a broker restart, the broker and the test's probe keep their sessions, so a
//! test can check that every message sent during the outage arrives afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
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
        let accepted = Arc::new(AtomicU64::new(0));
        let task = {
            let cut = cut.clone();
            let generation = generation.clone();
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
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
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
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Connections relayed so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
