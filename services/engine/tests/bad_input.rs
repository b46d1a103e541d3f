//! A broken model directory gives one clear error that names the file and the problem.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::fixture;
use sdlm_engine::{load_model, DType, Device};

/// A private copy of a fixture to break.
fn copy_of(name: &str, test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdlm-bad-input-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match load_model(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => {
            eprintln!("error: {e}");
            e.to_string()
        }
    }
}

#[test]
fn missing_directory_is_named() {
    let err = load_error(Path::new("/nonexistent/model"));
    assert!(
        err.contains("/nonexistent/model") && err.contains("not a model directory"),
        "{err}"
    );
}

#[test]
fn unknown_model_type_is_named_with_the_choices() {
    let dir = copy_of("qwen2-tied-bf16", "model-type");
    let config = fs::read_to_string(dir.join("config.json")).unwrap();
    fs::write(
        dir.join("config.json"),
        config.replace("\"qwen2\"", "\"gpt2\""),
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("\"gpt2\""),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_of("qwen2-tied-bf16", "truncated");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn tensor_of_the_wrong_shape_names_the_tensor_and_the_file() {
    let dir = copy_of("qwen3-headdim-f16", "shape");
    let config = fs::read_to_string(dir.join("config.json")).unwrap();
    fs::write(
        dir.join("config.json"),
        config.replace("\"intermediate_size\": 64", "\"intermediate_size\": 48"),
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("mlp") && err.contains("48"),
        "{err}"
    );
}

#[test]
fn missing_shard_names_the_shard() {
    let dir = copy_of("llama-sharded-f32", "shard");
    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}
