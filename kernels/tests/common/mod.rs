//! Random inputs shared by the reference tests and the CUDA parity tests.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sdlm_kernels::{AttentionShape, Element, RaggedBatch};

/// A fresh seed per run (printed, so a failure can be replayed with SDLM_TEST_SEED).
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("SDLM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: SDLM_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

pub fn random_vec<T: Element>(rng: &mut StdRng, n: usize, scale: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-scale..scale)))
        .collect()
}

/// One sequence of a batch: committed tokens in the cache, new tokens, the mask block size.
#[derive(Clone, Copy, Debug)]
pub struct Seq {
    pub context: usize,
    pub query: usize,
    pub query_block: usize,
}

pub const fn seq(context: usize, query: usize, query_block: usize) -> Seq {
    Seq {
        context,
        query,
        query_block,
    }
}

/// A ragged attention batch with its cache pages laid out in a shuffled order.
pub struct AttentionCase<T> {
    pub shape: AttentionShape,
    pub query_starts: Vec<i32>,
    pub context_lens: Vec<i32>,
    pub query_blocks: Vec<i32>,
    pub block_tables: Vec<i32>,
    pub max_pages_per_seq: usize,
    pub num_pages: usize,
    pub q: Vec<T>,
    pub k_new: Vec<T>,
    pub v_new: Vec<T>,
    pub k_pages: Vec<T>,
    pub v_pages: Vec<T>,
    pub scale: f32,
}

impl<T: Element> AttentionCase<T> {
    pub fn random(rng: &mut StdRng, shape: AttentionShape, seqs: &[Seq]) -> Self {
        let pages_of = |s: &Seq| s.context.div_ceil(shape.page_size);
        let max_pages_per_seq = seqs.iter().map(pages_of).max().unwrap_or(0).max(1);
        let used: usize = seqs.iter().map(pages_of).sum();
        let num_pages = used + 3; // a few pages that belong to nobody
        let mut order: Vec<i32> = (0..num_pages as i32).collect();
        order.shuffle(rng);
        let mut block_tables = vec![-1; seqs.len() * max_pages_per_seq];
        let mut next = order.into_iter();
        for (s, sq) in seqs.iter().enumerate() {
            for p in 0..pages_of(sq) {
                block_tables[s * max_pages_per_seq + p] = next.next().expect("enough pages");
            }
        }
        let mut query_starts = vec![0i32];
        for sq in seqs {
            query_starts.push(query_starts.last().unwrap() + sq.query as i32);
        }
        let tokens = *query_starts.last().unwrap() as usize;
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        Self {
            shape,
            context_lens: seqs.iter().map(|s| s.context as i32).collect(),
            query_blocks: seqs.iter().map(|s| s.query_block as i32).collect(),
            query_starts,
            block_tables,
            max_pages_per_seq,
            num_pages,
            q: random_vec(rng, tokens * h * d, 1.0),
            k_new: random_vec(rng, tokens * kvh * d, 1.0),
            v_new: random_vec(rng, tokens * kvh * d, 1.0),
            k_pages: random_vec(rng, num_pages * shape.page_elems(), 1.0),
            v_pages: random_vec(rng, num_pages * shape.page_elems(), 1.0),
            scale: 1.0 / (d as f32).sqrt(),
        }
    }

    pub fn batch(&self) -> RaggedBatch<'_> {
        RaggedBatch {
            query_starts: &self.query_starts,
            context_lens: &self.context_lens,
            query_blocks: &self.query_blocks,
            block_tables: &self.block_tables,
            max_pages_per_seq: self.max_pages_per_seq,
        }
    }

    pub fn tokens(&self) -> usize {
        *self.query_starts.last().unwrap() as usize
    }

    pub fn reference(&self) -> Vec<T> {
        let mut out = vec![T::default(); self.q.len()];
        sdlm_kernels::reference::paged_attention(
            &self.shape,
            &self.batch(),
            &self.q,
            &self.k_new,
            &self.v_new,
            &self.k_pages,
            &self.v_pages,
            self.scale,
            &mut out,
        )
        .expect("valid case");
        out
    }
}

/// ‖a − b‖ / ‖b‖ in f64; infinite when a holds a non-finite value (an unwritten poisoned slot).
pub fn rel_err<T: Element>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.to_f32() as f64, y.to_f32() as f64);
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
