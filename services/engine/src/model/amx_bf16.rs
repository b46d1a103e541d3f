//! `x · wᵀ` in bf16 on the AMX tile units of recent Xeons (Sapphire Rapids and later), f32
//! accumulation: the matmul of `--matmul-precision bf16`, as PyTorch's "medium" f32 matmul
//! precision or vLLM's bf16 CPU default.
//!
//! Why: on the CPU a forward of the shipped model is bound by reading its weights, and each
//! extra row of a diffusion block or a batch adds about 0.1–0.2 ms of f32 multiply-adds on the
//! AVX2 tile (`f32_rows`). One AMX instruction does a 16 × 16 × 32 block (8,192 multiply-adds),
//! so up to 16 rows cost what one does, and the bf16 weights are half the bytes to read.
//!
//! The weights are packed once, at load, into the tile layout `tdpbf16ps` reads: per 16 outputs
//! and 32 inputs a 1 KB tile whose row p holds, for each output, the pair of inputs 2p and
//! 2p + 1. An input row is rounded to bf16 (nearest even) and each output is the f32 sum over
//! the 32-input tiles in a fixed order, so a row's outputs do not depend on the rows beside it:
//! batched decoding gives each sequence what it gets alone. The f32 weights stay beside the
//! tiles (for GPU inputs and training), so a packed model holds 1.5× its f32 bytes.
//!
//! The tile registers are not operands Rust's `asm!` can name, so each instruction is its own
//! `asm!` with fixed registers (tmm0–3 the accumulators of 2 row groups × 2 output blocks,
//! tmm4–5 the two input tiles, tmm6–7 the two weight tiles); the compiler never uses them, so
//! they keep their values from one statement to the next.

use rayon::prelude::*;

use super::bf16_lines::Bf16Lines;

/// Outputs per weight tile, and input rows per accumulator tile.
const TILE: usize = 16;
/// Inputs per tile (16 pairs of bf16: 64 bytes, a tile row).
const DEPTH: usize = 32;
/// Output blocks (of [`TILE`]) per task when a product is split across threads: 128 outputs,
/// at 256 inputs 64 KB of bf16 weights.
const BLOCKS_PER_TASK: usize = 8;
/// Weight bytes from which a product is split across threads (the shipped model's LM head, not
/// its 128–360 KB layer weights): on the 2-core machine, 32 KB, 128 KB and 512 KB gave the same
/// decoding speed within the runs' spread, and fewer splits wake the other thread less often;
/// at 64–128 rows too a layer weight's product ran faster on one thread (57 against 71 µs for
/// 64 × 704 × 256 inside the pool), the LM head's faster on two (552 against 698 µs at 64 rows).
const PARALLEL_FROM_BYTES: usize = 1 << 19;

/// Whether this CPU and kernel run AMX-BF16: the CPU reports AMX-TILE and AMX-BF16, and Linux
/// grants this process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16+).
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    const AMX_BF16: u32 = 1 << 22;
    const AMX_TILE: u32 = 1 << 24;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    // Leaf 7 only when leaf 0 reports it.
    if std::arch::x86_64::__cpuid(0).eax < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE {
        return false;
    }
    // SAFETY: a request for a permission; it changes no memory of this process.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    granted == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// f32 to bf16 bits, rounding to nearest even (NaN stays NaN), as `half` converts.
pub(crate) fn to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// A weight `[n, k]` packed into AMX tiles, zero-padded to whole tiles.
pub(crate) struct Bf16Tiles {
    n: usize,
    k: usize,
    /// Tiles of [`TILE`] outputs × [`DEPTH`] inputs, output blocks outer, input blocks inner
    /// (a task reads its outputs' tiles front to back); each `TILE × DEPTH` values, on cache
    /// lines.
    tiles: Bf16Lines,
}

impl Bf16Tiles {
    /// Packs `w [n, k]` (row-major f32).
    pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> Self {
        debug_assert_eq!(w.len(), n * k);
        let (nb, kb) = (n.div_ceil(TILE), k.div_ceil(DEPTH));
        let mut tiles = Bf16Lines::zeroed(nb * kb * TILE * DEPTH);
        for (t, tile) in tiles.as_mut_slice().chunks_mut(TILE * DEPTH).enumerate() {
            let (ob, ib) = (t / kb, t % kb);
            for o in 0..TILE.min(n - ob * TILE) {
                let row = &w[(ob * TILE + o) * k..(ob * TILE + o + 1) * k];
                for i in 0..DEPTH.min(k - ib * DEPTH) {
                    tile[(i / 2) * 2 * TILE + o * 2 + i % 2] = to_bf16(row[ib * DEPTH + i]);
                }
            }
        }
        Self { n, k, tiles }
    }

