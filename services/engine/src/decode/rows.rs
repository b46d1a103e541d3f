//! What a decoder reads of a logits row. Greedy decoding needs only each row's arg max and its
//! probability: under the step batcher those come with the logits, made for the whole round
//! (`decode/logits.rs`); alone on a GPU the kernels' `row_confidence` computes them where the
//! logits are, so a row (152k floats for Qwen) never crosses to the host. Otherwise it is the
//! row.

use super::logits::Logits;
use super::params::DecodingParams;
use super::sampling::Pick;
use crate::error::Result;

/// One logits row as a decoder keeps it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Row {
    Logits(Vec<f32>),
    /// The greedy choice, made on the device with the banned token excluded.
    Chosen(Pick),
}

impl Default for Row {
    fn default() -> Self {
        Row::Logits(Vec::new())
    }
}

impl Row {
    /// The raw logits; empty for a choice made on the device (never read then: see
    /// [`RowReader::new`]).
    pub(crate) fn logits(&self) -> &[f32] {
        match self {
            Row::Logits(v) => v,
            Row::Chosen(_) => &[],
        }
    }
}

/// How a decoder turns a `[rows, vocab]` logits tensor into [`Row`]s.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowReader {
    /// Only the greedy choice is read: temperature 0 (no draws from the distribution) and no
    /// self-correction (which reads every token's probability).
    greedy: bool,
    on_device: bool,
    banned: Option<u32>,
}

/// The token no decoder ever chooses: the model's mask token (it stands for "not decoded yet").
/// Decoders ban it in their readers and the step batcher in the choices it makes for them; the
/// two must agree for a reader to take the batcher's choices.
pub(crate) fn never_chosen(config: &crate::config::ModelConfig) -> Option<u32> {
    config.diffusion.mask_token_id
}

impl RowReader {
    /// Choices are made on the device when the logits are on a GPU and nothing but the greedy
    /// choice is read: temperature 0 (no draws from the distribution) and no self-correction
    /// (which reads every token's probability). `banned` (the mask token) is never chosen.
    /// `SDLM_HOST_CHOICES=1` in the environment reads whole rows to the host anyway, to measure
    /// what the device choice saves.
    pub(crate) fn new(logits_on_gpu: bool, params: &DecodingParams, banned: Option<u32>) -> Self {
        let host_forced = crate::switches::HOST_CHOICES.on();
        let greedy = params.reads_greedy_choices_only();
        Self {
            greedy,
            on_device: logits_on_gpu && greedy && !host_forced,
            banned,
        }
    }

    /// A greedy reader takes the choices that came with the logits (the step batcher's, made
    /// for the whole batch) when they were made with its ban.
    pub(crate) fn read(&self, logits: &Logits) -> Result<Vec<Row>> {
        if let Some(picks) = logits.chosen_for(self.banned).filter(|_| self.greedy) {
            return Ok(picks.iter().copied().map(Row::Chosen).collect());
        }
        if self.on_device {
            let picks = crate::cuda_ops::greedy_choices_on_device(&logits.rows, self.banned)?;
            return Ok(picks.into_iter().map(Row::Chosen).collect());
        }
        Ok(logits
            .rows
            .to_vec2::<f32>()?
            .into_iter()
            .map(Row::Logits)
            .collect())
    }

    /// The last row, or an empty one when there is none.
    pub(crate) fn read_last(&self, logits: &Logits) -> Result<Row> {
        Ok(self.read(logits)?.pop().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_greedy_decoding_without_revision_on_a_gpu_chooses_on_the_device() {
        let greedy = DecodingParams::default();
        let sampled = DecodingParams {
            temperature: 0.7,
            ..DecodingParams::default()
        };
        let revising = DecodingParams {
            refine: true,
            ..DecodingParams::default()
        };
        assert!(RowReader::new(true, &greedy, None).on_device);
        assert!(!RowReader::new(false, &greedy, None).on_device);
        assert!(!RowReader::new(true, &sampled, None).on_device);
        assert!(!RowReader::new(true, &revising, None).on_device);
    }

    fn two_rows() -> Logits {
        let rows = candle_core::Tensor::new(
            &[[0f32, 2.0, 1.0], [3.0, -1.0, 0.5]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        Logits::from(rows)
    }

    #[test]
    fn on_the_cpu_the_rows_are_the_logits_in_order() {
        let logits = two_rows();
        let reader = RowReader::new(false, &DecodingParams::default(), Some(0));
        let rows = reader.read(&logits).unwrap();
        assert_eq!(rows[0].logits(), [0.0, 2.0, 1.0]);
        assert_eq!(rows[1].logits(), [3.0, -1.0, 0.5]);
        assert_eq!(reader.read_last(&logits).unwrap(), rows[1]);
        let none = logits.narrow(0, 0).unwrap();
        assert_eq!(reader.read_last(&none).unwrap(), Row::default());
    }

    #[test]
    fn only_a_greedy_reader_with_the_same_ban_takes_the_choices_that_came_with_the_rows() {
        let pick = |token| Pick {
            token,
            confidence: 0.25,
        };
        let mut logits = two_rows();
        logits.chosen = Some(super::super::logits::Chosen {
            banned: Some(0),
            picks: vec![pick(2), pick(1)],
        });
        let greedy = DecodingParams::default();
        let sampled = DecodingParams {
            temperature: 0.7,
            ..DecodingParams::default()
        };
        let taken = RowReader::new(false, &greedy, Some(0))
            .read(&logits)
            .unwrap();
        assert_eq!(taken, vec![Row::Chosen(pick(2)), Row::Chosen(pick(1))]);
        for reader in [
            RowReader::new(false, &greedy, None),
            RowReader::new(false, &sampled, Some(0)),
        ] {
            let rows = reader.read(&logits).unwrap();
            assert_eq!(rows[1].logits(), [3.0, -1.0, 0.5]);
        }
    }
}
