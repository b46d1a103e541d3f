//! `sdlm.v1.Worker` over the engine: checks what the peer sent, reserves KV pages, and streams
//! the engine's events back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sdlm_engine::decode::ModelLimits;
use sdlm_proto::v1::worker_server::Worker;
use sdlm_proto::v1::{
    CapacityReport, CapacityRequest, DescribeRequest, RunRequest, SequenceEvent, WorkerInfo,
};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, Job};
use crate::pages::PageBudget;

pub struct WorkerService {
    pub id: String,
    pub model_name: String,
    pub limits: ModelLimits,
    pub mask_token_id: Option<u32>,
    pub tokenizer_json: String,
    pub engine: Arc<Engine>,
    pub pages: Arc<PageBudget>,
    pub draining: Arc<AtomicBool>,
}

impl WorkerService {
    /// Checks a run request, reserves its pages and hands it to the engine.
    fn start(
        &self,
        request: Request<RunRequest>,
        submitted: std::time::Instant,
    ) -> Result<Response<UnboundedReceiverStream<Result<SequenceEvent, Status>>>, Status> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::aborted("worker draining: no new sequences"));
        }
        let span = tracing::info_span!("run", request_id = tracing::field::Empty);
        sdlm_runtime::continue_trace(&span, request.metadata());
        let r = request.into_inner();
        span.record("request_id", r.request_id.as_str());
        if !r.model.is_empty() && r.model != self.model_name {
            return Err(Status::invalid_argument(format!(
                "model {:?} is not served here; this worker serves {:?}",
                r.model, self.model_name
            )));
        }
        let wire = r
            .params
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("params is missing"))?;
        let params = sdlm_runtime::wire::from_wire(wire);
        params
            .validate_for(&self.limits, r.prompt_tokens.len())
            .map_err(Status::invalid_argument)?;
        let vocab = self.limits.vocab_size;
        for (field, ids) in [
            ("prompt_tokens", &r.prompt_tokens),
            ("committed_tokens", &r.committed_tokens),
        ] {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(Status::invalid_argument(format!(
                    "{field} holds token {bad}, outside the vocabulary of {vocab}"
                )));
            }
        }
        let tokens = r.prompt_tokens.len() + params.max_new_tokens;
        let pages = self.pages.reserve(tokens).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} KV pages needed, {} free of {}",
                self.pages.pages_for(tokens),
                self.pages.free(),
                self.pages.total()
            ))
        })?;
        tracing::info!(
            request_id = r.request_id,
            trace_id = %sdlm_runtime::trace_id(&span),
            prompt_tokens = r.prompt_tokens.len(),
            committed = r.committed_tokens.len(),
            "run"
        );
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        self.engine.submit(Job {
            request_id: r.request_id,
            prompt: r.prompt_tokens,
            committed: r.committed_tokens,
            params,
            pages,
            events,
            submitted,
            span,
        })?;
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    fn capacity(&self) -> CapacityReport {
        let state = &self.engine.state;
        CapacityReport {
            kv_pages_total: self.pages.total() as u32,
            kv_pages_free: self.pages.free() as u32,
            page_tokens: self.pages.page_tokens() as u32,
            running: state.running.load(Ordering::SeqCst) as u32,
            queued: state.queued.load(Ordering::SeqCst) as u32,
            draining: self.draining.load(Ordering::SeqCst),
        }
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type RunStream = UnboundedReceiverStream<Result<SequenceEvent, Status>>;

    async fn run(&self, request: Request<RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let submitted = std::time::Instant::now();
        self.start(request, submitted).inspect_err(|s| {
            sdlm_runtime::metrics().request_done(
                "worker",
                &sdlm_runtime::status_label(s.code()),
                submitted.elapsed().as_secs_f64(),
            )
        })
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(WorkerInfo {
            worker_id: self.id.clone(),
            model: self.model_name.clone(),
            context_length: self.limits.context as u32,
            vocab_size: self.limits.vocab_size as u32,
            mask_token_id: self.mask_token_id,
            block_size: self.limits.block_size.unwrap_or(0) as u32,
            tokenizer_json: self.tokenizer_json.clone(),
            capacity: Some(self.capacity()),
        }))
    }

    async fn capacity(
        &self,
        _request: Request<CapacityRequest>,
    ) -> Result<Response<CapacityReport>, Status> {
        Ok(Response::new(WorkerService::capacity(self)))
    }
}
