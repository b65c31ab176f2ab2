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

/// The training config of a run: `OUT/train_config.toml` when resuming from it, else `--config`
/// or the built-in default; `--steps` applied, checked.
fn resolve_config(args: &TrainArgs, resolved_path: &Path) -> Result<TrainConfig> {
    let text = match (&args.config, args.resume && resolved_path.is_file()) {
        (_, true) => std::fs::read_to_string(resolved_path)?,
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
    Ok(config)
}

/// The network being trained and its EMA copy, with their parameters in name order.
struct Weights {
    model: UNet2DModel,
    ema: UNet2DModel,
    params: Vec<Tensor>,
    ema_params: Vec<Tensor>,
}

impl Weights {
    /// A new network and its EMA copy (equal to it, outside autograd); libtorch's generator,
    /// which gives the initial weights, is seeded with `[train] seed` so a run is reproducible.
    fn new(config: &TrainConfig, device: Device) -> Result<Self> {
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
        Ok(Self { model, ema, params, ema_params })
    }

    /// `(prefix, network, its parameters)` for the network (`model`) and the EMA (`ema`).
    fn networks(&self) -> [(&'static str, &UNet2DModel, &Vec<Tensor>); 2] {
        [("model", &self.model, &self.params), ("ema", &self.ema, &self.ema_params)]
    }

    /// Moves the EMA weights toward the network's: `ema = decay * ema + (1 - decay) * model`.
    fn update_ema(&self, decay: f64) {
        tch::no_grad(|| {
            for (e, p) in self.ema_params.iter().zip(&self.params) {
                let mut e = e.shallow_clone();
                let _ = e.g_mul_scalar_(decay);
                let _ = e.g_add_(&(p * (1.0 - decay)));
            }
        });
    }
}

/// What changes from step to step: the step count, the optimiser and the random stream of data
/// order, timesteps, noise and flips.
struct TrainState {
    step: u64,
    adam: Adam,
    rng: ChaCha8Rng,
}

/// Where a run's state goes: `OUT/checkpoint/state.safetensors` (weights, EMA, Adam moments,
/// step, random stream position), and the model itself in OUT (EMA weights and
/// `scheduler_config.json`).
struct Checkpoint<'a> {
    out: &'a Path,
    dir: PathBuf,
    state_path: PathBuf,
    scheduler: &'a SchedulerConfig,
}

impl<'a> Checkpoint<'a> {
    fn new(out: &'a Path, scheduler: &'a SchedulerConfig) -> Self {
        let dir = out.join("checkpoint");
        let state_path = dir.join(STATE_FILE);
        Self { out, dir, state_path, scheduler }
    }

    /// Writes the checkpoint (atomically) and the model.
    fn save(&self, weights: &Weights, state: &TrainState) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (prefix, model, _) in weights.networks() {
            for (name, t) in sorted_variables(model) {
                named.push((format!("{prefix}.{name}"), t.detach().to_device(Device::Cpu)));
            }
        }
        for (name, t) in state.adam.state() {
            named.push((name, t.detach().to_device(Device::Cpu)));
        }
        named.push(("meta.step".into(), Tensor::from_slice(&[state.step as i64])));
        let pos = state.rng.get_word_pos();
        named.push(("meta.rng_word_pos".into(), Tensor::from_slice(&[(pos >> 64) as u64 as i64, pos as u64 as i64])));
        ggdm_core::io::write_atomic_with(&self.state_path, |tmp| {
            Tensor::write_safetensors(&named, tmp)
                .map_err(|e| ggdm_core::Error::format(tmp, format!("cannot write the checkpoint: {e}")))
        })?;
        weights.ema.save(self.out)?;
        ggdm_core::io::write_atomic(
            &self.out.join("scheduler_config.json"),
            serde_json::to_string_pretty(&self.scheduler.to_diffusers_json())?.as_bytes(),
        )?;
        Ok(())
    }

    /// Reads the checkpoint into `weights` and `state` (`--resume`).
    fn resume(&self, weights: &Weights, state: &mut TrainState, device: Device) -> Result<()> {
        let state_path = &self.state_path;
        if !state_path.is_file() {
            bail!("--resume: no checkpoint at {} (start without --resume)", state_path.display());
        }
        let named = Tensor::read_safetensors(state_path)
            .with_context(|| format!("reading checkpoint {}", state_path.display()))?;
        let find = |name: &str| {
            named
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .with_context(|| format!("checkpoint {} lacks `{name}`", state_path.display()))
        };
        tch::no_grad(|| -> Result<()> {
            for (prefix, model, list) in weights.networks() {
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
        state.adam.load_state(&adam_state)?;
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
        state.step = u64::try_from(meta("meta.step", 1)?[0])
            .with_context(|| format!("checkpoint {}: negative `meta.step`", state_path.display()))?;
        let pos = meta("meta.rng_word_pos", 2)?;
        let word_pos = ((pos[0] as u64 as u128) << 64) | (pos[1] as u64 as u128);
        state.rng.set_word_pos(word_pos);
        tracing::info!("resumed from step {} ({})", state.step, state_path.display());
        Ok(())
    }
}

/// The mean training loss since the last log line, and `metrics.jsonl`, where each log line
/// goes.
struct LossLog {
    path: PathBuf,
    sum: Tensor,
    count: u64,
    device: Device,
}

impl LossLog {
    /// Opens `OUT/metrics.jsonl`: when resuming, the lines after `start_step` (and a line torn by
    /// a kill) are dropped, to be replaced by this run's; otherwise an old file is removed.
    fn open(out: &Path, resume: bool, start_step: u64, device: Device) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        if resume {
            ggdm_core::io::truncate_jsonl(&path, "step", start_step)?;
        } else if path.is_file() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(Self { path, sum: Tensor::zeros([], (Kind::Float, device)), count: 0, device })
    }

    fn add(&mut self, loss: &Tensor) {
        self.sum += loss.detach();
        self.count += 1;
    }

    /// Appends the line of `step` (mean loss, `lr`, seconds since the start) and starts a new
    /// mean, which it returns; a non-finite mean is an error naming the last checkpoint.
    fn write(&mut self, step: u64, lr: f64, elapsed_s: f64, checkpoint: &Path) -> Result<f64> {
        let mean_loss = self.sum.double_value(&[]) / self.count.max(1) as f64;
        if !mean_loss.is_finite() {
            bail!(
                "training loss became {mean_loss} at step {step}; lower [train.lr] or enable grad_clip (last \
                 checkpoint: {})",
                checkpoint.display()
            );
        }
        let line = serde_json::json!({"step": step, "loss": mean_loss, "lr": lr, "elapsed_s": elapsed_s});
        ggdm_core::io::append_line(&self.path, &line.to_string())?;
        self.sum = Tensor::zeros([], (Kind::Float, self.device));
        self.count = 0;
        Ok(mean_loss)
    }
}

/// A training run: the settings, the data, the networks and where the state goes.
struct Training<'a> {
    args: &'a TrainArgs,
    config: &'a TrainConfig,
    scheduler: &'a SchedulerConfig,
    /// The training images, on the device.
    images: Tensor,
    n_images: i64,
    shape: [i64; 3],
    /// `sqrt(abar_t)` and `abar_t` of every training timestep t, on the device.
    sqrt_abar: Tensor,
    abar: Tensor,
    weights: Weights,
    checkpoint: Checkpoint<'a>,
    device: Device,
}

impl Training<'_> {
    /// One optimiser step at learning rate `lr`: a batch of images, timesteps, noise and flips
    /// drawn from `state.rng` (in that order), the simple loss, clipping, Adam and the EMA
    /// update (its decay warmed up by `state.step`). Returns the loss; `state.step` is left as is.
    fn step(&self, state: &mut TrainState, lr: f64) -> Result<Tensor> {
        let (device, shape, batch) = (self.device, self.shape, self.config.train.batch_size);
        let numel_per_image = (shape[0] * shape[1] * shape[2]) as usize;
        let t_count = self.abar.size()[0];
        let rng = &mut state.rng;
        let idx: Vec<i64> = (0..batch).map(|_| rng.gen_range(0..self.n_images)).collect();
        let ts: Vec<i64> = (0..batch).map(|_| rng.gen_range(0..t_count)).collect();
        let noise: Vec<f32> = (0..batch * numel_per_image).map(|_| rng.sample(StandardNormal)).collect();
        let flips: Vec<bool> = (0..batch).map(|_| self.config.train.random_flip && rng.gen_bool(0.5)).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        let ts = Tensor::from_slice(&ts).to_device(device);
        let eps = Tensor::from_slice(&noise).reshape([batch as i64, shape[0], shape[1], shape[2]]).to_device(device);
        let mut x0 = self.images.index_select(0, &idx);
        if flips.iter().any(|&f| f) {
            let mask: Vec<f32> = flips.iter().map(|&f| if f { 1.0 } else { 0.0 }).collect();
            let mask = Tensor::from_slice(&mask).to_device(device).reshape([-1, 1, 1, 1]);
            x0 = x0.flip([3]) * &mask + x0 * (mask.ones_like() - &mask);
        }
        let a = self.sqrt_abar.index_select(0, &ts).reshape([-1, 1, 1, 1]);
        let abar = self.abar.index_select(0, &ts).reshape([-1, 1, 1, 1]);
        let x_t = &x0 * &a + &eps * (abar.ones_like() - &abar).sqrt();
        let output = self.weights.model.forward_t(&x_t, &ts.to_kind(Kind::Float), true)?;
        let target = target_from(self.scheduler.prediction_type, &x0, &eps, &abar);
        let loss = (output - target).square().mean(Kind::Float);
        let params = &self.weights.params;
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        loss.backward();
        let _ = clip_grad_norm(params, self.config.train.grad_clip);
        state.adam.step(params, lr);
        let step = state.step;
        self.weights.update_ema(self.config.train.ema_decay.min((1.0 + step as f64) / (10.0 + step as f64)));
        Ok(loss)
    }

    /// Trains from `state.step` to `[train] steps`, or until `--max-minutes` / `--stop-at-step`,
    /// logging every `[train] log_every` steps and checkpointing every `checkpoint_every` steps,
    /// at the end and when stopped.
    fn run(&self, mut state: TrainState) -> Result<()> {
        let (train, args) = (&self.config.train, self.args);
        let (start_step, total) = (state.step, train.steps);
        if start_step >= total {
            tracing::info!("already trained for {start_step} >= {total} steps; exporting");
        }
        let bar = progress_steps(total, args.quiet, "train");
        bar.resume_from(start_step);
        let started = Instant::now();
        let mut log = LossLog::open(&args.out, args.resume, start_step, self.device)?;
        while state.step < total {
            let lr = train.lr.at(state.step, total);
            let loss = self.step(&mut state, lr)?;
            log.add(&loss);
            state.step += 1;
            let step = state.step;
            let out_of_time = args.max_minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0)
                || args.stop_at_step.is_some_and(|s| step >= s);
            if step.is_multiple_of(train.log_every) || step == total || out_of_time {
                let mean_loss = log.write(step, lr, started.elapsed().as_secs_f64(), &self.checkpoint.state_path)?;
                bar.set_message(format!("loss {mean_loss:.4} lr {lr:.2e}"));
            }
            bar.inc(1);
            if step.is_multiple_of(train.checkpoint_every) || step == total || out_of_time {
                self.checkpoint.save(&self.weights, &state)?;
            }
            if out_of_time {
                tracing::info!(
                    "stopping at step {step} (--max-minutes / --stop-at-step); checkpoint written, continue with \
                     --resume"
                );
                break;
            }
        }
        if state.step == start_step {
            self.checkpoint.save(&self.weights, &state)?;
        }
        bar.finish();
        Ok(())
    }
}

