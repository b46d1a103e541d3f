//! `sdlm worker`, `sdlm scheduler`, `sdlm gateway`: the services as separate processes, found
//! through etcd (`--etcd`) or static addresses. Every flag is also an `SDLM_…` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Cancels `token` on SIGTERM or SIGINT.
fn stop_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        sdlm_runtime::termination().await;
        tracing::info!("signal received: shutting down");
        token.cancel();
    });
}

/// What every serving command sets up first: telemetry (its spans flushed when this is
/// dropped), a shutdown token cancelled by SIGTERM or SIGINT, and `/metrics`.
pub struct Process {
    pub shutdown: CancellationToken,
    pub metrics: sdlm_runtime::MetricsServer,
    _telemetry: sdlm_runtime::Telemetry,
}

/// Sets up a serving process named `service`; call it inside the runtime.
pub async fn start_process(service: &str, metrics_listen: SocketAddr) -> anyhow::Result<Process> {
    let telemetry = sdlm_runtime::init_telemetry(service);
    let shutdown = CancellationToken::new();
    stop_on_signal(shutdown.clone());
    let metrics = sdlm_runtime::serve_metrics(metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {metrics_listen}"))?;
    Ok(Process {
        shutdown,
        metrics,
        _telemetry: telemetry,
    })
}

fn etcd_list(urls: &Option<String>) -> Vec<String> {
    urls.as_deref()
        .map(sdlm_runtime::etcd::endpoints)
        .unwrap_or_default()
}

/// A count flag that must be at least 1 (its error names the limit; clap adds the flag).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("must be a whole number of at least 1, got {s:?}")),
    }
}

/// Engine and cache settings of a worker.
#[derive(clap::Args, Clone)]
pub struct WorkerTuning {
    /// Where the engine runs: cpu, cuda or cuda:N (cuda needs an sdlm built with --features cuda).
    #[arg(long, env = "SDLM_DEVICE", default_value = "cpu")]
    device: String,
    /// Matmuls on the CPU: f32 (exact) or bf16 (inputs and weights rounded to bf16, f32 sums,
    /// on the AMX tiles of an Intel Xeon Sapphire Rapids or later; a GGUF model's weights are
    /// dequantized first).
    #[arg(long, env = "SDLM_MATMUL_PRECISION", default_value = "f32")]
    matmul_precision: sdlm_engine::MatmulPrecision,
    /// What the model computes in on a GPU: f32, bf16 or f16 (bf16 and f16 take the
    /// tensor-core attention kernel; on the CPU the model computes in f32).
    #[arg(long, env = "SDLM_DTYPE", default_value = "f32")]
    dtype: sdlm_engine::ComputeDtype,
    /// Bytes of KV cache (default: half of the available memory).
    #[arg(long, env = "SDLM_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<usize>,
    /// Tokens per KV page.
    #[arg(long, env = "SDLM_PAGE_TOKENS", default_value_t = sdlm_worker::DEFAULT_PAGE_TOKENS)]
    page_tokens: usize,
    /// Sequences the engine advances in turn; more wait in its queue.
    #[arg(long, env = "SDLM_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// Tokens one engine iteration runs at most; longer prompts are prefilled in chunks, so
    /// they do not stall the sequences that are decoding.
    #[arg(long, env = "SDLM_MAX_BATCH_TOKENS", default_value_t = sdlm_engine::decode::DEFAULT_MAX_BATCH_TOKENS, value_parser = crate::cluster::at_least_one)]
    max_batch_tokens: usize,
    /// On SIGTERM, how long running sequences may finish before they are handed back.
    #[arg(long, env = "SDLM_DRAIN_SECONDS", default_value_t = 30)]
    drain_seconds: u64,
}

impl WorkerTuning {
    pub fn apply(&self, config: &mut sdlm_worker::WorkerConfig) {
        config.device = self.device.clone();
        config.matmul_precision = self.matmul_precision;
        config.dtype = self.dtype;
        config.kv_cache_bytes = self.kv_cache_bytes;
        config.page_tokens = self.page_tokens;
        config.max_running = self.max_running;
        config.max_batch_tokens = self.max_batch_tokens;
        config.drain_timeout = Duration::from_secs(self.drain_seconds);
    }
}

