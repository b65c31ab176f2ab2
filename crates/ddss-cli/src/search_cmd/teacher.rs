//! `[loss] teacher` of a search config: the many-step solver whose samples the search matches
//! (DESIGN.md section 4, "Starting solver and teacher"; [`ddss_opt::teacher`]).
//!
//! The pairs are the initial noise of samples `0 .. pairs` (training) and `2^32 .. 2^32 +
//! validation_pairs` (validation) of the noise stream `seed`, as `ddss-cli sample --seed` draws
//! it, and the teacher's samples from it, run by the code `ddss-cli sample --sampler` runs in
//! batches of `[eval] batch`. So the training pairs equal `ddss-cli sample --sampler NAME --steps N
//! --seed S --num P --batch B --out-npy` on the same device, and changing `pairs` keeps the
//! validation pairs.
//!
//! They are computed once and cached outside the run directory ([`ddss_opt::pair_cache`]): in
//! `cache`, else `$DDSS_CACHE/teacher`, else `$XDG_CACHE_HOME/ddss-rs/teacher`, else
//! `~/.cache/ddss-rs/teacher`. An entry's key holds what the pairs depend on: the SHA-256 of the
//! model's files (weights and `config.json`), the scheduler, the teacher (sampler, steps, eta,
//! spacing; a sampler file's SHA-256), the noise seed and index range, the dtype (f32), the
//! device kind and the network precision. Searches at other K, with other search seeds or other
//! losses share them; `--resume` reads them back.

use super::SearchConfig;
use anyhow::{bail, Context, Result};
use ddss_opt::collective::Collective;
use ddss_opt::pair_cache::{self, CacheOutcome};
use ddss_opt::teacher::{initial_noise, Pairs, Teacher, TeacherDistance, TeacherLoss, TeacherValidation};
use fid_metrics::features::FeatureExtractor;
use ggdm_core::grid::Spacing;
use ggdm_core::noise::PerSampleNoise;
use ggdm_core::registry::{is_sampler_name, SamplerChoice, SAMPLER_NAMES};
use ggdm_nets::model_dir::{LoadedModel, NetworkPrecision};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// `[loss] teacher`: e.g. `teacher = { sampler = "unipc", steps = 100 }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// The teacher: a deterministic `--sampler` name (`ddim` with eta = 0, `ddim-noclip`,
    /// `dpmpp2m`, `dpmpp3m`, `unipc`, `unipc3`; not `ddpm`) or a `sampler.json` without noise.
    pub sampler: String,
    /// The teacher's steps (default 100; a `sampler.json` needs its own K here).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// DDIM eta: must be 0 (the default), as a teacher must be deterministic.
    #[serde(default)]
    pub eta: f64,
    /// The teacher's grid, as `ddss-cli sample --spacing` (default: what `sample` uses: the
    /// model's `timestep_spacing` for `ddim`, the multistep default for the solvers).
    #[serde(default)]
    pub spacing: Option<String>,
    /// `l2` (default: mean squared error per pixel), `l1` (mean absolute error per pixel),
    /// `pseudo_huber` (`sqrt(|x - y|^2 + c^2) - c` on the whole sample, `c = 0.00054 sqrt(d)`,
    /// d values per sample) or `features` (mean squared difference of the loss network's
    /// features, scaled by one over the real features' RMS).
    #[serde(default)]
    pub distance: TeacherDistance,
    /// The loss is `mean distance + kid_weight * KID` in raw units, with KID the `[loss] kind`
    /// loss as the search's `loss` reports it without a teacher (not the x1e3 of the tables).
    /// Default 0: the teacher alone.
    #[serde(default)]
    pub kid_weight: f64,
    /// What the best sampler is chosen by: `distance` (default: the mean teacher distance of the
    /// validation pairs) or `kid` (KID of `[optim] validation_num` held-out samples, as without
    /// a teacher: lets a hybrid loss keep a sampler that moved past the teacher where the model
    /// itself errs).
    #[serde(default)]
    pub validate: TeacherValidation,
    /// Training pairs (default 256); each step's batch draws from them.
    #[serde(default = "default_pairs")]
    pub pairs: usize,
    /// Validation pairs (default 128): the best sampler has the lowest mean distance on them.
    #[serde(default = "default_validation_pairs")]
    pub validation_pairs: usize,
    /// Seed of the pairs' initial noise (default 0x7EAC; independent of `[optim] seed`, so
    /// searches with other seeds share the pairs).
    #[serde(default = "default_noise_seed")]
    pub seed: u64,
    /// The pair cache folder (default: see the module documentation).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

