//! The step batcher: one engine iteration advances every running sequence by one decoding step,
//! and all their forwards (a prompt chunk, an open diffusion block, one AR token) run as one
//! ragged forward over the paged KV cache. Sequences join and leave between iterations.
//!
//! How: each sequence's decoder is the same code as unbatched decoding, over a cache under the
//! batcher (`forwards::PagedCache`). A decoder's step is a future that awaits its forward; for an
//! iteration the batcher polls every stepping sequence, on its own thread, until each has either
//! asked for a forward or finished its step, runs the forwards together, leaves each its logits
//! and polls again. So batched decoding makes the decisions unbatched decoding makes, from
//! logits that differ only by the float sums of one wide forward, with no thread per sequence
//! and no hand-off between threads (which cost more than a small model's forward on a CPU).
//!
//! Per iteration:
//! 1. **Room**: every admitted sequence must find the pages its next step may take; when they
//!    do not fit, the newest admitted sequences are preempted (pages released) until the rest
//!    do. A preempted sequence waits, and is admitted again later and resumes after its
//!    committed tokens (`decoder_resuming_in`), so its output does not change.
//! 2. **Token budget** (`max_batch_tokens`): the running decoders' tokens come first; prompts
//!    get what is left, a long one in chunks over several iterations (chunked prefill), so that
//!    it does not stall the sequences that are decoding.
//! 3. **Admission** by free pages (prompt + committed + one block). An admitted prompt starts
//!    from the longest prefix of full pages already in the prefix cache.

mod choices;
mod forwards;

use std::sync::Arc;
use std::time::Instant;

use choices::Greedy;
use forwards::{drive, run_round, Answer, ForwardRequest, PagedCache, Shared, Stepping};

use super::{decoder_resuming_in, DecodeStats, Decoder, DecodingParams, FinishReason, Mode};
use crate::error::{EngineError, Result};
use crate::kv::{BlockTable, KvStorage, PagePool};
use crate::model::{LogitRows, Model};

pub type SeqId = u64;

/// Tokens one iteration runs at most by default: enough for a prompt chunk to be an efficient
/// matmul, small enough that the iteration's decoders wait for it only tens of milliseconds on
/// a CPU.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 512;

/// What one iteration did for one sequence.
#[derive(Debug)]
pub struct StepOutput {
    pub id: SeqId,
    /// Tokens committed by this step.
    pub tokens: Vec<u32>,
    /// Set when the sequence ended; it has left the batcher.
    pub finish: Option<FinishReason>,
    /// Set when the sequence failed; it has left the batcher.
    pub error: Option<EngineError>,
    /// The sequence lost its pages this iteration and waits to be admitted again.
    pub preempted: bool,
    /// The decoder's counters so far (of its current admission), prompt chunks included.
    pub stats: DecodeStats,
}

enum Stage<'m> {
    Waiting,
    /// Admitted: the table holds the prompt's cached prefix and the chunks run so far; the
    /// decoder starts (and prefills the rest) when the rest fits in an iteration's budget.
    Prefilling(BlockTable),
    Running(Box<dyn Decoder + 'm>),
}

struct Entry<'m> {
    id: SeqId,
    prompt: Vec<u32>,
    params: DecodingParams,
    /// Tokens committed so far, across admissions.
    committed: Vec<u32>,
    stage: Stage<'m>,
    /// Prompt chunks the batcher ran for the current admission (counted as prefill forwards).
    chunks: DecodeStats,
    /// Prompt tokens the current admission found in the prefix cache.
    reused: usize,
}

/// What an iteration does for a sequence.
enum Work {
    /// Start the decoder (Prefilling) or advance it one step (Running).
    Advance,
    /// Run the next `n` prompt tokens into the pages (the batcher's own request).
    Chunk(usize),
}

/// What a sequence's iteration came to.
enum Outcome {
    Started,
    Chunked,
    Stepped(Vec<u32>),
    Preempted,
    Failed(EngineError),
}

