//! The DDSS search loop (DESIGN.md section 4): Adam on the sampler parameters, gradient-norm
//! clipping, a learning-rate schedule, validation on held-out noise (KID, or with a teacher the
//! teacher distance of the validation pairs: [`ValidationMetric`]), best-so-far tracking,
//! `metrics.jsonl`, atomic checkpoints and exact resumption, and a NaN/inf guard.
//!
//! Every step's noise is derived from `(seed, step)`, validation noise from `seed` alone, so a run
//! that is stopped and resumed from its checkpoint takes exactly the same steps as one that was
//! not (on the same device: the final `sampler.json` is bit-identical on CPU).
//!
//! [`run_search_with`] runs the same loop data-parallel over the ranks of a [`Collective`]: every
//! rank computes its shard of each step's batch and of the validation batch, all ranks take the
//! same steps, and rank 0 alone writes `metrics.jsonl` and the checkpoint. The checkpoint holds
//! no per-rank state, so a run can be resumed with any number of ranks.

use crate::collective::{shard, Collective, SingleProcess};
use crate::objective::{BatchNoise, Evaluation, Objective};
use crate::optim::{clip_grad_norm, Adam, AdamConfig, LrSchedule};
use crate::teacher::Teacher;
use crate::unroll::{MemoryPlan, Remat};
use crate::{Error, Result};
use ggdm_core::ggdm::{GgdmParams, GgdmSampler, LearnablePart};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Optimisation settings of a search (`[optim]` of a search config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSettings {
    /// Optimiser steps.
    pub steps: u64,
    /// Samples per step (the KID batch).
    pub batch_size: usize,
    /// Samples per micro-batch (memory); the gradient is exact for any value.
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// Samples per backward pass through the feature network (memory; exact for any value;
    /// default: a micro-batch at once). See [`Objective::feature_chunk`].
    #[serde(default)]
    pub feature_chunk: Option<usize>,
    /// Learning rate and schedule.
    pub lr: LrSchedule,
    /// Adam settings.
    #[serde(default)]
    pub adam: AdamConfig,
    /// Per-part learning-rate multipliers.
    #[serde(default)]
    pub lr_scale: LrScales,
    /// Gradient-norm clipping.
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Rematerialisation strategy.
    #[serde(default)]
    pub remat: Remat,
    /// Seed of the training and validation noise.
    #[serde(default)]
    pub seed: u64,
    /// Steps between validations (0: only at the end).
    #[serde(default)]
    pub validate_every: u64,
    /// Samples of the validation batch (held-out noise).
    #[serde(default = "default_validation_num")]
    pub validation_num: usize,
    /// Steps between checkpoints.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Consecutive rejected (non-finite) steps before the run stops.
    #[serde(default = "default_max_faults")]
    pub max_faults: u32,
}

/// Learning-rate multipliers per learnable part. The coefficient residuals act on whole states
/// (the first of which is pure noise), so they take smaller steps than the grid logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrScales {
    /// Grid logits (default 1).
    pub timesteps: f64,
    /// `u`, `w` residuals (default 0.1).
    pub coefficients: f64,
    /// `sigma` residuals (default 0.1).
    pub sigma: f64,
    /// `p`, `q` residuals (default 0.1).
    pub prediction: f64,
}

impl Default for LrScales {
    fn default() -> Self {
        Self { timesteps: 1.0, coefficients: 0.1, sigma: 0.1, prediction: 0.1 }
    }
}

impl LrScales {
    /// The multiplier of `part`.
    pub fn of(&self, part: LearnablePart) -> f64 {
        match part {
            LearnablePart::Timesteps => self.timesteps,
            LearnablePart::Coefficients => self.coefficients,
            LearnablePart::Sigma => self.sigma,
            LearnablePart::Prediction => self.prediction,
        }
    }
}

fn default_validation_num() -> usize {
    256
}
fn default_checkpoint_every() -> u64 {
    10
}
fn default_max_faults() -> u32 {
    5
}

