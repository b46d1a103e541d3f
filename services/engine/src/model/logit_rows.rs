//! Which rows of a forward the LM head runs over.

/// Which of a sequence's new tokens a forward returns logits for. A prefill needs only its last
/// token's, a prompt chunk none, a finished block run ahead of the next block's masks none (or
/// its last, when position i − 1 predicts token i): skipping the LM head for the rest saves its
/// `hidden × vocab` multiply-adds per token, a large share of a small model's forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    All,
    Last,
    None,
    /// The new tokens from this index on.
    From(usize),
    /// The new tokens from `first` on that are `mask_id`: a denoising step that revises no
    /// decoded token reads the still-masked positions only.
    Masked {
        first: usize,
        mask_id: u32,
    },
}

impl LogitRows {
    /// The rows (indices into the new `tokens`) whose logits are returned, in order.
    pub(crate) fn rows(self, tokens: &[u32]) -> Vec<usize> {
        let n = tokens.len();
        match self {
            LogitRows::All => (0..n).collect(),
            LogitRows::Last => (n.saturating_sub(1)..n).collect(),
            LogitRows::None => Vec::new(),
            LogitRows::From(first) => (first.min(n)..n).collect(),
            LogitRows::Masked { first, mask_id } => (first.min(n)..n)
                .filter(|&i| tokens[i] == mask_id)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogitRows;

    #[test]
    fn each_choice_names_its_rows_and_never_one_past_the_tokens() {
        let tokens = [5, 9, 9, 1, 9];
        let masked = |first| LogitRows::Masked { first, mask_id: 9 };
        assert_eq!(LogitRows::All.rows(&tokens), [0, 1, 2, 3, 4]);
        assert_eq!(LogitRows::Last.rows(&tokens), [4]);
        assert!(LogitRows::None.rows(&tokens).is_empty());
        assert_eq!(LogitRows::From(3).rows(&tokens), [3, 4]);
        assert!(LogitRows::From(7).rows(&tokens).is_empty());
        assert_eq!(masked(0).rows(&tokens), [1, 2, 4]);
        assert_eq!(masked(2).rows(&tokens), [2, 4]);
        assert!(masked(9).rows(&tokens).is_empty());
        assert!(LogitRows::Last.rows(&[]).is_empty());
    }
}
