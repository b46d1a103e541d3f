//! Paged attention over a ragged batch of query blocks; see `cuda/attention.cu` for the mask rule.

use crate::error::{check_len, KernelError};
use crate::{AttentionShape, Element, RaggedBatch};

/// `out[t, h] = softmax(scale * q[t, h] . K) V` over the keys token t may see: every committed
/// token of its sequence (from the pages) and the new tokens allowed by the sequence's
/// `query_block` rule (from `k_new`/`v_new`).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: Element>(
    shape: &AttentionShape,
    batch: &RaggedBatch,
    q: &[T],
    k_new: &[T],
    v_new: &[T],
    k_pages: &[T],
    v_pages: &[T],
    scale: f32,
    out: &mut [T],
) -> Result<(), KernelError> {
    let num_pages = k_pages.len() / shape.page_elems().max(1);
    let stats = batch.validate(shape, num_pages)?;
    let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    check_len("q", q.len(), stats.num_tokens * h * d)?;
    check_len("out", out.len(), stats.num_tokens * h * d)?;
    check_len("k_new", k_new.len(), stats.num_tokens * kvh * d)?;
    check_len("v_new", v_new.len(), stats.num_tokens * kvh * d)?;
    check_len("k_pages", k_pages.len(), num_pages * shape.page_elems())?;
    check_len("v_pages", v_pages.len(), num_pages * shape.page_elems())?;

    let group = shape.group();
    let mut scores = Vec::with_capacity(stats.max_keys);
    let mut acc = vec![0f32; d];
    for s in 0..stats.num_seqs {
        let q0 = batch.query_starts[s] as usize;
        let qlen = batch.query_starts[s + 1] as usize - q0;
        let ctx = batch.context_lens[s] as usize;
        let qblock = batch.query_blocks[s] as usize;
        let table = &batch.block_tables[s * batch.max_pages_per_seq..];
        // Offset of key t (for kv head 0) in either the pages or the new rows.
        let key_at = |t: usize| -> (bool, usize) {
            if t < ctx {
                let page = table[t / shape.page_size] as usize;
                (
                    true,
                    (page * shape.page_size + t % shape.page_size) * kvh * d,
                )
            } else {
                (false, (q0 + t - ctx) * kvh * d)
            }
        };
        for i in 0..qlen {
            let visible_new = ((i / qblock + 1) * qblock).min(qlen);
            let keys = ctx + visible_new;
            for head in 0..h {
                let kv = head / group;
                let qrow = &q[((q0 + i) * h + head) * d..][..d];
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for t in 0..keys {
                    let (paged, off) = key_at(t);
                    let krow = &(if paged { k_pages } else { k_new })[off + kv * d..][..d];
                    let dot: f32 = qrow
                        .iter()
                        .zip(krow)
                        .map(|(a, b)| a.to_f32() * b.to_f32())
                        .sum();
                    let sc = dot * scale;
                    max = max.max(sc);
                    scores.push(sc);
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut sum = 0f32;
                for (t, sc) in scores.iter().enumerate() {
                    let p = (sc - max).exp();
                    sum += p;
                    let (paged, off) = key_at(t);
                    let vrow = &(if paged { v_pages } else { v_new })[off + kv * d..][..d];
                    for (a, v) in acc.iter_mut().zip(vrow) {
                        *a += p * v.to_f32();
                    }
                }
                let orow = &mut out[((q0 + i) * h + head) * d..][..d];
                for (o, a) in orow.iter_mut().zip(&acc) {
                    *o = T::from_f32(a / sum);
                }
            }
        }
    }
    Ok(())
}
