//! Corruption of a clean training sequence into what the model sees in the corrupted half of the
//! vectorised objective (ALGORITHMS.md, training): per block, masking at a noise level t, and in
//! stage 2 random edits (substitutions, insertions, deletions) that the model must undo.

use crate::blocks::Blocks;
use crate::rng::TrainRng;

/// Smallest noise level: t ~ U(T_MIN, 1). The 1/t loss weight makes tiny t rare but heavy; 0.05
/// bounds the weight at 20 (our choice; ALGORITHMS.md leaves ε open).
pub const T_MIN: f64 = 0.05;
/// α ~ U(0, EDIT_RATE_MAX): the share of a sequence's length that becomes edit operations.
pub const EDIT_RATE_MAX: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Every position masked, weight 1 (t = 1 for every block); with blocks of one token this is
    /// autoregressive training in the in-place convention: the mask at position i sees the clean
    /// tokens before i and predicts token i.
    Autoregressive,
    /// Mask-only corruption; loss at masked positions.
    Mask,
    /// Edits, on top of masking half of the time; loss at every position.
    Edit,
    /// On-policy step reduction: mask-only corruption of the model's own greedy continuations,
    /// a share of the blocks masked as suffixes (the rest as in stage 1).
    StepReduction,
}

impl Stage {
    /// The number the training log writes (0, 1, 2).
    pub fn number(self) -> u8 {
        match self {
            Stage::Autoregressive => 0,
            Stage::Mask => 1,
            Stage::Edit => 2,
            Stage::StepReduction => 3,
        }
    }
}

/// One corrupted sequence, aligned with its clean twin position by position.
#[derive(Clone, Debug)]
pub struct Corrupted {
    pub tokens: Vec<u32>,
    /// Loss weight of each position: 1/t where masked, 1 where visible in stage 2, else 0.
    pub weights: Vec<f32>,
    /// Whether each position holds the mask token (its loss counts as mask loss, the rest of the
    /// weighted positions as edit loss).
    pub masked: Vec<bool>,
    /// α and the edit operations applied (⌊len·α⌋); 0 in stage 1.
    pub edit_rate: f64,
    pub edits: usize,
    /// Summed Levenshtein distance between each clean block and its edited form (before masks),
    /// the noise measure of the edit stage; never above `edits`.
    pub levenshtein: usize,
}

/// The number of edit operations for a sequence of `len` tokens at rate α.
pub fn edit_count(len: usize, alpha: f64) -> usize {
    (len as f64 * alpha).floor() as usize
}

/// Corrupts `clean` block by block under `blocks`. In stage 3 a `suffix_share` of the blocks
/// are masked from a cut to their end instead of position by position (see [`mask_suffix`]).
pub fn corrupt(
    clean: &[u32],
    blocks: &Blocks,
    stage: Stage,
    mask_id: u32,
    suffix_share: f64,
    rng: &mut TrainRng,
) -> Corrupted {
    let len = clean.len();
    let mut out = Corrupted {
        tokens: clean.to_vec(),
        weights: vec![0.0; len],
        masked: vec![false; len],
        edit_rate: 0.0,
        edits: 0,
        levenshtein: 0,
    };
    if stage == Stage::Autoregressive {
        out.tokens.fill(mask_id);
        out.masked.fill(true);
        out.weights.fill(1.0);
        return out;
    }
    let mut mask_too = true;
    if stage == Stage::Edit {
        out.edit_rate = rng.range(0.0, EDIT_RATE_MAX);
        out.edits = edit_count(len, out.edit_rate);
        mask_too = rng.below(2) == 0;
        // Each edit lands in the block of a uniformly drawn position, so every block size sees
        // the same edit density.
        let mut per_block = vec![0usize; blocks.count(len)];
        for _ in 0..out.edits {
            per_block[blocks.block_of(rng.below(len))] += 1;
        }
        for (b, &k) in per_block.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let range = blocks.range(b, len);
            let block = &clean[range.clone()];
            let edited = apply_edits(block, k, rng);
            out.levenshtein += levenshtein(block, &edited);
            // Back to the block's length: an insertion pushes the block's last token out, a
            // deletion leaves a mask at its end (a position the model must fill).
            for (i, p) in range.clone().enumerate() {
                out.tokens[p] = edited.get(i).copied().unwrap_or(mask_id);
            }
        }
        for p in 0..len {
            out.masked[p] = out.tokens[p] == mask_id;
            out.weights[p] = 1.0;
        }
    }
    if mask_too {
        for b in 0..blocks.count(len) {
            if stage == Stage::StepReduction && suffix_share > 0.0 && rng.uniform() < suffix_share {
                mask_suffix(&mut out, blocks.range(b, len), mask_id, rng);
                continue;
            }
            let t = rng.range(T_MIN, 1.0);
            for p in blocks.range(b, len) {
                if rng.uniform() < t {
                    out.tokens[p] = mask_id;
                    out.masked[p] = true;
                    out.weights[p] = (1.0 / t) as f32;
                }
            }
        }
    }
    out
}

