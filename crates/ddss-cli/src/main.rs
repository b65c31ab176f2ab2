//! `ddss-cli`: the command-line front end (DESIGN.md section 7).

mod common;
mod sample;
mod train;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ggdm_core::ggdm::GgdmSampler;
use ggdm_core::grid::{timesteps, Spacing};
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
        /// Training images: an IDX(.gz) file, a folder of PNG/JPEG images, or a folder holding
        /// train-images-idx3-ubyte.gz (e.g. /usr/share/datasets/fashion-mnist).
        #[arg(long)]
        data: PathBuf,
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
    /// Draw samples from a model with DDPM, DDIM or a learned sampler.
    Sample {
        /// Model directory (diffusers layout, or model.pt + model.json).
        #[arg(long)]
        model: PathBuf,
        /// ddpm | ddim | path of a sampler.json written by `ddss-cli search`.
        #[arg(long)]
        sampler: String,
        /// Sampling steps K (default: 50 for ddim, T for ddpm, the file's K for sampler.json).
        #[arg(long)]
        steps: Option<usize>,
        /// DDIM eta (0 = deterministic).
        #[arg(long, default_value_t = 0.0)]
        eta: f64,
        /// leading | trailing | linspace (diffusers' timestep_spacing) | quadratic; default: the
        /// model's scheduler_config.json.
        #[arg(long)]
        spacing: Option<String>,
        /// Number of samples.
        #[arg(long, default_value_t = 64)]
        num: usize,
        /// Samples per network batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Noise seed (sample i uses stream (seed, i)).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Initial noise as float32 N x C x H x W .npy (sets --num).
        #[arg(long)]
        init_noise: Option<PathBuf>,
        /// PNG grid of all samples (default samples.png when no output is given).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Folder for one PNG per sample.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// float32 N x C x H x W .npy of the samples in [-1, 1].
        #[arg(long)]
        out_npy: Option<PathBuf>,
        /// auto | cpu | cuda | cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Print the timestep grid a spacing gives (diffusers' `timestep_spacing` semantics).
    Timesteps {
        /// Number of sampling steps K.
        #[arg(long)]
        steps: usize,
        /// leading | trailing | linspace | quadratic.
        #[arg(long, default_value = "leading")]
        spacing: String,
        /// Number of training timesteps T.
        #[arg(long, default_value_t = 1000)]
        num_train_timesteps: usize,
        /// diffusers' `steps_offset` (applies to leading spacing).
        #[arg(long, default_value_t = 0)]
        steps_offset: usize,
    },
    /// Print a learned sampler in another format.
    Export {
        /// The `sampler.json` of a search run.
        #[arg(long)]
        sampler: PathBuf,
        /// diffusers-timesteps: the integer list diffusers' `timesteps=` accepts; json: the full file.
        #[arg(long, value_enum, default_value_t = ExportFormat::DiffusersTimesteps)]
        format: ExportFormat,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ExportFormat {
    DiffusersTimesteps,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = if cli.quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train { data, out, config, steps, device, resume, max_minutes, stop_at_step } => {
            train::run(train::TrainArgs {
                data,
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
        Command::Sample {
            model,
            sampler,
            steps,
            eta,
            spacing,
            num,
            batch,
            seed,
            init_noise,
            out,
            out_dir,
            out_npy,
            device,
        } => sample::run(sample::SampleArgs {
            model,
            sampler,
            steps,
            eta,
            spacing,
            num,
            batch,
            seed,
            init_noise,
            out,
            out_dir,
            out_npy,
            device,
            quiet: cli.quiet,
        })?,
        Command::Timesteps { steps, spacing, num_train_timesteps, steps_offset } => {
            let spacing = Spacing::parse(&spacing)?;
            let grid = timesteps(num_train_timesteps, steps, spacing, steps_offset)?;
            println!("{}", serde_json::to_string(&grid)?);
        }
        Command::Export { sampler, format } => {
            let loaded = GgdmSampler::load(&sampler, tch::Device::Cpu)
                .with_context(|| format!("loading sampler {}", sampler.display()))?;
            match format {
                ExportFormat::DiffusersTimesteps => {
                    // diffusers takes integer timesteps; the learned grid is continuous, so it is
                    // rounded. The learned coefficients (u, w, sigma, p, q) cannot be expressed by
                    // a timestep list at all: use ddss-cli sample --sampler FILE.json for those.
                    let ints: Vec<i64> = loaded.timesteps().iter().map(|t| t.round().max(0.0) as i64).collect();
                    println!("{}", serde_json::to_string(&ints)?);
                }
                ExportFormat::Json => println!("{}", serde_json::to_string_pretty(&loaded.to_file())?),
            }
        }
    }
    Ok(())
}
