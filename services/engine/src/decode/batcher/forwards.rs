//! How decoders' forwards reach the step batcher: each decoder's cache under the batcher
//! ([`PagedCache`]) leaves its forward with the batcher and awaits the answer; the batcher polls
//! every stepping sequence, gathers the forwards of one round and runs them as one ragged paged
//! forward ([`drive`]).

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::choices::{self, Greedy};
use crate::decode::Logits;
use crate::error::{EngineError, Result};
use crate::kv::{BlockTable, KvStorage, PageId, PagePool, TableView};
use crate::model::{ForwardFuture, LogitRows, Model, PagedSeq, SequenceCache};

/// Where the batcher leaves a forward's logits for the sequence that asked.
#[derive(Default)]
pub(super) struct Answer(Mutex<Option<Result<Logits>>>);

impl Answer {
    fn give(&self, logits: Result<Logits>) {
        *lock(&self.0) = Some(logits);
    }

    /// The logits, once the batcher has run the forward.
    pub fn take(&self) -> Option<Result<Logits>> {
        lock(&self.0).take()
    }
}

/// Awaits an [`Answer`]: pending until the batcher's round has run.
struct Answered(Arc<Answer>);

impl Future for Answered {
    type Output = Result<Logits>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.take() {
            Some(logits) => Poll::Ready(logits),
            None => Poll::Pending,
        }
    }
}

/// A forward a decoder (or the batcher itself, for a prompt chunk) asked for.
pub(super) struct ForwardRequest {
    pub tokens: Vec<u32>,
    pub query_block: usize,
    pub commit: usize,
    pub context: usize,
    pub logits: LogitRows,
    /// Set when the sequence reads only greedy choices, which the batcher then makes.
    pub greedy: Option<Greedy>,
    /// The sequence's pages and the tokens they hold (a copy, taken when it asked).
    pub pages: Vec<PageId>,
    pub held: usize,
    pub answer: Arc<Answer>,
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
        greedy: Option<Greedy>,
    ) -> Self {
        Self {
            tokens: tokens.to_vec(),
            query_block,
            commit,
            context,
            logits,
            greedy,
            pages: table.page_ids().to_vec(),
            held: table.len(),
            answer: Arc::default(),
        }
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

/// What decoders' caches share with the batcher: the pages' K/V, and the forwards asked for
/// since the last round.
pub(super) struct Shared {
    pub storage: Mutex<KvStorage>,
    asked: Mutex<Vec<ForwardRequest>>,
}

impl Shared {
    pub fn new(storage: KvStorage) -> Self {
        Self {
            storage: Mutex::new(storage),
            asked: Mutex::default(),
        }
    }

    pub fn storage(&self) -> MutexGuard<'_, KvStorage> {
        lock(&self.storage)
    }

    fn ask(&self, request: ForwardRequest) {
        lock(&self.asked).push(request);
    }

    fn take_asked(&self) -> Vec<ForwardRequest> {
        std::mem::take(&mut *lock(&self.asked))
    }
}

/// A lock whose holder cannot have left its data half-written (a push, a take, a forward that
/// failed as a whole), so a poisoned one is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A decoder's cache under the batcher: its block table, and the way to the batcher.
pub(super) struct PagedCache {
    pub table: BlockTable,
    /// Tokens of the table whose K/V are in the pages.
    pub context: usize,
    pub pool: PagePool,
    pub shared: Arc<Shared>,
    /// Set when the decoder reads only greedy choices.
    pub greedy: Option<Greedy>,
}

impl PagedCache {
    async fn run(
        &mut self,
        tokens: &[u32],
        query_block: usize,
        commit: usize,
        logits: LogitRows,
    ) -> Result<Logits> {
        let committing = tokens.get(..commit).ok_or_else(|| {
            EngineError::Input(format!("commit {commit} of {} tokens", tokens.len()))
        })?;
        self.table.commit(&self.pool, committing)?;
        let request = ForwardRequest::new(
            &self.table,
            self.context,
            tokens,
            query_block,
            commit,
            logits,
            self.greedy,
        );
        let answer = Answered(Arc::clone(&request.answer));
        self.shared.ask(request);
        let logits = answer.await?;
        self.context += commit;
        self.table.publish(&self.pool, self.context);
        Ok(logits)
    }
}

