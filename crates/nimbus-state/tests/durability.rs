//! An acknowledged write to the embedded store survives `kill -9` of the process.
//!
//! The test runs itself again as a child (selected by an environment variable) that writes
//! from several tasks at once and prints each key once its write returned; the parent kills
//! it mid-stream, opens the store and finds every printed key.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_state::{Bucket, EmbeddedStore, Limits, State};

const TEST_NAME: &str = "acknowledged_writes_survive_sigkill";
/// Set in the child: the database to write to.
const WRITER_DB: &str = "NIMBUS_STATE_TEST_WRITER_DB";
const WRITERS: usize = 4;

const LIMITS: Limits = Limits {
    max_value_bytes: 1024,
    max_keys: u32::MAX,
};

fn value(writer: usize, i: u64) -> String {
    format!(r#"{{"writer": {writer}, "i": {i}}}"#)
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if let Some(db) = std::env::var_os(WRITER_DB) {
        write_until_killed(Path::new(&db));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(WRITER_DB, &db)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    let (acks, acked) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(ack) = line.strip_prefix("ACK ") {
                let (writer, i) = ack.split_once(' ').unwrap();
                let _ = acks.send((writer.parse::<usize>().unwrap(), i.parse::<u64>().unwrap()));
            }
        }
    });
    let mut written = vec![acked
        .recv_timeout(Duration::from_secs(30))
        .expect("the writer acknowledged nothing")];
    let stop = Instant::now() + Duration::from_millis(500);
    while let Ok(ack) = acked.recv_timeout(stop.saturating_duration_since(Instant::now())) {
        written.push(ack);
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the writer must die of SIGKILL mid-stream, not end by itself: {status}"
    );
    reader.join().unwrap();
    // Acknowledgements printed before the kill that the parent had not read yet count too.
    written.extend(acked.try_iter());
    assert!(
        written.len() >= 20,
        "too few writes to judge: {}",
        written.len()
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let state = State::new(Arc::new(EmbeddedStore::open(&db).unwrap()));
        let bucket = Bucket::function("fn_durable");
        for &(writer, i) in &written {
            let got = state.get(&bucket, &format!("w{writer}-{i}")).await.unwrap();
            assert_eq!(
                got.map(|v| v.value),
                Some(value(writer, i)),
                "acknowledged write {writer}/{i} of {} was lost",
                written.len()
            );
        }
    });
    eprintln!("{} acknowledged writes survived SIGKILL", written.len());
}

/// The child: writes from [`WRITERS`] tasks, printing each write after it returned, until
/// it is killed (or, should the parent be gone, for at most a minute).
fn write_until_killed(db: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let state = State::new(Arc::new(EmbeddedStore::open(db).unwrap()));
        let give_up = Instant::now() + Duration::from_secs(60);
        let writers = (0..WRITERS).map(|writer| {
            let state = state.clone();
            tokio::spawn(async move {
                let bucket = Bucket::function("fn_durable");
                for i in 0.. {
                    if Instant::now() > give_up {
                        break;
                    }
                    let key = format!("w{writer}-{i}");
                    state
                        .set(&bucket, &key, &value(writer, i), None, None, LIMITS)
                        .await
                        .unwrap();
                    println!("ACK {writer} {i}");
                }
            })
        });
        for writer in writers.collect::<Vec<_>>() {
            writer.await.unwrap();
        }
    });
}
