//! Which scheduler to call: one in this process, a fixed address, or the etcd election's
//! current leader (followed in the background). Channels are kept per address and reused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sdlm_proto::v1::scheduler_client::SchedulerClient;
use sdlm_runtime::Link;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

pub enum Upstream {
    Local(Link),
    Fixed(String),
    Leader(watch::Receiver<Option<String>>),
}

pub struct Schedulers {
    upstream: Upstream,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Schedulers {
    pub fn new(upstream: Upstream) -> Self {
        Self {
            upstream,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client for the scheduler to use now.
    pub fn client(&self) -> Result<SchedulerClient<Link>, Status> {
        let addr = match &self.upstream {
            Upstream::Local(link) => return Ok(Self::client_over(link.clone())),
            Upstream::Fixed(a) => a.clone(),
            Upstream::Leader(rx) => rx
                .borrow()
                .clone()
                .ok_or_else(|| Status::unavailable("no scheduler leader is known yet"))?,
        };
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| Status::internal("scheduler channel table poisoned"))?;
        let channel = match channels.get(&addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| Status::internal(format!("scheduler address {addr:?}: {e}")))?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .connect_lazy();
                channels.insert(addr, c.clone());
                c
            }
        };
        Ok(Self::client_over(Link::Net(channel)))
    }

    fn client_over(link: Link) -> SchedulerClient<Link> {
        SchedulerClient::new(link).max_decoding_message_size(64 << 20)
    }

    /// Waits (briefly) for the followed leader to change, after the current one failed.
    pub async fn await_new_leader(&self, wait: Duration) {
        if let Upstream::Leader(rx) = &self.upstream {
            let mut rx = rx.clone();
            let _ = tokio::time::timeout(wait, rx.changed()).await;
        } else {
            tokio::time::sleep(wait.min(Duration::from_millis(200))).await;
        }
    }
}
