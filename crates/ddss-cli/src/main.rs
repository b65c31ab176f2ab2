//! `ddss-cli`: the command-line front end (DESIGN.md section 7).

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
