//! Prompt TCP acknowledgements for the broker's PUBACKs (Linux).
//!
//! A broker with Nagle's algorithm on (mosquitto's default, `set_tcp_nodelay false`) holds a
//! small packet back while an earlier one it sent is unacknowledged. With two of our
//! publishes in flight, the PUBACK of the second therefore waits for our TCP ACK of the
//! first; Linux delays that ACK (up to 40 ms, "delayed ACK") in the hope of carrying it on
//! data, and when we have nothing more to publish, none comes. Every reading that follows
//! another within a millisecond (a device's status and its first reading, two devices polled
//! at the same moment, a command result and the new value) paid those 40 ms.
//!
//! `TCP_QUICKACK` makes the kernel send a pending ACK at once. It is not sticky (the kernel
//! returns to delayed ACKs by itself), so the link sets it when it matters: a PUBACK arrived,
//! more publishes are in flight and nothing queued will carry the ACK. rumqttc does not expose
//! its socket, so after each CONNACK the socket is found among the process's descriptors by
//! its peer: the broker's port and, when the host is an IP address, that address. A Modbus
//! TCP connection to the same port number on a host named by DNS would be poked too, which
//! is harmless. Elsewhere than Linux this is a no-op.

/// The descriptors of the broker connection (normally one), found after a CONNACK.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct QuickAck {
    fds: Vec<i32>,
}

impl QuickAck {
    /// Finds the TCP sockets connected to `port` on `host` (any address when `host` is a name).
    #[cfg(target_os = "linux")]
    pub(super) fn find(host: &str, port: u16) -> QuickAck {
        let want: Option<std::net::IpAddr> = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok();
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return QuickAck::default();
        };
        let mut fds = Vec::new();
        for entry in dir.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // tcp_peer's SO_TYPE check fails (ENOTSOCK) on anything but a socket.
            if let Some(peer) = tcp_peer(fd) {
                if peer.port() == port && want.is_none_or(|ip| ip == peer.ip()) {
                    fds.push(fd);
                }
            }
        }
        QuickAck { fds }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn find(_host: &str, _port: u16) -> QuickAck {
        QuickAck::default()
    }

    /// Sends any pending ACK on the broker connection now.
    pub(super) fn poke(&self) {
        #[cfg(target_os = "linux")]
        for &fd in &self.fds {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; a stale
            // or reused descriptor makes it fail (EBADF/ENOTSOCK) or sets a harmless option.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    (&raw const one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// The peer of `fd` if it is a connected TCP socket (IPv4 or IPv6).
#[cfg(target_os = "linux")]
fn tcp_peer(fd: i32) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`, a live local.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &raw mut len,
        )
    };
    if rc != 0 || kind != libc::SOCK_STREAM {
        return None;
    }
    // SAFETY: sockaddr_storage is plain data, valid when zeroed.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into `storage`, a live local.
    let rc = unsafe { libc::getpeername(fd, (&raw mut storage).cast(), &raw mut len) };
    if rc != 0 {
        return None;
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn finds_the_connected_socket_by_its_peer_and_nothing_else() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let found = QuickAck::find("127.0.0.1", port);
        use std::os::fd::AsRawFd;
        assert_eq!(found.fds, vec![client.as_raw_fd()]);
        // By name: any address on that port (the accepted socket's peer port differs).
        assert_eq!(
            QuickAck::find("localhost", port).fds,
            vec![client.as_raw_fd()]
        );
        assert!(QuickAck::find("127.0.0.2", port).is_empty());
        found.poke();
        // The option is readable back as set right after the poke.
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                client.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&raw mut v).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(v, 1);
    }
}
