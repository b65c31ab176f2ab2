//! Whether a request fits in memory, checked before anything of its size is allocated, so that a
//! size too large for the machine (a `sample_size = 100000` in `config.json`, a `--batch` or
//! `--num` of a billion) fails with a message naming the value, the flag or key it came from and
//! what fits, instead of aborting the process when an allocation fails.
//!
//! The estimates are lower bounds of what the work holds at once: per sample in a batch, the
//! sample and the network's output (`C x H x W` float32 each), two activations of the network's
//! first level (`block_out_channels[0] x H x W`, counted at 2 bytes a value, as under bf16) and,
//! on the host, the noise as it is drawn and then copied into a tensor; per sample drawn, what the
//! command keeps (the samples for a grid or `.npy`, the features for FID). A request refused here
//! could not have run; one that passes may still need more (attention, the sampler's history,
//! autograd), which libtorch then reports as an error. Available memory is
//! [`ggdm_nets::memory::available_bytes`]; where it cannot be read, only sizes that overflow are
//! refused.

use anyhow::{bail, Result};
use ggdm_nets::model_dir::LoadedModel;
use std::path::Path;
use tch::Device;

/// What a sampling command asks for, with the flags or keys that set it (named in errors).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Samples per network batch (at most `num`).
    pub batch: usize,
    /// Where `batch` came from (`--batch`, `[eval] batch`).
    pub batch_name: &'a str,
    /// Samples drawn in all.
    pub num: usize,
    /// Where `num` came from (`--num`, `[eval] num`).
    pub num_name: &'a str,
    /// Bytes of host memory kept for every sample drawn, until the end (0 when nothing is kept).
    pub kept_per_sample: u64,
    /// What is kept, in words (`the samples, for the grid or .npy`).
    pub kept_what: &'a str,
}

/// The lower-bound sizes of one sample of `shape` in `model`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleBytes {
    /// On the device, while the network runs.
    pub device: u64,
    /// On the host, while its noise is drawn.
    pub host: u64,
}

impl SampleBytes {
    /// The sizes for `shape` = `[C, H, W]` with `first_channels` channels in the network's first
    /// level (0 when unknown); `None` when they overflow.
    pub fn new(shape: [i64; 3], first_channels: u64) -> Option<Self> {
        let [c, h, w] = shape.map(|d| u64::try_from(d).unwrap_or(0));
        let pixels = h.checked_mul(w)?;
        let values = pixels.checked_mul(c)?;
        let sample = values.checked_mul(2 * 4)?;
        let activations = pixels.checked_mul(first_channels)?.checked_mul(2 * 2)?;
        Some(Self { device: sample.checked_add(activations)?, host: values.checked_mul(2 * 4)? })
    }

    /// The sizes for the model's samples of `shape`.
    pub fn of_model(model: &LoadedModel, shape: [i64; 3]) -> Option<Self> {
        Self::new(shape, first_level_channels(&model.dir))
    }
}

/// `block_out_channels[0]` of a diffusers model folder's `config.json` (0 when there is none).
fn first_level_channels(dir: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return 0;
    };
    let config: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    config.pointer("/block_out_channels/0").and_then(|v| v.as_u64()).unwrap_or(0)
}

/// `1.5 GiB`, `320.0 MiB`.
fn bytes_text(bytes: u64) -> String {
    let bytes = bytes as f64;
    if bytes >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    }
}

/// The key and the file of the model's sample size, for messages.
fn sample_size_source(model: &LoadedModel, shape: [i64; 3]) -> String {
    if model.dir.join("model.pt").is_file() {
        format!("{}: sample_shape = {shape:?}", model.dir.join("model.json").display())
    } else {
        format!("{}: sample_size = {}", model.dir.join("config.json").display(), shape[1])
    }
}

