//! sdlm-scheduler: `sdlm.v1.Scheduler`. One bounded global queue, admission in KV pages
//! against each worker's reported capacity, placement on the least-loaded worker, and failover
//! at block boundaries (ARCHITECTURE.md, "Why the scheduler places sequences, not steps").
//! Workers come from etcd (get + watch) or a static list; with etcd, replicas elect a leader
//! and only the leader admits.

mod placement;
mod pool;
mod sequence;
mod service;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use sdlm_proto::v1::scheduler_server::SchedulerServer;
use sdlm_runtime::etcd::{campaign, follow_prefix, WorkerRecord, WORKERS_PREFIX};
use sdlm_runtime::Link;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use placement::{choose, Candidate, NoPlace};
pub use pool::Probing;
pub use sequence::Patience;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Config(String),
    #[error("the server task stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub listen: SocketAddr,
    /// The address gateways dial, published when elected (default: the bound address).
    pub advertise: Option<String>,
    pub etcd: Vec<String>,
    /// Static worker addresses (without etcd).
    pub workers: Vec<String>,
    /// Workers in this process (`sdlm serve`), by their address in `workers`: called directly
    /// rather than dialled.
    pub local_workers: HashMap<String, Link>,
    /// Sequences that may wait for room; more get RESOURCE_EXHAUSTED.
    pub max_queue: usize,
    pub patience: Patience,
    pub probing: Probing,
    pub lease_ttl: Duration,
}

impl SchedulerConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            advertise: None,
            etcd: Vec::new(),
            workers: Vec::new(),
            local_workers: HashMap::new(),
            max_queue: 256,
            patience: Patience {
                queue_timeout: Duration::from_secs(60),
                max_moves: 16,
            },
            probing: Probing::default(),
            lease_ttl: Duration::from_secs(5),
        }
    }
}

pub struct StartedScheduler {
    pub addr: SocketAddr,
    /// The scheduler service, for a gateway in this process to call directly.
    pub link: Link,
    pub task: JoinHandle<Result<(), SchedulerError>>,
    pool: std::sync::Arc<pool::WorkerPool>,
}

impl StartedScheduler {
    /// Waits until `n` workers are live and described (their model known); false on timeout.
    pub async fn wait_for_workers(&self, n: usize, timeout: Duration) -> bool {
        let ready = async {
            loop {
                let changed = self.pool.changed.notified();
                let live = self
                    .pool
                    .slots()
                    .iter()
                    .filter(|s| s.is_alive() && s.model().is_some())
                    .count();
                if live >= n {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
            }
        };
        tokio::time::timeout(timeout, ready).await.is_ok()
    }
}

pub async fn start(
    config: SchedulerConfig,
    shutdown: CancellationToken,
) -> Result<StartedScheduler, SchedulerError> {
    if config.etcd.is_empty() && config.workers.is_empty() {
        return Err(SchedulerError::Config(
            "give --etcd or --workers: the scheduler needs a way to find workers".into(),
        ));
    }
    let pool = pool::WorkerPool::new(config.probing, config.local_workers.clone());
    let bound = sdlm_runtime::bind(config.listen)
        .await
        .map_err(|source| SchedulerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = bound.addr;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());

    let mut background: Vec<JoinHandle<()>> = Vec::new();
    let leading = if config.etcd.is_empty() {
        let workers: BTreeMap<String, String> = config
            .workers
            .iter()
            .map(|a| (a.clone(), a.clone()))
            .collect();
        pool.reconcile(&workers);
        None
    } else {
        let (mut keys, follow) = follow_prefix(config.etcd.clone(), WORKERS_PREFIX.to_string());
        let feed = std::sync::Arc::clone(&pool);
        background.push(follow);
        background.push(tokio::spawn(async move {
            loop {
                let workers: BTreeMap<String, String> = keys
                    .borrow_and_update()
                    .values()
                    .filter_map(|v| serde_json::from_str::<WorkerRecord>(v).ok())
                    .map(|r| (r.id, r.addr))
                    .collect();
                feed.reconcile(&workers);
                if keys.changed().await.is_err() {
                    return;
                }
            }
        }));
        let (leading, election) =
            campaign(config.etcd.clone(), advertise.clone(), config.lease_ttl);
        background.push(election);
        Some(leading)
    };

    let service = std::sync::Arc::new(service::SchedulerService {
        pool: std::sync::Arc::clone(&pool),
        queue: sequence::Queue::new(config.max_queue),
        patience: config.patience,
        leading,
    });
    let scheduler_server = |service| {
        SchedulerServer::from_arc(service)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    };
    let link = Link::local(scheduler_server(std::sync::Arc::clone(&service)));
    let (health, health_service) = sdlm_runtime::health_service();
    health
        .set_serving::<SchedulerServer<service::SchedulerService>>()
        .await;
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(sdlm_runtime::reflection_service())
        .add_service(scheduler_server(service))
        .serve_with_incoming_shutdown(bound.incoming, shutdown.cancelled_owned());
    tracing::info!(%addr, advertise, "scheduler serving");
    let task = tokio::spawn(async move {
        let served = server.await;
        for task in background {
            task.abort();
        }
        served.map_err(SchedulerError::from)
    });
    Ok(StartedScheduler {
        addr,
        link,
        task,
        pool,
    })
}
