//! A few-row matmul `x · wᵀ` against f32 weights, for decoding on the CPU: a denoising step
//! runs its open block (up to 32 rows, 64 with the finished block it commits), an AR step one
//! or two rows, a step batcher a few of each per sequence.
//!
//! Why not candle's gemm: `Linear` multiplies by the transposed view of `w [out, in]`, and for a
//! few rows the gemm crate packs that strided view one float at a time before it multiplies,
//! every call: profiled on the shipped model, a 4-row forward spent 57% of its time in that
//! packing and 10% in the multiply. Here the weight rows are read as they lie (each is the
//! contiguous `in` values one output needs): a task takes a few weight rows and dots each with
//! every input row, in AVX2 tiles of 4 inputs × 3 weights (1 × 8 for the input rows left over).
//!
//! A row's outputs do not depend on the rows beside it: a tile and the edges compute each dot
//! product with the same operations in the same order, so batched decoding gives each sequence
//! the numbers it gets alone.

use super::op_inputs::{contiguous_f32, f32_cpu};
use super::row_tasks::by_weight_rows;
#[cfg(target_arch = "x86_64")]
use super::row_tasks::hsum;
use crate::simd::avx2_fma;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Rows of input this path takes at most. Measured on the shipped model (2 cores): at 64 rows
/// (a step batcher's 16 sequences × 4-token blocks) it still beat candle's gemm, 559 against
/// 484 tokens/s; far beyond that, gemm's packing pays for itself.
pub(crate) const MAX_ROWS: usize = 64;

/// Weight rows per task: their values (at most 64 × 4 KB for a 1,024-wide input) stay in L2
/// while every input row passes.
const ROWS_PER_TASK: usize = 64;

/// Multiply-adds below which one thread does the whole product (a task costs microseconds).
const PARALLEL_FROM: usize = 1 << 18;

/// `x · wᵀ` for `x [..., in]` and `w [out, in]`, both f32 on the CPU, through this module when
/// `x` has at most [`MAX_ROWS`] rows and no gradient can flow through either (the op has no
/// backward pass; training keeps candle's); `None` when it does not apply.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Ok((_, inp)) = w.dims2() else {
        return Ok(None);
    };
    let rows = x.elem_count() / inp.max(1);
    if !(f32_cpu(x) && f32_cpu(w))
        || x.track_op()
        || w.track_op()
        || x.dim(candle_core::D::Minus1)? != inp
        || !(1..=MAX_ROWS).contains(&rows)
    {
        return Ok(None);
    }
    let x2 = x.reshape((rows, inp))?;
    let y = x2
        .contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &RowsTimesWeights)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    Ok(Some(y.reshape(dims)?))
}

struct RowsTimesWeights;

impl CustomOp2 for RowsTimesWeights {
    fn name(&self) -> &'static str {
        "f32-rows-times-weights"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[m, k], &[n, wk]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!(
                "f32 rows: x {:?} and w {:?} must be matrices",
                xl.dims(),
                wl.dims()
            );
        };
        if k != wk {
            candle_core::bail!("f32 rows: x has {k} columns, w {wk}");
        }
        let x = contiguous_f32("f32 rows", xs, xl)?;
        let w = contiguous_f32("f32 rows", ws, wl)?;
        Ok((CpuStorage::F32(product(x, m, w, n, k)), Shape::from((m, n))))
    }
}

/// `x [m, k] · w [n, k]ᵀ`: `[m, n]`.
fn product(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let wide = avx2_fma();
    let parallel = m * n * k >= PARALLEL_FROM;
    by_weight_rows(m, n, ROWS_PER_TASK, parallel, |first, count, strip| {
        let rows = &w[first * k..(first + count) * k];
        fill_strip(x, m, rows, count, k, wide, strip)
    })
}

/// Every input row against the `count` weight rows `w [count, k]`, into `strip [m, count]`:
/// each band of 4 input rows stays in L1 while the weight rows pass by [`TILE_WEIGHTS`] at a
/// time (12 accumulators, 3 weight vectors and an input vector: the 16 AVX2 registers; each
/// weight vector loaded once for 4 rows, each input vector once for 3 weights); the input rows
/// left over take the weights 8 at a time (8 independent chains, so one row is not held up by
/// the latency of a single chain of fused multiply-adds).
fn fill_strip(
    x: &[f32],
    m: usize,
    w: &[f32],
    count: usize,
    k: usize,
    wide: bool,
    strip: &mut [f32],
) {
    let input = |i: usize| &x[i * k..(i + 1) * k];
    let weight = |j: usize| &w[j * k..(j + 1) * k];
    let mut put = |i: usize, j: usize, v: f32| strip[i * count + j] = v;
    let (mut banded, mut j0) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if wide {
        banded = m - m % 4;
        j0 = count - count % TILE_WEIGHTS;
        for i0 in (0..banded).step_by(4) {
            let xs = std::array::from_fn(|i| input(i0 + i));
            for j in (0..j0).step_by(TILE_WEIGHTS) {
                let ws = std::array::from_fn(|t| weight(j + t));
                // SAFETY: `wide` is true only where the CPU has AVX2 and FMA.
                let tile: [[f32; TILE_WEIGHTS]; 4] = unsafe { tile_avx2(ws, xs) };
                for (i, row) in tile.iter().enumerate() {
                    for (t, &v) in row.iter().enumerate() {
                        put(i0 + i, j + t, v);
                    }
                }
            }
        }
        for i in banded..m {
            let mut j = 0;
            while j + 8 <= count {
                let ws = std::array::from_fn(|t| weight(j + t));
                // SAFETY: as above.
                let [row]: [[f32; 8]; 1] = unsafe { tile_avx2(ws, [input(i)]) };
                for (t, &v) in row.iter().enumerate() {
                    put(i, j + t, v);
                }
                j += 8;
            }
            for j in j..count {
                put(i, j, dot(wide, weight(j), input(i)));
            }
        }
    }
    // What no tile covered: the last weight row of an odd count for the banded rows, and
    // everything without AVX2.
    for j in j0..count {
        for i in 0..banded {
            put(i, j, dot(wide, weight(j), input(i)));
        }
    }
    if !wide {
        for j in 0..count {
            for i in banded..m {
                put(i, j, dot(wide, weight(j), input(i)));
            }
        }
    }
}

