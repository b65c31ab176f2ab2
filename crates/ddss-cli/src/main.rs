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
    Train {
        /// Training images: an IDX(.gz) file, a folder of images (bmp, jpg, jpeg, pgm, png, ppm,
        /// tif, tiff, webp; other files are skipped), or a folder holding
        /// train-images-idx3-ubyte.gz (e.g. /usr/share/datasets/fashion-mnist).
        #[arg(long)]
        data: PathBuf,
        /// Also read the images of --data's subfolders (symlinked ones included), depth first in
        /// name order.
        #[arg(long)]
        recursive: bool,
        /// Output model directory (config.json, diffusion_pytorch_model.safetensors,
        /// scheduler_config.json, checkpoint/, metrics.jsonl).
        #[arg(long)]
        out: PathBuf,
        /// Training config (TOML with [model], [train], [scheduler]); default:
        /// configs/train_fashion_mnist.toml (built in).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Number of optimiser steps (overrides [train] steps).
        #[arg(long)]
        steps: Option<u64>,
        /// auto | cpu | cuda | cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Continue from OUT/checkpoint/state.safetensors with OUT/train_config.toml.
        #[arg(long)]
        resume: bool,
        /// Stop (with a checkpoint) after this many minutes; continue later with --resume.
        #[arg(long)]
        max_minutes: Option<f64>,
        /// Stop (with a checkpoint) after this step while keeping the learning-rate schedule of
        /// --steps; continue later with --resume.
        #[arg(long)]
        stop_at_step: Option<u64>,
    },
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
    TrainClassifier {
        /// Data set folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
        /// t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (e.g.
        /// /usr/share/datasets/fashion-mnist).
        #[arg(long)]
        data: PathBuf,
        /// Output weights file; must end in .safetensors (the sidecar gets the same name with .json).
        #[arg(long)]
        out: PathBuf,
        /// Architecture: a (search loss, 128-d features) or b (evaluation, 256-d features).
        #[arg(long)]
        arch: String,
        /// Seed of initialisation, shuffling and augmentation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Passes over the training set.
        #[arg(long, default_value_t = 4)]
        epochs: usize,
        /// Mini-batch size.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Peak Adam learning rate (cosine decay to 0).
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        /// Turn off the random horizontal flips.
        #[arg(long)]
        no_augment: bool,
        /// Train on the first N training images only (default: all).
        #[arg(long)]
        num: Option<usize>,
        /// auto | cpu | cuda | cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Compute feature statistics of images and write them as a pytorch-fid `.npz`.
    ///
    /// Writes `mu` (float64 [d]) and `sigma` (float64 [d, d], unbiased covariance) exactly as
    /// pytorch-fid's --save-stats does (deflate-compressed .npz), plus two extra keys: the
    /// features themselves under `features` (float32 [N, d]), so that KID can be computed against
    /// the file later, and the feature set's name under `feature_set` (UTF-8 bytes as uint8;
    /// `bytes(np.load(f)["feature_set"]).decode()`), so that `fid` and `eval` refuse to compare
    /// different feature sets. pytorch-fid ignores the extra keys: it reads only
    /// `np.load(f)["mu"]` and `["sigma"]`.
    Stats {
        /// Images: a folder of images (the files pytorch-fid reads: extensions bmp, jpg, jpeg, pgm,
        /// png, ppm, tif, tiff, webp, in any case, in file-name order; other files are skipped), an
        /// IDX(.gz) image file, a float32 N x C x H x W .npy of samples in [-1, 1], or a data set
        /// folder holding train-images-idx3-ubyte.gz (its training images).
        path: PathBuf,
        /// Output statistics file (.npz).
        #[arg(long)]
        out: PathBuf,
        /// Feature set: inception (the FID Inception; DDSS_INCEPTION overrides where its weights
        /// are found) or the path of a domain classifier .safetensors (its .json sidecar next to
        /// it).
        #[arg(long, default_value = "inception")]
        features: String,
        /// Use only the first N images of PATH (in file-name order for folders, file order for
        /// IDX/.npy); default: all.
        #[arg(long)]
        num: Option<usize>,
        /// Also read the images of PATH's subfolders (symlinked ones included), depth first in
        /// name order; pytorch-fid reads none.
        #[arg(long)]
        recursive: bool,
        /// Images per network batch.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// auto | cpu | cuda | cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Print FID and KID between two image sources or statistics files.
    ///
    /// Each PATH is an image source (as for `stats`) or a `.npz` statistics file: pytorch-fid's
    /// (mu, sigma), ours (mu, sigma, features, feature_set) or a features-only file. FID is computed in f64 from
    /// the two (mu, sigma); KID (unbiased MMD^2 with the cubic kernel, mean ± std over 100
    /// subsets of min(1000, N1, N2) rows) needs the features of both sides and is `null` / n/a when
    /// a side has only mu/sigma. Both sides must have the same feature dimension. With --json,
    /// stdout is exactly one JSON object: {"fid", "kid_mean", "kid_std", "features"}.
    Fid {
        /// First image source or .npz.
        path1: PathBuf,
        /// Second image source or .npz.
        path2: PathBuf,
        /// Feature set for image sources: inception (the default) or the path of a classifier
        /// .safetensors. Statistics files written by `stats` record their feature set, and a
        /// different one on the other side (or here) is an error.
        #[arg(long)]
        features: Option<String>,
        /// Use only the first N images of each image source (.npz files are used as they are).
        #[arg(long)]
        num: Option<usize>,
        /// Also read the images of the image folders' subfolders (symlinked ones included), depth
        /// first in name order; pytorch-fid reads none.
        #[arg(long)]
        recursive: bool,
        /// Images per network batch.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// auto | cpu | cuda | cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
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
    ExportInception {
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Store fp16 instead of f32.
        #[arg(long)]
        half: bool,
    },
    /// Time a DDSS objective evaluation (forward, loss, exact gradient), sampling or feature
    /// extraction and report its memory as one JSON line (used by `cargo xtask bench`).
    BenchUnroll(bench_cmd::BenchArgs),
    /// Print the timestep grid a spacing gives (diffusers' `timestep_spacing` semantics).
    Timesteps {
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
    },
    /// Write a learned sampler in another format: the diffusers timestep list, the JSON file, a
    /// diffusers scheduler folder or a whole DDPMPipeline folder (for the Python package in python/).
    Export(export_cmd::ExportArgs),
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
    match cli.command {
        Command::Train { data, recursive, out, config, steps, device, resume, max_minutes, stop_at_step } => {
            train::run(train::TrainArgs {
                data,
                recursive,
                out,
                config,
                steps,
                device,
                resume,
                max_minutes,
                stop_at_step,
                quiet: cli.quiet,
            })?
        }
        Command::Sample(mut args) => {
            args.quiet = cli.quiet;
            sample::run(args)?
        }
        Command::TrainClassifier { data, out, arch, seed, epochs, batch, lr, no_augment, num, device } => {
            classifier_cmd::run(classifier_cmd::TrainClassifierArgs {
                data,
                out,
                arch,
                seed,
                epochs,
                batch,
                lr,
                no_augment,
                num,
                device,
                quiet: cli.quiet,
            })?
        }
        Command::Stats { path, out, features, num, recursive, batch, device } => {
            metrics_cmd::run_stats(metrics_cmd::StatsArgs {
                path,
                out,
                features,
                num,
                recursive,
                batch,
                device,
                quiet: cli.quiet,
            })?
        }
        Command::Fid { path1, path2, features, num, recursive, batch, json, device } => {
            metrics_cmd::run_fid(metrics_cmd::FidArgs {
                path1,
                path2,
                features,
                num,
                recursive,
                batch,
                json,
                device,
                quiet: cli.quiet,
            })?
        }
        Command::Eval(mut args) => {
            args.quiet = cli.quiet;
            metrics_cmd::run_eval(args)?
        }
        Command::Timesteps { steps, spacing, num_train_timesteps, steps_offset, scheduler_config, multistep } => {
            let spacing = Spacing::parse(&spacing)?;
            let scheduler = match scheduler_config {
                Some(path) => SchedulerConfig::from_file(&path)?,
                None => SchedulerConfig { num_train_timesteps, steps_offset, ..SchedulerConfig::default() },
            };
            let grid = if multistep {
                scheduler.multistep_timesteps(steps, spacing)?
            } else {
                scheduler.timesteps(steps, spacing)?
            };
            println!("{}", serde_json::to_string(&grid)?);
        }
        Command::Search(args) => search_cmd::run(search_cmd::SearchArgs { quiet: cli.quiet, ..args })?,
        Command::Table(args) => table_cmd::run(args, cli.quiet)?,
        Command::ExportInception { out, half } => {
            let path = fid_metrics::inception::default_weights_path()?;
            let net = fid_metrics::Inception::load(&path, tch::Device::Cpu)?;
            net.export_safetensors(&out, half).with_context(|| format!("writing {}", out.display()))?;
            println!("{} -> {} ({})", path.display(), out.display(), if half { "fp16" } else { "f32" });
        }
        Command::BenchUnroll(args) => bench_cmd::run(args)?,
        Command::Export(args) => export_cmd::run(args)?,
    }
    Ok(())
}
