//! sdlm-trainer: the data side of training so far: a source-code corpus with a deterministic
//! train / held-out split, a byte-level BPE tokenizer trained on it, and flat token shards with
//! half the documents in fill-in-the-middle form. The training loop comes next (issue 4).

mod corpus;
mod error;
mod shards;
mod tokenizer;

pub use corpus::{Corpus, Split, HELD_OUT_PER_MILLE};
pub use error::TrainerError;
pub use shards::{fim_transform, read_shard, write_shard, Document, ShardMeta, Specials};
pub use tokenizer::{train_tokenizer, SPECIAL_TOKENS};
