//! A byte-level BPE tokenizer trained on the corpus with the `tokenizers` crate, with the special
//! tokens our models use. Byte-level means any text encodes; nothing is ever unknown.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::TrainerError;

/// In id order from 0: end of text, the diffusion mask, fill-in-the-middle markers, padding.
pub const SPECIAL_TOKENS: [&str; 6] = [
    "<|endoftext|>",
    "<|mask|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|pad|>",
];

/// Trains on `texts` to `vocab_size` tokens (special tokens included) and saves tokenizer.json.
pub fn train_tokenizer<I, S>(
    texts: I,
    vocab_size: usize,
    out: &Path,
) -> Result<Tokenizer, TrainerError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    let min = SPECIAL_TOKENS.len() + ByteLevel::alphabet().len();
    if vocab_size < min {
        return Err(TrainerError::Input(format!(
            "vocab_size is {vocab_size}; byte-level BPE with our special tokens needs at least {min}"
        )));
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| TrainerError::Input(format!("training the tokenizer: {e}")))?;
    tokenizer.add_special_tokens(&specials);
    tokenizer
        .save(out, false)
        .map_err(|e| TrainerError::file(out, e))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_a_byte_level_tokenizer_with_our_special_tokens_first() {
        let code = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n";
        let texts: Vec<String> = (0..50)
            .map(|i| code.replace("add", &format!("add{i}")))
            .collect();
        let out = std::env::temp_dir().join(format!("sdlm-tok-{}.json", std::process::id()));
        let tok = train_tokenizer(texts.iter(), 400, &out).unwrap();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(s), Some(i as u32), "{s}");
        }
        assert!(tok.get_vocab_size(true) <= 400);
        // Any text round-trips, even characters never seen in training.
        let text = "x = 'héllo ☃'\n<|endoftext|>";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.contains(&0), "the special token is one token");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // The saved file loads to the same tokenizer.
        let again = Tokenizer::from_file(&out).unwrap();
        assert_eq!(again.encode(text, false).unwrap().get_ids(), ids.as_slice());
        let _ = std::fs::remove_file(out);
    }
}
