//! Logging, spans and W3C trace context. Every process installs an OpenTelemetry tracer under
//! `tracing`, so spans always have trace and span ids and `traceparent` travels in gRPC metadata
//! from gateway to scheduler to worker; spans are exported over OTLP/gRPC only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the exporter reads the other `OTEL_…` variables too).

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The metadata key of W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Keeps the tracer alive; flushes and stops the exporter, then the log writer, when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
    _log_writer: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Logs to stderr (from a writer thread: a request's log line costs its task a queue push, not
/// a write to a pipe), filtered by `SDLM_LOG` (default `info`), e.g. `SDLM_LOG=sdlm_scheduler=debug`;
/// spans of `service` exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Call it once per
/// process, inside the tokio runtime (the exporter and its batches live there), and keep the
/// value: dropping it stops the tracer the process-wide subscriber uses.
pub fn init_telemetry(service: &str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SDLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let mut provider = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_string())
            .build(),
    );
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
    let mut export_error = None;
    if endpoint.is_some() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let batches = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    exporter,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
                provider = provider.with_span_processor(batches);
            }
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let provider = provider.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("sdlm"));
    // Blocks rather than drops a line when the writer falls behind.
    let (writer, log_writer) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("sdlm-log")
        .finish(std::io::stderr());
    // A second initialisation (tests) keeps the first subscriber and its writer.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(otel)
        .try_init()
        .is_ok();
    match (&endpoint, export_error) {
        (Some(e), None) => tracing::info!(endpoint = e, "exporting spans over OTLP"),
        (Some(e), Some(err)) => {
            tracing::warn!(
                endpoint = e,
                error = err,
                "OTLP exporter not started; spans stay local"
            )
        }
        (None, _) => {}
    }
    Telemetry {
        provider,
        _log_writer: installed.then_some(log_writer),
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Makes the caller's trace (a `traceparent` in `metadata`, if valid) the parent of `span`.
pub fn continue_trace(span: &tracing::Span, metadata: &MetadataMap) {
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(parent);
}

/// Writes `span`'s trace context into outgoing `metadata`.
pub fn propagate(span: &tracing::Span, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetadataInjector(metadata));
}

/// The hex trace id of `span` (for log lines and responses).
pub fn trace_id(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt;
    span.context().span().span_context().trace_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tracer for the whole test binary: dropping a `Telemetry` stops the tracer that the
    /// (process-wide) subscriber uses.
    fn telemetry() {
        static TELEMETRY: std::sync::OnceLock<Telemetry> = std::sync::OnceLock::new();
        TELEMETRY.get_or_init(|| init_telemetry("test"));
    }

    fn metadata(traceparent: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(TRACEPARENT, traceparent.parse().expect("ascii"));
        m
    }

    #[test]
    fn a_callers_trace_continues_and_goes_out_with_a_new_parent_span() {
        telemetry();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = tracing::info_span!("generate");
        continue_trace(&span, &metadata(incoming));
        assert_eq!(trace_id(&span), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut out = MetadataMap::new();
        propagate(&span, &mut out);
        let header = out
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .expect("traceparent written");
        assert!(
            header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{header}"
        );
        assert!(
            !header.contains("00f067aa0ba902b7"),
            "the parent is this span, not the caller's"
        );
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        telemetry();
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let span = tracing::info_span!("generate");
            continue_trace(&span, &metadata(bad));
            let id = trace_id(&span);
            assert_eq!(id.len(), 32);
            assert_ne!(id, "00000000000000000000000000000000", "{bad}");
            assert!(!id.starts_with("4bf92f35"), "{bad}");
        }
    }
}
