//! The engine thread: it owns the model and every running sequence's decoder, and advances them
//! in turns, one decoding step each per iteration, so that all running streams make progress.
//! (Batching those steps into one forward is the step batcher's job, in the worker-engine
//! issue; this loop is where it plugs in.) Committed blocks go out as events the moment they
//! land; a sequence whose caller went away is dropped at its next turn.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use sdlm_engine::decode::{decoder_resuming, DecodeStats, Decoder, DecodingParams};
use sdlm_engine::Model;
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

pub struct Engine {
    jobs: mpsc::Sender<Job>,
    pub state: Arc<EngineState>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the engine thread; at most `max_running` sequences advance at once, the rest wait.
    pub fn start(model: Model, worker_id: String, max_running: usize) -> Self {
        let (jobs, rx) = mpsc::channel();
        let state = Arc::new(EngineState::default());
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("sdlm-engine".into())
            .spawn(move || run_loop(&model, &worker_id, max_running.max(1), &rx, &shared))
            .ok();
        Self {
            jobs,
            state,
            thread,
        }
    }

    /// Queues a job; false when the engine thread is gone.
    pub fn submit(&self, job: Job) -> Result<(), Status> {
        self.state.queued.fetch_add(1, Ordering::SeqCst);
        sdlm_runtime::metrics().queue_depth.inc();
        self.jobs.send(job).map_err(|_| {
            self.state.queued.fetch_sub(1, Ordering::SeqCst);
            sdlm_runtime::metrics().queue_depth.dec();
            Status::internal("the engine thread has stopped")
        })
    }

    /// Closes the queue and waits for the thread to finish what it runs.
    pub fn stop(mut self) {
        let (closed, _) = mpsc::channel();
        self.jobs = closed;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Running<'m> {
    job: Job,
    decoder: Box<dyn Decoder + 'm>,
    reported: DecodeStats,
    /// Set when decoding failed: the sequence ends with this status.
    failed: Option<&'static str>,
    /// The span of the block being decoded: opened at its first step, closed at its commit.
    block: Option<tracing::Span>,
    blocks: usize,
}

fn run_loop(
    model: &Model,
    worker_id: &str,
    max_running: usize,
    jobs: &mpsc::Receiver<Job>,
    state: &EngineState,
) {
    let metrics = sdlm_runtime::metrics();
    let mut running: Vec<Running<'_>> = Vec::new();
    loop {
        // Block for work when idle; otherwise take whatever has arrived, up to the limit.
        if running.is_empty() {
            match jobs.recv() {
                Ok(job) => admit(model, job, state, &mut running),
                Err(_) => return,
            }
        }
        while running.len() < max_running {
            match jobs.try_recv() {
                Ok(job) => admit(model, job, state, &mut running),
                Err(_) => break,
            }
        }
        if state.hand_back.load(Ordering::SeqCst) && !running.is_empty() {
            let handed = running.len();
            for r in running.drain(..) {
                r.job.done("aborted");
                let _ = r.job.events.send(Err(Status::aborted(
                    "worker draining: sequence handed back at its last committed block",
                )));
            }
            state.running.fetch_sub(handed, Ordering::SeqCst);
            metrics.sequences_running.sub(handed as i64);
            continue;
        }
        metrics.batch_size.observe(running.len() as f64);
        for r in running.iter_mut() {
            advance(r, worker_id);
        }
        let before = running.len();
        running.retain(|r| {
            let ended = if r.failed.is_some() {
                r.failed
            } else if r.job.events.is_closed() {
                Some("cancelled")
            } else {
                r.decoder.finished().map(|_| "ok")
            };
            if let Some(status) = ended {
                r.job.done(status);
            }
            ended.is_none()
        });
        let ended = before - running.len();
        state.running.fetch_sub(ended, Ordering::SeqCst);
        metrics.sequences_running.sub(ended as i64);
    }
}

fn admit<'m>(model: &'m Model, job: Job, state: &EngineState, running: &mut Vec<Running<'m>>) {
    state.queued.fetch_sub(1, Ordering::SeqCst);
    sdlm_runtime::metrics().queue_depth.dec();
    if job.events.is_closed() {
        job.done("cancelled");
        return;
    }
    let decoder = decoder_resuming(model, &job.prompt, &job.committed, &job.params);
    match decoder {
        Ok(decoder) => {
            tracing::debug!(
                request_id = job.request_id,
                prompt = job.prompt.len(),
                resumed_after = job.committed.len(),
                kv_pages = job.pages.count(),
                "sequence started"
            );
            state.running.fetch_add(1, Ordering::SeqCst);
            sdlm_runtime::metrics().sequences_running.inc();
            running.push(Running {
                job,
                decoder,
                reported: DecodeStats::default(),
                failed: None,
                block: None,
                blocks: 0,
            });
        }
        Err(e) => {
            // Requests were validated before they got here; what fails now is either input
            // only the model can judge, or the engine itself.
            let status = match e {
                sdlm_engine::EngineError::Input(m) => Status::invalid_argument(m),
                other => Status::internal(format!("starting the sequence: {other}")),
            };
            job.done(&sdlm_runtime::status_label(status.code()));
            let _ = job.events.send(Err(status));
        }
    }
}

/// One step of one sequence; sends an event when a block commits or the sequence ends.
fn advance(r: &mut Running<'_>, worker_id: &str) {
    if r.job.events.is_closed() {
        tracing::debug!(
            request_id = r.job.request_id,
            "caller gone; sequence dropped"
        );
        return;
    }
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
    let committed = match r.decoder.step() {
        Ok(tokens) => tokens,
        Err(e) => {
            tracing::error!(request_id = r.job.request_id, error = %e, "decoding failed");
            let _ = r
                .job
                .events
                .send(Err(Status::internal(format!("decoding failed: {e}"))));
            r.failed = Some("internal");
            return;
        }
    };
    let finish = r.decoder.finished();
    if committed.is_empty() && finish.is_none() {
        return;
    }
    let stats = r.decoder.stats().clone();
    let forwards = stats.forward_passes() - r.reported.forward_passes();
    let event = SequenceEvent {
        tokens: committed,
        forward_passes: forwards as u32,
        steps: (stats.steps - r.reported.steps) as u32,
        edits: (stats.edits - r.reported.edits) as u32,
        finish_reason: finish.map(|f| f.as_str().to_string()),
        worker_id: worker_id.to_string(),
        migrations: 0,
        engine_seconds: (stats.prefill_seconds + stats.decode_seconds)
            - (r.reported.prefill_seconds + r.reported.decode_seconds),
    };
    let metrics = sdlm_runtime::metrics();
    metrics.forward_passes_total.inc_by(forwards as u64);
    metrics
        .tokens_generated_total
        .inc_by(event.tokens.len() as u64);
    if finish.is_some() {
        let total = r.decoder.completion().len() as f64;
        metrics
            .tokens_per_forward
            .observe(total / stats.forward_passes().max(1) as f64);
    }
    r.reported = stats;
    if let Some(block) = r.block.take() {
        block.record("tokens", event.tokens.len());
        block.record("forward_passes", forwards);
    }
    r.blocks += 1;
    let _ = r.job.events.send(Ok(event));
}