impl SearchSettings {
    /// Range checks naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("optim.steps", "0 (need at least 1)"));
        }
        check_step_batch(self, 1)?;
        if self.micro_batch == Some(0) {
            return Err(Error::config("optim.micro_batch", "0 (need at least 1)"));
        }
        if self.feature_chunk == Some(0) {
            return Err(Error::config("optim.feature_chunk", "0 (need at least 1)"));
        }
        if self.validation_num < 2 {
            return Err(Error::config("optim.validation_num", format!("{} (need at least 2)", self.validation_num)));
        }
        if self.checkpoint_every == 0 {
            return Err(Error::config("optim.checkpoint_every", "0 (need at least 1)"));
        }
        if let Some(c) = self.grad_clip {
            if !(c > 0.0) {
                return Err(Error::config("optim.grad_clip", format!("{c} (must be > 0)")));
            }
        }
        self.lr.validate().map_err(|e| prefix("optim.lr", e))?;
        for part in LearnablePart::ALL {
            let v = self.lr_scale.of(part);
            if !(v >= 0.0) || !v.is_finite() {
                return Err(Error::config(format!("optim.lr_scale.{}", part.name()), format!("{v} (must be >= 0)")));
            }
        }
        self.adam.validate().map_err(|e| prefix("optim.adam", e))?;
        Ok(())
    }
}

fn prefix(section: &str, e: Error) -> Error {
    match e {
        Error::Config { key, msg } => Error::config(format!("{section}.{key}"), msg),
        other => other,
    }
}

/// A 64-bit mix of two values (SplitMix64 finaliser), for per-step noise seeds.
pub fn mix_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The noise of training step `step`.
pub fn step_noise(settings: &SearchSettings, step: u64) -> BatchNoise {
    BatchNoise { seed: mix_seed(settings.seed, step), batch: settings.batch_size }
}

/// The held-out validation noise (never used for training).
pub fn validation_noise(settings: &SearchSettings) -> BatchNoise {
    BatchNoise { seed: mix_seed(settings.seed ^ 0x005E_ED0F_0A11_DA7E, u64::MAX), batch: settings.validation_num }
}

/// What happened in one step (one line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// 1-based step number.
    pub step: u64,
    /// Training loss of the step's batch (before the update).
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the gradient was clipped to `optim.grad_clip` (an exploding gradient).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clipped: bool,
    /// Learning rate used.
    pub lr: f64,
    /// Validation KID after the step, when validated (without a teacher).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_kid: Option<f64>,
    /// With a teacher: the mean teacher distance of the validation pairs after the step (raw
    /// units of `loss.teacher.distance`), when validated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_teacher_distance: Option<f64>,
    /// A rejected step's diagnosis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Seconds since the run (or resumption) started.
    pub elapsed_s: f64,
    /// Bytes all-gathered (features) and all-reduced (parameter gradients) by the step across
    /// ranks; only in data-parallel runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_bytes: Option<u64>,
    /// Network calls whose activations the step stored (the rest were recomputed), as a
    /// memory-budget rematerialisation chose them (its last unroll's
    /// [`MemoryPlan::stored_steps`]); only with `remat = { memory_budget = ... }` or
    /// `{ free_memory = ... }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_calls: Option<usize>,
}

/// The result of a search.
#[derive(Debug)]
pub struct SearchOutcome {
    /// What validation measures ([`ValidationMetric::Kid`] without a teacher).
    pub validation_metric: ValidationMetric,
    /// The validation metric at initialisation.
    pub initial_validation: f64,
    /// Best (lowest) validation metric seen.
    pub best_validation: f64,
    /// Step of the best validation metric (0 = the initial sampler).
    pub best_step: u64,
    /// Steps taken in total.
    pub steps: u64,
    /// Rejected steps.
    pub faults: u64,
    /// Steps whose gradient was clipped (this run or resumption).
    pub clipped: u64,
}

/// Callbacks for progress display.
pub trait SearchObserver {
    /// After each step.
    fn on_step(&mut self, _record: &StepRecord) {}

    /// Asked after each step (and its checkpoint, if one was due): `true` ends the run there, as an
    /// interruption would; `--resume` continues it.
    fn should_stop(&mut self, _step: u64) -> bool {
        false
    }
}

/// An observer that does nothing.
pub struct NoObserver;
impl SearchObserver for NoObserver {}

const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";

fn named_params(params: &GgdmParams, prefix: &str) -> Vec<(String, Tensor)> {
    params.named().iter().map(|(n, t)| (format!("{prefix}.{n}"), t.detach().to_device(Device::Cpu).copy())).collect()
}

fn params_from(named: &[(String, Tensor)], prefix: &str, like: &GgdmParams, path: &Path) -> Result<GgdmParams> {
    let find = |name: &str| -> Result<Tensor> {
        let key = format!("{prefix}.{name}");
        named
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| Error::File { path: path.to_path_buf(), msg: format!("checkpoint lacks `{key}`") })
    };
    let device = like.grid_logits.device();
    Ok(GgdmParams {
        grid_logits: find("grid_logits")?.to_device(device),
        u_residual: find("u_residual")?.to_device(device),
        w_residual: find("w_residual")?.to_device(device),
        sigma_residual: find("sigma_residual")?.to_device(device),
        p_residual: find("p_residual")?.to_device(device),
        q_residual: find("q_residual")?.to_device(device),
    })
}

