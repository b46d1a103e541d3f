//! The process's metrics, prefix `sdlm_`, registered once. `sdlm serve` runs three services in one
//! process, so they share one registry and `requests_total` tells them apart by its `service`
//! label.

use std::sync::OnceLock;

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry,
};

/// Every metric a process exposes, as Prometheus names.
pub const METRIC_NAMES: [&str; 17] = [
    "sdlm_requests_total",
    "sdlm_request_duration_seconds",
    "sdlm_time_to_first_block_seconds",
    "sdlm_tokens_generated_total",
    "sdlm_forward_passes_total",
    "sdlm_tokens_per_forward",
    "sdlm_queue_depth",
    "sdlm_workers_live",
    "sdlm_sequences_running",
    "sdlm_kv_pages_used",
    "sdlm_kv_pages_total",
    "sdlm_sequence_migrations_total",
    "sdlm_batch_size",
    "sdlm_kv_prefix_lookups_total",
    "sdlm_kv_prefix_hits_total",
    "sdlm_kv_prefix_evictions_total",
    "sdlm_preemptions_total",
];

pub struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub time_to_first_block_seconds: Histogram,
    pub tokens_generated_total: IntCounter,
    pub forward_passes_total: IntCounter,
    pub tokens_per_forward: Histogram,
    pub queue_depth: IntGauge,
    pub workers_live: IntGauge,
    pub sequences_running: IntGauge,
    pub kv_pages_used: IntGauge,
    pub kv_pages_total: IntGauge,
    pub sequence_migrations_total: IntCounter,
    pub batch_size: Histogram,
    pub kv_prefix_lookups_total: IntCounter,
    pub kv_prefix_hits_total: IntCounter,
    pub kv_prefix_evictions_total: IntCounter,
    pub preemptions_total: IntCounter,
}

/// The process's metrics, created on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("sdlm")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(opts(name, help)).expect("constant metric")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("sdlm")
        .buckets(buckets)
}

impl Metrics {
    fn new() -> Self {
        // Every name and bucket below is a constant, so registration cannot fail at run time
        // except by a programming error (a duplicate name), which the tests would catch.
        let latency = exponential_buckets(0.001, 2.0, 16).expect("constant buckets");
        let m = Self {
            registry: Registry::new(),
            requests_total: IntCounterVec::new(
                opts(
                    "requests_total",
                    "Requests handled, by service and gRPC status",
                ),
                &["service", "status"],
            )
            .expect("constant metric"),
            request_duration_seconds: HistogramVec::new(
                histogram(
                    "request_duration_seconds",
                    "Time from request to last message, by service",
                    latency.clone(),
                ),
                &["service"],
            )
            .expect("constant metric"),
            time_to_first_block_seconds: Histogram::with_opts(histogram(
                "time_to_first_block_seconds",
                "Time from request to its first committed block",
                latency,
            ))
            .expect("constant metric"),
            tokens_generated_total: IntCounter::with_opts(opts(
                "tokens_generated_total",
                "Completion tokens committed",
            ))
            .expect("constant metric"),
            forward_passes_total: IntCounter::with_opts(opts(
                "forward_passes_total",
                "Model forward passes (prefill, denoising steps, AR steps)",
            ))
            .expect("constant metric"),
            tokens_per_forward: Histogram::with_opts(histogram(
                "tokens_per_forward",
                "Completion tokens per forward pass, one observation per finished sequence",
                vec![0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0],
            ))
            .expect("constant metric"),
            queue_depth: IntGauge::with_opts(opts(
                "queue_depth",
                "Sequences waiting for a worker (scheduler) or for an engine slot (worker)",
            ))
            .expect("constant metric"),
            workers_live: IntGauge::with_opts(opts(
                "workers_live",
                "Workers the scheduler sees alive",
            ))
            .expect("constant metric"),
            sequences_running: IntGauge::with_opts(opts(
                "sequences_running",
                "Sequences being decoded",
            ))
            .expect("constant metric"),
            kv_pages_used: IntGauge::with_opts(opts(
                "kv_pages_used",
                "KV cache pages held by running sequences",
            ))
            .expect("constant metric"),
            kv_pages_total: IntGauge::with_opts(opts("kv_pages_total", "KV cache pages in all"))
                .expect("constant metric"),
            sequence_migrations_total: IntCounter::with_opts(opts(
                "sequence_migrations_total",
                "Sequences moved to another worker at a block boundary",
            ))
            .expect("constant metric"),
            batch_size: Histogram::with_opts(histogram(
                "batch_size",
                "Sequences advanced per engine iteration",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
            ))
            .expect("constant metric"),
            kv_prefix_lookups_total: counter(
                "kv_prefix_lookups_total",
                "Full prompt pages looked up in the KV prefix cache",
            ),
            kv_prefix_hits_total: counter(
                "kv_prefix_hits_total",
                "Prompt pages found in the KV prefix cache (not recomputed)",
            ),
            kv_prefix_evictions_total: counter(
                "kv_prefix_evictions_total",
                "Cached prefix pages evicted to make room",
            ),
            preemptions_total: counter(
                "preemptions_total",
                "Sequences preempted for KV pages (recomputed later)",
            ),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests_total.clone()),
            Box::new(m.request_duration_seconds.clone()),
            Box::new(m.time_to_first_block_seconds.clone()),
            Box::new(m.tokens_generated_total.clone()),
            Box::new(m.forward_passes_total.clone()),
            Box::new(m.tokens_per_forward.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.workers_live.clone()),
            Box::new(m.sequences_running.clone()),
            Box::new(m.kv_pages_used.clone()),
            Box::new(m.kv_pages_total.clone()),
            Box::new(m.sequence_migrations_total.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.kv_prefix_lookups_total.clone()),
            Box::new(m.kv_prefix_hits_total.clone()),
            Box::new(m.kv_prefix_evictions_total.clone()),
            Box::new(m.preemptions_total.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are distinct");
        }
        m
    }

    /// Counts one finished request of `service` with its gRPC status name ("ok",
    /// "invalid_argument", ...).
    pub fn request_done(&self, service: &str, status: &str, seconds: f64) {
        self.requests_total
            .with_label_values(&[service, status])
            .inc();
        self.request_duration_seconds
            .with_label_values(&[service])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails on invalid metric data, which we never create.
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

/// The lower-case name of a gRPC status code, as the `status` label.
pub fn status_label(code: tonic::Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let sep = (i > 0 && c.is_uppercase()).then_some('_');
            sep.into_iter().chain(c.to_lowercase())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_is_exposed_with_the_sdlm_prefix() {
        let m = metrics();
        m.request_done("gateway", "ok", 0.01);
        let text = m.render();
        for name in METRIC_NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains("sdlm_requests_total{service=\"gateway\",status=\"ok\"} 1"));
    }

    #[test]
    fn status_labels_are_snake_case() {
        assert_eq!(status_label(tonic::Code::Ok), "ok");
        assert_eq!(
            status_label(tonic::Code::InvalidArgument),
            "invalid_argument"
        );
        assert_eq!(
            status_label(tonic::Code::ResourceExhausted),
            "resource_exhausted"
        );
    }
}