/// Masks the block `range` from a cut drawn uniformly in it to its end, at weight 1/t for the
/// masked share t. A denoiser at τ = 0.9 mostly unmasks a block left to right, so its states
/// are a decoded prefix and a masked rest; position-by-position masking rarely draws those in a
/// large block, and a step commits a second token only when the model is sure of it with the
/// first still masked, which this trains directly.
fn mask_suffix(
    out: &mut Corrupted,
    range: std::ops::Range<usize>,
    mask_id: u32,
    rng: &mut TrainRng,
) {
    let n = range.len();
    let cut = rng.below(n);
    let t = (n - cut) as f64 / n as f64;
    for p in range.skip(cut) {
        out.tokens[p] = mask_id;
        out.masked[p] = true;
        out.weights[p] = (1.0 / t) as f32;
    }
}

/// `k` random edit operations on `x`: a substitution, insertion or deletion, each equally likely
/// (a deletion on an empty sequence inserts instead). New tokens are drawn from `x` itself, so
/// they are plausible tokens in context rather than uniform noise.
pub fn apply_edits(x: &[u32], k: usize, rng: &mut TrainRng) -> Vec<u32> {
    let pool = x.to_vec();
    let mut y = x.to_vec();
    for _ in 0..k {
        let op = if y.is_empty() { 1 } else { rng.below(3) };
        let token = if pool.is_empty() {
            0
        } else {
            pool[rng.below(pool.len())]
        };
        match op {
            0 => {
                let i = rng.below(y.len());
                y[i] = token;
            }
            1 => {
                let i = rng.below(y.len() + 1);
                y.insert(i, token);
            }
            _ => {
                let i = rng.below(y.len());
                y.remove(i);
            }
        }
    }
    y
}

