//! The service manager notification protocol, sd_notify(3), without libsystemd.
//!
//! Each notification is one datagram of `KEY=VALUE` lines sent to the Unix socket named by
//! `NOTIFY_SOCKET`: a path, or an abstract name written with a leading `@`. `WATCHDOG_USEC`
//! (with `WATCHDOG_PID`, when set, naming this process) asks for `WATCHDOG=1` at least that
//! often; sd_watchdog_enabled(3) recommends half of it.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
}

impl Notifier {
    /// `None` when not started by a service manager (no `NOTIFY_SOCKET`) or when the socket
    /// cannot be reached.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        match Notifier::connect(&path.to_string_lossy()) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(socket = %path.to_string_lossy(), error = %e, "cannot reach NOTIFY_SOCKET");
                None
            }
        }
    }

    /// Connects to `path`; a leading `@` means an abstract socket name (Linux).
    pub fn connect(path: &str) -> io::Result<Notifier> {
        let socket = UnixDatagram::unbound()?;
        if let Some(name) = path.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.connect_addr(&addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "abstract socket names exist only on Linux",
                ));
            }
        } else {
            socket.connect(path)?;
        }
        Ok(Notifier { socket })
    }

    /// Sends one notification (`READY=1`, `STATUS=...`, several lines at once if needed).
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send(state.as_bytes()).map(|_| ())
    }
}

/// The watchdog period asked for by the service manager, if any, and if it is meant for this
/// process.
pub fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_period(&usec, pid.as_deref(), std::process::id())
}

/// Parses `WATCHDOG_USEC` / `WATCHDOG_PID` as sd_watchdog_enabled(3) does.
pub fn watchdog_period(usec: &str, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    match usec.trim().parse::<u64>().ok()? {
        0 => None,
        n => Some(Duration::from_micros(n)),
    }
}

/// A `STATUS=` line: one line, no control characters.
pub fn status(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("STATUS={clean}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.send("READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_at_sign_means_an_abstract_socket_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fieldbridge-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.send("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn watchdog_applies_only_to_the_named_process() {
        let half_second = Some(Duration::from_millis(500));
        assert_eq!(watchdog_period("500000", None, 42), half_second);
        assert_eq!(watchdog_period("500000", Some("42"), 42), half_second);
        assert_eq!(watchdog_period("500000", Some("43"), 42), None);
        assert_eq!(watchdog_period("0", None, 42), None);
        assert_eq!(watchdog_period("soon", None, 42), None);
    }

    #[test]
    fn status_is_kept_on_one_line() {
        assert_eq!(status("a\nb"), "STATUS=a b");
    }
}
