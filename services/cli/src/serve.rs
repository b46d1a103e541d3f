//! `sdlm serve`: gateway + scheduler + one worker in one process, with static discovery and no
//! etcd. The same services as the separate processes; between them, each calls the next one's
//! gRPC server directly (`sdlm_runtime::Link::Local`) instead of over loopback. The scheduler and
//! the worker still listen, for health checks and for tools.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use crate::cluster::{runtime, start_process, WorkerTuning};

/// Serve a model over gRPC (sdlm.v1.Generation) with metrics, in one process.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory or .gguf file.
    #[arg(long, env = "SDLM_MODEL")]
    model: PathBuf,
    /// The name clients ask for (default: the directory or file name).
    #[arg(long, env = "SDLM_MODEL_NAME")]
    model_name: Option<String>,
    #[arg(long, env = "SDLM_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[arg(long, env = "SDLM_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    metrics_listen: SocketAddr,
    /// A file of bearer-token API keys, one per line; without it no key is asked for.
    #[arg(long, env = "SDLM_API_KEYS")]
    api_keys: Option<PathBuf>,
    /// Sequences that may wait for room; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SDLM_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    #[command(flatten)]
    tuning: WorkerTuning,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let process = start_process("sdlm-serve", args.metrics_listen).await?;
        let mut worker = sdlm_worker::WorkerConfig::new(args.model.clone(), LOOPBACK);
        worker.model_name = args.model_name.clone();
        args.tuning.apply(&mut worker);
        let stack = start_stack(
            worker,
            args.listen,
            args.max_queue,
            args.api_keys.clone(),
            process.shutdown.clone(),
        )
        .await?;
        println!(
            "sdlm serve: gRPC on {}, metrics on http://{}/metrics, model {}",
            stack.addr,
            process.metrics.addr,
            args.model.display()
        );
        stack.wait().await
    })
}

const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Gateway, scheduler and one worker, running in this process.
pub struct Stack {
    /// The gateway's address.
    pub addr: SocketAddr,
    gateway: tokio::task::JoinHandle<Result<(), sdlm_gateway::GatewayError>>,
    scheduler: tokio::task::JoinHandle<Result<(), sdlm_scheduler::SchedulerError>>,
    worker: sdlm_worker::StartedWorker,
    worker_stop: CancellationToken,
}

/// Starts the all-in-one stack: the gateway listens on `listen`; it stops when `shutdown` is
/// cancelled.
pub async fn start_stack(
    worker: sdlm_worker::WorkerConfig,
    listen: SocketAddr,
    max_queue: usize,
    api_keys: Option<PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<Stack> {
    // The worker stops last: it drains after the gateway and scheduler stop taking work.
    let worker_stop = CancellationToken::new();
    let worker = sdlm_worker::start(worker, worker_stop.clone()).await?;

    let mut scheduler = sdlm_scheduler::SchedulerConfig::new(LOOPBACK);
    scheduler.workers = vec![worker.addr.to_string()];
    scheduler
        .local_workers
        .insert(worker.addr.to_string(), worker.link.clone());
    scheduler.max_queue = max_queue;
    let scheduler = sdlm_scheduler::start(scheduler, shutdown.clone()).await?;
    if !scheduler
        .wait_for_workers(1, std::time::Duration::from_secs(60))
        .await
    {
        anyhow::bail!("the worker did not become ready within 60 s");
    }

    let gateway = sdlm_gateway::start(
        sdlm_gateway::GatewayConfig {
            listen,
            etcd: Vec::new(),
            scheduler: None,
            local_scheduler: Some(scheduler.link.clone()),
            api_keys,
        },
        shutdown,
    )
    .await?;
    Ok(Stack {
        addr: gateway.addr,
        gateway: gateway.task,
        scheduler: scheduler.task,
        worker,
        worker_stop,
    })
}

impl Stack {
    /// Waits for the gateway and scheduler to stop, then drains and stops the worker.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.gateway.await??;
        self.scheduler.await??;
        self.worker_stop.cancel();
        self.worker.task.await??;
        Ok(())
    }
}
