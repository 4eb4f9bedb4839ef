//! The HTTP front of `nimbus server`: the accept loop, the connection limit, and each
//! connection served by hyper's HTTP/1.1 with deadlines and bounded memory.
//!
//! Every limit here is in docs/LIMITS.md:
//! - at most `max_connections` connections are served at once; one more is answered 503
//!   `too_many_connections` (with `Retry-After`) and closed, so the process never runs out
//!   of file descriptors and a client at the limit learns why instead of hanging;
//! - each connection has a header, keep-alive and stall timeout ([`activity`]);
//! - a request head over `max_uri_bytes`, `max_header_bytes` or `max_headers` is answered
//!   414/431 in the API's error shape ([`service`]); hyper's own parser stops at twice
//!   those, which bounds the memory a connection can make the server hold;
//! - a request body the answer leaves unread is read and discarded, within bounds, so the
//!   client can finish sending and read the answer ([`drain`]);
//! - the memory of closed connections goes back to the system ([`memory`]).

mod activity;
mod connection;
mod drain;
mod io;
mod memory;
mod metrics;
mod service;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use hyper::server::conn::http1;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use activity::Timeouts;
pub use service::RequestLimits;

use connection::Shared;
use memory::Trimmer;

/// The HTTP front's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Connections served at once.
    pub max_connections: usize,
    /// Deadlines of each connection.
    pub timeouts: Timeouts,
    /// Limits of each request.
    pub limits: RequestLimits,
}

/// Longest wait of each step of a refusal (see [`answer_refusal`]).
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Refusals answered in a task at once, for a limit of `max_connections`: beyond, a
/// refused connection is answered at best and closed at once (see [`refuse`]).
pub fn lingering_refusals(max_connections: usize) -> usize {
    (max_connections / 16).clamp(16, 1024)
}

/// The server while it accepts connections.
pub struct Serving {
    stop: oneshot::Sender<()>,
    accepting: JoinHandle<GracefulShutdown>,
}

/// Starts serving `app` on `listener`.
pub fn start(listener: TcpListener, app: Router, settings: &Settings) -> Serving {
    metrics::describe();
    let mut http = http1::Builder::new();
    // hyper's parser refuses (with an empty 431) only heads at twice the limits that
    // `RequestLimits` answers in JSON: its buffer is the memory a connection can pin.
    let head = 2 * (settings.limits.max_uri_bytes + settings.limits.max_header_bytes);
    http.max_buf_size(head.max(8192))
        .max_header_size(head)
        .max_headers(2 * settings.limits.max_headers)
        // Deadlines are the connection task's (see `activity`): hyper's would also cut
        // idle kept-alive connections at the header timeout.
        .header_read_timeout(None)
        .keep_alive(!settings.timeouts.keepalive.is_zero());
    let trimmer = Arc::new(Trimmer::default());
    tokio::spawn(trimmer.clone().run());
    let shared = Arc::new(Shared {
        http,
        app,
        limits: Arc::new(settings.limits.clone()),
        timeouts: settings.timeouts,
        trimmer,
    });
    let refusal = refusal(settings.max_connections);
    let (stop, stopped) = oneshot::channel();
    let accepting = tokio::spawn(accept_loop(
        listener,
        shared,
        settings.max_connections,
        refusal,
        stopped,
    ));
    Serving { stop, accepting }
}

impl Serving {
    /// Stops accepting; open connections finish the request they are in (idle ones close
    /// at once). Waits for them at most `bound`: the rest close with the process.
    pub async fn stop(self, bound: Duration) {
        let _ = self.stop.send(());
        let Ok(graceful) = self.accepting.await else {
            return;
        };
        tracing::info!(open = graceful.count(), "closing client connections");
        if tokio::time::timeout(bound, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("some requests did not finish within {bound:?}; they are cut short");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    refusal: Bytes,
    mut stop: oneshot::Receiver<()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let places = Arc::new(Semaphore::new(max_connections));
    let lingering = Arc::new(Semaphore::new(lingering_refusals(max_connections)));
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => match places.clone().try_acquire_owned() {
                Ok(place) => {
                    let watcher = graceful.watcher();
                    tokio::spawn(connection::serve(stream, shared.clone(), watcher, place));
                }
                Err(_) => refuse(stream, &refusal, &lingering),
            },
            Err(e) => errors.failed(e).await,
        }
    }
    graceful
}

