//! `ddss-cli`: the command-line front end (DESIGN.md section 7).

mod bench_cmd;
mod classifier_cmd;
mod common;
mod dist;
mod export_cmd;
mod figure;
mod many_step;
mod memory_check;
mod metrics_cmd;
mod pictures;
mod plot;
mod progress;
mod sample;
mod sampler_picture;
mod search_cmd;
mod step_noise;
mod table_cmd;
mod train;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ggdm_core::grid::Spacing;
use ggdm_core::scheduler_config::SchedulerConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "ddss-cli", version, about = "Learn fast samplers for pretrained diffusion models (DDSS over GGDM)")]
struct Cli {
    /// Print only results and errors (no progress output).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a DDPM (UNet2DModel, simple loss, EMA) and write it in diffusers layout.
    Train(train::TrainArgs),
    /// Draw samples from a model with DDPM, DDIM, DPM-Solver++, UniPC or a learned sampler.
    Sample(sample::SampleArgs),
    /// Train a small domain classifier whose features serve as `--features FILE.safetensors`.
    ///
    /// Trains on the labelled training split of an MNIST-layout data set folder (all 60k images of
    /// Fashion-MNIST unless --num is given), reports the accuracy on its test split (t10k) and
    /// writes the weights (FILE.safetensors) and a JSON sidecar next to them (FILE.json: format,
    /// arch, feature_dim, seed, epochs, test_accuracy, data). Arch `a` (128-d features,
    /// conv/max-pool + fully connected) is meant for the search loss, arch `b` (256-d features,
    /// GroupNorm + global average pooling) for held-out evaluation. Adam with a cosine learning-rate
    /// decay, seeded shuffling and random horizontal flips; the same seed gives the same network on
    /// the same machine.
    TrainClassifier(classifier_cmd::TrainClassifierArgs),
    /// Compute feature statistics of images and write them as a pytorch-fid `.npz`.
    ///
    /// Writes `mu` (float64 [d]) and `sigma` (float64 [d, d], unbiased covariance) exactly as
    /// pytorch-fid's --save-stats does (deflate-compressed .npz), plus two extra keys: the
    /// features themselves under `features` (float32 [N, d]), so that KID can be computed against
    /// the file later, and the feature set's name under `feature_set` (UTF-8 bytes as uint8;
    /// `bytes(np.load(f)["feature_set"]).decode()`), so that `fid` and `eval` refuse to compare
    /// different feature sets. pytorch-fid ignores the extra keys: it reads only
    /// `np.load(f)["mu"]` and `["sigma"]`.
    Stats(metrics_cmd::StatsArgs),
    /// Print FID and KID between two image sources or statistics files.
    ///
    /// Each PATH is an image source (as for `stats`) or a `.npz` statistics file: pytorch-fid's
    /// (mu, sigma), ours (mu, sigma, features, feature_set) or a features-only file. FID is computed in f64 from
    /// the two (mu, sigma); KID (unbiased MMD^2 with the cubic kernel, mean ± std over 100
    /// subsets of min(1000, N1, N2) rows) needs the features of both sides and is `null` / n/a when
    /// a side has only mu/sigma. Both sides must have the same feature dimension. With --json,
    /// stdout is exactly one JSON object: {"fid", "kid_mean", "kid_std", "features"}.
    Fid(metrics_cmd::FidArgs),
    /// Sample a model and score the samples (FID, KID) against reference statistics.
    ///
    /// Draws --num samples exactly as `ddss-cli sample` does with the same --sampler, --steps,
    /// --eta, --spacing and --seed (sample i uses the noise stream (seed, i), whatever --batch),
    /// rounds them to 8-bit levels as saved PNGs would be (unless --no-quantize), computes their
    /// features, and reports FID against the reference's mu/sigma and KID against its features
    /// (when the .npz has them; write references with `ddss-cli stats`). With --json, stdout is
    /// exactly one JSON object: {"sampler", "steps", "num", "features", "fid", "kid_mean",
    /// "kid_std"}.
    Eval(metrics_cmd::EvalArgs),
    /// Learn a fast sampler for a model (DDSS over GGDM) and compare it with DDIM/DDPM.
    Search(search_cmd::SearchArgs),
    /// Score samplers at several step counts (and learned samplers at their own K) against real
    /// images with one or more feature networks; write results.json, table.md and FID-vs-steps
    /// plots.
    Table(table_cmd::TableArgs),
    /// Write the FID Inception weights (DDSS_INCEPTION or the installed default_1.pt) as a
    /// safetensors file that `--features inception` loads through DDSS_INCEPTION; --half stores
    /// them as fp16 (about 44 MB instead of 87 MB; upcast to f32 on load, so features differ from
    /// the full-precision network by about 1e-3 relative).
    ExportInception(ExportInceptionArgs),
    /// Time a DDSS objective evaluation (forward, loss, exact gradient), sampling or feature
    /// extraction and report its memory as one JSON line (used by `cargo xtask bench`).
    BenchUnroll(bench_cmd::BenchArgs),
    /// Print the timestep grid a spacing gives (diffusers' `timestep_spacing` semantics).
    Timesteps(TimestepsArgs),
    /// Write a learned sampler in another format: the diffusers timestep list, the JSON file, a
    /// diffusers scheduler folder or a whole DDPMPipeline folder (for the Python package in python/).
    Export(export_cmd::ExportArgs),
}