/// Runs `ddss-cli train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating output directory {}", args.out.display()))?;
    let resolved_path = args.out.join("train_config.toml");
    let config = resolve_config(&args, &resolved_path)?;
    let scheduler = config.scheduler_config()?;
    let schedule = scheduler.schedule()?;
    ggdm_core::io::write_atomic(&resolved_path, toml::to_string_pretty(&config)?.as_bytes())?;

    let images = load_training_images(&args.data, args.recursive)?;
    let (shape, n_images) = check_training_data(&config, &images.size(), device)?;
    tracing::info!("training data: {} images of shape {:?} from {}", n_images, shape, args.data.display());
    let images = images.to_device(device);

    let weights = Weights::new(&config, device)?;
    let adam = Adam::new(&weights.params, config.train.adam);
    let mut state = TrainState { step: 0, adam, rng: ChaCha8Rng::seed_from_u64(config.train.seed) };
    let checkpoint = Checkpoint::new(&args.out, &scheduler);
    if args.resume {
        checkpoint.resume(&weights, &mut state, device)?;
    }
    let sqrt_abar: Vec<f64> = schedule.abar().iter().map(|a| a.sqrt()).collect();
    let training = Training {
        args: &args,
        config: &config,
        scheduler: &scheduler,
        images,
        n_images,
        shape,
        sqrt_abar: Tensor::from_slice(&sqrt_abar).to_kind(Kind::Float).to_device(device),
        abar: Tensor::from_slice(schedule.abar()).to_kind(Kind::Float).to_device(device),
        weights,
        checkpoint,
        device,
    };
    training.run(state)?;
    tracing::info!("model written to {} (EMA weights, diffusers layout)", args.out.display());
    Ok(())
}
