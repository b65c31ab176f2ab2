//! `ddss-cli search --config FILE.toml`: learns a GGDM sampler for a model by DDSS and compares it
//! with the baselines (DESIGN.md sections 4 and 5).
//!
//! A run directory holds `config.toml` (the resolved config), `checkpoint.safetensors`
//! (resumable), `metrics.jsonl`, `sampler.json` (the learned sampler, best by validation KID, or
//! with a `[loss] teacher` by the teacher distance of the validation pairs: [`teacher`]),
//! PNG grids (`grid_<sampler>.png`, `before.png`, `after.png` on the same noise, side by side in
//! `before_after.png`), the pictures of [`crate::pictures`] (`curves.png`, `sampler.png`), and
//! `results.json` (one row per sampler and feature set, with `held_out` telling whether the loss
//! ever saw that feature network).
//!
//! Under MPI (the `mpi` feature, started by `mpirun`/`srun`) every rank runs this command: each
//! step's batch, the validation batch and the comparison's samples are split across the ranks
//! (see [`ddss_opt::collective`]), and rank 0 alone writes the run directory and prints.

use crate::common::{parse_device, progress, progress_steps, write_grid};
use crate::metrics_cmd::{sample_features_sharded, EvalOptions};
use anyhow::{bail, Context, Result};
use ddss_opt::collective::Collective;
use ddss_opt::loss::{FeatureLoss, LossKind};
use ddss_opt::search::{run_search_with, ObjectiveParts, SearchObserver, SearchOutcome, SearchSettings, StepRecord};
use fid_metrics::features::{extract_features_batched, open_extractor, FeatureExtractor};
use ggdm_core::ggdm::{GgdmSampler, ModelIdentity};
use ggdm_core::registry::{is_sampler_name, SamplerChoice, SAMPLER_NAMES};
use ggdm_core::sampler_config::SamplerSection;
use ggdm_nets::model_dir::{LoadedModel, NetworkPrecision};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

mod teacher;

pub use teacher::cached_solver_samples;

/// A search configuration (`configs/*.toml`). Unknown keys are errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// The pretrained model.
    pub model: ModelSection,
    /// Real data the loss compares against.
    pub data: DataSection,
    /// The sampler family member the search starts from, and what it may learn.
    pub sampler: SamplerSection,
    /// The loss.
    #[serde(default)]
    pub loss: LossSection,
    /// Optimisation.
    pub optim: SearchSettings,
    /// The final comparison.
    pub eval: EvalSection,
    /// Where the run goes.
    #[serde(default)]
    pub output: OutputSection,
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Model directory (diffusers layout or TorchScript).
    pub path: PathBuf,
    /// What to tell a user whose model directory is missing (where to get it).
    #[serde(default)]
    pub hint: Option<String>,
    /// Arithmetic of the network calls: `f32` (default) or `bf16` (the sampler's parameters, its
    /// linear combinations and the loss stay f32/f64).
    #[serde(default)]
    pub precision: NetworkPrecision,
    /// Replay the network calls as CUDA graphs (the no-autograd calls and, in the reverse sweep,
    /// each call's forward and backward): the same gradients with far fewer kernel launches.
    /// Needs a build with the `cuda-graphs` feature; no effect on the CPU. Default false.
    #[serde(default)]
    pub cuda_graphs: bool,
    /// Let cuDNN time its convolution algorithms on the first call of each shape and keep the
    /// fastest (`torch.backends.cudnn.benchmark`): faster calls, results that may differ in the
    /// last bits between runs. No effect on the CPU. Default false.
    #[serde(default)]
    pub cudnn_benchmark: bool,
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Real images: an IDX(.gz) file, an image folder, or a folder with train-images-idx3-ubyte.gz;
    /// or a features `.npz` written by `ddss-cli stats` with the loss's feature network.
    pub path: PathBuf,
    /// Use the first `num` images.
    pub num: usize,
    /// Also read the images of the folder's subfolders (symlinked ones included), depth first in
    /// name order (default false: pytorch-fid reads none).
    #[serde(default)]
    pub recursive: bool,
    /// What to tell a user whose data is missing.
    #[serde(default)]
    pub hint: Option<String>,
}

/// `[loss]`: without a teacher the loss is `kind` (KID by default) on the features of
/// `features`; with one it is `mean teacher distance + kid_weight * KID` ([`teacher`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    /// KID (default), MMD-RBF or moments.
    #[serde(default)]
    pub kind: LossKind,
    /// Feature network: `inception` or a classifier `.safetensors`.
    pub features: String,
    /// A many-step solver to match from the same initial noise (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<teacher::TeacherSection>,
}

