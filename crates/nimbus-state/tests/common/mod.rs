//! What the Redis tests share: private `redis-server`s on free ports, and the limits they
//! write under.

#![allow(dead_code)] // Each test crate uses a different part of it.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nimbus_state::Limits;

pub const LIMITS: Limits = Limits {
    max_value_bytes: 1024,
    max_keys: 100,
};

/// A private `redis-server`, killed when dropped.
pub struct RedisServer(Child);

impl RedisServer {
    /// Starts `redis-server` with `args` on `port` and waits until it accepts connections.
    pub fn start(port: u16, args: &[&str]) -> RedisServer {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): install it (apt-get install redis-server, \
                     or scripts/ensure-services.sh)"
                )
            });
        // Owned before anything can panic, so it is killed and reaped either way.
        let server = RedisServer(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Sends the server a signal (`STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
