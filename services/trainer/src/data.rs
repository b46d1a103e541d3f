//! Training data as the trainer reads it: a token shard memory-mapped (the OS pages it in; a
//! shard never has to fit in the heap twice) and a cursor over fixed-length windows in a
//! shuffled order per epoch, whose whole state is (epoch, index) so a checkpoint can save it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::TrainerError;
use crate::rng::TrainRng;
use crate::shards::ShardMeta;

pub struct TokenShard {
    map: memmap2::Mmap,
    width: usize,
    len: usize,
}

impl TokenShard {
    /// Maps `path`, checking its size against the `path`.json sidecar.
    pub fn open(path: &Path) -> Result<Self, TrainerError> {
        let sidecar = path.with_extension("json");
        let text =
            std::fs::read_to_string(&sidecar).map_err(|e| TrainerError::file(&sidecar, e))?;
        let meta: ShardMeta =
            serde_json::from_str(&text).map_err(|e| TrainerError::file(&sidecar, e))?;
        let width = match meta.dtype.as_str() {
            "u16" => 2,
            "u32" => 4,
            other => {
                return Err(TrainerError::file(
                    &sidecar,
                    format!("dtype {other:?} is neither u16 nor u32"),
                ))
            }
        };
        let file = std::fs::File::open(path).map_err(|e| TrainerError::file(path, e))?;
        // Safety: the shard is ours and written once before training; nothing truncates it while
        // mapped (a concurrent writer would be a bug in the caller, as with any mmap reader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TrainerError::file(path, e))?;
        if map.len() != meta.tokens * width {
            return Err(TrainerError::file(
                path,
                format!(
                    "has {} bytes; the sidecar promises {} tokens of {width} bytes",
                    map.len(),
                    meta.tokens
                ),
            ));
        }
        Ok(Self {
            map,
            width,
            len: meta.tokens,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i` (< len).
    pub fn get(&self, i: usize) -> u32 {
        let b = &self.map[i * self.width..(i + 1) * self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    /// Tokens start..start+len (clamped to the shard).
    pub fn slice(&self, start: usize, len: usize) -> Vec<u32> {
        (start.min(self.len)..(start + len).min(self.len))
            .map(|i| self.get(i))
            .collect()
    }
}

/// Where the trainer is in its data: the window `index` of the shuffled order of `epoch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: usize,
}

/// Non-overlapping windows of `window` tokens over a shard, each epoch in an order drawn from
/// (seed, epoch), so the order is a function of the position alone.
pub struct Windows {
    shard: TokenShard,
    window: usize,
    seed: u64,
    order: Vec<usize>,
    order_epoch: Option<u64>,
}

impl Windows {
    pub fn new(shard: TokenShard, window: usize, seed: u64) -> Result<Self, TrainerError> {
        if window == 0 || shard.len() < window {
            return Err(TrainerError::Input(format!(
                "the training shard has {} tokens; a window (seq_len) of {window} needs at least that many",
                shard.len()
            )));
        }
        Ok(Self {
            shard,
            window,
            seed,
            order: Vec::new(),
            order_epoch: None,
        })
    }

    pub fn shard(&self) -> &TokenShard {
        &self.shard
    }

    pub fn per_epoch(&self) -> usize {
        self.shard.len() / self.window
    }

    /// The window at `pos`, and the position after it.
    pub fn next(&mut self, pos: DataPosition) -> (Vec<u32>, DataPosition) {
        let pos = if pos.index >= self.per_epoch() {
            DataPosition {
                epoch: pos.epoch + 1,
                index: 0,
            }
        } else {
            pos
        };
        if self.order_epoch != Some(pos.epoch) {
            let mut rng = TrainRng::new(self.seed ^ pos.epoch.wrapping_mul(0xa24b_aed4_963e_e407));
            self.order = rng.permutation(self.per_epoch());
            self.order_epoch = Some(pos.epoch);
        }
        let start = self.order[pos.index] * self.window;
        let tokens = self.shard.slice(start, self.window);
        (
            tokens,
            DataPosition {
                epoch: pos.epoch,
                index: pos.index + 1,
            },
        )
    }
}
