//! Completion text as blocks commit: each block's new text is what became final, so a UTF-8
//! character split across a block boundary (byte-level BPE writes bytes, not characters) waits
//! for the block that completes it, and text that could be the start of a stop string waits
//! until it is clearly not one. The concatenation of every piece is exactly the final text.

use sdlm_engine::decode::stop_string_cut;
use tokenizers::Tokenizer;

pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    stops: Vec<String>,
    tokens: Vec<u32>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            tokens: Vec::new(),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// True once a stop string has been seen: the text ends before it, and the generation
    /// should end.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a committed block; returns the text that is now final.
    pub fn push(&mut self, tokens: &[u32]) -> Result<String, String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.tokens.extend_from_slice(tokens);
        self.text = self
            .tokenizer
            .decode(&self.tokens, true)
            .map_err(|e| format!("detokenizing: {e}"))?;
        if let Some(cut) = stop_string_cut(&self.text, &self.stops) {
            self.stopped = true;
            self.text.truncate(cut);
            return Ok(self.take(cut));
        }
        // An incomplete character decodes as U+FFFD at the very end; later bytes replace it.
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        let held = self.stop_prefix_len(&self.text[..complete]);
        Ok(self.take(complete - held))
    }

    /// Everything not yet returned (the generation ended).
    pub fn finish(&mut self) -> String {
        self.take(self.text.len())
    }

    /// The whole text so far (cut before a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let piece = self
            .text
            .get(self.emitted..end)
            .unwrap_or_default()
            .to_string();
        self.emitted = end;
        piece
    }

    /// Bytes at the end of `text` that begin some stop string (held back until decided).
    fn stop_prefix_len(&self, text: &str) -> usize {
        self.stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .filter(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::TextStream;
    use tokenizers::models::bpe::BPE;
    use tokenizers::Tokenizer;

    /// A byte-level tokenizer whose tokens are single bytes, so blocks can split characters.
    fn byte_tokenizer() -> Tokenizer {
        let mut vocab: tokenizers::models::bpe::Vocab = Default::default();
        let alphabet = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut chars: Vec<char> = alphabet.into_iter().collect();
        chars.sort();
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), i as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .expect("a byte vocabulary builds");
        let mut t = Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::default().add_prefix_space(false),
        ));
        t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        t
    }

    fn pieces(text: &str, block: usize, stops: &[&str]) -> (Vec<String>, String, bool) {
        let t = byte_tokenizer();
        let ids = t.encode(text, false).expect("encodes").get_ids().to_vec();
        let mut s = TextStream::new(&t, stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for chunk in ids.chunks(block) {
            out.push(s.push(chunk).expect("decodes"));
            if s.stopped() {
                break;
            }
        }
        out.push(s.finish());
        (out, s.text().to_string(), s.stopped())
    }

    #[test]
    fn characters_split_by_blocks_arrive_whole_and_the_pieces_make_the_text() {
        let text = "naïve → 日本語 ok";
        for block in 1..6 {
            let (out, all, _) = pieces(text, block, &[]);
            assert_eq!(out.concat(), text, "block {block}");
            assert_eq!(all, text);
            assert!(out.iter().all(|p| !p.contains('\u{FFFD}')), "{out:?}");
        }
    }

    #[test]
    fn a_stop_string_across_blocks_is_never_emitted() {
        let text = "x = 1\ndef f(): pass";
        for block in 1..8 {
            let (out, all, stopped) = pieces(text, block, &["\ndef"]);
            assert!(stopped);
            assert_eq!(all, "x = 1");
            assert_eq!(out.concat(), "x = 1", "block {block}: {out:?}");
        }
    }

    #[test]
    fn a_held_prefix_that_is_not_a_stop_is_released() {
        let (out, all, stopped) = pieces("a\nb\nc", 1, &["\ndef"]);
        assert!(!stopped);
        assert_eq!(out.concat(), all);
        assert_eq!(all, "a\nb\nc");
    }
}