fn default_steps() -> usize {
    100
}
fn default_pairs() -> usize {
    256
}
fn default_validation_pairs() -> usize {
    128
}
fn default_noise_seed() -> u64 {
    0x7EAC
}

/// The first noise index of the validation pairs.
pub const VALIDATION_FIRST: u64 = 1 << 32;

impl TeacherSection {
    /// Range checks naming the key.
    pub fn validate(&self) -> Result<()> {
        let name = self.sampler.as_str();
        if name == "ddpm" {
            bail!(
                "[loss] teacher.sampler = \"ddpm\": a teacher must be a deterministic function of the initial \
                 noise (its pairs are computed once per noise), and DDPM draws fresh noise at every step; use \
                 ddim (eta = 0), dpmpp2m, dpmpp3m, unipc or unipc3"
            );
        }
        if !is_sampler_name(name) {
            bail!(
                "[loss] teacher.sampler = \"{name}\": unknown sampler; expected one of {} (not ddpm) or the path \
                 of a sampler.json",
                SAMPLER_NAMES.join(", ")
            );
        }
        if self.steps == 0 {
            bail!("[loss] teacher.steps = 0: the teacher needs at least 1 step");
        }
        if !(self.eta >= 0.0) {
            bail!("[loss] teacher.eta = {}: must be >= 0", self.eta);
        }
        if self.eta > 0.0 {
            bail!(
                "[loss] teacher.eta = {}: DDIM with eta > 0 adds fresh noise at every step, but a teacher must \
                 be a deterministic function of the initial noise; use eta = 0",
                self.eta
            );
        }
        if let Some(spacing) = &self.spacing {
            Spacing::parse(spacing).with_context(|| format!("[loss] teacher.spacing = \"{spacing}\""))?;
        }
        if !(self.kid_weight >= 0.0) || !self.kid_weight.is_finite() {
            bail!("[loss] teacher.kid_weight = {}: must be a finite number >= 0", self.kid_weight);
        }
        for (key, value) in [("pairs", self.pairs), ("validation_pairs", self.validation_pairs)] {
            if value == 0 {
                bail!("[loss] teacher.{key} = 0: need at least 1");
            }
        }
        Ok(())
    }
}

/// The teacher of `config`'s `[loss]`, its pairs read from the cache or computed (on every rank:
/// rank 0 first, so the others read its entries when the cache folder is shared). `None`
/// without a teacher.
pub fn build(
    config: &SearchConfig,
    model: &LoadedModel,
    extractor: &dyn FeatureExtractor,
    device: Device,
    quiet: bool,
    comm: &dyn Collective,
) -> Result<Option<Teacher>> {
    let Some(section) = &config.loss.teacher else { return Ok(None) };
    if section.kid_weight == 0.0 && config.sampler.learn.sigma {
        tracing::warn!(
            "[loss] teacher without KID: a deterministic teacher wants sigma = 0, so sigma can only move toward \
             0; set [sampler.learn] sigma = false to keep it out of the search"
        );
    }
    let choice = teacher_choice(section, model, device)?;
    let dir = cache_dir(section)?;
    let run = TeacherRun {
        section,
        choice: &choice,
        model,
        batch: config.eval.batch,
        precision: config.model.precision,
        device,
        quiet,
        dir: &dir,
        what: "teacher pairs",
    };
    if !comm.is_root() {
        barrier(comm)?;
    }
    let pairs = (run.pairs(0, section.pairs), run.pairs(VALIDATION_FIRST, section.validation_pairs));
    if comm.is_root() {
        barrier(comm)?;
    }
    let (train, validation) = (pairs.0?, pairs.1?);
    let loss = TeacherLoss { distance: section.distance, kid_weight: section.kid_weight };
    Ok(Some(Teacher::new(loss, train, validation, extractor, device)?.validated_on(section.validate)))
}