    pub(crate) fn outputs(&self) -> usize {
        self.n
    }

    pub(crate) fn inputs(&self) -> usize {
        self.k
    }

    /// `x · wᵀ` for `m` rows `x [m, k]`: `[m, n]`. Only where [`available`] is true.
    #[cfg(test)]
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (mut values, start) = self.matmul_on_lines(x, m);
        values.drain(..start);
        values
    }

    /// [`Bf16Tiles::matmul`]'s `[m, n]` as `values[start..]`, where they start on a cache line:
    /// a tile store whose rows straddle lines took 30 cycles against 13 on the 2-core Xeon.
    pub(crate) fn matmul_on_lines(&self, x: &[f32], m: usize) -> (Vec<f32>, usize) {
        assert!(available(), "AMX-BF16 matmul on a CPU without it");
        debug_assert_eq!(x.len(), m * self.k);
        let kb = self.k.div_ceil(DEPTH);
        let input = bf16_rows(x, m, self.k, kb * DEPTH);
        // Not zeroed first (for the LM head at 64 rows, 2 MB a forward): the tasks together
        // store every output, each row of each output block once (`Target::store`). Room for
        // whole tiles of rows, so that a last tile of fewer rows is stored in place too (the
        // rows past `m` land in the spare capacity).
        let line = 64 / std::mem::size_of::<f32>();
        let mut out: Vec<f32> = Vec::with_capacity(m.div_ceil(TILE) * TILE * self.n + line);
        let start = out.as_ptr().align_offset(64).min(line);
        let blocks = self.n.div_ceil(TILE);
        let parallel = self.tiles.as_slice().len() * 2 >= PARALLEL_FROM_BYTES;
        let per_task = match parallel {
            true => BLOCKS_PER_TASK,
            false => blocks,
        };
        let target = Target {
            // SAFETY: `start` <= 16 values, inside the capacity.
            out: unsafe { out.as_mut_ptr().add(start) },
            m,
            n: self.n,
        };
        let task = |t: usize| {
            let range = t * per_task..blocks.min((t + 1) * per_task);
            // SAFETY: `available()` held above: the CPU has AMX and the OS granted its state;
            // tasks write disjoint output blocks of `out`, which outlives them.
            unsafe { self.fill_blocks(input.as_slice(), kb, range, &target) }
        };
        let tasks = blocks.div_ceil(per_task);
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
        // The values before `start` are never read; zeroed so that the whole length is
        // initialised.
        for v in &mut out.spare_capacity_mut()[..start] {
            v.write(0.0);
        }
        // SAFETY: the tasks covered output blocks 0..blocks, all n columns, and `fill_blocks`
        // stores every row of each: all m × n values after `start` are written.
        unsafe { out.set_len(start + m * self.n) };
        (out, start)
    }

    /// Every input row's outputs for the output blocks `blocks` (16 outputs each), written into
    /// `target`. The accumulators take up to 2 row groups × 2 output blocks at a time (32 rows
    /// × 32 outputs: each input and weight tile loaded once for two multiplies; the kernel before
    /// it, four row groups × one block into strips copied into place, took 1.6× as long for a
    /// step batcher's 64–128 rows × 704 × 256 and 1.3× for 4 rows, with cold weights), output
    /// blocks outer, so that a block's weight tiles come from memory once and from L1 or L2 for
    /// the row groups after the first.
    ///
    /// # Safety
    /// Only where [`available`] is true; `target` is `[m, n]` and no other thread writes these
    /// blocks' columns.
    #[cfg(target_arch = "x86_64")]
    unsafe fn fill_blocks(
        &self,
        input: &[u16],
        kb: usize,
        blocks: std::ops::Range<usize>,
        target: &Target,
    ) {
        let (tile_values, width) = (TILE * DEPTH, kb * DEPTH);
        let tiles = self.tiles.as_slice();
        let weights = |ob: usize| &tiles[ob * kb * tile_values..][..kb * tile_values];
        let config = TileConfig::new();
        amx::load_config(&config);
        let mut ob = blocks.start;
        while ob < blocks.end {
            let two_blocks = ob + 1 < blocks.end;
            let (wc, wd) = (weights(ob), weights(if two_blocks { ob + 1 } else { ob }));
            let mut row = 0;
            while row < target.m {
                let two_rows = target.m - row > TILE;
                for acc in 0..4 {
                    amx::zero(acc);
                }
                for ib in 0..kb {
                    let x = |r: usize| input[r * width + ib * DEPTH..].as_ptr();
                    amx::load(4, x(row), width * 2);
                    if two_rows {
                        amx::load(5, x(row + TILE), width * 2);
                    }
                    amx::load(6, wc[ib * tile_values..].as_ptr(), DEPTH * 2);
                    if two_blocks {
                        amx::load(7, wd[ib * tile_values..].as_ptr(), DEPTH * 2);
                    }
                    amx::multiply_add(0, 4, 6);
                    if two_blocks {
                        amx::multiply_add(1, 4, 7);
                    }
                    if two_rows {
                        amx::multiply_add(2, 5, 6);
                        if two_blocks {
                            amx::multiply_add(3, 5, 7);
                        }
                    }
                }
                let groups: &[(usize, usize, usize)] = match (two_rows, two_blocks) {
                    (true, true) => &[(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)],
                    (true, false) => &[(0, 0, 0), (2, 1, 0)],
                    (false, true) => &[(0, 0, 0), (1, 0, 1)],
                    (false, false) => &[(0, 0, 0)],
                };
                for &(acc, dr, db) in groups {
                    target.store(acc, row + dr * TILE, (ob + db) * TILE);
                }
                row += if two_rows { 2 * TILE } else { TILE };
            }
            ob += if two_blocks { 2 } else { 1 };
        }
        amx::release();
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn fill_blocks(&self, _: &[u16], _: usize, _: std::ops::Range<usize>, _: &Target) {
        unreachable!("AMX is x86-64 only; available() is false elsewhere")
    }
}

