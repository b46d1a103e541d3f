//! `sdlm.v1.Generation`: validates, tokenizes, submits to the scheduler, and turns committed
//! blocks into text. If the scheduler fails mid-stream (a leader killed), the request is
//! submitted again to the next leader with the tokens committed so far, so the text neither
//! loses nor repeats anything.

use std::sync::Arc;
use std::time::Duration;

use sdlm_engine::decode::DecodingParams;
use sdlm_proto::v1::generation_server::Generation;
use sdlm_proto::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamResponse, InfillRequest, ListModelsRequest,
    ListModelsResponse, RunRequest, SequenceEvent, Usage,
};
use sdlm_runtime::deadline::{deadline_of, remaining};
use sdlm_runtime::{metrics, status_label};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::catalog::{Catalog, Served};
use crate::params::{request_id, resolve};
use crate::text::TextStream;
use crate::upstream::Schedulers;

/// Submissions of one request to the scheduler before giving up (leader changes).
const MAX_SUBMISSIONS: u32 = 4;

pub struct GenerationService {
    pub catalog: Arc<Catalog>,
    pub schedulers: Arc<Schedulers>,
}

/// A request ready to run.
struct Prepared {
    served: Arc<Served>,
    prompt: Vec<u32>,
    params: DecodingParams,
    request_id: String,
    deadline: Option<Instant>,
    /// The request's span, continuing the caller's trace when it sent one.
    span: tracing::Span,
    started: Instant,
}

type Pieces = mpsc::Receiver<Result<GenerateStreamResponse, Status>>;

impl GenerationService {
    /// A `GenerateRequest` ready to run (Generate and GenerateStream).
    async fn prepare_text(&self, request: &Request<GenerateRequest>) -> Result<Prepared, Status> {
        let r = request.get_ref();
        self.prepare(
            request.metadata(),
            &r.model,
            Prompt::Text(&r.prompt),
            r.params.as_ref(),
            r.request_id.as_deref(),
        )
        .await
    }

    /// Validates, tokenizes and resolves a request; a refusal is counted in the metrics here.
    async fn prepare(
        &self,
        metadata: &MetadataMap,
        model: &str,
        prompt: Prompt<'_>,
        params: Option<&sdlm_proto::v1::DecodingParams>,
        given_id: Option<&str>,
    ) -> Result<Prepared, Status> {
        let started = Instant::now();
        self.check(metadata, model, prompt, params, given_id, started)
            .await
            .inspect_err(|status| {
                metrics().request_done(
                    "gateway",
                    &status_label(status.code()),
                    started.elapsed().as_secs_f64(),
                )
            })
    }

    async fn check(
        &self,
        metadata: &MetadataMap,
        model: &str,
        prompt: Prompt<'_>,
        params: Option<&sdlm_proto::v1::DecodingParams>,
        given_id: Option<&str>,
        started: Instant,
    ) -> Result<Prepared, Status> {
        let request_id = request_id(given_id)?;
        let span = tracing::info_span!("generate", request_id = %request_id, model = tracing::field::Empty);
        sdlm_runtime::continue_trace(&span, metadata);
        let served = self.catalog.get(&self.schedulers, model).await?;
        span.record("model", served.info.name.as_str());
        let prompt = prompt.tokens(&served)?;
        let params = resolve(params, &served.limits, prompt.len())?;
        Ok(Prepared {
            served,
            prompt,
            params,
            request_id,
            deadline: deadline_of(metadata),
            span,
            started,
        })
    }

    /// Runs a prepared request; its text arrives block by block, the last piece with
    /// `finish_reason` and usage.
    fn launch(&self, p: Prepared) -> Pieces {
        let (tx, rx) = mpsc::channel(16);
        let schedulers = Arc::clone(&self.schedulers);
        let span = p.span.clone();
        tokio::spawn(
            async move {
            let outcome = pieces(&schedulers, &p, &tx).await;
            let label = match &outcome {
                Ok(()) => "ok".to_string(),
                Err(s) => status_label(s.code()),
            };
            metrics().request_done("gateway", &label, p.started.elapsed().as_secs_f64());
            if let Err(status) = outcome {
                tracing::info!(code = ?status.code(), error = status.message(), "request failed");
                let _ = tx.send(Err(status)).await;
            }
        }
            .instrument(span),
        );
        rx
    }
}

enum Prompt<'a> {
    Text(&'a str),
    Infill { prefix: &'a str, suffix: &'a str },
}

impl Prompt<'_> {
    fn tokens(&self, served: &Served) -> Result<Vec<u32>, Status> {
        let encode = |text: &str, special: bool| -> Result<Vec<u32>, Status> {
            served
                .tokenizer
                .encode(text, special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Status::invalid_argument(format!("the prompt does not tokenize: {e}")))
        };
        match self {
            Prompt::Text(text) => {
                if text.is_empty() {
                    return Err(Status::invalid_argument(
                        "prompt is empty; it needs at least 1 character",
                    ));
                }
                encode(text, true)
            }
            Prompt::Infill { prefix, suffix } => {
                if prefix.is_empty() && suffix.is_empty() {
                    return Err(Status::invalid_argument(
                        "prefix and suffix are both empty; give at least one",
                    ));
                }
                let [p, s, m] = served.fim.ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "model {:?} has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>)",
                        served.info.name
                    ))
                })?;
                // Prefix-suffix-middle, the order the model was trained on.
                let mut ids = vec![p];
                ids.extend(encode(prefix, false)?);
                ids.push(s);
                ids.extend(encode(suffix, false)?);
                ids.push(m);
                Ok(ids)
            }
        }
    }
}

