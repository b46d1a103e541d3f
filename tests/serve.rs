//! `sdlm serve` as a real process on loopback: the public API against `sdlm generate`, bad input,
//! API keys, health, and /metrics.

use std::time::Duration;

use sdlm_system_tests::*;
use tonic::Code;

const PROMPTS: [&str; 3] = [
    "def parse_header(line):",
    "import os\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
];

fn serve(dir: &TempDir, extra: &[&str]) -> (Proc, String, String) {
    let (p, grpc, metrics) = serve_bundled(dir, extra);
    (p, grpc, metrics.expect("serve prints its metrics address"))
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_generates_what_sdlm_generate_writes_and_streams_per_block() {
    let _serial = serial().await;
    let dir = TempDir::new("serve");
    let (_serve, addr, metrics_addr) = serve(&dir, &[]);
    let mut c = client(&addr).await;

    let models = c
        .list_models(v1::ListModelsRequest {})
        .await
        .expect("list models")
        .into_inner();
    assert_eq!(models.models.len(), 1);
    let info = &models.models[0];
    assert_eq!(info.name, "sdlm-tiny-code");
    assert!(info.diffusion && info.block_size > 0);

    for prompt in PROMPTS {
        let want = generate_cli(prompt, 48);
        let request = v1::GenerateRequest {
            model: "sdlm-tiny-code".into(),
            prompt: prompt.into(),
            params: Some(greedy(48)),
            request_id: Some("t-1".into()),
        };
        let whole = c
            .generate(request.clone())
            .await
            .expect("generate")
            .into_inner();
        assert_eq!(whole.text, want, "Generate for {prompt:?}");
        assert_eq!(whole.request_id, "t-1");
        let usage = whole.usage.expect("usage");
        assert!(usage.completion_tokens > 0 && usage.forward_passes > 0);
        assert!(["length", "stop"].contains(&whole.finish_reason.as_str()));

        let stream = c
            .generate_stream(request)
            .await
            .expect("stream")
            .into_inner();
        let (text, messages, last) = read_stream(stream).await.expect("stream completes");
        assert_eq!(text, want, "GenerateStream for {prompt:?}");
        let usage = last.usage.expect("the last message has usage");
        assert!(last.finish_reason.is_some());
        // One message per committed block: completion tokens over the block size, rounded up.
        let blocks = usage.completion_tokens.div_ceil(info.block_size) as usize;
        assert!(
            messages >= blocks.min(2),
            "{messages} messages for {blocks} blocks"
        );
        assert!(
            (usage.tokens_per_forward
                - usage.completion_tokens as f64 / usage.forward_passes as f64)
                .abs()
                < 1e-9
        );
    }

    // Infill: the model writes a middle between prefix and suffix.
    let infill = c
        .infill(v1::InfillRequest {
            prefix: "def add(a, b):\n    ".into(),
            suffix: "\n\nprint(add(1, 2))\n".into(),
            params: Some(greedy(16)),
            ..Default::default()
        })
        .await
        .expect("infill")
        .into_inner();
    assert!(!infill.finish_reason.is_empty());

    // A stop string ends the text before it.
    let stopped = c
        .generate(v1::GenerateRequest {
            prompt: PROMPTS[0].into(),
            params: Some(v1::DecodingParams {
                stop: vec!["\n".into()],
                ..greedy(48)
            }),
            ..Default::default()
        })
        .await
        .expect("generate with stop")
        .into_inner();
    assert!(!stopped.text.contains('\n'));
    let full = generate_cli(PROMPTS[0], 48);
    if full.contains('\n') {
        assert_eq!(stopped.finish_reason, "stop_string");
        assert_eq!(stopped.text, full[..full.find('\n').unwrap_or(0)]);
    }

    let text = scrape(&metrics_addr);
    for name in sdlm_runtime::METRIC_NAMES {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    assert!(
        metric(
            &text,
            "sdlm_requests_total{service=\"gateway\",status=\"ok\"}"
        )
        .unwrap_or(0.0)
            >= 8.0
    );
    assert!(metric(&text, "sdlm_tokens_generated_total").unwrap_or(0.0) > 0.0);
    assert!(metric(&text, "sdlm_forward_passes_total").unwrap_or(0.0) > 0.0);
    assert_eq!(metric(&text, "sdlm_workers_live"), Some(1.0));
    assert!(metric(&text, "sdlm_kv_pages_total").unwrap_or(0.0) > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_input_is_invalid_argument_naming_the_field() {
    let _serial = serial().await;
    let dir = TempDir::new("serve-bad");
    let (_serve, addr, _) = serve(&dir, &[]);
    let mut c = client(&addr).await;
    let base = v1::GenerateRequest {
        prompt: "def f():".into(),
        params: Some(greedy(8)),
        ..Default::default()
    };
    let with = |f: &dyn Fn(&mut v1::DecodingParams)| {
        let mut r = base.clone();
        if let Some(p) = r.params.as_mut() {
            f(p);
        }
        r
    };
    let cases: Vec<(v1::GenerateRequest, &str)> = vec![
        (
            v1::GenerateRequest {
                prompt: String::new(),
                ..base.clone()
            },
            "prompt",
        ),
        (
            v1::GenerateRequest {
                model: "no-such-model".into(),
                ..base.clone()
            },
            "no-such-model",
        ),
        (with(&|p| p.max_new_tokens = Some(100_000)), "context"),
        (with(&|p| p.max_new_tokens = Some(0)), "max_new_tokens"),
        (with(&|p| p.block_size = Some(0)), "block_size"),
        (with(&|p| p.block_size = Some(1000)), "block_size"),
        (with(&|p| p.threshold = Some(0.0)), "threshold"),
        (with(&|p| p.threshold = Some(1.5)), "threshold"),
        (with(&|p| p.temperature = Some(-0.5)), "temperature"),
        (with(&|p| p.top_p = Some(2.0)), "top_p"),
        (with(&|p| p.mode = Some(7)), "mode"),
        (with(&|p| p.stop = vec!["s".repeat(1000)]), "stop"),
        (
            v1::GenerateRequest {
                request_id: Some("x".repeat(500)),
                ..base.clone()
            },
            "request_id",
        ),
    ];
    for (request, field) in cases {
        for streaming in [false, true] {
            let status = if streaming {
                c.generate_stream(request.clone()).await.err()
            } else {
                c.generate(request.clone()).await.err()
            }
            .unwrap_or_else(|| panic!("{field}: accepted"));
            assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
            assert!(
                status.message().contains(field),
                "{field} not named in {:?}",
                status.message()
            );
        }
    }
    let infill = c
        .infill(v1::InfillRequest::default())
        .await
        .expect_err("empty infill refused");
    assert_eq!(infill.code(), Code::InvalidArgument);
    assert!(infill.message().contains("prefix"));

    // The process is still serving after all of that.
    let ok = c.generate(base).await.expect("a good request still works");
    assert!(!ok.into_inner().finish_reason.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_are_required_when_configured_and_health_stays_open() {
    let _serial = serial().await;
    let dir = TempDir::new("serve-keys");
    let keys = dir.0.join("keys");
    std::fs::write(&keys, "# test keys\nsecret-one\nsecret-two\n").expect("keys file");
    let (serve, addr, _) = serve(&dir, &["--api-keys", keys.to_str().expect("utf-8")]);
    let mut c = client(&addr).await;
    let request = || v1::GenerateRequest {
        prompt: "def f():".into(),
        params: Some(greedy(4)),
        ..Default::default()
    };
    let missing = c.generate(request()).await.expect_err("no key");
    assert_eq!(missing.code(), Code::Unauthenticated);
    for bad in ["Bearer wrong", "Bearer secret-on", "secret-one", "Bearer "] {
        let mut r = tonic::Request::new(request());
        r.metadata_mut()
            .insert("authorization", bad.parse().expect("ascii"));
        let e = c.generate(r).await.expect_err("bad key");
        assert_eq!(e.code(), Code::Unauthenticated, "{bad:?}");
    }
    let mut r = tonic::Request::new(request());
    r.metadata_mut()
        .insert("authorization", "Bearer secret-two".parse().expect("ascii"));
    c.generate(r).await.expect("a listed key is accepted");

    // Health answers without a key (Kubernetes probes carry none).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sdlm.v1.Generation".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert!(
        !serve.log_text().contains("secret-one"),
        "a key reached the log"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_queue_bound_requests_get_resource_exhausted_and_admitted_ones_finish() {
    let _serial = serial().await;
    // One token's keys and values in the bundled model: 2 × 4 layers × 2 KV heads × 64 × 4
    // bytes = 4 KiB, so 6 pages of 16 tokens = 393,216 bytes: room for one sequence of
    // 68 tokens (5 pages) at a time. Two more may wait; the rest are refused.
    let dir = TempDir::new("serve-overload");
    let (_serve, addr, metrics_addr) =
        serve(&dir, &["--kv-cache-bytes", "400000", "--max-queue", "2"]);
    let request = |max_new: u32| v1::GenerateRequest {
        prompt: "def f():".into(),
        params: Some(greedy(max_new)),
        ..Default::default()
    };
    let mut c = client(&addr).await;
    let too_large = c
        .generate(request(200))
        .await
        .expect_err("larger than the cache");
    assert_eq!(too_large.code(), Code::ResourceExhausted);
    assert!(
        too_large.message().contains("KV pages"),
        "{}",
        too_large.message()
    );

    let handles: Vec<_> = (0..8)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move { client(&addr).await.generate(request(60)).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        match h.await.expect("task") {
            Ok(r) => {
                assert!(!r.into_inner().finish_reason.is_empty());
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.message().contains("max_queue"), "{}", e.message());
                refused += 1;
            }
        }
    }
    assert!(refused >= 1, "nothing was refused ({ok} ok)");
    assert!(ok >= 1, "nothing was admitted");
    let text = scrape(&metrics_addr);
    assert!(
        metric(
            &text,
            "sdlm_requests_total{service=\"gateway\",status=\"resource_exhausted\"}"
        )
        .unwrap_or(0.0)
            >= refused as f64
    );
    assert_eq!(metric(&text, "sdlm_queue_depth"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_and_cancelled_streams_stop_the_sequence_on_the_worker() {
    let _serial = serial().await;
    let dir = TempDir::new("serve-cancel");
    let (_serve, addr, metrics_addr) = serve(&dir, &[]);
    let mut c = client(&addr).await;
    let long = || v1::GenerateRequest {
        prompt: "def parse_header(line):".into(),
        params: Some(v1::DecodingParams {
            // Far beyond any stop: only the deadline or the client ends it.
            block_size: Some(1),
            ..greedy(200)
        }),
        ..Default::default()
    };
    let cancelled = |text: &str| {
        metric(
            text,
            "sdlm_requests_total{service=\"worker\",status=\"cancelled\"}",
        )
        .unwrap_or(0.0)
    };
    let before = cancelled(&scrape(&metrics_addr));

    // A deadline of 300 ms: the client gets DEADLINE_EXCEEDED and the worker drops the sequence.
    let mut r = tonic::Request::new(long());
    r.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = c.generate(r).await.expect_err("the deadline passes first");
    // tonic's client enforces the same deadline it sends, so the call ends with whichever of
    // the server's DEADLINE_EXCEEDED and the client's own timeout comes first.
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_for(&metrics_addr, |t| cancelled(t) >= before + 1.0).await;

    // A client that reads one block and goes away.
    let mut stream = c
        .generate_stream(long())
        .await
        .expect("stream")
        .into_inner();
    stream
        .message()
        .await
        .expect("a first block")
        .expect("a message");
    drop(stream);
    wait_for(&metrics_addr, |t| cancelled(t) >= before + 2.0).await;
    assert_eq!(
        metric(&scrape(&metrics_addr), "sdlm_sequences_running"),
        Some(0.0)
    );
}

/// Polls /metrics until `ok` holds (at most 10 s).
async fn wait_for(metrics_addr: &str, ok: impl Fn(&str) -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(metrics_addr);
        if ok(&text) {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "metrics never showed it:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
