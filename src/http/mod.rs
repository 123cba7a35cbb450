//! The HTTP endpoint (`http:`, off by default): `/metrics` (Prometheus), `/healthz`,
//! `/readyz`, `/api/status` (the snapshot as JSON) and `/` (the status page, embedded).
//!
//! Read-only and small on purpose: HTTP/1.1 `GET`/`HEAD` only, one request per connection
//! (`Connection: close`), a request head of at most [`MAX_HEAD`] bytes read within
//! [`READ_TIMEOUT`], at most `max_connections` served at once (more are answered 503), answers
//! written within [`WRITE_TIMEOUT`]. A listener off loopback requires credentials (checked
//! when the configuration is loaded); they are compared in constant time and never logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::model::{Http, HttpAuth};
use crate::observe::{History, Sources};

/// The longest request head taken (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// A client has this long to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer must be taken within this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: &str = include_str!("page.html");

/// A running endpoint.
pub struct Endpoint {
    pub local: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `settings.listen` and serves until `cancel`; the current [`Sources`] come from
/// `sources` (replaced on a reload). Also samples the poll-latency history for the page.
pub async fn spawn(
    settings: &Http,
    sources: watch::Receiver<Arc<Sources>>,
    cancel: CancellationToken,
) -> std::io::Result<Endpoint> {
    let listener = TcpListener::bind(settings.listen).await?;
    let local = listener.local_addr()?;
    let history = Arc::new(History::default());
    tokio::spawn(sample(sources.clone(), history.clone(), cancel.clone()));
    let expected = settings.auth.as_ref().map(expected_authorization);
    let server = Server {
        sources,
        history,
        expected: expected.map(Arc::new),
    };
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, _) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let server = server.clone();
                    tokio::spawn(async move {
                        server.connection(stream).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let busy =
                            response(503, "text/plain", b"busy: too many connections\n", &[]);
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), stream.write_all(&busy))
                                .await;
                    });
                }
            }
        }
    });
    tracing::info!(listen = %local, auth = settings.auth.is_some(), "http endpoint listening");
    Ok(Endpoint { local, task })
}

/// Samples the poll latencies every [`crate::observe::HISTORY_EVERY`].
async fn sample(
    sources: watch::Receiver<Arc<Sources>>,
    history: Arc<History>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::observe::HISTORY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let current = sources.borrow().clone();
        history.sample(&current);
    }
}

/// The `Authorization` header value a request must carry.
fn expected_authorization(auth: &HttpAuth) -> String {
    match auth {
        HttpAuth::Bearer(t) => format!("Bearer {}", t.0),
        HttpAuth::Basic(pair) => format!("Basic {}", base64(pair.0.as_bytes())),
    }
}

#[derive(Clone)]
struct Server {
    sources: watch::Receiver<Arc<Sources>>,
    history: Arc<History>,
    expected: Option<Arc<String>>,
}

/// A parsed request head: what the endpoint looks at.
#[derive(Debug, PartialEq)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authorization: Option<&'a str>,
}

/// Parses a request head (without its final blank line); `Err` with the status to answer.
pub fn parse_head(head: &str) -> Result<Request<'_>, u16> {
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(505);
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return Err(400);
    }
    let mut authorization = None;
    for h in lines {
        let Some((name, value)) = h.split_once(':') else {
            return Err(400);
        };
        if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.trim());
        }
    }
    Ok(Request {
        method,
        path,
        authorization,
    })
}

