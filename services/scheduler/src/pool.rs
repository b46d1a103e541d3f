//! The workers the scheduler knows, each probed for liveness and capacity. A worker is dead
//! after two failed probes in a row (a crashed process fails at once, a stopped one times
//! out), or at once when a sequence's stream to it breaks; a later good probe revives it.
//! Sequences placed on a worker watch its `alive` flag and move when it drops.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sdlm_proto::v1::worker_client::WorkerClient;
use sdlm_proto::v1::{CapacityReport, CapacityRequest, DescribeRequest, WorkerInfo};
use sdlm_runtime::Link;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

#[derive(Clone, Copy, Debug)]
pub struct Probing {
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed probes in a row that make a worker dead.
    pub failures: u32,
}

impl Default for Probing {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(1000),
            failures: 2,
        }
    }
}

pub struct WorkerSlot {
    pub id: String,
    pub addr: String,
    pub client: WorkerClient<Link>,
    pub info: Mutex<Option<WorkerInfo>>,
    pub capacity: Mutex<Option<CapacityReport>>,
    /// Pages this scheduler has reserved on the worker for sequences it placed there.
    pub reserved_pages: AtomicUsize,
    pub assigned: AtomicUsize,
    pub alive: watch::Sender<bool>,
    failures: AtomicU32,
    prober: Mutex<Option<JoinHandle<()>>>,
}

impl WorkerSlot {
    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Marks the worker dead now (its stream broke); sequences on it move.
    pub fn mark_dead(&self, why: &str) {
        if self.alive.send_replace(false) {
            tracing::warn!(
                worker = self.id,
                addr = self.addr,
                why,
                "worker marked dead"
            );
        }
    }

    pub fn model(&self) -> Option<String> {
        self.info.lock().ok()?.as_ref().map(|i| i.model.clone())
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        if let Ok(mut p) = self.prober.lock() {
            if let Some(task) = p.take() {
                task.abort();
            }
        }
    }
}

#[derive(Default)]
pub struct WorkerPool {
    slots: Mutex<BTreeMap<String, Arc<WorkerSlot>>>,
    /// Woken whenever capacity may have grown (a probe, a sequence leaving, a new worker).
    pub changed: Notify,
    probing: Mutex<Probing>,
    /// Workers in this process (`sdlm serve`), by address: called directly, not dialled.
    local: HashMap<String, Link>,
}

impl WorkerPool {
    pub fn new(probing: Probing, local: HashMap<String, Link>) -> Arc<Self> {
        Arc::new(Self {
            probing: Mutex::new(probing),
            local,
            ..Self::default()
        })
    }

    pub fn slots(&self) -> Vec<Arc<WorkerSlot>> {
        self.slots
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Makes the pool the set `workers` (id → address): new ones are probed, missing ones are
    /// marked dead and dropped.
    pub fn reconcile(self: &Arc<Self>, workers: &BTreeMap<String, String>) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        slots.retain(|id, slot| {
            let keep = workers.get(id) == Some(&slot.addr);
            if !keep {
                slot.mark_dead("left discovery");
            }
            keep
        });
        for (id, addr) in workers {
            if slots.contains_key(id) {
                continue;
            }
            let Some(link) = self.link_to(addr) else {
                tracing::warn!(worker = id, addr, "not a valid worker address; ignored");
                continue;
            };
            let client = WorkerClient::new(link).max_decoding_message_size(64 << 20);
            let slot = Arc::new(WorkerSlot {
                id: id.clone(),
                addr: addr.clone(),
                client,
                info: Mutex::new(None),
                capacity: Mutex::new(None),
                reserved_pages: AtomicUsize::new(0),
                assigned: AtomicUsize::new(0),
                alive: watch::channel(false).0,
                failures: AtomicU32::new(0),
                prober: Mutex::new(None),
            });
            let probing = self.probing.lock().map(|p| *p).unwrap_or_default();
            let task = tokio::spawn(probe_loop(
                Arc::downgrade(&slot),
                Arc::downgrade(self),
                probing,
            ));
            if let Ok(mut p) = slot.prober.lock() {
                *p = Some(task);
            }
            tracing::info!(worker = id, addr, "worker discovered");
            slots.insert(id.clone(), slot);
        }
        drop(slots);
        self.publish();
    }

    /// The local link for `addr`, or a lazily connected channel to it.
    fn link_to(&self, addr: &str) -> Option<Link> {
        if let Some(link) = self.local.get(addr) {
            return Some(link.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).ok()?;
        Some(Link::Net(
            endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect_lazy(),
        ))
    }

    /// Updates `workers_live` and wakes waiting sequences.
    pub fn publish(&self) {
        let live = self.slots().iter().filter(|s| s.is_alive()).count();
        sdlm_runtime::metrics().workers_live.set(live as i64);
        self.changed.notify_waiters();
    }
}

async fn probe_loop(
    slot: std::sync::Weak<WorkerSlot>,
    pool: std::sync::Weak<WorkerPool>,
    probing: Probing,
) {
    loop {
        let (Some(slot), Some(pool)) = (slot.upgrade(), pool.upgrade()) else {
            return;
        };
        let ok = probe(&slot, probing.timeout).await;
        let was_alive = slot.is_alive();
        if ok {
            slot.failures.store(0, Ordering::SeqCst);
            slot.alive.send_replace(true);
            if !was_alive {
                tracing::info!(worker = slot.id, "worker live");
            }
        } else if slot.failures.fetch_add(1, Ordering::SeqCst) + 1 >= probing.failures {
            slot.mark_dead("probes failed");
        }
        if ok || was_alive != slot.is_alive() {
            pool.publish();
        }
        drop((slot, pool));
        tokio::time::sleep(probing.interval).await;
    }
}

/// Asks for capacity (and, the first time, the model and tokenizer) within `timeout`.
async fn probe(slot: &WorkerSlot, timeout: Duration) -> bool {
    let mut client = slot.client.clone();
    let needs_info = slot.info.lock().map(|i| i.is_none()).unwrap_or(true);
    if needs_info {
        // The tokenizer can be megabytes: allow more than a capacity probe.
        match tokio::time::timeout(timeout * 5, client.describe(DescribeRequest {})).await {
            Ok(Ok(info)) => {
                if let Ok(mut i) = slot.info.lock() {
                    *i = Some(info.into_inner());
                }
            }
            _ => return false,
        }
    }
    match tokio::time::timeout(timeout, client.capacity(CapacityRequest {})).await {
        Ok(Ok(report)) => {
            if let Ok(mut c) = slot.capacity.lock() {
                *c = Some(report.into_inner());
            }
            true
        }
        _ => false,
    }
}
