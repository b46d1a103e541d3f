//! A partition of a training sequence into diffusion blocks. At inference a block starts right
//! after the prompt, wherever that falls, so training draws an offset as well as a size: the
//! first block is the `offset` tokens before the first full one (when offset > 0).

/// Block sizes a batch draws from (ALGORITHMS.md: any partition then works at inference).
pub const BLOCK_SIZES: [usize; 6] = [1, 2, 4, 8, 16, 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocks {
    size: usize,
    offset: usize,
}

impl Blocks {
    /// Blocks of `size` (≥ 1) after a first short block of `offset % size` tokens.
    pub fn new(size: usize, offset: usize) -> Self {
        let size = size.max(1);
        Self {
            size,
            offset: offset % size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The block index of position `p`.
    pub fn block_of(&self, p: usize) -> usize {
        if self.offset == 0 {
            p / self.size
        } else if p < self.offset {
            0
        } else {
            (p - self.offset) / self.size + 1
        }
    }

    /// How many blocks cover `len` positions.
    pub fn count(&self, len: usize) -> usize {
        if len == 0 {
            0
        } else {
            self.block_of(len - 1) + 1
        }
    }

    /// The positions of block `b` in a sequence of `len`.
    pub fn range(&self, b: usize, len: usize) -> std::ops::Range<usize> {
        let (start, end) = match (self.offset, b) {
            (0, b) => (b * self.size, (b + 1) * self.size),
            (o, 0) => (0, o),
            (o, b) => (o + (b - 1) * self.size, o + b * self.size),
        };
        start.min(len)..end.min(len)
    }
}

#[cfg(test)]
mod tests {
    use super::Blocks;

    #[test]
    fn ranges_tile_the_sequence_and_agree_with_block_of() {
        for size in [1, 3, 8] {
            for offset in 0..size {
                let blocks = Blocks::new(size, offset);
                let len = 23;
                let mut next = 0;
                for b in 0..blocks.count(len) {
                    let r = blocks.range(b, len);
                    assert_eq!(r.start, next);
                    assert!(!r.is_empty() && r.len() <= size);
                    assert!(r.clone().all(|p| blocks.block_of(p) == b));
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
