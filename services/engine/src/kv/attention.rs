//! Paged attention on the CPU for a ragged batch: every sequence's query tokens (a prefill chunk,
//! an open diffusion block, or one AR token) attend to that sequence's committed tokens in the
//! cache pages and to the new tokens their query-block rule allows. The math and the layouts are
//! `sdlm_kernels::reference::paged_attention`'s (and so the CUDA kernel's); this one splits the
//! work across threads, one query token (all its heads) per task, so that a token's output does
//! not depend on the rest of the batch. Per head it scores every key the token sees (lane-split
//! dot products), takes the softmax of those scores in a buffer each thread reuses, then sums
//! the value rows: nothing is allocated per token, and the loops vectorise (an AVX2 build is
//! picked at run time; both builds round alike, `crate::simd`). Heads of 64 and 128 values, the
//! widths of the models served, have their own build with the width known to the compiler
//! (16 sequences × 8 tokens over 150 cached ones, 4 heads of 64, 2 threads: 1.05 → 0.66 ms).

use rayon::prelude::*;
use sdlm_kernels::{AttentionShape, KernelError, RaggedBatch};

use crate::simd::{axpy, dispatch, dot, dot_fixed, exp_shifted, wide_simd, Build};

/// Query tokens a task of paged attention takes at most: four tokens fill the AVX-512 kernel's
/// walks (four queries each) for any number of query heads per kv head.
const TOKENS_PER_TASK: usize = 4;

/// `out[t, h] = softmax(scale · q[t, h] · K) V`, as the reference; f32 throughout. With
/// `queries`, only those tokens of the batch (indices, in order) attend, each output row the
/// next of `out`: the last layer of a forward needs only the rows whose logits are wanted, while
/// every token's keys and values (`k_new`, `v_new`) are still there to be seen.
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
    queries: Option<&[usize]>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let num_pages = k_pages.len() / shape.page_elems().max(1);
    let stats = batch.validate(shape, num_pages)?;
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let expect = sdlm_kernels::check_len;
    expect("q", q.len(), stats.num_tokens * h * d)?;
    let rows = queries.map_or(stats.num_tokens, <[usize]>::len);
    expect("out", out.len(), rows * h * d)?;
    if let Some(&t) = queries.and_then(|qs| qs.iter().find(|&&t| t >= stats.num_tokens)) {
        return Err(KernelError::OutOfRange {
            field: "queries",
            value: t as i64,
            limit: format!("a batch of {} tokens", stats.num_tokens),
        });
    }
    expect("k_new", k_new.len(), stats.num_tokens * kvh * d)?;
    expect("v_new", v_new.len(), stats.num_tokens * kvh * d)?;
    expect("k_pages", k_pages.len(), num_pages * shape.page_elems())?;
    expect("v_pages", v_pages.len(), num_pages * shape.page_elems())?;

    // The sequence of each query token, and so the keys it sees.
    let mut seq_of = Vec::with_capacity(stats.num_tokens);
    for s in 0..stats.num_seqs {
        let len = (batch.query_starts[s + 1] - batch.query_starts[s]) as usize;
        seq_of.extend(std::iter::repeat_n(s, len));
    }
    let keys_of = |token: usize| {
        let s = seq_of[token];
        let q0 = batch.query_starts[s] as usize;
        let qlen = batch.query_starts[s + 1] as usize - q0;
        let ctx = batch.context_lens[s] as usize;
        let qblock = batch.query_blocks[s] as usize;
        let i = token - q0;
        Keys {
            shape,
            table: &batch.block_tables[s * batch.max_pages_per_seq..],
            cached: ctx,
            seen: ctx + ((i / qblock + 1) * qblock).min(qlen),
            first_new: q0,
            pages: (k_pages, v_pages),
            new: (k_new, v_new),
        }
    };
    let tokens: Vec<usize> = match queries {
        Some(qs) => qs.to_vec(),
        None => (0..rows).collect(),
    };
    // Tasks of up to `TOKENS_PER_TASK` consecutive output rows whose tokens see the same keys
    // (a diffusion block's tokens, a prompt chunk's block): the AVX-512 kernel walks those keys
    // once for up to four of their queries, and a block of 32 still makes eight tasks for the
    // workers to share.
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut last_keys = None;
    for (row, &token) in tokens.iter().enumerate() {
        let keys = (seq_of[token], keys_of(token).seen);
        match groups.last_mut() {
            Some((_, n)) if last_keys == Some(keys) && *n < TOKENS_PER_TASK => *n += 1,
            _ => groups.push((row, 1)),
        }
        last_keys = Some(keys);
    }
    let mut tasks = Vec::with_capacity(groups.len());
    let mut rest = out;
    for &(first, n) in &groups {
        let (mine, after) = std::mem::take(&mut rest).split_at_mut(n * h * d);
        tasks.push((&tokens[first..first + n], mine));
        rest = after;
    }
    let (wide, widest) = (wide_simd(), d == 64 && crate::simd::avx512());
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |scores, (tokens, out)| {
            let keys = keys_of(tokens[0]);
            if widest {
                // SAFETY: `avx512()` reported the features the kernel is compiled for (only
                // ever on x86-64, where the kernel exists).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    super::attention_avx512::attend(&keys, q, tokens, scale, out, scores);
                }
            } else {
                for (&token, out_row) in tokens.iter().zip(out.chunks_exact_mut(h * d)) {
                    let q_row = &q[token * h * d..][..h * d];
                    dispatch!(wide, keys.attend(q_row, scale, out_row, scores));
                }
            }
        });
    Ok(())
}

