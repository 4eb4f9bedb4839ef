//! The host's end of one worker connection.
//!
//! A connection serves one invocation at a time: the caller holds `&mut WorkerConn` for the
//! whole exchange, so no background reader or channel sits on the hot path. A future dropped
//! mid-exchange (a timeout) leaves the connection in an unknown state: the caller must then
//! discard the instance.

use serde_json::value::RawValue;
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::protocol::{
    read_frame, write_frame, ErrorPayload, FrameError, InvokeFrame, PingFrame, StateFailure,
    StateResultFrame, WorkerMessage, MAX_FRAME_BYTES,
};

/// A worker that could not serve.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The worker closed the connection (it exited or crashed).
    #[error("worker closed the connection")]
    Closed,
    /// The handler could not be loaded (import error, missing handler, init raised).
    #[error("{}: {}", .error.error_type, .error.message)]
    Init {
        /// The exception.
        error: ErrorPayload,
        /// What the code printed while loading.
        logs: String,
    },
    /// The worker broke the protocol (bad JSON, unexpected message, oversized frame).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Socket failure.
    #[error("socket error: {0}")]
    Io(std::io::Error),
}

impl From<FrameError> for WorkerError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Closed => WorkerError::Closed,
            FrameError::TooLarge(_) => WorkerError::Protocol(e.to_string()),
            FrameError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                WorkerError::Closed
            }
            FrameError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => {
                WorkerError::Closed
            }
            FrameError::Io(io) => WorkerError::Io(io),
        }
    }
}

/// The worker's greeting once its handler is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Ready {
    /// Worker pid as the worker sees it (differs from the host's view inside a pid namespace).
    pub pid: u32,
    /// Milliseconds the worker spent importing and initializing the handler.
    pub init_ms: f64,
}

/// What one invocation produced.
#[derive(Debug)]
pub struct InvokeOutcome {
    /// The handler's return value (raw JSON), or the exception it raised.
    pub result: Result<Box<RawValue>, ErrorPayload>,
    /// Tail of what the handler printed.
    pub logs: String,
    /// Peak RSS of the worker process, KiB.
    pub max_rss_kb: Option<u64>,
}

/// One state operation a worker asked for during an invocation; the host checks the
/// operation and its arguments.
#[derive(Debug, Clone)]
pub struct StateRequest {
    /// `get`, `set`, `delete`, `exists`, `keys`, `incr`, `expire`, `get_with_version`,
    /// `set_with_version`.
    pub op: String,
    /// `session`, `function` or `invocation`.
    pub scope: String,
    /// The key (every operation but `keys`).
    pub key: Option<String>,
    /// The value to write, raw JSON.
    pub value: Option<Box<RawValue>>,
    /// Time to live, seconds.
    pub ttl: Option<f64>,
    /// What `incr` adds.
    pub delta: Option<i64>,
    /// The version a `set_with_version` holds.
    pub version: Option<u64>,
    /// The glob of `keys`.
    pub pattern: Option<String>,
}

/// What a state operation returned.
#[derive(Debug, Clone)]
pub struct StateAnswer {
    /// A value (raw JSON): the stored value, a number, a list of keys, a boolean; `None`
    /// for nothing (a missing key).
    pub value: Option<Box<RawValue>>,
    /// The value's version, for the operations that report one.
    pub version: Option<u64>,
}

/// The host side of the state API for one invocation: answers the worker's requests.
pub trait StateCalls: Send {
    /// Whether the function may use the state API (the worker then gives the handler a
    /// live `state`).
    fn enabled(&self) -> bool;

    /// The invocation's session key, if it has one.
    fn session_key(&self) -> Option<&str>;

    /// Runs one request.
    fn call(
        &mut self,
        request: StateRequest,
    ) -> impl std::future::Future<Output = Result<StateAnswer, StateFailure>> + Send;
}

/// The state of a function without state: every request fails with `state_not_enabled`
/// (the worker does not send any).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stateless;

