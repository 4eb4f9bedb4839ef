//! One accepted connection: HTTP/1.1 by hyper over the watched socket, ended by the
//! deadline its [`Activity`] names, by the client, or by a graceful shutdown.

use std::sync::Arc;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::activity::{Activity, Timeouts};
use super::io::WatchedStream;
use super::memory::Trimmer;
use super::metrics;
use super::service::{AppService, RequestLimits};

/// What every connection is served with, built once.
pub struct Shared {
    /// hyper's HTTP/1 settings (its own limits sit above [`RequestLimits`]).
    pub http: http1::Builder,
    /// The API.
    pub app: Router,
    /// Limits of each request.
    pub limits: Arc<RequestLimits>,
    /// Deadlines of the connection.
    pub timeouts: Timeouts,
    /// Counts connections for the allocator's trims.
    pub trimmer: Arc<Trimmer>,
}

/// An open connection: counted, and holding its place under the limit, until dropped.
struct Open {
    _place: OwnedSemaphorePermit,
    trimmer: Arc<Trimmer>,
}

impl Open {
    fn new(place: OwnedSemaphorePermit, trimmer: Arc<Trimmer>) -> Self {
        metrics::connection_opened();
        trimmer.opened();
        Open {
            _place: place,
            trimmer,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::connection_closed();
        self.trimmer.closed();
    }
}

/// Serves `stream` until the client leaves, a deadline passes, or a graceful shutdown
/// completes; `place` is its place under the connection limit.
pub async fn serve(
    stream: TcpStream,
    shared: Arc<Shared>,
    watcher: Watcher,
    place: OwnedSemaphorePermit,
) {
    let _open = Open::new(place, shared.trimmer.clone());
    // Answers are written whole; waiting for more to coalesce only delays them.
    let _ = stream.set_nodelay(true);
    let activity = Activity::new(shared.timeouts);
    let io = TokioIo::new(WatchedStream::new(stream, activity.clone()));
    let service = AppService::new(shared.app.clone(), shared.limits.clone(), activity.clone());
    let conn = watcher.watch(shared.http.serve_connection(io, service));
    tokio::pin!(conn);
    loop {
        let deadline = activity.deadline();
        let expiry = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        // The connection first: a deadline is judged only after hyper has had its turn
        // with what is ready (a response it can still flush is not cut off).
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = activity.changed() => {}
            () = expiry => {
                if let Some((at, why)) = activity.deadline() {
                    if at <= tokio::time::Instant::now() {
                        // Dropping the connection closes the socket.
                        metrics::timed_out(why);
                        return;
                    }
                }
            }
        }
    }
}
