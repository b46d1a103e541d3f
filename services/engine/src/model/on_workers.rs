//! Runs a forward on one of rayon's worker threads.
//!
//! candle's CPU ops and our few-row matmuls split their work with rayon. Called from a thread
//! outside the pool (the decoder's, the step batcher's), every such op is injected into the
//! pool: the caller wakes a worker and then sleeps until the op is done, two futex round trips
//! per op, and a forward of the shipped model has about fifty ops. Run from a worker, an op is a
//! `join` that the worker starts itself; it wakes the other worker only to share the second
//! half, and takes that half back if the other has not started it, so it never waits for a
//! wake-up. Measured with `sdlm bench` on the shipped model (2 cores, builds without and with
//! this change and the LM head over wanted rows only, alternating; this was most of it, see
//! docs/benchmarks.md): AR decoding 385 / 399 → 613 / 594 tokens/s, diffusion at B = 8 500 / 467
//! → 804 / 732.

use std::sync::atomic::{AtomicBool, Ordering};

/// `f()`, run on a rayon worker thread when `device` is the CPU: this thread if it is a worker,
/// else one of the global pool's, while this thread waits (one injection per forward instead of
/// one per op). On a GPU the ops do not use rayon, and the forward stays on the calling thread,
/// where the CUDA context is bound.
pub(crate) fn on_workers<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        if !crate::switches::SLEEPING_WORKERS.on() {
            s.spawn(|_| keep_busy(&done));
        }
        let r = f();
        done.store(true, Ordering::Release);
        r
    })
}

/// `(a(), b())` for two independent products of the same input `x` (a layer's q and k/v, its
/// gate and up): side by side on rayon's workers when `x` is an inference input on the CPU, in
/// turn otherwise (a GPU's forward stays on its thread; a training forward's matmuls already
/// split across threads). The layers' products are each too small to split across threads
/// with profit (below `amx_bf16`'s 512 KB), but two of them are not: gate and up over 100 rows
/// took 122 µs in turn and 66–75 µs side by side.
pub(crate) fn side_by_side<A: Send, B: Send>(
    x: &candle_core::Tensor,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if x.device().is_cpu() && !x.track_op() && !crate::switches::PRODUCTS_IN_TURN.on() {
        rayon::join(a, b)
    } else {
        (a(), b())
    }
}

/// Keeps one worker looking for the forward's work until `done`, instead of letting it fall
/// asleep between two ops and be woken for the next: a wake-up is a system call for the worker
/// that shares an op (and, in a VM, an interrupt to the sleeping core), and a forward has
/// dozens of ops, with serial stretches between them (the smaller matmuls run on one thread)
/// longer than a worker spins before it sleeps. Measured on the shipped model through the step
/// batcher (2-core Xeon, bf16; docs/benchmarks.md): one sequence +17–23% in diffusion and +28%
/// in AR, 16 sequences +12–21%. `SDLM_SLEEPING_WORKERS=1` lets the worker sleep, to compare.
fn keep_busy(done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::on_workers;

    #[test]
    fn the_work_runs_on_a_rayon_worker_and_its_result_comes_back() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "tests run outside the pool"
        );
        let (index, sum) = on_workers(&candle_core::Device::Cpu, || {
            let sum: u64 = rayon::iter::ParallelIterator::sum(
                rayon::iter::IntoParallelIterator::into_par_iter(1..=100u64),
            );
            (rayon::current_thread_index(), sum)
        });
        assert!(index.is_some());
        assert_eq!(sum, 5050);
        // Called from a worker it runs in place.
        let cpu = candle_core::Device::Cpu;
        let nested = on_workers(&cpu, || {
            let outer = rayon::current_thread_index();
            (outer, on_workers(&cpu, rayon::current_thread_index))
        });
        assert_eq!(nested.0, nested.1);
    }
}