impl StateCalls for Stateless {
    fn enabled(&self) -> bool {
        false
    }

    fn session_key(&self) -> Option<&str> {
        None
    }

    async fn call(&mut self, _: StateRequest) -> Result<StateAnswer, StateFailure> {
        Err(StateFailure {
            code: "state_not_enabled".into(),
            message: "state is not enabled for this function".into(),
            current_version: None,
        })
    }
}

/// The host's end of a worker connection.
#[derive(Debug)]
pub struct WorkerConn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
    next_id: u64,
}

impl WorkerConn {
    /// Wraps the host end of a freshly started worker's socket.
    pub fn new(stream: UnixStream) -> Self {
        let (read, write) = stream.into_split();
        WorkerConn {
            reader: BufReader::with_capacity(64 * 1024, read),
            writer: write,
            read_buf: Vec::with_capacity(4096),
            write_buf: Vec::with_capacity(4096),
            next_id: 1,
        }
    }

    /// Waits for the worker's `ready` (or `init_error`).
    pub async fn handshake(&mut self) -> Result<Ready, WorkerError> {
        read_frame(&mut self.reader, &mut self.read_buf).await?;
        greeting(parse(&self.read_buf)?)
    }

    /// The connection's stream back, after a template's handshake: the driver speaks to a
    /// template from then on. An error if the worker sent more than its greeting.
    pub fn into_stream(self) -> Result<UnixStream, WorkerError> {
        if !self.reader.buffer().is_empty() {
            return Err(WorkerError::Protocol(
                "the template sent data after its greeting".into(),
            ));
        }
        self.reader
            .into_inner()
            .reunite(self.writer)
            .map_err(|e| WorkerError::Protocol(e.to_string()))
    }

    /// Runs one invocation of a function without state and waits for its result.
    pub async fn invoke(
        &mut self,
        request_id: &str,
        event: &RawValue,
    ) -> Result<InvokeOutcome, WorkerError> {
        self.invoke_with_state(request_id, event, &mut Stateless)
            .await
    }

    /// Runs one invocation and waits for its result, answering the worker's state requests
    /// with `state` meanwhile.
    pub async fn invoke_with_state<S: StateCalls>(
        &mut self,
        request_id: &str,
        event: &RawValue,
        state: &mut S,
    ) -> Result<InvokeOutcome, WorkerError> {
        let id = self.take_id();
        let frame = InvokeFrame {
            kind: "invoke",
            id,
            request_id,
            event,
            state: state.enabled(),
            session_key: state.session_key(),
        };
        write_frame(&mut self.writer, &frame, &mut self.write_buf).await?;
        let msg = loop {
            read_frame(&mut self.reader, &mut self.read_buf).await?;
            let msg = parse(&self.read_buf)?;
            if msg.kind != "state" {
                break msg;
            }
            let (request_id, request) = state_request(&msg)?;
            let answer = state.call(request).await;
            let (value, version, error) = match &answer {
                Ok(a) => (a.value.as_deref(), a.version, None),
                Err(failure) => (None, None, Some(failure)),
            };
            let reply = StateResultFrame {
                kind: "state_result",
                id: request_id,
                ok: answer.is_ok(),
                value,
                version,
                error,
            };
            write_frame(&mut self.writer, &reply, &mut self.write_buf).await?;
        };
        if msg.kind != "result" || msg.id != Some(id) {
            return Err(WorkerError::Protocol(format!(
                "expected result {id}, got {:?} {:?}",
                msg.kind, msg.id
            )));
        }
        let result = match (msg.ok, msg.body, msg.error) {
            // A `null` body deserializes as `None`: the handler returned None/null.
            (Some(true), body, _) => Ok(body.map_or_else(json_null, RawValue::to_owned)),
            (Some(false), _, Some(error)) => Err(error),
            _ => return Err(WorkerError::Protocol("result without body or error".into())),
        };
        Ok(InvokeOutcome {
            result,
            logs: msg.logs.unwrap_or_default(),
            max_rss_kb: msg.max_rss_kb,
        })
    }