fn write_checkpoint(dir: &Path, named: &[(String, Tensor)]) -> Result<()> {
    ggdm_core::io::write_atomic_with(&dir.join(CHECKPOINT_FILE), |tmp| {
        Tensor::write_safetensors(named, tmp)
            .map_err(|e| ggdm_core::Error::format(tmp, format!("cannot write the checkpoint: {e}")))
    })?;
    Ok(())
}

fn append_metrics(path: &Path, record: &StepRecord) -> Result<()> {
    let line = serde_json::to_string(record).map_err(|e| Error::config("metrics", e.to_string()))?;
    ggdm_core::io::append_line(path, &line)?;
    Ok(())
}

/// Keeps only the complete `metrics.jsonl` lines of steps `<= last_step`: lines a killed run wrote
/// after its last checkpoint are replaced by the resumed run's, and a line torn by the kill is
/// dropped.
fn truncate_metrics(path: &Path, last_step: u64) -> Result<()> {
    ggdm_core::io::truncate_jsonl(path, "step", last_step)?;
    Ok(())
}

/// Whether a finite gradient of norm `grad_norm` was clipped by `grad_clip`.
fn event_free_clip(finite_loss: bool, grad_norm: f64, grad_clip: Option<f64>) -> bool {
    finite_loss && grad_norm.is_finite() && grad_clip.is_some_and(|c| grad_norm > c)
}

fn all_finite(params: &GgdmParams) -> bool {
    params.named().iter().all(|(_, t)| {
        let finite: bool = tch::no_grad(|| t.isfinite().all().int64_value(&[]) != 0);
        finite
    })
}

fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// Validation KID (f64, unbiased MMD^2 with the cubic kernel over the whole validation batch) of
/// the current sampler. Samples and features are computed micro-batch by micro-batch.
pub fn validation_kid(objective: &Objective, settings: &SearchSettings, real: &Tensor) -> Result<f64> {
    let noise = validation_noise(settings);
    let features = validation_features(objective, noise, 0..noise.batch)?;
    fid_metrics::kid::mmd2_unbiased(&features, &real.to_device(Device::Cpu))
        .map_err(|e| Error::config("validation", e.to_string()))
}

/// Features (CPU) of validation samples `range`, one micro-batch at a time from `range.start`.
fn validation_features(objective: &Objective, noise: BatchNoise, range: std::ops::Range<usize>) -> Result<Tensor> {
    let mut chunks = Vec::new();
    let mut first = range.start;
    while first < range.end {
        let count = objective.micro_batch.min(range.end - first);
        let samples = objective.generate_range(noise, first..first + count)?;
        let features = tch::no_grad(|| objective.extractor.features(&samples.to_device(objective.extractor.device())))?;
        chunks.push(features.to_device(Device::Cpu));
        first += count;
    }
    if chunks.is_empty() {
        let dim = objective.extractor.dim() as i64;
        return Ok(Tensor::zeros([0, dim], (Kind::Float, Device::Cpu)));
    }
    Ok(Tensor::cat(&chunks, 0))
}

/// [`validation_kid`] with the validation batch split across the ranks of `comm`: its
/// micro-batches are divided into contiguous runs, one per rank, and the features all-gathered, so
/// the value is the single process's exactly, on every rank.
pub fn validation_kid_sharded(
    objective: &Objective,
    settings: &SearchSettings,
    real: &Tensor,
    comm: &dyn Collective,
) -> Result<f64> {
    if comm.size() <= 1 {
        return validation_kid(objective, settings, real);
    }
    let noise = validation_noise(settings);
    let features = validation_features(objective, noise, validation_share(objective, noise, comm))?;
    let dim = objective.extractor.dim() as i64;
    // As f32 on every rank (also one whose share is empty), like the features of the networks.
    let (all, _) = crate::objective::gather_features(&features.to_kind(Kind::Float), comm)?;
    let all = all.reshape([-1, dim]);
    fid_metrics::kid::mmd2_unbiased(&all, &real.to_device(Device::Cpu))
        .map_err(|e| Error::config("validation", e.to_string()))
}