impl Server {
    async fn connection(&self, mut stream: TcpStream) {
        let answer = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
            Ok(Ok(head)) => self.answer(&head),
            Ok(Err(status)) => response(status, "text/plain", reason(status).as_bytes(), &[]),
            Err(_) => response(408, "text/plain", b"request timeout\n", &[]),
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&answer).await?;
            stream.shutdown().await
        })
        .await;
    }

    fn answer(&self, head: &str) -> Vec<u8> {
        let request = match parse_head(head) {
            Ok(r) => r,
            Err(status) => return response(status, "text/plain", reason(status).as_bytes(), &[]),
        };
        if request.method != "GET" && request.method != "HEAD" {
            return response(
                405,
                "text/plain",
                b"read-only: GET only\n",
                &[("Allow", "GET, HEAD")],
            );
        }
        if let Some(expected) = &self.expected {
            let given = request.authorization.unwrap_or("");
            if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                let challenge = if expected.starts_with("Basic") {
                    "Basic realm=\"fieldbridge\""
                } else {
                    "Bearer realm=\"fieldbridge\""
                };
                return response(
                    401,
                    "text/plain",
                    b"unauthorized\n",
                    &[("WWW-Authenticate", challenge)],
                );
            }
        }
        let mut full = self.route(request.path);
        if request.method == "HEAD" {
            if let Some(end) = full.windows(4).position(|w| w == b"\r\n\r\n") {
                full.truncate(end + 4);
            }
        }
        full
    }

    fn route(&self, path: &str) -> Vec<u8> {
        let sources = self.sources.borrow().clone();
        match path {
            "/metrics" => {
                let text = crate::observe::prometheus::render(&sources.snapshot());
                response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text.as_bytes(),
                    &[],
                )
            }
            "/healthz" => {
                let stalled = crate::health::stalled(&sources.tasks());
                if stalled.is_empty() {
                    response(200, "text/plain", b"ok\n", &[])
                } else {
                    let body = format!("stalled: {}\n", stalled.join(", "));
                    response(503, "text/plain", body.as_bytes(), &[])
                }
            }
            "/readyz" => {
                if sources.ready.load(std::sync::atomic::Ordering::Relaxed) {
                    response(200, "text/plain", b"ready\n", &[])
                } else {
                    response(503, "text/plain", b"starting\n", &[])
                }
            }
            "/api/status" => {
                let snapshot = sources.snapshot();
                let history: serde_json::Map<String, serde_json::Value> = snapshot
                    .devices
                    .iter()
                    .map(|d| {
                        let h = self.history.get(&d.name);
                        (d.name.clone(), serde_json::json!(h))
                    })
                    .collect();
                let mut body = serde_json::to_value(&snapshot).unwrap_or_default();
                if let Some(map) = body.as_object_mut() {
                    map.insert(
                        "history".into(),
                        serde_json::json!({
                            "every_seconds": crate::observe::HISTORY_EVERY.as_secs(),
                            "poll_ms": history,
                        }),
                    );
                }
                let text = serde_json::to_vec(&body).unwrap_or_default();
                response(
                    200,
                    "application/json",
                    &text,
                    &[("Cache-Control", "no-store")],
                )
            }
            "/" | "/index.html" => response(
                200,
                "text/html; charset=utf-8",
                PAGE.as_bytes(),
                &[(
                    "Content-Security-Policy",
                    "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
                )],
            ),
            _ => response(404, "text/plain", b"not found\n", &[]),
        }
    }
}

/// Reads up to the end of the request head; `Err(431)` past [`MAX_HEAD`], `Err(400)` if the
/// client closes first or sends something that is not text.
async fn read_head(stream: &mut TcpStream) -> Result<String, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf[scan_from..].windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(scan_from + end);
            return String::from_utf8(buf).map_err(|_| 400);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// A whole response.
fn response(status: u16, content_type: &str, body: &[u8], extra: &[(&str, &str)]) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The length is not secret (a token's length is in the configuration's hands).
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64 with padding (RFC 4648 §4), for the expected Basic credentials.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET path` from a running gateway's endpoint (the `status` command, blocking, bounded):
/// the body of a 200 answer, or what went wrong. A wildcard listener is asked on loopback.
pub fn get(settings: &Http, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut addr = settings.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = Duration::from_secs(3);
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let auth = settings
        .auth
        .as_ref()
        .map(|a| format!("Authorization: {}\r\n", expected_authorization(a)))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = Vec::new();
    // A snapshot of thousands of points is a few MB at most.
    stream
        .take(64 * 1024 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{addr}{path}: HTTP {status}"));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain}");
        }
    }

    #[test]
    fn request_heads_are_parsed_strictly() {
        let r =
            parse_head("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nauthorization: Bearer t").unwrap();
        assert_eq!(
            r,
            Request {
                method: "GET",
                path: "/metrics",
                authorization: Some("Bearer t"),
            }
        );
        assert_eq!(parse_head("GET /"), Err(400));
        assert_eq!(parse_head("GET / HTTP/2"), Err(505));
        assert_eq!(parse_head("GET http://x/ HTTP/1.1"), Err(400));
        assert_eq!(parse_head("GET / HTTP/1.1\r\nno colon"), Err(400));
        assert_eq!(parse_head("GET  / HTTP/1.1"), Err(400));
    }

    #[test]
    fn credentials_compare_whole() {
        assert!(constant_time_eq(b"Bearer abc", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer abd", b"Bearer abc"));
        assert!(!constant_time_eq(b"Bearer ab", b"Bearer abc"));
        assert_eq!(
            expected_authorization(&HttpAuth::Basic(crate::model::Secret("u:p".into()))),
            "Basic dTpw"
        );
    }
}