/// Host one model's engine for a scheduler.
#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long, env = "SDLM_MODEL")]
    model: PathBuf,
    #[arg(long, env = "SDLM_MODEL_NAME")]
    model_name: Option<String>,
    #[arg(long, env = "SDLM_LISTEN")]
    listen: SocketAddr,
    /// The address the scheduler dials (default: the bound address).
    #[arg(long, env = "SDLM_ADVERTISE")]
    advertise: Option<String>,
    #[arg(long, env = "SDLM_METRICS_LISTEN")]
    metrics_listen: SocketAddr,
    /// etcd endpoints, comma-separated; the worker registers under /sdlm/v1/workers/<id>.
    #[arg(long, env = "SDLM_ETCD")]
    etcd: Option<String>,
    #[arg(long, env = "SDLM_ID")]
    id: Option<String>,
    /// Seconds the etcd lease lives without a keep-alive (sent at a third of it).
    #[arg(long, env = "SDLM_LEASE_TTL", default_value_t = 5)]
    lease_ttl: u64,
    #[command(flatten)]
    tuning: WorkerTuning,
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let process = start_process("sdlm-worker", args.metrics_listen).await?;
        let (shutdown, metrics) = (process.shutdown.clone(), &process.metrics);
        let mut config = sdlm_worker::WorkerConfig::new(args.model.clone(), args.listen);
        config.model_name = args.model_name;
        config.advertise = args.advertise;
        config.etcd = etcd_list(&args.etcd);
        config.id = args.id;
        config.lease_ttl = Duration::from_secs(args.lease_ttl.max(1));
        args.tuning.apply(&mut config);
        let worker = sdlm_worker::start(config, shutdown).await?;
        println!(
            "sdlm worker {}: gRPC on {}, metrics on http://{}/metrics",
            worker.id, worker.addr, metrics.addr
        );
        worker.task.await??;
        Ok(())
    })
}

/// Queue, admit and place sequences on workers; move them when a worker fails.
#[derive(clap::Args)]
pub struct SchedulerArgs {
    #[arg(long, env = "SDLM_LISTEN")]
    listen: SocketAddr,
    /// The address gateways dial, published in the leader election.
    #[arg(long, env = "SDLM_ADVERTISE")]
    advertise: Option<String>,
    #[arg(long, env = "SDLM_METRICS_LISTEN")]
    metrics_listen: SocketAddr,
    /// etcd endpoints: workers are discovered there, and schedulers elect a leader.
    #[arg(
        long,
        env = "SDLM_ETCD",
        conflicts_with = "workers",
        required_unless_present = "workers"
    )]
    etcd: Option<String>,
    /// Static worker addresses, comma-separated.
    #[arg(long, env = "SDLM_WORKERS", value_delimiter = ',')]
    workers: Vec<String>,
    #[arg(long, env = "SDLM_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Seconds a sequence may wait for a worker.
    #[arg(long, env = "SDLM_QUEUE_TIMEOUT", default_value_t = 60)]
    queue_timeout: u64,
    #[arg(long, env = "SDLM_LEASE_TTL", default_value_t = 5)]
    lease_ttl: u64,
    /// Milliseconds between liveness probes of each worker (two failures mark it dead).
    #[arg(long, env = "SDLM_PROBE_INTERVAL_MS", default_value_t = 500)]
    probe_interval_ms: u64,
}

pub fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let process = start_process("sdlm-scheduler", args.metrics_listen).await?;
        let (shutdown, metrics) = (process.shutdown.clone(), &process.metrics);
        let mut config = sdlm_scheduler::SchedulerConfig::new(args.listen);
        config.advertise = args.advertise;
        config.etcd = etcd_list(&args.etcd);
        config.workers = args.workers;
        config.max_queue = args.max_queue;
        config.patience.queue_timeout = Duration::from_secs(args.queue_timeout);
        config.lease_ttl = Duration::from_secs(args.lease_ttl.max(1));
        config.probing.interval = Duration::from_millis(args.probe_interval_ms.max(10));
        let scheduler = sdlm_scheduler::start(config, shutdown).await?;
        println!(
            "sdlm scheduler: gRPC on {}, metrics on http://{}/metrics",
            scheduler.addr, metrics.addr
        );
        scheduler.task.await??;
        Ok(())
    })
}

/// The public gRPC API: validation, API keys, tokenization, streaming per block.
#[derive(clap::Args)]
pub struct GatewayArgs {
    #[arg(long, env = "SDLM_LISTEN")]
    listen: SocketAddr,
    #[arg(long, env = "SDLM_METRICS_LISTEN")]
    metrics_listen: SocketAddr,
    /// etcd endpoints: the gateway follows the elected scheduler leader.
    #[arg(
        long,
        env = "SDLM_ETCD",
        conflicts_with = "scheduler",
        required_unless_present = "scheduler"
    )]
    etcd: Option<String>,
    /// A fixed scheduler address.
    #[arg(long, env = "SDLM_SCHEDULER")]
    scheduler: Option<String>,
    /// A file of bearer-token API keys, one per line.
    #[arg(long, env = "SDLM_API_KEYS")]
    api_keys: Option<PathBuf>,
}

pub fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let process = start_process("sdlm-gateway", args.metrics_listen).await?;
        let (shutdown, metrics) = (process.shutdown.clone(), &process.metrics);
        let gateway = sdlm_gateway::start(
            sdlm_gateway::GatewayConfig {
                listen: args.listen,
                etcd: etcd_list(&args.etcd),
                scheduler: args.scheduler,
                local_scheduler: None,
                api_keys: args.api_keys,
            },
            shutdown,
        )
        .await?;
        println!(
            "sdlm gateway: gRPC on {}, metrics on http://{}/metrics",
            gateway.addr, metrics.addr
        );
        gateway.task.await??;
        Ok(())
    })
}