impl SequenceCache for PagedCache {
    fn held(&self) -> usize {
        self.context
    }

    fn forward<'a>(
        &'a mut self,
        _model: &'a Model,
        tokens: &'a [u32],
        query_block: usize,
        commit: usize,
        logits: LogitRows,
    ) -> ForwardFuture<'a> {
        Box::pin(self.run(tokens, query_block, commit, logits))
    }
}

/// A stepping sequence's work for one iteration, as the batcher polls it.
pub(super) type Stepping<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Runs the stepping sequences to the end of their iteration, their forwards batched in rounds:
/// every sequence is polled until it waits for a forward (or is done); then `run` runs the
/// round, the batcher's own requests (prompt chunks, first round only) and every forward asked
/// for, and the waiting sequences are polled again. A sequence that panics, or waits without
/// having asked for a forward, ends with `failed`'s outcome; the others are not affected.
pub(super) fn drive<'a, T>(
    shared: &Shared,
    mut stepping: Vec<(usize, Stepping<'a, T>)>,
    mut own: Vec<ForwardRequest>,
    failed: impl Fn(&str) -> T,
    mut run: impl FnMut(Vec<ForwardRequest>),
) -> Vec<(usize, T)> {
    let mut done = Vec::with_capacity(stepping.len());
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        stepping.retain_mut(|(i, step)| {
            match catch_unwind(AssertUnwindSafe(|| step.as_mut().poll(&mut cx))) {
                Ok(Poll::Pending) => true,
                Ok(Poll::Ready(outcome)) => {
                    done.push((*i, outcome));
                    false
                }
                Err(_) => {
                    done.push((*i, failed("the sequence's decoder panicked")));
                    false
                }
            }
        });
        let mut round = std::mem::take(&mut own);
        round.extend(shared.take_asked());
        if round.is_empty() {
            let stuck = stepping.drain(..);
            done.extend(stuck.map(|(i, _)| (i, failed("the decoder waited without a forward"))));
            return done;
        }
        run(round);
    }
}

/// One round: the requests' sequences as one ragged paged forward, each answered with its rows
/// (and, for a greedy sequence, their choices, made on the thread that ran its part of the
/// batch).
pub(super) fn run_round(model: &Model, storage: &mut KvStorage, requests: Vec<ForwardRequest>) {
    let seqs: Vec<PagedSeq> = requests.iter().map(ForwardRequest::seq).collect();
    // Per request: how many logits rows it gets, and whether the batcher chooses for it.
    let wants: Vec<(usize, Option<Greedy>)> = requests
        .iter()
        .map(|r| (r.logits.rows(&r.tokens).len(), r.greedy))
        .collect();
    // On a GPU the round ends when its work is done there (the decoders would wait for it at
    // their first read anyway), so that the batcher's round time is the forward's.
    let answers = model
        .forward_paged_parts(&seqs, storage, |range, logits| {
            let wants = wants.get(range.clone()).ok_or_else(|| {
                EngineError::Input(format!("part {range:?} of {} requests", wants.len()))
            })?;
            answer_part(wants, &logits)
        })
        .and_then(|parts| {
            model.device().synchronize()?;
            let answers: Vec<Logits> = parts.into_iter().flatten().collect();
            match answers.len() == requests.len() {
                true => Ok(answers),
                // Never leave a decoder waiting for an answer that is not coming.
                false => Err(EngineError::Input(format!(
                    "{} answers for {} requests",
                    answers.len(),
                    requests.len()
                ))),
            }
        });
    match answers {
        Ok(answers) => {
            for (r, answer) in requests.iter().zip(answers) {
                r.answer.give(Ok(answer));
            }
        }
        Err(e) => {
            for r in &requests {
                r.answer
                    .give(Err(EngineError::Input(format!("batched forward: {e}"))));
            }
        }
    }
}

