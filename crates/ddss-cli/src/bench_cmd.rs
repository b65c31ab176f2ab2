//! `ddss-cli bench-unroll`: one DDSS objective evaluation (forward, loss, exact gradient) of a
//! K-step GGDM sampler on a model, reporting its time and memory as one JSON line. `cargo xtask
//! bench` runs it in a fresh process per setting, so each peak is that setting's alone.
//!
//! Memory: on CUDA, libtorch's allocator peak (`max_memory_allocated`) is not exposed through tch,
//! so the process's peak resident memory (`VmHWM` in /proc/self/status) is reported on CPU, and on
//! CUDA the same CPU number plus a note; the step's extra memory is `peak - before`.

use crate::common::parse_device;
use anyhow::{bail, Context, Result};
use ddss_opt::loss::{FeatureLoss, LossKind};
use ddss_opt::objective::{BatchNoise, Objective};
use ddss_opt::unroll::Remat;
use fid_metrics::features::open_extractor;
use ggdm_core::ggdm::{GgdmSampler, History, Learnable};
use ggdm_core::grid::Spacing;
use ggdm_core::model_dir::load_model_dir;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Kind, Tensor};

/// The arguments of `ddss-cli bench-unroll`.
pub struct BenchArgs {
    pub model: PathBuf,
    pub steps: usize,
    pub batch: usize,
    pub remat: String,
    pub features: String,
    pub device: String,
}

/// Resident-memory high-water mark and current value of this process, in MiB (Linux).
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn parse_remat(name: &str) -> Result<Remat> {
    match name {
        "naive" => Ok(Remat::Naive),
        "per_call" | "per-call" => Ok(Remat::PerCall),
        other => match other.strip_prefix("budget:") {
            Some(n) => Ok(Remat::Budget { stored_steps: n.parse().with_context(|| format!("--remat {other}"))? }),
            None => bail!("--remat {other}: expected naive, per_call or budget:N"),
        },
    }
}

/// Runs `ddss-cli bench-unroll`.
pub fn run(args: BenchArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let remat = parse_remat(&args.remat)?;
    let model = load_model_dir(&args.model, device)?;
    let shape = model.sample_shape().context("the model does not fix its sample size")?;
    let extractor = open_extractor(&args.features, device)?;
    // Reference features: a fixed random set is enough to time the loss and its gradient.
    tch::manual_seed(0);
    let real = Tensor::randn([256, extractor.dim() as i64], (Kind::Float, device)).abs();
    let loss = FeatureLoss::new(LossKind::Kid, &real)?;
    let sampler = GgdmSampler::init_from_spacing(
        &model.scheduler,
        args.steps,
        Spacing::Trailing,
        0.0,
        History::Full,
        Learnable::default(),
        device,
    )?;
    let objective = Objective {
        sampler: &sampler,
        model: model.denoiser.as_ref(),
        extractor: extractor.as_ref(),
        loss: &loss,
        remat,
        micro_batch: args.batch,
        sample_shape: shape,
        device,
        state_kind: Kind::Float,
    };
    let (_, rss_before) = memory_mib();
    let started = Instant::now();
    let value = objective.loss_and_grad(BatchNoise { seed: 0, batch: args.batch })?;
    if let tch::Device::Cuda(_) = device {
        tch::Cuda::synchronize(0);
    }
    let seconds = started.elapsed().as_secs_f64();
    let (peak, _) = memory_mib();
    let line = serde_json::json!({
        "steps": args.steps,
        "batch": args.batch,
        "remat": args.remat,
        "device": format!("{device:?}"),
        "seconds": seconds,
        "loss": value,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
        "step_extra_mib": peak - rss_before,
    });
    println!("{line}");
    Ok(())
}
