//! `ddss-cli sample`: draws samples from a model directory with DDPM, DDIM, the multistep solvers
//! DPM-Solver++ and UniPC, or a learned GGDM sampler (`sampler.json`), writing a PNG grid,
//! per-image PNGs and/or a float32 `.npy`.
//!
//! Noise is per sample: sample `i` uses the stream `(seed, i)`, so results do not depend on
//! `--batch`, and `--init-noise` + `--out-npy` reproduce runs bit for bit on the same device.
//!
//! Under MPI (the `mpi` feature) the batches are split into contiguous runs, one per rank: each rank
//! writes its own `--out-dir` images, and the grid and `.npy` are gathered to rank 0, which writes
//! them; the files are those one process writes.

use crate::common::{parse_device, progress_images, write_grid, write_images, write_npy, NetworkArgs};
use crate::memory_check::{check_request, Request};
use crate::step_noise::StepNoise;
use anyhow::{bail, Context, Result};
use ddss_opt::collective::{shard, Collective};
use ggdm_core::noise::{NoiseSource, PerSampleNoise};
use ggdm_core::registry::{SamplerChoice, SAMPLER_NAMES};
use ggdm_nets::model_dir::LoadedModel;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The arguments of `ddss-cli sample`.
#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub run: ModelSamplerArgs,
    /// Sampling steps K (default: 50 for ddim, T for ddpm, 20 for dpmpp*/unipc*, the file's K
    /// for sampler.json).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Number of samples.
    #[arg(long, default_value_t = 64)]
    pub num: usize,
    /// Samples per network batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Noise seed (sample i uses stream (seed, i)).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial noise as float32 N x C x H x W .npy (sets --num).
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// PNG grid of all samples (default samples.png when no output is given).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Folder for one PNG per sample.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// float32 N x C x H x W .npy of the samples in [-1, 1].
    #[arg(long)]
    pub out_npy: Option<PathBuf>,
    /// Step noise z_1..z_K of a sampler.json sampler as float32 K x N x C x H x W .npy ([i, n] is
    /// step i+1's noise for sample n; it multiplies the file's derived.sigma). With --init-noise
    /// it fixes the run, e.g. to compare with the Python package (python/).
    #[arg(long)]
    pub step_noise: Option<PathBuf>,
    /// Write the step noise the run used (layout of --step-noise) to this .npy.
    #[arg(long)]
    pub out_step_noise: Option<PathBuf>,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Set from the global --quiet.
    #[arg(skip)]
    pub quiet: bool,
}

/// The model and the sampler of `sample` and `eval` (their step count is each command's own).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelSamplerArgs {
    /// Model directory (diffusers layout, or model.pt + model.json). `sample` without it samples
    /// the shipped model, models/fashion-mnist-ddpm.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// ddpm | ddim (clipping as the model's scheduler_config.json says) | ddim-noclip |
    /// dpmpp2m, dpmpp3m (DPM-Solver++ multistep, order 2 / 3) | unipc, unipc3 (UniPC bh2,
    /// order 2 / 3) | path of a sampler.json written by `ddss-cli search`. DPM-Solver++ and
    /// UniPC follow diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler defaults
    /// and place their steps as those do (--spacing, default linspace, or logsnr when the
    /// scheduler config sets use_lu_lambdas). `sample` without it (and without --model) takes
    /// the default search's learned sampler, runs/fashion_mnist/sampler.json, when it exists,
    /// and unipc with 10 steps otherwise.
    #[arg(long)]
    pub sampler: Option<String>,
    /// DDIM eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// leading | trailing | linspace (diffusers' timestep_spacing) | quadratic | logsnr
    /// (log-SNR-uniform, diffusers' use_lu_lambdas timesteps); default: the model's
    /// scheduler_config.json for ddim/ddpm, linspace (diffusers' default; logsnr with
    /// use_lu_lambdas) for dpmpp*/unipc*.
    #[arg(long)]
    pub spacing: Option<String>,
}

