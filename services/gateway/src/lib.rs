//! sdlm-gateway: the public `sdlm.v1.Generation` service. Validates every field (naming the
//! field and the limit), checks API keys, tokenizes with the served model's tokenizer, submits
//! to the scheduler (fixed, or the etcd election's leader), and streams one message per
//! committed block with UTF-8 kept whole across block boundaries.

mod auth;
mod catalog;
mod params;
mod service;
mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sdlm_proto::v1::generation_server::GenerationServer;
use sdlm_runtime::Link;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use auth::ApiKeys;
pub use text::TextStream;
use upstream::{Schedulers, Upstream};

mod upstream;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Config(String),
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub etcd: Vec<String>,
    /// A fixed scheduler address (without etcd).
    pub scheduler: Option<String>,
    /// The scheduler in this process (`sdlm serve`), called directly; takes the place of
    /// `scheduler`.
    pub local_scheduler: Option<Link>,
    pub api_keys: Option<PathBuf>,
}

pub struct StartedGateway {
    pub addr: SocketAddr,
    pub task: JoinHandle<Result<(), GatewayError>>,
}

pub async fn start(
    config: GatewayConfig,
    shutdown: CancellationToken,
) -> Result<StartedGateway, GatewayError> {
    let mut leader_known = None;
    let upstream = match (
        &config.local_scheduler,
        &config.scheduler,
        config.etcd.is_empty(),
    ) {
        (Some(link), None, true) => Upstream::Local(link.clone()),
        (None, Some(addr), true) => Upstream::Fixed(addr.clone()),
        (None, None, false) => {
            let (leader, _task) = sdlm_runtime::etcd::follow_leader(config.etcd.clone());
            leader_known = Some(leader.clone());
            Upstream::Leader(leader)
        }
        (None, None, true) => {
            return Err(GatewayError::Config(
                "give --scheduler ADDR or --etcd URLS: the gateway needs a scheduler".into(),
            ))
        }
        _ => {
            return Err(GatewayError::Config(
                "give one way to reach the scheduler: --scheduler or --etcd, not both".into(),
            ))
        }
    };
    let keys = match &config.api_keys {
        Some(path) => Some(ApiKeys::load(path).map_err(GatewayError::Config)?),
        None => None,
    };
    let service = service::GenerationService {
        catalog: Arc::new(catalog::Catalog::default()),
        schedulers: Arc::new(Schedulers::new(upstream)),
    };
    let bound = sdlm_runtime::bind(config.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = bound.addr;
    let (health, health_service) = sdlm_runtime::health_service();
    match leader_known {
        // Not ready until the first leader is known (report_readiness takes over from here).
        Some(leader) => {
            health
                .set_not_serving::<GenerationServer<service::GenerationService>>()
                .await;
            tokio::spawn(report_readiness(health, leader));
        }
        None => {
            health
                .set_serving::<GenerationServer<service::GenerationService>>()
                .await
        }
    }
    let generation = GenerationServer::with_interceptor(service, move |request| match &keys {
        Some(keys) => keys.check(request),
        None => Ok(request),
    });
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(sdlm_runtime::reflection_service())
        .add_service(generation)
        .serve_with_incoming_shutdown(bound.incoming, shutdown.cancelled_owned());
    tracing::info!(%addr, auth = config.api_keys.is_some(), "gateway serving");
    let task = tokio::spawn(async move { server.await.map_err(GatewayError::from) });
    Ok(StartedGateway { addr, task })
}

/// With etcd discovery, `sdlm.v1.Generation` is reported serving only while a scheduler leader
/// is known, so a readiness probe on that service holds traffic back from a gateway that would
/// answer UNAVAILABLE. The server itself ("" in gRPC health) stays serving: a liveness probe
/// must not restart a gateway for an election in progress.
async fn report_readiness(
    health: tonic_health::server::HealthReporter,
    mut leader: tokio::sync::watch::Receiver<Option<String>>,
) {
    loop {
        if leader.borrow_and_update().is_some() {
            health
                .set_serving::<GenerationServer<service::GenerationService>>()
                .await;
        } else {
            health
                .set_not_serving::<GenerationServer<service::GenerationService>>()
                .await;
        }
        if leader.changed().await.is_err() {
            return;
        }
    }
}
