//! Every CUDA kernel against its CPU reference on fresh random inputs, for f32, bf16 and f16.
//! Outputs are poisoned (NaN) before each launch, so an element the kernel failed to write fails
//! the comparison. Tolerance: ‖gpu − ref‖ / ‖ref‖ ≤ 1e-5 (f32), ≤ 1e-3 (bf16, f16).
//! Needs a GPU: built with `--features cuda`, run by kernels/gpu-check.sh.
#![cfg(feature = "cuda")]

mod common;

use common::{rel_err, seq, AttentionCase, Seq};
use half::{bf16, f16};
use rand::Rng;
use sdlm_kernels::cuda::{
    AttentionKernel, AttentionOptions, AttentionWorkspace, CudaElement, CudaKernels,
    DeviceRaggedBatch, SelectionOutputs, SplitPolicy,
};
use sdlm_kernels::reference::{self, RopeTable};
use sdlm_kernels::AttentionShape;

fn kernels() -> CudaKernels {
    CudaKernels::on_device(0).expect("a CUDA device and the compiled kernels")
}

fn tolerance<T: CudaElement>() -> f64 {
    if std::mem::size_of::<T>() == 4 {
        1e-5
    } else {
        1e-3
    }
}

fn poisoned<T: CudaElement>(k: &CudaKernels, n: usize) -> cudarc::driver::CudaSlice<T> {
    k.stream()
        .clone_htod(&vec![T::from_f32(f32::NAN); n])
        .unwrap()
}

const QWEN2_05B: AttentionShape = AttentionShape {
    num_heads: 14,
    num_kv_heads: 2,
    head_dim: 64,
    page_size: 16,
};
const QWEN3_06B: AttentionShape = AttentionShape {
    num_heads: 16,
    num_kv_heads: 8,
    head_dim: 128,
    page_size: 16,
};
const SMOLLM2: AttentionShape = AttentionShape {
    num_heads: 9,
    num_kv_heads: 3,
    head_dim: 64,
    page_size: 8,
};

/// Causal prefill, a diffusion block, an AR step, block-causal blocks, a cold start.
const MIXED: &[Seq] = &[
    seq(0, 5, 1),
    seq(37, 32, 32),
    seq(100, 1, 1),
    seq(16, 20, 4),
    seq(300, 8, 8),
    seq(0, 16, 16),
];

fn attention_parity<T: CudaElement>(
    shape: AttentionShape,
    seqs: &[Seq],
    options: AttentionOptions,
) {
    let k = kernels();
    let mut rng = common::rng(&format!("attention {} {shape:?} {options:?}", T::NAME));
    let case = AttentionCase::<T>::random(&mut rng, shape, seqs);
    let want = case.reference();
    let s = k.stream();
    let batch = DeviceRaggedBatch::upload(&k, &shape, &case.batch(), case.num_pages).unwrap();
    let (q, kn, vn) = (
        s.clone_htod(&case.q).unwrap(),
        s.clone_htod(&case.k_new).unwrap(),
        s.clone_htod(&case.v_new).unwrap(),
    );
    let (kp, vp) = (
        s.clone_htod(&case.k_pages).unwrap(),
        s.clone_htod(&case.v_pages).unwrap(),
    );
    let mut ws = AttentionWorkspace::default();
    for run in 0..2 {
        let mut out = poisoned::<T>(&k, case.q.len());
        k.paged_attention(
            &batch, &q, &kn, &vn, &kp, &vp, case.scale, &mut out, &mut ws, options,
        )
        .unwrap();
        let got = s.clone_dtoh(&out).unwrap();
        let err = rel_err(&got, &want);
        assert!(
            err <= tolerance::<T>(),
            "{} {shape:?} {options:?} run {run}: relative error {err}",
            T::NAME
        );
    }
}