/// This rank's validation samples: the batch's micro-batches divided into contiguous runs, one
/// per rank.
fn validation_share(objective: &Objective, noise: BatchNoise, comm: &dyn Collective) -> std::ops::Range<usize> {
    let micro = objective.micro_batch.max(1);
    let chunks = shard(noise.batch.div_ceil(micro), comm.rank(), comm.size());
    (chunks.start * micro).min(noise.batch)..(chunks.end * micro).min(noise.batch)
}

/// The mean teacher distance (f64) of the current sampler on every pair of the objective's
/// teacher batch (the validation pairs), without autograd: sample `i` starts from its pair's
/// noise and takes its step noise from stream `(noise.seed, i)`. Split across the ranks of `comm`
/// like [`validation_kid_sharded`]; every rank returns the same value.
pub fn validation_teacher_distance(objective: &Objective, noise: BatchNoise, comm: &dyn Collective) -> Result<f64> {
    let teacher = objective.teacher.as_ref().ok_or_else(|| Error::config("loss.teacher", "no teacher"))?;
    let range = validation_share(objective, noise, comm);
    let mut sum = [0.0];
    let mut first = range.start;
    while first < range.end {
        let count = objective.micro_batch.max(1).min(range.end - first);
        let samples = objective.generate_range(noise, first..first + count)?;
        let distance = tch::no_grad(|| match teacher.pixel_sum(&samples, first) {
            Some(d) => Ok(d),
            None => {
                let extractor = objective.extractor;
                let features = extractor.features(&samples.to_device(extractor.device()))?;
                teacher.feature_distance_sum(&features, first, objective.loss.scale())
            }
        })?;
        sum[0] += distance.double_value(&[]);
        first += count;
    }
    if comm.size() > 1 {
        comm.all_reduce_sum_f64(&mut sum)?;
    }
    Ok(sum[0] / noise.batch as f64)
}

/// What a search validates on, and so chooses its best sampler by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationMetric {
    /// KID (unbiased MMD^2, raw features) of `optim.validation_num` held-out samples against the
    /// real features ([`validation_kid_sharded`]).
    Kid,
    /// The mean teacher distance of the validation pairs ([`validation_teacher_distance`]).
    TeacherDistance,
}

impl ValidationMetric {
    /// The name in `metrics.jsonl` and `sampler.json` (`validation_<name>`).
    pub fn key(self) -> &'static str {
        match self {
            ValidationMetric::Kid => "kid",
            ValidationMetric::TeacherDistance => "teacher_distance",
        }
    }

    /// The name in log lines.
    pub fn label(self) -> &'static str {
        match self {
            ValidationMetric::Kid => "KID",
            ValidationMetric::TeacherDistance => "teacher distance",
        }
    }
}

/// The validation metric of the sampler's current parameters (every rank gets the same value).
fn validate(
    parts: &ObjectiveParts,
    sampler: &GgdmSampler,
    settings: &SearchSettings,
    real: &Tensor,
    comm: &dyn Collective,
) -> Result<f64> {
    match (parts.validation_metric(), parts.teacher) {
        (ValidationMetric::TeacherDistance, Some(teacher)) => {
            let noise = BatchNoise { batch: teacher.num_validation(), ..validation_noise(settings) };
            validation_teacher_distance(&parts.validation_objective(sampler, settings), noise, comm)
        }
        _ => validation_kid_sharded(&parts.objective(sampler, settings), settings, real, comm),
    }
}

/// Runs (or resumes) a search in `run_dir`. `sampler` holds the initial parameters on entry and
/// the best ones (by validation KID) on return. `real` are the real features the validation KID
/// is measured against.
pub fn run_search(
    sampler: &mut GgdmSampler,
    objective_parts: ObjectiveParts,
    settings: &SearchSettings,
    real: &Tensor,
    run_dir: &Path,
    resume: bool,
    observer: &mut dyn SearchObserver,
) -> Result<SearchOutcome> {
    run_search_with(sampler, objective_parts, settings, real, run_dir, resume, observer, &SingleProcess)
}

