//! etcd discovery over etcd's own v3 gRPC API (`proto/etcd`, compiled by protox): keys held
//! under a lease kept alive at a third of its TTL, a prefix followed by get-then-watch, and the
//! scheduler election. Every loop here survives etcd going away: it keeps the last known state
//! and retries, so a short etcd outage never stops serving.

use std::collections::BTreeMap;
use std::time::Duration;

use sdlm_proto::etcd::etcdserverpb::kv_client::KvClient;
use sdlm_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use sdlm_proto::etcd::etcdserverpb::watch_client::WatchClient;
use sdlm_proto::etcd::etcdserverpb::watch_request::RequestUnion;
use sdlm_proto::etcd::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest,
};
use sdlm_proto::etcd::mvccpb::event::EventType;
use sdlm_proto::etcd::v3electionpb::election_client::ElectionClient;
use sdlm_proto::etcd::v3electionpb::{CampaignRequest, LeaderRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Where workers register: `/sdlm/v1/workers/<id>`.
pub const WORKERS_PREFIX: &str = "/sdlm/v1/workers/";
/// The scheduler election's name; its leader's value is the leader's gRPC address.
pub const SCHEDULER_ELECTION: &str = "/sdlm/v1/schedulers/leader";

/// Pause before the first retry when etcd is unreachable; it doubles up to [`RETRY_MAX`].
const RETRY: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(4);

/// Waits between attempts: half a second after an attempt that had been working, doubling up
/// to four seconds while etcd stays away, so that an outage neither floods the log nor delays
/// recovery by much.
struct Backoff {
    delay: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { delay: RETRY }
    }

    async fn wait(&mut self, attempt_lasted: Duration) {
        if attempt_lasted > RETRY_MAX * 2 {
            self.delay = RETRY;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(RETRY_MAX);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint answered ({0})")]
    Connect(String),
    #[error("etcd: {0}")]
    Call(#[from] tonic::Status),
    #[error("etcd: {0}")]
    Protocol(String),
    /// etcd answered that the lease is gone (TTL 0): whatever it held is no longer ours.
    #[error("etcd lease {0:x} expired")]
    LeaseExpired(i64),
}

/// What a worker writes under its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    /// host:port the scheduler dials.
    pub addr: String,
    pub model: String,
}

/// Comma-separated etcd endpoints, as `--etcd` takes them (`http://` added when missing).
pub fn endpoints(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            if u.contains("://") {
                u.to_string()
            } else {
                format!("http://{u}")
            }
        })
        .collect()
}

/// A channel to the first endpoint that accepts a connection.
async fn connect(endpoints: &[String]) -> Result<Channel, EtcdError> {
    let mut errors = Vec::new();
    for url in endpoints {
        let endpoint = match Endpoint::from_shared(url.clone()) {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("{url}: {e}"));
                continue;
            }
        };
        match endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect()
            .await
        {
            Ok(channel) => return Ok(channel),
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    Err(EtcdError::Connect(errors.join("; ")))
}

/// The end of the key range that holds every key starting with `prefix` (etcd's convention:
/// the prefix with its last byte below 0xff incremented).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every key under `prefix` and its value, and the revision they were read at.
pub async fn list_prefix(
    endpoints: &[String],
    prefix: &str,
) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
    let mut kv = KvClient::new(connect(endpoints).await?);
    range(&mut kv, prefix).await
}

async fn range(
    kv: &mut KvClient<Channel>,
    prefix: &str,
) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
    let response = kv
        .range(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..RangeRequest::default()
        })
        .await?
        .into_inner();
    let revision = response.header.map_or(0, |h| h.revision);
    let keys = response
        .kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            )
        })
        .collect();
    Ok((keys, revision))
}