impl Default for LossSection {
    fn default() -> Self {
        Self { kind: LossKind::Kid, features: "inception".into(), teacher: None }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Samples per sampler.
    pub num: usize,
    /// Batch size of sampling.
    #[serde(default = "default_eval_batch")]
    pub batch: usize,
    /// Feature networks of the comparison (the loss's network is added, marked not held out).
    #[serde(default)]
    pub features: Vec<String>,
    /// Real images for the comparison (held out from the loss's data when possible).
    pub reference: PathBuf,
    /// Also read the images of `reference`'s subfolders, as `[data] recursive` does.
    #[serde(default)]
    pub recursive: bool,
    /// Baselines to compare with at the same K and spacing: any built-in `--sampler` name (`ddim`,
    /// `ddim-noclip`, `ddpm`, `dpmpp2m`, `dpmpp3m`, `unipc`, `unipc3`). Default: `unipc`,
    /// `dpmpp2m` (the best training-free solvers) and `ddim`.
    #[serde(default = "default_compare")]
    pub compare: Vec<String>,
    /// The many-step reference line: the model's quality under a deterministic solver at many
    /// steps on the same noise (default `{ sampler = "unipc", steps = 100 }`; `steps = 0` leaves it
    /// out). Its samples are computed once and cached with the teacher pairs.
    #[serde(default)]
    pub many_step: crate::many_step::ManyStep,
    /// Seed of the evaluation noise (distinct from the search's).
    #[serde(default = "default_eval_seed")]
    pub seed: u64,
    /// Samples in each PNG grid.
    #[serde(default = "default_grid_num")]
    pub grid_num: usize,
    /// Also evaluate the baselines at these step counts, for the FID-vs-steps plot
    /// (`fid_vs_steps.png`); the learned sampler appears at its own K.
    #[serde(default)]
    pub plot_steps: Vec<usize>,
}

impl EvalSection {
    /// Range checks naming the key; `compare` names built-in samplers or `sampler.json` files.
    fn validate(&self) -> Result<()> {
        if self.num < 2 || self.batch == 0 {
            bail!("[eval] num must be >= 2 and batch >= 1");
        }
        if self.plot_steps.contains(&0) {
            bail!("[eval] plot_steps contains 0: step counts must be >= 1");
        }
        if let Some(name) = self.compare.iter().find(|n| !is_sampler_name(n)) {
            bail!(
                "[eval] compare: unknown sampler `{name}`; expected one of {} or the path of a sampler.json",
                SAMPLER_NAMES.join(", ")
            );
        }
        Ok(())
    }
}

fn default_eval_batch() -> usize {
    250
}
fn default_compare() -> Vec<String> {
    vec!["unipc".into(), "dpmpp2m".into(), "ddim".into()]
}
fn default_eval_seed() -> u64 {
    0xE7A1
}
fn default_grid_num() -> usize {
    64
}

/// `[output]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory (default `runs/<config name>`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Device (`auto`, `cpu`, `cuda`); `--device` overrides.
    #[serde(default)]
    pub device: Option<String>,
}

/// The arguments of `ddss-cli search`.
#[derive(clap::Args, Debug)]
pub struct SearchArgs {
    /// Search config (TOML: [model], [data], [sampler], [loss], [optim], [eval], [output]).
    #[arg(long)]
    pub config: PathBuf,
    /// Run directory (default: [output] dir, or runs/<config name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the search in the run directory from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// auto | cpu | cuda | cuda:N (default: [output] device, or auto).
    #[arg(long)]
    pub device: Option<String>,
    /// Number of sampler steps K (overrides [sampler] steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Model directory (overrides [model] path), e.g. to run a recipe on another model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Seed of the search's noise and pair order (overrides [optim] seed; the teacher pairs and
    /// the evaluation noise keep their own seeds, so runs with other seeds share them).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after writing sampler.json and the before/after grids (skip the comparison).
    #[arg(long)]
    pub skip_eval: bool,
    /// Print only results and errors (set from the global --quiet).
    #[arg(skip)]
    pub quiet: bool,
}

/// One row of `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultRow {
    pub sampler: String,
    pub steps: usize,
    pub num: usize,
    pub features: String,
    pub held_out: bool,
    pub fid: f64,
    pub kid_mean: f64,
    pub kid_std: f64,
    /// A many-step reference row ([`crate::many_step`]): the model's own quality, drawn as a line,
    /// never a baseline to beat. Left out of the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reference: bool,
}

impl ResultRow {
    /// The row of sampler `sampler` at `steps`: FID and KID of its `features` (one row per
    /// sample) against the real images' `real` features of the network named `features_name`.
    pub fn score(
        sampler: &str,
        steps: usize,
        features_name: &str,
        held_out: bool,
        features: &Tensor,
        real: &Tensor,
    ) -> Result<Self> {
        let fid = fid_metrics::fid::fid_from_features(&features.to_kind(Kind::Double), &real.to_kind(Kind::Double))?;
        let kid = fid_metrics::kid::kid(features, real, &fid_metrics::kid::KidOptions::default())?;
        Ok(Self {
            sampler: sampler.to_string(),
            steps,
            num: features.size()[0] as usize,
            features: features_name.to_string(),
            held_out,
            fid,
            kid_mean: kid.mean,
            kid_std: kid.std,
            reference: false,
        })
    }
}

