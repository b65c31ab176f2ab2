//! `ddss-cli train`: DDPM training with the simple loss `|| model(x_t, t) - target ||^2`
//! (Ho et al.), Adam, EMA of the weights, linear betas with T = 1000 by default.
//!
//! The output directory is a model in diffusers layout (EMA weights in `config.json` +
//! `diffusion_pytorch_model.safetensors`, plus `scheduler_config.json`), loadable by
//! `diffusers.UNet2DModel.from_pretrained(dir)` and by every `ddss-cli` command. Training state
//! (weights, EMA, Adam moments, data/noise RNG position) is checkpointed atomically in one file,
//! `checkpoint/state.safetensors`, so `--resume` continues exactly where the run stopped.

use crate::common::{parse_device, progress_steps};
use crate::memory_check::SampleBytes;
use anyhow::{bail, Context, Result};
use ddss_opt::optim::{clip_grad_norm, Adam, AdamConfig, LrSchedule};
use ggdm_core::prediction::target_from;
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_nets::unet::{UNet2DConfig, UNet2DModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// `--config FILE.toml` for training: `[model]` is a diffusers `UNet2DModel` config, `[train]`
/// the optimisation, `[scheduler]` the diffusion schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// diffusers `UNet2DModel` keys.
    pub model: UNet2DConfig,
    /// Optimisation settings.
    #[serde(default)]
    pub train: TrainSettings,
    /// The diffusion schedule (diffusers `scheduler_config.json` keys); default: DDPM linear.
    #[serde(default)]
    pub scheduler: Option<toml::Value>,
}

/// Optimisation settings; defaults follow DDPM (Ho et al.) scaled to small models.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Optimiser steps (overridden by `--steps`).
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Learning rate and its schedule.
    pub lr: LrSchedule,
    /// Adam settings.
    pub adam: AdamConfig,
    /// EMA decay of the exported weights (DDPM: 0.9999; smaller for short runs).
    pub ema_decay: f64,
    /// Gradient-norm clipping (DDPM: 1.0).
    pub grad_clip: Option<f64>,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Steps between log lines / metrics.jsonl entries.
    pub log_every: u64,
    /// Seed of the data order, timesteps and noise.
    pub seed: u64,
    /// Random horizontal flips of the data.
    pub random_flip: bool,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            steps: 20_000,
            batch_size: 128,
            lr: LrSchedule { lr: 2e-4, warmup_steps: 500, decay: "constant".into(), min_lr_ratio: 0.0 },
            adam: AdamConfig::default(),
            ema_decay: 0.999,
            grad_clip: Some(1.0),
            checkpoint_every: 1000,
            log_every: 100,
            seed: 0,
            random_flip: false,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.steps == 0 {
            bail!("[train] steps = 0: need at least 1");
        }
        if t.batch_size == 0 {
            bail!("[train] batch_size = 0: need at least 1");
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            bail!("[train] ema_decay = {}: must be in [0, 1)", t.ema_decay);
        }
        if t.checkpoint_every == 0 || t.log_every == 0 {
            bail!("[train] checkpoint_every and log_every must be >= 1");
        }
        if let Some(c) = t.grad_clip {
            if !(c > 0.0) {
                bail!("[train] grad_clip = {c}: must be > 0");
            }
        }
        t.lr.validate().context("[train.lr]")?;
        t.adam.validate().context("[train.adam]")?;
        self.model.validate().context("[model]")?;
        Ok(())
    }

    fn scheduler_config(&self) -> Result<SchedulerConfig> {
        match &self.scheduler {
            None => Ok(SchedulerConfig::default()),
            Some(value) => {
                let json = serde_json::to_value(value)?;
                let map = json.as_object().context("[scheduler] must be a table")?;
                Ok(SchedulerConfig::from_json_map(map).context("[scheduler]")?)
            }
        }
    }
}

/// The arguments of `ddss-cli train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Training images: an IDX(.gz) file, a folder of images (bmp, jpg, jpeg, pgm, png, ppm,
    /// tif, tiff, webp; other files are skipped), or a folder holding
    /// train-images-idx3-ubyte.gz (e.g. /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    pub data: PathBuf,
    /// Also read the images of --data's subfolders (symlinked ones included), depth first in
    /// name order.
    #[arg(long)]
    pub recursive: bool,
    /// Output model directory (config.json, diffusion_pytorch_model.safetensors,
    /// scheduler_config.json, checkpoint/, metrics.jsonl).
    #[arg(long)]
    pub out: PathBuf,
    /// Training config (TOML with [model], [train], [scheduler]); default:
    /// configs/train_fashion_mnist.toml (built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Number of optimiser steps (overrides [train] steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Continue from OUT/checkpoint/state.safetensors with OUT/train_config.toml.
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many minutes; continue later with --resume.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Stop (with a checkpoint) after this step while keeping the learning-rate schedule of
    /// --steps; continue later with --resume.
    #[arg(long)]
    pub stop_at_step: Option<u64>,
    /// Set from the global --quiet.
    #[arg(skip)]
    pub quiet: bool,
}

