//! A private PostgreSQL server for one test (or the soak kit), for what the
//! shared one on 127.0.0.1:5432 cannot be set up to do (TLS with a
//! certificate the test made, being stopped and started again): `initdb` in
//! a temporary directory, `postgres` on a free loopback port with trust
//! authentication, user `iris`, no Unix socket, stopped (immediate shutdown)
//! and deleted when dropped.
//!
//! PostgreSQL refuses to run as root: as root, both run as the `postgres`
//! user through `setpriv` (which execs, so the child is the server itself).
//! Without `/usr/local/bin/initdb` and `postgres` the test says it was
//! skipped and passes, unless `IRIS_REQUIRE_REDIS=1` (CI): see
//! [`super::skip`].

#![allow(dead_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::skip;

const INITDB: &str = "/usr/local/bin/initdb";
const POSTGRES: &str = "/usr/local/bin/postgres";
const SETPRIV: &str = "/usr/bin/setpriv";
/// Who runs the server when the tests run as root.
const SERVICE_USER: &str = "postgres";

/// Starting on a loaded two-core machine (initdb alone takes seconds there):
/// the wait ends as soon as the server answers.
const START_WITHIN: Duration = Duration::from_secs(60);

pub struct PrivatePostgres {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The server's arguments, to start it again the same way.
    args: Vec<String>,
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// `program`, as [`SERVICE_USER`] when the tests run as root.
fn command(program: &str) -> Command {
    if is_root() {
        let mut command = Command::new(SETPRIV);
        command.args([
            &format!("--reuid={SERVICE_USER}"),
            &format!("--regid={SERVICE_USER}"),
            "--init-groups",
            "--",
            program,
        ]);
        command
    } else {
        Command::new(program)
    }
}

/// [`command`], run in `dir` (the server's user may not enter the test's
/// working directory).
fn command_in(program: &str, dir: &Path) -> Command {
    let mut command = command(program);
    command.current_dir(dir);
    command
}

/// A port for a server of this module: see [`super::ports`].
fn free_port() -> u16 {
    super::ports::listen_port()
}

impl PrivatePostgres {
    /// Initializes and starts a server without TLS; waits until it accepts
    /// connections. `None` (skipped) without the binaries.
    pub async fn start() -> Option<Self> {
        Self::launch(None).await
    }

    /// Initializes and starts a server with `ssl = on`, presenting
    /// `cert_pem` with `key_pem`; waits until it accepts connections.
    /// `None` (skipped) without the binaries.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Option<Self> {
        Self::launch(Some((cert_pem, key_pem))).await
    }

    async fn launch(tls: Option<(&str, &str)>) -> Option<Self> {
        for binary in [INITDB, POSTGRES] {
            if !Path::new(binary).exists() {
                return skip(format!("{binary} is not installed"));
            }
        }
        if is_root() && !Path::new(SETPRIV).exists() {
            return skip(format!("running as root, and {SETPRIV} is not installed"));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // The server's user creates its data directory in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("open the directory to the server's user");
        let data = dir.path().join("data");
        let initdb = {
            let mut initdb = command_in(INITDB, dir.path());
            initdb
                .arg("-D")
                .arg(&data)
                .args(["-U", "iris", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .args(["--locale=C", "--no-instructions"]);
            initdb
        };
        let output = run(initdb).await;
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The key must belong to the server's user and be private to it.
        let owner = std::fs::metadata(&data).expect("data directory");
        let write_private = |name: &str, text: &str| -> PathBuf {
            let path = data.join(name);
            std::fs::write(&path, text).expect("write TLS file");
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))
                .expect("give the TLS file to the server's user");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("TLS file mode");
            path
        };
        let port = free_port();
        let mut args: Vec<String> = vec![
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            port.to_string(),
        ];
        for setting in [
            "listen_addresses=127.0.0.1",
            "unix_socket_directories=",
            "fsync=off",
            "max_connections=40",
        ] {
            args.extend(["-c".into(), setting.into()]);
        }
        if let Some((cert_pem, key_pem)) = tls {
            let cert = write_private("server.crt", cert_pem);
            let key = write_private("server.key", key_pem);
            for setting in [
                "ssl=on".to_owned(),
                format!("ssl_cert_file={}", cert.display()),
                format!("ssl_key_file={}", key.display()),
            ] {
                args.extend(["-c".into(), setting]);
            }
        }
        let mut postgres = Self {
            port,
            child: None,
            dir,
            args,
        };
        postgres.spawn();
        postgres.wait_ready().await;
        Some(postgres)
    }

    fn spawn(&mut self) {
        let child = command_in(POSTGRES, self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
    }

    /// Stops the server (fast shutdown: connections are closed, the data
    /// kept); the port refuses connections until [`Self::restart`].
    pub fn stop(&mut self) {
        // SIGINT: fast shutdown.
        self.shut_down("-INT", Duration::from_secs(30));
    }

    /// Sends the server `signal` and waits for it to exit, at most
    /// `within`; then kills it.
    fn shut_down(&mut self, signal: &str, within: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again after [`Self::stop`], on the same port and
    /// data; waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(Ok((client, connection))) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(&self.plain_url(), tokio_postgres::NoTls),
            )
            .await
            {
                tokio::spawn(connection);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("postgres exited before answering: {status}");
            }
            assert!(
                started.elapsed() < START_WITHIN,
                "postgres on port {} not answering after {START_WITHIN:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's URL with `params` (`sslmode=…`), host `127.0.0.1`.
    pub fn url(&self, params: &str) -> String {
        format!("postgres://iris@127.0.0.1:{}/postgres?{params}", self.port)
    }

    /// Without TLS, for the test itself to look at what Iris wrote.
    fn plain_url(&self) -> String {
        self.url("sslmode=disable")
    }

    /// A plain connection, for the test to look at what Iris wrote.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.plain_url(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("private postgres: {e}"));
        tokio::spawn(connection);
        client
    }
}

async fn run(mut command: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("command task")
        .expect("run command")
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, the server ends its own backends
        // (SIGKILL would leave them to notice alone).
        self.shut_down("-QUIT", Duration::from_secs(10));
    }
}
