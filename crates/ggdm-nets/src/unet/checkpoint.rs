//! Reading and writing `UNet2DModel` weights in diffusers' layout: strict, by-name loading of a
//! `.safetensors` state dict into a `VarStore` (every error names the file and the key), and
//! atomic file writes (temporary file in the same directory, fsync, rename).

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// diffusers' model config file name.
pub const CONFIG_FILE: &str = "config.json";
/// diffusers' safetensors weight file name.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// diffusers' half-precision variant of [`WEIGHTS_FILE`] (used when the full one is absent).
pub const WEIGHTS_FILE_FP16: &str = "diffusion_pytorch_model.fp16.safetensors";
/// diffusers' pickled weight file name (not read; converting it is explained in the error).
pub const WEIGHTS_FILE_PICKLE: &str = "diffusion_pytorch_model.bin";

/// What a model directory must hold, for error messages.
pub(crate) const LAYOUT_HINT: &str = "a diffusers UNet2DModel directory holds `config.json` and \
     `diffusion_pytorch_model.safetensors` (the `unet/` folder of a pipeline, or the top level of \
     e.g. google/ddpm-cifar10-32)";

/// How to turn a pickled `.bin` into safetensors, for error messages.
pub(crate) const CONVERT_HINT: &str = "convert it with safetensors' `save_file`: python -c \
     \"import torch; from safetensors.torch import save_file; \
     save_file(torch.load('diffusion_pytorch_model.bin', map_location='cpu'), \
     'diffusion_pytorch_model.safetensors')\"";

pub(crate) fn not_found(path: &Path, msg: String) -> Error {
    Error::io(path, std::io::Error::new(ErrorKind::NotFound, msg))
}

/// The directory that holds `config.json`: `dir` itself, or `dir/unet` for a pipeline folder.
pub(crate) fn resolve_model_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.exists() {
        return Err(not_found(dir, format!("model directory does not exist; {LAYOUT_HINT}")));
    }
    if !dir.is_dir() {
        return Err(Error::format(dir, format!("not a directory; {LAYOUT_HINT}")));
    }
    if dir.join(CONFIG_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let pipeline_unet = dir.join("unet");
    if pipeline_unet.join(CONFIG_FILE).is_file() {
        return Ok(pipeline_unet);
    }
    Err(not_found(&dir.join(CONFIG_FILE), format!("missing {CONFIG_FILE}; {LAYOUT_HINT}")))
}

/// The weight file of a model directory (the fp16 variant only when the full one is absent).
pub(crate) fn resolve_weights_file(dir: &Path) -> Result<PathBuf> {
    let weights = dir.join(WEIGHTS_FILE);
    if weights.is_file() {
        return Ok(weights);
    }
    let fp16 = dir.join(WEIGHTS_FILE_FP16);
    if fp16.is_file() {
        return Ok(fp16);
    }
    if dir.join(WEIGHTS_FILE_PICKLE).is_file() {
        return Err(not_found(
            &weights,
            format!(
                "missing {WEIGHTS_FILE}; the directory has {WEIGHTS_FILE_PICKLE}, which is not \
                 read: {CONVERT_HINT}"
            ),
        ));
    }
    Err(not_found(&weights, format!("missing {WEIGHTS_FILE}; put the model weights there ({LAYOUT_HINT})")))
}

/// Reads every tensor of a safetensors file; a truncated or malformed file is an error naming it.
pub(crate) fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Tensor::read_safetensors(path)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file (truncated or corrupt?): {e}")))
}

/// The current name of a parameter saved under diffusers' deprecated attention names
/// (`query`, `key`, `value`, `proj_attn` inside an `attentions.<i>` block), as older checkpoints
/// such as google/ddpm-cifar10-32 store them; `None` for every other key.
fn current_attention_key(key: &str) -> Option<String> {
    let parts: Vec<&str> = key.split('.').collect();
    let n = parts.len();
    if n < 4 || parts[n - 4] != "attentions" || parts[n - 3].parse::<usize>().is_err() {
        return None;
    }
    if parts[n - 1] != "weight" && parts[n - 1] != "bias" {
        return None;
    }
    let renamed = match parts[n - 2] {
        "query" => "to_q",
        "key" => "to_k",
        "value" => "to_v",
        "proj_attn" => "to_out.0",
        _ => return None,
    };
    Some(format!("{}.{renamed}.{}", parts[..n - 2].join("."), parts[n - 1]))
}

