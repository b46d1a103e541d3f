//! The greedy choices of a round, made by the batcher for every sequence whose decoder reads
//! only those (see `decode/logits.rs` for why): on the CPU one pass over their rows split
//! across rayon's workers, with the same `greedy_pick` a decoder's sampler runs (so a sequence
//! decodes the same tokens as alone); on a GPU one `row_confidence` launch over the batch per
//! banned token (in practice one: every decoder bans the model's mask token).

use std::ops::Range;

use candle_core::{Storage, Tensor};
use rayon::prelude::*;

use super::super::greedy::greedy_pick;
use super::super::logits::Chosen;
use super::super::sampling::Pick;
use crate::error::{EngineError, Result};

/// A sequence that reads only greedy choices (temperature 0, no self-correction), and the
/// token its decoder never chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Greedy {
    pub banned: Option<u32>,
}

/// For each request (its rows of `logits` `[rows, vocab]` and whether it is greedy), the
/// choices for its rows, or `None` for a request that reads the logits themselves.
pub(super) fn choose(
    logits: &Tensor,
    requests: &[(Range<usize>, Option<Greedy>)],
) -> Result<Vec<Option<Chosen>>> {
    let (rows, vocab) = logits.dims2()?;
    if let Some((r, _)) = requests.iter().find(|(r, _)| r.end > rows) {
        return Err(EngineError::Input(format!(
            "greedy choices for rows {r:?} of a forward that returned {rows}"
        )));
    }
    let per_row = match logits.device().is_cpu() {
        true => on_cpu(logits, vocab, requests)?,
        false => on_device(logits, requests)?,
    };
    let mut per_row = per_row.into_iter();
    Ok(requests
        .iter()
        .map(|(rows, greedy)| {
            let greedy = (*greedy)?;
            let picks: Vec<Pick> = per_row.by_ref().take(rows.len()).collect();
            Some(Chosen {
                banned: greedy.banned,
                picks,
            })
        })
        .collect())
}

/// The picks of the greedy requests' rows, in request order.
fn on_cpu(
    logits: &Tensor,
    vocab: usize,
    requests: &[(Range<usize>, Option<Greedy>)],
) -> Result<Vec<Pick>> {
    let rows: Vec<(usize, Option<u32>)> = requests
        .iter()
        .filter_map(|(rows, greedy)| {
            let banned = (*greedy)?.banned;
            Some(rows.clone().map(move |r| (r, banned)))
        })
        .flatten()
        .collect();
    let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        return Err(EngineError::Input(
            "greedy choices on the CPU of logits elsewhere".into(),
        ));
    };
    let values = crate::model::contiguous_f32("greedy choices", storage, layout)?;
    Ok(rows
        .par_iter()
        .with_min_len(4)
        .map(|&(r, banned)| greedy_pick(&values[r * vocab..][..vocab], banned))
        .collect())
}

/// The picks of the greedy requests' rows, in request order: one launch over every row of the
/// batch per distinct ban.
fn on_device(logits: &Tensor, requests: &[(Range<usize>, Option<Greedy>)]) -> Result<Vec<Pick>> {
    let mut made: Vec<(Option<u32>, Vec<Pick>)> = Vec::new();
    let mut picks = Vec::new();
    for (rows, greedy) in requests {
        let Some(Greedy { banned }) = *greedy else {
            continue;
        };
        let at = match made.iter().position(|(b, _)| *b == banned) {
            Some(at) => at,
            None => {
                let all = crate::cuda_ops::greedy_choices_on_device(logits, banned)?;
                made.push((banned, all));
                made.len() - 1
            }
        };
        let all = &made[at].1;
        // Rows past the end would shift every later request's choices: an error, not fewer.
        let mine = all.get(rows.clone()).ok_or_else(|| {
            EngineError::Input(format!("{} device choices for rows {rows:?}", all.len()))
        })?;
        picks.extend_from_slice(mine);
    }
    Ok(picks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn greedy_requests_get_their_rows_picks_as_the_sampler_makes_them() {
        let values: Vec<f32> = (0..5 * 7).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let logits = Tensor::from_vec(values.clone(), (5, 7), &Device::Cpu).unwrap();
        let ban = |b| Some(Greedy { banned: b });
        let requests = [(0..2, ban(Some(3))), (2..3, None), (3..5, ban(None))];
        let got = choose(&logits, &requests).unwrap();
        assert_eq!(got[1], None, "a sampling request reads its rows itself");
        assert!(
            choose(&logits, &[(4..6, ban(None))]).is_err(),
            "rows past the forward's"
        );
        for (i, (rows, greedy)) in requests.iter().enumerate() {
            let Some(Greedy { banned }) = greedy else {
                continue;
            };
            let want: Vec<Pick> = rows
                .clone()
                .map(|r| greedy_pick(&values[r * 7..][..7], *banned))
                .collect();
            assert_eq!(
                got[i],
                Some(Chosen {
                    banned: *banned,
                    picks: want
                })
            );
        }
    }
}