/// Fails unless `request` on `model`'s samples of `shape` fits in the memory of `device` (and of
/// the host): first one sample (naming the model's sample size), then one batch (naming
/// `batch_name`), then what is kept of `num` samples (naming `num_name`).
pub fn check_request(model: &LoadedModel, shape: [i64; 3], device: Device, request: &Request) -> Result<()> {
    let [c, h, w] = shape;
    let Some(sample) = SampleBytes::of_model(model, shape) else {
        bail!("{}: {c}x{h}x{w} samples are too large to be counted in bytes", sample_size_source(model, shape));
    };
    let on_device = |n: u64| -> Option<u64> {
        let network = sample.device.checked_mul(n)?;
        // On the CPU the network and the noise share the host's memory.
        let host = if device == Device::Cpu { sample.host.checked_mul(n)? } else { 0 };
        network.checked_add(host)
    };
    let available = ggdm_nets::memory::available_bytes(device);
    let fits = |need: Option<u64>| need.is_some_and(|need| available.is_none_or(|room| need <= room));
    let room = available.map_or_else(|| "an unknown amount".to_string(), bytes_text);
    if !fits(on_device(1)) {
        let largest =
            available.map_or(0.0, |room| h as f64 * (room as f64 / on_device(1).unwrap_or(u64::MAX) as f64).sqrt());
        bail!(
            "{}: one {c}x{h}x{w} sample needs at least {} on {device:?} while the network runs, and {room} is \
             available; a sample size of at most about {} fits",
            sample_size_source(model, shape),
            on_device(1).map_or_else(|| "more than 2^64 bytes".to_string(), bytes_text),
            largest.floor() as u64
        );
    }
    let batch = request.batch.min(request.num).max(1) as u64;
    if !fits(on_device(batch)) {
        let largest = available.map_or(0, |room| room / on_device(1).unwrap_or(u64::MAX).max(1));
        bail!(
            "{} {}: a batch of {batch} samples of {c}x{h}x{w} needs at least {} on {device:?}, and {room} is \
             available; {} {largest} fits",
            request.batch_name,
            request.batch,
            on_device(batch).map_or_else(|| "more than 2^64 bytes".to_string(), bytes_text),
            request.batch_name
        );
    }
    check_kept(sample, batch, device, request)
}

/// Fails unless a search config's batches fit: `[optim] batch_size` samples at once (a lower
/// bound: the unroll holds far more), and `[eval] batch` of `[eval] num` samples in the comparison.
pub fn check_search(
    model: &LoadedModel,
    shape: [i64; 3],
    device: Device,
    config: &crate::search_cmd::SearchConfig,
) -> Result<()> {
    let batch = config.optim.batch_size;
    let optim = Request {
        batch,
        batch_name: "[optim] batch_size",
        num: batch,
        num_name: "[optim] batch_size",
        kept_per_sample: 0,
        kept_what: "",
    };
    check_request(model, shape, device, &optim)?;
    let eval = Request {
        batch: config.eval.batch,
        batch_name: "[eval] batch",
        num: config.eval.num,
        num_name: "[eval] num",
        // At least one float32 feature per sample and feature network, in chunks and concatenated.
        kept_per_sample: 2 * 4,
        kept_what: "the features",
    };
    check_request(model, shape, device, &eval)
}

/// Fails unless what is kept of `request.num` samples, with one batch's noise, fits in host memory.
fn check_kept(sample: SampleBytes, batch: u64, device: Device, request: &Request) -> Result<()> {
    if request.kept_per_sample == 0 {
        return Ok(());
    }
    let noise = if device == Device::Cpu { 0 } else { sample.host.saturating_mul(batch) };
    let need = request.kept_per_sample.checked_mul(request.num as u64).and_then(|kept| kept.checked_add(noise));
    let available = ggdm_nets::memory::available_bytes(Device::Cpu);
    if need.is_some_and(|need| available.is_none_or(|room| need <= room)) {
        return Ok(());
    }
    let largest = available.map_or(0, |room| room.saturating_sub(noise) / request.kept_per_sample);
    bail!(
        "{} {}: keeping {} of {} samples needs at least {} of host memory, and {} is available; {} {largest} fits",
        request.num_name,
        request.num,
        request.kept_what,
        request.num,
        need.map_or_else(|| "more than 2^64 bytes".to_string(), bytes_text),
        available.map_or_else(|| "an unknown amount".to_string(), bytes_text),
        request.num_name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_count_samples_activations_and_noise_and_overflow_to_none() {
        let bytes = SampleBytes::new([1, 28, 28], 32).expect("small");
        assert_eq!(bytes.device, 784 * 8 + 784 * 32 * 4);
        assert_eq!(bytes.host, 784 * 8);
        assert!(SampleBytes::new([3, 1 << 40, 1 << 40], 128).is_none(), "2^80 values overflow");
        assert!(SampleBytes::new([1, 100_000, 100_000], 32).expect("fits in u64").device > 1 << 40);
        assert_eq!(bytes_text(3 << 29), "1.5 GiB");
        assert_eq!(bytes_text(320 << 20), "320.0 MiB");
    }
}
