//! The step batcher: one engine iteration advances every running sequence by one decoding step,
//! and all their forwards (a prompt's prefill, an open diffusion block, one AR token) run as one
//! ragged forward over the paged KV cache. Sequences join and leave between iterations.
//!
//! How: each sequence's decoder is the same code as unbatched decoding, over a [`PagedCache`].
//! For an iteration, every decoder steps on a scoped thread of its own; where it would call the
//! model, its cache hands the forward to the batcher and waits. Once every sequence has either
//! asked for a forward or finished its step, the batcher runs the forwards together and answers
//! each. So batched decoding makes the decisions unbatched decoding makes, from logits that
//! differ only by the float sums of one wide forward.
//!
//! Admission is by free pages (prompt + committed + one block); a sequence whose commit finds no
//! page is preempted: its decoder and pages are dropped, and it is admitted again later and
//! resumes after its committed tokens (`decoder_resuming_in`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use candle_core::Tensor;

use super::{decoder_resuming_in, DecodeStats, Decoder, DecodingParams, FinishReason};
use crate::error::{EngineError, Result};
use crate::kv::{BlockTable, KvStorage, PagePool};
use crate::model::{Model, PagedSeq, SequenceCache};

pub type SeqId = u64;

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
    /// The decoder's counters so far (of its current admission).
    pub stats: DecodeStats,
}

/// A forward a decoder asked for.
struct ForwardRequest {
    tokens: Vec<u32>,
    query_block: usize,
    commit: usize,
    context: usize,
    table: BlockTable,
    reply: mpsc::Sender<Result<Tensor>>,
}

enum Message {
    Forward(ForwardRequest),
    /// A sequence's step ended (sent on every exit, panics included).
    Done,
}

/// What decoders' caches share with the batcher: the pages' K/V, and whether the one sequence
/// stepping runs its forward itself (no other forward to batch it with, so no thread and no
/// hand-off: a lone stream pays nothing for batching).
struct Shared {
    storage: Mutex<KvStorage>,
    solo: AtomicBool,
}

/// A decoder's cache under the batcher: its block table, and the way to the batcher.
struct PagedCache {
    table: BlockTable,
    /// Tokens of the table whose K/V are in the pages.
    context: usize,
    pool: PagePool,
    shared: Arc<Shared>,
    batcher: mpsc::Sender<Message>,
}

impl SequenceCache for PagedCache {
    fn forward(
        &mut self,
        model: &Model,
        tokens: &[u32],
        query_block: usize,
        commit: usize,
    ) -> Result<Tensor> {
        let committing = tokens.get(..commit).ok_or_else(|| {
            EngineError::Input(format!("commit {commit} of {} tokens", tokens.len()))
        })?;
        self.table.commit(&self.pool, committing)?;
        if self.shared.solo.load(Ordering::SeqCst) {
            let seq = PagedSeq {
                tokens,
                table: &self.table,
                context: self.context,
                query_block,
                commit,
            };
            let mut storage = self
                .shared
                .storage
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let logits = model.forward_paged(&[seq], &mut storage)?;
            self.context += commit;
            return Ok(logits);
        }
        let (reply, answer) = mpsc::channel();
        let request = ForwardRequest {
            tokens: tokens.to_vec(),
            query_block,
            commit,
            context: self.context,
            table: self.table.clone(),
            reply,
        };
        let stopped = || EngineError::Input("the step batcher stopped".into());
        self.batcher
            .send(Message::Forward(request))
            .map_err(|_| stopped())?;
        let logits = answer.recv().map_err(|_| stopped())??;
        self.context += commit;
        Ok(logits)
    }
}

enum Stage<'m> {
    Waiting,
    Running(Box<dyn Decoder + 'm>),
}

struct Entry<'m> {
    id: SeqId,
    prompt: Vec<u32>,
    params: DecodingParams,
    /// Tokens committed so far, across admissions.
    committed: Vec<u32>,
    stage: Stage<'m>,
}

/// What a sequence's thread reports.
enum Outcome {
    Started,
    Stepped(Vec<u32>),
    Failed(EngineError),
}

impl<'m> Entry<'m> {
    fn advance(
        &mut self,
        model: &'m Model,
        pool: &PagePool,
        shared: &Arc<Shared>,
        batcher: mpsc::Sender<Message>,
    ) -> Outcome {
        match &mut self.stage {
            Stage::Waiting => {
                let cache = PagedCache {
                    table: BlockTable::new(),
                    context: 0,
                    pool: pool.clone(),
                    shared: Arc::clone(shared),
                    batcher,
                };
                let started = decoder_resuming_in(
                    model,
                    &self.prompt,
                    &self.committed,
                    &self.params,
                    Box::new(cache),
                );
                match started {
                    Ok(decoder) => {
                        self.stage = Stage::Running(decoder);
                        Outcome::Started
                    }
                    Err(e) => Outcome::Failed(e),
                }
            }
            Stage::Running(decoder) => {
                drop(batcher); // its cache already has one
                match decoder.step() {
                    Ok(tokens) => {
                        self.committed.extend_from_slice(&tokens);
                        Outcome::Stepped(tokens)
                    }
                    Err(e) => Outcome::Failed(e),
                }
            }
        }
    }

    /// Pages this sequence needs to be admitted: its prompt, what it committed, one block.
    fn pages_to_admit(&self, pool: &PagePool) -> usize {
        pool.pages_for(self.prompt.len() + self.committed.len() + self.params.block_size)
    }
}

/// Sends `Done` when a sequence's step ends, however it ends.
struct DoneOnDrop(mpsc::Sender<Message>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Message::Done);
    }
}

