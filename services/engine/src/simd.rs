//! Row loops in two builds, portable and AVX2, picked at run time: the loop body is written once
//! over lane arrays the compiler vectorises, and inlined into a function compiled with or
//! without AVX2. Both builds add in the same order and neither fuses multiply-adds, so they give
//! bit-identical results, and an output does not depend on the machine it was computed on.

/// Whether this CPU runs the 8-lane AVX2 build.
pub(crate) fn wide_simd() -> bool {
    has_x86(false)
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

/// Calls a method generic over [`Build`] through its AVX2 build when `wide`, else the portable
/// one: `dispatch!(wide, task.method(args))`.
macro_rules! dispatch {
    ($wide:expr, $op:ident . $method:ident ($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $wide {
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