/// The samples of the deterministic solver `sampler` (`steps` steps, the `ddss-cli sample` grid)
/// from the initial noise of samples `0 .. count` of the noise stream `seed`, exactly as `ddss-cli
/// sample --seed seed` draws them: read from the pair cache (the teacher's, keyed likewise) or
/// computed in batches of `batch` and cached. The many-step reference line of the comparisons
/// ([`crate::many_step`]) is made this way, so it is computed once per model and evaluation seed.
#[allow(clippy::too_many_arguments)]
pub fn cached_solver_samples(
    sampler: &str,
    steps: usize,
    model: &LoadedModel,
    seed: u64,
    count: usize,
    batch: usize,
    precision: NetworkPrecision,
    device: Device,
    quiet: bool,
) -> Result<Tensor> {
    let section = TeacherSection {
        sampler: sampler.to_string(),
        steps,
        eta: 0.0,
        spacing: None,
        distance: TeacherDistance::L2,
        kid_weight: 0.0,
        validate: TeacherValidation::Distance,
        pairs: count,
        validation_pairs: 1,
        seed,
        cache: None,
    };
    section.validate()?;
    let choice = teacher_choice(&section, model, device)?;
    let dir = cache_dir(&section)?;
    let run = TeacherRun {
        section: &section,
        choice: &choice,
        model,
        batch,
        precision,
        device,
        quiet,
        dir: &dir,
        what: "many-step samples",
    };
    Ok(run.pairs(0, count)?.target)
}

/// Waits for every rank (a no-op in one process).
fn barrier(comm: &dyn Collective) -> Result<()> {
    if comm.size() > 1 {
        comm.all_reduce_sum_f64(&mut [0.0])?;
    }
    Ok(())
}

/// The teacher as `ddss-cli sample` sets it up; a `sampler.json` must have no noise.
fn teacher_choice(section: &TeacherSection, model: &LoadedModel, device: Device) -> Result<SamplerChoice> {
    let choice = crate::sample::choose(
        &section.sampler,
        Some(section.steps),
        section.eta,
        section.spacing.as_deref(),
        model,
        device,
    )
    .with_context(|| format!("[loss] teacher.sampler = \"{}\"", section.sampler))?;
    if let SamplerChoice::Ggdm(sampler) = &choice {
        let sigma = ggdm_core::ggdm::tensor_to_vec(&sampler.coefficients().sigma);
        if let Some(i) = sigma.iter().position(|&s| s != 0.0) {
            bail!(
                "[loss] teacher.sampler = \"{}\": the sampler adds noise (sigma = {} at step {}), but a teacher \
                 must be a deterministic function of the initial noise",
                section.sampler,
                sigma[i],
                i + 1
            );
        }
    }
    Ok(choice)
}

/// The pair cache folder: `[loss] teacher.cache`, `$DDSS_CACHE/teacher`,
/// `$XDG_CACHE_HOME/ddss-rs/teacher` or `~/.cache/ddss-rs/teacher`.
fn cache_dir(section: &TeacherSection) -> Result<PathBuf> {
    if let Some(dir) = &section.cache {
        return Ok(dir.clone());
    }
    if let Some(dir) = std::env::var_os("DDSS_CACHE") {
        return Ok(PathBuf::from(dir).join("teacher"));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("HOME is not set; set DDSS_CACHE or [loss] teacher.cache")?)
                .join(".cache")
        }
    };
    Ok(cache.join("ddss-rs").join("teacher"))
}

/// The files a model's network is loaded from (weights, architecture), for the cache key.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const NAMES: [&str; 5] = [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.pt",
        "model.json",
    ];
    let files: Vec<PathBuf> = [dir.to_path_buf(), dir.join("unet")]
        .iter()
        .flat_map(|d| NAMES.iter().map(move |n| d.join(n)))
        .filter(|p| p.is_file())
        .collect();
    if !files.iter().any(|p| p.extension().is_some_and(|e| e != "json")) {
        bail!("{}: no weights file to key the teacher pair cache by", dir.display());
    }
    Ok(files)
}

