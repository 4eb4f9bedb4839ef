//! The host↔worker wire format: frames of a u32 big-endian length followed by that many
//! bytes of JSON, one message per frame, over a Unix socket (or vsock for microVMs).
//!
//! Host → worker: `invoke {id, request_id, event, state, session_key}`, `ping {id}`,
//! `state_result {id, ok, value, version | error}`.
//! Worker → host: `ready {pid, runtime, init_ms}`, `init_error {error, logs}`,
//! `result {id, ok, body | error, logs, max_rss_kb}`, `pong {id}`, and, while it runs an
//! invocation, `state {id, op, scope, key, value, ttl, delta, version, pattern}` requests,
//! each answered by a `state_result` with the same id before the worker goes on.
//! Events, results and state values travel as raw JSON: the host validates them once and
//! never re-encodes.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts (an event or result of 6 MiB plus its envelope).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection before a whole frame arrived.
    #[error("connection closed")]
    Closed,
    /// The announced length is over [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// Any other I/O failure.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame's payload into `buf` (replacing its contents).
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await.map_err(closed_or_io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    buf.clear();
    buf.resize(len, 0);
    reader.read_exact(buf).await.map_err(closed_or_io)?;
    Ok(())
}

/// An end of stream as [`FrameError::Closed`], anything else as an I/O error.
fn closed_or_io(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

/// Serializes `message` as one frame into `buf` (replacing its contents) and writes it with one write.
pub async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(
    writer: &mut W,
    message: &M,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *buf, message).map_err(|e| FrameError::Io(e.into()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    writer.write_all(buf).await?;
    Ok(())
}

/// `invoke`: run the handler on `event`.
#[derive(Debug, Serialize)]
pub struct InvokeFrame<'a> {
    /// Always `"invoke"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Correlates the `result`.
    pub id: u64,
    /// The invocation's request id, exposed to the handler.
    pub request_id: &'a str,
    /// The event, raw JSON.
    pub event: &'a RawValue,
    /// Whether the function may use the state API.
    pub state: bool,
    /// The invocation's session key, if it came with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_key: Option<&'a str>,
}

/// `state_result`: the answer to a worker's `state` request.
#[derive(Debug, Serialize)]
pub struct StateResultFrame<'a> {
    /// Always `"state_result"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request's id.
    pub id: u64,
    /// Whether the operation succeeded.
    pub ok: bool,
    /// What it returned (a value, raw JSON; a number; a list of keys; a boolean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<&'a RawValue>,
    /// The value's version (`get_with_version`, `set`, `set_with_version`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a StateFailure>,
}

/// A failed state operation, as the worker raises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateFailure {
    /// Stable code (`value_too_large`, `state_conflict`, `state_unavailable`, …).
    pub code: String,
    /// What went wrong, naming the problem.
    pub message: String,
    /// The key's current version (`state_conflict`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

/// `ping`: liveness probe, answered by `pong` with the same id.
#[derive(Debug, Serialize)]
pub struct PingFrame {
    /// Always `"ping"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Echoed in the `pong`.
    pub id: u64,
}

/// An exception raised by user code, as reported by the worker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ErrorPayload {
    /// Exception class (`ValueError`).
    #[serde(rename = "type")]
    pub error_type: String,
    /// Its message.
    pub message: String,
    /// Formatted traceback.
    #[serde(default)]
    pub traceback: String,
}

/// Any worker → host message. One flat shape, because internally tagged enums cannot
/// carry borrowed raw JSON; [`WorkerMessage::kind`] tells which fields are set.
#[derive(Debug, Deserialize)]
pub struct WorkerMessage<'a> {
    /// `ready`, `init_error`, `result` or `pong`.
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// Correlation id (`result`, `pong`).
    #[serde(default)]
    pub id: Option<u64>,
    /// Worker pid (`ready`).
    #[serde(default)]
    pub pid: Option<u32>,
    /// Time the worker spent loading the handler, ms (`ready`).
    #[serde(default)]
    pub init_ms: Option<f64>,
    /// Whether the handler returned (`result`).
    #[serde(default)]
    pub ok: Option<bool>,
    /// The handler's return value, raw JSON (`result` with ok); a JSON `null` reads as `None`.
    #[serde(default, borrow)]
    pub body: Option<&'a RawValue>,
    /// The exception (`result` without ok, `init_error`).
    #[serde(default)]
    pub error: Option<ErrorPayload>,
    /// Captured stdout/stderr tail.
    #[serde(default)]
    pub logs: Option<String>,
    /// Peak RSS of the worker, KiB.
    #[serde(default)]
    pub max_rss_kb: Option<u64>,
    /// The operation (`state`): `get`, `set`, `delete`, `exists`, `keys`, `incr`, `expire`,
    /// `get_with_version`, `set_with_version`.
    #[serde(default)]
    pub op: Option<&'a str>,
    /// Whose state (`state`): `session`, `function` or `invocation`.
    #[serde(default)]
    pub scope: Option<&'a str>,
    /// The key (`state`); owned, since JSON may escape it.
    #[serde(default)]
    pub key: Option<String>,
    /// The value to write (`state` set), raw JSON; a JSON `null` reads as `None`, so a
    /// set without a value writes `null`.
    #[serde(default, borrow)]
    pub value: Option<&'a RawValue>,
    /// Time to live, seconds (`state` set, incr, expire).
    #[serde(default)]
    pub ttl: Option<f64>,
    /// What to add (`state` incr).
    #[serde(default)]
    pub delta: Option<i64>,
    /// The version the writer holds (`state` set_with_version).
    #[serde(default)]
    pub version: Option<u64>,
    /// The glob of `keys`.
    #[serde(default)]
    pub pattern: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_raw_json_is_kept_verbatim() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let event = RawValue::from_string(r#"{"k": [1, 2.50, "x"]}"#.into()).unwrap();
        let mut buf = Vec::new();
        let frame = InvokeFrame {
            kind: "invoke",
            id: 7,
            request_id: "inv_1",
            event: &event,
            state: false,
            session_key: None,
        };
        write_frame(&mut a, &frame, &mut buf).await.unwrap();
        let mut got = Vec::new();
        read_frame(&mut b, &mut got).await.unwrap();
        let text = std::str::from_utf8(&got).unwrap();
        assert_eq!(
            text,
            r#"{"type":"invoke","id":7,"request_id":"inv_1","event":{"k": [1, 2.50, "x"]},"state":false}"#
        );
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(MAX_FRAME_BYTES as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut b, &mut buf).await,
            Err(FrameError::TooLarge(_))
        ));

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&10u32.to_be_bytes()).await.unwrap();
        a.write_all(b"abc").await.unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&mut b, &mut buf).await,
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn worker_messages_parse_with_borrowed_bodies() {
        let text =
            r#"{"type":"result","id":3,"ok":true,"body":{"a":1},"logs":"hi\n","max_rss_kb":9000}"#;
        let m: WorkerMessage = serde_json::from_str(text).unwrap();
        assert_eq!(m.kind, "result");
        assert_eq!(m.body.unwrap().get(), r#"{"a":1}"#);
        assert_eq!(m.max_rss_kb, Some(9000));
    }
}
