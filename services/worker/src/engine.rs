//! The engine thread: it owns the model and the step batcher, admits the jobs the gRPC side
//! queues, and runs engine iterations: every running sequence advances one decoding step, and
//! all their forwards run as one ragged forward over the paged KV cache (`StepBatcher`).
//! Committed blocks go out as events the moment they land; a sequence whose caller went away
//! leaves the batch before the next iteration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sdlm_engine::decode::{DecodeStats, DecodingParams, SeqId, StepBatcher, StepOutput};
use sdlm_engine::kv::{PagePool, PrefixStats};
use sdlm_engine::{EngineError, Model};
use sdlm_proto::v1::SequenceEvent;
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use crate::pages::Pages;

/// One sequence to run.
pub struct Job {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub committed: Vec<u32>,
    pub params: DecodingParams,
    /// Its KV pages, returned when the job is dropped.
    pub pages: Pages,
    pub events: UnboundedSender<Result<SequenceEvent, Status>>,
    pub submitted: std::time::Instant,
    /// The sequence's span on this worker; each block is a child span.
    pub span: tracing::Span,
}

impl Job {
    /// Counts the sequence's end in `requests_total{service="worker"}`.
    fn done(&self, status: &str) {
        sdlm_runtime::metrics().request_done(
            "worker",
            status,
            self.submitted.elapsed().as_secs_f64(),
        );
    }
}

/// Shared between the engine thread and the gRPC side.
#[derive(Default)]
pub struct EngineState {
    pub running: AtomicUsize,
    pub queued: AtomicUsize,
    /// Set when draining has run out of time: every running sequence is handed back.
    pub hand_back: AtomicBool,
}

/// The engine thread's sizes.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    pub max_running: usize,
    pub kv_pages: usize,
    pub page_tokens: usize,
    pub max_batch_tokens: usize,
}

