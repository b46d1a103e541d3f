//! The CPU reference kernels against independent, naive f64 formulations of the same math, and
//! against properties that must hold whatever the implementation.

mod common;

use common::{rel_err, seq, AttentionCase, Seq};
use rand::Rng;
use sdlm_kernels::reference::{
    kv_scatter, paged_attention, residual_rmsnorm, rope_inplace, row_confidence, select_unmask,
    RopeTable,
};
use sdlm_kernels::{AttentionShape, KernelError};

const SHAPE: AttentionShape = AttentionShape {
    num_heads: 6,
    num_kv_heads: 2,
    head_dim: 16,
    page_size: 4,
};

/// Dense attention in f64 with the mask written out as a matrix, from the rule in the docs.
fn dense_attention(case: &AttentionCase<f32>) -> Vec<f32> {
    let s = case.shape;
    let (h, kvh, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
    let mut out = vec![0f32; case.q.len()];
    for b in 0..case.context_lens.len() {
        let ctx = case.context_lens[b] as usize;
        let q0 = case.query_starts[b] as usize;
        let qlen = case.query_starts[b + 1] as usize - q0;
        let qb = case.query_blocks[b] as usize;
        // Gather this sequence's keys and values in order: cache first, then the new tokens.
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for t in 0..ctx {
            let page = case.block_tables[b * case.max_pages_per_seq + t / s.page_size] as usize;
            let off = (page * s.page_size + t % s.page_size) * kvh * d;
            keys.push(&case.k_pages[off..off + kvh * d]);
            values.push(&case.v_pages[off..off + kvh * d]);
        }
        for i in 0..qlen {
            let off = (q0 + i) * kvh * d;
            keys.push(&case.k_new[off..off + kvh * d]);
            values.push(&case.v_new[off..off + kvh * d]);
        }
        let mask: Vec<Vec<bool>> = (0..qlen)
            .map(|i| {
                (0..ctx + qlen)
                    .map(|t| t < ctx || (t - ctx) / qb <= i / qb)
                    .collect()
            })
            .collect();
        for i in 0..qlen {
            for head in 0..h {
                let kv = head / (h / kvh);
                let q = &case.q[((q0 + i) * h + head) * d..][..d];
                let scores: Vec<f64> = (0..ctx + qlen)
                    .map(|t| {
                        if !mask[i][t] {
                            return f64::NEG_INFINITY;
                        }
                        let k = &keys[t][kv * d..][..d];
                        q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * case.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for j in 0..d {
                    let o: f64 = (0..ctx + qlen)
                        .map(|t| weights[t] * values[t][kv * d + j] as f64)
                        .sum();
                    out[((q0 + i) * h + head) * d + j] = (o / total) as f32;
                }
            }
        }
    }
    out
}

const MIXED: &[Seq] = &[
    seq(0, 5, 1),
    seq(9, 8, 8),
    seq(13, 1, 1),
    seq(4, 10, 4),
    seq(21, 3, 2),
];

#[test]
fn paged_attention_matches_dense_masked_attention() {
    let mut rng = common::rng("paged_attention_matches_dense_masked_attention");
    let case = AttentionCase::<f32>::random(&mut rng, SHAPE, MIXED);
    let err = rel_err(&case.reference(), &dense_attention(&case));
    assert!(err <= 1e-6, "relative error {err}");
}

#[test]
fn causal_prefill_equals_decoding_one_token_at_a_time() {
    // Token i of a causal chunk must see exactly what it would see as an AR step with the i
    // earlier tokens committed to the cache.
    let mut rng = common::rng("causal_prefill_equals_decoding_one_token_at_a_time");
    let (ctx, n) = (6, 7);
    let chunk = AttentionCase::<f32>::random(&mut rng, SHAPE, &[seq(ctx, n, 1)]);
    let full = chunk.reference();
    let (kvh, d, h) = (SHAPE.num_kv_heads, SHAPE.head_dim, SHAPE.num_heads);
    for i in 0..n {
        let mut step = AttentionCase::<f32>::random(&mut rng, SHAPE, &[seq(ctx + i, 1, 1)]);
        // Same committed prefix: copy the chunk's cache and its first i new tokens into pages.
        let row = kvh * d;
        let slot_of = |case: &AttentionCase<f32>, t: usize| {
            case.block_tables[t / SHAPE.page_size] as usize * SHAPE.page_size + t % SHAPE.page_size
        };
        for t in 0..ctx + i {
            let (src_k, src_v) = if t < ctx {
                let o = slot_of(&chunk, t) * row;
                (
                    chunk.k_pages[o..o + row].to_vec(),
                    chunk.v_pages[o..o + row].to_vec(),
                )
            } else {
                let o = (t - ctx) * row;
                (
                    chunk.k_new[o..o + row].to_vec(),
                    chunk.v_new[o..o + row].to_vec(),
                )
            };
            let o = slot_of(&step, t) * row;
            step.k_pages[o..o + row].copy_from_slice(&src_k);
            step.v_pages[o..o + row].copy_from_slice(&src_v);
        }
        step.q.copy_from_slice(&chunk.q[i * h * d..(i + 1) * h * d]);
        step.k_new
            .copy_from_slice(&chunk.k_new[i * row..(i + 1) * row]);
        step.v_new
            .copy_from_slice(&chunk.v_new[i * row..(i + 1) * row]);
        assert_eq!(
            step.reference(),
            full[i * h * d..(i + 1) * h * d],
            "token {i}"
        );
    }
}

#[test]
fn attention_refuses_a_block_table_entry_outside_the_pool() {
    let mut rng = common::rng("attention_refuses_a_block_table_entry_outside_the_pool");
    let mut case = AttentionCase::<f32>::random(&mut rng, SHAPE, &[seq(5, 2, 2)]);
    case.block_tables[0] = case.num_pages as i32;
    let mut out = vec![0f32; case.q.len()];
    let err = paged_attention(
        &case.shape,
        &case.batch(),
        &case.q,
        &case.k_new,
        &case.v_new,
        &case.k_pages,
        &case.v_pages,
        case.scale,
        &mut out,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::OutOfRange {
                field: "block_tables",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("pages"), "{err}");
}

#[test]
fn kv_scatter_writes_exactly_the_named_slots() {
    let mut rng = common::rng("kv_scatter_writes_exactly_the_named_slots");
    let row = 12;
    let mut k_pages: Vec<f32> = common::random_vec(&mut rng, 10 * row, 1.0);
    let mut v_pages: Vec<f32> = common::random_vec(&mut rng, 10 * row, 1.0);
    let (k0, v0) = (k_pages.clone(), v_pages.clone());
    let slots = [7, -1, 2];
    let kb: Vec<f32> = common::random_vec(&mut rng, 3 * row, 1.0);
    let vb: Vec<f32> = common::random_vec(&mut rng, 3 * row, 1.0);
    kv_scatter(row, &kb, &vb, &slots, &mut k_pages, &mut v_pages).unwrap();
    for slot in 0..10 {
        let got = &k_pages[slot * row..][..row];
        let gotv = &v_pages[slot * row..][..row];
        match slots.iter().position(|&s| s == slot as i32) {
            Some(t) => {
                assert_eq!(got, &kb[t * row..][..row]);
                assert_eq!(gotv, &vb[t * row..][..row]);
            }
            None => {
                assert_eq!(got, &k0[slot * row..][..row]);
                assert_eq!(gotv, &v0[slot * row..][..row]);
            }
        }
    }
    let err = kv_scatter(row, &kb, &vb, &[10, 0, 1], &mut k_pages, &mut v_pages).unwrap_err();
    assert!(err.to_string().contains("slots"), "{err}");
}

#[test]
fn residual_rmsnorm_matches_f64_formula() {
    let mut rng = common::rng("residual_rmsnorm_matches_f64_formula");
    let (rows, hidden) = (5, 96);
    let x: Vec<f32> = common::random_vec(&mut rng, rows * hidden, 2.0);
    let r0: Vec<f32> = common::random_vec(&mut rng, rows * hidden, 2.0);
    let w: Vec<f32> = common::random_vec(&mut rng, hidden, 1.5);
    let (mut r, mut out) = (r0.clone(), vec![0f32; rows * hidden]);
    residual_rmsnorm(hidden, &x, &mut r, &w, 1e-6, &mut out).unwrap();
    let mut want = vec![0f32; rows * hidden];
    for row in 0..rows {
        let z: Vec<f64> = (0..hidden)
            .map(|j| x[row * hidden + j] as f64 + r0[row * hidden + j] as f64)
            .collect();
        let inv = 1.0 / (z.iter().map(|v| v * v).sum::<f64>() / hidden as f64 + 1e-6).sqrt();
        for j in 0..hidden {
            assert!((r[row * hidden + j] as f64 - z[j]).abs() <= 1e-6 * z[j].abs().max(1.0));
            want[row * hidden + j] = (z[j] * inv * w[j] as f64) as f32;
        }
    }
    let err = rel_err(&out, &want);
    assert!(err <= 1e-6, "relative error {err}");
}

#[test]
fn rope_rotates_pairs_by_position_times_frequency() {
    let mut rng = common::rng("rope_rotates_pairs_by_position_times_frequency");
    let (heads, d, theta) = (3, 32, 10000f32);
    let table = RopeTable::new(d, theta, 256);
    let positions: Vec<i32> = (0..9).map(|_| rng.random_range(0..256)).collect();
    let x0: Vec<f32> = common::random_vec(&mut rng, positions.len() * heads * d, 1.0);
    let mut x = x0.clone();
    rope_inplace(&mut x, &positions, &table, heads).unwrap();
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * d;
            for j in 0..d / 2 {
                let angle = p as f64 * (theta as f64).powf(-(2.0 * j as f64) / d as f64);
                let (a, b) = (x0[base + j] as f64, x0[base + j + d / 2] as f64);
                let want = (
                    a * angle.cos() - b * angle.sin(),
                    b * angle.cos() + a * angle.sin(),
                );
                assert!(
                    (x[base + j] as f64 - want.0).abs() < 1e-4,
                    "pos {p} dim {j}"
                );
                assert!(
                    (x[base + j + d / 2] as f64 - want.1).abs() < 1e-4,
                    "pos {p} dim {j}"
                );
            }
        }
    }
    let err = rope_inplace(&mut x[..heads * d], &[256], &table, heads).unwrap_err();
    assert!(err.to_string().contains("positions"), "{err}");
}

#[test]
fn row_confidence_is_the_softmax_probability_of_the_arg_max() {
    let mut rng = common::rng("row_confidence_is_the_softmax_probability_of_the_arg_max");
    let vocab = 301;
    let logits: Vec<f32> = common::random_vec(&mut rng, 4 * vocab, 6.0);
    for temperature in [0.0f32, 0.5, 1.7] {
        let got = row_confidence(&logits, vocab, temperature).unwrap();
        let t = if temperature > 0.0 {
            temperature as f64
        } else {
            1.0
        };
        for (row, g) in logits.chunks(vocab).zip(&got) {
            let scaled: Vec<f64> = row.iter().map(|&x| x as f64 / t).collect();
            let best = (0..vocab).fold(0, |b, i| if scaled[i] > scaled[b] { i } else { b });
            let z: f64 = scaled.iter().map(|x| x.exp()).sum();
            assert_eq!(g.token as usize, best);
            assert!((g.confidence as f64 - scaled[best].exp() / z).abs() < 1e-6);
        }
    }
    assert!(row_confidence(&logits, vocab, f32::NAN)
        .unwrap_err()
        .to_string()
        .contains("temperature"));
}

#[test]
fn select_unmask_takes_the_confident_and_at_least_the_minimum() {
    let mut rng = common::rng("select_unmask_takes_the_confident_and_at_least_the_minimum");
    for _ in 0..200 {
        let blocks: Vec<usize> = (0..4).map(|_| rng.random_range(0..12)).collect();
        let mut starts = vec![0i32];
        for b in &blocks {
            starts.push(starts.last().unwrap() + *b as i32);
        }
        let rows = *starts.last().unwrap() as usize;
        // Few distinct values, so that ties happen.
        let conf: Vec<f32> = (0..rows)
            .map(|_| rng.random_range(0..8) as f32 / 8.0)
            .collect();
        let masked: Vec<bool> = (0..rows).map(|_| rng.random_bool(0.7)).collect();
        let mins: Vec<i32> = (0..4).map(|_| rng.random_range(0..4)).collect();
        let tau = 0.75;
        let pick = select_unmask(&conf, &masked, &starts, &mins, tau).unwrap();
        for b in 0..4 {
            let range = starts[b] as usize..starts[b + 1] as usize;
            let n_masked = range.clone().filter(|&i| masked[i]).count();
            let n_pass = range
                .clone()
                .filter(|&i| masked[i] && conf[i] >= tau)
                .count();
            let chosen: Vec<usize> = range.clone().filter(|&i| pick[i]).collect();
            assert!(
                chosen.iter().all(|&i| masked[i]),
                "only masked rows are unmasked"
            );
            assert!(
                range
                    .clone()
                    .all(|i| !(masked[i] && conf[i] >= tau) || pick[i]),
                "all confident rows"
            );
            assert_eq!(
                chosen.len(),
                n_pass.max((mins[b].max(0) as usize).min(n_masked))
            );
            // Every extra pick beats (or ties with a lower index) every masked row left behind.
            for &i in chosen.iter().filter(|&&i| conf[i] < tau) {
                for j in range.clone().filter(|&j| masked[j] && !pick[j]) {
                    assert!(conf[i] > conf[j] || (conf[i] == conf[j] && i < j));
                }
            }
        }
    }
}
