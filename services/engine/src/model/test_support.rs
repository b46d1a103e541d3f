//! Inputs and checks the kernel tests of this module share.

use candle_core::{Device, Tensor};

/// Deterministic values in [-1, 1] (xorshift).
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// A `[rows, cols]` f32 matrix of [`values`].
pub(crate) fn matrix(rows: usize, cols: usize, seed: u32) -> Tensor {
    Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap()
}

/// Asserts that `f` gives each row of `x` the same outputs, bit for bit, alone as in the batch.
pub(crate) fn assert_rows_independent_of_batch(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let batch = f(x).to_vec2::<f32>().unwrap();
    for (i, row) in batch.iter().enumerate() {
        let alone = f(&x.narrow(0, i, 1).unwrap()).to_vec2::<f32>().unwrap();
        assert_eq!(&alone[0], row, "row {i}");
    }
}

/// The `n` values `fill` leaves in a buffer of zeros it may write (for the ops that fill
/// buffers they are handed uninitialised).
pub(crate) fn written(n: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = vec![std::mem::MaybeUninit::new(0f32); n];
    fill(&mut out);
    // SAFETY: every value started as 0.0 and `fill` could only write values over it.
    out.iter().map(|v| unsafe { v.assume_init() }).collect()
}