/// Feeds `tx` with the request's pieces; an error ends the request with that status.
async fn pieces(
    schedulers: &Schedulers,
    p: &Prepared,
    tx: &mpsc::Sender<Result<GenerateStreamResponse, Status>>,
) -> Result<(), Status> {
    let mut text = TextStream::new(&p.served.tokenizer, p.params.stop.clone());
    let mut committed: Vec<u32> = Vec::new();
    let mut usage = Usage {
        prompt_tokens: p.prompt.len() as u32,
        ..Usage::default()
    };
    let mut first_block = true;
    let mut submissions = 0;
    loop {
        submissions += 1;
        let mut events = match submit(schedulers, p, &committed).await {
            Ok(events) => events,
            Err(status) if retryable(&status) && submissions < MAX_SUBMISSIONS => {
                tracing::warn!(request_id = p.request_id, error = %status, "scheduler unavailable; submitting again");
                schedulers.await_new_leader(Duration::from_secs(2)).await;
                continue;
            }
            Err(status) => return Err(status),
        };
        loop {
            let next = match p.deadline {
                Some(d) => tokio::time::timeout_at(d, events.message())
                    .await
                    .map_err(|_| Status::deadline_exceeded("the request's deadline passed"))?,
                None => events.message().await,
            };
            let event: SequenceEvent = match next {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(status) if retryable(&status) && submissions < MAX_SUBMISSIONS => break,
                Err(status) => return Err(status),
            };
            committed.extend_from_slice(&event.tokens);
            usage.completion_tokens += event.tokens.len() as u32;
            usage.forward_passes += event.forward_passes;
            usage.steps += event.steps;
            usage.edits += event.edits;
            usage.engine_seconds += event.engine_seconds;
            usage.migrations = usage.migrations.max(event.migrations);
            if first_block && !event.tokens.is_empty() {
                first_block = false;
                metrics()
                    .time_to_first_block_seconds
                    .observe(p.started.elapsed().as_secs_f64());
            }
            let mut piece = text.push(&event.tokens).map_err(Status::internal)?;
            let finish = if text.stopped() {
                Some("stop_string".to_string())
            } else {
                event.finish_reason.clone()
            };
            if finish.is_some() {
                piece.push_str(&text.finish());
                usage.tokens_per_forward =
                    usage.completion_tokens as f64 / usage.forward_passes.max(1) as f64;
            }
            let message = GenerateStreamResponse {
                text: piece,
                block_tokens: event.tokens.len() as u32,
                finish_reason: finish.clone(),
                usage: finish.is_some().then_some(usage),
                request_id: p.request_id.clone(),
            };
            if tx.send(Ok(message)).await.is_err() {
                // The client went away: dropping the upstream stream cancels the sequence.
                return Err(Status::cancelled("the client went away"));
            }
            if finish.is_some() {
                return Ok(());
            }
        }
        if submissions >= MAX_SUBMISSIONS {
            return Err(Status::unavailable(
                "the scheduler stream broke repeatedly; giving up",
            ));
        }
        tracing::warn!(
            request_id = p.request_id,
            committed = committed.len(),
            "scheduler stream broke; resuming from the last committed block"
        );
        schedulers.await_new_leader(Duration::from_secs(2)).await;
    }
}

async fn submit(
    schedulers: &Schedulers,
    p: &Prepared,
    committed: &[u32],
) -> Result<tonic::Streaming<SequenceEvent>, Status> {
    let mut client = schedulers.client()?;
    let mut request = Request::new(RunRequest {
        request_id: p.request_id.clone(),
        model: p.served.info.name.clone(),
        prompt_tokens: p.prompt.clone(),
        committed_tokens: committed.to_vec(),
        params: Some(sdlm_runtime::wire::to_wire(&p.params)),
    });
    sdlm_runtime::propagate(&p.span, request.metadata_mut());
    if let Some(d) = p.deadline {
        if remaining(d).is_zero() {
            return Err(Status::deadline_exceeded("the request's deadline passed"));
        }
        request.set_timeout(remaining(d));
    }
    Ok(client.submit(request).await?.into_inner())
}

/// Errors that mean "this scheduler could not do it" rather than "this request is wrong".
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown)
}

/// Collects a whole response from the pieces.
async fn collect(mut rx: Pieces, model: &str) -> Result<GenerateResponse, Status> {
    let mut response = GenerateResponse {
        model: model.to_string(),
        ..GenerateResponse::default()
    };
    while let Some(piece) = rx.recv().await {
        let piece = piece?;
        response.text.push_str(&piece.text);
        response.request_id = piece.request_id;
        if let Some(finish) = piece.finish_reason {
            response.finish_reason = finish;
            response.usage = piece.usage;
            return Ok(response);
        }
    }
    Err(Status::internal(
        "the generation ended without a finish reason",
    ))
}

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStreamStream = ReceiverStream<Result<GenerateStreamResponse, Status>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let prepared = self.prepare_text(&request).await?;
        let model = prepared.served.info.name.clone();
        Ok(Response::new(collect(self.launch(prepared), &model).await?))
    }

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let prepared = self.prepare_text(&request).await?;
        Ok(Response::new(ReceiverStream::new(self.launch(prepared))))
    }

    async fn infill(
        &self,
        request: Request<InfillRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let r = request.get_ref();
        let prepared = self
            .prepare(
                request.metadata(),
                &r.model,
                Prompt::Infill {
                    prefix: &r.prefix,
                    suffix: &r.suffix,
                },
                r.params.as_ref(),
                r.request_id.as_deref(),
            )
            .await?;
        let model = prepared.served.info.name.clone();
        Ok(Response::new(collect(self.launch(prepared), &model).await?))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse {
            models: self.catalog.list(&self.schedulers).await?,
        }))
    }
}
