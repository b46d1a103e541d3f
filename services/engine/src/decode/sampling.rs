//! Choosing a token from a logits row, and how sure the model is of it. Greedy (temperature 0)
//! takes the vectorised `greedy_pick`, tested against the kernels' reference `row_confidence`
//! (the CPU twin of the CUDA kernel).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::params::DecodingParams;
use super::rows::Row;

pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: StdRng,
}

/// A chosen token and its probability under the distribution it was drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    pub token: u32,
    pub confidence: f32,
}

impl Sampler {
    pub fn new(params: &DecodingParams) -> Self {
        Self {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// A token for `row`: the choice already made on the device, or [`Sampler::pick`] of the
    /// logits.
    pub(crate) fn choose(&mut self, row: &Row, banned: Option<u32>) -> Pick {
        match row {
            Row::Chosen(pick) => *pick,
            Row::Logits(logits) => self.pick(logits, banned),
        }
    }

    /// A token for `logits` (one row), with its probability. `banned` (the mask token) is
    /// never chosen.
    pub fn pick(&mut self, logits: &[f32], banned: Option<u32>) -> Pick {
        if self.temperature == 0.0 {
            return super::greedy::greedy_pick(logits, banned);
        }
        let mut row = logits.to_vec();
        if let Some(b) = banned.filter(|&b| (b as usize) < row.len()) {
            row[b as usize] = f32::NEG_INFINITY;
        }
        let probs = softmax(&row, self.temperature);
        let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let mut kept = Vec::new();
        let mut mass = 0.0;
        for &i in &order {
            kept.push(i);
            mass += probs[i];
            if mass >= self.top_p {
                break;
            }
        }
        let total: f32 = kept.iter().map(|&i| probs[i]).sum();
        let mut u = self.rng.random::<f32>() * total;
        let mut chosen = kept[kept.len() - 1];
        for &i in &kept {
            if u < probs[i] {
                chosen = i;
                break;
            }
            u -= probs[i];
        }
        Pick {
            token: chosen as u32,
            confidence: probs[chosen] / total,
        }
    }
}

/// softmax(row / temperature) in f32.
pub fn softmax(row: &[f32], temperature: f32) -> Vec<f32> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|&x| ((x - max) / t).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, seed: u64) -> DecodingParams {
        DecodingParams {
            temperature,
            seed,
            top_p: 0.9,
            top_k: 5,
            ..DecodingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_arg_max_with_its_softmax_probability() {
        let mut s = Sampler::new(&DecodingParams::default());
        let p = s.pick(&[0.0, 2.0, 1.0], None);
        let want = (2f32).exp() / (1.0 + 2f32.exp() + 1f32.exp());
        assert_eq!(p.token, 1);
        assert!((p.confidence - want).abs() < 1e-6);
        assert_eq!(
            s.pick(&[0.0, 2.0, 1.0], Some(1)).token,
            2,
            "banned token skipped"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_draws() {
        let row: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 / 3.0).collect();
        let draws = |seed| {
            let mut s = Sampler::new(&params(0.8, seed));
            (0..20)
                .map(|_| s.pick(&row, None).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }

    #[test]
    fn top_k_limits_the_choices() {
        let row: Vec<f32> = (0..10).map(|i| i as f32 * 0.01).collect();
        let mut s = Sampler::new(&DecodingParams {
            temperature: 1.0,
            top_k: 2,
            ..DecodingParams::default()
        });
        for _ in 0..50 {
            assert!(s.pick(&row, None).token >= 8);
        }
    }
}
