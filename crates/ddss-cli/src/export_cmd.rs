//! `ddss-cli export`: a learned sampler (`sampler.json`) in other formats.
//!
//! * `diffusers-timesteps`: the rounded grid, the integer list diffusers' `timesteps=` accepts
//!   (it drops every learned coefficient; the sampler is then DDIM on that grid);
//! * `json`: the file as this build writes it (version 2, with every derived coefficient);
//! * `diffusers-scheduler --out DIR`: `DIR/scheduler_config.json` for the Python package's
//!   `GGDMScheduler.from_pretrained(DIR)` (`python/`): the sampler file under `sampler`, and the
//!   model's scheduler settings under diffusers' names, so ggdm-core's model loader and diffusers'
//!   other schedulers read the same folder;
//! * `diffusers-pipeline --out DIR [--model MODEL]`: a `DDPMPipeline` folder, `model_index.json`,
//!   `unet/` (the model's `config.json` and weights, copied) and `scheduler/` (as above), which
//!   `DDPMPipeline.from_pretrained(DIR)` loads once `ddss_sampler` is imported.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use ggdm_core::ggdm::GgdmSampler;
use ggdm_nets::model_dir::load_model_dir;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The arguments of `ddss-cli export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The `sampler.json` of a search run.
    #[arg(long)]
    pub sampler: PathBuf,
    /// diffusers-timesteps: the integer list diffusers' `timesteps=` accepts; json: the full file;
    /// diffusers-scheduler: a folder GGDMScheduler.from_pretrained loads (python/); diffusers-pipeline:
    /// a DDPMPipeline folder (model_index.json, unet/, scheduler/).
    #[arg(long, value_enum, default_value_t = ExportFormat::DiffusersTimesteps)]
    pub format: ExportFormat,
    /// The folder diffusers-scheduler and diffusers-pipeline write.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// diffusers-pipeline: the model directory whose network goes into unet/ (a diffusers model
    /// folder; default: the sampler's model.name).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// The formats of `ddss-cli export`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    DiffusersTimesteps,
    Json,
    DiffusersScheduler,
    DiffusersPipeline,
}

/// The Python package's scheduler class, as `model_index.json` names it.
const SCHEDULER_CLASS: [&str; 2] = ["ddss_sampler", "GGDMScheduler"];
/// The diffusers version the folders are written for (the one CI tests).
const DIFFUSERS_VERSION: &str = "0.42.1";
/// The network files of a diffusers model folder.
const UNET_FILES: [&str; 2] = ["config.json", "diffusion_pytorch_model.safetensors"];

/// Runs `ddss-cli export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let sampler = GgdmSampler::load(&args.sampler, tch::Device::Cpu)
        .with_context(|| format!("loading sampler {}", args.sampler.display()))?;
    let out = || {
        args.out
            .as_deref()
            .with_context(|| format!("--format {}: give the folder to write with --out DIR", format_name(args.format)))
    };
    match args.format {
        ExportFormat::DiffusersTimesteps => {
            // diffusers takes integer timesteps; the learned grid is continuous, so it is
            // rounded. The learned coefficients (u, w, sigma, p, q) cannot be expressed by a
            // timestep list at all: the other formats keep them.
            let ints: Vec<i64> = sampler.timesteps().iter().map(|t| t.round().max(0.0) as i64).collect();
            println!("{}", serde_json::to_string(&ints)?);
        }
        ExportFormat::Json => println!("{}", serde_json::to_string_pretty(&sampler.to_file())?),
        ExportFormat::DiffusersScheduler => {
            let dir = out()?;
            write_scheduler(&sampler, dir)?;
            println!("{}", dir.display());
        }
        ExportFormat::DiffusersPipeline => {
            let dir = out()?;
            let model = match &args.model {
                Some(model) => model.clone(),
                None => PathBuf::from(&sampler.model.name),
            };
            write_pipeline(&sampler, &model, dir)?;
            println!("{}", dir.display());
        }
    }
    Ok(())
}

fn format_name(format: ExportFormat) -> String {
    format.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

/// `GGDMScheduler`'s `scheduler_config.json`: the model's settings under diffusers' names (as the
/// trainer writes them, `use_lu_lambdas` always present) and the sampler file under `sampler`.
pub fn scheduler_config(sampler: &GgdmSampler) -> Result<Value> {
    let mut config = sampler.scheduler.to_diffusers_json();
    let map = config.as_object_mut().context("the scheduler settings are not a JSON object")?;
    map.insert("_class_name".into(), json!(SCHEDULER_CLASS[1]));
    map.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    map.insert("use_lu_lambdas".into(), json!(sampler.scheduler.use_lu_lambdas));
    map.insert("sampler".into(), serde_json::to_value(sampler.to_file())?);
    Ok(config)
}

/// Writes `dir/scheduler_config.json` ([`scheduler_config`]).
fn write_scheduler(sampler: &GgdmSampler, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(&scheduler_config(sampler)?)?;
    ggdm_core::io::write_atomic(&dir.join("scheduler_config.json"), text.as_bytes())?;
    Ok(())
}

/// Writes a `DDPMPipeline` folder: `model_index.json`, `unet/` (copied from `model`, which must fit
/// the sampler) and `scheduler/`.
fn write_pipeline(sampler: &GgdmSampler, model: &Path, dir: &Path) -> Result<()> {
    let unet = unet_folder(model)?;
    let loaded =
        load_model_dir(model, tch::Device::Cpu).with_context(|| format!("loading --model {}", model.display()))?;
    sampler
        .check_compatible(&loaded.scheduler, loaded.sample_shape())
        .with_context(|| format!("the sampler does not fit the model {}", model.display()))?;
    let unet_out = dir.join("unet");
    std::fs::create_dir_all(&unet_out).with_context(|| format!("creating {}", unet_out.display()))?;
    for name in UNET_FILES {
        let (from, to) = (unet.join(name), unet_out.join(name));
        std::fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    write_scheduler(sampler, &dir.join("scheduler"))?;
    let index = json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": SCHEDULER_CLASS,
        "unet": ["diffusers", "UNet2DModel"],
    });
    ggdm_core::io::write_atomic(&dir.join("model_index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
    Ok(())
}

/// The folder holding `model`'s network files (`model` itself or `model/unet`).
fn unet_folder(model: &Path) -> Result<PathBuf> {
    let found = [model.to_path_buf(), model.join("unet")]
        .into_iter()
        .find(|dir| UNET_FILES.iter().all(|name| dir.join(name).is_file()));
    match found {
        Some(dir) => Ok(dir),
        None => bail!(
            "--format diffusers-pipeline copies the network of a diffusers model folder: {} holds no {} (neither \
             there nor in unet/); give the model with --model DIR",
            model.display(),
            UNET_FILES.join(" + ")
        ),
    }
}
