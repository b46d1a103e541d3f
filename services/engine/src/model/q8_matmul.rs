//! A few-row matmul against 8-bit weights, for the step batcher's decode batches on quantized
//! models. Each weight row is Q8_0 (blocks of 32 int8 and one scale, llama.cpp's layout); the
//! input rows are quantized the same way, and each output is Σ_blocks scale_w·scale_x·Σ w·x
//! with the 32-term dot in integers.
//!
//! Why not candle's quantized matmul: it walks the input rows in its outer loop, so a batch of
//! 16 rows streams every weight from memory 16 times; and its repacked VNNI kernels need K to be
//! a multiple of 256, which Qwen2.5-0.5B's 896 is not. Why not the dequantized f32 gemm: it
//! streams 4 bytes per weight where Q8_0 needs 1.06. Here a task takes a few weight rows at a
//! time and dots each with every input row while it is in L1, so a forward reads each weight
//! once whatever the batch.

use rayon::prelude::*;

use super::ggml_rounding::quantize_q8_block32;
use super::row_tasks::by_weight_rows;
#[cfg(target_arch = "x86_64")]
use super::row_tasks::hsum;
use crate::simd::avx2_fma;

/// Values per block (ggml's QK8_0).
pub(crate) const BLOCK: usize = 32;

/// Weight rows per task: enough work to amortise a task, few enough rows to balance 2–16 cores.
const ROWS_PER_TASK: usize = 64;

/// Rows of blocks: `qs` `[rows, cols]` int8 and `scales` `[rows, cols / 32]`.
pub(crate) struct Q8Rows {
    rows: usize,
    cols: usize,
    qs: Vec<i8>,
    scales: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `[rows, cols]` f32 values (cols a multiple of 32) as llama.cpp's x86
    /// `quantize_row_q8_0` does, so that a Q8_0 weight comes back exactly and the inputs are
    /// rounded as llama.cpp rounds a Q8_0 or Q5_0 weight's activations.
    pub(crate) fn quantize(values: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK) && values.len() == rows * cols);
        let blocks = rows * cols / BLOCK;
        let mut qs = vec![0i8; rows * cols];
        let mut scales = vec![0f32; blocks];
        qs.par_chunks_mut(BLOCK)
            .zip(scales.par_iter_mut())
            .zip(values.par_chunks(BLOCK))
            .for_each(|((q, d), x)| *d = quantize_q8_block32(x, q));
        Self {
            rows,
            cols,
            qs,
            scales,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let b = self.cols / BLOCK;
        (
            &self.qs[r * self.cols..(r + 1) * self.cols],
            &self.scales[r * b..(r + 1) * b],
        )
    }

    /// `x · selfᵀ` for `m` input rows `x` `[m, cols]`: `[m, rows]`.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let input = Q8Rows::quantize(x, m, self.cols);
        let wide = avx2_fma();
        by_weight_rows(m, self.rows, ROWS_PER_TASK, true, |first, count, strip| {
            self.strip(&input, first, count, wide, strip)
        })
    }

    /// Weight rows `first..first + count` against every input row, into `strip` `[m, count]`:
    /// tiles of TILE_INPUTS × TILE_WEIGHTS dot products share their loads (AVX2), the edges
    /// go one dot at a time.
    fn strip(&self, input: &Q8Rows, first: usize, count: usize, wide: bool, strip: &mut [f32]) {
        let m = input.rows;
        let mut j0 = 0;
        #[cfg(target_arch = "x86_64")]
        if wide {
            while j0 + TILE_WEIGHTS <= count {
                let mut i0 = 0;
                while i0 + TILE_INPUTS <= m {
                    let w = std::array::from_fn(|j| self.row(first + j0 + j));
                    let a = std::array::from_fn(|i| input.row(i0 + i));
                    // SAFETY: `wide` is true only where the CPU has AVX2 and FMA.
                    let tile = unsafe { tile_avx2(w, a) };
                    for (i, row) in tile.iter().enumerate() {
                        strip[(i0 + i) * count + j0..][..TILE_WEIGHTS].copy_from_slice(row);
                    }
                    i0 += TILE_INPUTS;
                }
                // The input rows left over, one dot at a time.
                for i in i0..m {
                    for j in j0..j0 + TILE_WEIGHTS {
                        strip[i * count + j] = self.dot(first + j, input, i, wide);
                    }
                }
                j0 += TILE_WEIGHTS;
            }
        }
        for j in j0..count {
            for i in 0..m {
                strip[i * count + j] = self.dot(first + j, input, i, wide);
            }
        }
    }

    fn dot(&self, row: usize, input: &Q8Rows, i: usize, wide: bool) -> f32 {
        let ((w, ws), (a, xs)) = (self.row(row), input.row(i));
        dot(wide, w, ws, a, xs)
    }
}

/// Input rows and weight rows of one AVX2 tile: 4 × 2 keeps its 8 accumulators, the two weight
/// blocks and their scales, and one input block in the 16 ymm registers.
const TILE_INPUTS: usize = 4;
const TILE_WEIGHTS: usize = 2;

