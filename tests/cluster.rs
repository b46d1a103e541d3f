//! The cluster as separate processes on loopback: a real etcd, schedulers, workers and a
//! gateway, each a `sdlm` process. Faults are real: SIGKILL, SIGSTOP, SIGTERM.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sdlm_system_tests::*;

/// Lease TTL for these tests (seconds): short, so that expiry is quick to observe.
const TTL: u64 = 3;

const PROMPTS: [&str; 8] = [
    "def parse_header(line):",
    "import os\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"",
    "import json\n\ndef load(path):\n    with open(path) as f:",
    "def is_prime(n):",
    "for i in range(10):",
    "def read_config(filename):\n    config = {}",
];

struct Cluster {
    etcd: Etcd,
    dir: TempDir,
    workers: Vec<(Proc, String, String)>,
    schedulers: Vec<(Proc, String, String)>,
    gateway: (Proc, String, String),
}

fn worker(dir: &TempDir, etcd: &Etcd, id: &str, extra: &[&str]) -> (Proc, String, String) {
    let model = model_dir();
    let mut args = vec![
        "worker",
        "--model",
        model.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url,
        "--id",
        id,
    ];
    let ttl = TTL.to_string();
    args.extend_from_slice(&["--lease-ttl", &ttl]);
    args.extend_from_slice(extra);
    let (p, grpc, metrics) = Proc::sdlm(id, &args, &dir.0);
    (p, grpc, metrics.expect("metrics address"))
}

fn scheduler(dir: &TempDir, etcd: &Etcd, name: &str) -> (Proc, String, String) {
    let ttl = TTL.to_string();
    let args = [
        "scheduler",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url,
        "--lease-ttl",
        &ttl,
    ];
    let (p, grpc, metrics) = Proc::sdlm(name, &args, &dir.0);
    (p, grpc, metrics.expect("metrics address"))
}

fn gateway(dir: &TempDir, etcd: &Etcd) -> (Proc, String, String) {
    let args = [
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url,
    ];
    let (p, grpc, metrics) = Proc::sdlm("gateway", &args, &dir.0);
    (p, grpc, metrics.expect("metrics address"))
}

