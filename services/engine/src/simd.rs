//! Row loops in three builds, portable, AVX2 and AVX-512, picked at run time: the loop body is
//! written once over lane arrays the compiler vectorises, and inlined into a function compiled
//! for the baseline CPU, with AVX2, or with AVX-512 (16-lane registers: half the instructions of
//! the AVX2 build for a row of 64 values). All builds add in the same order and none fuses
//! multiply-adds, so they give bit-identical results, and an output does not depend on the
//! machine it was computed on.

/// Whether this CPU runs the 8-lane AVX2 build.
pub(crate) fn wide_simd() -> bool {
    has_x86(false)
}

/// Whether this CPU runs the AVX-512 build (F, VL, BW and DQ: Intel from Skylake-SP on, AMD
/// from Zen 4), which [`dispatch`] takes over the AVX2 one. Asked once (every dispatch of a row
/// loop asks it).
pub(crate) fn avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU runs the hand-written AVX2 + FMA kernels (the few-row matmuls).
pub(crate) fn avx2_fma() -> bool {
    has_x86(true)
}

fn has_x86(fma: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && (!fma || is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = fma;
        false
    }
}

/// Calls a method generic over [`Build`] through its AVX2 build when `wide` (its AVX-512 build
/// where the CPU has that), else the portable one: `dispatch!(wide, task.method(args))`.
macro_rules! dispatch {
    ($wide:expr, $op:ident . $method:ident ($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $wide && $crate::simd::avx512() {
                // SAFETY: `avx512()` is true only where the CPU reports AVX2 and AVX-512.
                unsafe { $op.$method::<$crate::simd::Avx512>($($arg),*) }
            } else if $wide {
                // SAFETY: `wide` is true only where the CPU reports AVX2.
                unsafe { $op.$method::<$crate::simd::Avx2>($($arg),*) }
            } else {
                // SAFETY: the portable build needs nothing of the CPU.
                unsafe { $op.$method::<$crate::simd::Portable>($($arg),*) }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $wide;
            // SAFETY: the portable build needs nothing of the CPU.
            unsafe { $op.$method::<$crate::simd::Portable>($($arg),*) }
        }
    }};
}
pub(crate) use dispatch;

/// A build of a row loop: the body is the same, inlined into a function compiled with or
/// without AVX2.
pub(crate) trait Build {
    /// # Safety
    /// The CPU must have the build's features.
    unsafe fn run<R>(f: impl FnOnce() -> R) -> R;
}

pub(crate) struct Portable;

impl Build for Portable {
    #[inline(always)]
    unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Build for Avx2 {
    #[inline(always)]
    unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
        #[target_feature(enable = "avx2")]
        #[inline]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the caller promises AVX2.
        unsafe { with_avx2(f) }
    }
}

/// The AVX-512 build: the same loops in 16-lane registers. On the 2-core Xeon the step
/// batcher's 16-sequence rounds of the shipped model (bf16 products) ran 1–6% faster than with
/// the AVX2 build, alternating (docs/benchmarks.md, issue 6): paged attention's dot products
/// and value sums are most of the row loops' time there.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Build for Avx512 {
    #[inline(always)]
    unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
        #[target_feature(enable = "avx2,avx512f,avx512vl,avx512bw,avx512dq")]
        #[inline]
        fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the caller promises AVX2 and AVX-512 (F, VL, BW, DQ).
        unsafe { with_avx512(f) }
    }
}

/// Lanes the compiler keeps in independent registers, so that the reductions vectorise.
const LANES: usize = 16;