fn list_more(keys: &[&String]) -> String {
    match keys.len() {
        0 | 1 => String::new(),
        n => {
            let shown: Vec<String> = keys[1..n.min(4)].iter().map(|k| format!("`{k}`")).collect();
            format!(" (and {} more: {}{})", n - 1, shown.join(", "), if n > 4 { ", ..." } else { "" })
        }
    }
}

/// Copies `tensors` into the variables of `var_store` by name. Strict: a missing key, an
/// unexpected key, a shape mismatch or a non-float dtype is an error naming the key (and both
/// shapes). f16/bf16/f64 tensors are converted to the variables' kind.
pub(crate) fn load_into(var_store: &VarStore, tensors: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
    let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
    for (key, tensor) in tensors {
        let name = current_attention_key(&key).unwrap_or(key.clone());
        if by_name.insert(name.clone(), tensor).is_some() {
            return Err(Error::format(
                path,
                format!("key `{name}` appears twice (once under its deprecated attention name `{key}`)"),
            ));
        }
    }
    let mut variables: BTreeMap<String, Tensor> = var_store.variables().into_iter().collect();
    let missing: Vec<&String> = variables.keys().filter(|k| !by_name.contains_key(*k)).collect();
    if let Some(first) = missing.first() {
        return Err(Error::format(
            path,
            format!("missing key `{first}`{}: the network described by config.json needs it", list_more(&missing)),
        ));
    }
    let unexpected: Vec<&String> = by_name.keys().filter(|k| !variables.contains_key(*k)).collect();
    if let Some(first) = unexpected.first() {
        return Err(Error::format(
            path,
            format!(
                "unexpected key `{first}`{}: not a parameter of the network described by config.json",
                list_more(&unexpected)
            ),
        ));
    }
    for (name, source) in &by_name {
        let Some(variable) = variables.get_mut(name) else {
            continue;
        };
        if !matches!(source.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            return Err(Error::format(
                path,
                format!("key `{name}` has dtype {:?}; expected a floating-point tensor", source.kind()),
            ));
        }
        if source.size() != variable.size() {
            return Err(Error::Shape {
                what: format!("`{name}` in {}", path.display()),
                expected: format!("{:?} (from config.json)", variable.size()),
                got: source.size(),
            });
        }
        tch::no_grad(|| variable.f_copy_(source))?;
    }
    Ok(())
}

/// How weights are stored on disk by `save`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// float32 (exact).
    #[default]
    F32,
    /// float16 (half the size; loading upcasts to float32).
    F16,
    /// bfloat16 (half the size; loading upcasts to float32).
    BF16,
}

impl WeightStorage {
    fn kind(self) -> Kind {
        match self {
            WeightStorage::F32 => Kind::Float,
            WeightStorage::F16 => Kind::Half,
            WeightStorage::BF16 => Kind::BFloat16,
        }
    }
}

/// Writes the variables of `var_store` as a safetensors state dict at `path`, atomically.
pub(crate) fn save_var_store(var_store: &VarStore, path: &Path, storage: WeightStorage) -> Result<()> {
    let variables: BTreeMap<String, Tensor> = var_store.variables().into_iter().collect();
    let mut named = Vec::with_capacity(variables.len());
    for (name, variable) in variables {
        let stored = variable.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(storage.kind())?.f_contiguous()?;
        named.push((name, stored));
    }
    write_atomically(path, |temporary| {
        Tensor::write_safetensors(&named, temporary)
            .map_err(|e| Error::format(temporary, format!("cannot write safetensors: {e}")))
    })
}

/// Writes a file atomically (see [`ggdm_core::io::write_atomic_with`]).
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    ggdm_core::io::write_atomic_with(path, write)
}

#[cfg(test)]
mod tests {
    use super::current_attention_key;

    #[test]
    fn deprecated_attention_names_are_renamed() {
        assert_eq!(
            current_attention_key("mid_block.attentions.0.query.weight").as_deref(),
            Some("mid_block.attentions.0.to_q.weight")
        );
        assert_eq!(
            current_attention_key("down_blocks.1.attentions.1.proj_attn.bias").as_deref(),
            Some("down_blocks.1.attentions.1.to_out.0.bias")
        );
        assert_eq!(current_attention_key("down_blocks.1.resnets.0.conv1.weight"), None);
        assert_eq!(current_attention_key("mid_block.attentions.0.group_norm.weight"), None);
        assert_eq!(current_attention_key("key.weight"), None);
    }
}
