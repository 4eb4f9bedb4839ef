//! A stand-in for the internet, for the tests of sandboxes' outbound network.

use std::time::{Duration, Instant};

/// A stand-in for the internet: a network namespace behind a veth pair on
/// 198.51.100.0/24 (a documentation range, so not among the ranges sandboxes are denied),
/// with a TCP service on 198.51.100.2:8080 answering `hello`. Removed on drop.
pub struct FakeInternet {
    name: String,
    service: std::process::Child,
}

impl FakeInternet {
    /// Sets it up (needs root: `ip netns`, veth).
    pub fn start() -> Self {
        let id = std::process::id() % 100_000;
        let name = format!("nimbus-fake-{id}");
        let (host_if, peer_if) = (format!("fk{id}h"), format!("fk{id}n"));
        let sh = |script: &str| {
            let out = std::process::Command::new("sh")
                .args(["-c", script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(&format!(
            "ip netns del {name} 2>/dev/null; ip link del {host_if} 2>/dev/null; \
             ip netns add {name} && \
             ip link add {host_if} type veth peer name {peer_if} netns {name} && \
             ip addr add 198.51.100.1/24 dev {host_if} && ip link set {host_if} up && \
             ip -n {name} addr add 198.51.100.2/24 dev {peer_if} && \
             ip -n {name} link set {peer_if} up && ip -n {name} link set lo up"
        ));
        let service = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "/usr/bin/python3", "-c"])
            .arg(
                "import socket\ns = socket.create_server(('198.51.100.2', 8080))\n\
                 while True:\n    c, _ = s.accept()\n    c.sendall(b'hello')\n    c.close()\n",
            )
            .spawn()
            .unwrap();
        // Wait until the service answers from the host.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("198.51.100.2", 8080)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the fake internet did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        FakeInternet { name, service }
    }
}

impl Drop for FakeInternet {
    fn drop(&mut self) {
        let _ = self.service.kill();
        let _ = self.service.wait();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
