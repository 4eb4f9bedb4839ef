//! The process driver with isolation on, against the real kernel: a real Python worker
//! started in its sandbox reports what it sees through its socket.

use std::path::PathBuf;
use std::sync::Arc;

use nimbus_sandbox::isolation::{Isolation, IsolationSettings};
use nimbus_sandbox::{Driver, LaunchSpec, ProcessDriver};
use tokio::io::AsyncReadExt;

const PYTHON: &str = "/usr/bin/python3.11";

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// An isolated driver with its own cgroup name and state directory, removed on drop.
struct Harness {
    driver: ProcessDriver,
    isolation: Arc<Isolation>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let init = (
            PathBuf::from(env!("CARGO_BIN_EXE_nimbus-sandbox-init")),
            Vec::new(),
        );
        let mut settings = IsolationSettings::new(init);
        // A name of its own: tests run in parallel, and each cleans up its own leftovers.
        settings.cgroup_name = format!(
            "nimbus-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let isolation = Arc::new(Isolation::open(settings).expect("isolation on this host"));
        Harness {
            driver: ProcessDriver::isolated(isolation.clone()),
            isolation,
            dir,
        }
    }

    /// Runs `script` in a sandboxed Python; returns what it wrote to fd 3. The test process's
    /// own descriptors (cargo's jobserver pipes, the harness's) are open and not close-on-exec
    /// in parts, so the fd check below also proves none of them leaks into the worker.
    async fn run(&self, script: &str, memory_mb: u32) -> (String, nimbus_sandbox::ExitInfo) {
        let code = self.dir.path().join("code");
        std::fs::create_dir_all(&code).unwrap();
        let spec = LaunchSpec {
            instance_id: "i_test".into(),
            program: PYTHON.into(),
            args: vec!["-I".into(), "-S".into(), "-c".into(), script.into()],
            env: vec![("GREETING".into(), "hello".into())],
            workdir: code,
            visible: vec![PYTHON.into()],
            memory_mb,
            network: nimbus_core::Network::Isolated,
            template: false,
        };
        let mut launched = self.driver.launch(&spec).await.expect("launch");
        let mut out = String::new();
        launched.stream.read_to_string(&mut out).await.unwrap();
        let exit = launched.sandbox.wait().await;
        (out, exit)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.isolation.shutdown();
    }
}

#[tokio::test]
async fn a_worker_runs_as_an_unprivileged_pid_1_in_its_own_root() {
    let h = Harness::new();
    let script = r#"
import json, os, socket
s = socket.socket(fileno=3)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
s.sendall(json.dumps({
    "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
    "greeting": os.environ.get("GREETING"), "env": sorted(os.environ),
    "cwd": os.getcwd(), "root": sorted(os.listdir("/")),
    "cap": status["CapEff"].strip(), "seccomp": status["Seccomp"].strip(),
    "tmp_writable": os.access("/tmp", os.W_OK),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "stdio": [os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)],
}).encode())
"#;
    let (out, exit) = h.run(script, 128).await;
    assert_eq!(exit.code, Some(0), "{exit}: {out}");
    let got: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // PID 1 is the sandbox's own init, which reaps orphans; the worker is PID 2.
    assert_eq!(got["pid"], 2, "{got}");
    // Only stdin, stdout, stderr (all /dev/null), the socket, and the listing's own fd.
    assert_eq!(got["fds"], serde_json::json!([0, 1, 2, 3, 4]), "{got}");
    assert_eq!(
        got["stdio"],
        serde_json::json!(["/dev/null", "/dev/null", "/dev/null"])
    );
    assert_eq!(
        (got["uid"].clone(), got["gid"].clone()),
        (1000.into(), 1000.into())
    );
    assert_eq!(got["greeting"], "hello");
    assert_eq!(got["cap"], "0000000000000000");
    assert_eq!(got["seccomp"], "2");
    assert_eq!(got["tmp_writable"], true);
    let root: Vec<&str> = got["root"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for hidden in ["bin", "boot", "home", "root", "sbin", "srv", "var"] {
        assert!(!root.contains(&hidden), "/{hidden} is visible: {root:?}");
    }
    for present in ["dev", "etc", "proc", "tmp", "usr"] {
        assert!(root.contains(&present), "/{present} is missing: {root:?}");
    }
}

#[tokio::test]
async fn exceeding_memory_is_reported_as_out_of_memory() {
    let h = Harness::new();
    let (_, exit) = h.run("hog = b'\\x01' * (512 * 1024 * 1024)", 64).await;
    assert!(exit.out_of_memory, "{exit:?}");
    assert_eq!(
        exit.to_string(),
        "was killed for exceeding its memory limit"
    );
}
