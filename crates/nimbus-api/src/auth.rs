//! API keys: `Authorization: Bearer <key>` on every route but `/health` and `/ready`.
//! With no key configured (allowed only on a loopback listener) every caller is `anonymous`.
//!
//! A presented key is compared with every configured one as SHA-256 digests, in constant
//! time (`subtle`): neither how long the comparison takes nor which byte differs tells an
//! attacker anything about a key's contents or length. The scheme name is matched without
//! regard to case (RFC 7235: `bearer`, `BEARER` and `Bearer` are the same scheme).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use nimbus_core::ErrorCode;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who made a request: the name of the API key used, or `anonymous`.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// The configured keys. Each is `name:secret` or a bare secret (named `key1`, `key2`, …).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Arc<Vec<Key>>,
}

/// A configured key: its name and the SHA-256 digest of its secret (the secret itself is
/// not kept).
#[derive(Debug)]
struct Key {
    name: String,
    digest: [u8; 32],
}

impl ApiKeys {
    /// Parses keys from configuration; empty entries are ignored.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        let keys = entries
            .iter()
            .map(|e| e.as_ref().trim())
            .filter(|e| !e.is_empty())
            .enumerate()
            .map(|(i, entry)| {
                let (name, secret) = match entry.split_once(':') {
                    Some((name, secret)) if !name.is_empty() && !secret.is_empty() => {
                        (name.to_owned(), secret)
                    }
                    _ => (format!("key{}", i + 1), entry),
                };
                Key {
                    name,
                    digest: Sha256::digest(secret.as_bytes()).into(),
                }
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

    /// The name of the key `presented` is. Digests have one size whatever the key's, and
    /// every configured key is compared, each in constant time.
    fn name_of(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for key in self.keys.iter() {
            if bool::from(key.digest.ct_eq(&digest)) && found.is_none() {
                found = Some(key.name.as_str());
            }
        }
        found
    }
}

/// The credentials of an `Authorization: Bearer <key>` header; the scheme in any case.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
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
            .and_then(bearer);
        match presented.and_then(|p| keys.name_of(p)) {
            Some(name) => name.to_owned(),
            None => {
                let message = if presented.is_some() {
                    "the API key is not valid"
                } else {
                    "an API key is required: send Authorization: Bearer <key>"
                };
                return ApiError::new(ErrorCode::Unauthorized, message).into_response();
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
        assert_eq!(keys.name_of("s3cret\0"), None);
        assert_eq!(keys.name_of(&"s".repeat(10_000)), None);
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for header in [
            "Bearer k",
            "bearer k",
            "BEARER k",
            "bEaReR   k ",
            " Bearer k",
        ] {
            assert_eq!(bearer(header), Some("k"), "{header:?}");
        }
        for header in ["Basic k", "Bearerk", "Bearer", "Token k"] {
            assert_eq!(bearer(header), None, "{header:?}");
        }
    }
}