/// Every split policy, on each kernel that takes T (tensor cores need bf16/f16).
fn attention_all_splits<T: CudaElement>(shape: AttentionShape, seqs: &[Seq]) {
    let kernels: &[AttentionKernel] = if std::mem::size_of::<T>() == 4 {
        &[AttentionKernel::CudaCores]
    } else {
        &[
            AttentionKernel::TensorCores,
            AttentionKernel::TensorCoresNarrow,
            AttentionKernel::TensorCoresNarrowPairs,
            AttentionKernel::CudaCores,
        ]
    };
    // The paired kernel serves kv heads two at a time (SmolLM2's 3 are refused: a test below).
    let pairs_fit = shape.num_kv_heads.is_multiple_of(2);
    for &kernel in kernels {
        if kernel == AttentionKernel::TensorCoresNarrowPairs && !pairs_fit {
            continue;
        }
        for splits in [
            SplitPolicy::Auto,
            SplitPolicy::Fixed(1),
            SplitPolicy::Fixed(3),
        ] {
            attention_parity::<T>(shape, seqs, AttentionOptions { splits, kernel });
        }
    }
}

macro_rules! per_dtype {
    ($name:ident, $body:ident $(, $arg:expr)*) => {
        mod $name {
            use super::*;
            #[test] fn f32() { $body::<f32>($($arg),*) }
            #[test] fn bf16() { $body::<bf16>($($arg),*) }
            #[test] fn f16() { $body::<f16>($($arg),*) }
        }
    };
}

per_dtype!(
    attention_qwen2_shape,
    attention_all_splits,
    QWEN2_05B,
    MIXED
);
per_dtype!(
    attention_qwen3_shape,
    attention_all_splits,
    QWEN3_06B,
    MIXED
);
per_dtype!(
    attention_smollm2_shape,
    attention_all_splits,
    SMOLLM2,
    MIXED
);

fn attention_long_diffusion_batch<T: CudaElement>() {
    // 16 sequences with long contexts and 32-token blocks: several query tiles per (seq, kv
    // head) for GQA 7, and several key splits.
    let seqs: Vec<Seq> = (0..16).map(|i| seq(700 + 97 * i, 32, 32)).collect();
    attention_all_splits::<T>(QWEN2_05B, &seqs);
}
per_dtype!(attention_long_batch, attention_long_diffusion_batch);

fn attention_decode_batch<T: CudaElement>() {
    // What the narrow tensor-core kernel is for: few query rows per kv head over long contexts,
    // so the automatic policy splits the keys. AR steps with GQA 7; 4-token diffusion blocks
    // with GQA 2 (8 rows, a full mma column side).
    let ar: Vec<Seq> = (0..16).map(|i| seq(500 + 131 * i, 1, 1)).collect();
    attention_all_splits::<T>(QWEN2_05B, &ar);
    let blocks: Vec<Seq> = (0..8).map(|i| seq(300 + 257 * i, 4, 4)).collect();
    attention_all_splits::<T>(QWEN3_06B, &blocks);
}
per_dtype!(attention_decode_shapes, attention_decode_batch);

#[test]
fn paired_narrow_kernel_refuses_an_odd_number_of_kv_heads() {
    let k = kernels();
    let mut rng = common::rng("odd kv heads");
    let case = AttentionCase::<bf16>::random(&mut rng, SMOLLM2, &[seq(30, 1, 1)]);
    let s = k.stream();
    let batch = DeviceRaggedBatch::upload(&k, &SMOLLM2, &case.batch(), case.num_pages).unwrap();
    let q = s.clone_htod(&case.q).unwrap();
    let (kn, vn) = (
        s.clone_htod(&case.k_new).unwrap(),
        s.clone_htod(&case.v_new).unwrap(),
    );
    let (kp, vp) = (
        s.clone_htod(&case.k_pages).unwrap(),
        s.clone_htod(&case.v_pages).unwrap(),
    );
    let mut out = poisoned::<bf16>(&k, case.q.len());
    let options = AttentionOptions {
        kernel: AttentionKernel::TensorCoresNarrowPairs,
        ..Default::default()
    };
    let mut ws = AttentionWorkspace::default();
    let err = k
        .paged_attention(
            &batch, &q, &kn, &vn, &kp, &vp, case.scale, &mut out, &mut ws, options,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("num_kv_heads"), "{err}");
}

