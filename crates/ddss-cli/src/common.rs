//! Helpers shared by the subcommands: device selection, progress reports, image grids and `.npy`
//! sample files.

use crate::progress::{Progress, Unit};
use anyhow::{bail, Context, Result};
use ggdm_nets::cuda_graph::GraphedDenoiser;
use ggdm_nets::model_dir::{load_model_dir_with, LoadedModel, NetworkPrecision};
use ggdm_nets::DifferentiableDenoiser;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How the network calls run: `--precision` and `--cuda-graphs` (sample, eval, table).
#[derive(Debug, Clone, clap::Args)]
pub struct NetworkArgs {
    /// Network arithmetic: f32, or bf16 (weights and activations; the sampler's combinations stay
    /// f32; about 1.6x faster sampling on recent GPUs, slower on most CPUs).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Replay the network calls as CUDA graphs (captured once per batch shape; the same numbers,
    /// fewer kernel launches). Needs a build with `--features cuda-graphs`; no effect on the CPU.
    #[arg(long)]
    pub cuda_graphs: bool,
    /// Let cuDNN time its convolution algorithms on the first call of each shape and keep the
    /// fastest (faster calls after the first; results may differ in the last bits between runs).
    /// No effect on the CPU.
    #[arg(long)]
    pub cudnn_benchmark: bool,
}

impl NetworkArgs {
    /// Opens the model directory `dir` on `device` as these options say.
    pub fn load(&self, dir: &Path, device: Device) -> Result<LoadedModel> {
        cudnn_benchmark_if(device, self.cudnn_benchmark);
        load_model(dir, device, NetworkPrecision::parse(&self.precision)?, self.cuda_graphs)
    }
}

/// Turns on cuDNN's algorithm timing (`torch.backends.cudnn.benchmark`) for this process when
/// asked for and `device` is a GPU; on the CPU it only notes that it does not apply.
pub fn cudnn_benchmark_if(device: Device, on: bool) {
    if !on {
        return;
    }
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    } else {
        tracing::info!("cuDNN benchmark mode applies to CUDA devices only; nothing changes on {device:?}");
    }
}

/// Opens a model directory with the given precision, wrapped for CUDA-graph replay when asked.
pub fn load_model(dir: &Path, device: Device, precision: NetworkPrecision, cuda_graphs: bool) -> Result<LoadedModel> {
    let model =
        load_model_dir_with(dir, device, precision).with_context(|| format!("loading model {}", dir.display()))?;
    let LoadedModel { denoiser, scheduler, dir } = model;
    Ok(LoadedModel { denoiser: graphed_if(denoiser, device, cuda_graphs)?, scheduler, dir })
}

/// `denoiser` wrapped for CUDA-graph replay when `cuda_graphs` is asked for and `device` is a GPU
/// (on the CPU it is returned as it is, with a note); an error when the build lacks the feature.
pub fn graphed_if(
    denoiser: Box<dyn DifferentiableDenoiser>,
    device: Device,
    cuda_graphs: bool,
) -> Result<Box<dyn DifferentiableDenoiser>> {
    if !cuda_graphs {
        return Ok(denoiser);
    }
    if !device.is_cuda() {
        tracing::info!("CUDA graphs apply to CUDA devices only; running the network eagerly on {device:?}");
        return Ok(denoiser);
    }
    Ok(Box::new(GraphedDenoiser::new(denoiser)?))
}

/// How this process's C heap is set up, decided once: `"reuse"` (freed memory is kept for reuse,
/// [`ggdm_nets::memory::keep_freed_host_memory`]) or `"system"` (glibc's defaults: asked for
/// with `DDSS_MALLOC=system`, or malloc's parameters set through the environment, or no
/// `mallopt`). Called first thing in `main`, before any tensor exists.
pub fn setup_host_memory() -> &'static str {
    static MODE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    MODE.get_or_init(|| {
        match std::env::var("DDSS_MALLOC").as_deref() {
            Ok("system") => return "system",
            Ok("reuse") | Err(_) => {}
            Ok(other) => tracing::warn!("DDSS_MALLOC={other}: expected `reuse` (the default) or `system`; using reuse"),
        }
        if ggdm_nets::memory::keep_freed_host_memory() {
            "reuse"
        } else {
            "system"
        }
    })
}

/// `--device auto|cpu|cuda|cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda was requested but no CUDA device is available (libtorch sees none); use --device cpu or auto");
            }
            Ok(Device::Cuda(0))
        }
        other => {
            if let Some(index) = other.strip_prefix("cuda:") {
                let index: usize = index.parse().with_context(|| format!("--device {other}: bad GPU index"))?;
                let count = tch::Cuda::device_count() as usize;
                if index >= count {
                    bail!("--device {other}: only {count} CUDA device(s) are available");
                }
                return Ok(Device::Cuda(index));
            }
            bail!("--device {other}: expected auto, cpu, cuda or cuda:N")
        }
    }
}