/// Reads the config of `args`, with its command-line overrides applied.
fn load_config(args: &SearchArgs) -> Result<SearchConfig> {
    let path = &args.config;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading search config {}", path.display()))?;
    let mut config = parse_config_with_steps(&text, path, args.steps)?;
    if let Some(seed) = args.seed {
        config.optim.seed = seed;
    }
    if let Some(model) = &args.model {
        config.model.path = model.clone();
    }
    Ok(config)
}

/// Parses and range-checks the text of a search config (`path` is only named in errors).
#[cfg(test)]
fn parse_config(text: &str, path: &Path) -> Result<SearchConfig> {
    parse_config_with_steps(text, path, None)
}

/// [`parse_config`] with `[sampler] steps` overridden by `steps` (`--steps`) before the checks.
fn parse_config_with_steps(text: &str, path: &Path, steps: Option<usize>) -> Result<SearchConfig> {
    let mut config: SearchConfig =
        toml::from_str(text).with_context(|| format!("invalid search config {}", path.display()))?;
    if let Some(k) = steps {
        config.sampler.steps = k;
    }
    let in_file = |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}", path.display());
    config.sampler.validate().map_err(|e| in_file(e.into()))?;
    config.eval.validate().map_err(in_file)?;
    config.optim.validate().with_context(|| format!("{}: invalid [optim]", path.display()))?;
    if let Some(teacher) = &config.loss.teacher {
        teacher.validate().with_context(|| format!("{}: invalid [loss] teacher", path.display()))?;
    }
    Ok(config)
}

fn missing(what: &str, path: &Path, hint: &Option<String>) -> anyhow::Error {
    let mut msg = format!("{what} {} does not exist.", path.display());
    if let Some(h) = hint {
        msg.push(' ');
        msg.push_str(h);
    }
    anyhow::anyhow!(msg)
}

/// Loads real images for `[data]`/`[eval] reference` (first `num`, subfolders too when `recursive`).
fn load_real_images(path: &Path, num: usize, recursive: bool) -> Result<Tensor> {
    let options = fid_metrics::data::ReadOptions { recursive, limit: Some(num) };
    if path.is_dir() && path.join("train-images-idx3-ubyte.gz").is_file() {
        Ok(fid_metrics::data::load_idx_images_with(path.join("train-images-idx3-ubyte.gz"), options.limit)?)
    } else {
        Ok(fid_metrics::data::load_images_with(path, options)?)
    }
}

fn features_batched(
    extractor: &dyn FeatureExtractor,
    images: &Tensor,
    batch: usize,
    quiet: bool,
    what: &str,
) -> Result<Tensor> {
    let bar = progress(images.size()[0] as u64, quiet, what);
    let features =
        extract_features_batched(&DynExtractor(extractor), images, batch, |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    Ok(features)
}

/// Adapts `&dyn FeatureExtractor` to the generic batch helper.
pub(crate) struct DynExtractor<'a>(pub(crate) &'a dyn FeatureExtractor);
impl FeatureExtractor for DynExtractor<'_> {
    fn features(&self, x: &Tensor) -> fid_metrics::Result<Tensor> {
        self.0.features(x)
    }
    fn dim(&self) -> usize {
        self.0.dim()
    }
    fn name(&self) -> &str {
        self.0.name()
    }
    fn device(&self) -> Device {
        self.0.device()
    }
}

struct BarObserver {
    bar: crate::progress::Progress,
}

impl SearchObserver for BarObserver {
    fn on_step(&mut self, record: &StepRecord) {
        let val = match (record.validation_kid, record.validation_teacher_distance) {
            (Some(k), _) => format!(" val KID {k:.5}"),
            (None, Some(d)) => format!(" val distance {d:.5}"),
            (None, None) => String::new(),
        };
        let clipped = if record.clipped { " (clipped)" } else { "" };
        self.bar.set_message(format!("loss {:.5} |g| {:.3}{clipped}{val}", record.loss, record.grad_norm));
        self.bar.set_position(record.step);
        if let Some(event) = &record.event {
            self.bar.println(format!("step {}: {event}", record.step));
        }
    }
}