/// A TILE_INPUTS × TILE_WEIGHTS block of dot products, each weight block loaded once for every
/// input row and each input block once for every weight row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(
    w: [(&[i8], &[f32]); TILE_WEIGHTS],
    a: [(&[i8], &[f32]); TILE_INPUTS],
) -> [[f32; TILE_WEIGHTS]; TILE_INPUTS] {
    use std::arch::x86_64::*;
    let blocks = w
        .iter()
        .map(|r| r.1.len())
        .chain(a.iter().map(|r| r.1.len()))
        .min()
        .unwrap_or(0);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); TILE_WEIGHTS]; TILE_INPUTS];
    for b in 0..blocks {
        // SAFETY (loads): every row holds `blocks` whole blocks of 32 bytes.
        let wv: [__m256i; TILE_WEIGHTS] = std::array::from_fn(|j| unsafe {
            _mm256_loadu_si256(w[j].0.as_ptr().add(b * BLOCK) as *const __m256i)
        });
        let dw: [__m256; TILE_WEIGHTS] = std::array::from_fn(|j| _mm256_set1_ps(w[j].1[b]));
        for i in 0..TILE_INPUTS {
            let av =
                unsafe { _mm256_loadu_si256(a[i].0.as_ptr().add(b * BLOCK) as *const __m256i) };
            let magnitude = _mm256_sign_epi8(av, av);
            let dx = _mm256_set1_ps(a[i].1[b]);
            for j in 0..TILE_WEIGHTS {
                let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wv[j], av));
                let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc[i][j] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw[j], dx), acc[i][j]);
            }
        }
    }
    acc.map(|row| row.map(|v| unsafe { hsum(v) }))
}

/// Σ_blocks ws·xs·Σ w·a of one weight row and one input row.
#[inline]
fn dot(wide: bool, w: &[i8], ws: &[f32], a: &[i8], xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is true only where the CPU has AVX2 and FMA.
        return unsafe { dot_avx2(w, ws, a, xs) };
    }
    let _ = wide;
    dot_portable(w, ws, a, xs)
}

fn dot_portable(w: &[i8], ws: &[f32], a: &[i8], xs: &[f32]) -> f32 {
    w.chunks_exact(BLOCK)
        .zip(a.chunks_exact(BLOCK))
        .zip(ws.iter().zip(xs))
        .map(|((w, a), (&dw, &dx))| {
            let s: i32 = w.iter().zip(a).map(|(&p, &q)| p as i32 * q as i32).sum();
            dw * dx * s as f32
        })
        .sum()
}

/// llama.cpp's AVX2 Q8_0 dot: `maddubs` multiplies unsigned by signed bytes, so it takes |a|
/// and w with a's sign (|a| ≤ 127 and |w| ≤ 127, so the 16-bit pair sums cannot saturate).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[i8], ws: &[f32], a: &[i8], xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let blocks = ws.len().min(xs.len());
    debug_assert!(w.len() >= blocks * BLOCK && a.len() >= blocks * BLOCK);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for b in 0..blocks {
        // SAFETY: both rows hold `blocks` whole blocks (checked by the callers' shapes).
        let (vw, va) = unsafe {
            (
                _mm256_loadu_si256(w.as_ptr().add(b * BLOCK) as *const __m256i),
                _mm256_loadu_si256(a.as_ptr().add(b * BLOCK) as *const __m256i),
            )
        };
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vw, va));
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(ws[b] * xs[b]), sums, acc);
    }
    unsafe { hsum(acc) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::values;

    fn dequantized(q: &Q8Rows) -> Vec<f32> {
        q.qs.iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * q.scales[i / BLOCK])
            .collect()
    }

    #[test]
    fn quantizing_rounds_each_value_to_within_half_a_step_of_its_block() {
        let x = values(4 * 64, 1);
        let q = Q8Rows::quantize(&x, 4, 64);
        for (i, (&v, d)) in x.iter().zip(dequantized(&q)).enumerate() {
            // Half a step, plus what the scale's rounding to f16 moves the largest value.
            let step = q.scales[i / BLOCK];
            assert!((v - d).abs() <= step / 2.0 + 127.0 * step / 2048.0, "{i}");
        }
    }

    #[test]
    fn requantizing_q8_0_values_gives_them_back() {
        let q = Q8Rows::quantize(&values(3 * 96, 6), 3, 96);
        let again = Q8Rows::quantize(&dequantized(&q), 3, 96);
        assert_eq!(q.qs, again.qs);
        assert_eq!(q.scales, again.scales);
    }

    #[test]
    fn the_product_equals_the_f32_product_of_the_quantized_values() {
        // 896 = 28 blocks (Qwen2.5-0.5B's hidden size); 131 weight rows span three tasks, the
        // last with an odd count; 5 input rows leave one outside the 4-row tiles.
        let (m, n, k) = (5, 131, 896);
        let w = Q8Rows::quantize(&values(n * k, 2), n, k);
        let x = values(m * k, 3);
        let got = w.matmul(&x, m);
        // Reference: the dequantized weights times the dequantized inputs, in f64.
        let (wd, xd) = (dequantized(&w), dequantized(&Q8Rows::quantize(&x, m, k)));
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| wd[j * k + c] as f64 * xd[i * k + c] as f64)
                    .sum();
                let diff = (got[i * n + j] as f64 - want).abs();
                assert!(diff <= 1e-4 * (1.0 + want.abs()), "[{i}, {j}]: {diff}");
            }
        }
    }

    #[test]
    fn the_avx2_dot_equals_the_portable_one_to_rounding() {
        let k = 896;
        let w = Q8Rows::quantize(&values(k, 4), 1, k);
        let a = Q8Rows::quantize(&values(k, 5), 1, k);
        let ((wq, ws), (aq, xs)) = (w.row(0), a.row(0));
        let (p, v) = (
            dot_portable(wq, ws, aq, xs),
            dot(avx2_fma(), wq, ws, aq, xs),
        );
        assert!((p - v).abs() <= 1e-5 * (1.0 + p.abs()), "{p} {v}");
    }
}
