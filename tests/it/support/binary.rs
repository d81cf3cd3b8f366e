//! The real `iris serve` as a child process: for what only a process shows
//! (`kill -9`, SIGTERM, its own resident memory in `/proc`, its log, limits
//! set on it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::{iris_command, write_config};

/// The real `iris serve`, killed on drop.
pub struct Binary {
    child: Option<Child>,
    addr: String,
    /// Every line it logged so far, as JSON.
    logs: Arc<Mutex<Vec<Value>>>,
    _config: tempfile::NamedTempFile,
}

impl Binary {
    /// Starts `iris serve` on `config` and waits until it says where it listens.
    pub async fn start(config: &str) -> Self {
        let file = write_config(config);
        let mut command = iris_command();
        command.args(["serve", "--config"]).arg(file.path());
        Self::spawn(command, file).await
    }

    /// [`Self::start`] in the working directory `dir` (where files Iris
    /// makes by default go).
    pub async fn start_in(config: &str, dir: &std::path::Path) -> Self {
        let file = write_config(config);
        let mut command = iris_command();
        command
            .current_dir(dir)
            .args(["serve", "--config"])
            .arg(file.path());
        Self::spawn(command, file).await
    }

    /// [`Self::start`] with a shell line run first in the process that then
    /// becomes `iris serve` (`exec`): `ulimit -n 512`, say.
    pub async fn start_after(config: &str, shell: &str) -> Self {
        let file = write_config(config);
        let mut command = iris_command();
        let iris = command.get_program().to_owned();
        command = Command::new("sh");
        command
            .env_remove("IRIS_CONFIG")
            .env_remove("IRIS_LOG_FORMAT")
            .arg("-c")
            .arg(format!("{shell} && exec \"$0\" serve --config \"$1\""))
            .arg(iris)
            .arg(file.path());
        Self::spawn(command, file).await
    }

    async fn spawn(mut command: Command, file: tempfile::NamedTempFile) -> Self {
        let mut child = command
            .env("IRIS_LOG", "info")
            .env("IRIS_LOG_FORMAT", "json")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn iris");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let kept = Arc::clone(&logs);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let json: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if json["message"] == "iris is serving"
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(json["listen"].as_str().unwrap_or("").to_owned());
                }
                kept.lock().expect("logs").push(json);
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .expect("join")
            .expect("iris starts");
        Self {
            child: Some(child),
            addr,
            logs,
            _config: file,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The lines it logged so far whose message contains `text`.
    pub fn logged(&self, text: &str) -> Vec<Value> {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|line| line["message"].as_str().is_some_and(|m| m.contains(text)))
            .cloned()
            .collect()
    }

    /// `kill -9`: nothing runs after it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
    }

    /// Sends SIGTERM; the exit status once the process is gone.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait")
    }
}

/// A process's memory as `/proc/<pid>/status` gives it, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Resident now (`VmRSS`).
    pub rss_kib: u64,
    /// The most ever resident (`VmHWM`).
    pub peak_kib: u64,
}

impl Binary {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its memory now.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        Memory {
            rss_kib: field("VmRSS:"),
            peak_kib: field("VmHWM:"),
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