/// One part's answers: for each of its requests (how many logits rows it gets, and whether
/// the batcher chooses for it), its rows of `logits` and, for a greedy one, their choices.
fn answer_part(
    wants: &[(usize, Option<Greedy>)],
    logits: &candle_core::Tensor,
) -> Result<Vec<Logits>> {
    let mut at = 0;
    let rows: Vec<_> = wants
        .iter()
        .map(|&(n, greedy)| {
            at += n;
            (at - n..at, greedy)
        })
        .collect();
    let chosen = match crate::switches::PER_SEQUENCE_CHOICES.on() {
        // A failure here leaves each greedy decoder to make its own choices, which reports it.
        false => choices::choose(logits, &rows).unwrap_or_default(),
        true => Vec::new(),
    };
    let mut chosen = chosen.into_iter();
    rows.iter()
        .map(|(rows, _)| {
            Ok(Logits {
                rows: logits.narrow(0, rows.start, rows.len())?,
                chosen: chosen.next().flatten(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use candle_core::{DType, Device, Tensor};
    use sdlm_kernels::AttentionShape;

    use super::*;

    fn shared() -> Arc<Shared> {
        let shape = AttentionShape {
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 1,
            page_size: 4,
        };
        Arc::new(Shared::new(KvStorage::new(1, 1, shape)))
    }

    fn cache(shared: &Arc<Shared>) -> PagedCache {
        PagedCache {
            table: BlockTable::new(),
            context: 0,
            pool: PagePool::new(16, 4),
            shared: Arc::clone(shared),
            greedy: None,
        }
    }

    /// Answers every request with one zero row per token, and records the rounds' sizes.
    fn answer_all(sizes: &RefCell<Vec<usize>>) -> impl FnMut(Vec<ForwardRequest>) + '_ {
        |requests: Vec<ForwardRequest>| {
            sizes.borrow_mut().push(requests.len());
            for r in requests {
                let rows = Tensor::zeros((r.tokens.len(), 3), DType::F32, &Device::Cpu);
                r.answer
                    .give(rows.map(Logits::from).map_err(EngineError::from));
            }
        }
    }

    /// A start and a first step: a forward of two tokens, then one of one; the rows it got.
    fn two_forwards(c: &mut PagedCache) -> Stepping<'_, usize> {
        Box::pin(async move {
            let mut rows = 0;
            for tokens in [&[7u32, 8][..], &[9]] {
                let logits = c.run(tokens, 1, tokens.len(), LogitRows::All).await;
                rows += logits.map(|l| l.rows.dims()[0]).unwrap_or(0);
            }
            rows
        })
    }

    #[test]
    fn the_forwards_of_an_iteration_run_together_round_by_round() {
        let shared = shared();
        let (mut a, mut b) = (cache(&shared), cache(&shared));
        let sizes = RefCell::new(Vec::new());
        let stepping = vec![(0, two_forwards(&mut a)), (1, two_forwards(&mut b))];
        let mut done = drive(&shared, stepping, Vec::new(), |_| 0, answer_all(&sizes));
        done.sort();
        assert_eq!(done, vec![(0, 3), (1, 3)]);
        assert_eq!(
            *sizes.borrow(),
            vec![2, 2],
            "both first forwards, then both second"
        );
        assert_eq!((a.context, b.context), (3, 3));
    }

    #[test]
    fn a_sequence_that_panics_or_waits_without_a_forward_fails_alone() {
        let shared = shared();
        let mut asking = cache(&shared);
        let sizes = RefCell::new(Vec::new());
        let stepping: Vec<(usize, Stepping<'_, usize>)> = vec![
            (0, Box::pin(async { panic!("a decoder bug") })),
            (1, Box::pin(std::future::pending())),
            (2, two_forwards(&mut asking)),
            (3, Box::pin(async { 5 })),
        ];
        let mut done = drive(&shared, stepping, Vec::new(), |_| 99, answer_all(&sizes));
        done.sort();
        assert_eq!(done, vec![(0, 99), (1, 99), (2, 3), (3, 5)]);
        assert_eq!(*sizes.borrow(), vec![1, 1]);
    }
}
