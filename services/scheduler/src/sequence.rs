//! One sequence from admission to its last block. Its whole state is the tokens committed so
//! far: when its worker dies, hangs, drains or refuses it, the sequence goes back to placement
//! and resumes on another worker from its last committed block, so the stream it feeds
//! neither loses nor repeats a token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sdlm_proto::v1::{RunRequest, SequenceEvent};
use sdlm_runtime::deadline::remaining;
use sdlm_runtime::metrics;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::placement::{place, NoPlace, Placement};
use crate::pool::WorkerPool;

pub type Events = mpsc::Sender<Result<SequenceEvent, Status>>;

/// The bounded global queue: sequences waiting for room on a worker.
pub struct Queue {
    max: usize,
    waiting: AtomicUsize,
}

/// A place in the queue, given up on drop.
pub struct Ticket(Arc<Queue>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        metrics().queue_depth.dec();
    }
}

impl Queue {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn enter(self: &Arc<Self>) -> Result<Ticket, Status> {
        let previous = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            });
        match previous {
            Ok(_) => {
                metrics().queue_depth.inc();
                Ok(Ticket(Arc::clone(self)))
            }
            Err(n) => Err(Status::resource_exhausted(format!(
                "the scheduler queue is full ({n} sequences waiting, max_queue is {})",
                self.max
            ))),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Patience {
    /// How long a sequence waits for a worker before UNAVAILABLE.
    pub queue_timeout: Duration,
    /// Moves per sequence before it fails (a sequence that kills every worker stops somewhere).
    pub max_moves: u32,
}

pub struct Sequence {
    pub run: RunRequest,
    pub deadline: Option<Instant>,
    /// The sequence's span, under the gateway's request span.
    pub span: tracing::Span,
}

impl Sequence {
    pub fn tokens(&self) -> usize {
        let max_new = self.run.params.as_ref().map_or(0, |p| p.max_new_tokens);
        self.run.prompt_tokens.len() + max_new as usize
    }
}

enum Outcome {
    Finished,
    ClientGone,
    Failed(Status),
    Moved(String),
}

/// Runs `seq` to its end, feeding `events`.
pub async fn drive(
    pool: Arc<WorkerPool>,
    mut seq: Sequence,
    first: Option<Placement>,
    ticket: Option<Ticket>,
    patience: Patience,
    events: Events,
) {
    let mut placement = first;
    let mut ticket = ticket;
    let mut moves = 0u32;
    loop {
        let p = match placement.take() {
            Some(p) => p,
            None => match wait_for_place(&pool, &seq, patience, &events).await {
                Ok(p) => p,
                Err(status) => {
                    let _ = events.send(Err(status)).await;
                    return;
                }
            },
        };
        // Once placed, the sequence no longer waits in the queue.
        ticket.take();
        match run_on(&p, &mut seq, moves, &events).await {
            Outcome::Finished | Outcome::ClientGone => return,
            Outcome::Failed(status) => {
                let _ = events.send(Err(status)).await;
                return;
            }
            Outcome::Moved(why) => {
                moves += 1;
                metrics().sequence_migrations_total.inc();
                tracing::warn!(
                    request_id = seq.run.request_id,
                    from = p.slot.id,
                    committed = seq.run.committed_tokens.len(),
                    why,
                    "sequence moves to another worker"
                );
                if moves > patience.max_moves {
                    let _ = events
                        .send(Err(Status::unavailable(format!(
                            "the sequence moved {moves} times without finishing; giving up"
                        ))))
                        .await;
                    return;
                }
            }
        }
    }
}

async fn wait_for_place(
    pool: &Arc<WorkerPool>,
    seq: &Sequence,
    patience: Patience,
    events: &Events,
) -> Result<Placement, Status> {
    let give_up = Instant::now() + patience.queue_timeout;
    let give_up = seq.deadline.map_or(give_up, |d| d.min(give_up));
    loop {
        let changed = pool.changed.notified();
        match place(pool, &seq.run.model, seq.tokens()) {
            Ok(p) => return Ok(p),
            Err(NoPlace::TooLarge { pages, largest }) => {
                return Err(NoPlace::too_large(pages, largest))
            }
            Err(NoPlace::Full | NoPlace::NoWorker) => {}
        }
        if Instant::now() >= give_up {
            return Err(if seq.deadline.is_some_and(|d| d <= give_up) {
                Status::deadline_exceeded("deadline passed while waiting for a worker")
            } else {
                Status::unavailable(format!(
                    "no worker could take the sequence within {:?}",
                    patience.queue_timeout
                ))
            });
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = events.closed() => return Err(Status::cancelled("the caller went away")),
        }
    }
}

async fn run_on(p: &Placement, seq: &mut Sequence, moves: u32, events: &Events) -> Outcome {
    let mut alive = p.slot.alive.subscribe();
    let mut request = tonic::Request::new(seq.run.clone());
    let attempt = tracing::info_span!(
        parent: &seq.span,
        "placement",
        worker = %p.slot.id,
        resumed_after = seq.run.committed_tokens.len()
    );
    sdlm_runtime::propagate(&attempt, request.metadata_mut());
    if let Some(d) = seq.deadline {
        request.set_timeout(remaining(d));
    }
    let deadline = seq.deadline;
    let expired = async move {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let mut client = p.slot.client.clone();
    let started = tokio::select! {
        r = client.run(request) => r,
        _ = dead(&mut alive) => return Outcome::Moved("worker dead".into()),
        _ = events.closed() => return Outcome::ClientGone,
        _ = &mut expired => return Outcome::Failed(Status::deadline_exceeded("deadline passed")),
    };
    let mut stream = match started {
        Ok(s) => s.into_inner(),
        Err(status) => return classify(p, status),
    };
    loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(mut event)) => {
                    seq.run.committed_tokens.extend_from_slice(&event.tokens);
                    event.migrations = moves;
                    let finished = event.finish_reason.is_some();
                    if events.send(Ok(event)).await.is_err() {
                        return Outcome::ClientGone;
                    }
                    if finished {
                        return Outcome::Finished;
                    }
                }
                Ok(None) => return Outcome::Moved("the worker ended the stream early".into()),
                Err(status) => return classify(p, status),
            },
            _ = dead(&mut alive) => return Outcome::Moved("worker dead".into()),
            _ = events.closed() => return Outcome::ClientGone,
            _ = &mut expired => return Outcome::Failed(Status::deadline_exceeded("deadline passed")),
        }
    }
}

/// Resolves when the worker is marked dead.
async fn dead(alive: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it before the caller's next await.
    let _ = alive.wait_for(|a| !*a).await.map(|_| ());
}

/// What a worker's error means for the sequence: the caller's own mistakes and deadlines go
/// back to the caller; a draining or full worker sends it elsewhere; anything else is taken as
/// the worker failing, which marks it dead until a probe succeeds again.
fn classify(p: &Placement, status: Status) -> Outcome {
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::DeadlineExceeded => {
            Outcome::Failed(status)
        }
        Code::Internal => Outcome::Failed(status),
        Code::Aborted | Code::ResourceExhausted => {
            if status.code() == Code::Aborted {
                if let Ok(mut c) = p.slot.capacity.lock() {
                    if let Some(c) = c.as_mut() {
                        c.draining = true;
                    }
                }
            }
            Outcome::Moved(status.message().to_string())
        }
        _ => {
            p.slot.mark_dead(status.message());
            Outcome::Moved(format!("{:?}: {}", status.code(), status.message()))
        }
    }
}
