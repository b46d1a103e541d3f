//! Paged attention for heads of 64 values in AVX-512, up to four queries of one kv head per walk
//! over its keys: the tokens of a diffusion block (and the query heads sharing a kv head) see the
//! same keys, so each key and value row is loaded once for all of them, the queries and their
//! output sums stay in registers, and the four dot products of a key are reduced together.
//!
//! The numbers are the portable build's, bit for bit (`attention.rs`' test): each dot product
//! adds its 64 products in `simd::dot_fixed`'s order (halves folded down to 8 lanes, then those
//! pairwise), the softmax is the same function, and each output sums its values in key order
//! with a multiply and an add (no fused multiply-add), then divides by the softmax's sum.
//!
//! Why: the portable loops, compiled for AVX-512, took 13.4 ns a query-key pair (16 sequences
//! × 4 tokens over 64 keys, 4 heads, one thread): a horizontal sum per dot product, and the
//! compiler kept the output sums of several queries on the stack.
//!
//! x86-64 only (`kv/mod.rs`); elsewhere `simd::avx512()` is false and the portable loops run.

use std::arch::x86_64::*;

use super::attention::Keys;

/// Values per head this kernel takes.
const D: usize = 64;

/// The output rows (all heads, `[tokens, heads, 64]`) of `tokens`, which all see `keys`, from
/// their rows of `q` (`[tokens of the batch, heads, 64]`).
///
/// # Safety
/// The CPU must have AVX-512 F, VL, BW and DQ (`crate::simd::avx512`), and the head width must
/// be 64.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
pub(super) unsafe fn attend(
    keys: &Keys<'_>,
    q: &[f32],
    tokens: &[usize],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (heads, group) = (keys.shape.num_heads, keys.shape.group());
    scores.resize(4 * keys.seen, 0.0);
    let count = tokens.len() * group;
    for kv in 0..keys.shape.num_kv_heads {
        // Query i of this kv head: token i / group, head kv · group + i % group.
        let at = |i: usize| (i / group * heads + kv * group + i % group) * D;
        let row = |i: usize| &q[(tokens[i / group] * heads + kv * group + i % group) * D..][..D];
        let mut first = 0;
        while first < count {
            let n = 4.min(count - first);
            // Three queries run as four, one as two: the last repeated, its copy's output unused.
            let pick = |c: usize| row(first + c.min(n - 1));
            let mut emit = |rows: &[[f32; D]]| {
                for (c, o) in rows.iter().take(n).enumerate() {
                    out[at(first + c)..][..D].copy_from_slice(o);
                }
            };
            if n <= 2 {
                // SAFETY: this function's features; rows of 64 values.
                emit(&unsafe { queries::<2>(keys, kv, [pick(0), pick(1)], scale, scores) });
            } else {
                let qs = [pick(0), pick(1), pick(2), pick(3)];
                // SAFETY: as above.
                emit(&unsafe { queries::<4>(keys, kv, qs, scale, scores) });
            }
            first += n;
        }
    }
}

/// The outputs of `C` (2 or 4) queries of kv head `kv` over `keys`.
///
/// # Safety
/// AVX-512 F/VL/BW/DQ; each query row holds 64 values; `scores` at least `C × keys.seen`.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn queries<const C: usize>(
    keys: &Keys<'_>,
    kv: usize,
    qs: [&[f32]; C],
    scale: f32,
    scores: &mut [f32],
) -> [[f32; D]; C] {
    let seen = keys.seen;
    // SAFETY (loads): every row is 64 values, four vectors of 16.
    let load = |row: &[f32]| -> [__m512; 4] {
        std::array::from_fn(|i| unsafe { _mm512_loadu_ps(row[16 * i..].as_ptr()) })
    };
    let q: [[__m512; 4]; C] = std::array::from_fn(|c| load(qs[c]));
    let scale_v = _mm_set1_ps(scale);
    for (j, (k, _)) in keys.rows(kv).enumerate() {
        let k = load(k);
        // Each dot product folded to 16 lanes: 64 → 32 → 16 as `dot_fixed` halves.
        let folded: [__m512; C] = std::array::from_fn(|c| {
            let p: [__m512; 4] = std::array::from_fn(|i| _mm512_mul_ps(q[c][i], k[i]));
            _mm512_add_ps(_mm512_add_ps(p[0], p[2]), _mm512_add_ps(p[1], p[3]))
        });
        let four = [folded[0], folded[1], folded[2 % C], folded[3 % C]];
        let mut dots = [0f32; 4];
        // SAFETY: `dots` holds four values.
        unsafe { _mm_storeu_ps(dots.as_mut_ptr(), _mm_mul_ps(scale_v, fold_four(four))) };
        for (c, &dot) in dots.iter().take(C).enumerate() {
            scores[c * seen + j] = dot;
        }
    }
    let mut sums = [0f32; C];
    for (c, sum) in sums.iter_mut().enumerate() {
        *sum = exp_sum(&mut scores[c * seen..][..seen]);
    }
    let mut o = [[_mm512_setzero_ps(); 4]; C];
    for (j, (_, v)) in keys.rows(kv).enumerate() {
        let v = load(v);
        for (c, o) in o.iter_mut().enumerate() {
            let p = _mm512_set1_ps(scores[c * seen + j]);
            for (o, &v) in o.iter_mut().zip(&v) {
                *o = _mm512_add_ps(*o, _mm512_mul_ps(p, v));
            }
        }
    }
    let mut rows = [[0f32; D]; C];
    for ((row, o), sum) in rows.iter_mut().zip(&o).zip(sums) {
        let sum = _mm512_set1_ps(sum);
        for (i, &o) in o.iter().enumerate() {
            // SAFETY: `row` holds 64 values.
            unsafe { _mm512_storeu_ps(row[16 * i..].as_mut_ptr(), _mm512_div_ps(o, sum)) };
        }
    }
    rows
}

