//! A run directory's data, made once: the corpus file list and fingerprint, the tokenizer trained
//! on the train side, the train shard (half FIM) and the held-out shard (plain, with its raw
//! bytes beside it so a compressor can be compared on exactly the same bytes).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::corpus::{Corpus, Split};
use crate::error::TrainerError;
use crate::settings::Settings;
use crate::shards::{write_shard, Specials};
use crate::tokenizer::{train_tokenizer, SPECIAL_TOKENS};

/// Directories of the standard library that are not the library: third-party packages and
/// bytecode caches.
const SKIP_DIRS: &[&str] = &["site-packages", "dist-packages", "__pycache__"];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prepared {
    pub roots: Vec<PathBuf>,
    pub extensions: Vec<String>,
    pub corpus_files: usize,
    pub corpus_fingerprint: String,
    pub train_files: usize,
    pub held_out_files: usize,
    /// Files skipped because they are not UTF-8.
    pub skipped_files: usize,
    pub train_tokens: usize,
    pub held_out_tokens: usize,
    pub held_out_bytes: usize,
    pub train_fim_documents: usize,
}

pub struct RunPaths(pub PathBuf);

impl RunPaths {
    pub fn tokenizer(&self) -> PathBuf {
        self.0.join("tokenizer.json")
    }
    pub fn train_shard(&self) -> PathBuf {
        self.0.join("train.bin")
    }
    /// Stage 3's windows of round `round`: the model's greedy continuations of training
    /// prefixes.
    pub fn step_reduction_shard(&self, round: usize) -> PathBuf {
        self.0.join(format!("step-reduction-{round}.bin"))
    }
    pub fn held_out_shard(&self) -> PathBuf {
        self.0.join("heldout.bin")
    }
    pub fn held_out_text(&self) -> PathBuf {
        self.0.join("heldout.txt")
    }
    pub fn prepared(&self) -> PathBuf {
        self.0.join("prepared.json")
    }
    pub fn settings(&self) -> PathBuf {
        self.0.join("settings.json")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("checkpoint")
    }
    pub fn log(&self) -> PathBuf {
        self.0.join("log.jsonl")
    }
    pub fn model(&self) -> PathBuf {
        self.0.join("model")
    }
}

/// The machine's CPython standard library (`sysconfig.get_paths()["stdlib"]`), the default
/// corpus.
pub fn python_stdlib() -> Result<PathBuf, TrainerError> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .map_err(|e| TrainerError::Input(format!("running python3 to find its stdlib: {e}")))?;
    if !out.status.success() {
        return Err(TrainerError::Input(format!(
            "python3 could not name its stdlib: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The special token ids of a tokenizer trained by [`train_tokenizer`] (its first ids).
pub fn specials() -> Specials {
    Specials {
        end_of_text: 0,
        fim_prefix: 2,
        fim_middle: 3,
        fim_suffix: 4,
    }
}

pub const MASK_ID: u32 = 1;
pub const PAD_ID: u32 = 5;

/// Prepares `run` unless it already is, and returns its record.
pub fn prepare(
    run: &RunPaths,
    settings: &Settings,
    roots: &[PathBuf],
    extensions: &[&str],
) -> Result<Prepared, TrainerError> {
    if let Ok(text) = std::fs::read_to_string(run.prepared()) {
        return serde_json::from_str(&text).map_err(|e| TrainerError::file(run.prepared(), e));
    }
    std::fs::create_dir_all(&run.0).map_err(|e| TrainerError::file(&run.0, e))?;
    let corpus = Corpus::discover(roots, extensions, SKIP_DIRS)?;
    let limit = |files: Vec<PathBuf>, n: usize| -> Vec<PathBuf> {
        if settings.max_files == 0 {
            files
        } else {
            files.into_iter().take(n).collect()
        }
    };
    let train = limit(corpus.files(Split::Train), settings.max_files);
    let held_out = limit(
        corpus.files(Split::HeldOut),
        (settings.max_files / 10).max(2),
    );
    let (train_texts, skipped_train) = read_texts(&train);
    let (held_texts, skipped_held) = read_texts(&held_out);
    if train_texts.is_empty() || held_texts.is_empty() {
        return Err(TrainerError::Input(format!(
            "the corpus under {roots:?} has {} train and {} held-out UTF-8 files with extensions {extensions:?}; both sides need at least one",
            train_texts.len(),
            held_texts.len()
        )));
    }
    let listing: String = train
        .iter()
        .map(|p| format!("train\t{}\n", p.display()))
        .chain(
            held_out
                .iter()
                .map(|p| format!("heldout\t{}\n", p.display())),
        )
        .collect();
    write(&run.0.join("files.txt"), listing.as_bytes())?;

    // A run started from a trained model (`--init`) finds that model's tokenizer already here.
    let tokenizer = if run.tokenizer().is_file() {
        tokenizers::Tokenizer::from_file(run.tokenizer())
            .map_err(|e| TrainerError::file(run.tokenizer(), e))?
    } else {
        train_tokenizer(train_texts.iter(), settings.vocab_size, &run.tokenizer())?
    };
    let encode = |texts: &[String]| -> Result<Vec<Vec<u32>>, TrainerError> {
        let encodings = tokenizer
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| TrainerError::Input(format!("tokenizing the corpus: {e}")))?;
        Ok(encodings.iter().map(|e| e.get_ids().to_vec()).collect())
    };
    let vocab = tokenizer.get_vocab_size(true);
    let train_meta = write_shard(
        &run.train_shard(),
        &encode(&train_texts)?,
        vocab,
        &specials(),
        true,
    )?;
    let held_meta = write_shard(
        &run.held_out_shard(),
        &encode(&held_texts)?,
        vocab,
        &specials(),
        false,
    )?;
    let held_bytes = held_texts.concat();
    write(&run.held_out_text(), held_bytes.as_bytes())?;
    debug_assert_eq!(SPECIAL_TOKENS[MASK_ID as usize], "<|mask|>");
    let prepared = Prepared {
        roots: roots.to_vec(),
        extensions: extensions.iter().map(|s| s.to_string()).collect(),
        corpus_files: corpus.len(),
        corpus_fingerprint: corpus.fingerprint(),
        train_files: train_texts.len(),
        held_out_files: held_texts.len(),
        skipped_files: skipped_train + skipped_held,
        train_tokens: train_meta.tokens,
        held_out_tokens: held_meta.tokens,
        held_out_bytes: held_bytes.len(),
        train_fim_documents: train_meta.fim_documents,
    };
    let text = serde_json::to_string_pretty(&prepared)
        .map_err(|e| TrainerError::file(run.prepared(), e))?;
    write(&run.prepared(), text.as_bytes())?;
    Ok(prepared)
}

/// The files' texts, skipping (and counting) those that are not UTF-8 or cannot be read.
fn read_texts(files: &[PathBuf]) -> (Vec<String>, usize) {
    let mut texts = Vec::with_capacity(files.len());
    let mut skipped = 0;
    for f in files {
        match std::fs::read(f).map(String::from_utf8) {
            Ok(Ok(text)) if !text.is_empty() => texts.push(text),
            _ => skipped += 1,
        }
    }
    (texts, skipped)
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<(), TrainerError> {
    std::fs::write(path, bytes).map_err(|e| TrainerError::file(path, e))
}
