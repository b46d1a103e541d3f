//! Token shards: documents joined by <|endoftext|> into one flat little-endian array of u16 (u32
//! when the vocabulary passes 65,535), with a JSON sidecar saying which, so a trainer can
//! memory-map and index it directly. Half of the documents (chosen by a hash of their index, so
//! the choice is reproducible) go in fill-in-the-middle form, prefix–suffix–middle, as code
//! models are trained, so the model learns to infill.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::TokenShard;
use crate::error::TrainerError;
use crate::rng::TrainRng;

/// A tokenized document.
pub type Document = Vec<u32>;

/// The sidecar of a shard (`<shard>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// "u16" or "u32", little-endian.
    pub dtype: String,
    pub tokens: usize,
    pub documents: usize,
    pub fim_documents: usize,
}

/// The special token ids the shard writer uses.
#[derive(Clone, Copy, Debug)]
pub struct Specials {
    pub end_of_text: u32,
    pub fim_prefix: u32,
    pub fim_middle: u32,
    pub fim_suffix: u32,
}

/// `doc` cut at two points `a <= b` into prefix, middle, suffix and laid out as
/// <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle (the PSM order).
pub fn fim_transform(doc: &[u32], a: usize, b: usize, s: &Specials) -> Document {
    let (a, b) = (a.min(doc.len()), b.min(doc.len()).max(a.min(doc.len())));
    let mut out = Vec::with_capacity(doc.len() + 3);
    out.push(s.fim_prefix);
    out.extend_from_slice(&doc[..a]);
    out.push(s.fim_suffix);
    out.extend_from_slice(&doc[b..]);
    out.push(s.fim_middle);
    out.extend_from_slice(&doc[a..b]);
    out
}

/// Writes `docs` to `path` (and `path`.json); `with_fim`, every other document by hash in FIM
/// form with cut points drawn from the same hash (held-out shards are written plain, so their
/// bytes are the files' bytes).
pub fn write_shard(
    path: &Path,
    docs: &[Document],
    vocab_size: usize,
    s: &Specials,
    with_fim: bool,
) -> Result<ShardMeta, TrainerError> {
    let mut tokens: Vec<u32> = Vec::new();
    let mut fim = 0;
    for (i, doc) in docs.iter().enumerate() {
        let h = TrainRng::new(i as u64).next_u64();
        if with_fim && (h & 1) == 1 && doc.len() >= 2 {
            let x = (h >> 8) as usize % (doc.len() + 1);
            let y = (h >> 32) as usize % (doc.len() + 1);
            tokens.extend(fim_transform(doc, x.min(y), x.max(y), s));
            fim += 1;
        } else {
            tokens.extend_from_slice(doc);
        }
        tokens.push(s.end_of_text);
    }
    write_tokens(path, &tokens, vocab_size, docs.len(), fim)
}

/// Writes `tokens` as a shard (u16, or u32 for vocabularies above 65,536) with its sidecar.
pub fn write_tokens(
    path: &Path,
    tokens: &[u32],
    vocab_size: usize,
    documents: usize,
    fim_documents: usize,
) -> Result<ShardMeta, TrainerError> {
    let wide = vocab_size > u16::MAX as usize + 1;
    let mut bytes = Vec::with_capacity(tokens.len() * if wide { 4 } else { 2 });
    for &t in tokens {
        if wide {
            bytes.extend_from_slice(&t.to_le_bytes());
        } else {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        }
    }
    std::fs::write(path, bytes).map_err(|e| TrainerError::file(path, e))?;
    let meta = ShardMeta {
        dtype: if wide { "u32" } else { "u16" }.into(),
        tokens: tokens.len(),
        documents,
        fim_documents,
    };
    let sidecar = path.with_extension("json");
    let text = serde_json::to_string_pretty(&meta).map_err(|e| TrainerError::file(&sidecar, e))?;
    std::fs::write(&sidecar, text).map_err(|e| TrainerError::file(&sidecar, e))?;
    Ok(meta)
}

/// Reads a shard back as token ids, checking its size against the sidecar.
pub fn read_shard(path: &Path) -> Result<Vec<u32>, TrainerError> {
    let shard = TokenShard::open(path)?;
    Ok((0..shard.len()).map(|i| shard.get(i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Specials = Specials {
        end_of_text: 0,
        fim_prefix: 2,
        fim_middle: 3,
        fim_suffix: 4,
    };

    #[test]
    fn fim_puts_the_middle_last() {
        let doc = [10, 11, 12, 13, 14];
        assert_eq!(
            fim_transform(&doc, 1, 3, &S),
            vec![2, 10, 4, 13, 14, 3, 11, 12]
        );
    }

    #[test]
    fn shards_round_trip_and_half_the_documents_are_fim() {
        let docs: Vec<Document> = (0..400)
            .map(|i| (0..(5 + i % 17)).map(|t| 100 + t + i).collect())
            .collect();
        let path = std::env::temp_dir().join(format!("sdlm-shard-{}.bin", std::process::id()));
        let meta = write_shard(&path, &docs, 8192, &S, true).unwrap();
        assert_eq!(meta.dtype, "u16");
        assert!(
            (150..250).contains(&meta.fim_documents),
            "{}",
            meta.fim_documents
        );
        let tokens = read_shard(&path).unwrap();
        assert_eq!(tokens.len(), meta.tokens);
        // Documents come back in order: split at end-of-text, undo FIM, compare.
        let back: Vec<&[u32]> = tokens
            .split(|&t| t == S.end_of_text)
            .filter(|d| !d.is_empty())
            .collect();
        assert_eq!(back.len(), docs.len());
        for (got, want) in back.iter().zip(&docs) {
            if got[0] == S.fim_prefix {
                let suffix_at = got.iter().position(|&t| t == S.fim_suffix).unwrap();
                let middle_at = got.iter().position(|&t| t == S.fim_middle).unwrap();
                let restored: Vec<u32> = [
                    &got[1..suffix_at],
                    &got[middle_at + 1..],
                    &got[suffix_at + 1..middle_at],
                ]
                .concat();
                assert_eq!(&restored, want);
            } else {
                assert_eq!(got, &want.as_slice());
            }
        }
        // A truncated shard is refused by name.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(read_shard(&path)
            .unwrap_err()
            .to_string()
            .contains("sidecar promises"));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("json"));
    }

    #[test]
    fn large_vocabularies_use_u32() {
        let path = std::env::temp_dir().join(format!("sdlm-shard32-{}.bin", std::process::id()));
        let meta = write_shard(&path, &[vec![70_000, 5]], 151_936, &S, true).unwrap();
        assert_eq!(meta.dtype, "u32");
        assert!(read_shard(&path).unwrap().contains(&70_000));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("json"));
    }
}
