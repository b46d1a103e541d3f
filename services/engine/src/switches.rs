//! Switches read from the environment once per process, each turning one optimisation off so
//! that a benchmark can measure it against the path it replaced in the same run.

use std::sync::OnceLock;

pub(crate) struct Switch {
    name: &'static str,
    value: OnceLock<bool>,
}

impl Switch {
    pub(crate) const fn new(name: &'static str) -> Self {
        Self {
            name,
            value: OnceLock::new(),
        }
    }

    /// Whether the variable is set to `1`.
    pub(crate) fn on(&self) -> bool {
        *self
            .value
            .get_or_init(|| std::env::var_os(self.name).is_some_and(|v| v == "1"))
    }
}

/// `SDLM_HOST_CHOICES=1`: decoders on a GPU read whole logits rows to the host.
pub(crate) static HOST_CHOICES: Switch = Switch::new("SDLM_HOST_CHOICES");
/// `SDLM_UNFUSED_NORM=1`: GPU layers compose candle's add and norm instead of the fused kernel.
pub(crate) static UNFUSED_NORM: Switch = Switch::new("SDLM_UNFUSED_NORM");
/// `SDLM_PER_SEQUENCE_CHOICES=1`: under the step batcher each greedy decoder makes its own
/// choices from its rows instead of the batcher making them for the whole round.
pub(crate) static PER_SEQUENCE_CHOICES: Switch = Switch::new("SDLM_PER_SEQUENCE_CHOICES");
/// `SDLM_PRODUCTS_IN_TURN=1`: a CPU layer's independent products run one after the other.
pub(crate) static PRODUCTS_IN_TURN: Switch = Switch::new("SDLM_PRODUCTS_IN_TURN");
/// `SDLM_SLEEPING_WORKERS=1`: a CPU forward lets rayon's idle worker sleep between ops.
pub(crate) static SLEEPING_WORKERS: Switch = Switch::new("SDLM_SLEEPING_WORKERS");
/// `SDLM_WHOLE_BATCH=1`: a CPU paged forward runs its batch as one part, each op split across
/// rayon's workers, instead of parts side by side.
pub(crate) static WHOLE_BATCH: Switch = Switch::new("SDLM_WHOLE_BATCH");
/// `SDLM_EVERY_ROW_TO_THE_END=1`: a CPU paged forward takes every row through its last layer's
/// attention and MLP, not only the rows whose logits are wanted.
pub(crate) static EVERY_ROW_TO_THE_END: Switch = Switch::new("SDLM_EVERY_ROW_TO_THE_END");
