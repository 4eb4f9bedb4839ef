//! One connection's clock: which deadline applies at this moment, from what the connection
//! is doing.
//!
//! hyper's own `header_read_timeout` runs from the moment it waits for a head, so on a
//! kept-alive connection it would be the idle timeout too, and it knows nothing of clients
//! that stop reading. The connection task instead asks [`Activity`] for the next deadline:
//!
//! - first request: its head must be complete within `header` of the connection's accept;
//! - after a response: the next request must start within `keepalive`, and its head be
//!   complete within `header` of its first byte;
//! - while a request is handled, no deadline (its body has a stall timeout of its own, and
//!   the invocation its function's timeout);
//! - while a write waits for the client to read, only `stall`: a write the client does not
//!   take for that long ends the connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The timeouts of a connection (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a request's head.
    pub header: Duration,
    /// For the next request on a kept-alive connection.
    pub keepalive: Duration,
    /// For a write the client does not read, and a request body that sends nothing.
    pub stall: Duration,
}

/// Which timeout ended a connection (the `timeout` label of the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The request head did not arrive in time.
    Header,
    /// No next request on a kept-alive connection.
    Keepalive,
    /// The client did not read the response.
    Stall,
}

impl Expired {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Expired::Header => "header",
            Expired::Keepalive => "keepalive",
            Expired::Stall => "stall",
        }
    }
}

/// What the connection is doing, shared by its I/O, its service and its task.
pub struct Activity {
    timeouts: Timeouts,
    state: Mutex<State>,
    /// Idle after a response, no byte of a next request yet (fast path of reads).
    idle: AtomicBool,
    /// A write is waiting for the client to read (fast path of writes).
    write_blocked: AtomicBool,
    /// Wakes the connection task when the deadline may have moved.
    changed: Notify,
}

struct State {
    /// Requests handed to the application whose response is not finished.
    busy: u32,
    /// When waiting for a request (`busy == 0`) ends the connection, and why.
    wait: (Instant, Expired),
    /// Since when a write has waited for the client.
    write_blocked_since: Option<Instant>,
}

impl Activity {
    /// A connection accepted now: its first head is due within the header timeout.
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Activity {
            timeouts,
            state: Mutex::new(State {
                busy: 0,
                wait: (Instant::now() + timeouts.header, Expired::Header),
                write_blocked_since: None,
            }),
            idle: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    /// The deadline now in force, if any. A connection whose write waits for the client is
    /// not idle, whatever else it does: only the stall timeout applies then.
    pub fn deadline(&self) -> Option<(Instant, Expired)> {
        let state = self.state.lock().expect("activity lock");
        match state.write_blocked_since {
            Some(since) => Some((since + self.timeouts.stall, Expired::Stall)),
            None => (state.busy == 0).then_some(state.wait),
        }
    }

    /// Resolves when the deadline may have changed since it was last read.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Bytes arrived from the client.
    pub fn bytes_read(&self) {
        if !self.idle.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut state = self.state.lock().expect("activity lock");
        if state.busy == 0 {
            state.wait = (Instant::now() + self.timeouts.header, Expired::Header);
            drop(state);
            self.changed.notify_one();
        }
    }

    /// A write could not proceed: the client is not reading.
    pub fn write_blocked(&self) {
        if self.write_blocked.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state
            .lock()
            .expect("activity lock")
            .write_blocked_since = Some(Instant::now());
        self.changed.notify_one();
    }

    /// A write went through. If it ended a wait, an idle connection's keep-alive time
    /// starts now: the client has just taken the last response.
    pub fn write_done(&self) {
        if !self.write_blocked.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut state = self.state.lock().expect("activity lock");
        state.write_blocked_since = None;
        if state.busy == 0 && self.idle.load(Ordering::Acquire) {
            state.wait = (Instant::now() + self.timeouts.keepalive, Expired::Keepalive);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// A request's head is complete and goes to the application; its guard marks the end
    /// of its response.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.idle.store(false, Ordering::Release);
        self.state.lock().expect("activity lock").busy += 1;
        self.changed.notify_one();
        RequestGuard(self.clone())
    }

    fn request_finished(&self) {
        let mut state = self.state.lock().expect("activity lock");
        state.busy -= 1;
        if state.busy == 0 {
            state.wait = (Instant::now() + self.timeouts.keepalive, Expired::Keepalive);
            self.idle.store(true, Ordering::Release);
        }
        drop(state);
        self.changed.notify_one();
    }
}

/// Held from a request's head until its response body is finished or dropped.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        keepalive: Duration::from_secs(60),
        stall: Duration::from_secs(30),
    };

    fn due_in(activity: &Activity) -> Option<(u64, Expired)> {
        activity
            .deadline()
            .map(|(at, why)| ((at - Instant::now()).as_secs_f64().round() as u64, why))
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection() {
        let a = Activity::new(T);
        assert_eq!(due_in(&a), Some((10, Expired::Header)));
        // Bytes of the first request do not extend its header deadline.
        tokio::time::advance(Duration::from_secs(4)).await;
        a.bytes_read();
        assert_eq!(due_in(&a), Some((6, Expired::Header)));
        let guard = a.request_started();
        assert_eq!(due_in(&a), None, "no deadline while the request is handled");
        a.write_blocked();
        assert_eq!(due_in(&a), Some((30, Expired::Stall)));
        a.write_done();
        drop(guard);
        assert_eq!(due_in(&a), Some((60, Expired::Keepalive)));
        // The next request's first byte starts its header clock.
        tokio::time::advance(Duration::from_secs(50)).await;
        a.bytes_read();
        assert_eq!(due_in(&a), Some((10, Expired::Header)));
        tokio::time::advance(Duration::from_secs(3)).await;
        a.bytes_read();
        assert_eq!(
            due_in(&a),
            Some((7, Expired::Header)),
            "only the first byte counts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_waiting_on_its_write_is_not_idle() {
        let a = Activity::new(T);
        // The response is complete, but its last bytes wait for the client to read.
        drop(a.request_started());
        a.write_blocked();
        assert_eq!(due_in(&a), Some((30, Expired::Stall)));
        tokio::time::advance(Duration::from_secs(20)).await;
        a.write_done();
        assert_eq!(due_in(&a), Some((60, Expired::Keepalive)), "idle from now");
        tokio::time::advance(Duration::from_secs(5)).await;
        a.write_blocked();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(due_in(&a), Some((0, Expired::Stall)));
    }
}