/// [`run_search`] data-parallel over the ranks of `comm`: every rank must call it with the same
/// arguments (`run_dir` on a file system all ranks see, for `resume`); rank 0 alone writes files.
/// Each rank returns the same outcome and sampler. With a teacher ([`ObjectiveParts::teacher`])
/// the best sampler is the one with the lowest teacher distance on the validation pairs.
#[allow(clippy::too_many_arguments)]
pub fn run_search_with(
    sampler: &mut GgdmSampler,
    objective_parts: ObjectiveParts,
    settings: &SearchSettings,
    real: &Tensor,
    run_dir: &Path,
    resume: bool,
    observer: &mut dyn SearchObserver,
    comm: &dyn Collective,
) -> Result<SearchOutcome> {
    settings.validate()?;
    check_step_batch(settings, comm.size())?;
    if sampler.trainable().is_empty() {
        tracing::warn!("no part of the sampler is learnable: the search only measures it");
    }
    let mut run = SearchRun::new(objective_parts, settings, real, run_dir, comm);
    let mut progress = run.begin(sampler, resume)?;
    while progress.step < settings.steps {
        let mut record = run.step(sampler, &mut progress)?;
        run.validate_if_due(sampler, &mut progress, &mut record)?;
        run.record_step(sampler, &progress, &record, observer)?;
        let step = record.step;
        if step < settings.steps && stop_everywhere(observer.should_stop(step), comm)? {
            tracing::info!("stopped at step {step}; continue with --resume");
            break;
        }
    }
    sampler.restore(&progress.best_params)?;
    Ok(SearchOutcome {
        validation_metric: run.metric,
        initial_validation: progress.initial,
        best_validation: progress.best,
        best_step: progress.best_step,
        steps: progress.step,
        faults: progress.faults,
        clipped: run.clipped_steps,
    })
}

/// Checks the batch of every training step ([`BatchNoise::check`]) for `ranks` ranks, naming
/// `optim.batch_size`.
fn check_step_batch(settings: &SearchSettings, ranks: usize) -> Result<()> {
    step_noise(settings, 0).check(ranks).map_err(|e| prefix("optim", e))
}

/// One run of [`run_search_with`]: what it was given, its files, and what it counts from step to
/// step besides the checkpointed [`Progress`].
struct SearchRun<'r, 'a> {
    parts: ObjectiveParts<'a>,
    settings: &'r SearchSettings,
    real: &'r Tensor,
    run_dir: &'r Path,
    comm: &'r dyn Collective,
    metric: ValidationMetric,
    metrics_path: PathBuf,
    checkpoint_path: PathBuf,
    started: Instant,
    /// Rejected steps in a row.
    consecutive_faults: u32,
    /// Steps whose gradient was clipped (this run or resumption).
    clipped_steps: u64,
    /// Whether the communication volume per step has been logged.
    logged_volume: bool,
    /// The last memory plan logged ([`MemoryPlan::log_if_changed`]).
    last_plan: Option<MemoryPlan>,
}

impl<'r, 'a> SearchRun<'r, 'a> {
    fn new(
        parts: ObjectiveParts<'a>,
        settings: &'r SearchSettings,
        real: &'r Tensor,
        run_dir: &'r Path,
        comm: &'r dyn Collective,
    ) -> Self {
        Self {
            metric: parts.validation_metric(),
            parts,
            settings,
            real,
            run_dir,
            comm,
            metrics_path: run_dir.join(METRICS_FILE),
            checkpoint_path: run_dir.join(CHECKPOINT_FILE),
            started: Instant::now(),
            consecutive_faults: 0,
            clipped_steps: 0,
            logged_volume: false,
            last_plan: None,
        }
    }

    /// Where the run starts: the checkpoint's progress when resuming (`metrics.jsonl` cut back to
    /// it), else a new search from the validated initial sampler (`metrics.jsonl` removed).
    fn begin(&self, sampler: &mut GgdmSampler, resume: bool) -> Result<Progress> {
        let root = self.comm.is_root();
        if resume {
            let progress = Progress::resume(sampler, self.settings, &self.checkpoint_path)?;
            if root {
                truncate_metrics(&self.metrics_path, progress.step)?;
            }
            tracing::info!("resumed from step {} ({})", progress.step, self.checkpoint_path.display());
            return Ok(progress);
        }
        let initial = self.validate(sampler)?;
        if root {
            let _ = std::fs::remove_file(&self.metrics_path);
        }
        tracing::info!("validation {} at initialisation: {initial:.6}", self.metric.label());
        Ok(Progress::start(sampler, self.settings, initial))
    }

    /// The validation metric of the sampler's current parameters (every rank gets the same value).
    fn validate(&self, sampler: &GgdmSampler) -> Result<f64> {
        validate(&self.parts, sampler, self.settings, self.real, self.comm)
    }