/// The config of `args` and its run directory, checked before any work: `--resume` needs a
/// checkpoint and a fresh run none, and the model, the data and the reference must exist.
fn load(args: &SearchArgs) -> Result<(SearchConfig, PathBuf)> {
    let config = load_config(args)?;
    let stem = args.config.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "search".into());
    let run_dir = args.out.clone().or(config.output.dir.clone()).unwrap_or_else(|| PathBuf::from("runs").join(&stem));
    let checkpoint = ddss_opt::search::checkpoint_path(&run_dir);
    if args.resume && !checkpoint.is_file() {
        bail!("--resume: {} has no checkpoint to resume from", run_dir.display());
    }
    if !args.resume && checkpoint.is_file() {
        bail!(
            "{} already holds a search (checkpoint.safetensors); continue it with --resume, or choose another --out",
            run_dir.display()
        );
    }
    if !config.model.path.is_dir() {
        return Err(missing("model directory", &config.model.path, &config.model.hint));
    }
    if !config.data.path.exists() {
        return Err(missing("data", &config.data.path, &config.data.hint));
    }
    if !config.eval.reference.exists() {
        return Err(missing("[eval] reference data", &config.eval.reference, &config.data.hint));
    }
    Ok((config, run_dir))
}

/// Creates the run directory; on rank 0 also takes its lock (held until the returned guard drops),
/// removes a killed run's temporary files and writes the resolved `config.toml`.
fn open_run_dir(run_dir: &Path, config: &SearchConfig, root: bool) -> Result<Option<RunLock>> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;
    // Rank 0 alone owns the run directory (lock, leftovers, outputs).
    let lock = if root { Some(RunLock::acquire(run_dir)?) } else { None };
    if root {
        remove_stale_temporaries(run_dir);
        ggdm_core::io::write_atomic(&run_dir.join("config.toml"), toml::to_string_pretty(config)?.as_bytes())?;
    }
    Ok(lock)
}

/// Loads `[model]` on `device`, with its sample shape, after checking that the search fits in
/// memory ([`crate::memory_check::check_search`]).
fn load_model(config: &SearchConfig, device: Device, comm: &dyn Collective) -> Result<(LoadedModel, [i64; 3])> {
    crate::common::cudnn_benchmark_if(device, config.model.cudnn_benchmark);
    let model =
        crate::common::load_model(&config.model.path, device, config.model.precision, config.model.cuda_graphs)?;
    let shape = model.sample_shape().context("the model does not fix its sample size (sample_size in config.json)")?;
    crate::memory_check::check_search(&model, shape, device, config)?;
    tracing::info!(
        "model {} ({:?} samples) on {device:?}{}",
        config.model.path.display(),
        shape,
        crate::dist::ranks_note(comm)
    );
    Ok((model, shape))
}

/// Runs `ddss-cli search`.
pub fn run(args: SearchArgs) -> Result<()> {
    let started = Instant::now();
    let (config, run_dir) = load(&args)?;
    let device_name = args.device.clone().or(config.output.device.clone()).unwrap_or_else(|| "auto".into());
    let comm = crate::dist::world();
    let comm = comm.as_ref();
    let root = comm.is_root();
    let quiet = args.quiet || !root;
    let device = crate::dist::rank_device(parse_device(&device_name)?, comm);
    if comm.size() > 1 {
        ddss_opt::collective::check_shardable("optim.batch_size", config.optim.batch_size, comm.size())
            .with_context(|| format!("{}: invalid [optim] for {} ranks", args.config.display(), comm.size()))?;
    }
    let _lock = open_run_dir(&run_dir, &config, root)?;
    let (model, shape) = load_model(&config, device, comm)?;
    let search = Search { config: &config, model: &model, run_dir: &run_dir, device, quiet, comm };
    let (sampler, search_seconds) = search.run(shape, args.resume)?;
    // Every rank evaluates the learned sampler: rank 0 reads it back from `sampler.json`, the
    // other ranks copy it from memory (the same values) rather than read a file rank 0 may still
    // be writing.
    let learned = if root { GgdmSampler::load(&run_dir.join("sampler.json"), device)? } else { sampler.try_clone()? };
    if args.skip_eval {
        search.write_after(learned)?;
        if root {
            println!(
                "run directory: {} ({:.0} s in total, search {:.0} s; comparison skipped)",
                run_dir.display(),
                started.elapsed().as_secs_f64(),
                search_seconds
            );
        }
        return Ok(());
    }
    let comparison = search.comparison();
    let Some(rows) = comparison.run(learned)? else { return Ok(()) };
    comparison.report(&rows)?;
    println!(
        "run directory: {} ({:.0} s in total, search {:.0} s)",
        run_dir.display(),
        started.elapsed().as_secs_f64(),
        search_seconds
    );
    Ok(())
}

/// The search itself: the loss on `[data]`, the start sampler, the optimisation, and
/// `sampler.json` with the pictures of the start and the learned sampler.
struct Search<'a> {
    config: &'a SearchConfig,
    model: &'a LoadedModel,
    run_dir: &'a Path,
    device: Device,
    quiet: bool,
    comm: &'a dyn Collective,
}

/// The loss of a search: the feature network, the real features of `[data]`, the feature loss
/// on them and the teacher of `[loss] teacher` (if any).
struct SearchLoss {
    extractor: Box<dyn FeatureExtractor>,
    real: Tensor,
    loss: FeatureLoss,
    teacher: Option<ddss_opt::teacher::Teacher>,
}

