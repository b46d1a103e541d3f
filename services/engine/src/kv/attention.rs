//! Paged attention on the CPU for a ragged batch: every sequence's query tokens (a prefill chunk,
//! an open diffusion block, or one AR token) attend to that sequence's committed tokens in the
//! cache pages and to the new tokens their query-block rule allows. The math and the layouts are
//! `sdlm_kernels::reference::paged_attention`'s (and so the CUDA kernel's); this one splits the
//! work across threads, one query token (all its heads) per task, and uses an online softmax so
//! that nothing is allocated per token: each thread reuses one accumulator.

use rayon::prelude::*;
use sdlm_kernels::{AttentionShape, KernelError, RaggedBatch};

/// `out[t, h] = softmax(scale · q[t, h] · K) V`, as the reference; f32 throughout.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    shape: &AttentionShape,
    batch: &RaggedBatch,
    q: &[f32],
    k_new: &[f32],
    v_new: &[f32],
    k_pages: &[f32],
    v_pages: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let num_pages = k_pages.len() / shape.page_elems().max(1);
    let stats = batch.validate(shape, num_pages)?;
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let expect = sdlm_kernels::check_len;
    expect("q", q.len(), stats.num_tokens * h * d)?;
    expect("out", out.len(), stats.num_tokens * h * d)?;
    expect("k_new", k_new.len(), stats.num_tokens * kvh * d)?;
    expect("v_new", v_new.len(), stats.num_tokens * kvh * d)?;
    expect("k_pages", k_pages.len(), num_pages * shape.page_elems())?;
    expect("v_pages", v_pages.len(), num_pages * shape.page_elems())?;

    // The sequence of each query token, so that tasks can be per token.
    let mut seq_of = Vec::with_capacity(stats.num_tokens);
    for s in 0..stats.num_seqs {
        let len = (batch.query_starts[s + 1] - batch.query_starts[s]) as usize;
        seq_of.extend(std::iter::repeat_n(s, len));
    }
    let group = shape.group();
    out.par_chunks_mut(h * d).enumerate().for_each_init(
        || vec![0f32; d],
        |acc, (token, out_row)| {
            let s = seq_of[token];
            let q0 = batch.query_starts[s] as usize;
            let qlen = batch.query_starts[s + 1] as usize - q0;
            let ctx = batch.context_lens[s] as usize;
            let qblock = batch.query_blocks[s] as usize;
            let table = &batch.block_tables[s * batch.max_pages_per_seq..];
            let i = token - q0;
            let keys = ctx + ((i / qblock + 1) * qblock).min(qlen);
            for head in 0..h {
                let kv = head / group;
                let qrow = &q[(token * h + head) * d..][..d];
                acc.fill(0.0);
                let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
                for t in 0..keys {
                    let (k_src, v_src, off) = if t < ctx {
                        let page = table[t / shape.page_size] as usize;
                        let slot = page * shape.page_size + t % shape.page_size;
                        (k_pages, v_pages, slot * kvh * d)
                    } else {
                        (k_new, v_new, (q0 + t - ctx) * kvh * d)
                    };
                    let krow = &k_src[off + kv * d..][..d];
                    let vrow = &v_src[off + kv * d..][..d];
                    let score = scale * qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f32>();
                    // Online softmax: rescale what has been summed when the maximum grows.
                    if score > max {
                        let r = (max - score).exp();
                        sum *= r;
                        acc.iter_mut().for_each(|a| *a *= r);
                        max = score;
                    }
                    let p = (score - max).exp();
                    sum += p;
                    for (a, v) in acc.iter_mut().zip(vrow) {
                        *a += p * v;
                    }
                }
                for (o, a) in out_row[head * d..][..d].iter_mut().zip(acc.iter()) {
                    *o = a / sum;
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Random ragged batches (prefill chunks, diffusion blocks, single AR rows; pages scattered)
    /// give the reference's outputs.
    #[test]
    fn matches_the_reference_on_random_ragged_batches() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20 {
            let shape = AttentionShape {
                num_heads: 6,
                num_kv_heads: *[1usize, 2, 3, 6].get(rng.random_range(0..4)).unwrap_or(&1),
                head_dim: 16,
                page_size: *[1usize, 4, 16].get(rng.random_range(0..3)).unwrap_or(&4),
            };
            let seqs = rng.random_range(1..6);
            let (mut starts, mut ctx, mut qb) = (vec![0i32], Vec::new(), Vec::new());
            for _ in 0..seqs {
                let qlen = rng.random_range(1..20);
                starts.push(starts.last().copied().unwrap_or(0) + qlen);
                ctx.push(rng.random_range(0..40));
                qb.push(*[1, 4, 32].get(rng.random_range(0..3)).unwrap_or(&1));
            }
            let max_pages = 40usize.div_ceil(shape.page_size);
            let num_pages = seqs * max_pages;
            // Each sequence's pages in a shuffled order across the pool.
            let mut ids: Vec<i32> = (0..num_pages as i32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.random_range(0..=i));
            }
            let tokens = *starts.last().unwrap_or(&0) as usize;
            let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
            let mut fill =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let q = fill(tokens * h * d);
            let (k_new, v_new) = (fill(tokens * kvh * d), fill(tokens * kvh * d));
            let (k_pages, v_pages) = (
                fill(num_pages * shape.page_elems()),
                fill(num_pages * shape.page_elems()),
            );
            let batch = RaggedBatch {
                query_starts: &starts,
                context_lens: &ctx,
                query_blocks: &qb,
                block_tables: &ids,
                max_pages_per_seq: max_pages,
            };
            let mut want = vec![0f32; tokens * h * d];
            sdlm_kernels::reference::paged_attention(
                &shape, &batch, &q, &k_new, &v_new, &k_pages, &v_pages, 0.25, &mut want,
            )
            .unwrap();
            let mut got = vec![f32::NAN; tokens * h * d];
            paged_attention(
                &shape, &batch, &q, &k_new, &v_new, &k_pages, &v_pages, 0.25, &mut got,
            )
            .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5, "{g} vs {w} ({shape:?})");
            }
        }
    }
}
