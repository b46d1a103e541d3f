//! How a decoder waits for its forwards. A decoder's step is straight-line code that awaits each
//! forward from its cache. Over a dense cache the forward has run by the time it is awaited, so
//! [`now`] finishes the step in one poll. Under the step batcher the forward waits until the
//! batcher, which polls every stepping sequence on its own thread, has gathered all their
//! forwards and run them as one: no thread per sequence and no hand-off between threads.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::error::{EngineError, Result};

/// A decoder's step (or start), as a future over its forwards.
pub type StepFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Polls `future` once, without a waker: what runs outside the step batcher, where every forward
/// is ready when awaited. A future that waits anyway is an error, not a hang.
pub fn now<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(result) => result,
        Poll::Pending => Err(EngineError::Input(
            "a decoder outside the step batcher waited for a batched forward".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_step_finishes_at_once_and_a_waiting_one_is_an_error() {
        assert_eq!(now(async { Ok(3) }).ok(), Some(3));
        let err = now(std::future::pending::<Result<()>>()).unwrap_err();
        assert!(
            err.to_string().contains("outside the step batcher"),
            "{err}"
        );
    }
}