pub struct Engine {
    /// None once stopped. Behind locks so that `stop` needs no unique owner: in `sdlm serve`
    /// the scheduler's link to the worker service (and so to this engine) outlives the server.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    pub state: Arc<EngineState>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread over a KV cache of `kv_pages` pages of `page_tokens` tokens; at
    /// most `max_running` sequences advance at once, the rest wait; an iteration runs at most
    /// `max_batch_tokens` tokens (long prompts are prefilled in chunks). Fails when the KV
    /// cache cannot be allocated where the model runs.
    pub fn start(model: Model, worker_id: String, limits: EngineLimits) -> Result<Self, String> {
        let (jobs, rx) = mpsc::channel();
        let (started_tx, started) = mpsc::sync_channel(1);
        let state = Arc::new(EngineState::default());
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("sdlm-engine".into())
            .spawn(move || {
                let pool = PagePool::new(limits.kv_pages, limits.page_tokens);
                let mut batcher = match StepBatcher::new(&model, pool) {
                    Ok(b) => b.with_max_batch_tokens(limits.max_batch_tokens),
                    Err(e) => {
                        let _ = started_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                run_loop(
                    &mut batcher,
                    &worker_id,
                    limits.max_running.max(1),
                    &rx,
                    &shared,
                )
            })
            .map_err(|e| format!("spawning the engine thread: {e}"))?;
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the engine thread ended while starting".into()),
        }
        Ok(Self {
            jobs: Mutex::new(Some(jobs)),
            state,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job; false when the engine thread is gone.
    pub fn submit(&self, job: Job) -> Result<(), Status> {
        self.state.queued.fetch_add(1, Ordering::SeqCst);
        sdlm_runtime::metrics().queue_depth.inc();
        let sent = match self.jobs.lock() {
            Ok(jobs) => jobs.as_ref().map(|j| j.send(job).is_ok()),
            Err(_) => None,
        };
        if sent != Some(true) {
            self.state.queued.fetch_sub(1, Ordering::SeqCst);
            sdlm_runtime::metrics().queue_depth.dec();
            return Err(Status::internal("the engine thread has stopped"));
        }
        Ok(())
    }

    /// Closes the queue and waits for the thread to finish what it runs.
    pub fn stop(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// A job the batcher runs.
struct Running {
    job: Job,
    /// Counters already sent in events (of the decoder's current admission).
    reported: DecodeStats,
    /// The span of the block being decoded: opened at its first step, closed at its commit.
    block: Option<tracing::Span>,
    blocks: usize,
    /// Completion tokens so far, those it was resumed after included.
    tokens: usize,
}

fn run_loop(
    batcher: &mut StepBatcher<'_>,
    worker_id: &str,
    max_running: usize,
    jobs: &mpsc::Receiver<Job>,
    state: &EngineState,
) {
    let metrics = sdlm_runtime::metrics();
    let mut running: HashMap<SeqId, Running> = HashMap::new();
    let mut prefix = PrefixStats::default();
    loop {
        // Block for work when idle; otherwise take whatever has arrived, up to the limit.
        if running.is_empty() {
            batcher.release_finished();
            match jobs.recv() {
                Ok(job) => admit(batcher, job, state, &mut running),
                Err(_) => return,
            }
        }
        while running.len() < max_running {
            match jobs.try_recv() {
                Ok(job) => admit(batcher, job, state, &mut running),
                Err(_) => break,
            }
        }
        if state.hand_back.load(Ordering::SeqCst) && !running.is_empty() {
            for (id, r) in running.drain() {
                batcher.remove(id);
                r.job.done("aborted");
                let _ = r.job.events.send(Err(Status::aborted(
                    "worker draining: sequence handed back at its last committed block",
                )));
                leave(state);
            }
            continue;
        }
        running.retain(|&id, r| {
            if !r.job.events.is_closed() {
                return true;
            }
            tracing::debug!(
                request_id = r.job.request_id,
                "caller gone; sequence dropped"
            );
            batcher.remove(id);
            r.job.done("cancelled");
            leave(state);
            false
        });
        if running.is_empty() {
            continue;
        }
        metrics.batch_size.observe(running.len() as f64);
        for r in running.values_mut() {
            if r.block.is_none() {
                r.block = Some(tracing::info_span!(
                    parent: &r.job.span,
                    "block",
                    request_id = %r.job.request_id,
                    index = r.blocks,
                    tokens = tracing::field::Empty,
                    forward_passes = tracing::field::Empty,
                ));
            }
        }
        let mut ended = Vec::new();
        let outputs = batcher.step();
        prefix = count_prefix_cache(batcher.pool().prefix_stats(), prefix);
        for out in outputs {
            let id = out.id;
            if out.preempted {
                metrics.preemptions_total.inc();
            }
            if let Some(r) = running.get_mut(&id) {
                if let Some(status) = deliver(r, out, worker_id) {
                    r.job.done(&status);
                    ended.push(id);
                }
            }
        }
        for id in ended {
            running.remove(&id);
            leave(state);
        }
    }
}

/// Adds what the prefix cache counted since `before` to the metrics; returns the new counts.
fn count_prefix_cache(now: PrefixStats, before: PrefixStats) -> PrefixStats {
    let m = sdlm_runtime::metrics();
    m.kv_prefix_lookups_total
        .inc_by(now.lookups.saturating_sub(before.lookups));
    m.kv_prefix_hits_total
        .inc_by(now.hits.saturating_sub(before.hits));
    m.kv_prefix_evictions_total
        .inc_by(now.evictions.saturating_sub(before.evictions));
    now
}

/// A sequence left the engine.
fn leave(state: &EngineState) {
    state.running.fetch_sub(1, Ordering::SeqCst);
    sdlm_runtime::metrics().sequences_running.dec();
}

fn admit(
    batcher: &mut StepBatcher<'_>,
    job: Job,
    state: &EngineState,
    running: &mut HashMap<SeqId, Running>,
) {
    state.queued.fetch_sub(1, Ordering::SeqCst);
    sdlm_runtime::metrics().queue_depth.dec();
    if job.events.is_closed() {
        job.done("cancelled");
        return;
    }
    tracing::debug!(
        request_id = job.request_id,
        prompt = job.prompt.len(),
        resumed_after = job.committed.len(),
        kv_pages = job.pages.count(),
        "sequence started"
    );
    let id = batcher.add_resuming(
        job.prompt.clone(),
        job.committed.clone(),
        job.params.clone(),
    );
    state.running.fetch_add(1, Ordering::SeqCst);
    sdlm_runtime::metrics().sequences_running.inc();
    let tokens = job.committed.len();
    running.insert(
        id,
        Running {
            job,
            reported: DecodeStats::default(),
            block: None,
            blocks: 0,
            tokens,
        },
    );
}

/// Sends what one iteration did for a sequence as an event (when a block committed or the
/// sequence ended); returns the status label when the sequence has ended.
fn deliver(r: &mut Running, out: StepOutput, worker_id: &str) -> Option<String> {
    if let Some(e) = out.error {
        // Requests were validated before they got here; what fails now is either input only the
        // model can judge, or the engine itself.
        let status = match e {
            EngineError::Input(m) => Status::invalid_argument(m),
            other => {
                tracing::error!(request_id = r.job.request_id, error = %other, "decoding failed");
                Status::internal(format!("decoding failed: {other}"))
            }
        };
        let label = sdlm_runtime::status_label(status.code());
        let _ = r.job.events.send(Err(status));
        return Some(label);
    }
    if out.preempted {
        // Its decoder and pages are gone; it resumes after its committed tokens, counting anew.
        r.reported = DecodeStats::default();
        return None;
    }
    if out.tokens.is_empty() && out.finish.is_none() {
        return None;
    }
    let stats = out.stats;
    let forwards = stats
        .forward_passes()
        .saturating_sub(r.reported.forward_passes());
    let event = SequenceEvent {
        tokens: out.tokens,
        forward_passes: forwards as u32,
        steps: stats.steps.saturating_sub(r.reported.steps) as u32,
        edits: stats.edits.saturating_sub(r.reported.edits) as u32,
        finish_reason: out.finish.map(|f| f.as_str().to_string()),
        worker_id: worker_id.to_string(),
        migrations: 0,
        engine_seconds: ((stats.prefill_seconds + stats.decode_seconds)
            - (r.reported.prefill_seconds + r.reported.decode_seconds))
            .max(0.0),
    };
    let metrics = sdlm_runtime::metrics();
    metrics.forward_passes_total.inc_by(forwards as u64);
    metrics
        .tokens_generated_total
        .inc_by(event.tokens.len() as u64);
    r.tokens += event.tokens.len();
    if out.finish.is_some() {
        metrics
            .tokens_per_forward
            .observe(r.tokens as f64 / stats.forward_passes().max(1) as f64);
    }
    r.reported = stats;
    if let Some(block) = r.block.take() {
        block.record("tokens", event.tokens.len());
        block.record("forward_passes", forwards);
    }
    r.blocks += 1;
    let finished = event.finish_reason.is_some();
    let _ = r.job.events.send(Ok(event));
    finished.then(|| "ok".to_string())
}
