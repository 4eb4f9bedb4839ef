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
    read_frame, write_frame, ErrorPayload, FrameError, InvokeFrame, PingFrame, WorkerMessage,
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
        let msg = parse(&self.read_buf)?;
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

    /// Runs one invocation and waits for its result.
    pub async fn invoke(
        &mut self,
        request_id: &str,
        event: &RawValue,
    ) -> Result<InvokeOutcome, WorkerError> {
        let id = self.take_id();
        let frame = InvokeFrame {
            kind: "invoke",
            id,
            request_id,
            event,
        };
        write_frame(&mut self.writer, &frame, &mut self.write_buf).await?;
        read_frame(&mut self.reader, &mut self.read_buf).await?;
        let msg = parse(&self.read_buf)?;
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

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

fn json_null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
}

fn parse(buf: &[u8]) -> Result<WorkerMessage<'_>, WorkerError> {
    serde_json::from_slice(buf).map_err(|e| WorkerError::Protocol(format!("invalid message: {e}")))
}
