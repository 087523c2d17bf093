//! A real SMTP server for the tests: Debian's `python3-aiosmtpd` running `smtp_server.py`, on a
//! port of 127.0.0.1 the test picks, killed when dropped. `scripts/test.sh` installs the package.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = include_str!("smtp_server.py");

/// A Python that has aiosmtpd: Debian's (`/usr/bin/python3`) first, since a `python3` earlier on
/// PATH (pyenv, a virtualenv) may not see Debian's packages.
fn python() -> String {
    for candidate in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(candidate)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return candidate.to_owned();
        }
    }
    panic!(
        "no python3 with aiosmtpd: install Debian's python3-aiosmtpd (bash scripts/test.sh does)"
    );
}

/// Options of the server.
#[derive(Default)]
pub struct SmtpOptions {
    /// `user:password`: AUTH required.
    pub auth: Option<String>,
    /// Certificate and key (PEM): STARTTLS required.
    pub starttls: Option<(PathBuf, PathBuf)>,
    /// Recipients the server refuses with 550 at RCPT TO (the others are accepted).
    pub reject_rcpt: Vec<String>,
    /// Seconds the server waits, the message already written down, before it answers the end
    /// of DATA with 250.
    pub data_delay: Option<f64>,
}

pub struct SmtpServer {
    child: Child,
    pub port: u16,
    /// Where the messages are written, one JSON file each.
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SmtpServer {
    /// Starts a server on `port` and waits until it accepts connections.
    pub fn start(port: u16, opts: SmtpOptions) -> SmtpServer {
        let tmp = tempfile::tempdir().expect("tempdir");
        let script = tmp.path().join("smtp_server.py");
        std::fs::write(&script, SCRIPT).expect("write smtp_server.py");
        let dir = tmp.path().join("mail");
        std::fs::create_dir(&dir).expect("mail dir");
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(auth) = &opts.auth {
            cmd.args(["--auth", auth]);
        }
        if let Some((cert, key)) = &opts.starttls {
            cmd.arg("--starttls").arg(cert).arg(key);
        }
        if !opts.reject_rcpt.is_empty() {
            cmd.arg("--reject-rcpt").args(&opts.reject_rcpt);
        }
        if let Some(delay) = opts.data_delay {
            cmd.args(["--data-delay", &delay.to_string()]);
        }
        let mut child = cmd.spawn().expect("start the SMTP server");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the SMTP server exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "the SMTP server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        SmtpServer {
            child,
            port,
            dir,
            _tmp: tmp,
        }
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<serde_json::Value> {
        messages_in(&self.dir)
    }

    /// Waits up to `timeout` until at least `n` messages arrived; returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} email(s) within {timeout:?}, got {}: {messages:#?}",
                messages.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn messages_in(dir: &Path) -> Vec<serde_json::Value> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read mail dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            serde_json::from_str(&std::fs::read_to_string(p).expect("read message"))
                .expect("message JSON")
        })
        .collect()
}