impl Search<'_> {
    /// The loss: real features of the training data with the loss's feature network, and the
    /// teacher's pairs.
    fn loss(&self) -> Result<SearchLoss> {
        let (config, device) = (self.config, self.device);
        let extractor = open_extractor(&config.loss.features, device)?;
        let real_images = load_real_images(&config.data.path, config.data.num, config.data.recursive)?;
        let real = features_batched(extractor.as_ref(), &real_images, config.eval.batch, self.quiet, "real features")?;
        drop(real_images);
        let loss = FeatureLoss::new(config.loss.kind, &real.to_device(device))?;
        let teacher = teacher::build(config, self.model, extractor.as_ref(), device, self.quiet, self.comm)?;
        Ok(SearchLoss { extractor, real, loss, teacher })
    }

    /// The noise and batching of the PNG grids (`[eval] grid_num` samples on the evaluation noise).
    fn grid_options(&self) -> EvalOptions {
        let eval = &self.config.eval;
        EvalOptions { num: eval.grid_num, batch: eval.batch, seed: eval.seed, quantize: true, device: self.device }
    }

    /// The grid of `choice` (the samples split across the ranks).
    fn grid(&self, choice: &SamplerChoice) -> Result<Tensor> {
        let num = self.config.eval.grid_num;
        let (_, grid) =
            sample_features_sharded(self.model, choice, &self.grid_options(), &[], num, &mut |_, _| {}, self.comm)?;
        Ok(grid)
    }

    /// Learns the sampler (continuing from the checkpoint when `resume`) for samples of `shape`;
    /// rank 0 writes `before.png`, `sampler.json` and the pictures of the start and the learned
    /// sampler. Returns the learned sampler and the seconds the optimisation took.
    fn run(&self, shape: [i64; 3], resume: bool) -> Result<(GgdmSampler, f64)> {
        let (config, device, root) = (self.config, self.device, self.comm.is_root());
        let loss = self.loss()?;
        let mut sampler = config.sampler.init_sampler(&self.model.scheduler, device)?;
        sampler.model = ModelIdentity { name: config.model.path.display().to_string(), sample_shape: Some(shape) };
        let initial = SamplerChoice::Ggdm(Box::new(sampler.try_clone()?));
        let before = self.grid(&initial)?;
        if root {
            write_grid(&before, grid_columns(config.eval.grid_num), &self.run_dir.join("before.png"))?;
        }
        let parts = ObjectiveParts {
            model: self.model.denoiser.as_ref(),
            extractor: loss.extractor.as_ref(),
            loss: &loss.loss,
            sample_shape: shape,
            device,
            teacher: loss.teacher.as_ref(),
        };
        let mut observer = BarObserver { bar: progress_steps(config.optim.steps, self.quiet, "search") };
        let search_started = Instant::now();
        let outcome = run_search_with(
            &mut sampler,
            parts,
            &config.optim,
            &loss.real,
            self.run_dir,
            resume,
            &mut observer,
            self.comm,
        )?;
        observer.bar.finish_and_clear();
        let seconds = search_started.elapsed().as_secs_f64();
        sampler.provenance = provenance(config, &outcome, seconds);
        let path = self.run_dir.join("sampler.json");
        if root {
            sampler.save(&path)?;
            crate::pictures::write_search_pictures(self.run_dir, &initial, &sampler);
        }
        tracing::info!(
            "search: validation {} {:.5} -> {:.5} (best at step {}), {:.0} s; sampler written to {}",
            outcome.validation_metric.label(),
            outcome.initial_validation,
            outcome.best_validation,
            outcome.best_step,
            seconds,
            path.display()
        );
        Ok((sampler, seconds))
    }

    /// Without the comparison (`--skip-eval`): samples the learned sampler's grid and, on rank 0,
    /// writes `after.png` and `before_after.png`.
    fn write_after(&self, learned: GgdmSampler) -> Result<()> {
        let after = self.grid(&SamplerChoice::Ggdm(Box::new(learned)))?;
        if self.comm.is_root() {
            let columns = grid_columns(self.config.eval.grid_num);
            crate::pictures::write_after(&after, columns, self.run_dir, self.config.sampler.init.name())?;
        }
        Ok(())
    }

    /// The comparison of the learned sampler with the baselines, in the same run.
    fn comparison(&self) -> Comparison<'_> {
        Comparison(self)
    }
}

/// The comparison on held-out noise: every baseline at K and at each `[eval] plot_steps`, the
/// learned sampler at K, and the many-step reference line, on every feature network. It runs in
/// the search's setting (config, model, run directory, device, ranks), which it reads through.
struct Comparison<'a>(&'a Search<'a>);

impl<'a> std::ops::Deref for Comparison<'a> {
    type Target = Search<'a>;

    fn deref(&self) -> &Search<'a> {
        self.0
    }
}