impl ModelSamplerArgs {
    /// `--model`.
    pub fn model_dir(&self) -> Result<&Path> {
        self.model.as_deref().context("--model DIR is required (a model directory in diffusers layout)")
    }

    /// `--sampler`.
    pub fn sampler_name(&self) -> Result<&str> {
        self.sampler.as_deref().with_context(|| {
            format!("--sampler is required: one of {} or the path of a sampler.json", SAMPLER_NAMES.join(", "))
        })
    }

    /// Loads the model (as `network` says) and sets up the sampler with `steps`.
    pub fn load(
        &self,
        network: &NetworkArgs,
        steps: Option<usize>,
        device: Device,
    ) -> Result<(LoadedModel, SamplerChoice)> {
        let model = network.load(self.model_dir()?, device)?;
        let choice = choose(self.sampler_name()?, steps, self.eta, self.spacing.as_deref(), &model, device)?;
        Ok((model, choice))
    }
}

/// [`SamplerChoice::from_args`] for `model`.
pub fn choose(
    name: &str,
    steps: Option<usize>,
    eta: f64,
    spacing: Option<&str>,
    model: &LoadedModel,
    device: Device,
) -> Result<SamplerChoice> {
    Ok(SamplerChoice::from_args(name, steps, eta, spacing, &model.scheduler, model.sample_shape(), device)?)
}

/// [`SamplerChoice::run`] on `model`: one batch from `x_init`, step noise from `noise`.
pub fn run_batch(
    choice: &SamplerChoice,
    model: &LoadedModel,
    x_init: &Tensor,
    noise: &mut dyn NoiseSource,
) -> Result<Tensor> {
    Ok(choice.run(model.denoiser.as_ref(), &model.scheduler, x_init, noise)?)
}

/// The shipped model, relative to the repository root.
const SHIPPED_MODEL: &str = "models/fashion-mnist-ddpm";
/// The learned sampler of the default search (`cargo xtask search`), relative to the root.
const DEFAULT_SEARCH_SAMPLER: &str = "runs/fashion_mnist/sampler.json";
/// UniPC's steps when `sample` chooses it.
const DEFAULT_UNIPC_STEPS: usize = 10;

/// The folder [`SHIPPED_MODEL`] and [`DEFAULT_SEARCH_SAMPLER`] are taken from: the current one when
/// it holds the shipped model (`cargo run` from the repository), else the repository this binary
/// was built from.
fn default_root() -> Result<PathBuf> {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let built_from = std::fs::canonicalize(&built_from).unwrap_or(built_from);
    [PathBuf::new(), built_from].into_iter().find(|root| root.join(SHIPPED_MODEL).is_dir()).with_context(|| {
        format!(
            "no --model given, and the shipped model {SHIPPED_MODEL} is not here (run from the repository root, \
             or give --model DIR)"
        )
    })
}

/// `args` with what `sample` does without --model and --sampler filled in, each choice logged.
fn with_defaults(mut args: SampleArgs) -> Result<SampleArgs> {
    let root = match args.run.model {
        Some(_) => None,
        None => {
            let root = default_root()?;
            let model = root.join(SHIPPED_MODEL);
            tracing::info!("no --model: sampling the shipped model {} (--model DIR samples another)", model.display());
            args.run.model = Some(model);
            Some(root)
        }
    };
    if args.run.sampler.is_some() {
        return Ok(args);
    }
    let others = format!("--sampler {}|FILE.json [--steps K] chooses another", SAMPLER_NAMES.join("|"));
    match root.map(|root| root.join(DEFAULT_SEARCH_SAMPLER)).filter(|path| path.is_file()) {
        Some(learned) => {
            tracing::info!("no --sampler: the default search's learned sampler {} ({others})", learned.display());
            args.run.sampler = Some(learned.to_string_lossy().to_string());
        }
        None => {
            let steps = *args.steps.get_or_insert(DEFAULT_UNIPC_STEPS);
            tracing::info!(
                "no --sampler: unipc with {steps} steps (`cargo xtask search` learns the sampler \
                 {DEFAULT_SEARCH_SAMPLER}, which is then the default; {others})"
            );
            args.run.sampler = Some("unipc".to_string());
        }
    }
    Ok(args)
}