/// The answer at the connection limit, built once.
fn refusal(max_connections: usize) -> Bytes {
    let body = serde_json::json!({
        "error": {
            "code": nimbus_core::ErrorCode::TooManyConnections,
            "message": format!(
                "the server has {max_connections} connections open, its limit; retry later"
            ),
        }
    })
    .to_string();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        nimbus_api::error::RETRY_AFTER_SECS,
        body.len()
    ))
}

/// Answers a connection over the limit and closes it, in a task of its own while few
/// refusals are in progress (each holds a descriptor for up to 3 × [`REFUSAL_LINGER`]);
/// beyond, the answer is written at once if the socket takes it, and the socket closed.
fn refuse(stream: TcpStream, refusal: &Bytes, lingering: &Arc<Semaphore>) {
    metrics::refused();
    match lingering.clone().try_acquire_owned() {
        Ok(place) => {
            let refusal = refusal.clone();
            tokio::spawn(async move {
                answer_refusal(stream, &refusal).await;
                drop(place);
            });
        }
        Err(_) => {
            let _ = stream.try_write(refusal);
        }
    }
}

/// Reads what the client sends first (a client does not expect an answer before its
/// request), answers, and reads on until the client closes: closing with unread request
/// bytes would reset the connection, and a reset can destroy the answer before the client
/// reads it. Each step is bounded by [`REFUSAL_LINGER`].
async fn answer_refusal(mut stream: TcpStream, refusal: &[u8]) {
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(REFUSAL_LINGER, stream.read(&mut sink)).await;
    if let Ok(Ok(())) = tokio::time::timeout(REFUSAL_LINGER, stream.write_all(refusal)).await {
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            while let Ok(1..) = stream.read(&mut sink).await {}
        })
        .await;
    }
}

/// Failed accepts: logged at most every 10 s, each followed by a short pause, since the
/// usual causes (no descriptor or memory left) do not clear at once.
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    async fn failed(&mut self, e: std::io::Error) {
        use std::io::ErrorKind;
        // The client gave up before the accept: nothing is wrong here.
        if matches!(
            e.kind(),
            ErrorKind::ConnectionAborted
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionRefused
        ) {
            return;
        }
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|t| now - t >= Duration::from_secs(10))
        {
            tracing::error!(error = %e, repeated = self.unlogged, "accepting a connection failed");
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Raises the soft limit of open files to the hard limit (connections, instances and
/// stores all take descriptors) and returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    // An unlimited hard limit still stops at the kernel's per-process ceiling.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard);
    let target = hard.min(ceiling);
    if soft < target && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        tracing::info!("open files: soft limit raised from {soft} to {target}");
        return target;
    }
    soft
}

/// The default connection limit: half the open files go to client connections (1/16 of
/// that half to refusals being answered), the rest stays for instances, sandboxes,
/// templates and the stores; at most 10,000.
pub fn default_max_connections(open_files: u64) -> usize {
    let half = usize::try_from(open_files / 2).unwrap_or(usize::MAX);
    (half - half / 16).clamp(16, 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limit_leaves_room_for_everything_else() {
        assert_eq!(default_max_connections(1024), 480);
        assert_eq!(default_max_connections(20_000), 9_375);
        assert_eq!(default_max_connections(1 << 20), 10_000);
        for files in [256, 1024, 4096, 20_000, 65_536, 1 << 20] {
            let http = default_max_connections(files);
            assert!(
                (http + lingering_refusals(http)) as u64 <= files / 2 + 16,
                "{files}"
            );
        }
    }

    #[test]
    fn the_refusal_is_a_complete_json_answer() {
        let text = String::from_utf8(refusal(50).to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("retry-after: 1\r\n"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}
