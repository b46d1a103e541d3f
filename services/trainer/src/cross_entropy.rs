//! The negative log-likelihood of target tokens under a `[rows, vocab]` block of logits as one
//! differentiable candle op. Composed of tensor ops (log_softmax, then gather), it makes about
//! ten passes over an 8,192-wide row forward and backward, each allocating a tensor as large as
//! the logits; here the forward reads each row twice and the backward, which recovers the row's
//! normaliser from the forward's output, writes the gradient
//! `g · (softmax − one_hot(target))` in one pass. In stage 2 the mask token's logit is pushed to a
//! floor (the model may not answer with a mask), which the op applies as it reads the row.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct TokenNll {
    targets: Arc<Vec<u32>>,
    /// A column whose logit gets this added (the mask token in stage 2).
    floor: Option<(usize, f32)>,
}

/// `nll[r] = logsumexp(logits[r]) − logits[r, targets[r]]` for f32 `logits` `[rows, vocab]`,
/// with `floor`'s column lowered by its value first. CPU.
pub fn token_nll(logits: &Tensor, targets: &[u32], floor: Option<(u32, f32)>) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows {
        return Err(candle_core::Error::Msg(format!(
            "token nll: {} targets for {rows} rows of logits",
            targets.len()
        )));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(candle_core::Error::Msg(format!(
            "token nll: target {t} is outside the vocabulary of {vocab}"
        )));
    }
    logits.contiguous()?.apply_op1(TokenNll {
        targets: Arc::new(targets.to_vec()),
        floor: floor.map(|(c, v)| (c as usize, v)),
    })
}

impl TokenNll {
    /// Over the row with the floor applied: (max, log of the sum of exp(x − max)).
    fn log_normaliser(&self, row: &[f32]) -> (f32, f32) {
        let floored = || row.iter().enumerate().map(|(j, &x)| self.floored(j, x));
        let max = floored().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = floored().map(|x| (x - max).exp()).sum();
        (max, sum.ln())
    }

    fn floored(&self, j: usize, x: f32) -> f32 {
        match self.floor {
            Some((c, v)) if c == j => x + v,
            _ => x,
        }
    }
}

impl CustomOp1 for TokenNll {
    fn name(&self) -> &'static str {
        "token-nll"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(
                "token nll: logits must be contiguous".into(),
            ));
        };
        let logits = &storage.as_slice::<f32>()?[a..b];
        let nll: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let (max, log_sum) = self.log_normaliser(row);
                max + log_sum - self.floored(t as usize, row[t as usize])
            })
            .collect();
        Ok((CpuStorage::F32(nll), Shape::from(rows)))
    }

    fn bwd(&self, logits: &Tensor, nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = logits.dims2()?;
        let x = logits.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (nll, g) = (nll.to_vec1::<f32>()?, grad.contiguous()?.to_vec1::<f32>()?);
        let mut dx = vec![0f32; rows * vocab];
        dx.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab))
            .zip(
                g.par_iter()
                    .zip(nll.par_iter())
                    .zip(self.targets.par_iter()),
            )
            .for_each(|((dx, row), ((&g, &nll), &t))| {
                // The forward's log normaliser, recovered from its output: nll = lse − x[t].
                let lse = nll + self.floored(t as usize, row[t as usize]);
                for (j, (d, &x)) in dx.iter_mut().zip(row).enumerate() {
                    *d = g * (self.floored(j, x) - lse).exp();
                }
                dx[t as usize] -= g;
            });
        Ok(Some(Tensor::from_vec(dx, (rows, vocab), logits.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn composed(logits: &Tensor, targets: &[u32], floor: Option<(u32, f32)>) -> Result<Tensor> {
        let vocab = logits.dim(1)?;
        let logits = match floor {
            Some((c, v)) => {
                let mut add = vec![0f32; vocab];
                add[c as usize] = v;
                logits.broadcast_add(&Tensor::from_vec(add, vocab, logits.device())?)?
            }
            None => logits.clone(),
        };
        let t = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&t, 1)?
            .squeeze(1)?
            .neg()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    #[test]
    fn nll_and_gradient_equal_log_softmax_then_gather_with_and_without_a_floor() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, vocab) = (7, 50);
        let values: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 8.0)
            .collect();
        let targets: Vec<u32> = (0..rows as u32)
            .map(|r| (r * 13 + 2) % vocab as u32)
            .collect();
        let weights = Tensor::new(&[1.0f32, 0.0, 2.5, 1.0, 0.3, 4.0, 1.0], &dev)?;
        for floor in [None, Some((1u32, -1e9f32))] {
            let x = Var::from_vec(values.clone(), (rows, vocab), &dev)?;
            let fused = token_nll(&x, &targets, floor)?;
            let reference = composed(&x, &targets, floor)?;
            assert!(max_diff(&fused, &reference) < 1e-5, "{floor:?}");
            let gf = (fused * &weights)?.sum_all()?.backward()?;
            let gr = (reference * &weights)?.sum_all()?.backward()?;
            let (gf, gr) = (gf.get(&x).expect("fused"), gr.get(&x).expect("reference"));
            assert!(max_diff(gf, gr) < 1e-6, "{floor:?}");
        }
        Ok(())
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let logits = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).expect("zeros");
        let err = token_nll(&logits, &[0, 9], None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("target 9") && err.contains("4"), "{err}");
    }
}
