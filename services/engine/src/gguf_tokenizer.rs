//! A `tokenizers` Tokenizer built from GGUF `tokenizer.ggml.*` metadata: GPT-2-style byte-level
//! BPE (vocabulary, merges) with the pre-tokenizer that `tokenizer.ggml.pre` names, the control
//! tokens as special tokens, and BOS prepended when `tokenizer.ggml.add_bos_token` says so. This
//! is what HF's tokenizer.json holds for the same models, rebuilt from the one file.

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::Result;
use crate::gguf::GgufFile;

/// Qwen2's pre-tokenizer split (its tokenizer.json), also llama.cpp's "qwen2".
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's ("llama-bpe").
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GGUF token types (llama.cpp's llama_token_type): 3 is a control token.
const TOKEN_TYPE_CONTROL: i32 = 3;

fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let split = |re: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into())
    };
    match pre {
        "qwen2" => split(QWEN2_SPLIT),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT),
        // SmolLM2: single digits, then GPT-2's split.
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()),
        "gpt-2" | "gpt2" | "default" => Ok(ByteLevel::new(false, true, true).into()),
        other => Err(format!(
            "tokenizer.ggml.pre {other:?} is not supported; known: qwen2, llama-bpe, smollm, gpt-2, default"
        )),
    }
}

pub(crate) fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let err = |reason: String| file.err(reason);
    let model = file.meta_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model {model:?} is not supported; only byte-level BPE (\"gpt2\") is"
        )));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        let values = file
            .meta(key)
            .ok_or_else(|| err(format!("metadata {key} is missing")))?
            .to_vec()
            .map_err(|e| err(format!("metadata {key}: {e}")))?;
        values
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| err(format!("metadata {key}: {e}")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(err(format!("merge {m:?} is not two tokens"))),
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| err(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = file.meta_str("tokenizer.ggml.pre").unwrap_or("default");
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre).map_err(err)?));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    let types: Vec<i32> = match file.meta("tokenizer.ggml.token_type").map(|v| v.to_vec()) {
        Some(Ok(values)) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => Vec::new(),
    };
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&specials);

    let add_bos = file
        .meta("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    if add_bos {
        let bos = file
            .meta_u32("tokenizer.ggml.bos_token_id")?
            .ok_or_else(|| err("add_bos_token is set but bos_token_id is missing".into()))?;
        let bos_text = tokens
            .get(bos as usize)
            .ok_or_else(|| err(format!("bos_token_id {bos} is outside the vocabulary")))?
            .clone();
        let template = TemplateProcessing::builder()
            .try_single(format!("{bos_text} $A"))
            .and_then(|b| {
                b.special_tokens(vec![(bos_text.clone(), bos)])
                    .build()
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| err(format!("BOS template: {e}")))?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}