    /// Takes step `progress.step + 1`: the gradient of its batch, clipping, and the Adam update,
    /// or, when the loss, the gradient or the updated parameters are not finite, the step's
    /// rejection ([`Self::reject`]). Returns its record, not yet validated.
    fn step(&mut self, sampler: &mut GgdmSampler, progress: &mut Progress) -> Result<StepRecord> {
        let settings = self.settings;
        let step = progress.step;
        let trainable = sampler.trainable_parts();
        let params: Vec<Tensor> = trainable.iter().map(|(_, t)| t.shallow_clone()).collect();
        let lr = settings.lr.at(step, settings.steps);
        let before = sampler.snapshot();
        zero_grads(&params);
        let (evaluation, comm_bytes) = self.gradient(sampler, step)?;
        let loss = evaluation.loss;
        let mut event = (!loss.is_finite()).then(|| format!("non-finite loss {loss}"));
        let grad_norm = clip_grad_norm(&params, settings.grad_clip);
        let clipped = event_free_clip(event.is_none(), grad_norm, settings.grad_clip);
        if clipped {
            self.clipped_steps += 1;
            tracing::debug!("step {}: gradient norm {grad_norm:.4e} clipped to {:?}", step + 1, settings.grad_clip);
        }
        if event.is_none() && !grad_norm.is_finite() {
            event = Some(format!("non-finite gradient norm {grad_norm}"));
        }
        if event.is_none() {
            let scales: Vec<f64> = trainable.iter().map(|&(part, _)| settings.lr_scale.of(part)).collect();
            progress.adam.step_scaled(&params, lr, &scales);
            if !all_finite(&sampler.params) {
                event = Some("parameters became non-finite after the update".into());
            }
        }
        progress.step += 1;
        let mut record = StepRecord {
            step: progress.step,
            loss,
            grad_norm,
            clipped,
            lr,
            validation_kid: None,
            validation_teacher_distance: None,
            event: None,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            comm_bytes,
            stored_calls: evaluation.memory_plan.map(|p| p.stored_steps),
        };
        match event {
            Some(what) => self.reject(sampler, progress, &before, &mut record, &what)?,
            None => self.consecutive_faults = 0,
        }
        Ok(record)
    }

    /// The loss of training step `step` (0-based), its gradient accumulated into the sampler
    /// parameters, over the ranks of a data-parallel run; also the bytes that run communicated.
    /// Logs the communication volume once, and the memory plan when it changes.
    fn gradient(&mut self, sampler: &GgdmSampler, step: u64) -> Result<(Evaluation, Option<u64>)> {
        let objective = self.parts.training_objective(sampler, self.settings, step);
        let noise = step_noise(self.settings, step);
        let comm = self.comm;
        let (evaluation, comm_bytes) = if comm.size() > 1 {
            let (evaluation, volume) = objective.loss_and_grad_sharded(noise, comm)?;
            if comm_bytes_unlogged(&mut self.logged_volume) {
                tracing::info!(
                    "communication per step across {} ranks: {} bytes ({} all-gathered features, {} all-reduced \
                     gradients; independent of the image size)",
                    comm.size(),
                    volume.total(),
                    volume.gathered,
                    volume.reduced
                );
            }
            (evaluation, Some(volume.total()))
        } else {
            (objective.loss_and_grad(noise)?, None)
        };
        if let Some(plan) = evaluation.memory_plan {
            plan.log_if_changed(&mut self.last_plan);
        }
        Ok((evaluation, comm_bytes))
    }

    /// Rejects the step of `record` (for the reason `what`): restores the parameters from
    /// `before` it and notes the rejection in the record. More than `optim.max_faults` rejected
    /// steps in a row end the run with an error, after the record is written.
    fn reject(
        &mut self,
        sampler: &mut GgdmSampler,
        progress: &mut Progress,
        before: &GgdmParams,
        record: &mut StepRecord,
        what: &str,
    ) -> Result<()> {
        sampler.restore(before)?;
        zero_grads(&sampler.trainable());
        self.consecutive_faults += 1;
        progress.faults += 1;
        tracing::warn!("step {} rejected ({what}); restored the last good parameters", record.step);
        record.event = Some(format!("rejected: {what}; restored the last good parameters"));
        if self.consecutive_faults > self.settings.max_faults {
            if self.comm.is_root() {
                append_metrics(&self.metrics_path, record)?;
            }
            return Err(Error::Numerical(format!(
                "{} consecutive steps were rejected (last: {what}). The sampler diverges: lower optim.lr, set \
                 optim.grad_clip, or check the model and the features for NaNs. The last good parameters are in {}",
                self.consecutive_faults,
                self.checkpoint_path.display()
            )));
        }
        Ok(())
    }