/// A feature network of the comparison: its spec, the network and the reference's features.
type ReferenceFeatures = (String, Box<dyn FeatureExtractor>, Tensor);

impl Comparison<'_> {
    /// The step counts of the baselines: K first, then `[eval] plot_steps`.
    fn step_counts(&self) -> Vec<usize> {
        let mut step_counts = vec![self.config.sampler.steps];
        for &extra in &self.config.eval.plot_steps {
            if !step_counts.contains(&extra) {
                step_counts.push(extra);
            }
        }
        step_counts
    }

    /// The baselines at every step count, then the learned sampler.
    fn samplers(&self, learned: GgdmSampler) -> Result<Vec<(String, SamplerChoice)>> {
        let config = self.config;
        let mut samplers = Vec::new();
        for steps in self.step_counts() {
            for name in &config.eval.compare {
                let spacing = Some(config.sampler.spacing.name());
                let choice =
                    crate::sample::choose(name, Some(steps), config.sampler.eta, spacing, self.model, self.device)?;
                samplers.push((name.clone(), choice));
            }
        }
        samplers.push(("learned".into(), SamplerChoice::Ggdm(Box::new(learned))));
        Ok(samplers)
    }

    /// The loss's feature network and `[eval] features`, each with the reference's features.
    fn references(&self) -> Result<Vec<ReferenceFeatures>> {
        let config = self.config;
        let mut feature_specs = vec![config.loss.features.clone()];
        for f in &config.eval.features {
            if !feature_specs.contains(f) {
                feature_specs.push(f.clone());
            }
        }
        let reference_images = load_real_images(&config.eval.reference, config.eval.num, config.eval.recursive)?;
        let mut references = Vec::new();
        for spec in feature_specs {
            let extractor = open_extractor(&spec, self.device)?;
            let feats = features_batched(
                extractor.as_ref(),
                &reference_images,
                config.eval.batch,
                self.quiet,
                "reference features",
            )?;
            references.push((spec, extractor, feats));
        }
        Ok(references)
    }

    /// Scores every sampler (split across the ranks) and writes the grids; the rows on rank 0,
    /// `None` on the others.
    fn run(&self, learned: GgdmSampler) -> Result<Option<Vec<ResultRow>>> {
        let config = self.config;
        let k = config.sampler.steps;
        let samplers = self.samplers(learned)?;
        let references = self.references()?;
        let extractors: Vec<&dyn FeatureExtractor> = references.iter().map(|(_, e, _)| e.as_ref()).collect();
        let options = self.options();
        let mut rows = Vec::new();
        for (name, choice) in &samplers {
            let steps = choice.steps();
            let bar = progress(config.eval.num as u64, self.quiet, &format!("eval {name} K={steps}"));
            let keep = if steps == k { config.eval.grid_num.min(config.eval.num) } else { 0 };
            let on_batch = &mut |done, _| bar.set_position(done as u64);
            let (features, grid) =
                sample_features_sharded(self.model, choice, &options, &extractors, keep, on_batch, self.comm)?;
            bar.finish_and_clear();
            if !self.comm.is_root() {
                continue;
            }
            if keep > 0 {
                self.write_grids(name, &grid)?;
            }
            for ((spec, extractor, reference), feats) in references.iter().zip(&features) {
                let held_out = *spec != config.loss.features;
                rows.push(ResultRow::score(name, steps, extractor.name(), held_out, feats, reference)?);
            }
        }
        if !self.comm.is_root() {
            return Ok(None);
        }
        if config.eval.many_step.enabled() {
            let with_reference: Vec<(&dyn FeatureExtractor, &Tensor, bool)> =
                references.iter().map(|(spec, e, r)| (e.as_ref(), r, *spec != config.loss.features)).collect();
            rows.extend(config.eval.many_step.rows(
                self.model,
                &options,
                config.model.precision,
                &with_reference,
                self.quiet,
            )?);
        }
        Ok(Some(rows))
    }

    fn options(&self) -> EvalOptions {
        let eval = &self.config.eval;
        EvalOptions { num: eval.num, batch: eval.batch, seed: eval.seed, quantize: true, device: self.device }
    }

    /// `grid_<name>.png`, and for the learned sampler `after.png` and `before_after.png` too.
    fn write_grids(&self, name: &str, grid: &Tensor) -> Result<()> {
        let columns = grid_columns(self.config.eval.grid_num);
        write_grid(grid, columns, &self.run_dir.join(format!("grid_{name}.png")))?;
        if name == "learned" {
            crate::pictures::write_after(grid, columns, self.run_dir, self.config.sampler.init.name())?;
        }
        Ok(())
    }

    /// Writes the plots and `results.json`, and prints the table and the verdict.
    fn report(&self, rows: &[ResultRow]) -> Result<()> {
        let step_counts =
            rows.iter().filter(|r| !r.reference).map(|r| r.steps).collect::<std::collections::BTreeSet<_>>();
        if step_counts.len() > 1 || rows.iter().any(|r| r.reference) {
            for path in crate::table_cmd::write_plots(rows, self.run_dir, &model_title(&self.config.model.path))? {
                tracing::info!("plot written to {}", path.display());
            }
        }
        let json = serde_json::to_string_pretty(rows)?;
        ggdm_core::io::write_atomic(&self.run_dir.join("results.json"), json.as_bytes())?;
        println!("{}", results_table(rows));
        println!("{}", crate::table_cmd::verdicts(rows, true));
        Ok(())
    }
}

