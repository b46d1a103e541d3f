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
//! `asm!` with fixed registers (tmm0–3 the accumulators of up to four 16-row groups, tmm4 the
//! weight tile, tmm5 the input tile); the compiler never uses them, so they keep their values
//! from one statement to the next.

use super::row_tasks::by_weight_rows;

/// Outputs per weight tile, and input rows per accumulator tile.
const TILE: usize = 16;
/// Inputs per tile (16 pairs of bf16: 64 bytes, a tile row).
const DEPTH: usize = 32;
/// Input rows one pass over the weights takes: four accumulator tiles.
const ROWS_PER_PASS: usize = 4 * TILE;
/// Outputs per task: a multiple of [`TILE`]; at 256 inputs, 128 KB of bf16 weights.
const OUTPUTS_PER_TASK: usize = 256;
/// Weight bytes from which a product is split across threads (the shipped model's LM head, not
/// its 128–360 KB layer weights): on the 2-core machine, 32 KB, 128 KB and 512 KB gave the same
/// decoding speed within the runs' spread, and fewer splits wake the other thread less often.
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
    /// (a task reads its outputs' tiles front to back); each `TILE × DEPTH` values.
    tiles: Vec<u16>,
}

impl Bf16Tiles {
    /// Packs `w [n, k]` (row-major f32).
    pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> Self {
        debug_assert_eq!(w.len(), n * k);
        let (nb, kb) = (n.div_ceil(TILE), k.div_ceil(DEPTH));
        let mut tiles = vec![0u16; nb * kb * TILE * DEPTH];
        for (t, tile) in tiles.chunks_mut(TILE * DEPTH).enumerate() {
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
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert!(available(), "AMX-BF16 matmul on a CPU without it");
        debug_assert_eq!(x.len(), m * self.k);
        let kb = self.k.div_ceil(DEPTH);
        let width = kb * DEPTH;
        // The input rows in bf16, padded with zeros to whole tiles (rows and inputs).
        let mut input = vec![0u16; m.div_ceil(TILE) * TILE * width];
        for (dst, src) in input.chunks_mut(width).zip(x.chunks(self.k)) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = to_bf16(s);
            }
        }
        let parallel = self.tiles.len() * 2 >= PARALLEL_FROM_BYTES;
        by_weight_rows(
            m,
            self.n,
            OUTPUTS_PER_TASK,
            parallel,
            |first, count, strip| {
                // SAFETY: `available()` held above: the CPU has AMX and the OS granted its state.
                unsafe { self.fill_strip(&input, m, width, first, count, strip) }
            },
        )
    }

    /// Outputs `first..first + count` for every input row, into `strip [m, count]`.
    ///
    /// # Safety
    /// Only where [`available`] is true.
    #[cfg(target_arch = "x86_64")]
    unsafe fn fill_strip(
        &self,
        input: &[u16],
        m: usize,
        width: usize,
        first: usize,
        count: usize,
        strip: &mut [f32],
    ) {
        let kb = width / DEPTH;
        let config = TileConfig::new();
        amx::load_config(&config);
        let mut out = [0f32; TILE * TILE];
        for pass in (0..m).step_by(ROWS_PER_PASS) {
            let groups = (m - pass).div_ceil(TILE).min(ROWS_PER_PASS / TILE);
            for ob in (first / TILE)..(first + count).div_ceil(TILE) {
                for g in 0..groups {
                    amx::zero(g);
                }
                for ib in 0..kb {
                    let tile = &self.tiles[(ob * kb + ib) * TILE * DEPTH..][..TILE * DEPTH];
                    amx::load_weights(tile.as_ptr());
                    for g in 0..groups {
                        let rows = &input[(pass + g * TILE) * width + ib * DEPTH..];
                        amx::load_inputs(rows.as_ptr(), width * 2);
                        amx::multiply_add(g);
                    }
                }
                let col = ob * TILE - first;
                let cols = TILE.min(count - col);
                for g in 0..groups {
                    amx::store(g, out.as_mut_ptr());
                    let row0 = pass + g * TILE;
                    for r in 0..TILE.min(m - row0) {
                        strip[(row0 + r) * count + col..][..cols]
                            .copy_from_slice(&out[r * TILE..r * TILE + cols]);
                    }
                }
            }
        }
        amx::release();
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn fill_strip(&self, _: &[u16], _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("AMX is x86-64 only; available() is false elsewhere")
    }
}

/// The 64-byte operand of `ldtilecfg` (palette 1): tmm0–5 all 16 rows of 64 bytes.
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
        for t in 0..6 {
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
    use super::{TileConfig, DEPTH, TILE};
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

    /// The weight tile (tmm4): 16 rows of 64 bytes, contiguous.
    pub(super) unsafe fn load_weights(p: *const u16) {
        unsafe {
            asm!("tileloadd tmm4, [{p} + {s}]", p = in(reg) p, s = in(reg) DEPTH * 2,
                 options(nostack, readonly));
        }
    }

    /// The input tile (tmm5): 16 rows of 32 bf16, `stride` bytes apart.
    pub(super) unsafe fn load_inputs(p: *const u16, stride: usize) {
        unsafe {
            asm!("tileloadd tmm5, [{p} + {s}]", p = in(reg) p, s = in(reg) stride,
                 options(nostack, readonly));
        }
    }

    pub(super) unsafe fn zero(group: usize) {
        unsafe {
            match group {
                0 => asm!("tilezero tmm0", options(nostack, nomem)),
                1 => asm!("tilezero tmm1", options(nostack, nomem)),
                2 => asm!("tilezero tmm2", options(nostack, nomem)),
                _ => asm!("tilezero tmm3", options(nostack, nomem)),
            }
        }
    }

    /// Accumulator `group` += input tile · weight tile.
    pub(super) unsafe fn multiply_add(group: usize) {
        unsafe {
            match group {
                0 => asm!("tdpbf16ps tmm0, tmm5, tmm4", options(nostack, nomem)),
                1 => asm!("tdpbf16ps tmm1, tmm5, tmm4", options(nostack, nomem)),
                2 => asm!("tdpbf16ps tmm2, tmm5, tmm4", options(nostack, nomem)),
                _ => asm!("tdpbf16ps tmm3, tmm5, tmm4", options(nostack, nomem)),
            }
        }
    }

    /// Accumulator `group` to `out [16, 16]` f32.
    pub(super) unsafe fn store(group: usize, out: *mut f32) {
        unsafe {
            let s = TILE * 4;
            match group {
                0 => {
                    asm!("tilestored [{p} + {s}], tmm0", p = in(reg) out, s = in(reg) s, options(nostack))
                }
                1 => {
                    asm!("tilestored [{p} + {s}], tmm1", p = in(reg) out, s = in(reg) s, options(nostack))
                }
                2 => {
                    asm!("tilestored [{p} + {s}], tmm2", p = in(reg) out, s = in(reg) s, options(nostack))
                }
                _ => {
                    asm!("tilestored [{p} + {s}], tmm3", p = in(reg) out, s = in(reg) s, options(nostack))
                }
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
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let got = Bf16Tiles::pack(&w, n, k).matmul(&x, m);
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
        let (n, k) = (72, 96);
        let tiles = Bf16Tiles::pack(&values(n * k, 3), n, k);
        let m = 37;
        let x = values(m * k, 4);
        let batch = tiles.matmul(&x, m);
        for i in 0..m {
            let alone = tiles.matmul(&x[i * k..(i + 1) * k], 1);
            assert_eq!(alone, batch[i * n..(i + 1) * n], "row {i}");
        }
    }
}