/// The device kind of the cache key (the pairs of two GPUs of one kind are interchangeable).
fn device_kind(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// What computing (or reading) one set of pairs needs.
struct TeacherRun<'a> {
    section: &'a TeacherSection,
    choice: &'a SamplerChoice,
    model: &'a LoadedModel,
    /// Samples per teacher batch (`[eval] batch`).
    batch: usize,
    precision: NetworkPrecision,
    device: Device,
    quiet: bool,
    dir: &'a Path,
    /// What the pairs are, for progress and log lines.
    what: &'static str,
}

impl TeacherRun<'_> {
    /// The cache key of the pairs of noise indices `first .. first + count`.
    fn key(&self, first: u64, count: usize) -> Result<serde_json::Value> {
        let section = self.section;
        let memo = self.dir.join("hashes.json");
        let model_sha256 = pair_cache::files_sha256(&model_files(&self.model.dir)?, &memo)?;
        let sampler_file_sha256 = if section.sampler.ends_with(".json") {
            Some(pair_cache::files_sha256(&[PathBuf::from(&section.sampler)], &memo)?)
        } else {
            None
        };
        Ok(serde_json::json!({
            "model_sha256": model_sha256,
            "scheduler": self.model.scheduler,
            "sample_shape": self.model.sample_shape(),
            "teacher": {
                "sampler": section.sampler,
                "sampler_file_sha256": sampler_file_sha256,
                "steps": section.steps,
                "eta": section.eta,
                "spacing": section.spacing,
            },
            "noise_seed": section.seed,
            "first": first,
            "count": count,
            "dtype": "f32",
            "device": device_kind(self.device),
            "precision": self.precision,
        }))
    }

    /// The pairs of noise indices `first .. first + count`, from the cache or computed.
    fn pairs(&self, first: u64, count: usize) -> Result<Pairs> {
        let key = self.key(first, count)?;
        let started = Instant::now();
        let (pairs, outcome) = pair_cache::load_or_compute(self.dir, &key, || {
            self.compute(first, count).map_err(|e| ddss_opt::Error::config("loss.teacher", format!("{e:#}")))
        })?;
        let what = format!("{} {first}..{}", self.what, first + count as u64);
        match outcome {
            CacheOutcome::Read(path) => tracing::info!("{what}: read from {}", path.display()),
            CacheOutcome::Computed(path) | CacheOutcome::Recomputed { path, .. } => tracing::info!(
                "{what}: computed with {} ({} steps) in {:.0} s; cached in {}",
                self.section.sampler,
                self.section.steps,
                started.elapsed().as_secs_f64(),
                path.display()
            ),
        }
        Ok(pairs)
    }

    /// Runs the teacher from the initial noise of indices `first .. first + count`, in batches of
    /// `[eval] batch`, without autograd.
    fn compute(&self, first: u64, count: usize) -> Result<Pairs> {
        let shape = self.model.sample_shape().context("the model does not fix its sample size")?;
        let batch = self.batch.max(1);
        let bar = crate::common::progress(count as u64, self.quiet, self.what);
        let (mut noise, mut samples) = (Vec::new(), Vec::new());
        for start in (0..count).step_by(batch) {
            let n = batch.min(count - start);
            let index = first + start as u64;
            let x_init = initial_noise(self.section.seed, index, n, shape)?;
            let mut step_noise = PerSampleNoise::new(self.section.seed, index, n);
            let out =
                crate::sample::run_batch(self.choice, self.model, &x_init.to_device(self.device), &mut step_noise)?;
            samples.push(out.to_device(Device::Cpu).to_kind(Kind::Float));
            noise.push(x_init);
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        let target = tch::Tensor::cat(&samples, 0);
        if target.isfinite().all().int64_value(&[]) == 0 {
            bail!("the teacher {} gave non-finite samples", self.section.sampler);
        }
        Ok(Pairs::new(tch::Tensor::cat(&noise, 0), target, self.what)?)
    }
}