#[test]
fn attention_refuses_a_page_size_that_is_not_a_power_of_two() {
    let k = kernels();
    let mut rng = common::rng("page size");
    let shape = AttentionShape {
        page_size: 12,
        ..SMOLLM2
    };
    let case = AttentionCase::<f32>::random(&mut rng, shape, &[seq(30, 4, 4)]);
    let err = DeviceRaggedBatch::upload(&k, &shape, &case.batch(), case.num_pages)
        .err()
        .unwrap();
    assert!(err.to_string().contains("page_size"), "{err}");
}

fn kv_scatter_parity<T: CudaElement>() {
    let k = kernels();
    let mut rng = common::rng(&format!("kv_scatter {}", T::NAME));
    let (row, slots_total) = (2 * 64, 64);
    let mut k_pages: Vec<T> = common::random_vec(&mut rng, slots_total * row, 1.0);
    let mut v_pages: Vec<T> = common::random_vec(&mut rng, slots_total * row, 1.0);
    let mut slots: Vec<i32> = (0..slots_total as i32).collect();
    use rand::seq::SliceRandom;
    slots.shuffle(&mut rng);
    slots.truncate(20);
    slots[3] = -1;
    let kb: Vec<T> = common::random_vec(&mut rng, slots.len() * row, 1.0);
    let vb: Vec<T> = common::random_vec(&mut rng, slots.len() * row, 1.0);
    let s = k.stream();
    let (mut kp, mut vp) = (
        s.clone_htod(&k_pages).unwrap(),
        s.clone_htod(&v_pages).unwrap(),
    );
    let (kbd, vbd, sd) = (
        s.clone_htod(&kb).unwrap(),
        s.clone_htod(&vb).unwrap(),
        s.clone_htod(&slots).unwrap(),
    );
    k.kv_scatter(row, &kbd, &vbd, &sd, &mut kp, &mut vp)
        .unwrap();
    reference::kv_scatter(row, &kb, &vb, &slots, &mut k_pages, &mut v_pages).unwrap();
    let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&s.clone_dtoh(&kp).unwrap()), bits(&k_pages));
    assert_eq!(bits(&s.clone_dtoh(&vp).unwrap()), bits(&v_pages));
}
per_dtype!(kv_scatter, kv_scatter_parity);

fn rmsnorm_parity<T: CudaElement>() {
    let k = kernels();
    let mut rng = common::rng(&format!("rmsnorm {}", T::NAME));
    for (rows, hidden) in [(37, 896), (5, 4096), (3, 1024)] {
        let x: Vec<T> = common::random_vec(&mut rng, rows * hidden, 2.0);
        let r: Vec<T> = common::random_vec(&mut rng, rows * hidden, 2.0);
        let w: Vec<T> = common::random_vec(&mut rng, hidden, 1.0);
        let (mut r_ref, mut out_ref) = (r.clone(), vec![T::default(); rows * hidden]);
        reference::residual_rmsnorm(hidden, &x, &mut r_ref, &w, 1e-6, &mut out_ref).unwrap();
        let s = k.stream();
        let (xd, wd, mut rd) = (
            s.clone_htod(&x).unwrap(),
            s.clone_htod(&w).unwrap(),
            s.clone_htod(&r).unwrap(),
        );
        let mut out = poisoned::<T>(&k, rows * hidden);
        k.residual_rmsnorm(hidden, &xd, &mut rd, &wd, 1e-6, &mut out)
            .unwrap();
        let (e_out, e_res) = (
            rel_err(&s.clone_dtoh(&out).unwrap(), &out_ref),
            rel_err(&s.clone_dtoh(&rd).unwrap(), &r_ref),
        );
        assert!(
            e_out <= tolerance::<T>() && e_res <= tolerance::<T>(),
            "{rows}x{hidden}: out {e_out}, residual {e_res}"
        );
    }
}
per_dtype!(residual_rmsnorm, rmsnorm_parity);