pub struct StepBatcher<'m> {
    model: &'m Model,
    pool: PagePool,
    shared: Arc<Shared>,
    entries: Vec<Entry<'m>>,
    next_id: SeqId,
    /// Where decoders' caches send their forwards (kept for the decoders' whole lives).
    tx: mpsc::Sender<Message>,
    rx: mpsc::Receiver<Message>,
}

impl<'m> StepBatcher<'m> {
    /// A batcher over `pool`, with K/V storage for every page of it.
    pub fn new(model: &'m Model, pool: PagePool) -> Self {
        let storage = KvStorage::new(
            model.config().num_hidden_layers,
            pool.total(),
            model.attention_shape(pool.page_tokens()),
        );
        let (tx, rx) = mpsc::channel();
        Self {
            model,
            pool,
            shared: Arc::new(Shared {
                storage: Mutex::new(storage),
                solo: AtomicBool::new(false),
            }),
            entries: Vec::new(),
            next_id: 0,
            tx,
            rx,
        }
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

    /// One iteration: admits waiting sequences that fit, advances every admitted one by a step
    /// with their forwards batched, and reports what each did.
    pub fn step(&mut self) -> Vec<StepOutput> {
        let mut free = self.pool.free_pages();
        let mut chosen = Vec::new();
        let mut outputs = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            match e.stage {
                Stage::Running(_) => chosen.push(i),
                Stage::Waiting => {
                    let need = e.pages_to_admit(&self.pool);
                    if need > self.pool.total() {
                        outputs.push((
                            i,
                            Outcome::Failed(EngineError::Input(format!(
                                "the sequence needs {need} KV pages; the cache has {}",
                                self.pool.total()
                            ))),
                        ));
                    } else if need <= free {
                        free -= need;
                        chosen.push(i);
                    }
                }
            }
        }
        let (model, pool, shared) = (self.model, &self.pool, &self.shared);
        let (tx, rx) = (&self.tx, &self.rx);
        let mut selected: Vec<(usize, &mut Entry<'m>)> = self
            .entries
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| chosen.contains(i))
            .collect();
        if let [(i, entry)] = selected.as_mut_slice() {
            shared.solo.store(true, Ordering::SeqCst);
            let outcome = entry.advance(model, pool, shared, tx.clone());
            shared.solo.store(false, Ordering::SeqCst);
            outputs.push((*i, outcome));
            return self.report(outputs);
        }
        let stepped: Vec<(usize, Outcome)> = std::thread::scope(|scope| {
            let handles: Vec<_> = selected
                .iter_mut()
                .map(|(i, entry)| {
                    let (i, tx) = (*i, tx.clone());
                    scope.spawn(move || {
                        let _done = DoneOnDrop(tx.clone());
                        (i, entry.advance(model, pool, shared, tx))
                    })
                })
                .collect();
            serve_forwards(model, shared, rx, handles.len());
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        outputs.extend(stepped);
        self.report(outputs)
    }

    /// Turns the iteration's outcomes into outputs; ended and failed sequences leave, preempted
    /// ones wait again.
    fn report(&mut self, outcomes: Vec<(usize, Outcome)>) -> Vec<StepOutput> {
        let mut leaving = Vec::new();
        let mut outputs = Vec::new();
        for (i, outcome) in outcomes {
            let entry = &mut self.entries[i];
            let stats = match &entry.stage {
                Stage::Running(d) => d.stats().clone(),
                Stage::Waiting => DecodeStats::default(),
            };
            let mut out = StepOutput {
                id: entry.id,
                tokens: Vec::new(),
                finish: None,
                error: None,
                preempted: false,
                stats,
            };
            match outcome {
                Outcome::Started => {}
                Outcome::Stepped(tokens) => {
                    out.tokens = tokens;
                    if let Stage::Running(d) = &entry.stage {
                        out.finish = d.finished();
                    }
                }
                Outcome::Failed(EngineError::OutOfPages(_)) => {
                    entry.stage = Stage::Waiting;
                    out.preempted = true;
                }
                Outcome::Failed(e) => out.error = Some(e),
            }
            if out.finish.is_some() || out.error.is_some() {
                leaving.push(entry.id);
            }
            outputs.push(out);
        }
        self.entries.retain(|e| !leaving.contains(&e.id));
        outputs
    }
}

/// Runs the forwards the stepping sequences ask for, in rounds: a round runs once every
/// sequence still stepping is waiting for its forward.
fn serve_forwards(model: &Model, shared: &Shared, rx: &mpsc::Receiver<Message>, mut live: usize) {
    let mut waiting: Vec<ForwardRequest> = Vec::new();
    while live > 0 {
        match rx.recv() {
            Ok(Message::Done) => live -= 1,
            Ok(Message::Forward(request)) => waiting.push(request),
            Err(_) => return,
        }
        if !waiting.is_empty() && waiting.len() == live {
            let mut storage = shared.storage.lock().unwrap_or_else(|p| p.into_inner());
            run_round(model, &mut storage, std::mem::take(&mut waiting));
        }
    }
}

fn run_round(model: &Model, storage: &mut KvStorage, requests: Vec<ForwardRequest>) {
    let seqs: Vec<PagedSeq> = requests
        .iter()
        .map(|r| PagedSeq {
            tokens: &r.tokens,
            table: &r.table,
            context: r.context,
            query_block: r.query_block,
            commit: r.commit,
        })
        .collect();
    let logits = model.forward_paged(&seqs, storage);
    let mut at = 0;
    for r in &requests {
        let n = r.tokens.len();
        let answer = match &logits {
            Ok(l) => l.narrow(0, at, n).map_err(EngineError::from),
            Err(e) => Err(EngineError::Input(format!("batched forward: {e}"))),
        };
        at += n;
        let _ = r.reply.send(answer);
    }
}
