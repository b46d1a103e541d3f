//! bf16 values in storage that starts on a 64-byte cache line, for the AMX tile loads.
//!
//! Why: a `tileloadd` whose 64-byte rows straddle two cache lines took 46 cycles on the 2-core
//! Xeon (Sapphire Rapids, 2.6 GHz), one whose rows lie on line boundaries 6.6 — and a
//! `tdpbf16ps` takes 14. A `Vec<u16>` starts wherever the allocator puts it (16 bytes past a
//! line for the tiles of every weight packed before this type), which made each product
//! bound by its loads at about 19 ns a tile multiply instead of the 5.4 ns of its multiplies
//! (docs/benchmarks.md, issue 6).

/// Values per line: 64 bytes of bf16, one tile row.
pub(crate) const LINE_VALUES: usize = 32;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; LINE_VALUES]);

/// `len` bf16 values (as bits), the first on a line boundary.
pub(crate) struct Bf16Lines {
    lines: Vec<Line>,
    len: usize,
}

impl Bf16Lines {
    pub(crate) fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; LINE_VALUES]); len.div_ceil(LINE_VALUES)],
            len,
        }
    }

    /// `rows` rows of `width` values (whole lines) that `fill(row, values)` writes over zeros,
    /// each row zeroed just before it is filled: both passes over a row then stay in L1, where
    /// zeroing a whole product input first (100–300 KB at 16–64 sequences) was a pass over
    /// memory of its own (1–1.4% of a step batcher's round, 2-core Xeon).
    pub(crate) fn from_rows(
        rows: usize,
        width: usize,
        mut fill: impl FnMut(usize, &mut [u16]),
    ) -> Self {
        assert_eq!(width % LINE_VALUES, 0, "rows of whole lines");
        let per_row = width / LINE_VALUES;
        let mut lines = Vec::with_capacity(rows * per_row);
        for row in 0..rows {
            let at = lines.len();
            lines.resize(at + per_row, Line([0; LINE_VALUES]));
            // SAFETY: the row's `per_row` lines are `width` u16 values back to back (a `Line` is
            // 32 u16 with no padding), all initialised, and borrowed only here.
            let values = unsafe {
                std::slice::from_raw_parts_mut(lines[at..].as_mut_ptr().cast::<u16>(), width)
            };
            fill(row, values);
        }
        Self {
            lines,
            len: rows * width,
        }
    }

    pub(crate) fn as_slice(&self) -> &[u16] {
        // SAFETY: `lines` holds at least `len` u16 values back to back (a `Line` is 32 u16 with
        // no padding: 64 bytes, its alignment), all initialised.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u16>(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u16] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u16>(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::Bf16Lines;

    #[test]
    fn values_start_on_a_line_and_keep_what_was_written() {
        for len in [0, 1, 31, 32, 33, 1000] {
            let mut lines = Bf16Lines::zeroed(len);
            assert_eq!(lines.as_slice().as_ptr() as usize % 64, 0);
            assert_eq!(lines.as_slice().len(), len);
            assert!(lines.as_slice().iter().all(|&v| v == 0));
            for (i, v) in lines.as_mut_slice().iter_mut().enumerate() {
                *v = i as u16;
            }
            assert!(lines
                .as_slice()
                .iter()
                .enumerate()
                .all(|(i, &v)| v == i as u16));
        }
    }

    #[test]
    fn rows_are_filled_in_order_over_zeros() {
        let lines = Bf16Lines::from_rows(3, 64, |row, values| {
            assert!(values.iter().all(|&v| v == 0));
            if row != 1 {
                values[..5].fill(row as u16 + 7);
            }
        });
        let v = lines.as_slice();
        assert_eq!(v.as_ptr() as usize % 64, 0);
        assert_eq!(v.len(), 3 * 64);
        assert!(v[..5].iter().all(|&x| x == 7) && v[5..64].iter().all(|&x| x == 0));
        assert!(v[64..128].iter().all(|&x| x == 0), "row 1 left as zeros");
        assert!(v[128..133].iter().all(|&x| x == 9) && v[133..].iter().all(|&x| x == 0));
    }
}
