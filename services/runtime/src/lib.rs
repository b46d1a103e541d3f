//! sdlm-runtime: what every sdlm process (gateway, scheduler, worker, or all three in `sdlm serve`)
//! shares: metrics and `/metrics`, logging and trace context, gRPC server plumbing, etcd discovery.

pub mod deadline;
pub mod etcd;
mod http;
mod link;
mod metrics;
mod server;
mod trace;
pub mod wire;

pub use http::{serve_metrics, MetricsServer};
pub use link::Link;
pub use metrics::{metrics, status_label, Metrics, METRIC_NAMES};
pub use server::{bind, health_service, reflection_service, termination, Bound};
pub use trace::{continue_trace, init_telemetry, propagate, trace_id, Telemetry, TRACEPARENT};
