//! The audit log under pressure: a sink that stalls (a FIFO nobody reads) or fails (its
//! reader went away: EPIPE; /dev/full: ENOSPC). With `on_full = "block"` the proxy refuses new
//! requests and CONNECTs (503 audit_unavailable) instead of serving them unaudited, and admits
//! again once the sink takes records; nothing it already served loses its record. With
//! `on_full = "drop"` it serves on and counts what it drops.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

const O_NONBLOCK: i32 = 0o4000;
const HOLD: u8 = 0;
const READ: u8 = 1;
const CLOSED: u8 = 2;

/// The reading end of a FIFO, on a thread: it holds the FIFO open without reading (a stalled
/// log shipper), reads everything, or closes its end (a shipper that died).
struct FifoReader {
    mode: Arc<AtomicU8>,
    data: Arc<Mutex<Vec<u8>>>,
}

impl FifoReader {
    fn new(path: &Path, mode: u8) -> FifoReader {
        let out = std::process::Command::new("mkfifo")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mkfifo: {out:?}");
        let reader = FifoReader {
            mode: Arc::new(AtomicU8::new(mode)),
            data: Arc::default(),
        };
        let open = {
            let path = path.to_path_buf();
            move || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(O_NONBLOCK)
                    .open(&path)
                    .expect("open FIFO")
            }
        };
        // Open now, so that the proxy's open for writing does not wait for a reader.
        let mut file = Some(open());
        let (mode, data) = (reader.mode.clone(), reader.data.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match mode.load(Ordering::SeqCst) {
                    CLOSED => file = None,
                    m => {
                        let f = file.get_or_insert_with(&open);
                        if m == READ {
                            while let Ok(n @ 1..) = f.read(&mut buf) {
                                data.lock().unwrap().extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        reader
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// The complete JSON lines read so far.
    fn records(&self) -> Vec<Value> {
        let data = self.data.lock().unwrap();
        let text = String::from_utf8_lossy(&data);
        let complete = text.rsplit_once('\n').map_or("", |(c, _)| c);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    fn paths(&self) -> BTreeSet<String> {
        self.records()
            .iter()
            .filter_map(|r| r["path"].as_str().map(str::to_string))
            .collect()
    }
}

fn fifo_in(dir: &Path) -> PathBuf {
    dir.join("audit.fifo")
}

async fn counter(proxy: &Proxy, name: &str) -> f64 {
    metric(&proxy.metrics().await, name, &[])
}

/// GETs `/v1/models?{tag}-{i}` until refusal is steady (several 503s in a row, a little apart)
/// or `max` have been served. Returns the paths served 200.
///
/// The first 503 can come while the writer still has room in its own buffer (it polls the
/// queue every few milliseconds, and a 16-record queue fills between polls); it then admits
/// again. Once the pipe and that buffer are full the writer blocks and refusal holds.
async fn until_refused(client: &reqwest::Client, tag: &str, max: usize) -> (Vec<String>, bool) {
    let mut served = Vec::new();
    let mut in_a_row = 0;
    for i in 0..max {
        let path = format!("/v1/models?{tag}-{i}");
        let r = fetch(client.get(format!("http://api.openai.com{path}"))).await;
        match r.status {
            200 => {
                served.push(path);
                in_a_row = 0;
            }
            503 => {
                assert_error(&r, 503, "audit_unavailable");
                in_a_row += 1;
                if in_a_row == 5 {
                    return (served, true);
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            s => panic!("{path}: unexpected {s}: {r:?}"),
        }
    }
    (served, false)
}

/// While refused: requests and CONNECTs get 503 and nothing reaches the origin.
async fn assert_refusing(proxy: &Proxy, origin: &Origin) {
    let before = origin.requests().len();
    let r = fetch(
        proxy
            .client()
            .get("http://api.openai.com/v1/models?while-refused"),
    )
    .await;
    assert_error(&r, 503, "audit_unavailable");
    let c = connect_refused(proxy.addr, "api.openai.com:443", &[]).await;
    assert_error(&c, 503, "audit_unavailable");
    assert_eq!(
        origin.requests().len(),
        before,
        "a refused request reached the origin"
    );
    assert!(counter(proxy, "portcullis_audit_refused_total").await >= 2.0);
}

/// Waits for a request to be served again.
async fn until_admitted(client: &reqwest::Client) -> String {
    within("requests to be admitted again", async {
        for i in 0.. {
            let path = format!("/v1/models?after-{i}");
            let r = fetch(client.get(format!("http://api.openai.com{path}"))).await;
            if r.status == 200 {
                return path;
            }
            assert_error(&r, 503, "audit_unavailable");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        unreachable!()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_refuses_while_the_sink_stalls_and_recovers_without_losing_records() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = fifo_in(dir.path());
    let reader = FifoReader::new(&fifo, HOLD);
    let origin = Origin::http().await;
    // The binary: its process log is read too.
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .audit_path(&fifo)
            .audit("queue = 16")
            .audit("on_full = \"block\""),
    )
    .await;
    let client = proxy.client();

    // The pipe and the writer's buffer fill, then the queue: then requests are refused.
    let (served, refused) = until_refused(&client, "stalled", 5000).await;
    assert!(refused, "never refused after {} requests", served.len());
    assert_eq!(origin.requests().len(), served.len());
    assert_refusing(&proxy, &origin).await;

    // The shipper comes back: requests are admitted again and every served request's record
    // arrives, the ones held while the sink stalled included.
    reader.set(READ);
    let after = until_admitted(&client).await;
    let want: BTreeSet<String> = served.iter().cloned().chain([after]).collect();
    eventually("every served request's record through the FIFO", || {
        let got = reader.paths();
        want.is_subset(&got).then_some(())
    })
    .await;
    assert_eq!(counter(&proxy, "portcullis_audit_dropped_total").await, 0.0);
    assert!(!reader.paths().iter().any(|p| p.contains("while-refused")));
    // Both turns are in the process log, where an operator looks for why requests got 503s.
    proxy.stop().await;
    let output = proxy.output();
    for said in ["refusing new requests", "admitting requests again"] {
        assert!(output.contains(said), "{said:?} not in the log: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_serves_while_the_sink_stalls_and_counts_what_it_drops() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = fifo_in(dir.path());
    let reader = FifoReader::new(&fifo, HOLD);
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .audit_path(&fifo)
            .audit("queue = 16")
            .audit("on_full = \"drop\""),
    )
    .await;
    let client = proxy.client();

    let mut served = 0usize;
    within("records to be dropped", async {
        while counter(&proxy, "portcullis_audit_dropped_total").await == 0.0 {
            for _ in 0..50 {
                let r =
                    fetch(client.get(format!("http://api.openai.com/v1/models?stalled-{served}")))
                        .await;
                assert_eq!(r.status, 200, "drop mode serves on: {r:?}");
                served += 1;
            }
        }
    })
    .await;

    // The shipper comes back: later requests are logged again.
    reader.set(READ);
    within("a later request to be logged", async {
        for k in 0.. {
            let r = fetch(client.get(format!("http://api.openai.com/v1/models?after-{k}"))).await;
            assert_eq!(r.status, 200);
            served += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if reader.paths().iter().any(|p| p.contains("after-")) {
                return;
            }
        }
    })
    .await;
    // Every request is either in the log or counted as dropped.
    within("written + dropped to account for every request", async {
        loop {
            let written = reader.paths().len();
            let dropped = counter(&proxy, "portcullis_audit_dropped_total").await as usize;
            assert!(
                written + dropped <= served,
                "{written} + {dropped} > {served}"
            );
            if written + dropped == served {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The log said the first drop; at shutdown it says how many there were in all.
    let dropped = counter(&proxy, "portcullis_audit_dropped_total").await;
    proxy.stop().await;
    let output = proxy.output();
    assert!(
        output.contains(&format!("{dropped} records dropped while running")),
        "no total of {dropped} dropped records in the log: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_refuses_while_the_sink_fails_and_recovers_without_losing_records() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = fifo_in(dir.path());
    let reader = FifoReader::new(&fifo, READ);
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .audit_path(&fifo)
            .audit("on_full = \"block\""),
    )
    .await;
    let client = proxy.client();
    let (mut served, refused) = until_refused(&client, "before", 5).await;
    assert!(!refused);
    let want: BTreeSet<String> = served.iter().cloned().collect();
    eventually("the first records", || {
        want.is_subset(&reader.paths()).then_some(())
    })
    .await;

    // The shipper dies: writes fail with EPIPE; the writer holds the records and stops
    // admission.
    reader.set(CLOSED);
    let (more, refused) = until_refused(&client, "failing", 1000).await;
    assert!(refused, "never refused with a failing sink");
    served.extend(more);
    assert_refusing(&proxy, &origin).await;

    // A new shipper: the held records are written, requests are admitted again.
    reader.set(READ);
    let after = until_admitted(&client).await;
    let want: BTreeSet<String> = served.iter().cloned().chain([after]).collect();
    eventually(
        "every served request's record through the new reader",
        || want.is_subset(&reader.paths()).then_some(()),
    )
    .await;
    assert_eq!(counter(&proxy, "portcullis_audit_dropped_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_blocks_or_drops_as_configured() {
    let full = Path::new("/dev/full");
    let origin = Origin::http().await;

    let blocking = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .audit_path(full)
            .audit("on_full = \"block\""),
    )
    .await;
    let (served, refused) = until_refused(&blocking.client(), "full-block", 1000).await;
    assert!(refused, "served {} requests into a full disk", served.len());
    assert_refusing(&blocking, &origin).await;

    let dropping = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .audit_path(full)
            .audit("queue = 16")
            .audit("on_full = \"drop\""),
    )
    .await;
    let client = dropping.client();
    within("records to be dropped", async {
        let mut i = 0;
        while counter(&dropping, "portcullis_audit_dropped_total").await == 0.0 {
            for _ in 0..20 {
                let r = fetch(client.get(format!("http://api.openai.com/v1/models?full-drop-{i}")))
                    .await;
                assert_eq!(r.status, 200);
                i += 1;
            }
        }
    })
    .await;
    assert_eq!(
        counter(&dropping, "portcullis_audit_refused_total").await,
        0.0
    );
}

/// Sends `n` requests tagged `tag`; all must be served (drop mode).
async fn serve_n(client: &reqwest::Client, tag: &str, n: usize) {
    for i in 0..n {
        let r = fetch(client.get(format!("http://api.openai.com/v1/models?{tag}-{i}"))).await;
        assert_eq!(r.status, 200, "drop mode serves on: {r:?}");
    }
}

fn signal(proxy: &Proxy, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// logrotate's `postrotate` sends SIGUSR1 whatever state the log is in: a reopen asked for
/// while the queue is full (the shipper reading the FIFO stalled) is still carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_even_while_the_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = fifo_in(dir.path());
    let reader = FifoReader::new(&fifo, HOLD);
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .audit_path(&fifo)
            .audit("queue = 16")
            .audit("on_full = \"drop\""),
    )
    .await;
    let client = proxy.client();

    // Until the writer is blocked on the full pipe and the queue stays full: a whole batch of
    // requests is dropped.
    within("the queue to stay full", async {
        loop {
            let before = counter(&proxy, "portcullis_audit_dropped_total").await;
            serve_n(&client, "stalled", 20).await;
            let after = counter(&proxy, "portcullis_audit_dropped_total").await;
            if after - before == 20.0 {
                return;
            }
        }
    })
    .await;

    // logrotate moves the FIFO aside and signals while the queue is full.
    std::fs::rename(&fifo, dir.path().join("audit.fifo.1")).unwrap();
    signal(&proxy, "-USR1");
    eventually("the signal to be handled", || {
        proxy
            .output()
            .contains("reopening the audit log")
            .then_some(())
    })
    .await;

    // The shipper reads again: the writer drains into the old FIFO, reopens, and later
    // records land in the new file at the configured path.
    reader.set(READ);
    within("a later record in the new file", async {
        for k in 0.. {
            serve_n(&client, &format!("after-{k}"), 1).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let new = std::fs::read_to_string(&fifo).unwrap_or_default();
            if new.contains("after-") {
                return;
            }
        }
    })
    .await;
    assert!(fifo.is_file(), "the new audit file is a regular file");
    assert_eq!(proxy.stop().await.and_then(|s| s.code()), Some(0));
}

/// A sink that still fails at shutdown: the records given up on are counted, the process log
/// says how many, and the exit status is 1 so that a supervisor sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_lost_at_shutdown_are_reported() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .audit_path(Path::new("/dev/full"))
            .audit("on_full = \"drop\""),
    )
    .await;
    serve_n(&proxy.client(), "full", 3).await;
    assert_eq!(proxy.stop().await.and_then(|s| s.code()), Some(1));
    let output = proxy.output();
    assert!(
        output.contains("3 records lost at shutdown"),
        "no count of lost records: {output}"
    );
}
