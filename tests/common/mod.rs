//! Test helpers shared by the integration tests: real peers, no mocks.
//!
//! Each test file includes this module with `mod common;` and so compiles it on its own;
//! helpers one file does not use are not dead code, hence the `allow` below.
//!
//! Layout:
//! - `broker`: a mosquitto process per test on a free loopback port (plain or TLS).
//! - `certs`: a throw-away PKI made with the openssl CLI (CA, server, client, unrelated CA).
//! - `mqtt`: `MqttProbe`, a rumqttc subscriber that records every publish it sees.
//! - `mqtt5`: `Mqtt5Probe`, the same over MQTT 5, with the properties of what it sees.
//! - `pty`: `PtyPair`, two linked pseudo-terminals made by socat (a serial "cable").
//! - `device`: Modbus devices (tokio-modbus servers over TCP or RTU on a pty) with shared,
//!   inspectable state, a request log, illegal ranges and silent units.
//! - `fake_broker`: a scripted fake MQTT server, only for faulty-broker behaviour no real
//!   broker shows (session present on a clean session, Receive Maximum 0, topic aliases).
//! - `gateway`: runs the `fieldbridge` binary as a child process.
//! - `wire`: `WireSlave`, RTU slaves on a pty that keep real line timing (character times,
//!   3.5-character end of frame, turnaround) and measure the silences the gateway keeps.
//!
//! Every process started here is killed by PID when its handle drops; every wait is bounded.
#![allow(dead_code, unused_imports)]

pub mod broker;
pub mod certs;
pub mod counter;
pub mod device;
pub mod fake_broker;
pub mod gateway;
pub mod mqtt;
pub mod mqtt5;
pub mod pty;
pub mod relay;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use broker::Mosquitto;
pub use certs::TestCerts;
pub use device::{DeviceState, Kind, LoggedRequest, Outcome, RtuDevice, TcpDevice};
pub use gateway::{run_cli, run_cli_with_timeout, CliOutput, Gateway};
pub use mqtt::{MqttProbe, Msg};
pub use mqtt5::{Mqtt5Probe, Msg5};
pub use pty::PtyPair;

/// The loopback address every helper binds to: tests never touch another interface.
pub const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A port that was free a moment ago on 127.0.0.1 (bind to port 0, read it, release it).
///
/// Another process may take it before the caller binds it; helpers that start servers retry
/// with a fresh port when the first bind fails.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` right now.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
///
/// For conditions no event announces (a port starts accepting, a file appears). Usable from
/// sync tests; inside async code prefer an awaited event.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first of `candidates` that is an executable file, else `name` looked up in `PATH`.
pub(crate) fn find_program(name: &str, candidates: &[&str]) -> PathBuf {
    for c in candidates {
        let p = Path::new(c);
        if p.is_file() {
            return p.to_path_buf();
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("{name} not found (looked in {candidates:?} and PATH); run scripts/install-test-deps")
}

/// Reads a file to a string, empty if it does not exist (yet).
pub(crate) fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Kills a child by PID (SIGKILL) and reaps it; ignores a child that already exited.
pub(crate) fn kill_and_reap(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Waits for a child to exit, polling every 20 ms, up to `timeout`.
pub(crate) fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