    /// Validates the sampler after the step of `record` when `optim.validate_every` (or the last
    /// step) says so, recording the value and keeping the best sampler in `progress`.
    fn validate_if_due(&self, sampler: &GgdmSampler, progress: &mut Progress, record: &mut StepRecord) -> Result<()> {
        let (step, settings) = (record.step, self.settings);
        let due =
            (settings.validate_every > 0 && step.is_multiple_of(settings.validate_every)) || step == settings.steps;
        if due {
            let value = self.validate(sampler)?;
            progress.record_validation(sampler, self.metric, value, record);
        }
        Ok(())
    }

    /// Records a finished step: its line of `metrics.jsonl` (rank 0), the observer's
    /// [`SearchObserver::on_step`], and the checkpoint when one is due (rank 0).
    fn record_step(
        &self,
        sampler: &GgdmSampler,
        progress: &Progress,
        record: &StepRecord,
        observer: &mut dyn SearchObserver,
    ) -> Result<()> {
        let root = self.comm.is_root();
        if root {
            append_metrics(&self.metrics_path, record)?;
        }
        observer.on_step(record);
        let (step, settings) = (record.step, self.settings);
        if root && (step.is_multiple_of(settings.checkpoint_every) || step == settings.steps) {
            progress.write_checkpoint(self.run_dir, sampler)?;
        }
        Ok(())
    }
}

/// What a search carries from step to step and keeps in its checkpoint.
struct Progress {
    /// Steps taken.
    step: u64,
    /// The best validation metric and its step and parameters.
    best: f64,
    best_step: u64,
    best_params: GgdmParams,
    /// The validation metric at initialisation.
    initial: f64,
    /// Rejected steps in total.
    faults: u64,
    adam: Adam,
}

impl Progress {
    /// A new search whose initial sampler has the validation metric `initial`.
    fn start(sampler: &GgdmSampler, settings: &SearchSettings, initial: f64) -> Self {
        Self {
            step: 0,
            best: initial,
            best_step: 0,
            best_params: sampler.snapshot(),
            initial,
            faults: 0,
            adam: Adam::new(&sampler.trainable(), settings.adam),
        }
    }

    /// The progress in the checkpoint at `checkpoint_path`, with the sampler set to its current
    /// parameters.
    fn resume(sampler: &mut GgdmSampler, settings: &SearchSettings, checkpoint_path: &Path) -> Result<Self> {
        let named = Tensor::read_safetensors(checkpoint_path).map_err(|e| Error::File {
            path: checkpoint_path.to_path_buf(),
            msg: format!("cannot read the checkpoint to resume from: {e}"),
        })?;
        let meta = named.iter().find(|(n, _)| n == "meta").map(|(_, t)| t.shallow_clone()).ok_or_else(|| {
            Error::File { path: checkpoint_path.to_path_buf(), msg: "checkpoint lacks `meta`".into() }
        })?;
        let current = params_from(&named, "params", &sampler.params, checkpoint_path)?;
        let best_params = params_from(&named, "best", &sampler.params, checkpoint_path)?;
        let adam_state: Vec<(String, Tensor)> = named
            .iter()
            .filter(|(n, _)| n.starts_with("adam."))
            .map(|(n, t)| (n.clone(), t.to_device(sampler.device())))
            .collect();
        let meta_vals = ggdm_core::ggdm::tensor_to_vec(&meta);
        if meta_vals.len() != 5 || meta_vals.iter().any(|v| v.is_nan()) {
            return Err(Error::File {
                path: checkpoint_path.to_path_buf(),
                msg: format!("checkpoint entry `meta` must hold 5 numbers, found {meta_vals:?}"),
            });
        }
        // Both parameter sets must fit this config's sampler (a changed K is caught here).
        sampler.restore(&best_params)?;
        sampler.restore(&current)?;
        let mut adam = Adam::new(&sampler.trainable(), settings.adam);
        adam.load_state(&adam_state)?;
        Ok(Self {
            step: meta_vals[0] as u64,
            best: meta_vals[1],
            best_step: meta_vals[2] as u64,
            best_params,
            initial: meta_vals[3],
            faults: meta_vals[4] as u64,
            adam,
        })
    }

