use crate::error::{check_len, KernelError};
use crate::Element;

/// cos/sin of `position × inv_freq[j]` for every position below `max_position`, built once per
/// model and shared by the CPU and CUDA paths so both rotate by the same numbers.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub head_dim: usize,
    pub max_position: usize,
    /// `[max_position, head_dim / 2]`
    pub cos: Vec<f32>,
    /// `[max_position, head_dim / 2]`
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// inv_freq[j] = theta^(-2j / head_dim), as HF transformers computes it (in f32).
    pub fn new(head_dim: usize, theta: f32, max_position: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_position * half);
        let mut sin = Vec::with_capacity(max_position * half);
        for p in 0..max_position {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            head_dim,
            max_position,
            cos,
            sin,
        }
    }
}

/// Rotates x `[tokens, num_heads, head_dim]` in place, token t at `positions[t]`, pairing dims
/// j and j + head_dim/2.
pub fn rope_inplace<T: Element>(
    x: &mut [T],
    positions: &[i32],
    table: &RopeTable,
    num_heads: usize,
) -> Result<(), KernelError> {
    let d = table.head_dim;
    let half = d / 2;
    check_len("x", x.len(), positions.len() * num_heads * d)?;
    for (t, &pos) in positions.iter().enumerate() {
        if pos < 0 || pos as usize >= table.max_position {
            return Err(KernelError::OutOfRange {
                field: "positions",
                value: pos as i64,
                limit: format!("the rope table covers 0..{}", table.max_position),
            });
        }
        let c = &table.cos[pos as usize * half..][..half];
        let s = &table.sin[pos as usize * half..][..half];
        for head in x[t * num_heads * d..][..num_heads * d].chunks_mut(d) {
            for j in 0..half {
                let (x1, x2) = (head[j].to_f32(), head[j + half].to_f32());
                head[j] = T::from_f32(x1 * c[j] - x2 * s[j]);
                head[j + half] = T::from_f32(x2 * c[j] + x1 * s[j]);
            }
        }
    }
    Ok(())
}