/// A progress report on stderr with rate and ETA (hidden with `--quiet`): a bar on a terminal,
/// INFO lines otherwise ([`crate::progress`]).
pub fn progress(len: u64, quiet: bool, what: &str) -> Progress {
    Progress::new(len, quiet, what, Unit::Items)
}

/// [`progress`] counting optimiser steps (`step 3/5`).
pub fn progress_steps(len: u64, quiet: bool, what: &str) -> Progress {
    Progress::new(len, quiet, what, Unit::Steps)
}

/// [`progress`] counting images or samples (`150/1000 images`).
pub fn progress_images(len: u64, quiet: bool, what: &str) -> Progress {
    Progress::new(len, quiet, what, Unit::Images)
}

/// Samples in [-1, 1] (`N x C x H x W`, C = 1 or 3) to 8-bit `N x H x W x C` bytes.
fn to_uint8_nhwc(samples: &Tensor) -> Result<(Vec<u8>, [usize; 4])> {
    let size = samples.size();
    if size.len() != 4 || !(size[1] == 1 || size[1] == 3) {
        bail!("samples must be N x C x H x W with C = 1 or 3, got {size:?}");
    }
    let bytes = ((samples.detach().to_device(Device::Cpu).to_kind(Kind::Float) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let n = bytes.numel();
    let mut out = vec![0u8; n];
    bytes.copy_data(&mut out, n);
    Ok((out, [size[0] as usize, size[2] as usize, size[3] as usize, size[1] as usize]))
}

/// The smallest side, in pixels, a tile of a sample grid is scaled up to.
pub const MIN_TILE: usize = 84;

/// The integer factor that brings a side of `side` pixels to at least [`MIN_TILE`] (1 for
/// larger samples).
pub fn tile_scale(side: usize) -> usize {
    MIN_TILE.div_ceil(side.max(1)).max(1)
}

/// Writes samples as one PNG grid (`columns` wide, 2-pixel gaps), each sample scaled up by
/// [`tile_scale`] with nearest neighbour (a 28 px sample becomes an 84 px tile) so a difference
/// can be seen.
pub fn write_grid(samples: &Tensor, columns: usize, path: &Path) -> Result<()> {
    let (bytes, [n, h, w, c]) = to_uint8_nhwc(samples)?;
    let scale = tile_scale(h.min(w));
    let (th, tw) = (h * scale, w * scale);
    let columns = columns.clamp(1, n.max(1));
    let rows = n.div_ceil(columns);
    let gap = 2;
    let (gw, gh) = (columns * (tw + gap) + gap, rows * (th + gap) + gap);
    let mut grid = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for i in 0..n {
        let (r, col) = (i / columns, i % columns);
        for y in 0..th {
            for x in 0..tw {
                let base = ((i * h + y / scale) * w + x / scale) * c;
                let px = if c == 1 { [bytes[base]; 3] } else { [bytes[base], bytes[base + 1], bytes[base + 2]] };
                grid.put_pixel((gap + col * (tw + gap) + x) as u32, (gap + r * (th + gap) + y) as u32, image::Rgb(px));
            }
        }
    }
    crate::figure::encode_png(&grid, path)
}

/// Writes each sample as `DIR/000000.png`, ...
pub fn write_images(samples: &Tensor, dir: &Path, first_index: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (bytes, [n, h, w, c]) = to_uint8_nhwc(samples)?;
    for i in 0..n {
        let chunk = &bytes[i * h * w * c..(i + 1) * h * w * c];
        let path = dir.join(format!("{:06}.png", first_index + i));
        let color = if c == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
        let mut encoded = Vec::new();
        image::codecs::png::PngEncoder::new(&mut encoded)
            .write_image(chunk, w as u32, h as u32, color)
            .with_context(|| format!("encoding {}", path.display()))?;
        ggdm_core::io::write_atomic(&path, &encoded)?;
    }
    Ok(())
}

use image::ImageEncoder;

/// Writes float32 `N x C x H x W` samples as `.npy`.
pub fn write_npy(samples: &Tensor, path: &Path) -> Result<()> {
    let t = samples.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let n = t.numel();
    let mut data = vec![0f32; n];
    t.copy_data(&mut data, n);
    let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), data)?;
    let mut buffer = Vec::new();
    ndarray_npy::WriteNpyExt::write_npy(&array, &mut buffer).context("encoding .npy")?;
    ggdm_core::io::write_atomic(path, &buffer)?;
    Ok(())
}