/// The keys (and values) one query token sees, in order: its sequence's cached tokens through
/// the block table, then the batch's new tokens of that sequence its query block allows.
pub(super) struct Keys<'a> {
    pub(super) shape: &'a AttentionShape,
    table: &'a [i32],
    cached: usize,
    pub(super) seen: usize,
    /// The batch row of the sequence's first new token.
    first_new: usize,
    pages: (&'a [f32], &'a [f32]),
    new: (&'a [f32], &'a [f32]),
}

impl<'a> Keys<'a> {
    /// The key and value rows of kv head `kv`, in order: the pages walked rather than divided
    /// per key.
    #[inline(always)]
    pub(super) fn rows(&self, kv: usize) -> Rows<'_, 'a> {
        Rows {
            keys: self,
            kv,
            t: 0,
            page: 0,
            row: 0,
        }
    }

    /// One token's output row (all heads) from its query row.
    ///
    /// # Safety
    /// The CPU must have `B`'s features.
    #[inline(always)]
    unsafe fn attend<B: Build>(
        &self,
        q_row: &[f32],
        scale: f32,
        out_row: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        scores.resize(self.seen, 0.0);
        B::run(|| match self.shape.head_dim {
            64 => self.heads::<64>(q_row, scale, out_row, scores),
            128 => self.heads::<128>(q_row, scale, out_row, scores),
            _ => self.heads_of_any_width(q_row, scale, out_row, scores),
        })
    }

    /// [`Keys::attend`] for heads of `D` values, the model's width known to the compiler: a
    /// head's output and its query stay in registers across the keys, and each loop vectorises
    /// (the softmax's exp too, its sum kept in lanes).
    #[inline(always)]
    fn heads<const D: usize>(
        &self,
        q_row: &[f32],
        scale: f32,
        out_row: &mut [f32],
        scores: &mut [f32],
    ) {
        let group = self.shape.group();
        for (head, (q, out)) in q_row
            .chunks_exact(D)
            .zip(out_row.chunks_exact_mut(D))
            .enumerate()
        {
            let kv = head / group;
            for (s, (k, _)) in scores.iter_mut().zip(self.rows(kv)) {
                *s = scale * dot_fixed::<D>(q, k);
            }
            let sum = exp_in_place(scores);
            let mut o = [0f32; D];
            for (&p, (_, v)) in scores.iter().zip(self.rows(kv)) {
                for (o, &v) in o.iter_mut().zip(&v[..D]) {
                    *o += p * v;
                }
            }
            for (dst, o) in out.iter_mut().zip(o) {
                *dst = o / sum;
            }
        }
    }

    /// [`Keys::attend`] for any head width.
    #[inline(always)]
    fn heads_of_any_width(
        &self,
        q_row: &[f32],
        scale: f32,
        out_row: &mut [f32],
        scores: &mut [f32],
    ) {
        let d = self.shape.head_dim;
        let group = self.shape.group();
        for (head, (q, o)) in q_row
            .chunks_exact(d)
            .zip(out_row.chunks_exact_mut(d))
            .enumerate()
        {
            let kv = head / group;
            for (s, (k, _)) in scores.iter_mut().zip(self.rows(kv)) {
                *s = scale * dot(q, k);
            }
            let sum = exp_in_place(scores);
            o.fill(0.0);
            for (&p, (_, v)) in scores.iter().zip(self.rows(kv)) {
                axpy(o, p, v);
            }
            for x in o.iter_mut() {
                *x /= sum;
            }
        }
    }
}

/// Replaces each score s by exp(s - max) and returns their sum.
#[inline(always)]
pub(super) fn exp_in_place(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    exp_shifted(scores, max)
}

/// An iterator over the rows a query token sees (see [`Keys::rows`]). Its `next` is inlined
/// into the caller's loop, and so compiled with the caller's AVX2 features: the closure it
/// replaces was a function of its own, compiled for the baseline CPU (SSE, seen in the
/// profile), so the dot products in it could not use the AVX2 build.
pub(super) struct Rows<'k, 'a> {
    keys: &'k Keys<'a>,
    kv: usize,
    /// The next token, and where it lies while in the pages.
    t: usize,
    page: usize,
    row: usize,
}

