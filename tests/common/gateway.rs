//! Runs the real `fieldbridge` binary as a child process.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{kill_and_reap, read_lossy, wait_child, wait_until};

/// Path of the binary under test, built by cargo for integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_fieldbridge");

/// Default bound for `run_cli`.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// A `fieldbridge run --config <file>` process. Dropping it kills the process (SIGKILL).
pub struct Gateway {
    child: Option<Child>,
    dir: TempDir,
    config: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Writes `config_yaml` to `<tempdir>/config.yaml` and starts the gateway with
    /// RUST_LOG=debug, stdout and stderr appended to files in the tempdir. The config may
    /// refer to the tempdir (e.g. for its store) by the literal `{dir}`, replaced here.
    pub fn start(config_yaml: &str) -> Gateway {
        Self::start_with_env(config_yaml, &[])
    }

    /// As `start`, with extra environment variables.
    pub fn start_with_env(config_yaml: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("fieldbridge-gw-")
            .tempdir()
            .expect("tempdir");
        let config = dir.path().join("config.yaml");
        let mut yaml = config_yaml.replace("{dir}", &dir.path().display().to_string());
        // Tests run in parallel: each gateway gets its own store unless the test chose one
        // (the default, /var/lib/fieldbridge/outbox.db, would be shared between them).
        if !yaml.lines().any(|l| l.starts_with("store:")) {
            yaml.push_str(&format!(
                "\nstore:\n  path: {}\n",
                dir.path().join("outbox.db").display()
            ));
        }
        std::fs::write(&config, yaml).expect("write config");
        let mut g = Gateway {
            child: None,
            stdout: dir.path().join("stdout.log"),
            stderr: dir.path().join("stderr.log"),
            config,
            dir,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        let open = |p: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .expect("open log file")
        };
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(open(&self.stdout))
            .stderr(open(&self.stderr));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn fieldbridge"));
    }

    /// Starts the gateway again with the same config and tempdir (store survives), e.g.
    /// after `kill`. Kills the old process first if it still runs. Logs are appended.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The tempdir holding the config, logs and whatever the config puts there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// PID of the current process (panics if not started).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway not running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL by PID, then reap: a crash or power loss, no cleanup in the gateway.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    /// SIGTERM by PID (via `kill -TERM`): asks for an orderly shutdown; see `wait_exit`.
    pub fn terminate(&mut self) {
        self.signal("TERM");
    }

    /// SIGHUP by PID: reload the configuration file.
    pub fn hangup(&mut self) {
        self.signal("HUP");
    }

    /// SIGINT by PID, like Ctrl-C.
    pub fn interrupt(&mut self) {
        self.signal("INT");
    }

    fn signal(&mut self, sig: &str) {
        if !self.is_running() {
            return;
        }
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(&pid)
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid} failed: {status}");
    }

    /// Waits (bounded) for the process to exit; `None` if still running after `timeout`.
    /// The exit status is returned again by later calls until `restart`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        wait_child(child, timeout)
    }

    /// stdout and stderr so far (the tracing output goes to one of them).
    pub fn logs(&self) -> String {
        let out = read_lossy(&self.stdout);
        let err = read_lossy(&self.stderr);
        match (out.is_empty(), err.is_empty()) {
            (_, true) => out,
            (true, false) => err,
            (false, false) => format!("{out}\n--- stderr ---\n{err}"),
        }
    }

    /// Waits (polling the log files, bounded) until the logs contain `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle))
    }

    /// As `wait_for_log`, panicking with the logs when `needle` does not show up.
    pub fn expect_log(&self, needle: &str, timeout: Duration) {
        assert!(
            self.wait_for_log(needle, timeout),
            "gateway logs did not contain {needle:?} within {timeout:?}:\n{}",
            self.logs()
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what the gateway logged (the last 200 lines), so a failure
        // seen once in CI can be read afterwards.
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            eprintln!(
                "--- gateway log (last {} lines) ---\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Result of a one-shot CLI invocation.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `fieldbridge <args>` to completion (at most `CLI_TIMEOUT`, else killed and panics).
pub fn run_cli(args: &[&str]) -> CliOutput {
    run_cli_with_timeout(args, CLI_TIMEOUT)
}

/// As `run_cli` with an explicit bound. Output goes through files, so a chatty process can
/// never block on a full pipe.
pub fn run_cli_with_timeout(args: &[&str], timeout: Duration) -> CliOutput {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn fieldbridge");
    let status = wait_child(&mut child, timeout);
    let stdout = read_lossy(&out_path);
    let stderr = read_lossy(&err_path);
    match status {
        Some(s) => CliOutput {
            code: s.code(),
            stdout,
            stderr,
        },
        None => {
            kill_and_reap(&mut child);
            panic!(
                "fieldbridge {args:?} still running after {timeout:?}; killed.\n\
                 stdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
    }
}
