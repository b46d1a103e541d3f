//! With the `cuda` feature, compiles every `cuda/*.cu` into a fat binary holding sm_90 and sm_80
//! machine code plus compute_80 PTX (so a newer GPU can JIT it), and generates `modules.rs`, which
//! embeds them. Without the feature nothing is compiled and no CUDA toolchain is needed.
//!
//! nvcc is found through `NVCC`, then `CUDA_HOME`/`CUDA_PATH`/`CUDA_ROOT`, then `PATH`
//! (`scripts/install-cuda-toolchain.sh` installs a pinned one from PyPI).

use std::{env, fs, path::PathBuf, process::Command};

const ARCH_FLAGS: &[&str] = &[
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_80,code=[sm_80,compute_80]",
];

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc();
    let mut sources: Vec<PathBuf> = fs::read_dir("cuda")
        .expect("kernels/cuda exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let mut modules = String::from("/// (module name, fat binary) for every `cuda/*.cu`.\n");
    modules.push_str("pub const MODULES: &[(&str, &[u8])] = &[\n");
    for src in &sources {
        let name = src.file_stem().unwrap().to_string_lossy().to_string();
        let fatbin = out_dir.join(format!("{name}.fatbin"));
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "--std=c++17", "-lineinfo"])
            .args(ARCH_FLAGS)
            .arg("-o")
            .arg(&fatbin)
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("could not run {nvcc:?}: {e}"));
        assert!(status.success(), "nvcc failed on {}", src.display());
        modules.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            fatbin.display().to_string()
        ));
    }
    modules.push_str("];\n");
    fs::write(out_dir.join("modules.rs"), modules).expect("write modules.rs");
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return p.into();
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = env::var_os(var) {
            let p = PathBuf::from(root).join("bin/nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
