//! Completions over gRPC for the evaluations and batch jobs: a gateway given by address, or
//! (`--model`) the all-in-one stack started in this process, so both go through the same
//! validation, stop strings and fill-in-the-middle prompt as any client.

use std::path::PathBuf;

use anyhow::Context;
use sdlm_proto::v1::generation_client::GenerationClient;
use sdlm_proto::v1::{
    DecodingParams as WireParams, GenerateRequest, GenerateResponse, InfillRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Where completions come from.
#[derive(clap::Args, Clone)]
#[group(required = true, multiple = false)]
pub struct Source {
    /// Run this model in this process (gateway, scheduler and worker on loopback).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A gateway (or `sdlm serve`) address.
    #[arg(long)]
    pub target: Option<String>,
}

/// One completion and what it cost.
#[derive(Clone, Debug, Default)]
pub struct Completion {
    pub text: String,
    pub tokens: u32,
    pub forwards: u32,
    pub finish_reason: String,
}

impl From<GenerateResponse> for Completion {
    fn from(r: GenerateResponse) -> Self {
        let usage = r.usage.unwrap_or_default();
        Self {
            text: r.text,
            tokens: usage.completion_tokens,
            forwards: usage.forward_passes,
            finish_reason: r.finish_reason,
        }
    }
}

pub struct Completer {
    client: GenerationClient<Channel>,
    /// Stops the in-process stack when dropped.
    _stack: Option<StackGuard>,
}

struct StackGuard(CancellationToken);

impl Drop for StackGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Completer {
    /// Connects to `--target`, or starts `--model` in this process first (on a tokio runtime).
    pub async fn start(source: &Source) -> anyhow::Result<Self> {
        let (target, stack) = match (&source.model, &source.target) {
            (_, Some(target)) => (target.clone(), None),
            (Some(model), None) => {
                let shutdown = CancellationToken::new();
                let loopback = ([127, 0, 0, 1], 0).into();
                let worker = sdlm_worker::WorkerConfig::new(model.clone(), loopback);
                let stack =
                    crate::serve::start_stack(worker, loopback, 1024, None, shutdown.clone())
                        .await
                        .with_context(|| format!("starting {} in this process", model.display()))?;
                (stack.addr.to_string(), Some(StackGuard(shutdown)))
            }
            (None, None) => anyhow::bail!("give --model PATH or --target ADDR"),
        };
        let url = if target.contains("://") {
            target.clone()
        } else {
            format!("http://{target}")
        };
        let client = GenerationClient::connect(url)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        Ok(Self {
            client,
            _stack: stack,
        })
    }

    /// A client for one more concurrent caller (same connection).
    pub fn client(&self) -> GenerationClient<Channel> {
        self.client.clone()
    }
}

pub async fn generate(
    client: &mut GenerationClient<Channel>,
    prompt: String,
    params: WireParams,
) -> Result<Completion, tonic::Status> {
    let request = GenerateRequest {
        prompt,
        params: Some(params),
        ..GenerateRequest::default()
    };
    Ok(client.generate(request).await?.into_inner().into())
}

pub async fn infill(
    client: &mut GenerationClient<Channel>,
    prefix: String,
    suffix: String,
    params: WireParams,
) -> Result<Completion, tonic::Status> {
    let request = InfillRequest {
        prefix,
        suffix,
        params: Some(params),
        ..InfillRequest::default()
    };
    Ok(client.infill(request).await?.into_inner().into())
}