/// Runs `ddss-cli sample`.
pub fn run(args: SampleArgs) -> Result<()> {
    let args = with_defaults(args)?;
    let comm = crate::dist::world();
    let comm = comm.as_ref();
    let device = crate::dist::rank_device(parse_device(&args.device)?, comm);
    for path in [&args.out, &args.out_npy].into_iter().flatten() {
        ggdm_core::io::check_output_path(path)?;
    }
    if args.batch == 0 {
        bail!("--batch 0: need at least 1");
    }
    let (model, choice) = args.run.load(&args.network, args.steps, device)?;
    let init = match &args.init_noise {
        Some(path) => Some(
            fid_metrics::data::load_samples_npy(path).with_context(|| format!("--init-noise {}", path.display()))?,
        ),
        None => None,
    };
    let shape = sample_shape(init.as_ref(), &model)?;
    let num = init.as_ref().map(|t| t.size()[0] as usize).unwrap_or(args.num);
    if num == 0 {
        bail!("--num 0: nothing to sample");
    }
    let outputs = Outputs::of(&args);
    let ggdm = match &choice {
        SamplerChoice::Ggdm(sampler) => Some(sampler.as_ref()),
        _ => None,
    };
    let mut step_noise =
        StepNoise::from_args(args.step_noise.as_deref(), args.out_step_noise.as_deref(), ggdm, num, shape)?;
    check_memory(&model, shape, device, &args, num, outputs.keeps_samples())?;
    tracing::info!(
        "sampling {num} images of shape {shape:?} with {} ({} steps) on {device:?}{}",
        args.run.sampler_name()?,
        choice.steps(),
        crate::dist::ranks_note(comm)
    );
    let batches = shard(num.div_ceil(args.batch), comm.rank(), comm.size());
    let (start, end) = ((batches.start * args.batch).min(num), (batches.end * args.batch).min(num));
    let bar = progress_images((end - start) as u64, args.quiet || !comm.is_root(), "sample");
    let mut chunks = Vec::new();
    let mut first = start;
    while first < end {
        let b = args.batch.min(end - first);
        let mut noise = PerSampleNoise::new(args.seed, first as u64, b);
        let x_init = match &init {
            Some(t) => t.f_narrow(0, first as i64, b as i64)?.f_to_device(device)?,
            None => noise.next(&[b as i64, shape[0], shape[1], shape[2]], device)?,
        };
        let samples = match (&mut step_noise, &choice) {
            (Some(io), SamplerChoice::Ggdm(sampler)) => io.run_batch(sampler, &model, &x_init, &mut noise, first)?,
            _ => run_batch(&choice, &model, &x_init, &mut noise)?,
        };
        let samples = samples.f_to_device(Device::Cpu)?;
        if let Some(dir) = &outputs.dir {
            write_images(&samples, dir, first)?;
        }
        if outputs.keeps_samples() {
            chunks.push(samples);
        }
        first += b;
        bar.inc(b as u64);
    }
    bar.finish_and_clear();
    let all = gather_samples(&chunks, shape, outputs.keeps_samples(), comm)?;
    if comm.is_root() {
        outputs.write(&all, num)?;
    }
    if let Some(io) = &step_noise {
        io.write(comm)?;
    }
    Ok(())
}