/// Each score s replaced by e^(s − max) and their sum: `attention::exp_in_place`'s numbers for
/// scores that are numbers (`simd::exp` on 16 at a time, the sum in its 8 lanes in order, then
/// pairwise, then the last few one by one).
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
fn exp_sum(scores: &mut [f32]) -> f32 {
    let n = scores.len();
    let whole = n - n % 16;
    let tail_mask: __mmask16 = (1u32 << (n % 16)).wrapping_sub(1) as __mmask16;
    // SAFETY (loads and stores): whole vectors below `whole`, the rest masked to `n`.
    let ptr = scores.as_mut_ptr();
    let mut max_v = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..whole).step_by(16) {
        max_v = _mm512_max_ps(max_v, unsafe { _mm512_loadu_ps(ptr.add(i)) });
    }
    let tail = unsafe { _mm512_maskz_loadu_ps(tail_mask, ptr.add(whole)) };
    let tail = _mm512_mask_blend_ps(tail_mask, _mm512_set1_ps(f32::NEG_INFINITY), tail);
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(max_v, tail)));
    for i in (0..whole).step_by(16) {
        let x = unsafe { _mm512_loadu_ps(ptr.add(i)) };
        unsafe { _mm512_storeu_ps(ptr.add(i), exp16(_mm512_sub_ps(x, max))) };
    }
    let x = unsafe { _mm512_maskz_loadu_ps(tail_mask, ptr.add(whole)) };
    unsafe { _mm512_mask_storeu_ps(ptr.add(whole), tail_mask, exp16(_mm512_sub_ps(x, max))) };
    // The sum as `simd::exp_shifted` adds: 8 lanes over whole chunks of 8, in order.
    let eights = n - n % 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..eights).step_by(8) {
        acc = _mm256_add_ps(acc, unsafe { _mm256_loadu_ps(ptr.add(i)) });
    }
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
    let lanes = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
    let mut rest = 0f32;
    for &e in &scores[eights..] {
        rest += e;
    }
    lanes + rest
}

/// `simd::exp` on 16 values: the same multiplies and adds in the same order.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
fn exp16(t: __m512) -> __m512 {
    use crate::simd::exp_constants::*;
    let c = _mm512_set1_ps;
    let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
    // `f32::clamp`: the bound as the first operand, so that a NaN (the second) passes through.
    let t = _mm512_min_ps(c(88.0), _mm512_max_ps(c(-87.0), t));
    let k = add(mul(t, c(LOG2E)), c(SHIFTER));
    let n = sub(k, c(SHIFTER));
    let r = sub(sub(t, mul(n, c(LN2_HI))), mul(n, c(LN2_LO)));
    let mut p = c(POLYNOMIAL[0]);
    for &coefficient in &POLYNOMIAL[1..] {
        p = add(mul(p, r), c(coefficient));
    }
    let e_r = add(add(mul(mul(p, r), r), r), c(1.0));
    let n_bits = _mm512_sub_epi32(
        _mm512_castps_si512(k),
        _mm512_set1_epi32(SHIFTER.to_bits() as i32),
    );
    let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(n_bits, _mm512_set1_epi32(127)));
    mul(e_r, _mm512_castsi512_ps(scale))
}

/// The sums of four 16-lane vectors, each in `dot_fixed`'s order from there: lanes i and i + 8
/// added, then i and i + 4 (the pairwise sum's halves), then (0 + 2) + (1 + 3). Lane c of the
/// result is vector c's.
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
fn fold_four(a: [__m512; 4]) -> __m128 {
    // 16 → 8: [a0.lo | a1.lo] + [a0.hi | a1.hi] (256-bit halves), and a2, a3 alike.
    let eight = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
        )
    };
    let (p, q) = (eight(a[0], a[1]), eight(a[2], a[3]));
    // 8 → 4: each 8's low 128 bits + its high, the four results in the four 128-bit lanes.
    let h = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(p, q),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q),
    );
    // (h0 + h2, h1 + h3) in each lane, then their sum in its first value.
    let m = _mm512_add_ps(h, _mm512_permute_ps::<0b11_10_11_10>(h));
    let s = _mm512_add_ps(m, _mm512_movehdup_ps(m));
    let firsts = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp16_is_simd_exp_bit_for_bit_across_its_range_and_past_its_clamps() {
        if !crate::simd::avx512() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut ts: Vec<f32> = (-100_000..100_000).map(|i| i as f32 / 997.0).collect();
        ts.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            f32::MIN_POSITIVE,
        ]);
        ts.resize(ts.len().div_ceil(16) * 16, 1.0);
        for chunk in ts.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 checked above; `chunk` and `got` hold 16 values.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(chunk.as_ptr()))) };
            for (&t, g) in chunk.iter().zip(got) {
                let want = crate::simd::exp(t);
                assert!(
                    g.to_bits() == want.to_bits() || g.is_nan() && want.is_nan(),
                    "e^{t}"
                );
            }
        }
    }

    #[test]
    fn exp_sum_gives_the_portable_softmax_numbers_bit_for_bit_at_every_length() {
        if !crate::simd::avx512() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for n in 1..=70usize {
            // Spread past the exp's clamp below the maximum.
            let scores: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 + n * 31) % 2000) as f32 / 9.0 - 120.0)
                .collect();
            let (mut want, mut got) = (scores.clone(), scores);
            let want_sum = super::super::attention::exp_in_place(&mut want);
            // SAFETY: AVX-512 checked above.
            let got_sum = unsafe { exp_sum(&mut got) };
            assert_eq!(got_sum.to_bits(), want_sum.to_bits(), "{n} scores");
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{n}"
            );
        }
    }
}
