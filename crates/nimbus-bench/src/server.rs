//! The server under test: a `nimbus server` child on a free loopback port, and the
//! loopback-only check of a `--server` URL.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use nimbus_client::Client;

/// The `nimbus` binary the benchmark starts its servers from, set once at start.
static NIMBUS_BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Chooses the `nimbus` binary of every server the benchmark starts: `chosen`
/// (`--nimbus-bin`), or the one next to this executable (the same target directory).
pub(super) fn choose_nimbus_binary(chosen: Option<PathBuf>) -> anyhow::Result<()> {
    let path = match chosen {
        Some(path) => path,
        None => {
            let exe = std::env::current_exe().context("locating nimbus-bench")?;
            exe.with_file_name("nimbus")
        }
    };
    if !path.is_file() {
        bail!(
            "no nimbus binary at {}: build it (`cargo build --release -p nimbus -p nimbus-bench`) \
             or choose one with --nimbus-bin",
            path.display()
        );
    }
    let _ = NIMBUS_BINARY.set(path);
    Ok(())
}

/// The binary [`choose_nimbus_binary`] chose (`nimbus` on the `PATH` if none was).
fn nimbus_binary() -> PathBuf {
    NIMBUS_BINARY
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("nimbus"))
}

/// A `nimbus server` child with its own temporary data directory, stopped on drop.
pub(super) struct ServerProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a server the benchmark starts is set up, beyond its own port and data directory.
#[derive(Debug, Clone, Copy)]
pub(super) struct Setup<'a> {
    /// Isolate its functions (the product's default, whatever the environment says) or not
    /// (`--insecure-no-isolation`).
    pub(super) isolated: bool,
    /// More flags of `nimbus server`.
    pub(super) flags: &'a [&'a str],
    /// The contents of `nimbus.toml` in its data directory.
    pub(super) config: Option<&'a str>,
}

impl Setup<'static> {
    /// The product's defaults, isolated or not.
    pub(super) fn plain(isolated: bool) -> Self {
        Setup {
            isolated,
            flags: &[],
            config: None,
        }
    }
}

impl Setup<'_> {
    /// `a server`, `an unisolated (--insecure-no-isolation) server (--no-snapshots,
    /// nimbus.toml: max_invocations = 1)`.
    fn describe(&self) -> String {
        let mut text = if self.isolated {
            "a server".to_owned()
        } else {
            "an unisolated (--insecure-no-isolation) server".to_owned()
        };
        let extras: Vec<String> = self
            .flags
            .iter()
            .map(|f| f.to_string())
            .chain(self.config.map(|c| {
                let lines: Vec<&str> = c.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                format!("nimbus.toml: {}", lines.join("; "))
            }))
            .collect();
        if !extras.is_empty() {
            text.push_str(&format!(" ({})", extras.join(", ")));
        }
        text
    }
}

impl ServerProcess {
    /// Starts `nimbus server` ([`nimbus_binary`]) on a free loopback port, set up as `setup`
    /// says; returns it and its URL.
    pub(super) fn start(setup: &Setup) -> anyhow::Result<(Self, String)> {
        let exe = nimbus_binary();
        let dir = tempfile::Builder::new().prefix("nimbus-bench-").tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let log = dir.path().join("server.log");
        let log_file = std::fs::File::create(&log)?;
        let data = dir.path().join("data");
        if let Some(config) = setup.config {
            std::fs::create_dir_all(&data)?;
            std::fs::write(data.join("nimbus.toml"), config)?;
        }
        let mut command = std::process::Command::new(exe);
        command
            .args(["server", "--listen", &listen, "--data-dir"])
            .arg(&data)
            .args(setup.flags)
            .env_remove("NIMBUS_INSECURE_NO_ISOLATION")
            .env_remove("NIMBUS_NO_SNAPSHOTS");
        if !setup.isolated {
            command.arg("--insecure-no-isolation");
        }
        let child = command
            .env("NIMBUS_LOG", "warn")
            .env_remove("NIMBUS_CONFIG")
            .env_remove("NIMBUS_LISTEN")
            .env_remove("NIMBUS_DATA_DIR")
            .env_remove("NIMBUS_DATABASE_URL")
            .env_remove("NIMBUS_API_KEYS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting the server")?;
        Ok((
            ServerProcess {
                child,
                log,
                _dir: dir,
            },
            format!("http://{listen}"),
        ))
    }

    /// [`start`](Self::start)s a server, says so, and waits until it is healthy; returns
    /// it, its URL and an API client for it.
    pub(super) async fn start_healthy(setup: &Setup<'_>) -> anyhow::Result<(Self, String, Client)> {
        let (mut process, url) = Self::start(setup)?;
        let client = Client::new(&url, None)?;
        super::progress(format!(
            "started {} pid {} at {url}",
            setup.describe(),
            process.pid()
        ));
        process.wait_healthy(&client).await?;
        Ok((process, url, client))
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits (at most 30 s) until `GET /health` answers.
    pub(super) async fn wait_healthy(&mut self, client: &Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the server exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if client.health().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not answer /health within 30 s:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, up to 5 s to drain, then SIGKILL.
    pub(super) fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The socket address and `Host` of a loopback `http://` URL; anything else is refused.
pub(super) fn loopback_addr(url: &str) -> anyhow::Result<(SocketAddr, String)> {
    let url = nimbus_client::normalize_server(url)?;
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("bench needs an http:// server URL, got {url}");
    };
    let authority = rest.split('/').next().unwrap_or_default().to_owned();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (
            host,
            port.parse::<u16>()
                .with_context(|| format!("invalid port in {url}"))?,
        ),
        _ => (authority.as_str(), 80),
    };
    let ip = match host {
        "127.0.0.1" | "localhost" => [127, 0, 0, 1].into(),
        "[::1]" => std::net::Ipv6Addr::LOCALHOST.into(),
        _ => bail!("bench only targets a server on this machine (127.0.0.1, localhost or [::1]), got {host}"),
    };
    Ok((SocketAddr::new(ip, port), authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_servers_are_benchmarked() {
        let (addr, host) = loopback_addr("http://127.0.0.1:8080/").unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:8080");
        assert_eq!(host, "127.0.0.1:8080");
        assert_eq!(
            loopback_addr("localhost:9").unwrap().0.to_string(),
            "127.0.0.1:9"
        );
        assert_eq!(
            loopback_addr("http://[::1]:81").unwrap().0.to_string(),
            "[::1]:81"
        );
        assert!(loopback_addr("http://example.com:80").is_err());
        assert!(loopback_addr("http://10.0.0.1:8080").is_err());
    }

    #[test]
    fn setups_are_described() {
        assert_eq!(Setup::plain(true).describe(), "a server");
        let setup = Setup {
            isolated: false,
            flags: &["--no-snapshots"],
            config: Some("max_invocations = 1\n\nidle_timeout_sec = 5\n"),
        };
        assert_eq!(
            setup.describe(),
            "an unisolated (--insecure-no-isolation) server (--no-snapshots, nimbus.toml: \
             max_invocations = 1; idle_timeout_sec = 5)"
        );
    }
}
