//! Plain Rust implementations of every kernel: the CPU path of the engine and the oracle the
//! CUDA kernels are tested against. Same math as the `.cu` files (f32 arithmetic, one rounding
//! on store); different order of summation, so results agree to rounding, not bit for bit.

mod attention;
mod confidence;
mod kv_scatter;
mod rmsnorm;
mod rope;

pub use attention::paged_attention;
pub use confidence::{row_confidence, select_unmask, RowConfidence};
pub use kv_scatter::kv_scatter;
pub use rmsnorm::residual_rmsnorm;
pub use rope::{rope_inplace, RopeTable};