/// The arguments of `ddss-cli export-inception`.
#[derive(clap::Args, Debug)]
struct ExportInceptionArgs {
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Store fp16 instead of f32.
    #[arg(long)]
    half: bool,
}

/// The arguments of `ddss-cli timesteps`.
#[derive(clap::Args, Debug)]
struct TimestepsArgs {
    /// Number of sampling steps K.
    #[arg(long)]
    steps: usize,
    /// leading | trailing | linspace | quadratic | logsnr (log-SNR-uniform; depends on the
    /// noise schedule).
    #[arg(long, default_value = "leading")]
    spacing: String,
    /// Number of training timesteps T.
    #[arg(long, default_value_t = 1000)]
    num_train_timesteps: usize,
    /// diffusers' `steps_offset` (applies to leading spacing).
    #[arg(long, default_value_t = 0)]
    steps_offset: usize,
    /// A scheduler_config.json giving T, steps_offset and the noise schedule (which logsnr
    /// needs); without it, DDPM's linear betas 1e-4..0.02 over --num-train-timesteps.
    #[arg(long, conflicts_with_all = ["num_train_timesteps", "steps_offset"])]
    scheduler_config: Option<PathBuf>,
    /// The list of diffusers' multistep solvers (DPMSolverMultistepScheduler,
    /// UniPCMultistepScheduler; used by dpmpp*/unipc*) instead of DDIM/DDPM's.
    #[arg(long)]
    multistep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // In a multi-rank job only rank 0 logs progress.
    let filter = if cli.quiet || dist::launcher_rank() > 0 { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        // No colour codes in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    common::setup_host_memory();
    // MPI (with the `mpi` feature, under a launcher) stays initialised until `_mpi` drops.
    let _mpi = match dist::init() {
        Ok(guard) => guard,
        Err(err) => return report(err),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = report(err);
            dist::abort_if_parallel(1);
            code
        }
    }
}

fn report(err: anyhow::Error) -> ExitCode {
    // libtorch appends a C++ stack trace to its messages; the first lines say what is wrong.
    // Each cause once: an error that already prints its source is not followed by it again.
    let mut message = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
    }
    let message = message.split("\nException raised from").next().unwrap_or(&message);
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Train(args) => train::run(train::TrainArgs { quiet, ..args }),
        Command::Sample(args) => sample::run(sample::SampleArgs { quiet, ..args }),
        Command::TrainClassifier(args) => classifier_cmd::run(classifier_cmd::TrainClassifierArgs { quiet, ..args }),
        Command::Stats(args) => metrics_cmd::run_stats(metrics_cmd::StatsArgs { quiet, ..args }),
        Command::Fid(args) => metrics_cmd::run_fid(metrics_cmd::FidArgs { quiet, ..args }),
        Command::Eval(args) => metrics_cmd::run_eval(metrics_cmd::EvalArgs { quiet, ..args }),
        Command::Timesteps(args) => timesteps(args),
        Command::Search(args) => search_cmd::run(search_cmd::SearchArgs { quiet, ..args }),
        Command::Table(args) => table_cmd::run(args, quiet),
        Command::ExportInception(args) => export_inception(args),
        Command::BenchUnroll(args) => bench_cmd::run(args),
        Command::Export(args) => export_cmd::run(args),
    }
}

/// Runs `ddss-cli timesteps`.
fn timesteps(args: TimestepsArgs) -> Result<()> {
    let spacing = Spacing::parse(&args.spacing)?;
    let scheduler = match args.scheduler_config {
        Some(path) => SchedulerConfig::from_file(&path)?,
        None => SchedulerConfig {
            num_train_timesteps: args.num_train_timesteps,
            steps_offset: args.steps_offset,
            ..SchedulerConfig::default()
        },
    };
    let grid = if args.multistep {
        scheduler.multistep_timesteps(args.steps, spacing)?
    } else {
        scheduler.timesteps(args.steps, spacing)?
    };
    println!("{}", serde_json::to_string(&grid)?);
    Ok(())
}

/// Runs `ddss-cli export-inception`.
fn export_inception(args: ExportInceptionArgs) -> Result<()> {
    let path = fid_metrics::inception::default_weights_path()?;
    let net = fid_metrics::Inception::load(&path, tch::Device::Cpu)?;
    net.export_safetensors(&args.out, args.half).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{} -> {} ({})", path.display(), args.out.display(), if args.half { "fp16" } else { "f32" });
    Ok(())
}
