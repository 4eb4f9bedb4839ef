//! Why a call failed: the server's error answer, or no usable answer at all.

use std::fmt;

/// The server's error answer: `{"error": {"code", "message"}}` with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The stable error code (`function_not_found`, …); `http_<status>` when the answer
    /// carried none.
    pub code: String,
    /// The server's message.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl ApiError {
    /// The error of an answer with `status` and (JSON) `body`, whatever it holds.
    pub fn from_answer(status: u16, body: &serde_json::Value) -> Self {
        let error = &body["error"];
        let text = |key: &str| error[key].as_str().map(str::to_owned);
        ApiError {
            status,
            code: text("code").unwrap_or_else(|| format!("http_{status}")),
            message: text("message")
                .unwrap_or_else(|| format!("the server answered {}", status_text(status))),
        }
    }
}

/// `404 Not Found`, as `reqwest::StatusCode` displays it.
fn status_text(status: u16) -> String {
    reqwest::StatusCode::from_u16(status)
        .map(|s| s.to_string())
        .unwrap_or_else(|_| status.to_string())
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// The server could not be reached, or the exchange broke off.
    #[error(
        "cannot reach the Nimbus server at {server} ({reason}). Is it running? Start one with \
         `nimbus server`, or point --server (or NIMBUS_SERVER) at it"
    )]
    Unreachable {
        /// The server URL tried.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// The server's answer is not the JSON expected.
    #[error("unexpected answer from {server} ({}, {problem}): {snippet}", status_text(*status))]
    Unexpected {
        /// The server URL.
        server: String,
        /// HTTP status of the answer.
        status: u16,
        /// What is wrong with it (`not JSON`, or the decoding error).
        problem: String,
        /// Its first 200 characters.
        snippet: String,
    },
    /// A name would address another resource (`.` or `..` as a path segment).
    #[error("{0:?} is not a valid name")]
    InvalidName(String),
    /// The server URL is not one the client can use.
    #[error("{0}")]
    InvalidServer(String),
    /// The request could not be built (e.g. a body that does not encode).
    #[error("{0}")]
    Request(String),
}

impl Error {
    /// The server's error answer, if that is what this is.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the server answered with this error code.
    pub fn has_code(&self, code: &str) -> bool {
        self.api().is_some_and(|e| e.code == code)
    }

    /// Whether the server answered with this HTTP status.
    pub fn has_status(&self, status: u16) -> bool {
        self.api().is_some_and(|e| e.status == status)
    }
}
