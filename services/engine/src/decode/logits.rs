//! What a forward hands a decoder: its logits rows and, under the step batcher, the greedy
//! choices for them, made once for the whole batch. A greedy decoder reads only each row's arg
//! max and its probability; made per sequence, that is a pass (on a GPU a chain of launches, an
//! allocation and two synchronous copies) per sequence per iteration, and on the CPU a serial
//! loop on the batcher's thread. Made by the batcher, it is one pass over all rows: split across
//! the CPU's threads, or one kernel and one copy on a GPU.

use candle_core::Tensor;

use super::sampling::Pick;
use crate::error::{EngineError, Result};

/// A forward's logits `[rows, vocab]`.
#[derive(Clone, Debug)]
pub struct Logits {
    pub rows: Tensor,
    /// The greedy choice of each row, when whoever ran the forward made them already.
    pub chosen: Option<Chosen>,
}

/// Greedy choices for every row of a [`Logits`], in order, with `banned` never chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Chosen {
    pub banned: Option<u32>,
    pub picks: Vec<Pick>,
}

impl From<Tensor> for Logits {
    fn from(rows: Tensor) -> Self {
        Self { rows, chosen: None }
    }
}

impl Logits {
    /// Rows `start..start + len`, with their choices.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let chosen = match &self.chosen {
            Some(c) => Some(Chosen {
                banned: c.banned,
                picks: c
                    .picks
                    .get(start..start + len)
                    .ok_or_else(|| {
                        EngineError::Input(format!(
                            "rows {start}..{} of {} chosen",
                            start + len,
                            c.picks.len()
                        ))
                    })?
                    .to_vec(),
            }),
            None => None,
        };
        Ok(Self {
            rows: self.rows.narrow(0, start, len)?,
            chosen,
        })
    }

    /// The choices made with `banned` excluded, if those are what was made for every row.
    pub(crate) fn chosen_for(&self, banned: Option<u32>) -> Option<&[Pick]> {
        let c = self.chosen.as_ref()?;
        let rows = self.rows.dims().first().copied().unwrap_or(0);
        (c.banned == banned && c.picks.len() == rows).then_some(c.picks.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn pick(token: u32) -> Pick {
        Pick {
            token,
            confidence: 0.5,
        }
    }

    #[test]
    fn a_narrowed_view_keeps_its_rows_choices_and_only_matching_bans_are_used() {
        let rows = Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let logits = Logits {
            rows,
            chosen: Some(Chosen {
                banned: Some(1),
                picks: vec![pick(0), pick(2), pick(3)],
            }),
        };
        let tail = logits.narrow(1, 2).unwrap();
        assert_eq!(tail.rows.dims(), [2, 4]);
        assert_eq!(tail.chosen_for(Some(1)), Some(&[pick(2), pick(3)][..]));
        assert_eq!(tail.chosen_for(None), None, "made with another ban");
        assert!(logits.narrow(2, 2).is_err(), "past the last row");
        let plain = Logits::from(logits.rows.clone());
        assert_eq!(plain.chosen_for(Some(1)), None);
    }
}