/// `a · b`, summed in `LANES` lanes and then across them, always in that order.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a · x`.
#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// e^t (Cephes' expf: t = n·ln 2 + r, |r| ≤ ln 2 / 2, a degree-6 polynomial for e^r, 2^n by
/// exponent bits), relative error ~1e-7 on [−87, 88]; outside it, t is clamped there (e^-87 is
/// nothing beside a softmax maximum's 1, e^88 nothing a sigmoid's 1 + e^t can tell from
/// infinity). Plain multiplies and adds, so it vectorises in a row loop and both builds give the
/// same bits.
#[inline(always)]
pub(crate) fn exp(t: f32) -> f32 {
    use exp_constants::*;
    let t = t.clamp(-87.0, 88.0);
    let k = t * LOG2E + SHIFTER;
    let n = k - SHIFTER;
    let r = t - n * LN2_HI - n * LN2_LO;
    let mut p = POLYNOMIAL[0];
    for c in &POLYNOMIAL[1..] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    // n is in [-126, 127]: 2^n is a normal f32, its exponent field n + 127.
    let n_bits = k.to_bits().wrapping_sub(SHIFTER.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// [`exp`]'s constants, which the AVX-512 kernels' copy of it (`kv/attention_avx512.rs`) shares.
pub(crate) mod exp_constants {
    pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub(crate) const LN2_HI: f32 = 0.693_359_4;
    pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
    /// Round t·log2(e) to the nearest integer n by adding 1.5·2^23: the sum's low mantissa bits
    /// are then n itself (no floor or float-to-int conversion in the loop).
    pub(crate) const SHIFTER: f32 = 12_582_912.0;
    /// e^r's polynomial past 1 + r, highest degree first, as Cephes prints it (the last is 0.5
    /// in f32).
    #[allow(clippy::excessive_precision)]
    pub(crate) const POLYNOMIAL: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5.000_000_1e-1,
    ];
}

/// Lanes of the reductions summed pairwise: one AVX2 register.
pub(crate) const LANES8: usize = 8;

/// `a · b` for rows of `D` values (a power of two, at least [`LANES8`]): the products, then
/// halves added until [`LANES8`] are left, then those pairwise. Written so, the compiler keeps
/// every step in full AVX2 registers (lane accumulators gave it 2-float loads and `simd::dot`'s
/// sixteen lanes are summed one after another); with it and the loops around it in the AVX2
/// build, paged attention over 150 cached tokens went from 1.05 to 0.66 ms for 16 sequences ×
/// 8 tokens (docs/benchmarks.md).
#[inline(always)]
pub(crate) fn dot_fixed<const D: usize>(a: &[f32], b: &[f32]) -> f32 {
    let (a, b) = (&a[..D], &b[..D]);
    let mut t = [0f32; D];
    for i in 0..D {
        t[i] = a[i] * b[i];
    }
    let mut n = D;
    while n > LANES8 {
        n /= 2;
        for i in 0..n {
            t[i] += t[i + n];
        }
    }
    pairwise_sum([t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]])
}

/// The lanes' sum, pairwise (three shuffle-and-add steps in the AVX2 build).
#[inline(always)]
pub(crate) fn pairwise_sum(acc: [f32; LANES8]) -> f32 {
    let half = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (half[0] + half[2]) + (half[1] + half[3])
}

/// Replaces each x by exp(x - max) (every x ≤ max) and returns their sum, in [`LANES8`]
/// lanes then pairwise, so that the loop vectorises.
#[inline(always)]
pub(crate) fn exp_shifted(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES8];
    let mut chunks = xs.chunks_exact_mut(LANES8);
    for c in &mut chunks {
        for l in 0..LANES8 {
            c[l] = exp(c[l] - max);
            acc[l] += c[l];
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        tail += *x;
    }
    pairwise_sum(acc) + tail
}

/// `a · b` for rows of any width: [`dot_fixed`] for the head widths of the models served.
#[inline(always)]
pub(crate) fn dot_row(a: &[f32], b: &[f32]) -> f32 {
    match a.len() {
        64 => dot_fixed::<64>(a, b),
        128 => dot_fixed::<128>(a, b),
        _ => dot(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn the_exp_is_within_2e_7_of_f64_between_where_it_stops() {
        for i in -87_000..=88_000 {
            let t = i as f32 / 1000.0;
            let want = (t as f64).exp();
            let rel = ((exp(t) as f64 - want) / want).abs();
            assert!(rel < 2e-7, "e^{t}: {rel:e}");
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(1000.0).is_finite());
    }
}