/// The rows `x [m, k]` in bf16, each padded with zeros to `width` (whole lines), and zero rows
/// up to a whole tile (a tile load reads 16 rows).
fn bf16_rows(x: &[f32], m: usize, k: usize, width: usize) -> Bf16Lines {
    Bf16Lines::from_rows(m.div_ceil(TILE) * TILE, width, |row, dst| {
        if let Some(src) = x.get(row * k..(row + 1) * k) {
            super::bf16_round::round_into(src, &mut dst[..k]);
        }
    })
}

/// The `[m, n]` f32 output the tasks of one product write, each its own output blocks.
struct Target {
    out: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: the tasks sharing a `Target` write disjoint columns (`fill_blocks`' contract).
unsafe impl Sync for Target {}

impl Target {
    /// Accumulator `acc` into rows `row..row + 16`, columns `col..col + 16` (those that exist).
    ///
    /// # Safety
    /// Tiles configured and the accumulator filled on this thread; no other thread writes
    /// these columns; `out` has room for whole tiles of rows (`m` rounded up to 16).
    #[cfg(target_arch = "x86_64")]
    unsafe fn store(&self, acc: usize, row: usize, col: usize) {
        let (rows, cols) = (TILE.min(self.m - row), TILE.min(self.n - col));
        // SAFETY: row < m and col < n, so the offset is inside `out`.
        let at = unsafe { self.out.add(row * self.n + col) };
        if cols == TILE {
            // SAFETY: 16 rows of 16 values at stride n lie inside `out`'s room for whole tiles
            // of rows; those past `m` are not outputs and no other task writes them.
            unsafe { amx::store(acc, at, self.n * 4) };
            return;
        }
        // On a line, as the tile loads (`Bf16Lines`): a store across lines took twice as long.
        #[repr(align(64))]
        struct Rows([f32; TILE * TILE]);
        let mut tile = std::mem::MaybeUninit::<Rows>::uninit();
        // SAFETY: a place of the uninitialised tile, not a read.
        let tile = unsafe { std::ptr::addr_of_mut!((*tile.as_mut_ptr()).0) }.cast::<f32>();
        // SAFETY: `tile` holds 16 rows of 16 values at stride 64 bytes; the store writes all.
        unsafe { amx::store(acc, tile, TILE * 4) };
        for r in 0..rows {
            // SAFETY: row + r < m and col + cols <= n; the tile's rows were written just above.
            unsafe { std::ptr::copy_nonoverlapping(tile.add(r * TILE), at.add(r * self.n), cols) };
        }
    }
}

/// The 64-byte operand of `ldtilecfg` (palette 1): tmm0–7 all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn new() -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            c.bytes_per_row[t] = (DEPTH * 2) as u16;
            c.rows[t] = TILE as u8;
        }
        c
    }
}

