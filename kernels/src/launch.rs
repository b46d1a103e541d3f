//! Launch policy that needs no GPU to reason about (and so is tested everywhere).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// A last wave of CTAs that is mostly empty costs nearly a whole wave, so splits are chosen to
/// fill the resident slots in close to whole waves.
const MIN_WAVE_EFFICIENCY: f64 = 0.85;
/// More splits than this only add partial-result traffic; the merge's shared scratch also holds
/// query rows x MAX_SPLITS weights (split_merge.cuh), which fits every kernel's tile buffer.
pub(crate) const MAX_SPLITS: usize = 64;

/// Fewest key splits whose CTAs fill the machine's resident slots to MIN_WAVE_EFFICIENCY, or
/// the most efficient count when none does.
pub(crate) fn auto_splits(base_ctas: usize, slots: usize, key_tiles: usize) -> usize {
    let mut best = (1, 0.0);
    for splits in 1..=key_tiles.clamp(1, MAX_SPLITS) {
        let ctas = base_ctas.max(1) * splits;
        let efficiency = ctas as f64 / (ctas.div_ceil(slots) * slots) as f64;
        if efficiency >= MIN_WAVE_EFFICIENCY {
            return splits;
        }
        if efficiency > best.1 {
            best = (splits, efficiency);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::auto_splits;

    #[test]
    fn auto_splits_fill_nearly_whole_waves() {
        // 32 CTAs on 396 slots: 11 splits fill 89% of one wave; 13 would spill into a 5% wave.
        assert_eq!(auto_splits(32, 396, 256), 11);
        assert_eq!(auto_splits(128, 396, 129), 3);
        // Few key tiles: as many splits as there are tiles.
        assert_eq!(auto_splits(4, 396, 3), 3);
        // Already more than a wave of well-filled CTAs: no split.
        assert_eq!(auto_splits(792, 396, 100), 1);
    }
}