/// A lease kept alive at a third of its TTL until it is lost or the future is dropped.
async fn keep_alive(channel: Channel, id: i64, ttl: Duration) -> Result<(), EtcdError> {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let (tx, rx) = mpsc::channel(4);
    let closed = |_| EtcdError::Protocol("keep-alive stream closed".into());
    // etcd answers the call only after the first request, so it goes in before the call.
    tx.send(LeaseKeepAliveRequest { id })
        .await
        .map_err(closed)?;
    let mut lease = LeaseClient::new(channel);
    let mut responses = lease
        .lease_keep_alive(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut first = true;
    loop {
        if !first {
            tx.send(LeaseKeepAliveRequest { id })
                .await
                .map_err(closed)?;
        }
        first = false;
        match tokio::time::timeout(period, responses.message()).await {
            Ok(Ok(Some(r))) if r.ttl <= 0 => return Err(EtcdError::LeaseExpired(id)),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Err(EtcdError::Protocol("keep-alive stream ended".into())),
            Ok(Err(status)) => return Err(status.into()),
            // No answer within the period: send the next keep-alive rather than wait forever.
            Err(_) => continue,
        }
        tokio::time::sleep(period).await;
    }
}

async fn grant(channel: &Channel, ttl: Duration) -> Result<i64, EtcdError> {
    let granted = LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest {
            ttl: ttl.as_secs().max(1) as i64,
            id: 0,
        })
        .await?
        .into_inner();
    if !granted.error.is_empty() {
        return Err(EtcdError::Protocol(granted.error));
    }
    Ok(granted.id)
}

/// A key kept in etcd under a lease by a background task; it re-grants the lease and writes the
/// key again when the lease is lost (etcd restarted, a long pause), and revokes it on
/// [`LeasedKey::release`], which deletes the key at once instead of after the TTL.
pub struct LeasedKey {
    task: JoinHandle<()>,
    lease: watch::Receiver<Option<i64>>,
    endpoints: Vec<String>,
}

impl LeasedKey {
    pub fn hold(endpoints: Vec<String>, key: String, value: String, ttl: Duration) -> Self {
        let (tx, lease) = watch::channel(None);
        let task = tokio::spawn(hold_loop(endpoints.clone(), key, value, ttl, tx));
        Self {
            task,
            lease,
            endpoints,
        }
    }

    /// Waits until the key is written.
    pub async fn registered(&mut self) {
        let _ = self.lease.wait_for(Option::is_some).await;
    }

    /// Stops the keep-alive and revokes the lease (best effort, bounded by a few seconds).
    pub async fn release(self) {
        self.task.abort();
        let Some(id) = *self.lease.borrow() else {
            return;
        };
        let revoke = async {
            let mut lease = LeaseClient::new(connect(&self.endpoints).await?);
            lease.lease_revoke(LeaseRevokeRequest { id }).await?;
            Ok::<(), EtcdError>(())
        };
        match tokio::time::timeout(Duration::from_secs(3), revoke).await {
            Ok(Ok(())) => tracing::info!(lease = id, "etcd lease revoked"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not revoke the etcd lease"),
            Err(_) => tracing::warn!("revoking the etcd lease timed out"),
        }
    }
}

async fn hold_loop(
    endpoints: Vec<String>,
    key: String,
    value: String,
    ttl: Duration,
    lease: watch::Sender<Option<i64>>,
) {
    let mut backoff = Backoff::new();
    loop {
        let started = std::time::Instant::now();
        if let Err(e) = hold_once(&endpoints, &key, &value, ttl, &lease).await {
            tracing::warn!(key, error = %e, "etcd registration lost; registering again");
        }
        lease.send_replace(None);
        backoff.wait(started.elapsed()).await;
    }
}

async fn hold_once(
    endpoints: &[String],
    key: &str,
    value: &str,
    ttl: Duration,
    lease: &watch::Sender<Option<i64>>,
) -> Result<(), EtcdError> {
    let channel = connect(endpoints).await?;
    let id = grant(&channel, ttl).await?;
    KvClient::new(channel.clone())
        .put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease: id,
        })
        .await?;
    lease.send_replace(Some(id));
    tracing::info!(key, lease = id, ttl_s = ttl.as_secs(), "registered in etcd");
    keep_alive(channel, id, ttl).await
}

/// The keys under `prefix` and their values, kept current by get + watch from the next
/// revision. When etcd is unreachable the last known set stays published.
pub fn follow_prefix(
    endpoints: Vec<String>,
    prefix: String,
) -> (watch::Receiver<BTreeMap<String, String>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(BTreeMap::new());
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            let started = std::time::Instant::now();
            if let Err(e) = follow_once(&endpoints, &prefix, &tx).await {
                tracing::warn!(prefix, error = %e, "etcd watch lost; keeping the last known set");
            }
            backoff.wait(started.elapsed()).await;
        }
    });
    (rx, task)
}

