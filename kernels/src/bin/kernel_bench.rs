//! Times every CUDA kernel (CUDA events, median of many launches) against its floor: the bytes
//! it must move over the copy bandwidth measured in the same run, and its FLOPs over a matrix
//! rate given with --matmul-tflops (gpu-check.sh measures it with PyTorch). Prints one table.
//!
//! Usage: sdlm-kernel-bench [--iters N] [--matmul-tflops X] [--fp32-tflops Y]

use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
use half::bf16;
use sdlm_kernels::cuda::{
    AttentionKernel, AttentionOptions, AttentionWorkspace, CudaElement, CudaKernels,
    DeviceRaggedBatch, SelectionOutputs, SplitPolicy,
};
use sdlm_kernels::reference::RopeTable;
use sdlm_kernels::{AttentionShape, Element, KernelError, RaggedBatch};

type Res<T> = Result<T, KernelError>;

struct Args {
    iters: usize,
    matmul_tflops: Option<f64>,
    fp32_tflops: Option<f64>,
    /// Run only this attention case (index into the case list): for profilers.
    profile_case: Option<usize>,
    /// The kernel `--profile-case` runs: `tc` (default), `tcn` or `tcn2`.
    profile_kernel: AttentionKernel,
}

fn parse_args() -> Args {
    let mut a = Args {
        iters: 30,
        matmul_tflops: None,
        fp32_tflops: None,
        profile_case: None,
        profile_kernel: AttentionKernel::TensorCores,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--iters" => a.iters = val.parse().unwrap_or(a.iters),
            "--matmul-tflops" => a.matmul_tflops = val.parse().ok(),
            "--fp32-tflops" => a.fp32_tflops = val.parse().ok(),
            "--profile-case" => a.profile_case = val.parse().ok(),
            "--profile-kernel" if val == "tcn" => {
                a.profile_kernel = AttentionKernel::TensorCoresNarrow
            }
            "--profile-kernel" if val == "tcn2" => {
                a.profile_kernel = AttentionKernel::TensorCoresNarrowPairs
            }
            "--profile-kernel" if val == "tc" => a.profile_kernel = AttentionKernel::TensorCores,
            other => {
                eprintln!("unknown argument {other} {val}; usage: sdlm-kernel-bench [--iters N] [--matmul-tflops X] [--fp32-tflops Y] [--profile-case I] [--profile-kernel tc|tcn|tcn2]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift): the benchmark needs non-zero data,
/// not statistical quality.
fn random<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// Median milliseconds of `iters` launches, each between two events, after warm-up.
fn time_ms(stream: &Arc<CudaStream>, iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..3 {
        f()?;
    }
    stream.synchronize()?;
    let ctx = stream.context();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(stream)?;
        f()?;
        end.record(stream)?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

struct Row {
    name: String,
    ms: f64,
    bytes: f64,
    flops: f64,
}

struct Ceilings {
    copy_gbs: f64,
    matmul_tflops: Option<f64>,
    fp32_tflops: Option<f64>,
}

fn print_table(rows: &[Row], c: &Ceilings) {
    println!(
        "{:<58} {:>9} {:>8} {:>7} {:>8} {:>9} {:>9}",
        "kernel", "median_us", "GB/s", "%copy", "TFLOP/s", "floor_us", "%floor"
    );
    for r in rows {
        let mem_floor = r.bytes / (c.copy_gbs * 1e9) * 1e3;
        let flop_floor = c
            .matmul_tflops
            .map(|t| r.flops / (t * 1e12) * 1e3)
            .unwrap_or(0.0);
        let floor = mem_floor.max(flop_floor);
        println!(
            "{:<58} {:>9.1} {:>8.0} {:>6.0}% {:>8.2} {:>9.1} {:>8.0}%",
            r.name,
            r.ms * 1e3,
            r.bytes / (r.ms * 1e-3) / 1e9,
            100.0 * mem_floor / r.ms,
            r.flops / (r.ms * 1e-3) / 1e12,
            floor * 1e3,
            100.0 * floor / r.ms
        );
    }
    println!(
        "ceilings: copy {:.0} GB/s (measured here, read+write); matrix {} TFLOP/s; fp32 {} TFLOP/s",
        c.copy_gbs,
        c.matmul_tflops.map_or("n/a".into(), |t| format!("{t:.0}")),
        c.fp32_tflops.map_or("n/a".into(), |t| format!("{t:.1}")),
    );
    println!(
        "%copy = bytes floor / time; floor = max(bytes / copy bandwidth, FLOPs / matrix rate)"
    );
}

fn copy_bandwidth(k: &CudaKernels, iters: usize) -> Res<f64> {
    let n = 1usize << 28; // 1 GiB of f32
    let s = k.stream();
    let src: CudaSlice<f32> = s.clone_htod(&random::<f32>(n, 1))?;
    let mut dst: CudaSlice<f32> = s.alloc_zeros(n)?;
    let ms = time_ms(s, iters.min(10), || Ok(s.memcpy_dtod(&src, &mut dst)?))?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9)
}

struct AttentionBench<'a> {
    label: &'a str,
    shape: AttentionShape,
    batch: usize,
    context: usize,
    query: usize,
}

fn attention<T: CudaElement>(
    k: &CudaKernels,
    b: &AttentionBench,
    kernel: AttentionKernel,
    iters: usize,
) -> Res<Row> {
    let sh = b.shape;
    let pages_per_seq = b.context.div_ceil(sh.page_size);
    let num_pages = pages_per_seq * b.batch;
    // Pages interleaved across sequences, as an allocator under load hands them out.
    let block_tables: Vec<i32> = (0..b.batch)
        .flat_map(|s| (0..pages_per_seq).map(move |p| (p * b.batch + s) as i32))
        .collect();
    let query_starts: Vec<i32> = (0..=b.batch).map(|s| (s * b.query) as i32).collect();
    let context_lens = vec![b.context as i32; b.batch];
    let query_blocks = vec![b.query as i32; b.batch];
    let batch = RaggedBatch {
        query_starts: &query_starts,
        context_lens: &context_lens,
        query_blocks: &query_blocks,
        block_tables: &block_tables,
        max_pages_per_seq: pages_per_seq,
    };
    let s = k.stream();
    let dbatch = DeviceRaggedBatch::upload(k, &sh, &batch, num_pages)?;
    let tokens = b.batch * b.query;
    let (h, kvh, d) = (sh.num_heads, sh.num_kv_heads, sh.head_dim);
    let q: CudaSlice<T> = s.clone_htod(&random::<T>(tokens * h * d, 2))?;
    let kn: CudaSlice<T> = s.clone_htod(&random::<T>(tokens * kvh * d, 3))?;
    let vn: CudaSlice<T> = s.clone_htod(&random::<T>(tokens * kvh * d, 4))?;
    let kp: CudaSlice<T> = s.clone_htod(&random::<T>(num_pages * sh.page_elems(), 5))?;
    let vp: CudaSlice<T> = s.clone_htod(&random::<T>(num_pages * sh.page_elems(), 6))?;
    let mut out: CudaSlice<T> = s.alloc_zeros(tokens * h * d)?;
    let mut ws = AttentionWorkspace::default();
    let scale = 1.0 / (d as f32).sqrt();
    let ms = time_ms(s, iters, || {
        k.paged_attention(
            &dbatch,
            &q,
            &kn,
            &vn,
            &kp,
            &vp,
            scale,
            &mut out,
            &mut ws,
            AttentionOptions {
                splits: SplitPolicy::Auto,
                kernel,
            },
        )
    })?;
    let e = std::mem::size_of::<T>() as f64;
    let keys = (b.context + b.query) as f64;
    let bytes = e * (b.batch as f64 * keys * (2 * kvh * d) as f64 + 2.0 * (tokens * h * d) as f64);
    let flops = 4.0 * tokens as f64 * h as f64 * keys * d as f64;
    Ok(Row {
        name: format!(
            "attention {} {} {} b{} ctx{} q{} h{}/{} d{}",
            match kernel {
                AttentionKernel::TensorCores => "tc",
                AttentionKernel::TensorCoresNarrow => "tcn",
                AttentionKernel::TensorCoresNarrowPairs => "tcn2",
                AttentionKernel::CudaCores => "cc",
                AttentionKernel::Auto => "auto",
            },
            T::NAME,
            b.label,
            b.batch,
            b.context,
            b.query,
            h,
            kvh,
            d
        ),
        ms,
        bytes,
        flops,
    })
}

fn rmsnorm(k: &CudaKernels, iters: usize) -> Res<Row> {
    let (rows, hidden) = (32_768, 896);
    let s = k.stream();
    let x: CudaSlice<bf16> = s.clone_htod(&random::<bf16>(rows * hidden, 7))?;
    let mut r: CudaSlice<bf16> = s.clone_htod(&random::<bf16>(rows * hidden, 8))?;
    let w: CudaSlice<bf16> = s.clone_htod(&random::<bf16>(hidden, 9))?;
    let mut out: CudaSlice<bf16> = s.alloc_zeros(rows * hidden)?;
    let ms = time_ms(s, iters, || {
        k.residual_rmsnorm(hidden, &x, &mut r, &w, 1e-6, &mut out)
    })?;
    Ok(Row {
        name: format!("residual_rmsnorm bf16 rows{rows} hidden{hidden}"),
        ms,
        bytes: 4.0 * 2.0 * (rows * hidden) as f64,
        flops: 0.0,
    })
}

fn rope(k: &CudaKernels, iters: usize) -> Res<Row> {
    let (tokens, heads, d) = (32_768, 14, 64);
    let s = k.stream();
    let mut x: CudaSlice<bf16> = s.clone_htod(&random::<bf16>(tokens * heads * d, 10))?;
    let positions: Vec<i32> = (0..tokens as i32).map(|t| t % 4096).collect();
    let p = s.clone_htod(&positions)?;
    let table = k.upload_rope_table(&RopeTable::new(d, 1_000_000.0, 4096))?;
    let ms = time_ms(s, iters, || k.rope_inplace(&mut x, &p, &table, heads))?;
    Ok(Row {
        name: format!("rope bf16 tokens{tokens} heads{heads} d{d}"),
        ms,
        bytes: 2.0 * 2.0 * (tokens * heads * d) as f64,
        flops: 0.0,
    })
}

fn kv_scatter(k: &CudaKernels, iters: usize) -> Res<Row> {
    let (tokens, row) = (131_072, 2 * 64);
    let s = k.stream();
    let kb: CudaSlice<bf16> = s.clone_htod(&random::<bf16>(tokens * row, 11))?;
    let vb: CudaSlice<bf16> = s.clone_htod(&random::<bf16>(tokens * row, 12))?;
    let mut kp: CudaSlice<bf16> = s.alloc_zeros(tokens * row)?;
    let mut vp: CudaSlice<bf16> = s.alloc_zeros(tokens * row)?;
    // Slots in a scattered order, as pages from a free list are.
    let slots: Vec<i32> = (0..tokens as i32)
        .map(|t| (t * 7919) % tokens as i32)
        .collect();
    let sl = s.clone_htod(&slots)?;
    let ms = time_ms(s, iters, || {
        k.kv_scatter(row, &kb, &vb, &sl, &mut kp, &mut vp)
    })?;
    Ok(Row {
        name: format!("kv_scatter bf16 tokens{tokens} row{row}"),
        ms,
        bytes: 2.0 * 2.0 * 2.0 * (tokens * row) as f64,
        flops: 0.0,
    })
}

fn confidence<T: CudaElement>(k: &CudaKernels, iters: usize) -> Res<Row> {
    let (rows, vocab) = (512, 151_936);
    let s = k.stream();
    let logits: CudaSlice<T> = s.clone_htod(&random::<T>(rows * vocab, 13))?;
    let mut outs = SelectionOutputs::new(k, rows)?;
    let ms = time_ms(s, iters, || {
        k.row_confidence(&logits, vocab, 0.0, &mut outs)
    })?;
    let e = std::mem::size_of::<T>() as f64;
    Ok(Row {
        name: format!("row_confidence {} rows{rows} vocab{vocab}", T::NAME),
        ms,
        bytes: e * (rows * vocab) as f64,
        flops: 0.0,
    })
}

fn select(k: &CudaKernels, iters: usize) -> Res<Row> {
    let (blocks, block) = (16usize, 32usize);
    let rows = blocks * block;
    let s = k.stream();
    let mut outs = SelectionOutputs::new(k, rows)?;
    s.memcpy_htod(
        &random::<f32>(rows, 14)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
        &mut outs.confidence,
    )?;
    let masked = s.clone_htod(&vec![1u8; rows])?;
    let starts: Vec<i32> = (0..=blocks).map(|b| (b * block) as i32).collect();
    let mins = vec![4i32; blocks];
    let ms = time_ms(s, iters, || {
        k.select_unmask(&masked, &starts, &mins, 0.9, &mut outs)
    })?;
    Ok(Row {
        name: format!("select_unmask blocks{blocks}x{block} (latency; includes 2 small uploads)"),
        ms,
        bytes: 0.0,
        flops: 0.0,
    })
}

fn main() -> Res<()> {
    let args = parse_args();
    let k = CudaKernels::on_device(0)?;
    let iters = args.iters;
    let ceilings = Ceilings {
        copy_gbs: copy_bandwidth(&k, iters)?,
        matmul_tflops: args.matmul_tflops,
        fp32_tflops: args.fp32_tflops,
    };
    let qwen2 = AttentionShape {
        num_heads: 14,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
    };
    let qwen3 = AttentionShape {
        num_heads: 16,
        num_kv_heads: 8,
        head_dim: 128,
        page_size: 16,
    };
    let cases = [
        AttentionBench {
            label: "AR",
            shape: qwen2,
            batch: 16,
            context: 16_384,
            query: 1,
        },
        AttentionBench {
            label: "AR",
            shape: qwen2,
            batch: 64,
            context: 4_096,
            query: 1,
        },
        AttentionBench {
            label: "diffusion",
            shape: qwen2,
            batch: 16,
            context: 8_192,
            query: 32,
        },
        AttentionBench {
            label: "diffusion",
            shape: qwen2,
            batch: 16,
            context: 16_384,
            query: 32,
        },
        AttentionBench {
            label: "diffusion",
            shape: qwen2,
            batch: 64,
            context: 4_096,
            query: 8,
        },
        AttentionBench {
            label: "AR",
            shape: qwen3,
            batch: 16,
            context: 4_096,
            query: 1,
        },
        AttentionBench {
            label: "diffusion",
            shape: qwen3,
            batch: 16,
            context: 4_096,
            query: 32,
        },
        // The first case's bytes and per-CTA work with one kv head: each key's K row is 128
        // contiguous bytes instead of 128 of every 256 (the other kv head's row sits between).
        // Against the first case it says whether that layout, not the arithmetic, holds the d64
        // kernels under the copy floor.
        AttentionBench {
            label: "AR one-kv-head",
            shape: AttentionShape {
                num_heads: 7,
                num_kv_heads: 1,
                ..qwen2
            },
            batch: 32,
            context: 16_384,
            query: 1,
        },
    ];
    let mut rows = Vec::new();
    if let Some(i) = args.profile_case {
        let c = cases.get(i).unwrap_or(&cases[0]);
        let row = attention::<bf16>(&k, c, args.profile_kernel, iters)?;
        print_table(&[row], &ceilings);
        return Ok(());
    }
    let mut speedups = Vec::new();
    let mut narrow = Vec::new();
    for c in &cases {
        let tc = attention::<bf16>(&k, c, AttentionKernel::TensorCores, iters)?;
        let cc = attention::<bf16>(&k, c, AttentionKernel::CudaCores, iters)?;
        speedups.push(format!("{:.2}x  {}", cc.ms / tc.ms, tc.name));
        // The narrow kernels where their 8 columns hold every query row of a kv head.
        if c.query * c.shape.group() <= 8 {
            let tcn = attention::<bf16>(&k, c, AttentionKernel::TensorCoresNarrow, iters)?;
            narrow.push(format!("{:.2}x  {}", tc.ms / tcn.ms, tcn.name));
            rows.push(tcn);
            if c.shape.num_kv_heads.is_multiple_of(2) {
                let pairs =
                    attention::<bf16>(&k, c, AttentionKernel::TensorCoresNarrowPairs, iters)?;
                narrow.push(format!("{:.2}x  {}", tc.ms / pairs.ms, pairs.name));
                rows.push(pairs);
            }
        }
        rows.push(tc);
        rows.push(cc);
    }
    rows.push(attention::<f32>(
        &k,
        &cases[0],
        AttentionKernel::CudaCores,
        iters,
    )?);
    rows.push(rmsnorm(&k, iters)?);
    rows.push(rope(&k, iters)?);
    rows.push(kv_scatter(&k, iters)?);
    rows.push(confidence::<bf16>(&k, iters)?);
    rows.push(confidence::<f32>(&k, iters)?);
    rows.push(select(&k, iters)?);
    print_table(&rows, &ceilings);
    println!("tensor-core kernel speed-up over the CUDA-core kernel (same run, same inputs):");
    for line in &speedups {
        println!("  {line}");
    }
    println!(
        "narrow tensor-core kernel speed-up over the tensor-core kernel (same run, same inputs):"
    );
    for line in &narrow {
        println!("  {line}");
    }
    Ok(())
}
