//! The application as one connection's hyper service: request heads over the limits are
//! answered here in the API's error shape (so hyper's own empty 414/431 stay out of
//! reach), request bodies get a stall timeout and are discarded where the answer leaves
//! them unread ([`DrainedBody`]), and the end of each response is reported to the
//! connection's [`Activity`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, Uri};
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use nimbus_api::error::ApiError;
use nimbus_core::ErrorCode;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use super::activity::{Activity, RequestGuard};
use super::drain::DrainedBody;

/// Limits of one request, checked before the application sees it.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Longest request target (path and query), bytes: 414 `uri_too_long` beyond.
    pub max_uri_bytes: usize,
    /// Most bytes of header fields (name, value and 4 bytes of `: ` and CRLF each):
    /// 431 `headers_too_large` beyond.
    pub max_header_bytes: usize,
    /// Most header fields: 431 `headers_too_large` beyond.
    pub max_headers: usize,
    /// Longest wait for the next part of a request body: 408 `request_timeout`.
    pub body_stall: Duration,
}

impl RequestLimits {
    /// The refusal of a request whose head breaks a limit.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), ApiError> {
        let target = target_len(req.uri());
        if target > self.max_uri_bytes {
            return Err(ApiError::new(
                ErrorCode::UriTooLong,
                format!(
                    "the request target is {target} bytes; the limit is {} bytes",
                    self.max_uri_bytes
                ),
            ));
        }
        let headers = req.headers();
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if headers.len() > self.max_headers || bytes > self.max_header_bytes {
            return Err(ApiError::new(
                ErrorCode::HeadersTooLarge,
                format!(
                    "the request has {} header fields of {bytes} bytes; the limits are {} \
                     fields and {} bytes",
                    headers.len(),
                    self.max_headers,
                    self.max_header_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// Length of the request target as it was sent (origin form, or absolute form with its
/// scheme and authority).
fn target_len(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// The application serving one connection.
#[derive(Clone)]
pub struct AppService {
    app: Router,
    limits: Arc<RequestLimits>,
    activity: Arc<Activity>,
}

impl AppService {
    /// `app` behind `limits`, reporting to `activity`.
    pub fn new(app: Router, limits: Arc<RequestLimits>, activity: Arc<Activity>) -> Self {
        AppService {
            app,
            limits,
            activity,
        }
    }
}

type Answer = Result<Response<TrackedBody>, Infallible>;

impl hyper::service::Service<Request<Incoming>> for AppService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.request_started();
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        // Whatever of the body the answer leaves unread is read and discarded meanwhile.
        let req = req.map(|body| DrainedBody::new(body, expects_continue));
        if let Err(refusal) = self.limits.check(&req) {
            drop(req);
            let mut response = refusal.into_response();
            // A head over the limits ends the connection (once its body is discarded).
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Box::pin(std::future::ready(Ok(TrackedBody::wrap(response, guard))));
        }
        let stall = self.limits.body_stall;
        let req = req.map(|body| Body::new(TimeoutBody::new(stall, body)));
        let app = self.app.clone();
        Box::pin(async move {
            let response = app.oneshot(req).await?;
            Ok(TrackedBody::wrap(response, guard))
        })
    }
}

/// A response body that tells the connection its request is over when it is finished (or
/// dropped unfinished).
pub struct TrackedBody {
    body: Body,
    _guard: RequestGuard,
}

impl TrackedBody {
    fn wrap(response: Response<Body>, guard: RequestGuard) -> Response<TrackedBody> {
        response.map(|body| TrackedBody {
            body,
            _guard: guard,
        })
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            max_uri_bytes: 20,
            max_header_bytes: 40,
            max_headers: 3,
            body_stall: Duration::from_secs(1),
        }
    }

    fn code(result: Result<(), ApiError>) -> Option<(u16, &'static str)> {
        result.err().map(|e| (e.status.as_u16(), e.code.as_str()))
    }

    #[test]
    fn heads_over_the_limits_are_refused_with_a_code() {
        let ok = Request::get("/api/v1/functions").body(()).unwrap();
        assert_eq!(code(limits().check(&ok)), None);
        let long = Request::get("/api/v1/functions?x=123").body(()).unwrap();
        assert_eq!(code(limits().check(&long)), Some((414, "uri_too_long")));
        let absolute = Request::get("http://example.com/ab").body(()).unwrap();
        assert_eq!(code(limits().check(&absolute)), Some((414, "uri_too_long")));
        // 3 fields of 10 bytes each (6 + 0 + 4): within both limits.
        let mut req = Request::get("/").body(()).unwrap();
        for name in ["x-aaaa", "x-bbbb", "x-cccc"] {
            req.headers_mut().append(name, HeaderValue::from_static(""));
        }
        assert_eq!(code(limits().check(&req)), None);
        req.headers_mut()
            .append("x-aaaa", HeaderValue::from_static(""));
        assert_eq!(code(limits().check(&req)), Some((431, "headers_too_large")));
        let mut big = Request::get("/").body(()).unwrap();
        big.headers_mut().insert(
            "x-big",
            HeaderValue::from_static("0123456789012345678901234567890123"),
        );
        assert_eq!(code(limits().check(&big)), Some((431, "headers_too_large")));
    }
}
