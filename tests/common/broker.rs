//! A mosquitto broker per test, on a free loopback port, configured from a tempdir.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::certs::TestCerts;
use super::{find_program, free_port, kill_and_reap, port_accepts, read_lossy, wait_until};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running mosquitto process. Dropping it kills the process (by PID).
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    ws_port: Option<u16>,
    /// Extra directories the broker's config refers to (kept as long as the broker).
    keep: Vec<TempDir>,
    dir: TempDir,
    conf: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
}

impl Mosquitto {
    /// Plain MQTT on 127.0.0.1, anonymous, no persistence.
    pub fn start() -> Mosquitto {
        Self::start_with(None)
    }

    /// MQTT over TLS with the server certificate of `certs`; with `require_client_cert` the
    /// broker refuses clients without a certificate signed by `certs.ca_cert`.
    pub fn start_tls(certs: &TestCerts, require_client_cert: bool) -> Mosquitto {
        Self::start_with(Some((certs, require_client_cert)))
    }

    /// Plain MQTT as `start`, plus MQTT over WebSocket on a second loopback port
    /// (`ws_port()`).
    pub fn start_websockets() -> Mosquitto {
        let ws = free_port();
        let mut m = Self::start_with_extra(
            None,
            &format!("listener {ws} 127.0.0.1\nprotocol websockets\n"),
        );
        m.ws_port = Some(ws);
        m
    }

    /// Plain MQTT as `start`, plus MQTT over secure WebSocket (TLS with the server
    /// certificate of `certs`, client certificates required) on a second loopback port
    /// (`ws_port()`).
    pub fn start_secure_websockets(certs: &TestCerts) -> Mosquitto {
        let ws = free_port();
        let mut m = Self::start_with_extra(
            None,
            &format!(
                "listener {ws} 127.0.0.1\nprotocol websockets\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                certs.ca_cert.display(),
                certs.server_cert.display(),
                certs.server_key.display()
            ),
        );
        m.ws_port = Some(ws);
        m
    }

    /// A broker that only accepts `user` with `password` (a mosquitto password file made
    /// with mosquitto_passwd); anonymous clients are refused.
    pub fn start_with_password(user: &str, password: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("passwd");
        let status = Command::new(find_program(
            "mosquitto_passwd",
            &["/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"],
        ))
        .arg("-b")
        .arg("-c")
        .arg(&file)
        .arg(user)
        .arg(password)
        .status()
        .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed");
        // mosquitto reads the last value of a repeated global option.
        let extra = format!("allow_anonymous false\npassword_file {}\n", file.display());
        let mut m = Self::start_with_extra(None, &extra);
        m.keep.push(dir);
        m
    }

    /// A broker whose clients (anonymous) may publish and subscribe only where the mosquitto
    /// ACL text `acl` (e.g. `topic readwrite t/#`) allows. A refused QoS 1 publish is
    /// answered with PUBACK reason 0x87 (not authorised) to an MQTT 5 client.
    pub fn start_with_acl(acl: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("acl");
        std::fs::write(&file, acl).expect("write acl");
        let mut m = Self::start_with_extra(None, &format!("acl_file {}\n", file.display()));
        m.keep.push(dir);
        m
    }

    /// The WebSocket listener's port (`start_websockets`, `start_secure_websockets`).
    pub fn ws_port(&self) -> u16 {
        self.ws_port.expect("started with a WebSocket listener")
    }

    fn start_with(tls: Option<(&TestCerts, bool)>) -> Mosquitto {
        Self::start_with_extra(tls, "")
    }

    fn start_with_extra(tls: Option<(&TestCerts, bool)>, extra: &str) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("fieldbridge-mosquitto-")
            .tempdir()
            .expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        let stderr = dir.path().join("mosquitto.stderr");
        let mut m = Mosquitto {
            child: None,
            port: 0,
            ws_port: None,
            keep: Vec::new(),
            dir,
            conf,
            log,
            stderr,
        };
        // The free port may be taken between probing and binding: retry with a fresh one.
        let mut last_err = String::new();
        for _ in 0..3 {
            m.port = free_port();
            write_config(&m.conf, &m.log, m.port, tls);
            if !extra.is_empty() {
                let mut conf = std::fs::read_to_string(&m.conf).expect("read mosquitto.conf");
                conf.push_str(extra);
                std::fs::write(&m.conf, conf).expect("write mosquitto.conf");
            }
            match m.spawn_and_wait() {
                Ok(()) => return m,
                Err(e) => last_err = e,
            }
        }
        panic!("mosquitto did not start: {last_err}");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let bin = find_program("mosquitto", &["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]);
        let err_file = File::options()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .expect("open mosquitto stderr file");
        let out_file = err_file.try_clone().expect("clone file");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("spawn mosquitto: {e}"))?;
        let port = self.port;
        let mut exited = None;
        let up = wait_until(START_TIMEOUT, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            port_accepts(port)
        });
        if let Some(status) = exited {
            return Err(format!(
                "mosquitto exited with {status} on port {port}:\n{}",
                self.log()
            ));
        }
        if !up {
            kill_and_reap(&mut child);
            return Err(format!(
                "mosquitto did not accept on port {port} within {START_TIMEOUT:?}:\n{}",
                self.log()
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    /// The loopback port the broker listens on (the same across `restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the running broker, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the broker (SIGKILL, by PID) and reaps it: an abrupt loss, like a crash.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// Starts the broker again on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        // SO_REUSEADDR lets mosquitto rebind at once; retry briefly in case the port lingers.
        let mut last_err = String::new();
        for _ in 0..5 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) => {
                    last_err = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "mosquitto did not restart on port {}: {last_err}",
            self.port
        );
    }

    /// The broker's log file and anything it printed on stdout/stderr.
    pub fn log(&self) -> String {
        let mut s = read_lossy(&self.log);
        let err = read_lossy(&self.stderr);
        if !err.is_empty() {
            let _ = write!(s, "\n--- mosquitto stdout/stderr ---\n{err}");
        }
        s
    }

    /// The tempdir holding the config and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_config(conf: &Path, log: &Path, port: u16, tls: Option<(&TestCerts, bool)>) {
    let mut c = String::new();
    // Started as root, mosquitto 2 drops to user "mosquitto", which cannot write our tempdir.
    if is_root() {
        c.push_str("user root\n");
    }
    let _ = writeln!(c, "per_listener_settings false");
    let _ = writeln!(c, "persistence false");
    let _ = writeln!(c, "allow_anonymous true");
    // Nagle off (mosquitto >= 2.0): latency figures must not include 40 ms delayed ACKs.
    let _ = writeln!(c, "set_tcp_nodelay true");
    let _ = writeln!(c, "log_dest file {}", log.display());
    let _ = writeln!(c, "log_type all");
    let _ = writeln!(c, "log_timestamp_format %Y-%m-%dT%H:%M:%S");
    let _ = writeln!(c, "connection_messages true");
    let _ = writeln!(c, "listener {port} 127.0.0.1");
    if let Some((certs, require)) = tls {
        let _ = writeln!(c, "cafile {}", certs.ca_cert.display());
        let _ = writeln!(c, "certfile {}", certs.server_cert.display());
        let _ = writeln!(c, "keyfile {}", certs.server_key.display());
        let _ = writeln!(c, "require_certificate {require}");
    }
    std::fs::write(conf, c).expect("write mosquitto.conf");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