/// `[C, H, W]` of the samples: the model's, or `--init-noise`'s (which must agree with it).
fn sample_shape(init: Option<&Tensor>, model: &LoadedModel) -> Result<[i64; 3]> {
    match (init, model.sample_shape()) {
        (Some(t), Some(s)) if t.size()[1..] != s[..] => {
            bail!("--init-noise has shape {:?}, the model samples {:?}", t.size(), s)
        }
        (Some(t), _) => Ok([t.size()[1], t.size()[2], t.size()[3]]),
        (None, Some(s)) => Ok(s),
        (None, None) => {
            bail!("the model does not fix its sample size (no sample_size in config.json); pass --init-noise")
        }
    }
}

/// Fails, naming the model's sample size, `--batch` or `--num`, when the request cannot fit in
/// memory ([`crate::memory_check`]).
fn check_memory(
    model: &LoadedModel,
    shape: [i64; 3],
    device: Device,
    args: &SampleArgs,
    num: usize,
    keeps_samples: bool,
) -> Result<()> {
    // Kept samples are float32 chunks, then their concatenation.
    let sample_values = shape.iter().map(|&d| d.max(0) as u64).fold(1u64, u64::saturating_mul);
    let request = Request {
        batch: args.batch,
        batch_name: "--batch",
        num,
        num_name: if args.init_noise.is_some() { "--init-noise" } else { "--num" },
        kept_per_sample: if keeps_samples { sample_values.saturating_mul(2 * 4) } else { 0 },
        kept_what: "the images (for the grid or .npy)",
    };
    check_request(model, shape, device, &request)
}

/// Where `sample` writes: a grid, one PNG per sample, a `.npy`.
struct Outputs {
    grid: Option<PathBuf>,
    dir: Option<PathBuf>,
    npy: Option<PathBuf>,
}

impl Outputs {
    /// The outputs asked for (`samples.png` when none is).
    fn of(args: &SampleArgs) -> Self {
        match (&args.out, &args.out_dir, &args.out_npy) {
            (None, None, None) => {
                tracing::info!(
                    "no output given: the grid goes to samples.png (--out FILE.png, --out-dir DIR or --out-npy \
                     FILE.npy choose others)"
                );
                Self { grid: Some(PathBuf::from("samples.png")), dir: None, npy: None }
            }
            (grid, dir, npy) => Self { grid: grid.clone(), dir: dir.clone(), npy: npy.clone() },
        }
    }

    /// Whether the samples are kept until the end (for the grid or the `.npy`).
    fn keeps_samples(&self) -> bool {
        self.grid.is_some() || self.npy.is_some()
    }

    /// Writes the grid and the `.npy` of `all` (`num` samples) and says where everything went.
    fn write(&self, all: &Tensor, num: usize) -> Result<()> {
        if let Some(path) = &self.grid {
            let columns = (num as f64).sqrt().ceil() as usize;
            write_grid(all, columns, path)?;
            tracing::info!("grid written to {}", path.display());
        }
        if let Some(path) = &self.npy {
            write_npy(all, path)?;
            tracing::info!("samples written to {}", path.display());
        }
        if let Some(dir) = &self.dir {
            tracing::info!("{num} images written to {}", dir.display());
        }
        Ok(())
    }
}

/// All samples in order: this process's `chunks`, or every rank's gathered (an empty tensor when
/// nothing is kept).
pub(crate) fn gather_samples(chunks: &[Tensor], shape: [i64; 3], keep: bool, comm: &dyn Collective) -> Result<Tensor> {
    let [c, h, w] = shape;
    if !keep {
        return Ok(Tensor::f_zeros([0], (Kind::Float, Device::Cpu))?);
    }
    let local = if chunks.is_empty() {
        Tensor::f_zeros([0, c, h, w], (Kind::Float, Device::Cpu))?
    } else {
        Tensor::f_cat(chunks, 0)?
    };
    if comm.size() <= 1 {
        return Ok(local);
    }
    let flat = local.f_to_kind(Kind::Float)?.f_contiguous()?.f_reshape([-1])?;
    let gathered = comm.all_gather_f32(&Vec::<f32>::try_from(&flat)?)?;
    Ok(Tensor::from_slice(&gathered).f_reshape([-1, c, h, w])?)
}
