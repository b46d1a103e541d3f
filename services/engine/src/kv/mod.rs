//! The paged KV cache: a pool of fixed-size pages with reference counts and a prefix cache of
//! full committed pages keyed by chain hash, a block table per sequence, the pages' K/V storage,
//! and paged attention over a ragged batch on the CPU. Pages are the unit of admission (a worker
//! admits a sequence when its pages fit) and of sharing (sequences with a common prompt prefix
//! hold the same pages). The step batcher (`decode::StepBatcher`) runs the model over it.

mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
mod block_table;
mod device_pages;
mod pool;
mod storage;

pub use attention::paged_attention;
pub use block_table::{chain_hash, BlockTable, OutOfPages, TableView};
pub(crate) use device_pages::{DeviceBatch, DevicePages};
pub use pool::{PageId, PagePool, PageRef, PrefixStats};
pub(crate) use storage::slots;
pub use storage::KvStorage;