async fn follow_once(
    endpoints: &[String],
    prefix: &str,
    tx: &watch::Sender<BTreeMap<String, String>>,
) -> Result<(), EtcdError> {
    let channel = connect(endpoints).await?;
    let (mut keys, revision) = range(&mut KvClient::new(channel.clone()), prefix).await?;
    tx.send_replace(keys.clone());
    let (requests, rx) = mpsc::channel(1);
    requests
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision: revision + 1,
            })),
        })
        .await
        .map_err(|_| EtcdError::Protocol("watch request not sent".into()))?;
    let mut stream = WatchClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(response) = stream.message().await? {
        if response.canceled {
            return Err(EtcdError::Protocol(format!(
                "watch canceled: {}",
                response.cancel_reason
            )));
        }
        for event in response.events {
            let Some(kv) = event.kv else { continue };
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if event.r#type == EventType::Delete as i32 {
                keys.remove(&key);
            } else {
                keys.insert(key, String::from_utf8_lossy(&kv.value).into_owned());
            }
        }
        tx.send_replace(keys.clone());
    }
    // Keep the request sender alive until here: dropping it ends the watch.
    drop(requests);
    Err(EtcdError::Protocol("watch stream ended".into()))
}

/// Campaigns for the scheduler election with `value` (this scheduler's address); publishes
/// true while this process leads. An expired lease ends the leadership at once. When etcd is
/// unreachable the leader keeps leading (nobody can be elected meanwhile); once etcd answers
/// again it steps down and campaigns anew, so there is never a second leader, at the cost of up
/// to one TTL without one after an outage.
pub fn campaign(
    endpoints: Vec<String>,
    value: String,
    ttl: Duration,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            let started = std::time::Instant::now();
            match lead_once(&endpoints, &value, ttl, &tx).await {
                Err(e @ EtcdError::LeaseExpired(_)) => {
                    tracing::warn!(error = %e, "scheduler election: leadership lost");
                    tx.send_replace(false);
                }
                Err(e) => tracing::warn!(error = %e, "scheduler election: etcd unreachable"),
                Ok(()) => {}
            }
            backoff.wait(started.elapsed()).await;
        }
    });
    (rx, task)
}

async fn lead_once(
    endpoints: &[String],
    value: &str,
    ttl: Duration,
    leading: &watch::Sender<bool>,
) -> Result<(), EtcdError> {
    let channel = connect(endpoints).await?;
    let id = grant(&channel, ttl).await?;
    // etcd answers: whatever this process led on before is over; campaign from scratch.
    if leading.send_replace(false) {
        tracing::warn!("etcd is back: stepping down to campaign again");
    }
    // The lease must stay alive while the campaign waits, for as long as another leads.
    let alive = keep_alive(channel.clone(), id, ttl);
    tokio::pin!(alive);
    let mut election = ElectionClient::new(channel);
    let elected = election.campaign(CampaignRequest {
        name: SCHEDULER_ELECTION.as_bytes().to_vec(),
        lease: id,
        value: value.as_bytes().to_vec(),
    });
    tokio::select! {
        lost = &mut alive => return lost,
        won = elected => { won?; }
    }
    tracing::info!(value, "elected scheduler leader");
    leading.send_replace(true);
    alive.await
}

/// The current scheduler leader's address, polled every half second (one read per poll).
pub fn follow_leader(endpoints: Vec<String>) -> (watch::Receiver<Option<String>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut client: Option<ElectionClient<Channel>> = None;
        loop {
            if client.is_none() {
                client = connect(&endpoints).await.ok().map(ElectionClient::new);
            }
            if let Some(c) = client.as_mut() {
                let asked = c
                    .leader(LeaderRequest {
                        name: SCHEDULER_ELECTION.as_bytes().to_vec(),
                    })
                    .await;
                match asked {
                    Ok(r) => {
                        let leader = r
                            .into_inner()
                            .kv
                            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
                        tx.send_if_modified(|old| {
                            let changed = *old != leader;
                            if changed {
                                tracing::info!(leader = ?leader, "following the scheduler leader");
                            }
                            *old = leader.clone();
                            changed
                        });
                    }
                    // etcd answers "no leader" with an error; keep the last known one meanwhile.
                    Err(e) => tracing::debug!(error = %e, "no scheduler leader known"),
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::{endpoints, prefix_end};

    #[test]
    fn a_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(
            prefix_end(b"/sdlm/v1/workers/"),
            b"/sdlm/v1/workers0".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn endpoints_are_split_and_given_a_scheme() {
        assert_eq!(
            endpoints("127.0.0.1:2379, http://h:1,"),
            vec!["http://127.0.0.1:2379", "http://h:1"]
        );
    }
}
