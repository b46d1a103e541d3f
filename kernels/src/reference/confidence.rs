use crate::error::{check_len, KernelError};
use crate::Element;

/// The greedy choice of one logits row and how sure the model is of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowConfidence {
    /// Arg max of the row (the lowest index among equal maxima).
    pub token: i32,
    /// softmax(logits / temperature)[token]; temperature 0 counts as 1.
    pub confidence: f32,
}

/// One [`RowConfidence`] per row of `logits` (`[rows, vocab]`).
pub fn row_confidence<T: Element>(
    logits: &[T],
    vocab: usize,
    temperature: f32,
) -> Result<Vec<RowConfidence>, KernelError> {
    if vocab == 0 || !logits.len().is_multiple_of(vocab) {
        return Err(KernelError::Length {
            field: "logits",
            actual: logits.len(),
            expected: vocab.max(1) * (logits.len() / vocab.max(1)),
        });
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(KernelError::Unsupported {
            what: "temperature",
            detail: format!("{temperature}; it must be a finite number >= 0"),
        });
    }
    let inv_t = if temperature > 0.0 {
        1.0 / temperature
    } else {
        1.0
    };
    Ok(logits
        .chunks(vocab)
        .map(|row| {
            let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
            for (i, x) in row.iter().enumerate() {
                let v = x.to_f32() * inv_t;
                if v > max {
                    max = v;
                    best = i;
                }
            }
            // f64: a 152k-term f32 running sum drifts by ~1e-4 relative, more than the CUDA
            // kernel's tree of partial sums does, and the reference must be the accurate one.
            let sum: f64 = row
                .iter()
                .map(|x| ((x.to_f32() * inv_t - max) as f64).exp())
                .sum();
            RowConfidence {
                token: best as i32,
                confidence: (1.0 / sum) as f32,
            }
        })
        .collect())
}

/// Which masked positions a denoising step unmasks. Block b covers rows
/// `block_starts[b]..block_starts[b + 1]`: every masked row with confidence >= threshold, and if
/// fewer than `min_unmask[b]` qualify, the most confident other masked rows (lower index first
/// among equals) until `min_unmask[b]` are chosen or none is left.
pub fn select_unmask(
    confidence: &[f32],
    masked: &[bool],
    block_starts: &[i32],
    min_unmask: &[i32],
    threshold: f32,
) -> Result<Vec<bool>, KernelError> {
    check_len("masked", masked.len(), confidence.len())?;
    check_len(
        "min_unmask",
        min_unmask.len(),
        block_starts.len().saturating_sub(1),
    )?;
    let mut unmask = vec![false; confidence.len()];
    for (b, w) in block_starts.windows(2).enumerate() {
        let (begin, end) = (w[0], w[1]);
        if begin < 0 || end < begin || end as usize > confidence.len() {
            return Err(KernelError::OutOfRange {
                field: "block_starts",
                value: end as i64,
                limit: format!("must rise from 0 to at most {} rows", confidence.len()),
            });
        }
        let rows = begin as usize..end as usize;
        let mut passed = 0;
        let mut rest = Vec::new();
        for i in rows {
            if !masked[i] {
                continue;
            }
            if confidence[i] >= threshold {
                unmask[i] = true;
                passed += 1;
            } else {
                rest.push(i);
            }
        }
        let need = (min_unmask[b] as i64 - passed).max(0) as usize;
        // Stable sort keeps the lower index first among equal confidences.
        rest.sort_by(|&a, &c| confidence[c].total_cmp(&confidence[a]));
        for &i in rest.iter().take(need) {
            unmask[i] = true;
        }
    }
    Ok(unmask)
}
