//! The brokers of the compatibility suite, each a real process started by the test on a free
//! loopback port with its own config and data dir in a tempdir, and stopped by PID (its
//! process group: the Erlang brokers run `beam.smp` under a shell script). The Erlang ones
//! get their own `epmd` on a free port (ERL_EPMD_PORT), stopped the same way.
//!
//! rumqttd is a library: the test binary runs it in a child copy of itself (the
//! `rumqttd_child` test, which does nothing unless FIELDBRIDGE_RUMQTTD_PORT is set), so that it
//! too is a process that can be stopped and restarted.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::common::{find_program, free_port, port_accepts, read_lossy, wait_child, wait_until};

pub const USER: &str = "fieldbridge";
pub const PASSWORD: &str = "interop-s3cret";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mosquitto,
    Rumqttd,
    Aedes,
    RabbitMq,
    Ejabberd,
}

impl Kind {
    /// How long the broker may take to accept connections (the Erlang VM boots slowly on a
    /// loaded 2-core machine).
    fn start_timeout(self) -> Duration {
        match self {
            Kind::RabbitMq => Duration::from_secs(240),
            Kind::Ejabberd => Duration::from_secs(120),
            _ => Duration::from_secs(20),
        }
    }
}

pub struct Broker {
    pub kind: Kind,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    epmd: Option<Child>,
    epmd_port: u16,
}

