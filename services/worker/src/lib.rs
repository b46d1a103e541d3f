//! sdlm-worker: hosts one engine behind `sdlm.v1.Worker`. It runs whole sequences and streams
//! their committed blocks, reports capacity in KV pages, registers itself in etcd under a lease
//! (when given endpoints), and on shutdown drains: it deregisters, refuses new sequences, lets
//! running ones finish for a while, then hands the rest back at their last committed block.

mod engine;
mod pages;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdlm_engine::decode::ModelLimits;
use sdlm_engine::{device_named, open_model_in};
use sdlm_proto::v1::worker_server::WorkerServer;
use sdlm_runtime::etcd::{LeasedKey, WorkerRecord, WORKERS_PREFIX};
use sdlm_runtime::Link;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use pages::{default_kv_cache_bytes, DEFAULT_PAGE_TOKENS};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("loading the model: {0}")]
    Engine(#[from] sdlm_engine::EngineError),
    #[error("starting the engine (its KV cache of --kv-cache-bytes): {0}")]
    EngineStart(String),
    #[error("the tokenizer cannot be written as tokenizer.json: {0}")]
    Tokenizer(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the model loader stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub model: PathBuf,
    /// Where the engine runs: cpu, cuda or cuda:N (`sdlm_engine::device_named`).
    pub device: String,
    /// How CPU forwards multiply by dense weights (`sdlm_engine::MatmulPrecision`).
    pub matmul_precision: sdlm_engine::MatmulPrecision,
    /// What the model computes in on a GPU (`sdlm_engine::ComputeDtype`).
    pub dtype: sdlm_engine::ComputeDtype,
    /// The name clients ask for; default: the model directory's or file's name.
    pub model_name: Option<String>,
    pub listen: SocketAddr,
    /// The address others dial (default: the bound address).
    pub advertise: Option<String>,
    /// etcd endpoints; empty for static discovery.
    pub etcd: Vec<String>,
    pub id: Option<String>,
    pub lease_ttl: Duration,
    /// KV budget in bytes (default: half the available memory).
    pub kv_cache_bytes: Option<usize>,
    pub page_tokens: usize,
    /// Sequences advanced in turn by the engine; more wait in its queue.
    pub max_running: usize,
    /// Tokens one engine iteration runs at most; longer prompts are prefilled in chunks.
    pub max_batch_tokens: usize,
    /// How long a draining worker lets running sequences finish before handing them back.
    pub drain_timeout: Duration,
}

impl WorkerConfig {
    pub fn new(model: PathBuf, listen: SocketAddr) -> Self {
        Self {
            model,
            device: "cpu".into(),
            matmul_precision: Default::default(),
            dtype: Default::default(),
            model_name: None,
            listen,
            advertise: None,
            etcd: Vec::new(),
            id: None,
            lease_ttl: Duration::from_secs(5),
            kv_cache_bytes: None,
            page_tokens: DEFAULT_PAGE_TOKENS,
            max_running: 64,
            max_batch_tokens: sdlm_engine::decode::DEFAULT_MAX_BATCH_TOKENS,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The name a model is served under when none is given: its directory or file name without
/// the extension.
pub fn model_name_of(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}

/// A worker that is serving; it drains and stops when `shutdown` is cancelled.
pub struct StartedWorker {
    pub addr: SocketAddr,
    pub id: String,
    /// The worker service, for a scheduler in this process to call directly.
    pub link: Link,
    pub task: JoinHandle<Result<(), WorkerError>>,
}

pub async fn start(
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<StartedWorker, WorkerError> {
    let path = config.model.clone();
    let device = device_named(&config.device)?;
    let (precision, dtype) = (config.matmul_precision, config.dtype);
    let (model, tokenizer) = tokio::task::spawn_blocking(move || {
        let (mut model, tokenizer) = open_model_in(&path, &device, dtype)?;
        model.set_matmul_precision(precision)?;
        Ok::<_, sdlm_engine::EngineError>((model, tokenizer))
    })
    .await??;
    let tokenizer_json = tokenizer
        .to_string(false)
        .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
    let bound = sdlm_runtime::bind(config.listen)
        .await
        .map_err(|source| WorkerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = bound.addr;
    let id = config
        .id
        .clone()
        .unwrap_or_else(|| format!("worker-{}-{}", std::process::id(), addr.port()));
    let model_name = config
        .model_name
        .clone()
        .unwrap_or_else(|| model_name_of(&config.model));
    let kv_bytes = config
        .kv_cache_bytes
        .unwrap_or_else(|| pages::default_kv_cache_bytes(model.device()));
    let pages = pages::PageBudget::new(kv_bytes, config.page_tokens, &model);
    let limits = ModelLimits::of(model.config());
    let mask_token_id = model.config().diffusion.mask_token_id;
    let engine = Arc::new(
        engine::Engine::start(
            model,
            id.clone(),
            engine::EngineLimits {
                max_running: config.max_running,
                kv_pages: pages.total(),
                page_tokens: config.page_tokens,
                max_batch_tokens: config.max_batch_tokens,
            },
        )
        .map_err(WorkerError::EngineStart)?,
    );
    let draining = Arc::new(AtomicBool::new(false));
    let service = Arc::new(service::WorkerService {
        id: id.clone(),
        model_name: model_name.clone(),
        limits,
        mask_token_id,
        tokenizer_json,
        engine: Arc::clone(&engine),
        pages: Arc::clone(&pages),
        draining: Arc::clone(&draining),
    });
    let worker_server = |service| {
        WorkerServer::from_arc(service)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    };
    let link = Link::local(worker_server(Arc::clone(&service)));

    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    let (health, health_service) = sdlm_runtime::health_service();
    health
        .set_serving::<WorkerServer<service::WorkerService>>()
        .await;
    let stop_serving = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(sdlm_runtime::reflection_service())
        .add_service(worker_server(service))
        .serve_with_incoming_shutdown(bound.incoming, stop_serving.clone().cancelled_owned());

    let registration = (!config.etcd.is_empty()).then(|| {
        let record = WorkerRecord {
            id: id.clone(),
            addr: advertise.clone(),
            model: model_name.clone(),
        };
        LeasedKey::hold(
            config.etcd.clone(),
            format!("{WORKERS_PREFIX}{id}"),
            serde_json::to_string(&record).unwrap_or_default(),
            config.lease_ttl,
        )
    });
    tracing::info!(%addr, advertise, id, model = model_name, kv_pages = pages.total(), "worker serving");

    let drain_timeout = config.drain_timeout;
    let worker_id = id.clone();
    let task = tokio::spawn(async move {
        let server = tokio::spawn(server);
        shutdown.cancelled().await;
        tracing::info!(id = worker_id, "draining");
        draining.store(true, Ordering::SeqCst);
        health
            .set_not_serving::<WorkerServer<service::WorkerService>>()
            .await;
        if let Some(key) = registration {
            key.release().await;
        }
        let busy = || {
            engine.state.running.load(Ordering::SeqCst) + engine.state.queued.load(Ordering::SeqCst)
        };
        let started = Instant::now();
        while busy() > 0 && started.elapsed() < drain_timeout {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if busy() > 0 {
            tracing::info!(sequences = busy(), "drain timeout: handing sequences back");
            engine.state.hand_back.store(true, Ordering::SeqCst);
            while busy() > 0 && started.elapsed() < drain_timeout + Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        stop_serving.cancel();
        let served = server.await?;
        tokio::task::spawn_blocking(move || engine.stop()).await?;
        tracing::info!(id = worker_id, "worker stopped");
        served.map_err(WorkerError::from)
    });
    Ok(StartedWorker {
        addr,
        id,
        link,
        task,
    })
}