/// The default training config (the shipped Fashion-MNIST model's architecture).
pub const DEFAULT_TRAIN_CONFIG: &str = include_str!("../../../configs/train_fashion_mnist.toml");

const STATE_FILE: &str = "state.safetensors";

/// Resolves `--data`: an IDX(.gz) file, an image folder (its subfolders too when `recursive`), or
/// a folder holding Fashion-MNIST/MNIST's `train-images-idx3-ubyte(.gz)`.
fn load_training_images(path: &Path, recursive: bool) -> Result<Tensor> {
    if path.is_dir() {
        for name in ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"] {
            let candidate = path.join(name);
            if candidate.is_file() {
                return Ok(fid_metrics::data::load_idx_images(&candidate)?);
            }
        }
    }
    if !path.exists() {
        bail!(
            "--data {}: not found. Give an IDX(.gz) image file, a folder of images, or a folder \
             with train-images-idx3-ubyte.gz (Fashion-MNIST: `cargo xtask setup` installs it to \
             /usr/share/datasets/fashion-mnist)",
            path.display()
        );
    }
    let options = fid_metrics::data::ReadOptions { recursive, limit: None };
    Ok(fid_metrics::data::load_images_with(path, options)?)
}

/// The sample shape and the number of the training images of size `size` (N x C x H x W), checked
/// against the model's `in_channels` and `sample_size`, and `[train] batch_size` against memory.
fn check_training_data(config: &TrainConfig, size: &[i64], device: Device) -> Result<([i64; 3], i64)> {
    let shape = [config.model.in_channels, size[2], size[3]];
    if size[1] != config.model.in_channels {
        bail!("data has {} channels, the model's in_channels is {}", size[1], config.model.in_channels);
    }
    if let Some(s) = config.model.sample_size {
        if s.height_width() != [size[2], size[3]] {
            bail!("data images are {}x{}, the model's sample_size is {:?}", size[2], size[3], s.height_width());
        }
    }
    let first_channels = config.model.block_out_channels.first().map_or(0, |&c| c.max(0) as u64);
    let Some(sample) = SampleBytes::new(shape, first_channels) else {
        bail!("data images of {}x{} are too large to be counted in bytes", size[2], size[3]);
    };
    // A step holds the batch's noise on the host, and the forward pass's activations for the
    // backward pass (at least two per level-one layer, plus the inputs and targets).
    let per_sample = sample.device.saturating_mul(3).saturating_add(sample.host);
    let batch = config.train.batch_size as u64;
    let need = per_sample.saturating_mul(batch);
    if let Some(room) = ggdm_nets::memory::available_bytes(device) {
        if need > room {
            bail!(
                "[train] batch_size = {batch}: a step on {}x{}x{} images needs at least {:.1} GiB on {device:?}, and \
                 {:.1} GiB is available; batch_size = {} fits",
                shape[0],
                shape[1],
                shape[2],
                need as f64 / (1u64 << 30) as f64,
                room as f64 / (1u64 << 30) as f64,
                room / per_sample.max(1)
            );
        }
    }
    Ok((shape, size[0]))
}

