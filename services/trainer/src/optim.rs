//! AdamW with decoupled weight decay, global-norm gradient clipping and a warmup + cosine
//! learning-rate schedule. Our own rather than candle_nn's, because `--resume` must restore the
//! moment estimates exactly, and candle_nn's AdamW does not expose them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, Tensor, Var};
use candle_nn::VarMap;

use crate::error::TrainerError;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to matrices (rank ≥ 2) only, as nanoGPT does; norms' gains are not decayed.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `peak · floor` at
/// `total` steps. `step` counts from 0.
pub fn learning_rate(step: usize, warmup: usize, total: usize, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (floor + (1.0 - floor) * cosine)
}

pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: usize,
    config: AdamWConfig,
}

impl AdamW {
    /// Over every variable of `varmap`, in name order (so gradients line up run to run).
    pub fn new(varmap: &VarMap, config: AdamWConfig) -> Result<Self, TrainerError> {
        let mut params: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| TrainerError::Input("the variable map's lock is poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_, _>>()?;
        let v = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            params,
            m,
            v,
            steps: 0,
            config,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The gradient of every parameter from one backward pass (zeros where a parameter got
    /// none), in [`AdamW::params`] order.
    pub fn gradients(&self, grads: &GradStore) -> Result<Vec<Tensor>, TrainerError> {
        self.params
            .iter()
            .map(|(_, v)| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }

    /// One update with `grads` (already averaged over accumulation steps) at `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<(), TrainerError> {
        let c = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, (_, var)) in self.params.iter().enumerate() {
            let g = &grads[i];
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor();
            let decay = if theta.rank() >= 2 {
                c.weight_decay
            } else {
                0.0
            };
            let next = ((theta * (1.0 - lr * decay))? - (update * lr)?)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments under `m.<name>` / `v.<name>`; the step count goes in the trainer's state file.
    pub fn save(&self, path: &Path) -> Result<(), TrainerError> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&map, path).map_err(|e| TrainerError::file(path, e))
    }

    pub fn load(&mut self, path: &Path, steps: usize) -> Result<(), TrainerError> {
        let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(|e| TrainerError::file(path, e))?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let t = map
                    .get(&format!("{prefix}.{name}"))
                    .ok_or_else(|| TrainerError::file(path, format!("has no {prefix}.{name}")))?;
                if t.dims() != var.dims() {
                    return Err(TrainerError::file(
                        path,
                        format!(
                            "{prefix}.{name} is {:?}; the model has {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    ));
                }
                *slot = t.to_device(var.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainerError> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / norm;
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| learning_rate(s, 10, 110, 1e-3, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(60) - 0.55e-3).abs() < 1e-9);
        assert!((lr(110) - 1e-4).abs() < 1e-12);
        assert!(lr(30) > lr(31));
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = candle_core::Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3f32, 0.0], &dev).unwrap(),
            Tensor::new(&[4f32], &dev).unwrap(),
        ];
        let before = clip_global_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let after = clip_global_norm(&mut g, 10.0).unwrap();
        assert!((after - 1.0).abs() < 1e-6);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        let varmap = VarMap::new();
        let dev = candle_core::Device::Cpu;
        let w = varmap
            .get(
                (2,),
                "w",
                candle_nn::Init::Const(1.0),
                candle_core::DType::F32,
                &dev,
            )
            .unwrap();
        let mut opt = AdamW::new(&varmap, AdamWConfig::default()).unwrap();
        let g = vec![Tensor::new(&[0.5f32, -2.0], &dev).unwrap()];
        opt.step(&g, 0.01).unwrap();
        let got = w.to_vec1::<f32>().unwrap();
        // Bias-corrected first step: m̂/√v̂ = sign(g); rank-1 weights are not decayed.
        assert!(
            (got[0] - 0.99).abs() < 1e-5 && (got[1] - 1.01).abs() < 1e-5,
            "{got:?}"
        );
    }
}