impl<'m> Entry<'m> {
    async fn advance(
        &mut self,
        model: &'m Model,
        pool: &PagePool,
        shared: &Arc<Shared>,
    ) -> Outcome {
        match std::mem::replace(&mut self.stage, Stage::Waiting) {
            Stage::Waiting => Outcome::Failed(EngineError::Input(
                "the step batcher advanced a sequence it had not admitted".into(),
            )),
            Stage::Prefilling(table) => {
                let cache = PagedCache {
                    context: table.len(),
                    table,
                    pool: pool.clone(),
                    shared: Arc::clone(shared),
                    greedy: self.params.reads_greedy_choices_only().then_some(Greedy {
                        banned: super::rows::never_chosen(model.config()),
                    }),
                };
                let started = decoder_resuming_in(
                    model,
                    &self.prompt,
                    &self.committed,
                    &self.params,
                    Box::new(cache),
                )
                .await;
                match started {
                    Ok(decoder) => {
                        self.stage = Stage::Running(decoder);
                        Outcome::Started
                    }
                    Err(e) => Outcome::Failed(e),
                }
            }
            Stage::Running(mut decoder) => {
                let stepped = decoder.step_async().await;
                self.stage = Stage::Running(decoder);
                match stepped {
                    Ok(tokens) => {
                        self.committed.extend_from_slice(&tokens);
                        Outcome::Stepped(tokens)
                    }
                    Err(e) => Outcome::Failed(e),
                }
            }
        }
    }

    /// Tokens a decoding step runs (an estimate for the budget: the open block, or one token).
    fn step_tokens(&self) -> usize {
        match self.params.mode {
            Mode::Autoregressive => 1,
            Mode::Diffusion => self.params.block_size,
        }
    }

    /// Pages this sequence needs to be admitted: its prompt, what it committed, one block.
    fn pages_to_admit(&self, pool: &PagePool) -> usize {
        pool.pages_for(self.prompt.len() + self.committed.len() + self.params.block_size)
    }

    /// Fresh pages the sequence's next iteration may take: a step commits at most one block
    /// (which may straddle a page boundary); a prefilling sequence still needs the rest of
    /// what it was admitted for.
    fn pages_ahead(&self, pool: &PagePool) -> usize {
        match &self.stage {
            Stage::Waiting => 0,
            Stage::Prefilling(table) => self
                .pages_to_admit(pool)
                .saturating_sub(table.page_ids().len()),
            Stage::Running(_) => pool.pages_for(self.step_tokens()) + 1,
        }
    }

    /// This iteration's work for an admitted sequence with `budget` tokens left: start the
    /// decoder when the rest of the prompt (and the committed tokens it replays) fits, else
    /// run a chunk of the prompt. The decoder's own prefill always runs at least the last
    /// prompt token, whose logits it starts from.
    fn prefill_work(&self, budget: &mut usize) -> Option<Work> {
        let Stage::Prefilling(table) = &self.stage else {
            return None;
        };
        let rest = self.prompt.len().saturating_sub(table.len());
        let start = rest + self.committed.len();
        if start <= *budget || rest <= 1 {
            *budget = budget.saturating_sub(start);
            return Some(Work::Advance);
        }
        if *budget == 0 {
            return None;
        }
        let n = (*budget).min(rest - 1);
        *budget -= n;
        Some(Work::Chunk(n))
    }
}

pub struct StepBatcher<'m> {
    model: &'m Model,
    pool: PagePool,
    shared: Arc<Shared>,
    entries: Vec<Entry<'m>>,
    /// Sequences that ended in the last iteration, dropped (decoder, buffers, pages) at the
    /// start of the next one: after the caller has delivered their last tokens, so that a
    /// request's end does not wait for its clean-up.
    retired: Vec<Entry<'m>>,
    next_id: SeqId,
    max_batch_tokens: usize,
    /// Wall time spent in rounds (the batched forwards and the greedy choices), so far.
    round_seconds: f64,
}

impl<'m> StepBatcher<'m> {
    /// A batcher over `pool`, with K/V storage for every page of it where the model runs (host
    /// memory, or the GPU's).
    pub fn new(model: &'m Model, pool: PagePool) -> Result<Self> {
        let storage = KvStorage::on(
            model.device(),
            model.dtype(),
            model.config().num_hidden_layers,
            pool.total(),
            model.attention_shape(pool.page_tokens()),
        )?;
        Ok(Self {
            model,
            pool,
            shared: Arc::new(Shared::new(storage)),
            entries: Vec::new(),
            retired: Vec::new(),
            next_id: 0,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            round_seconds: 0.0,
        })
    }

    /// Sets the per-iteration token budget (at least 1).
    pub fn with_max_batch_tokens(mut self, tokens: usize) -> Self {
        self.max_batch_tokens = tokens.max(1);
        self
    }

    /// Seconds spent so far in rounds: the batched forwards (to the end of their work on a GPU)
    /// and the greedy choices made for them. The rest of an iteration is host work: the
    /// decoders' steps, admission, preemption.
    pub fn round_seconds(&self) -> f64 {
        self.round_seconds
    }

    pub fn pool(&self) -> &PagePool {
        &self.pool
    }