    /// Round-trips a `ping`.
    pub async fn ping(&mut self) -> Result<(), WorkerError> {
        let id = self.take_id();
        write_frame(
            &mut self.writer,
            &PingFrame { kind: "ping", id },
            &mut self.write_buf,
        )
        .await?;
        read_frame(&mut self.reader, &mut self.read_buf).await?;
        let msg = parse(&self.read_buf)?;
        if msg.kind == "pong" && msg.id == Some(id) {
            Ok(())
        } else {
            Err(WorkerError::Protocol(format!(
                "expected pong {id}, got {:?}",
                msg.kind
            )))
        }
    }

    /// A fresh message id.
    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

/// A `state` message as a [`StateRequest`], with its id.
fn state_request(msg: &WorkerMessage<'_>) -> Result<(u64, StateRequest), WorkerError> {
    let missing = |field: &str| WorkerError::Protocol(format!("state request without {field}"));
    Ok((
        msg.id.ok_or_else(|| missing("id"))?,
        StateRequest {
            op: msg.op.ok_or_else(|| missing("op"))?.to_owned(),
            scope: msg.scope.ok_or_else(|| missing("scope"))?.to_owned(),
            key: msg.key.clone(),
            value: msg.value.map(RawValue::to_owned),
            ttl: msg.ttl,
            delta: msg.delta,
            version: msg.version,
            pattern: msg.pattern.clone(),
        },
    ))
}

/// JSON `null`.
fn json_null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

/// What a worker's first message says: ready, or why its handler did not load.
fn greeting(msg: WorkerMessage<'_>) -> Result<Ready, WorkerError> {
    match msg.kind {
        "ready" => Ok(Ready {
            pid: msg.pid.unwrap_or(0),
            init_ms: msg.init_ms.unwrap_or(0.0),
        }),
        "init_error" => Err(WorkerError::Init {
            error: msg.error.unwrap_or_else(|| ErrorPayload {
                error_type: "InitError".into(),
                message: "the worker reported an init error without details".into(),
                traceback: String::new(),
            }),
            logs: msg.logs.unwrap_or_default(),
        }),
        other => Err(WorkerError::Protocol(format!(
            "expected ready, got {other:?}"
        ))),
    }
}

/// Waits for the greeting of the worker on `stream` and reads it without taking it off the
/// socket, so that the [`WorkerConn::handshake`] of whoever uses the worker later gets it
/// at once: a worker started ahead of its use is known to be ready (or not) by then.
///
/// A `ready` is small and always fits the socket's buffer. A greeting longer than
/// [`PEEK_LIMIT`] (an `init_error` with a long message and logs may be over the buffer,
/// and its writer waits until it is read) is read off instead: the worker is of no use
/// then, whatever it says.
pub async fn peek_greeting(stream: &UnixStream) -> Result<Ready, WorkerError> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 4096];
    loop {
        let readiness = stream
            .ready(tokio::io::Interest::READABLE)
            .await
            .map_err(WorkerError::Io)?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: `buf` is valid for writes of its length; the fd is the stream's own.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK,
                )
            };
            match n {
                -1 => Err(std::io::Error::last_os_error()),
                n => Ok(n as usize),
            }
        });
        let n = match peeked {
            Ok(0) => return Err(WorkerError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(FrameError::Io(e).into()),
        };
        if n >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME_BYTES {
                return Err(FrameError::TooLarge(len).into());
            }
            if n >= 4 + len {
                return greeting(parse(&buf[4..4 + len])?);
            }
            if len > PEEK_LIMIT {
                return take_greeting(stream, len).await;
            }
            if buf.len() < 4 + len {
                buf.resize(4 + len, 0);
                continue;
            }
        }
        // Part of the frame is in. If the worker is gone, the rest never comes; otherwise
        // the socket stays readable, so wait for the rest a moment.
        if readiness.is_read_closed() {
            return Err(WorkerError::Closed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Longest greeting [`peek_greeting`] leaves on the socket.
pub const PEEK_LIMIT: usize = 64 * 1024;

/// Reads off `stream` a greeting of `len` bytes (after its 4-byte length): an error in any
/// case, since the handshake of whoever takes the worker would not find it.
async fn take_greeting(stream: &UnixStream, len: usize) -> Result<Ready, WorkerError> {
    let mut frame = vec![0u8; 4 + len];
    let mut filled = 0;
    while filled < frame.len() {
        stream.readable().await.map_err(WorkerError::Io)?;
        match stream.try_read(&mut frame[filled..]) {
            Ok(0) => return Err(WorkerError::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(FrameError::Io(e).into()),
        }
    }
    greeting(parse(&frame[4..])?)?;
    Err(WorkerError::Protocol(format!(
        "a ready greeting of {len} bytes (at most {PEEK_LIMIT} are expected)"
    )))
}

/// One message of the worker.
fn parse(buf: &[u8]) -> Result<WorkerMessage<'_>, WorkerError> {
    serde_json::from_slice(buf).map_err(|e| WorkerError::Protocol(format!("invalid message: {e}")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    fn framed(json: &str) -> Vec<u8> {
        let mut frame = (json.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(json.as_bytes());
        frame
    }

    #[tokio::test]
    async fn a_peeked_ready_stays_on_the_socket_for_the_handshake() {
        let (host, mut worker) = UnixStream::pair().unwrap();
        let ready = framed(r#"{"type":"ready","pid":7,"init_ms":1.5}"#);
        // In two writes, so that the peek sees a partial frame first.
        worker.write_all(&ready[..10]).await.unwrap();
        let peek = tokio::spawn(async move {
            let ready = peek_greeting(&host).await;
            (host, ready)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        worker.write_all(&ready[10..]).await.unwrap();
        let (host, peeked) = peek.await.unwrap();
        assert_eq!(peeked.unwrap().pid, 7);
        let mut conn = WorkerConn::new(host);
        assert_eq!(conn.handshake().await.unwrap().pid, 7);
    }

    #[tokio::test]
    async fn a_worker_gone_before_or_during_its_greeting_is_closed_at_once() {
        for partial in [&b""[..], &[0, 0, 0, 40, b'{'][..]] {
            let (host, mut worker) = UnixStream::pair().unwrap();
            worker.write_all(partial).await.unwrap();
            drop(worker);
            let peeked = tokio::time::timeout(Duration::from_secs(2), peek_greeting(&host))
                .await
                .expect("no wait for a frame that cannot come");
            assert!(matches!(peeked, Err(WorkerError::Closed)), "{peeked:?}");
        }
    }

    #[tokio::test]
    async fn an_init_error_larger_than_the_socket_buffer_is_read_off_and_reported() {
        let (host, mut worker) = UnixStream::pair().unwrap();
        let message = "\\u0001".repeat(100_000); // ~600 KB once framed
        let error = framed(&format!(
            r#"{{"type":"init_error","error":{{"type":"Error","message":"{message}"}},"logs":"loading"}}"#
        ));
        assert!(error.len() > 4 * PEEK_LIMIT);
        let writer = tokio::spawn(async move { worker.write_all(&error).await });
        let peeked = tokio::time::timeout(Duration::from_secs(5), peek_greeting(&host))
            .await
            .expect("the writer is not left waiting for buffer space");
        match peeked {
            Err(WorkerError::Init { error, logs }) => {
                assert_eq!(error.message.chars().count(), 100_000);
                assert_eq!(logs, "loading");
            }
            other => panic!("{other:?}"),
        }
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_unread() {
        let (host, mut worker) = UnixStream::pair().unwrap();
        let too_long = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        worker.write_all(&too_long).await.unwrap();
        let peeked = peek_greeting(&host).await;
        assert!(
            matches!(peeked, Err(WorkerError::Protocol(ref m)) if m.contains("exceeds")),
            "{peeked:?}"
        );
    }
}