fn sorted_variables(model: &UNet2DModel) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Runs `ddss-cli train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating output directory {}", args.out.display()))?;
    let resolved_path = args.out.join("train_config.toml");
    let text = match (&args.config, args.resume && resolved_path.is_file()) {
        (_, true) => std::fs::read_to_string(&resolved_path)?,
        (Some(path), false) => {
            std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?
        }
        (None, false) => DEFAULT_TRAIN_CONFIG.to_string(),
    };
    let mut config: TrainConfig = toml::from_str(&text).context("invalid training config")?;
    if let Some(steps) = args.steps {
        config.train.steps = steps;
    }
    config.validate()?;
    let scheduler = config.scheduler_config()?;
    let schedule = scheduler.schedule()?;
    ggdm_core::io::write_atomic(&resolved_path, toml::to_string_pretty(&config)?.as_bytes())?;

    let images = load_training_images(&args.data, args.recursive)?;
    let (shape, n_images) = check_training_data(&config, &images.size(), device)?;
    tracing::info!("training data: {} images of shape {:?} from {}", n_images, shape, args.data.display());
    let images = images.to_device(device);

    // The initial weights come from libtorch's generator: seed it so a run is reproducible.
    tch::manual_seed(config.train.seed as i64);
    let model = UNet2DModel::new(config.model.clone(), device)?;
    let ema = UNet2DModel::new(config.model.clone(), device)?;
    let params: Vec<Tensor> = sorted_variables(&model).into_iter().map(|(_, t)| t).collect();
    let ema_params: Vec<Tensor> = sorted_variables(&ema).into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| {
        for (e, p) in ema_params.iter().zip(&params) {
            let _ = e.set_requires_grad(false);
            let mut e = e.shallow_clone();
            e.copy_(p);
        }
    });
    tracing::info!("model: {} parameters on {:?}", model.num_parameters(), device);
    let mut adam = Adam::new(&params, config.train.adam);
    let mut rng = ChaCha8Rng::seed_from_u64(config.train.seed);
    let mut start_step = 0u64;

    let checkpoint_dir = args.out.join("checkpoint");
    let state_path = checkpoint_dir.join(STATE_FILE);
    if args.resume {
        if !state_path.is_file() {
            bail!("--resume: no checkpoint at {} (start without --resume)", state_path.display());
        }
        let named = Tensor::read_safetensors(&state_path)
            .with_context(|| format!("reading checkpoint {}", state_path.display()))?;
        let find = |name: &str| {
            named
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .with_context(|| format!("checkpoint {} lacks `{name}`", state_path.display()))
        };
        tch::no_grad(|| -> Result<()> {
            for (prefix, list, model) in [("model", &params, &model), ("ema", &ema_params, &ema)] {
                for ((name, _), t) in sorted_variables(model).iter().zip(list.iter()) {
                    let saved = find(&format!("{prefix}.{name}"))?;
                    if saved.size() != t.size() {
                        bail!(
                            "checkpoint tensor {prefix}.{name} has shape {:?}, model has {:?}",
                            saved.size(),
                            t.size()
                        );
                    }
                    let mut t = t.shallow_clone();
                    t.f_copy_(&saved.to_device(device))?;
                }
            }
            Ok(())
        })?;
        let adam_state: Vec<(String, Tensor)> = named
            .iter()
            .filter(|(n, _)| n.starts_with("adam."))
            .map(|(n, t)| (n.clone(), t.to_device(device)))
            .collect();
        adam.load_state(&adam_state)?;
        let meta = |name: &str, len: usize| -> Result<Vec<i64>> {
            let t = find(name)?;
            let values =
                Vec::<i64>::try_from(&t.f_reshape([-1])?.f_to_kind(Kind::Int64)?).ok().filter(|v| v.len() == len);
            values.with_context(|| {
                format!(
                    "checkpoint {}: `{name}` must hold {len} integer(s), found shape {:?}",
                    state_path.display(),
                    t.size()
                )
            })
        };
        start_step = u64::try_from(meta("meta.step", 1)?[0])
            .with_context(|| format!("checkpoint {}: negative `meta.step`", state_path.display()))?;
        let pos = meta("meta.rng_word_pos", 2)?;
        let word_pos = ((pos[0] as u64 as u128) << 64) | (pos[1] as u64 as u128);
        rng.set_word_pos(word_pos);
        tracing::info!("resumed from step {start_step} ({})", state_path.display());
    }

    let total = config.train.steps;
    if start_step >= total {
        tracing::info!("already trained for {start_step} >= {total} steps; exporting");
    }
    let sqrt_abar: Vec<f64> = schedule.abar().iter().map(|a| a.sqrt()).collect();
    let sqrt_abar = Tensor::from_slice(&sqrt_abar).to_kind(Kind::Float).to_device(device);
    let abar_table = Tensor::from_slice(schedule.abar()).to_kind(Kind::Float).to_device(device);
    let t_count = schedule.num_train_timesteps() as i64;
    let batch = config.train.batch_size;
    let numel_per_image = (shape[0] * shape[1] * shape[2]) as usize;
    let bar = progress_steps(total, args.quiet, "train");
    bar.resume_from(start_step);
    let started = Instant::now();
    let metrics_path = args.out.join("metrics.jsonl");
    if args.resume {
        // Lines written after the checkpoint (and a line torn by a kill) are replaced by this run's.
        ggdm_core::io::truncate_jsonl(&metrics_path, "step", start_step)?;
    } else if metrics_path.is_file() {
        std::fs::remove_file(&metrics_path).with_context(|| format!("removing {}", metrics_path.display()))?;
    }
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
    let mut loss_count = 0u64;
    let mut step = start_step;
    let save = |step: u64, rng: &ChaCha8Rng, adam: &Adam| -> Result<()> {
        std::fs::create_dir_all(&checkpoint_dir)?;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (prefix, model) in [("model", &model), ("ema", &ema)] {
            for (name, t) in sorted_variables(model) {
                named.push((format!("{prefix}.{name}"), t.detach().to_device(Device::Cpu)));
            }
        }
        for (name, t) in adam.state() {
            named.push((name, t.detach().to_device(Device::Cpu)));
        }
        named.push(("meta.step".into(), Tensor::from_slice(&[step as i64])));
        let pos = rng.get_word_pos();
        named.push(("meta.rng_word_pos".into(), Tensor::from_slice(&[(pos >> 64) as u64 as i64, pos as u64 as i64])));
        ggdm_core::io::write_atomic_with(&state_path, |tmp| {
            Tensor::write_safetensors(&named, tmp)
                .map_err(|e| ggdm_core::Error::format(tmp, format!("cannot write the checkpoint: {e}")))
        })?;
        ema.save(&args.out)?;
        ggdm_core::io::write_atomic(
            &args.out.join("scheduler_config.json"),
            serde_json::to_string_pretty(&scheduler.to_diffusers_json())?.as_bytes(),
        )?;
        Ok(())
    };
    while step < total {
        let lr = config.train.lr.at(step, total);
        let idx: Vec<i64> = (0..batch).map(|_| rng.gen_range(0..n_images)).collect();
        let ts: Vec<i64> = (0..batch).map(|_| rng.gen_range(0..t_count)).collect();
        let noise: Vec<f32> = (0..batch * numel_per_image).map(|_| rng.sample(StandardNormal)).collect();
        let flips: Vec<bool> = (0..batch).map(|_| config.train.random_flip && rng.gen_bool(0.5)).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        let ts = Tensor::from_slice(&ts).to_device(device);
        let eps = Tensor::from_slice(&noise).reshape([batch as i64, shape[0], shape[1], shape[2]]).to_device(device);
        let mut x0 = images.index_select(0, &idx);
        if flips.iter().any(|&f| f) {
            let mask: Vec<f32> = flips.iter().map(|&f| if f { 1.0 } else { 0.0 }).collect();
            let mask = Tensor::from_slice(&mask).to_device(device).reshape([-1, 1, 1, 1]);
            x0 = x0.flip([3]) * &mask + x0 * (mask.ones_like() - &mask);
        }
        let a = sqrt_abar.index_select(0, &ts).reshape([-1, 1, 1, 1]);
        let abar = abar_table.index_select(0, &ts).reshape([-1, 1, 1, 1]);
        let x_t = &x0 * &a + &eps * (abar.ones_like() - &abar).sqrt();
        let output = model.forward_t(&x_t, &ts.to_kind(Kind::Float), true)?;
        let target = target_from(scheduler.prediction_type, &x0, &eps, &abar);
        let loss = (output - target).square().mean(Kind::Float);
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        loss.backward();
        let _ = clip_grad_norm(&params, config.train.grad_clip);
        adam.step(&params, lr);
        let decay = config.train.ema_decay.min((1.0 + step as f64) / (10.0 + step as f64));
        tch::no_grad(|| {
            for (e, p) in ema_params.iter().zip(&params) {
                let mut e = e.shallow_clone();
                let _ = e.g_mul_scalar_(decay);
                let _ = e.g_add_(&(p * (1.0 - decay)));
            }
        });
        loss_acc += loss.detach();
        loss_count += 1;
        step += 1;
        let out_of_time = args.max_minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0)
            || args.stop_at_step.is_some_and(|s| step >= s);
        if step.is_multiple_of(config.train.log_every) || step == total || out_of_time {
            let mean_loss = loss_acc.double_value(&[]) / loss_count.max(1) as f64;
            if !mean_loss.is_finite() {
                bail!("training loss became {mean_loss} at step {step}; lower [train.lr] or enable grad_clip (last checkpoint: {})", state_path.display());
            }
            bar.set_message(format!("loss {mean_loss:.4} lr {lr:.2e}"));
            let line = serde_json::json!({"step": step, "loss": mean_loss, "lr": lr, "elapsed_s": started.elapsed().as_secs_f64()});
            ggdm_core::io::append_line(&metrics_path, &line.to_string())?;
            loss_acc = Tensor::zeros([], (Kind::Float, device));
            loss_count = 0;
        }
        bar.inc(1);
        if step.is_multiple_of(config.train.checkpoint_every) || step == total || out_of_time {
            save(step, &rng, &adam)?;
        }
        if out_of_time {
            tracing::info!(
                "stopping at step {step} (--max-minutes / --stop-at-step); checkpoint written, continue with --resume"
            );
            break;
        }
    }
    if step == start_step {
        save(step, &rng, &adam)?;
    }
    bar.finish();
    tracing::info!("model written to {} (EMA weights, diffusers layout)", args.out.display());
    Ok(())
}