    /// Records the validation metric `value` of the current sampler in `record` and keeps the
    /// sampler when it is the best so far.
    fn record_validation(
        &mut self,
        sampler: &GgdmSampler,
        metric: ValidationMetric,
        value: f64,
        record: &mut StepRecord,
    ) {
        match metric {
            ValidationMetric::Kid => record.validation_kid = Some(value),
            ValidationMetric::TeacherDistance => record.validation_teacher_distance = Some(value),
        }
        if !value.is_finite() {
            tracing::warn!(
                "step {}: validation {} is {value}; this step cannot become the best",
                self.step,
                metric.label()
            );
            let note = format!("non-finite validation {} {value}", metric.label());
            record.event = Some(match record.event.take() {
                Some(e) => format!("{e}; {note}"),
                None => note,
            });
        }
        if value < self.best || (value.is_finite() && !self.best.is_finite()) {
            self.best = value;
            self.best_step = self.step;
            self.best_params = sampler.snapshot();
        }
    }

    /// Writes the checkpoint (current and best parameters, Adam state, progress) to `run_dir`.
    fn write_checkpoint(&self, run_dir: &Path, sampler: &GgdmSampler) -> Result<()> {
        let mut named = named_params(&sampler.params, "params");
        named.extend(named_params(&self.best_params, "best"));
        for (n, t) in self.adam.state() {
            named.push((n, t.detach().to_device(Device::Cpu)));
        }
        let meta = [self.step as f64, self.best, self.best_step as f64, self.initial, self.faults as f64];
        named.push(("meta".into(), Tensor::from_slice(&meta).to_kind(Kind::Double)));
        write_checkpoint(run_dir, &named)
    }
}

/// `true` once (the communication volume is logged at the first step a run or resumption takes).
fn comm_bytes_unlogged(logged: &mut bool) -> bool {
    !std::mem::replace(logged, true)
}

/// Whether any rank's observer asked to stop (all ranks stop at the same step).
fn stop_everywhere(local: bool, comm: &dyn Collective) -> Result<bool> {
    if comm.size() <= 1 {
        return Ok(local);
    }
    let mut votes = [f64::from(u8::from(local))];
    comm.all_reduce_sum_f64(&mut votes)?;
    Ok(votes[0] > 0.0)
}

/// The parts of an [`Objective`] other than the sampler (which changes during the search).
pub struct ObjectiveParts<'a> {
    /// The diffusion model.
    pub model: &'a dyn ggdm_nets::DifferentiableDenoiser,
    /// The loss's feature network.
    pub extractor: &'a dyn fid_metrics::features::FeatureExtractor,
    /// The loss.
    pub loss: &'a crate::loss::FeatureLoss,
    /// `[C, H, W]` of a sample.
    pub sample_shape: [i64; 3],
    /// Device.
    pub device: Device,
    /// The teacher the loss matches (`None`: the feature loss alone, DDSS).
    pub teacher: Option<&'a Teacher>,
}

impl<'a> ObjectiveParts<'a> {
    /// The objective for the sampler's current parameters.
    pub fn objective<'s>(&'s self, sampler: &'s GgdmSampler, settings: &SearchSettings) -> Objective<'s>
    where
        'a: 's,
    {
        Objective {
            sampler,
            model: self.model,
            extractor: self.extractor,
            loss: self.loss,
            remat: settings.remat,
            micro_batch: settings.micro_batch.unwrap_or(settings.batch_size),
            feature_chunk: settings.feature_chunk,
            sample_shape: self.sample_shape,
            device: self.device,
            state_kind: Kind::Float,
            teacher: None,
        }
    }

    /// The objective of training step `step` (0-based): with a teacher, on the step's training
    /// pairs ([`Teacher::training_batch`] from `optim.seed`).
    pub fn training_objective<'s>(
        &'s self,
        sampler: &'s GgdmSampler,
        settings: &SearchSettings,
        step: u64,
    ) -> Objective<'s>
    where
        'a: 's,
    {
        let teacher = self.teacher.map(|t| t.training_batch(settings.seed, step, settings.batch_size));
        Objective { teacher, ..self.objective(sampler, settings) }
    }

    /// The objective on the validation pairs (without a teacher: [`Self::objective`]).
    pub fn validation_objective<'s>(&'s self, sampler: &'s GgdmSampler, settings: &SearchSettings) -> Objective<'s>
    where
        'a: 's,
    {
        Objective { teacher: self.teacher.map(Teacher::validation_batch), ..self.objective(sampler, settings) }
    }

    /// What a search with these parts validates on.
    pub fn validation_metric(&self) -> ValidationMetric {
        match self.teacher.map(Teacher::validation_metric) {
            Some(crate::teacher::TeacherValidation::Distance) => ValidationMetric::TeacherDistance,
            Some(crate::teacher::TeacherValidation::Kid) | None => ValidationMetric::Kid,
        }
    }
}

/// The checkpoint path inside a run directory.
pub fn checkpoint_path(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINT_FILE)
}
