//! The models the cluster serves, as the gateway needs them: limits for validation and the
//! tokenizer (sent by a worker, so the gateway holds no model files). Fetched from the
//! scheduler, and again when a request names a model not yet known (at most once a second).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdlm_engine::decode::ModelLimits;
use sdlm_proto::v1::{ModelInfo, ModelsRequest};
use tokenizers::Tokenizer;
use tokio::sync::Mutex;
use tonic::Status;

use crate::upstream::Schedulers;

pub struct Served {
    pub info: ModelInfo,
    pub limits: ModelLimits,
    pub tokenizer: Tokenizer,
    /// <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>, when the tokenizer has them.
    pub fim: Option<[u32; 3]>,
}

#[derive(Default)]
struct State {
    models: HashMap<String, Arc<Served>>,
    fetched: Option<Instant>,
}

#[derive(Default)]
pub struct Catalog {
    state: Mutex<State>,
}

const REFRESH_EVERY: Duration = Duration::from_secs(1);

impl Catalog {
    /// The model a request names (empty: the only one served).
    pub async fn get(&self, schedulers: &Schedulers, name: &str) -> Result<Arc<Served>, Status> {
        if let Some(found) = self.lookup(name).await? {
            return Ok(found);
        }
        self.refresh(schedulers).await?;
        if let Some(found) = self.lookup(name).await? {
            return Ok(found);
        }
        let state = self.state.lock().await;
        if state.models.is_empty() {
            return Err(Status::unavailable("no worker serves any model yet"));
        }
        let mut names: Vec<&String> = state.models.keys().collect();
        names.sort();
        Err(Status::invalid_argument(format!(
            "model {name:?} is not served; served: {names:?}"
        )))
    }

    pub async fn list(&self, schedulers: &Schedulers) -> Result<Vec<ModelInfo>, Status> {
        self.refresh(schedulers).await?;
        let state = self.state.lock().await;
        let mut infos: Vec<ModelInfo> = state.models.values().map(|s| s.info.clone()).collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(infos)
    }

    async fn lookup(&self, name: &str) -> Result<Option<Arc<Served>>, Status> {
        let state = self.state.lock().await;
        if !name.is_empty() {
            return Ok(state.models.get(name).cloned());
        }
        match state.models.len() {
            0 => Ok(None),
            1 => Ok(state.models.values().next().cloned()),
            _ => {
                let mut names: Vec<&String> = state.models.keys().collect();
                names.sort();
                Err(Status::invalid_argument(format!(
                    "model is empty and several are served ({names:?}); name one"
                )))
            }
        }
    }

    async fn refresh(&self, schedulers: &Schedulers) -> Result<(), Status> {
        let mut state = self.state.lock().await;
        if state.fetched.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return Ok(());
        }
        let mut client = schedulers.client()?;
        let response = client.models(ModelsRequest {}).await?.into_inner();
        // An empty answer (workers still starting) is asked again on the next request.
        if !response.models.is_empty() {
            state.fetched = Some(Instant::now());
        }
        for served in response.models {
            let (Some(info), Some(worker)) = (served.info, served.worker) else {
                continue;
            };
            if let Some(known) = state.models.get_mut(&info.name) {
                // Keep the tokenizer; refresh the counts.
                let mut updated = Served::clone_with_info(known, info);
                std::mem::swap(known, &mut updated);
                continue;
            }
            let tokenizer: Tokenizer = worker.tokenizer_json.parse().map_err(|e| {
                Status::internal(format!("the tokenizer of {} does not load: {e}", info.name))
            })?;
            let fim = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
                .map(|t| tokenizer.token_to_id(t));
            let fim = match fim {
                [Some(p), Some(s), Some(m)] => Some([p, s, m]),
                _ => None,
            };
            let limits = ModelLimits {
                context: info.context_length as usize,
                vocab_size: info.vocab_size as usize,
                has_mask_token: info.diffusion,
                block_size: (info.block_size > 0).then_some(info.block_size as usize),
            };
            state.models.insert(
                info.name.clone(),
                Arc::new(Served {
                    info,
                    limits,
                    tokenizer,
                    fim,
                }),
            );
        }
        Ok(())
    }
}

impl Served {
    fn clone_with_info(known: &Arc<Served>, info: ModelInfo) -> Arc<Served> {
        Arc::new(Served {
            info,
            limits: known.limits.clone(),
            tokenizer: known.tokenizer.clone(),
            fim: known.fim,
        })
    }
}
