//! API keys: `Authorization: Bearer <key>` on every route but `/health` and `/ready`.
//! With no key configured (allowed only on a loopback listener) every caller is `anonymous`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Who made a request: the name of the API key used, or `anonymous`.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// The configured keys. Each is `name:secret` or a bare secret (named `key1`, `key2`, …).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Arc<Vec<(String, String)>>,
}

impl ApiKeys {
    /// Parses keys from configuration; empty entries are ignored.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        let keys = entries
            .iter()
            .map(|e| e.as_ref().trim())
            .filter(|e| !e.is_empty())
            .enumerate()
            .map(|(i, entry)| match entry.split_once(':') {
                Some((name, secret)) if !name.is_empty() && !secret.is_empty() => {
                    (name.to_owned(), secret.to_owned())
                }
                _ => (format!("key{}", i + 1), entry.to_owned()),
            })
            .collect();
        ApiKeys {
            keys: Arc::new(keys),
        }
    }

    /// Whether authentication is off.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn name_of(&self, presented: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(_, secret)| constant_time_eq(secret.as_bytes(), presented.as_bytes()))
            .map(|(name, _)| name.as_str())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: checks the bearer key and records the caller.
pub async fn require_key(State(keys): State<ApiKeys>, mut req: Request, next: Next) -> Response {
    let caller = if keys.is_empty() {
        "anonymous".to_owned()
    } else {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented.and_then(|p| keys.name_of(p.trim())) {
            Some(name) => name.to_owned(),
            None => {
                let message = if presented.is_some() {
                    "the API key is not valid"
                } else {
                    "an API key is required: send Authorization: Bearer <key>"
                };
                return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
                    .into_response();
            }
        }
    };
    req.extensions_mut().insert(Caller(caller));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_named_and_matched_exactly() {
        let keys = ApiKeys::new(&["ci:s3cret", "plain", " "]);
        assert_eq!(keys.name_of("s3cret"), Some("ci"));
        assert_eq!(keys.name_of("plain"), Some("key2"));
        assert_eq!(keys.name_of("s3cre"), None);
        assert_eq!(keys.name_of(""), None);
        assert!(ApiKeys::new::<&str>(&[]).is_empty());
    }
}