/// Waits until `proc`'s log has `needle`.
fn wait_log(proc: &Proc, needle: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !proc.log_text().contains(needle) {
        assert!(
            Instant::now() < end,
            "{} never logged {needle:?}:\n{}",
            proc.name,
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    fn start(tag: &str, workers: usize, schedulers: usize, worker_extra: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let etcd = Etcd::start();
        let mut s = Vec::new();
        for i in 0..schedulers {
            let sched = scheduler(&dir, &etcd, &format!("scheduler-{i}"));
            if i == 0 {
                // The first one leads: later ones queue behind it in the election.
                wait_log(
                    &sched.0,
                    "elected scheduler leader",
                    Duration::from_secs(30),
                );
            }
            s.push(sched);
        }
        let w = (0..workers)
            .map(|i| worker(&dir, &etcd, &format!("worker-{i}"), worker_extra))
            .collect();
        let g = gateway(&dir, &etcd);
        Self {
            etcd,
            dir,
            workers: w,
            schedulers: s,
            gateway: g,
        }
    }

    /// Waits until the gateway lists the model on `workers` live workers.
    async fn ready(&self, workers: u32) {
        let end = Instant::now() + Duration::from_secs(60);
        let mut c = client(&self.gateway.1).await;
        loop {
            if let Ok(r) = c.list_models(v1::ListModelsRequest {}).await {
                if r.into_inner().models.iter().any(|m| m.workers == workers) {
                    return;
                }
            }
            assert!(Instant::now() < end, "the cluster never became ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The keys under /sdlm/v1/workers/ in etcd.
async fn worker_keys(url: &str) -> BTreeMap<String, String> {
    sdlm_runtime::etcd::list_prefix(&[url.to_string()], "/sdlm/v1/workers/")
        .await
        .expect("etcd answers")
        .0
}

/// `sdlm generate` of every prompt, computed once per length for the whole test binary.
fn references(max_new: u32) -> Vec<String> {
    static DONE: std::sync::Mutex<BTreeMap<u32, Vec<String>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut done = DONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    done.entry(max_new)
        .or_insert_with(|| PROMPTS.iter().map(|p| generate_cli(p, max_new)).collect())
        .clone()
}

/// Each stream's prompt index and the task that collects its text.
type Streams = Vec<(
    usize,
    tokio::task::JoinHandle<Result<String, tonic::Status>>,
)>;

/// Starts one stream per (prompt, copy); returns the join handles with their prompt index,
/// and a counter of messages received so far per stream.
fn launch(
    addr: &str,
    copies: usize,
    max_new: u32,
) -> (Streams, std::sync::Arc<Vec<std::sync::atomic::AtomicUsize>>) {
    let n = PROMPTS.len() * copies;
    let seen = std::sync::Arc::new(
        (0..n)
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect::<Vec<_>>(),
    );
    let handles = (0..n)
        .map(|k| {
            let i = k % PROMPTS.len();
            let addr = addr.to_string();
            let seen = std::sync::Arc::clone(&seen);
            let h = tokio::spawn(async move {
                let mut c = client(&addr).await;
                let mut stream = c
                    .generate_stream(v1::GenerateRequest {
                        prompt: PROMPTS[i].into(),
                        params: Some(greedy(max_new)),
                        request_id: Some(format!("stream-{k}")),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let mut text = String::new();
                while let Some(m) = stream.message().await? {
                    text.push_str(&m.text);
                    seen[k].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(text)
            });
            (i, h)
        })
        .collect();
    (handles, seen)
}

async fn check_texts(handles: Streams, want: &[String]) {
    for (i, h) in handles {
        let got = h.await.expect("task").expect("stream completes");
        assert_eq!(got, want[i], "prompt {i}");
    }
}

async fn wait_streaming(seen: &[std::sync::atomic::AtomicUsize]) {
    let end = Instant::now() + Duration::from_secs(120);
    while seen
        .iter()
        .any(|s| s.load(std::sync::atomic::Ordering::SeqCst) == 0)
    {
        assert!(Instant::now() < end, "streams never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_streams_match_generate_and_every_process_serves_metrics() {
    let _serial = serial().await;
    let want = references(48);
    let cluster = Cluster::start("cluster", 2, 1, &[]);
    cluster.ready(2).await;
    let (handles, _) = launch(&cluster.gateway.1, 4, 48);
    check_texts(handles, &want).await;

    let names = sdlm_runtime::METRIC_NAMES;
    let mut all = vec![&cluster.gateway, &cluster.schedulers[0]];
    all.extend(cluster.workers.iter());
    for (p, _, metrics) in all {
        let text = scrape(metrics);
        for name in names {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{}: {name} missing",
                p.name
            );
        }
    }
    let g = scrape(&cluster.gateway.2);
    assert_eq!(
        metric(&g, "sdlm_requests_total{service=\"gateway\",status=\"ok\"}"),
        Some(32.0)
    );
    assert!(metric(&g, "sdlm_time_to_first_block_seconds_count").unwrap_or(0.0) >= 32.0);
    let s = scrape(&cluster.schedulers[0].2);
    assert_eq!(
        metric(
            &s,
            "sdlm_requests_total{service=\"scheduler\",status=\"ok\"}"
        ),
        Some(32.0)
    );
    assert_eq!(metric(&s, "sdlm_workers_live"), Some(2.0));
    let mut tokens = 0.0;
    for (p, _, m) in &cluster.workers {
        let w = scrape(m);
        let t = metric(&w, "sdlm_tokens_generated_total").unwrap_or(0.0);
        assert!(
            t > 0.0,
            "{} generated nothing: placement did not spread",
            p.name
        );
        assert!(metric(&w, "sdlm_forward_passes_total").unwrap_or(0.0) > 0.0);
        assert!(metric(&w, "sdlm_batch_size_count").unwrap_or(0.0) > 0.0);
        assert!(metric(&w, "sdlm_kv_pages_total").unwrap_or(0.0) > 0.0);
        tokens += t;
    }
    assert!(tokens > 0.0);
    let _ = &cluster.etcd;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_worker_mid_stream_moves_its_sequences_without_losing_text() {
    let _serial = serial().await;
    let want = references(96);
    let mut cluster = Cluster::start("kill", 2, 1, &[]);
    cluster.ready(2).await;
    assert_eq!(worker_keys(&cluster.etcd.url).await.len(), 2);
    let (handles, seen) = launch(&cluster.gateway.1, 1, 96);
    wait_streaming(&seen).await;
    let killed = Instant::now();
    cluster.workers[0].0.signal(libc::SIGKILL);
    check_texts(handles, &want).await;

    let s = scrape(&cluster.schedulers[0].2);
    assert!(
        metric(&s, "sdlm_sequence_migrations_total").unwrap_or(0.0) > 0.0,
        "no migration"
    );
    // The dead worker's key leaves etcd within the lease TTL (plus a keep-alive period).
    loop {
        let keys = worker_keys(&cluster.etcd.url).await;
        if !keys.contains_key("/sdlm/v1/workers/worker-0") {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(TTL + 2),
            "worker-0's key still in etcd after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(worker_keys(&cluster.etcd.url)
        .await
        .contains_key("/sdlm/v1/workers/worker-1"));
    let _ = cluster.workers.remove(0);
    let _ = &cluster.dir;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_worker_is_detected_and_its_sequences_move() {
    let _serial = serial().await;
    let want = references(96);
    let cluster = Cluster::start("hang", 2, 1, &[]);
    cluster.ready(2).await;
    let (handles, seen) = launch(&cluster.gateway.1, 1, 96);
    wait_streaming(&seen).await;
    cluster.workers[1].0.signal(libc::SIGSTOP);
    check_texts(handles, &want).await;
    let s = scrape(&cluster.schedulers[0].2);
    assert!(
        metric(&s, "sdlm_sequence_migrations_total").unwrap_or(0.0) > 0.0,
        "no migration"
    );
    assert_eq!(metric(&s, "sdlm_workers_live"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_scheduler_dies_the_other_takes_over() {
    let _serial = serial().await;
    let cluster = Cluster::start("leader", 1, 2, &[]);
    cluster.ready(1).await;
    let mut c = client(&cluster.gateway.1).await;
    let request = || v1::GenerateRequest {
        prompt: PROMPTS[0].into(),
        params: Some(greedy(8)),
        ..Default::default()
    };
    c.generate(request())
        .await
        .expect("the first leader serves");
    let killed = Instant::now();
    cluster.schedulers[0].0.signal(libc::SIGKILL);
    loop {
        match c.generate(request()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    killed.elapsed() < Duration::from_secs(2 * TTL + 3),
                    "no new leader after {:?}: {e:?}",
                    killed.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(2 * TTL + 3),
        "takeover took {took:?}"
    );
    wait_log(
        &cluster.schedulers[1].0,
        "elected scheduler leader",
        Duration::from_secs(1),
    );
    for _ in 0..3 {
        c.generate(request()).await.expect("the new leader serves");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_worker_deregisters_hands_back_and_exits_zero() {
    let _serial = serial().await;
    let want = references(96);
    // A one-second drain: sequences still running then are handed back and move.
    let mut cluster = Cluster::start("drain", 2, 1, &["--drain-seconds", "1"]);
    cluster.ready(2).await;
    let (handles, seen) = launch(&cluster.gateway.1, 1, 96);
    wait_streaming(&seen).await;
    let term = Instant::now();
    cluster.workers[0].0.signal(libc::SIGTERM);
    // Deregistered at once (lease revoked), not after the TTL.
    loop {
        if !worker_keys(&cluster.etcd.url)
            .await
            .contains_key("/sdlm/v1/workers/worker-0")
        {
            break;
        }
        assert!(
            term.elapsed() < Duration::from_secs(TTL),
            "worker-0 did not deregister"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_texts(handles, &want).await;
    let status = cluster.workers[0]
        .0
        .wait_exit(Duration::from_secs(30))
        .expect("the worker exits");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_outage_keeps_the_last_known_cluster_serving() {
    let _serial = serial().await;
    let mut cluster = Cluster::start("etcd-down", 2, 1, &[]);
    cluster.ready(2).await;
    let mut c = client(&cluster.gateway.1).await;
    let request = || v1::GenerateRequest {
        prompt: PROMPTS[5].into(),
        params: Some(greedy(16)),
        ..Default::default()
    };
    let before = c
        .generate(request())
        .await
        .expect("served")
        .into_inner()
        .text;
    cluster.etcd.kill();
    // Past several keep-alive periods and the lease TTL: every process has noticed by now.
    tokio::time::sleep(Duration::from_secs(TTL + 1)).await;
    for _ in 0..4 {
        let after = c
            .generate(request())
            .await
            .expect("still served")
            .into_inner()
            .text;
        assert_eq!(after, before);
    }
    let s = scrape(&cluster.schedulers[0].2);
    assert_eq!(
        metric(&s, "sdlm_workers_live"),
        Some(2.0),
        "the scheduler forgot its workers"
    );
}

/// gRPC health of `service` at `addr`.
async fn health_of(addr: &str, service: &str) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("the gateway accepts connections");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_is_ready_only_while_it_knows_a_scheduler_leader() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let _serial = serial().await;
    let etcd = Etcd::start();
    let dir = TempDir::new("gateway-ready");
    let (_gateway, addr, _) = gateway(&dir, &etcd);
    // No scheduler yet: alive ("" serving) but not ready for the API.
    assert_eq!(health_of(&addr, "").await, ServingStatus::Serving as i32);
    assert_eq!(
        health_of(&addr, "sdlm.v1.Generation").await,
        ServingStatus::NotServing as i32
    );
    let (_scheduler, _, _) = scheduler(&dir, &etcd, "scheduler");
    let end = Instant::now() + Duration::from_secs(30);
    while health_of(&addr, "sdlm.v1.Generation").await != ServingStatus::Serving as i32 {
        assert!(Instant::now() < end, "the gateway never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
