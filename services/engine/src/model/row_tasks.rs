//! What the few-row matmuls (`f32_rows`, `q8_matmul`) share: the split of a product `[m, n]`
//! into tasks over weight rows, and the horizontal sum of their AVX2 accumulators; and the split
//! of a row op's output into chunks (SwiGLU, the residual add, the RMSNorms).

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Values a task of a row op (SwiGLU, the residual add, the RMSNorms) takes at most when its
/// output is split across threads (a norm rounds down to whole rows): a decoding step's few
/// rows stay on the thread that runs its forward.
pub(super) const VALUES_PER_TASK: usize = 1 << 14;

/// `n` values made by `fill(first index, chunk)` over chunks of `per_task`, on rayon's threads
/// when there is more than one chunk, into a vector that is not zeroed first: an op's output of
/// 100–500 KB at a step batcher's round was one pass over memory to zero it and another to write
/// it (zeroing was 3–4% of a 16-to-64-sequence round's samples, 2-core Xeon).
///
/// # Safety
/// `fill` writes every value of each chunk it is given.
pub(super) unsafe fn filled_by_chunks(
    n: usize,
    per_task: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let per_task = per_task.max(1);
    let mut out: Vec<f32> = Vec::with_capacity(n);
    let chunks = &mut out.spare_capacity_mut()[..n];
    let task = |(i, chunk): (usize, &mut [MaybeUninit<f32>])| fill(i * per_task, chunk);
    if n > per_task {
        chunks.par_chunks_mut(per_task).enumerate().for_each(task);
    } else {
        chunks.chunks_mut(per_task).enumerate().for_each(task);
    }
    // SAFETY: the chunks cover 0..n, and the caller's `fill` wrote every value of each.
    unsafe { out.set_len(n) };
    out
}

/// `[m, n]` from tasks that each fill a column strip `[m, count]` for weight rows
/// `first..first + count` (`fill(first, count, strip)`), `rows_per_task` at a time, on rayon's
/// threads when `parallel`; the strips are then laid side by side.
pub(super) fn by_weight_rows(
    m: usize,
    n: usize,
    rows_per_task: usize,
    parallel: bool,
    fill: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let strip = |t: usize| {
        let first = t * rows_per_task;
        let count = rows_per_task.min(n - first);
        let mut strip = vec![0f32; m * count];
        fill(first, count, &mut strip);
        strip
    };
    let tasks = n.div_ceil(rows_per_task);
    let strips: Vec<Vec<f32>> = if parallel {
        (0..tasks).into_par_iter().map(strip).collect()
    } else {
        (0..tasks).map(strip).collect()
    };
    let mut out = vec![0f32; m * n];
    for (t, strip) in strips.iter().enumerate() {
        let first = t * rows_per_task;
        let count = strip.len() / m.max(1);
        for i in 0..m {
            out[i * n + first..i * n + first + count]
                .copy_from_slice(&strip[i * count..(i + 1) * count]);
        }
    }
    out
}

/// The sum of a vector's 8 lanes, in a fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
}