/// `sampler.json`'s provenance: the config and what the search did (the validation metric as
/// `initial_validation_<metric>` and `best_validation_<metric>`, `kid` or `teacher_distance`).
fn provenance(config: &SearchConfig, outcome: &SearchOutcome, seconds: f64) -> serde_json::Value {
    let metric = outcome.validation_metric.key();
    let mut search = serde_json::json!({
        "steps": outcome.steps,
        "best_step": outcome.best_step,
        "rejected_steps": outcome.faults,
        "clipped_steps": outcome.clipped,
        "seconds": seconds,
    });
    search[format!("initial_validation_{metric}")] = outcome.initial_validation.into();
    search[format!("best_validation_{metric}")] = outcome.best_validation.into();
    serde_json::json!({ "config": config, "search": search })
}

/// Whether a process with this id is running (Linux: `/proc/<pid>` exists).
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// `.lock` in a run directory while a search runs in it: a second `ddss-cli search` on the same
/// directory is refused instead of interleaving checkpoints. A lock left by a killed run (its
/// process is gone) is taken over.
struct RunLock {
    path: PathBuf,
}

impl RunLock {
    fn acquire(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(".lock");
        let ours = std::process::id();
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(pid) = text.trim().parse::<u32>() {
                if pid != ours && process_alive(pid) {
                    bail!(
                        "{}: another ddss-cli (pid {pid}) is running a search in this directory; wait for it, \
                         or remove {} if that process is not ddss-cli",
                        run_dir.display(),
                        path.display()
                    );
                }
            }
            tracing::info!("taking over the lock of a run that was interrupted ({})", path.display());
        }
        ggdm_core::io::write_atomic(&path, ours.to_string().as_bytes())?;
        Ok(Self { path })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes temporary files (`.<name>.tmp-<pid>-<n>`) that a killed run left in `run_dir`.
fn remove_stale_temporaries(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid = name
            .rsplit_once(".tmp-")
            .and_then(|(_, tail)| tail.split('-').next().and_then(|pid| pid.parse::<u32>().ok()));
        if name.starts_with('.') && pid.is_some_and(|pid| pid != std::process::id() && !process_alive(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The model's folder name, for plot titles.
fn model_title(path: &Path) -> String {
    path.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| path.display().to_string())
}

fn grid_columns(n: usize) -> usize {
    (n as f64).sqrt().ceil().max(1.0) as usize
}

/// The comparison as a Markdown table.
pub fn results_table(rows: &[ResultRow]) -> String {
    let mut out =
        String::from("| sampler | steps | features | held out | FID | KID (x1e3) |\n|---|---|---|---|---|---|\n");
    for r in rows {
        let name = if r.reference { format!("{} (many-step reference)", r.sampler) } else { r.sampler.clone() };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:.3} ± {:.3} |\n",
            name,
            r.steps,
            r.features,
            if r.held_out { "yes" } else { "no" },
            r.fid,
            r.kid_mean * 1e3,
            r.kid_std * 1e3
        ));
    }
    out
}

#[cfg(test)]
mod fuzz {
    //! Property tests (fuzzing) of the search config parser: arbitrary text, byte-mutated and
    //! value-mutated valid configs give `Ok` or `Err`, never a panic. `PROPTEST_CASES` overrides
    //! the number of cases (default 256).

    use super::parse_config;
    use ddss_opt::unroll::Remat;
    use proptest::prelude::*;
    use proptest::test_runner::Config;
    use std::path::Path;

    const VALID: &str = include_str!("../../../configs/fashion_mnist.toml");

    fn config() -> Config {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
        Config { cases, failure_persistence: None, ..Config::default() }
    }

    fn parse(text: &str) {
        if let Ok(config) = parse_config(text, Path::new("fuzz.toml")) {
            // What a run does next with a parsed config.
            let _ = toml::to_string_pretty(&config);
            let _ = config.optim.lr.at(0, config.optim.steps);
            let _ = config.optim.lr.at(config.optim.steps, config.optim.steps);
        }
    }