fn rope_parity<T: CudaElement>() {
    let k = kernels();
    let mut rng = common::rng(&format!("rope {}", T::NAME));
    for (heads, d) in [(14, 64), (8, 128)] {
        let table = RopeTable::new(d, 1_000_000.0, 4096);
        let positions: Vec<i32> = (0..50).map(|_| rng.random_range(0..4096)).collect();
        let x: Vec<T> = common::random_vec(&mut rng, positions.len() * heads * d, 1.0);
        let mut want = x.clone();
        reference::rope_inplace(&mut want, &positions, &table, heads).unwrap();
        let s = k.stream();
        let (mut xd, pd) = (s.clone_htod(&x).unwrap(), s.clone_htod(&positions).unwrap());
        let td = k.upload_rope_table(&table).unwrap();
        k.rope_inplace(&mut xd, &pd, &td, heads).unwrap();
        let err = rel_err(&s.clone_dtoh(&xd).unwrap(), &want);
        assert!(
            err <= tolerance::<T>(),
            "heads {heads} d {d}: relative error {err}"
        );
    }
}
per_dtype!(rope, rope_parity);

fn confidence_parity<T: CudaElement>() {
    let k = kernels();
    let mut rng = common::rng(&format!("confidence {}", T::NAME));
    // Qwen2.5's vocabulary, our own model's, and one that is not a multiple of the vector width.
    for (rows, vocab) in [(40, 151_936), (64, 8192), (9, 1001)] {
        let mut logits: Vec<T> = common::random_vec(&mut rng, rows * vocab, 8.0);
        // A banned token (the mask token's logit is forced to -inf) at the start of each row.
        logits
            .iter_mut()
            .step_by(vocab)
            .for_each(|x| *x = T::from_f32(f32::NEG_INFINITY));
        let d_logits = k.stream().clone_htod(&logits).unwrap();
        for temperature in [0.0f32, 0.7] {
            let want = reference::row_confidence(&logits, vocab, temperature).unwrap();
            let mut outs = SelectionOutputs::new(&k, rows).unwrap();
            k.stream()
                .memcpy_htod(&vec![-7i32; rows], &mut outs.tokens)
                .unwrap();
            k.stream()
                .memcpy_htod(&vec![f32::NAN; rows], &mut outs.confidence)
                .unwrap();
            k.row_confidence(&d_logits, vocab, temperature, &mut outs)
                .unwrap();
            let tokens = k.stream().clone_dtoh(&outs.tokens).unwrap();
            let conf = k.stream().clone_dtoh(&outs.confidence).unwrap();
            for r in 0..rows {
                assert_eq!(
                    tokens[r], want[r].token,
                    "row {r} of {vocab}, T {temperature}"
                );
                let e = ((conf[r] - want[r].confidence) / want[r].confidence).abs() as f64;
                assert!(
                    e <= 1e-5,
                    "row {r} of {vocab}, T {temperature}: confidence {} vs {}",
                    conf[r],
                    want[r].confidence
                );
            }
        }
    }
}
per_dtype!(row_confidence, confidence_parity);

#[test]
fn select_unmask_parity() {
    let k = kernels();
    let mut rng = common::rng("select_unmask");
    for _ in 0..20 {
        let sizes: Vec<i32> = (0..12).map(|_| rng.random_range(0..300)).collect();
        let mut starts = vec![0i32];
        for n in &sizes {
            starts.push(starts.last().unwrap() + n);
        }
        let rows = *starts.last().unwrap() as usize;
        let conf: Vec<f32> = (0..rows)
            .map(|_| rng.random_range(0..64) as f32 / 64.0)
            .collect();
        let masked: Vec<bool> = (0..rows).map(|_| rng.random_bool(0.6)).collect();
        let mins: Vec<i32> = (0..sizes.len()).map(|_| rng.random_range(0..40)).collect();
        let want = reference::select_unmask(&conf, &masked, &starts, &mins, 0.9).unwrap();
        let mut outs = SelectionOutputs::new(&k, rows).unwrap();
        let s = k.stream();
        s.memcpy_htod(&conf, &mut outs.confidence).unwrap();
        s.memcpy_htod(&vec![0xAAu8; rows.max(1)], &mut outs.unmask)
            .unwrap();
        let m = s
            .clone_htod(&masked.iter().map(|&b| b as u8).collect::<Vec<_>>())
            .unwrap();
        k.select_unmask(&m, &starts, &mins, 0.9, &mut outs).unwrap();
        let got: Vec<bool> = s.clone_dtoh(&outs.unmask).unwrap()[..rows]
            .iter()
            .map(|&b| {
                assert!(b <= 1, "unwritten unmask flag");
                b == 1
            })
            .collect();
        assert_eq!(got, want);
    }
}
