//! How decoders' forwards reach the step batcher: each decoder's cache under the batcher
//! ([`PagedCache`]) sends its forward as a request and waits; the batcher gathers the requests of
//! one round and runs them as one ragged paged forward.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::kv::{BlockTable, KvStorage, PageId, PagePool, TableView};
use crate::model::{LogitRows, Model, PagedSeq, SequenceCache};

/// A forward a decoder (or the batcher itself, for a prompt chunk) asked for.
pub(super) struct ForwardRequest {
    pub tokens: Vec<u32>,
    pub query_block: usize,
    pub commit: usize,
    pub context: usize,
    pub logits: LogitRows,
    /// The sequence's pages and the tokens they hold (a copy: no pool lock on the way).
    pub pages: Vec<PageId>,
    pub held: usize,
    pub reply: mpsc::Sender<Result<Tensor>>,
}

impl ForwardRequest {
    /// The request for `tokens` of a sequence whose table already holds the ones to commit.
    pub fn new(
        table: &BlockTable,
        context: usize,
        tokens: &[u32],
        query_block: usize,
        commit: usize,
        logits: LogitRows,
    ) -> (Self, mpsc::Receiver<Result<Tensor>>) {
        let (reply, answer) = mpsc::channel();
        let request = Self {
            tokens: tokens.to_vec(),
            query_block,
            commit,
            context,
            logits,
            pages: table.page_ids().to_vec(),
            held: table.len(),
            reply,
        };
        (request, answer)
    }

    fn seq(&self) -> PagedSeq<'_> {
        PagedSeq {
            tokens: &self.tokens,
            table: TableView {
                pages: &self.pages,
                len: self.held,
            },
            context: self.context,
            query_block: self.query_block,
            commit: self.commit,
            logits: self.logits,
        }
    }
}

pub(super) enum Message {
    Forward(ForwardRequest),
    /// A sequence's step ended (sent on every exit, panics included).
    Done,
}

/// Sends `Done` when a sequence's step ends, however it ends.
pub(super) struct DoneOnDrop(pub mpsc::Sender<Message>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Message::Done);
    }
}

/// What decoders' caches share with the batcher: the pages' K/V, and whether the one sequence
/// stepping runs its forward itself (no other forward to batch it with, so no thread and no
/// hand-off: a lone stream pays nothing for batching).
pub(super) struct Shared {
    pub storage: Mutex<KvStorage>,
    pub solo: AtomicBool,
}

impl Shared {
    pub fn storage(&self) -> std::sync::MutexGuard<'_, KvStorage> {
        self.storage.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A decoder's cache under the batcher: its block table, and the way to the batcher.
pub(super) struct PagedCache {
    pub table: BlockTable,
    /// Tokens of the table whose K/V are in the pages.
    pub context: usize,
    pub pool: PagePool,
    pub shared: Arc<Shared>,
    pub batcher: mpsc::Sender<Message>,
}

impl PagedCache {
    fn run(
        &mut self,
        model: &Model,
        tokens: &[u32],
        query_block: usize,
        commit: usize,
        logits: LogitRows,
    ) -> Result<Tensor> {
        let committing = tokens.get(..commit).ok_or_else(|| {
            EngineError::Input(format!("commit {commit} of {} tokens", tokens.len()))
        })?;
        self.table.commit(&self.pool, committing)?;
        let answer = if self.shared.solo.load(Ordering::SeqCst) {
            let seq = PagedSeq {
                tokens,
                table: self.table.view(),
                context: self.context,
                query_block,
                commit,
                logits,
            };
            model.forward_paged(&[seq], &mut self.shared.storage())?
        } else {
            let (request, answer) = ForwardRequest::new(
                &self.table,
                self.context,
                tokens,
                query_block,
                commit,
                logits,
            );
            let stopped = || EngineError::Input("the step batcher stopped".into());
            self.batcher
                .send(Message::Forward(request))
                .map_err(|_| stopped())?;
            answer.recv().map_err(|_| stopped())??
        };
        self.context += commit;
        self.table.publish(&self.pool, self.context);
        Ok(answer)
    }
}

impl SequenceCache for PagedCache {
    fn held(&self) -> usize {
        self.context
    }

    fn forward(
        &mut self,
        model: &Model,
        tokens: &[u32],
        query_block: usize,
        commit: usize,
        logits: LogitRows,
    ) -> Result<Tensor> {
        self.run(model, tokens, query_block, commit, logits)
    }

    fn prefill(&mut self, model: &Model, tokens: &[u32]) -> Result<Tensor> {
        self.run(model, tokens, 1, tokens.len(), LogitRows::Last)
    }
}

/// Runs the forwards of one iteration in rounds: the first round has the batcher's own
/// requests (prompt chunks) and the first forward of every stepping sequence; a round runs
/// once every sequence still stepping waits for its forward.
pub(super) fn serve_forwards(
    model: &Model,
    shared: &Shared,
    rx: &mpsc::Receiver<Message>,
    mut live: usize,
    mut waiting: Vec<ForwardRequest>,
) {
    let mut own = waiting.len();
    loop {
        if !waiting.is_empty() && waiting.len() == live + own {
            run_round(model, &mut shared.storage(), std::mem::take(&mut waiting));
            own = 0;
        }
        if live == 0 {
            return;
        }
        match rx.recv() {
            Ok(Message::Done) => live -= 1,
            Ok(Message::Forward(request)) => waiting.push(request),
            Err(_) => return,
        }
    }
}

fn run_round(model: &Model, storage: &mut KvStorage, requests: Vec<ForwardRequest>) {
    let seqs: Vec<PagedSeq> = requests.iter().map(ForwardRequest::seq).collect();
    let logits = model.forward_paged(&seqs, storage);
    let mut at = 0;
    for r in &requests {
        let n = r.logits.rows(&r.tokens).len();
        let answer = match &logits {
            Ok(l) => l.narrow(0, at, n).map_err(EngineError::from),
            Err(e) => Err(EngineError::Input(format!("batched forward: {e}"))),
        };
        at += n;
        let _ = r.reply.send(answer);
    }
}
