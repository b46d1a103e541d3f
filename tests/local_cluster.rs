//! deploy/local/cluster.sh: `up` starts etcd, two workers, a scheduler, a gateway and a real
//! Prometheus; a request through the gateway succeeds; Prometheus's HTTP API then returns the
//! workers' non-zero `sdlm_tokens_generated_total`; `down` leaves none of those processes.

use std::process::Command;
use std::time::{Duration, Instant};

use sdlm_system_tests::*;

fn cluster(dir: &TempDir, base: u16, args: &[&str]) -> std::process::Output {
    Command::new(root().join("deploy/local/cluster.sh"))
        .args(args)
        .env("SDLM_CLUSTER_DIR", &dir.0)
        .env("SDLM_CLUSTER_PORT", base.to_string())
        .env("SDLM_BIN", sdlm())
        .output()
        .expect("cluster.sh runs")
}

/// The sum of the workers' series of a PromQL query's result, once it has one per worker.
fn workers_sum(prometheus: &str, query: &str, workers: usize) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(prometheus).ok()?;
    write!(
        s,
        "GET /api/v1/query?query={query} HTTP/1.1\r\nHost: {prometheus}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let body = response.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let series: Vec<&serde_json::Value> = v["data"]["result"]
        .as_array()?
        .iter()
        .filter(|r| r["metric"]["job"] == "sdlm-worker")
        .collect();
    (series.len() == workers).then(|| {
        series
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_local_cluster_serves_is_scraped_and_goes_away() {
    let _serial = serial().await;
    let dir = TempDir::new("local-cluster");
    // 100 ports from a base that differs between concurrent runs.
    let base = 20_000 + (std::process::id() % 400) as u16 * 100;
    let up = cluster(&dir, base, &["up", "--workers", "2"]);
    // Whatever happens below, nothing is left running.
    struct DownOnDrop<'a>(&'a TempDir, u16);
    impl Drop for DownOnDrop<'_> {
        fn drop(&mut self) {
            let _ = cluster(self.0, self.1, &["down"]);
        }
    }
    let _down = DownOnDrop(&dir, base);
    let pids: Vec<i32> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .collect();
    assert!(
        up.status.success(),
        "up failed: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(
        pids.len(),
        6,
        "etcd, 2 workers, scheduler, gateway, prometheus"
    );

    let gateway = format!("127.0.0.1:{}", base + 10);
    let mut c = client(&gateway).await;
    for prompt in ["def add(a, b):\n", "class Stack:\n", "import os\n"] {
        let r = c
            .generate(v1::GenerateRequest {
                prompt: prompt.into(),
                params: Some(greedy(8)),
                ..Default::default()
            })
            .await
            .expect("a request through the gateway")
            .into_inner();
        assert_eq!(r.usage.unwrap().completion_tokens, 8);
    }
    let prometheus = format!("127.0.0.1:{}", base + 90);
    let end = Instant::now() + Duration::from_secs(60);
    let tokens = loop {
        match workers_sum(&prometheus, "sdlm_tokens_generated_total", 2) {
            Some(t) if t >= 24.0 => break t,
            _ if Instant::now() > end => panic!("Prometheus never had the workers' tokens"),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    assert_eq!(
        tokens, 24.0,
        "three requests of 8 tokens, summed over the workers"
    );

    let down = cluster(&dir, base, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let exists = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!exists, "process {pid} outlived down");
    }
}