    /// A TOML value as text.
    fn toml_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:?}")),
            prop_oneof![Just("nan"), Just("inf"), Just("-inf"), Just("-0.0"), Just("0"), Just("-1"), Just("1e308")]
                .prop_map(String::from),
            any::<bool>().prop_map(|v| v.to_string()),
            "[a-z_ ]{0,10}".prop_map(|v| format!("\"{v}\"")),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("[1, \"a\"]".to_string()),
            Just("{ budget = { stored_steps = 0 } }".to_string()),
            Just("{ memory_budget = { mib = 2048 } }".to_string()),
            Just("18446744073709551615".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            parse(&text);
        }

        #[test]
        fn byte_mutations_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in prop::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = VALID.as_bytes().to_vec();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            parse(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn value_mutations_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), toml_value()), 1..4)) {
            let mut lines: Vec<String> = VALID.lines().map(String::from).collect();
            for (at, value) in edits {
                let assignments: Vec<usize> =
                    (0..lines.len()).filter(|&i| !lines[i].starts_with('#') && lines[i].contains(" = ")).collect();
                let i = assignments[at.index(assignments.len())];
                let key = lines[i].split(" = ").next().unwrap_or_default().to_string();
                lines[i] = format!("{key} = {value}");
            }
            parse(&lines.join("\n"));
        }
    }

    #[test]
    fn the_shipped_configs_parse() {
        let config = parse_config(VALID, Path::new("configs/fashion_mnist.toml")).expect("valid");
        assert_eq!(config.sampler.steps, 10);
        for (name, text) in [
            ("cifar10", include_str!("../../../configs/cifar10.toml")),
            ("lsun_church", include_str!("../../../configs/lsun_church.toml")),
        ] {
            let config = parse_config(text, Path::new(name)).unwrap_or_else(|e| panic!("configs/{name}.toml: {e:#}"));
            assert_eq!(config.optim.remat, Remat::PerCall, "{name}");
        }
    }

    #[test]
    fn the_commented_model_switches_of_the_cifar10_config_parse_when_enabled() {
        let text = include_str!("../../../configs/cifar10.toml")
            .replace("# cuda_graphs = true", "cuda_graphs = true")
            .replace("# cudnn_benchmark = true", "cudnn_benchmark = true");
        let config = parse_config(&text, Path::new("cifar10.toml")).expect("valid");
        assert!(config.model.cuda_graphs && config.model.cudnn_benchmark);
        let config = parse_config(VALID, Path::new("c.toml")).expect("valid");
        assert!(!config.model.cuda_graphs && !config.model.cudnn_benchmark, "both are off by default");
    }

    #[test]
    fn the_default_config_matches_a_unipc_teacher_with_its_documented_defaults() {
        let config = parse_config(VALID, Path::new("fashion_mnist.toml")).expect("valid");
        assert_eq!(config.sampler.init, ggdm_core::ggdm::GgdmBase::Unipc);
        let teacher = config.loss.teacher.clone().expect("a teacher");
        assert_eq!((teacher.sampler.as_str(), teacher.steps, teacher.eta), ("unipc", 100, 0.0));
        assert_eq!(teacher.distance, ddss_opt::teacher::TeacherDistance::L2);
        assert_eq!((teacher.kid_weight, teacher.pairs, teacher.validation_pairs), (0.1, 256, 128));
        assert_eq!((teacher.seed, teacher.spacing, teacher.cache), (0x7EAC, None, None));
        assert_eq!(config.eval.compare, ["unipc", "dpmpp2m", "ddim"]);
        assert_eq!(config.eval.many_step, crate::many_step::ManyStep::default());
        // Without the teacher line, a run has no teacher, and its resolved config no teacher key.
        let without = VALID.replace("teacher = { sampler", "# teacher = { sampler");
        let config = parse_config(&without, Path::new("c.toml")).expect("valid");
        assert!(config.loss.teacher.is_none());
        let resolved = toml::to_string_pretty(&config).expect("toml");
        assert!(!resolved.contains("teacher"), "{resolved}");
    }

    #[test]
    fn every_remat_spelling_parses_and_a_wrong_one_is_named() {
        for (text, expected) in [
            ("\"naive\"", Remat::Naive),
            ("\"per_call\"", Remat::PerCall),
            ("{ budget = { stored_steps = 4 } }", Remat::Budget { stored_steps: 4 }),
            ("{ memory_budget = { mib = 2048 } }", Remat::MemoryBudget { mib: 2048 }),
            ("{ free_memory = { percent = 50 } }", Remat::FreeMemory { percent: 50 }),
        ] {
            let config =
                parse_config(&VALID.replace("remat = \"naive\"", &format!("remat = {text}")), Path::new("c.toml"))
                    .unwrap_or_else(|e| panic!("{text}: {e:#}"));
            assert_eq!(config.optim.remat, expected, "{text}");
        }
        let wrong = VALID.replace("remat = \"naive\"", "remat = { memory_budget = { gib = 2 } }");
        let err = format!("{:#}", parse_config(&wrong, Path::new("c.toml")).expect_err("unknown field"));
        assert!(err.contains("gib") && err.contains("remat"), "{err}");
    }
}
