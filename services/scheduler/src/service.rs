//! `sdlm.v1.Scheduler`: admits sequences (placing them now, or queueing them within the bound),
//! and answers which models the live workers serve.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use sdlm_proto::v1::scheduler_server::Scheduler;
use sdlm_proto::v1::{
    ModelInfo, ModelsRequest, ModelsResponse, RunRequest, SequenceEvent, ServedModel,
};
use sdlm_runtime::{metrics, status_label};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::placement::{place, NoPlace};
use crate::pool::WorkerPool;
use crate::sequence::{drive, Patience, Queue, Sequence};

pub struct SchedulerService {
    pub pool: Arc<WorkerPool>,
    pub queue: Arc<Queue>,
    pub patience: Patience,
    /// None without etcd: the only scheduler always leads.
    pub leading: Option<watch::Receiver<bool>>,
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type SubmitStream = ReceiverStream<Result<SequenceEvent, Status>>;

    async fn submit(
        &self,
        request: Request<RunRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let started = Instant::now();
        let result = self.admit(request).await;
        if let Err(status) = &result {
            metrics().request_done(
                "scheduler",
                &status_label(status.code()),
                started.elapsed().as_secs_f64(),
            );
        }
        result
    }

    async fn models(
        &self,
        _request: Request<ModelsRequest>,
    ) -> Result<Response<ModelsResponse>, Status> {
        let mut models: BTreeMap<String, ServedModel> = BTreeMap::new();
        for slot in self.pool.slots().iter().filter(|s| s.is_alive()) {
            let Some(info) = slot.info.lock().ok().and_then(|i| i.clone()) else {
                continue;
            };
            let served = models
                .entry(info.model.clone())
                .or_insert_with(|| ServedModel {
                    info: Some(ModelInfo {
                        name: info.model.clone(),
                        context_length: info.context_length,
                        vocab_size: info.vocab_size,
                        diffusion: info.mask_token_id.is_some(),
                        block_size: info.block_size,
                        workers: 0,
                    }),
                    worker: Some(info.clone()),
                });
            if let Some(i) = served.info.as_mut() {
                i.workers += 1;
            }
        }
        Ok(Response::new(ModelsResponse {
            models: models.into_values().collect(),
        }))
    }
}

impl SchedulerService {
    async fn admit(
        &self,
        request: Request<RunRequest>,
    ) -> Result<Response<ReceiverStream<Result<SequenceEvent, Status>>>, Status> {
        if let Some(leading) = &self.leading {
            if !*leading.borrow() {
                return Err(Status::unavailable("this scheduler is not the leader"));
            }
        }
        let deadline = sdlm_runtime::deadline::deadline_of(request.metadata());
        let span = tracing::info_span!("sequence", request_id = tracing::field::Empty);
        sdlm_runtime::continue_trace(&span, request.metadata());
        let run = request.into_inner();
        span.record("request_id", run.request_id.as_str());
        if run.params.is_none() {
            return Err(Status::invalid_argument("params is missing"));
        }
        if run.prompt_tokens.is_empty() {
            return Err(Status::invalid_argument(
                "prompt_tokens is empty; it needs at least 1 token",
            ));
        }
        let seq = Sequence {
            run,
            deadline,
            span: span.clone(),
        };
        let (first, ticket) = match place(&self.pool, &seq.run.model, seq.tokens()) {
            Ok(p) => (Some(p), None),
            Err(NoPlace::TooLarge { pages, largest }) => {
                return Err(NoPlace::too_large(pages, largest))
            }
            Err(NoPlace::Full | NoPlace::NoWorker) => (None, Some(self.queue.enter()?)),
        };
        tracing::info!(
            request_id = seq.run.request_id,
            trace_id = %sdlm_runtime::trace_id(&span),
            worker = first
                .as_ref()
                .map(|p| p.slot.id.clone())
                .unwrap_or_default(),
            queued = first.is_none(),
            "sequence admitted"
        );
        let (tx, rx) = mpsc::channel(16);
        let pool = Arc::clone(&self.pool);
        let patience = self.patience;
        let started = Instant::now();
        tokio::spawn(
            async move {
                let status = Arc::new(std::sync::Mutex::new("ok".to_string()));
                let observed = Arc::clone(&status);
                let (inner_tx, mut inner_rx) = mpsc::channel::<Result<SequenceEvent, Status>>(16);
                let forward = async move {
                    while let Some(event) = inner_rx.recv().await {
                        if let Err(s) = &event {
                            if let Ok(mut label) = observed.lock() {
                                *label = status_label(s.code());
                            }
                        }
                        if tx.send(event).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(drive(pool, seq, first, ticket, patience, inner_tx), forward);
                let label = status.lock().map(|s| s.clone()).unwrap_or_default();
                metrics().request_done("scheduler", &label, started.elapsed().as_secs_f64());
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