/// Edit distance (unit-cost substitutions, insertions, deletions).
pub fn levenshtein(a: &[u32], b: &[u32]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &x) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &y) in b.iter().enumerate() {
            let next = (diag + usize::from(x != y))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: u32 = 1;

    fn clean(len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| 10 + i % 97).collect()
    }

    #[test]
    fn levenshtein_matches_known_distances() {
        assert_eq!(levenshtein(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(levenshtein(&[], &[4, 5]), 2);
        assert_eq!(levenshtein(&[1, 2, 3], &[1, 3]), 1);
        // kitten -> sitting
        let k: Vec<u32> = "kitten".bytes().map(u32::from).collect();
        let s: Vec<u32> = "sitting".bytes().map(u32::from).collect();
        assert_eq!(levenshtein(&k, &s), 3);
    }

    #[test]
    fn mask_rate_is_t_within_sampling_error() {
        // One block covering the whole sequence: every token shares one t, which the weight
        // reveals (1/t); the masked share must be t within 4 standard errors.
        let x = clean(4000);
        let blocks = Blocks::new(4000, 0);
        let mut rng = TrainRng::new(3);
        for _ in 0..20 {
            let c = corrupt(&x, &blocks, Stage::Mask, MASK, 0.0, &mut rng);
            let masked = c.masked.iter().filter(|&&m| m).count();
            if masked == 0 {
                continue;
            }
            let t = 1.0 / c.weights.iter().find(|&&w| w > 0.0).copied().unwrap() as f64;
            let rate = masked as f64 / x.len() as f64;
            let se = (t * (1.0 - t) / x.len() as f64).sqrt();
            assert!((rate - t).abs() <= 4.0 * se + 1e-9, "rate {rate} t {t}");
            assert!((T_MIN..1.0).contains(&t));
            // Stage 1: loss only where masked, and the visible tokens are the clean ones.
            for (p, &original) in x.iter().enumerate() {
                assert_eq!(c.masked[p], c.weights[p] > 0.0);
                assert!(c.masked[p] || c.tokens[p] == original);
            }
        }
    }

    #[test]
    fn step_reduction_masks_a_suffix_of_the_share_of_blocks_it_is_given() {
        let x = clean(64);
        let blocks = Blocks::new(8, 0);
        let (mut rng, mut suffixes, mut total) = (TrainRng::new(9), 0, 0);
        for _ in 0..200 {
            let c = corrupt(&x, &blocks, Stage::StepReduction, MASK, 1.0, &mut rng);
            for b in 0..8 {
                let m = &c.masked[b * 8..(b + 1) * 8];
                let cut = m
                    .iter()
                    .position(|&m| m)
                    .expect("at least the last position");
                assert!(
                    m[cut..].iter().all(|&m| m),
                    "masked from the cut to the end: {m:?}"
                );
                let t = (8 - cut) as f32 / 8.0;
                assert!(c.weights[b * 8 + cut..(b + 1) * 8]
                    .iter()
                    .all(|&w| (w - 1.0 / t).abs() < 1e-6));
                assert!(c.weights[b * 8..b * 8 + cut].iter().all(|&w| w == 0.0));
            }
            // At share 0.5 about half the blocks are suffixes, plus the random masks that are
            // suffixes by chance (about a quarter of 8-position masks at uniform t).
            let c = corrupt(&x, &blocks, Stage::StepReduction, MASK, 0.5, &mut rng);
            for b in 0..8 {
                let m = &c.masked[b * 8..(b + 1) * 8];
                let cut = m.iter().position(|&m| m).unwrap_or(8);
                suffixes += m[cut..].iter().all(|&m| m) as usize;
                total += 1;
            }
        }
        let share = suffixes as f64 / total as f64;
        assert!((0.55..0.70).contains(&share), "{share}");
        // Other stages ignore the share.
        let a = corrupt(&x, &blocks, Stage::Mask, MASK, 1.0, &mut TrainRng::new(3));
        let b = corrupt(&x, &blocks, Stage::Mask, MASK, 0.0, &mut TrainRng::new(3));
        assert_eq!(a.tokens, b.tokens);
    }

    #[test]
    fn autoregressive_stage_masks_every_position_at_weight_one() {
        let x = clean(50);
        let mut rng = TrainRng::new(5);
        let c = corrupt(
            &x,
            &Blocks::new(1, 0),
            Stage::Autoregressive,
            MASK,
            0.0,
            &mut rng,
        );
        assert!(c.tokens.iter().all(|&t| t == MASK));
        assert!(c.masked.iter().all(|&m| m));
        assert!(c.weights.iter().all(|&w| w == 1.0));
        assert_eq!((c.edits, c.levenshtein), (0, 0));
    }

    #[test]
    fn edit_counts_are_floor_of_len_times_alpha_and_distance_never_exceeds_them() {
        let mut rng = TrainRng::new(11);
        for len in [1, 7, 64, 300] {
            let x = clean(len);
            for block in [1, 4, 32] {
                let blocks = Blocks::new(block, 0);
                for _ in 0..50 {
                    let c = corrupt(&x, &blocks, Stage::Edit, MASK, 0.0, &mut rng);
                    assert_eq!(c.edits, (len as f64 * c.edit_rate).floor() as usize);
                    assert!(c.levenshtein <= c.edits, "{} > {}", c.levenshtein, c.edits);
                    assert_eq!(c.tokens.len(), len);
                    assert!(
                        c.weights.iter().all(|&w| w >= 1.0),
                        "stage 2 weighs every position"
                    );
                }
            }
        }
        for k in 0..20 {
            let x = clean(40);
            let y = apply_edits(&x, k, &mut rng);
            assert!(levenshtein(&x, &y) <= k);
        }
    }
}