/// Weight rows in a tile beside a band of 4 input rows.
const TILE_WEIGHTS: usize = 3;

/// Lanes of one AVX2 f32 vector.
const LANES: usize = 8;

/// A tile of `I × J` dot products; each is the same sequence of operations as [`dot_avx2`]
/// (one accumulator per pair, chunks in order, then the horizontal sum, then the tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const I: usize, const J: usize>(
    w: [&[f32]; J],
    a: [&[f32]; I],
) -> [[f32; J]; I] {
    use std::arch::x86_64::*;
    let k = w.iter().chain(a.iter()).map(|r| r.len()).min().unwrap_or(0);
    let chunks = k / LANES;
    let mut acc = [[_mm256_setzero_ps(); J]; I];
    for c in 0..chunks {
        // SAFETY (loads): every row holds at least `chunks` whole vectors.
        let wv: [__m256; J] =
            std::array::from_fn(|j| unsafe { _mm256_loadu_ps(w[j].as_ptr().add(c * LANES)) });
        for i in 0..I {
            let av = unsafe { _mm256_loadu_ps(a[i].as_ptr().add(c * LANES)) };
            for j in 0..J {
                acc[i][j] = _mm256_fmadd_ps(av, wv[j], acc[i][j]);
            }
        }
    }
    let mut out = [[0f32; J]; I];
    for i in 0..I {
        for j in 0..J {
            let head = unsafe { hsum(acc[i][j]) };
            out[i][j] = head + tail_dot(&a[i][chunks * LANES..k], &w[j][chunks * LANES..k]);
        }
    }
    out
}

/// Σ a·b over the values past the last whole vector, in order.
#[inline]
fn tail_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |s, (&p, &q)| s + p * q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[f32], a: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = w.len().min(a.len());
    let chunks = k / LANES;
    let mut acc = _mm256_setzero_ps();
    for c in 0..chunks {
        // SAFETY: both rows hold at least `chunks` whole vectors.
        let (wv, av) = unsafe {
            (
                _mm256_loadu_ps(w.as_ptr().add(c * LANES)),
                _mm256_loadu_ps(a.as_ptr().add(c * LANES)),
            )
        };
        acc = _mm256_fmadd_ps(av, wv, acc);
    }
    let head = unsafe { hsum(acc) };
    head + tail_dot(&a[chunks * LANES..k], &w[chunks * LANES..k])
}

fn dot(wide: bool, w: &[f32], a: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is true only where the CPU has AVX2 and FMA.
        return unsafe { dot_avx2(w, a) };
    }
    let _ = wide;
    tail_dot(a, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{assert_rows_independent_of_batch, matrix};

    #[test]
    fn the_product_equals_candles_matmul() {
        // 131 weight rows span three tasks, the last with an odd count; 7 input rows leave
        // three outside the 4-row tiles; 260 columns leave a tail of 4 past the last vector.
        let (m, n, k) = (7, 131, 260);
        let (x, w) = (matrix(m, k, 1), matrix(n, k, 2));
        let got = matmul_t(&x, &w)
            .unwrap()
            .expect("7 rows of f32 take this path");
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-4, "{diff}");
    }

    #[test]
    fn a_row_gives_the_same_outputs_alone_as_in_a_batch() {
        let (m, n, k) = (9, 150, 256);
        let (x, w) = (matrix(m, k, 3), matrix(n, k, 4));
        assert_rows_independent_of_batch(&x, |x| matmul_t(x, &w).unwrap().unwrap());
    }

    #[test]
    fn leading_dimensions_are_kept() {
        let (x, w) = (matrix(6, 64, 5), matrix(10, 64, 6));
        let x3 = x.reshape((2, 3, 64)).unwrap();
        let got = matmul_t(&x3, &w).unwrap().unwrap();
        assert_eq!(got.dims(), [2, 3, 10]);
        let flat = matmul_t(&x, &w).unwrap().unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            flat.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn many_rows_and_trainable_weights_keep_candles_matmul() {
        let w = matrix(8, 32, 7);
        assert!(matmul_t(&matrix(MAX_ROWS + 1, 32, 8), &w)
            .unwrap()
            .is_none());
        let var = candle_core::Var::from_tensor(&w).unwrap();
        assert!(matmul_t(&matrix(2, 32, 9), var.as_tensor())
            .unwrap()
            .is_none());
    }
}
