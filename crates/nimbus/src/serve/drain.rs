//! Request bodies left unread when their answer is ready (a 414/431 refused by its head, a
//! 401, 404 or 413 answered before the body): read to their end and discarded, within
//! bounds, while the answer goes out.
//!
//! hyper stops reading a body nobody wants and closes the connection after the answer, and
//! closing a socket with request bytes unread resets it: a client that sends its whole
//! request before it reads, as many do, then fails in the middle of its write (EPIPE,
//! ECONNRESET) and never sees the answer. Read on instead, the client finishes sending,
//! reads the answer, and a kept-alive connection serves its next request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use nimbus_core::limits::MAX_API_BODY_BYTES;

/// Most bytes of an unread body read and discarded: the largest body any route takes, so
/// a request refused for something else gets its answer whatever its size. A body declared
/// longer is not read at all.
const MAX_DRAIN_BYTES: u64 = MAX_API_BODY_BYTES as u64;

/// Longest wait for the next part of a body being discarded (as [`super::REFUSAL_LINGER`]:
/// a client that stops sending gets no more time than a refused connection).
const DRAIN_STALL: Duration = super::REFUSAL_LINGER;

/// A request body that, dropped before its end, is read to its end in a task of its own.
pub struct DrainedBody {
    inner: Option<Incoming>,
    /// Read from at least once (for a request with `Expect: 100-continue`, hyper has then
    /// invited the body).
    polled: bool,
    /// Ended or failed: nothing left to read.
    finished: bool,
    /// The client waits for `100 Continue` before it sends the body.
    expects_continue: bool,
}

impl DrainedBody {
    /// Wraps `body`, of a request that does (or does not) carry `Expect: 100-continue`.
    pub fn new(body: Incoming, expects_continue: bool) -> Self {
        DrainedBody {
            inner: Some(body),
            polled: false,
            finished: false,
            expects_continue,
        }
    }

    /// The unread rest of the body, if it is worth reading: not ended, not a body the
    /// client has not been asked for (reading it would send `100 Continue` after the
    /// answer), not declared longer than [`MAX_DRAIN_BYTES`].
    fn unread(&mut self) -> Option<Incoming> {
        let body = self.inner.take()?;
        let unasked = self.expects_continue && !self.polled;
        let worth = !self.finished
            && !body.is_end_stream()
            && !unasked
            && body.size_hint().lower() <= MAX_DRAIN_BYTES;
        worth.then_some(body)
    }
}

impl Body for DrainedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(body) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        this.polled = true;
        let polled = Pin::new(body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.finished = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for DrainedBody {
    fn drop(&mut self) {
        let Some(body) = self.unread() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(body));
        }
    }
}

/// Reads `body` to its end, at most [`MAX_DRAIN_BYTES`] and [`DRAIN_STALL`] per part; then
/// dropping it lets hyper finish the connection.
async fn discard(mut body: Incoming) {
    let mut left = MAX_DRAIN_BYTES;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(DRAIN_STALL, body.frame()).await {
        let size = frame.data_ref().map_or(0, |data| data.len() as u64);
        match left.checked_sub(size) {
            Some(rest) => left = rest,
            None => return,
        }
    }
}
