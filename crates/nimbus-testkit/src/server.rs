//! The harness of the HTTP end-to-end tests: the real `nimbus` binary (the test passes its
//! path, `env!("CARGO_BIN_EXE_nimbus")`) as a server on a free loopback port, on SQLite (a
//! file in a temporary directory) or on the real PostgreSQL (a schema of its own, dropped
//! afterwards), driven over HTTP as a user would: raw requests for tests of the wire, a
//! [`nimbus_client::Client`] for the rest.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nimbus_client::{CreatedFunction, NewFunction};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The PostgreSQL of the tests, unless `NIMBUS_TEST_DATABASE_URL` names another.
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The metadata store a test server runs on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// A SQLite file in the server's temporary directory.
    Sqlite,
    /// A schema of its own on the tests' PostgreSQL.
    Postgres,
}

/// The `nimbus` binary under test: what starts [`Server`]s.
#[derive(Clone, Copy, Debug)]
pub struct Nimbus {
    bin: &'static str,
}

impl Nimbus {
    /// The binary at `bin` (`env!("CARGO_BIN_EXE_nimbus")`).
    pub const fn at(bin: &'static str) -> Self {
        Nimbus { bin }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        Path::new(self.bin)
    }

    /// A server on `backend` with the defaults.
    pub async fn start(&self, backend: Backend) -> Server {
        self.start_with(backend, "", &[]).await
    }

    /// A server on `backend` with `toml` as its `nimbus.toml` and more arguments.
    pub async fn start_with(&self, backend: Backend, toml: &str, args: &[&str]) -> Server {
        Server::start_with(self.path(), backend, toml, args).await
    }

    /// A server on the metadata store at `database_url` (owning `schema`, dropped with it),
    /// its data in `dir`.
    pub async fn start_on(
        &self,
        dir: tempfile::TempDir,
        database_url: String,
        schema: Option<String>,
        toml: &str,
        args: &[&str],
    ) -> Server {
        Server::start_on(self.path(), dir, database_url, schema, toml, args).await
    }
}

/// A `nimbus server` child, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    /// The binary it runs.
    pub bin: PathBuf,
    /// The server process.
    pub child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A plain HTTP client, for tests of the wire.
    pub http: reqwest::Client,
    /// Its data directory (and `nimbus.toml`).
    pub dir: tempfile::TempDir,
    /// Its metadata store.
    pub database_url: String,
    /// The PostgreSQL schema it owns, dropped with it.
    pub schema: Option<String>,
    /// The API key clients present, if it has one (`--api-key name:secret`).
    pub key: Option<String>,
    /// The server's arguments, given again at a restart.
    pub args: Vec<String>,
}

/// The tests' PostgreSQL: `NIMBUS_TEST_DATABASE_URL`, else [`PG_URL`].
fn pg_url() -> String {
    std::env::var("NIMBUS_TEST_DATABASE_URL").unwrap_or_else(|_| PG_URL.into())
}

