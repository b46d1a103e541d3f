//! Opening a model directory: config.json, and safetensors weights in one file or in shards
//! named by model.safetensors.index.json. Every failure names the file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::{load_gguf_model, GgufFile};
use crate::gguf_tokenizer::tokenizer_from_gguf;
use crate::model::{ComputeDtype, Model};
use crate::tokenizer::load_tokenizer;

/// The safetensors files of a model directory, in a stable order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(EngineError::file(
            dir,
            "has neither model.safetensors nor model.safetensors.index.json",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| EngineError::file(&index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| EngineError::file(&index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| EngineError::file(&index, "has no \"weight_map\" object"))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let name = file.as_str().ok_or_else(|| {
            EngineError::file(&index, format!("weight_map[{tensor:?}] is not a file name"))
        })?;
        if name.contains('/') || name.contains("..") {
            return Err(EngineError::file(
                &index,
                format!("shard name {name:?} leaves the model directory"),
            ));
        }
        files.insert(dir.join(name));
    }
    Ok(files.into_iter().collect())
}

/// Loads config.json and the weights of `dir` onto `device` in `dtype`.
pub fn load_model(dir: &Path, device: &Device, dtype: DType) -> Result<Model> {
    if !dir.is_dir() {
        return Err(EngineError::file(dir, "is not a model directory"));
    }
    let config = ModelConfig::from_dir(dir)?;
    let files = safetensors_files(dir)?;
    // SAFETY (both blocks): the files are memory-mapped read-only; nothing in this process
    // writes them, and a model directory is not modified while it is served.
    for file in &files {
        // Opening parses the header and checks every tensor lies inside the file, so a
        // truncated download is reported here, by name.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }
            .map_err(|e| EngineError::file(file, e))?;
    }
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| EngineError::file(dir, e))?;
    let weights_name = if files.len() == 1 {
        files[0].clone()
    } else {
        dir.join("model.safetensors.index.json")
    };
    Model::new(&config, vb).map_err(|e| match e {
        EngineError::Candle(c) => EngineError::file(weights_name, c),
        other => other,
    })
}

/// A model and its tokenizer, from a directory (config.json, safetensors, tokenizer.json) or from
/// one `.gguf` file. Weights are computed in f32 on the CPU path (GGUF weights stay quantized).
pub fn open_model(path: &Path, device: &Device) -> Result<(Model, tokenizers::Tokenizer)> {
    open_model_in(path, device, ComputeDtype::F32)
}

/// [`open_model`] computing in `dtype` (bf16 and f16 on a GPU only; a GGUF file in f32 only).
pub fn open_model_in(
    path: &Path,
    device: &Device,
    dtype: ComputeDtype,
) -> Result<(Model, tokenizers::Tokenizer)> {
    dtype.check(device)?;
    if path.is_file() {
        if dtype != ComputeDtype::F32 {
            return Err(EngineError::Input(format!(
                "dtype {dtype} applies to a safetensors model directory; {} is a file (GGUF \
                 weights are dequantized to f32)",
                path.display()
            )));
        }
        if path.extension().is_some_and(|e| e == "gguf") {
            let file = GgufFile::open(path, device)?;
            return Ok((load_gguf_model(&file)?, tokenizer_from_gguf(&file)?));
        }
        return Err(EngineError::file(
            path,
            "is neither a model directory nor a .gguf file",
        ));
    }
    Ok((
        load_model(path, device, dtype.dtype())?,
        load_tokenizer(path)?,
    ))
}