impl<'a> Iterator for Rows<'_, 'a> {
    type Item = (&'a [f32], &'a [f32]);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        let keys = self.keys;
        let (kvh, d, size) = (
            keys.shape.num_kv_heads,
            keys.shape.head_dim,
            keys.shape.page_size,
        );
        let at = if self.t < keys.cached {
            let id = keys.table[self.page] as usize;
            let at = ((id * size + self.row) * kvh + self.kv) * d;
            self.row += 1;
            if self.row == size {
                (self.page, self.row) = (self.page + 1, 0);
            }
            Some((keys.pages, at))
        } else if self.t < keys.seen {
            let at = ((keys.first_new + self.t - keys.cached) * kvh + self.kv) * d;
            Some((keys.new, at))
        } else {
            None
        };
        let ((k, v), at) = at?;
        self.t += 1;
        Some((&k[at..][..d], &v[at..][..d]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Portable;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Random ragged batches (prefill chunks, diffusion blocks, single AR rows; pages scattered)
    /// give the reference's outputs, and the portable, AVX2 and AVX-512 builds give the same
    /// bits.
    #[test]
    fn matches_the_reference_on_random_ragged_batches_in_every_build() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..30 {
            let shape = AttentionShape {
                num_heads: 6,
                num_kv_heads: *[1usize, 2, 3, 6].get(rng.random_range(0..4)).unwrap_or(&1),
                // 64 and 128 take the fixed-width path, 16 the other.
                head_dim: *[16usize, 64, 128]
                    .get(rng.random_range(0..3))
                    .unwrap_or(&16),
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
                &shape, &batch, &q, &k_new, &v_new, &k_pages, &v_pages, 0.25, None, &mut got,
            )
            .unwrap();
            // Every other token alone: the rows of all of them.
            let some: Vec<usize> = (0..tokens).step_by(2).collect();
            let mut picked = vec![f32::NAN; some.len() * h * d];
            let queries = Some(some.as_slice());
            paged_attention(
                &shape,
                &batch,
                &q,
                &k_new,
                &v_new,
                &k_pages,
                &v_pages,
                0.25,
                queries,
                &mut picked,
            )
            .unwrap();
            for (row, &t) in some.iter().enumerate() {
                assert_eq!(picked[row * h * d..][..h * d], got[t * h * d..][..h * d]);
            }
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5, "{g} vs {w} ({shape:?})");
            }
            #[cfg(target_arch = "x86_64")]
            if crate::simd::wide_simd() {
                // The first sequence's tokens in the portable and the AVX2 build: bit for bit.
                let (h, d) = (shape.num_heads, shape.head_dim);
                for token in 0..starts[1] as usize {
                    let keys = Keys {
                        shape: &shape,
                        table: &ids,
                        cached: ctx[0] as usize,
                        seen: ctx[0] as usize
                            + ((token / qb[0] as usize + 1) * qb[0] as usize)
                                .min(starts[1] as usize),
                        first_new: 0,
                        pages: (&k_pages, &v_pages),
                        new: (&k_new, &v_new),
                    };
                    let q_row = &q[token * h * d..][..h * d];
                    let (mut portable, mut wide) = (vec![0f32; h * d], vec![0f32; h * d]);
                    let mut scores = Vec::new();
                    // SAFETY: the AVX2 build runs only where the CPU reports AVX2.
                    unsafe {
                        keys.attend::<Portable>(q_row, 0.25, &mut portable, &mut scores);
                        keys.attend::<crate::simd::Avx2>(q_row, 0.25, &mut wide, &mut scores);
                    }
                    assert!(portable
                        .iter()
                        .zip(&wide)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                    if crate::simd::avx512() {
                        let mut widest = vec![0f32; h * d];
                        // SAFETY: checked just above.
                        unsafe {
                            keys.attend::<crate::simd::Avx512>(
                                q_row,
                                0.25,
                                &mut widest,
                                &mut scores,
                            )
                        };
                        assert!(portable
                            .iter()
                            .zip(&widest)
                            .all(|(a, b)| a.to_bits() == b.to_bits()));
                    }
                    assert_eq!(portable, got[token * h * d..][..h * d]);
                }
            }
        }
    }

    #[test]
    fn a_query_token_outside_the_batch_is_an_error_naming_it() {
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
            page_size: 4,
        };
        let batch = RaggedBatch {
            query_starts: &[0, 3],
            context_lens: &[0],
            query_blocks: &[1],
            block_tables: &[0],
            max_pages_per_seq: 1,
        };
        let q = vec![0.5f32; 3 * 2 * 8];
        let kv = vec![0.5f32; 3 * 8];
        let pages = vec![0f32; shape.page_elems()];
        let mut out = vec![0f32; 2 * 8];
        let err = paged_attention(
            &shape,
            &batch,
            &q,
            &kv,
            &kv,
            &pages,
            &pages,
            1.0,
            Some(&[3]),
            &mut out,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("queries") && err.contains('3'), "{err}");
    }
}