impl Broker {
    pub fn start(kind: Kind) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fieldbridge-{kind:?}-").to_lowercase())
            .tempdir()
            .expect("tempdir");
        let mut b = Broker {
            kind,
            port: 0,
            dir,
            child: None,
            epmd: None,
            epmd_port: 0,
        };
        if matches!(kind, Kind::RabbitMq | Kind::Ejabberd) {
            b.epmd_port = free_port();
            let epmd = Command::new(find_program(
                "epmd",
                &["/usr/lib/erlang/bin/epmd", "/usr/bin/epmd"],
            ))
            .args(["-port", &b.epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn epmd");
            b.epmd = Some(epmd);
            let port = b.epmd_port;
            assert!(
                wait_until(Duration::from_secs(10), || port_accepts(port)),
                "epmd did not start"
            );
        }
        let mut last = String::new();
        for _ in 0..3 {
            b.port = free_port();
            b.write_config();
            match b.spawn_and_wait() {
                Ok(()) => return b,
                Err(e) => last = e,
            }
        }
        panic!("{kind:?} did not start: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything the broker logged.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for f in ["out.log", "mosquitto.log", "log/ejabberd.log"] {
            let p = self.dir.path().join(f);
            if p.exists() {
                s.push_str(&format!("--- {f} ---\n{}\n", read_lossy(&p)));
            }
        }
        s
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let p = self.port;
        let w =
            |name: &str, text: String| std::fs::write(d.join(name), text).expect("write config");
        match self.kind {
            Kind::Mosquitto => {
                let passwd = d.join("passwd");
                let status = Command::new(find_program(
                    "mosquitto_passwd",
                    &["/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"],
                ))
                .arg("-b")
                .arg("-c")
                .arg(&passwd)
                .arg(USER)
                .arg(PASSWORD)
                .status()
                .expect("run mosquitto_passwd");
                assert!(status.success(), "mosquitto_passwd failed");
                // Started as root, mosquitto 2 would drop to user "mosquitto" and lose the tempdir.
                let user = if unsafe { libc::geteuid() } == 0 {
                    "user root\n"
                } else {
                    ""
                };
                w(
                    "mosquitto.conf",
                    format!(
                        "{user}per_listener_settings false\npersistence true\npersistence_location {}/\n\
                         allow_anonymous false\npassword_file {}\nset_tcp_nodelay true\n\
                         log_dest file {}\nlog_type all\nconnection_messages true\nlistener {p} 127.0.0.1\n",
                        d.display(),
                        passwd.display(),
                        d.join("mosquitto.log").display()
                    ),
                );
            }
            Kind::RabbitMq => {
                // AMQP and the inter-node listeners off where possible; only MQTT on loopback.
                w(
                    "rabbitmq.conf",
                    format!(
                        "listeners.tcp = none\nmqtt.listeners.tcp.default = 127.0.0.1:{p}\n\
                         mqtt.allow_anonymous = false\ndefault_user = {USER}\ndefault_pass = {PASSWORD}\n\
                         loopback_users = none\nlog.file = false\nlog.console = true\n"
                    ),
                );
                w("enabled_plugins", "[rabbitmq_mqtt].\n".into());
            }
            Kind::Ejabberd => {
                // Anonymous login: ejabberd's own accounts need `ejabberdctl register` against a
                // running node; any user/password is taken (a deviation in the README's table).
                w(
                    "ejabberd.yml",
                    format!(
                        "hosts: [\"localhost\"]\nloglevel: info\nlog_rotate_count: 0\n\
                         auth_method: [anonymous]\nanonymous_protocol: login_anon\nallow_multiple_connections: true\n\
                         listen:\n  - port: {p}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n\
                         acl:\n  local:\n    user_regexp: \"\"\n\
                         modules:\n  mod_mqtt:\n    access_publish:\n      \"#\":\n        - allow\n    access_subscribe:\n      \"#\":\n        - allow\n"
                    ),
                );
            }
            Kind::Rumqttd | Kind::Aedes => {}
        }
    }

    fn command(&self) -> Command {
        let d = self.dir.path();
        let p = self.port.to_string();
        match self.kind {
            Kind::Mosquitto => {
                let mut c = Command::new(find_program(
                    "mosquitto",
                    &["/usr/sbin/mosquitto", "/usr/bin/mosquitto"],
                ));
                c.arg("-c").arg(d.join("mosquitto.conf"));
                c
            }
            Kind::Rumqttd => {
                let mut c = Command::new(std::env::current_exe().expect("current_exe"));
                c.args([
                    "--exact",
                    "rumqttd_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("FIELDBRIDGE_RUMQTTD_PORT", &p);
                c
            }
            Kind::Aedes => {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aedes/broker.js");
                let mut c = Command::new(find_program("node", &["/usr/bin/node"]));
                c.arg(script)
                    .args(["--port", &p, "--user", USER, "--password", PASSWORD])
                    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/aedes"));
                c
            }
            Kind::RabbitMq => {
                let mut c = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
                let node = format!("fb{}@localhost", self.port);
                c.env("HOME", d)
                    .env("ERL_EPMD_PORT", self.epmd_port.to_string())
                    .env("RABBITMQ_NODENAME", node)
                    .env("RABBITMQ_DIST_PORT", free_port().to_string())
                    .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
                    .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
                    .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", d.join("log"))
                    .env("RABBITMQ_PLUGINS_EXPAND_DIR", d.join("plugins-expand"))
                    .env("RABBITMQ_LOGS", "-");
                c
            }
            Kind::Ejabberd => {
                std::fs::create_dir_all(d.join("spool")).expect("spool dir");
                std::fs::create_dir_all(d.join("log")).expect("log dir");
                let mut c = Command::new(find_program("erl", &["/usr/bin/erl"]));
                c.env("HOME", d)
                    .env("ERL_EPMD_PORT", self.epmd_port.to_string())
                    .env("ERL_LIBS", "/usr/lib/x86_64-linux-gnu")
                    .env("EJABBERD_CONFIG_PATH", d.join("ejabberd.yml"))
                    .env("EJABBERD_LOG_PATH", d.join("log/ejabberd.log"))
                    .args([
                        "-sname",
                        &format!("fbej{}@localhost", self.port),
                        "-noinput",
                        "-mnesia",
                        "dir",
                    ])
                    .arg(format!("\"{}\"", d.join("spool").display()))
                    .args(["-s", "ejabberd"]);
                c
            }
        }
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("out.log"))
            .expect("open broker log");
        let mut child = self
            .command()
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn {:?}: {e}", self.kind))?;
        let port = self.port;
        let mut exited = None;
        let up = wait_until(self.kind.start_timeout(), || {
            if let Ok(Some(s)) = child.try_wait() {
                exited = Some(s);
                return true;
            }
            port_accepts(port)
        });
        if let Some(s) = exited {
            return Err(format!("exited with {s}:\n{}", self.log()));
        }
        if !up {
            kill_group(&mut child, libc::SIGKILL);
            return Err(format!("no listener on {port}:\n{}", self.log()));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the broker as an operator would (SIGTERM to its process group, SIGKILL after
    /// 30 s): what it persists, it has written.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(&mut c, libc::SIGTERM);
            if wait_child(&mut c, Duration::from_secs(30)).is_none() {
                kill_group(&mut c, libc::SIGKILL);
            }
            // The group may outlive its leader (the Erlang VM under rabbitmq-server's shell).
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        }
    }

    /// Stops and starts the broker on the same port with the same data dir.
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        for _ in 0..10 {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        panic!("{:?} did not restart: {last}", self.kind);
    }
}

fn kill_group(child: &mut Child, sig: i32) {
    if let Ok(None) = child.try_wait() {
        unsafe { libc::kill(-(child.id() as i32), sig) };
    }
    if sig == libc::SIGKILL {
        let _ = child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A failing test shows the broker's side too (mosquitto logs every PUBLISH it receives
        // and sends, with its message id): whether a message lost on the way reached it.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("PINGRE")).collect();
            let tail = &lines[lines.len().saturating_sub(400)..];
            eprintln!(
                "--- {:?} broker log (last {} lines) ---\n{}",
                self.kind,
                tail.len(),
                tail.join("\n")
            );
        }
        if let Some(mut c) = self.child.take() {
            kill_group(&mut c, libc::SIGKILL);
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        }
        if let Some(mut e) = self.epmd.take() {
            kill_group(&mut e, libc::SIGKILL);
        }
    }
}

/// The body of the `rumqttd_child` test: rumqttd (MQTT 3.1.1, password login) on
/// 127.0.0.1:`port`, until killed.
pub fn run_rumqttd(port: u16) -> ! {
    use std::collections::HashMap;
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let server = rumqttd::ServerSettings {
        name: "interop-v4".to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 500,
            auth: Some(HashMap::from([(USER.to_string(), PASSWORD.to_string())])),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 500,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    let e = broker.start();
    eprintln!("rumqttd stopped: {e:?}");
    std::process::exit(1);
}
