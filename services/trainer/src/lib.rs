//! sdlm-trainer: block-diffusion training of the engine's model on a source-code corpus
//! (ALGORITHMS.md, training). The data side (corpus split, tokenizer, token shards), the
//! vectorised objective with its corruptions, the optimiser, checkpoints, evaluation, and the run
//! loop that ties them together and exports an HF-layout model directory.

mod blocks;
mod checkpoint;
mod corpus;
mod corrupt;
mod cross_entropy;
mod data;
mod error;
mod eval;
mod init;
mod learner;
mod objective;
mod optim;
mod plot;
mod prepare;
mod rng;
mod run;
mod settings;
mod shards;
mod step_reduction;
mod tokenizer;

pub use blocks::{Blocks, BLOCK_SIZES};
pub use checkpoint::TrainState;
pub use corpus::{Corpus, Split, HELD_OUT_PER_MILLE};
pub use corrupt::{apply_edits, corrupt, edit_count, levenshtein, Corrupted, Stage};
pub use data::{DataPosition, TokenShard, Windows};
pub use error::TrainerError;
pub use eval::{evaluate, token_bytes, HeldOut};
pub use learner::{hf_config, Learner, StepStats};
pub use objective::{loss, training_mask, twin_positions, Batch, Loss};
pub use optim::{clip_global_norm, learning_rate, AdamW, AdamWConfig};
pub use plot::{plot_loss, read_log, Curve};
pub use prepare::{prepare, python_stdlib, Prepared, RunPaths, MASK_ID, PAD_ID};
pub use rng::TrainRng;
pub use run::{run, RunOptions, RunReport, StepLog};
pub use settings::{Architecture, Settings};
pub use shards::{
    fim_transform, read_shard, write_shard, write_tokens, Document, ShardMeta, Specials,
};
pub use step_reduction::{continue_greedily, draw_prefixes};
pub use tokenizer::{train_tokenizer, SPECIAL_TOKENS};