/// Runs `sql` on the tests' PostgreSQL.
pub fn psql(sql: &str) {
    let url = pg_url();
    let out = Command::new("psql")
        .args([url.as_str(), "-qAtc", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Server {
    async fn start_with(bin: &Path, backend: Backend, toml: &str, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (database_url, schema) = match backend {
            Backend::Sqlite => (
                format!("sqlite:{}", dir.path().join("nimbus.db").display()),
                None,
            ),
            Backend::Postgres => {
                let schema = format!(
                    "nimbus_e2e_{}",
                    ulid::Ulid::new().to_string().to_lowercase()
                );
                psql(&format!("create schema {schema}"));
                (
                    format!("{}?options=-c%20search_path%3D{schema}", pg_url()),
                    Some(schema),
                )
            }
        };
        Self::start_on(bin, dir, database_url, schema, toml, args).await
    }

    async fn start_on(
        bin: &Path,
        dir: tempfile::TempDir,
        database_url: String,
        schema: Option<String>,
        toml: &str,
        args: &[&str],
    ) -> Server {
        std::fs::write(dir.path().join("nimbus.toml"), toml).unwrap();
        let mut server = Server {
            bin: bin.to_owned(),
            child: Command::new("true").spawn().unwrap(),
            base: String::new(),
            http: reqwest::Client::new(),
            dir,
            database_url,
            schema,
            // `--api-key name:secret`: clients present the secret.
            key: args
                .windows(2)
                .find(|w| w[0] == "--api-key")
                .map(|w| w[1].rsplit(':').next().unwrap_or_default().to_owned()),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.spawn(args).await;
        server
    }

    /// A second server on the same metadata database (its own data directory), as another
    /// node of a fleet. The schema stays owned by `self`.
    pub async fn start_peer(&self) -> Server {
        self.start_peer_with("", &[]).await
    }

    /// [`Server::start_peer`] with its own `nimbus.toml` and arguments.
    pub async fn start_peer_with(&self, toml: &str, args: &[&str]) -> Server {
        let mut peer = Server {
            bin: self.bin.clone(),
            child: Command::new("true").spawn().unwrap(),
            base: String::new(),
            http: reqwest::Client::new(),
            dir: tempfile::tempdir().unwrap(),
            database_url: self.database_url.clone(),
            schema: None,
            key: self.key.clone(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        std::fs::write(peer.dir.path().join("nimbus.toml"), toml).unwrap();
        peer.spawn(args).await;
        peer
    }

    /// Starts the server on a port the kernel picks and waits until it answers.
    pub async fn spawn(&mut self, args: &[&str]) {
        self.child = Command::new(&self.bin)
            .arg("server")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--database-url")
            .arg(&self.database_url)
            // New instances start cold here, as the tests of pools and routing expect; the
            // snapshot tests turn snapshots on with `--snapshots`.
            .args(if args.contains(&"--snapshots") {
                None
            } else {
                Some("--no-snapshots")
            })
            .args(args.iter().filter(|a| **a != "--snapshots"))
            .env("NIMBUS_LOG", "warn")
            .env_remove("NIMBUS_API_KEYS")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The server prints the address it bound; reading it (rather than picking a free
        // port first) cannot race with another test for the same port.
        let stdout = self.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("Nimbus is listening on ") {
                    if !sent {
                        let _ = tx.send(url.to_owned());
                        sent = true;
                    }
                }
            }
        });
        self.base = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the server did not report its address within 30 s");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(format!("{}/health", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not come up");
    }

    /// SIGTERM, wait for a clean exit, start again on the same data.
    pub async fn restart(&mut self) {
        self.stop_cleanly();
        self.start_again().await;
    }

    /// SIGTERM and wait for a clean exit ([`Server::start_again`] brings it back).
    pub fn stop_cleanly(&mut self) {
        let pid = self.child.id() as i32;
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
    }

    /// Starts the server again on the same data, with the same arguments.
    pub async fn start_again(&mut self) {
        let args = self.args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&args).await;
    }

    /// A typed API client of this server, with its key.
    pub fn client(&self) -> nimbus_client::Client {
        nimbus_client::Client::new(&self.base, self.key.clone()).expect("a client of the server")
    }

    /// `{base}/api/v1{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    /// `req` with the server's key, if it has one.
    pub fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    /// `method /api/v1{path}` with an optional JSON body: the status and the JSON answer
    /// (its text as a JSON string if it is not JSON).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = self.http.request(method.parse().unwrap(), self.url(path));
        let req = match body {
            Some(b) => req.json(&b),
            None => req,
        };
        let resp = self.auth(req).send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Invokes `function` `n` times at once with `event`: each must succeed as a new
    /// instance started from the version's template. Returns how many instances served.
    pub async fn burst_of_template_starts(&self, function: &str, n: usize, event: &str) -> usize {
        let calls = (0..n).map(|_| self.invoke_raw(function, "", event));
        let mut instances = std::collections::HashSet::new();
        for (status, r) in futures::future::join_all(calls).await {
            assert_eq!(status, StatusCode::OK, "{r}");
            assert_eq!(r["start_type"], "template", "{r}");
            instances.insert(r["instance_id"].as_str().unwrap().to_owned());
        }
        instances.len()
    }

    /// `POST /api/v1/functions/{function}/invoke{query}` with `body` as it is.
    pub async fn invoke_raw(&self, function: &str, query: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .auth(
                self.http
                    .post(self.url(&format!("/functions/{function}/invoke{query}"))),
            )
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap())
    }

    /// Runs `nimbus <args>` (the CLI) against this server; its stdout, which it must
    /// succeed to give.
    pub async fn cli(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(&self.bin)
            .args(args)
            .env("NIMBUS_SERVER", &self.base)
            .env_remove("NIMBUS_API_KEY")
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "nimbus {args:?}: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Creates function `name` from `code` with the `extra` fields of `POST /functions`
    /// (through the typed client: a field it does not know fails the test); the answer.
    pub async fn deploy(&self, name: &str, code: &str, extra: Value) -> CreatedFunction {
        let mut fields = json!({ "name": name, "code": code });
        fields
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        let new: NewFunction = serde_json::from_value(fields)
            .unwrap_or_else(|e| panic!("deploying {name}: not fields of a new function: {e}"));
        self.client()
            .create_function(&new)
            .await
            .unwrap_or_else(|e| panic!("deploying {name}: {e}"))
    }
}

/// Stops a server as an operator would (SIGTERM), so it removes its sandboxes' cgroups;
/// SIGKILL if it has not exited within 5 s.
pub fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
        if let Some(schema) = &self.schema {
            psql(&format!("drop schema if exists {schema} cascade"));
        }
    }
}

/// A zip archive of `files` (path, contents), base64-encoded as `code_archive` takes it.
pub fn zip_base64(files: &[(&str, &str)]) -> String {
    use base64::Engine as _;
    use std::io::Write as _;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, body) in files {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(body.as_bytes()).unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(zip.finish().unwrap().into_inner())
}

/// The `error.code` of an error answer (empty if none).
pub fn code_of(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

/// One `#[tokio::test]` per backend for each scenario `async fn(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await })+
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await })+
        }
    };
}