    /// Queues a sequence; it starts (prefill) at the first iteration with room for it. Bad
    /// parameters come back as its [`StepOutput::error`].
    pub fn add(&mut self, prompt: Vec<u32>, params: DecodingParams) -> SeqId {
        self.add_resuming(prompt, Vec::new(), params)
    }

    /// [`StepBatcher::add`] for a sequence that already committed `committed` tokens elsewhere
    /// (moved from another worker): it continues after them.
    pub fn add_resuming(
        &mut self,
        prompt: Vec<u32>,
        committed: Vec<u32>,
        params: DecodingParams,
    ) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            prompt,
            params,
            committed,
            stage: Stage::Waiting,
            chunks: DecodeStats::default(),
            reused: 0,
        });
        id
    }

    /// Drops a sequence (a cancelled request); its pages go back.
    pub fn remove(&mut self, id: SeqId) {
        self.entries.retain(|e| e.id != id);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops the sequences that ended (their decoders, buffers and pages): done at the start of
    /// each iteration anyway; a caller with nothing to run calls it while it waits, so that the
    /// next request does not pay for the last one's clean-up.
    pub fn release_finished(&mut self) {
        self.retired.clear();
    }

    /// One iteration: makes room, admits waiting sequences that fit, advances every admitted
    /// one by a step or a prompt chunk with their forwards batched, and reports what each did.
    pub fn step(&mut self) -> Vec<StepOutput> {
        self.release_finished();
        let mut outcomes = self.preempt_for_room();
        let plan = self.plan(&mut outcomes);
        outcomes.extend(self.run(plan));
        self.report(outcomes)
    }

    /// Preempts the newest admitted sequences until every other one's next iteration fits in
    /// the free pages (the oldest always stays).
    fn preempt_for_room(&mut self) -> Vec<(usize, Outcome)> {
        let admitted: Vec<(usize, usize)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !matches!(e.stage, Stage::Waiting))
            .map(|(i, e)| (i, e.pages_ahead(&self.pool)))
            .collect();
        let mut ahead: usize = admitted.iter().map(|&(_, n)| n).sum();
        let mut preempted = Vec::new();
        for &(i, n) in admitted.iter().skip(1).rev() {
            if ahead <= self.pool.free_pages() {
                break;
            }
            self.entries[i].stage = Stage::Waiting; // drops its decoder, cache and pages
            ahead -= n;
            preempted.push((i, Outcome::Preempted));
        }
        preempted
    }

    /// Chooses this iteration's work: the running decoders first, then prompt chunks and
    /// admissions within the token budget and the free pages.
    fn plan(&mut self, outcomes: &mut Vec<(usize, Outcome)>) -> Vec<(usize, Work)> {
        let pool = &self.pool;
        let ahead: usize = self.entries.iter().map(|e| e.pages_ahead(pool)).sum();
        let mut free = pool.free_pages().saturating_sub(ahead);
        let mut budget = self.max_batch_tokens;
        let mut work = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if let Stage::Running(_) = e.stage {
                budget = budget.saturating_sub(e.step_tokens());
                work.push((i, Work::Advance));
            }
        }
        let preempted: Vec<usize> = outcomes.iter().map(|&(i, _)| i).collect();
        for (i, e) in self.entries.iter_mut().enumerate() {
            if matches!(e.stage, Stage::Waiting) && !preempted.contains(&i) {
                let need = e.pages_to_admit(pool);
                if need > pool.total() {
                    outcomes.push((
                        i,
                        Outcome::Failed(EngineError::Input(format!(
                            "the sequence needs {need} KV pages; the cache has {}",
                            pool.total()
                        ))),
                    ));
                    continue;
                }
                if need > free || budget == 0 {
                    continue;
                }
                free -= need;
                let table = BlockTable::reusing_prefix(pool, &e.prompt);
                e.chunks = DecodeStats::default();
                e.reused = table.len();
                e.stage = Stage::Prefilling(table);
            }
            if let Some(w) = e.prefill_work(&mut budget) {
                work.push((i, w));
            }
        }
        work
    }

    /// Runs the planned work: prompt chunks as the batcher's own forwards, the rest by polling
    /// each sequence's step, all forwards batched into rounds.
    fn run(&mut self, plan: Vec<(usize, Work)>) -> Vec<(usize, Outcome)> {
        let mut outcomes = Vec::new();
        let mut own = Vec::new();
        let mut answers = Vec::new();
        let mut advancing = Vec::new();
        for (i, w) in plan {
            match w {
                Work::Advance => advancing.push(i),
                Work::Chunk(n) => match self.entries[i].chunk(&self.pool, n) {
                    Ok(request) => {
                        answers.push((i, Arc::clone(&request.answer)));
                        own.push(request);
                    }
                    Err(e) => outcomes.push((i, Outcome::Failed(e))),
                },
            }
        }
        let (model, pool, shared) = (self.model, &self.pool, &self.shared);
        let started = Instant::now();
        let stepping: Vec<(usize, Stepping<'_, Outcome>)> = self
            .entries
            .iter_mut()
            .enumerate()
            // `plan` lists the running entries first, in index order, so this is sorted.
            .filter(|(i, _)| advancing.binary_search(i).is_ok())
            .map(|(i, entry)| -> (usize, Stepping<'_, Outcome>) {
                (i, Box::pin(entry.advance(model, pool, shared)))
            })
            .collect();
        let failed = |why: &str| Outcome::Failed(EngineError::Input(why.into()));
        let mut round_seconds = 0.0;
        let round = |requests| {
            let started = Instant::now();
            run_round(model, &mut shared.storage(), requests);
            round_seconds += started.elapsed().as_secs_f64();
        };
        outcomes.extend(drive(shared, stepping, own, failed, round));
        self.round_seconds += round_seconds;
        let seconds = started.elapsed().as_secs_f64();
        for (i, answer) in answers {
            outcomes.push((i, self.entries[i].chunk_ran(&self.pool, &answer, seconds)));
        }
        outcomes
    }

    /// Turns the iteration's outcomes into outputs; ended and failed sequences leave, preempted
    /// ones wait again.
    fn report(&mut self, outcomes: Vec<(usize, Outcome)>) -> Vec<StepOutput> {
        let mut leaving = std::collections::HashSet::new();
        let mut outputs = Vec::new();
        for (i, outcome) in outcomes {
            let entry = &mut self.entries[i];
            let mut out = StepOutput {
                id: entry.id,
                tokens: Vec::new(),
                finish: None,
                error: None,
                preempted: false,
                stats: DecodeStats::default(),
            };
            match outcome {
                Outcome::Started | Outcome::Chunked => {}
                Outcome::Stepped(tokens) => {
                    out.tokens = tokens;
                    if let Stage::Running(d) = &entry.stage {
                        out.finish = d.finished();
                    }
                }
                Outcome::Preempted | Outcome::Failed(EngineError::OutOfPages(_)) => {
                    entry.stage = Stage::Waiting;
                    out.preempted = true;
                }
                Outcome::Failed(e) => out.error = Some(e),
            }
            out.stats = entry.stats();
            if out.finish.is_some() || out.error.is_some() {
                leaving.insert(entry.id);
            }
            outputs.push(out);
        }
        if !leaving.is_empty() {
            let (left, staying) = std::mem::take(&mut self.entries)
                .into_iter()
                .partition(|e| leaving.contains(&e.id));
            self.entries = staying;
            self.retired = left;
        }
        outputs
    }
}

