//! f32 rows to bf16 for the AMX matmul's inputs, rounding to nearest even as `half` does (the
//! weights are packed with `half`), a row loop the compiler vectorises: converted one value at a
//! time through `half`, a step batcher's 64–128 input rows took a few percent of an iteration.
//! Where the CPU has AVX512-BF16 (every CPU with AMX does), one instruction rounds 16 values:
//! the vectorised loop still took 5% of a 16-sequence iteration's samples (0.4 ns a value).

use crate::simd::{dispatch, wide_simd, Build};

const LANES: usize = 16;

/// `dst[i]` = `src[i]` in bf16 bits, to nearest even; a NaN stays a (quiet) NaN.
pub(crate) fn round_into(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if hardware::available() {
        // SAFETY: the CPU reports AVX-512F and AVX512-BF16.
        return unsafe { hardware::round_into(src, dst) };
    }
    let op = Rounding { src };
    dispatch!(wide_simd(), op.run(dst));
}

/// `vcvtneps2bf16`: the same rounding and the same quiet NaNs, but it reads a subnormal input
/// as zero, so a group of 16 with a subnormal takes the loop instead.
#[cfg(target_arch = "x86_64")]
mod hardware {
    use std::arch::x86_64::*;

    use super::{round, LANES};

    pub(super) fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        })
    }

    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_into(src: &[f32], dst: &mut [u16]) {
        let (exponent, fraction) = (
            _mm512_set1_epi32(0x7f80_0000),
            _mm512_set1_epi32(0x007f_ffff),
        );
        let zero = _mm512_setzero_si512();
        let mut d = dst.chunks_exact_mut(LANES);
        let mut s = src.chunks_exact(LANES);
        for (d, s) in (&mut d).zip(&mut s) {
            // SAFETY: `s` holds 16 f32 and `d` 16 u16 (unaligned loads and stores).
            unsafe {
                let v = _mm512_loadu_ps(s.as_ptr());
                let bits = _mm512_castps_si512(v);
                let subnormal = _mm512_cmpeq_epi32_mask(_mm512_and_si512(bits, exponent), zero)
                    & _mm512_cmpneq_epi32_mask(_mm512_and_si512(bits, fraction), zero);
                if subnormal != 0 {
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d = round(s);
                    }
                    continue;
                }
                let rounded: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(d.as_mut_ptr().cast(), rounded);
            }
        }
        for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
            *d = round(s);
        }
    }
}

struct Rounding<'a> {
    src: &'a [f32],
}

impl Rounding<'_> {
    /// # Safety
    /// The CPU must have `B`'s features.
    unsafe fn run<B: Build>(&self, dst: &mut [u16]) {
        // SAFETY: passed on from the caller.
        unsafe { B::run(|| self.fill(dst)) }
    }

    #[inline(always)]
    fn fill(&self, dst: &mut [u16]) {
        let mut d = dst.chunks_exact_mut(LANES);
        let mut s = self.src.chunks_exact(LANES);
        for (d, s) in (&mut d).zip(&mut s) {
            for l in 0..LANES {
                d[l] = round(s[l]);
            }
        }
        for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
            *d = round(s);
        }
    }
}

/// Adding 0x7fff plus the lowest kept bit carries into the kept half exactly when the dropped
/// half is above one half, or equal to it with the kept half odd.
#[inline(always)]
fn round(v: f32) -> u16 {
    let bits = v.to_bits();
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet = (bits >> 16) | 0x40;
    (if nan { quiet } else { rounded }) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns() -> Vec<f32> {
        let mut s = 0x2545_f491_u32;
        let mut v: Vec<f32> = (0..100_000)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                f32::from_bits(s)
            })
            .collect();
        // Ties both ways, the largest finite values, infinities, zeros, subnormals, NaNs.
        v.extend([
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::from_bits(1),
            f32::from_bits(0x8000_8000),
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc0_0000),
        ]);
        v
    }

    #[test]
    fn the_rounding_gives_halfs_bits() {
        let src = patterns();
        let mut dst = vec![0u16; src.len()];
        round_into(&src, &mut dst);
        for (&v, &b) in src.iter().zip(&dst) {
            let want = half::bf16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(half::bf16::from_bits(b).is_nan(), "{:#x}", v.to_bits());
            } else {
                assert_eq!(b, want, "{v:e} ({:#x})", v.to_bits());
            }
        }
    }

    #[test]
    fn every_build_gives_the_same_bits() {
        if !wide_simd() {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let src = patterns();
        let op = Rounding { src: &src };
        let (mut a, mut b) = (vec![0u16; src.len()], vec![0u16; src.len()]);
        // SAFETY: the portable build needs nothing; AVX2 was checked above.
        unsafe {
            op.run::<crate::simd::Portable>(&mut a);
            op.run::<crate::simd::Avx2>(&mut b);
        }
        assert_eq!(a, b);
        if crate::simd::avx512() {
            // SAFETY: checked just above.
            unsafe { op.run::<crate::simd::Avx512>(&mut b) };
            assert_eq!(a, b, "the AVX-512 build");
        }
        #[cfg(target_arch = "x86_64")]
        if hardware::available() {
            let mut c = vec![0u16; src.len()];
            // SAFETY: checked just above.
            unsafe { hardware::round_into(&src, &mut c) };
            assert_eq!(
                a, c,
                "the AVX512-BF16 rounding, NaNs and subnormals included"
            );
        } else {
            eprintln!("AVX512-BF16 not compared: this CPU has none");
        }
    }
}
