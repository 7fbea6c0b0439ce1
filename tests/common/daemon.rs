//! A `capsule serve` of its own for a test: a private home, the real
//! binary, requests through curl over the daemon's Unix socket.

#![allow(dead_code)] // each test binary uses its own part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Daemon {
    pub home: tempfile::TempDir,
    kernel: PathBuf,
    initramfs: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon in `home` (its CAPSULE_HOME is `home/home`) and
    /// waits until its socket answers.
    pub fn start_in(
        home: tempfile::TempDir,
        kernel: &Path,
        initramfs: &Path,
        extra: &[&str],
    ) -> Daemon {
        let mut daemon = Daemon {
            home,
            kernel: kernel.to_path_buf(),
            initramfs: initramfs.to_path_buf(),
            child: None,
        };
        daemon.restart(extra);
        daemon
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The `capsule serve` command for this home.
    pub fn serve_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsule"));
        cmd.arg("serve")
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initramfs")
            .arg(&self.initramfs)
            .args(extra)
            .env("CAPSULE_HOME", self.capsule_home())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its log goes to a file, shown if the test fails: on the
            // test's own stderr it would split the harness's result lines.
            .stderr(self.log_file());
        cmd
    }

    fn log_path(&self) -> PathBuf {
        self.home.path().join("daemon.log")
    }

    /// What the daemon has logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the daemon's log file")
    }

    /// Starts the daemon again (after [`Daemon::kill`]).
    pub fn restart(&mut self, extra: &[&str]) {
        self.child = Some(
            self.serve_command(extra)
                .spawn()
                .expect("capsule serve starts"),
        );
        let end = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("capsule serve exited: {status}");
            }
            assert!(Instant::now() < end, "the daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn capsule_home(&self) -> PathBuf {
        self.home.path().join("home")
    }

    pub fn socket(&self) -> PathBuf {
        self.capsule_home().join("api.sock")
    }

    /// `curl` with a JSON body (or none): the status and the body parsed
    /// (a body that is not JSON comes back as a string).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-S",
            "--max-time",
            "300",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg("--unix-socket")
        .arg(self.socket());
        if let Some(body) = body {
            cmd.args([
                "-H",
                "content-type: application/json",
                "--data-binary",
                body,
            ]);
        }
        cmd.arg(format!("http://capsule{path}"));
        let out = cmd.output().expect("curl runs");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, status) = text.rsplit_once('\n').unwrap();
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()))
        };
        (status.parse().unwrap(), value)
    }

    /// The capsule CLI against this daemon: exit code, stdout, stderr.
    pub fn capsule(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_capsule"))
            .args(args)
            .env("CAPSULE_HOME", self.capsule_home())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// SIGKILL: the daemon gets no chance to tidy up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("the daemon's log:\n{}", self.log());
        }
    }
}