impl Entry<'_> {
    /// Commits the next `n` prompt tokens to the table and asks for their forward (no logits).
    fn chunk(&mut self, pool: &PagePool, n: usize) -> Result<ForwardRequest> {
        let Stage::Prefilling(table) = &mut self.stage else {
            return Err(EngineError::Input(
                "a prompt chunk for a running sequence".into(),
            ));
        };
        let held = table.len();
        let tokens = &self.prompt[held..held + n];
        table.commit(pool, tokens)?;
        Ok(ForwardRequest::new(
            table,
            held,
            tokens,
            1,
            n,
            LogitRows::None,
            None,
        ))
    }

    /// What a prompt chunk's forward came to: its K/V are in the pages, which join the prefix
    /// cache.
    fn chunk_ran(&mut self, pool: &PagePool, answer: &Answer, seconds: f64) -> Outcome {
        match answer.take() {
            Some(Ok(_)) => {
                if let Stage::Prefilling(table) = &mut self.stage {
                    let written = table.len();
                    table.publish(pool, written);
                }
                self.chunks.prefill_forwards += 1;
                self.chunks.prefill_seconds += seconds;
                Outcome::Chunked
            }
            Some(Err(err)) => Outcome::Failed(err),
            None => Outcome::Failed(EngineError::Input("a prompt chunk was lost".into())),
        }
    }

    /// The counters of the current admission: the decoder's, plus the prompt chunks.
    fn stats(&self) -> DecodeStats {
        let mut stats = match &self.stage {
            Stage::Running(d) => d.stats().clone(),
            _ => DecodeStats::default(),
        };
        stats.prefill_forwards += self.chunks.prefill_forwards;
        stats.prefill_seconds += self.chunks.prefill_seconds;
        stats.cached_prompt_tokens = self.reused;
        stats
    }
}
