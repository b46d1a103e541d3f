//! Spans reach an OTLP endpoint when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and the caller's W3C
//! trace context continues through gateway, scheduler and worker. The receiving end is an OTLP
//! trace service built here from the OTLP protocol's own definitions (`opentelemetry-proto`):
//! no collector binary comes from the package registries this project may use.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use sdlm_system_tests::*;

/// One received span: name, hex trace id, its attributes as text.
type Received = (String, String, Vec<(String, String)>);

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self
            .spans
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
                        .collect();
                    spans.push((span.name.clone(), hex(&span.trace_id), attributes));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_of_every_service_are_exported_under_the_callers_trace() {
    let _serial = serial().await;
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = TempDir::new("otlp");
    let model = model_dir();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (_serve, addr, _) = Proc::sdlm_with_env(
        "serve",
        &[
            "serve",
            "--model",
            model.to_str().expect("utf-8"),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        &dir.0,
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(v1::GenerateRequest {
        prompt: "def parse_header(line):".into(),
        params: Some(greedy(24)),
        request_id: Some("traced-1".into()),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01")
            .parse()
            .expect("ascii"),
    );
    let response = client(&addr)
        .await
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    let tokens = response.usage.expect("usage").completion_tokens;

    let end = Instant::now() + Duration::from_secs(20);
    let wanted = ["generate", "sequence", "placement", "run", "block"];
    loop {
        let spans = receiver.spans.lock().expect("spans").clone();
        let ours: Vec<&Received> = spans.iter().filter(|s| s.1 == trace).collect();
        let has = |name: &str| ours.iter().any(|s| s.0 == name);
        if wanted.iter().all(|n| has(n)) {
            let blocks: Vec<&&Received> = ours.iter().filter(|s| s.0 == "block").collect();
            assert!(!blocks.is_empty() && blocks.len() <= tokens as usize);
            for b in &blocks {
                assert!(
                    b.2.iter()
                        .any(|(k, v)| k == "request_id" && v.contains("traced-1")),
                    "a block span without the request id: {b:?}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < end,
            "spans missing under trace {trace}: have {:?}",
            ours.iter().map(|s| &s.0).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.abort();
}