/// One AMX instruction each. Safety for all: the CPU has AMX and the tiles are configured
/// (`load_config`) on this thread; pointers cover 16 rows at the stated stride.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::TileConfig;
    use std::arch::asm;

    pub(super) unsafe fn load_config(c: &TileConfig) {
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) c, options(nostack, readonly));
        }
    }

    pub(super) unsafe fn release() {
        unsafe {
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Tile register `reg` (4–7) from 16 rows of 64 bytes, `stride` bytes apart.
    pub(super) unsafe fn load(reg: usize, p: *const u16, stride: usize) {
        macro_rules! load {
            ($t:literal) => {
                asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}]"), p = in(reg) p,
                     s = in(reg) stride, options(nostack, readonly))
            };
        }
        unsafe {
            match reg {
                4 => load!("4"),
                5 => load!("5"),
                6 => load!("6"),
                _ => load!("7"),
            }
        }
    }

    pub(super) unsafe fn zero(acc: usize) {
        unsafe {
            match acc {
                0 => asm!("tilezero tmm0", options(nostack, nomem)),
                1 => asm!("tilezero tmm1", options(nostack, nomem)),
                2 => asm!("tilezero tmm2", options(nostack, nomem)),
                _ => asm!("tilezero tmm3", options(nostack, nomem)),
            }
        }
    }

    /// Accumulator `acc` (0–3) += input tile `x` (4 or 5) · weight tile `w` (6 or 7), in the
    /// four pairings the 2 × 2 blocking uses.
    pub(super) unsafe fn multiply_add(acc: usize, x: usize, w: usize) {
        unsafe {
            match (acc, x, w) {
                (0, 4, 6) => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem)),
                (1, 4, 7) => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)),
                (2, 5, 6) => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem)),
                (3, 5, 7) => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem)),
                _ => unreachable!("tile pairing ({acc}, {x}, {w}) is not one of the blocking's"),
            }
        }
    }

    /// Accumulator `acc` to 16 rows of 16 f32 at `out`, `stride` bytes apart.
    pub(super) unsafe fn store(acc: usize, out: *mut f32, stride: usize) {
        macro_rules! store {
            ($t:literal) => {
                asm!(concat!("tilestored [{p} + {s}], tmm", $t), p = in(reg) out,
                     s = in(reg) stride, options(nostack))
            };
        }
        unsafe {
            match acc {
                0 => store!("0"),
                1 => store!("1"),
                2 => store!("2"),
                _ => store!("3"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::values;

    fn from_bf16(b: u16) -> f64 {
        half::bf16::from_bits(b).to_f64()
    }

    /// The product of the bf16-rounded operands in f64.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| from_bf16(to_bf16(x[i * k + t])) * from_bf16(to_bf16(w[j * k + t])))
                    .sum();
            }
        }
        y
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go to the even one.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
    }

    #[test]
    fn the_product_equals_the_product_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        // Shapes off the tile grid (outputs not a multiple of 16, inputs not of 32), row counts
        // below, at and past one and four accumulator tiles, and a parallel split.
        for &(m, n, k) in &[
            (1, 5, 7),
            (5, 48, 64),
            (16, 40, 96),
            (17, 300, 70),
            (40, 50, 64),
            (70, 33, 256),
            (3, 2100, 256),
            // Split across threads, an odd number of output blocks, rows past one 2 × 2 pass.
            (37, 1000, 96),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let (lined, start) = Bf16Tiles::pack(&w, n, k).matmul_on_lines(&x, m);
            let got = &lined[start..];
            assert_eq!(
                got.as_ptr() as usize % 64,
                0,
                "m {m} n {n} k {k}: outputs on a line"
            );
            assert_eq!(got.len(), m * n);
            let want = reference(&x, m, &w, n, k);
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                // f32 sums of exact products: off by a few f32 roundings of the partial sums.
                let scale: f64 = (0..k)
                    .map(|t| (x[(i / n) * k + t] * w[(i % n) * k + t]).abs() as f64)
                    .sum();
                assert!(
                    (g as f64 - r).abs() <= 1e-5 * scale.max(1e-6),
                    "m {m} n {n} k {k} at {i}: {g} vs {r}"
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_output_alone_as_in_a_batch() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX-BF16");
            return;
        }
        // The second product is split across threads in the batch, not for a row alone.
        for (n, k) in [(72, 96), (1000, 256)] {
            let tiles = Bf16Tiles::pack(&values(n * k, 3), n, k);
            let m = 37;
            let x = values(m * k, 4);
            let batch = tiles.matmul(&x, m);
            for i in 0..m {
                let alone = tiles.matmul(&x[i * k..(i + 1) * k], 1);
                assert_eq!(alone, batch[i * n..(i + 1) * n], "n {n}, row {i}");
            }
        }
    }
}
