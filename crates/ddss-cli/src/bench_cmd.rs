//! `ddss-cli bench-unroll`: time and memory of one workload, reported as one JSON line. `cargo
//! xtask bench` and `tools/gpu_bench.sh` run it in a fresh process per setting, so each peak is
//! that setting's alone, next to the PyTorch reference of `bench/reference/`.
//!
//! Workloads (`--what`):
//! * `step`: one DDSS objective evaluation (forward, loss, exact gradient) of a K-step GGDM sampler
//!   at DDIM initialisation (eta 0, trailing grid, full history), KID on the chosen features;
//! * `sample`: the same sampler without autograd (DDIM), reported as images per second;
//! * `features`: the feature network alone on random samples, without autograd, images per second.
//!
//! Each workload runs `--warmup` times, then `--repeat` times; the reported time is the median.
//! The network is a model directory (`--model`) or, with `--unet-config`, a diffusers
//! `config.json` built with random weights (speed does not depend on the values); the feature
//! network may be `inception-random` likewise.
//!
//! Memory. CPU: the process's peak resident memory (`VmHWM` in /proc/self/status) minus the
//! resident memory just before the first run. CUDA: the device memory in use (`cudaMemGetInfo`:
//! total - free) is read before the first run and after the last; the caching allocator keeps what
//! it reserved, so the difference is the peak reserved by the runs (`memory_mib`; the PyTorch
//! reference reports the same quantity). Next to it, from the caching allocator's counters
//! ([`ggdm_nets::memory`]), the peak bytes in tensors and the peak reserved, each above its value
//! before the runs (`cuda_max_allocated_mib`, `cuda_max_reserved_mib`, as the reference's
//! `torch.cuda.max_memory_allocated` and `max_memory_reserved`), and the peak bytes in tensors of
//! the timed runs alone (`cuda_timed_max_allocated_mib`). With `--cuda-graphs`, also the device
//! memory the graphs' private pool holds (`cuda_graph_pool_mib`): a replay works in that pool
//! without the allocator counting it as allocated, so such a run needs its timed peak plus the
//! pool (`bench/reference/table.py` compares that).

use crate::common::parse_device;
use anyhow::{bail, Context, Result};
use clap::Args;
use ddss_opt::loss::{FeatureLoss, LossKind};
use ddss_opt::objective::{BatchNoise, Objective};
use ddss_opt::unroll::Remat;
use fid_metrics::features::{open_extractor, FeatureExtractor};
use fid_metrics::inception::{Inception, Precision};
use ggdm_core::ggdm::{GgdmSampler, History, Learnable};
use ggdm_core::grid::Spacing;
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_nets::memory;
use ggdm_nets::model_dir::{Bf16Denoiser, ChannelsLastDenoiser, NetworkPrecision};
use ggdm_nets::unet::{UNet2DConfig, UNet2DModel, UNetDenoiser};
use ggdm_nets::DifferentiableDenoiser;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The arguments of `ddss-cli bench-unroll`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// step (one DDSS objective + gradient) | sample (DDIM, no grad) | features (feature network).
    #[arg(long, default_value = "step")]
    pub what: String,
    /// Model directory (diffusers layout or TorchScript).
    #[arg(long, default_value = "models/fashion-mnist-ddpm")]
    pub model: PathBuf,
    /// A diffusers UNet2DModel config.json to build with random weights instead of `--model`
    /// (the scheduler is the scheduler_config.json beside it, else diffusers' DDPM defaults).
    #[arg(long)]
    pub unet_config: Option<PathBuf>,
    /// Sampler steps K.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// naive | per_call | budget:N (N calls stored) | memory:MIB (as many calls stored as fit in MIB
    /// MiB) | free:PERCENT (as many as fit in that share of the memory free) (the step workload).
    /// The budget forms keep and recompute UNet calls on tapes (about a quarter of autograd's
    /// memory per call); per_call recomputes under autograd.
    #[arg(long, default_value = "per_call")]
    pub remat: String,
    /// Feature network: inception, inception-random (random weights) or a classifier .safetensors.
    #[arg(long, default_value = "models/fmnist-classifier-a.safetensors")]
    pub features: String,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Arithmetic of the network calls: f32, or bf16 (weights and inputs cast to bf16 for each
    /// call, its output cast back to f32 for the linear combination and the loss).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Replay the network calls as CUDA graphs (no-autograd calls, and each recomputed call's
    /// forward and backward in the step's reverse sweep); needs `--features cuda-graphs`.
    #[arg(long)]
    pub cuda_graphs: bool,
    /// Run the network in channels-last memory format (convolution weights and each call's input
    /// NHWC in memory), for NHWC cuDNN kernels; only with --unet-config.
    #[arg(long)]
    pub channels_last: bool,
    /// Let cuDNN time its convolution algorithms on the first call of each shape and keep the
    /// fastest (`torch.backends.cudnn.benchmark`); no effect on the CPU.
    #[arg(long)]
    pub cudnn_benchmark: bool,
    /// Back-propagate through the feature network this many samples at a time (the step
    /// workload; default: the whole batch at once).
    #[arg(long)]
    pub feature_chunk: Option<usize>,
    /// Writes the step's noise (`x_init`, `z_0` .. `z_{K-1}`) and the real features (`real`) to
    /// this safetensors file, so the reference can be run on exactly the same inputs.
    #[arg(long)]
    pub save_noise: Option<PathBuf>,
}

/// The network's name in the tables: the `--unet-config` file without `.config.json` / `.json`,
/// else the model folder's name (as `bench/reference/ddss_ref.py` reports it).
fn model_name(args: &BenchArgs) -> String {
    let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    match &args.unet_config {
        Some(config) => {
            let name = file_name(config);
            let stem = name.strip_suffix(".config.json").or_else(|| name.strip_suffix(".json"));
            stem.map(str::to_string).unwrap_or(name)
        }
        None => file_name(&args.model),
    }
}

/// The process's peak and current resident memory, in MiB (NaN where unreadable).
fn memory_mib() -> (f64, f64) {
    let mib = |bytes: Option<u64>| bytes.map_or(f64::NAN, |b| b as f64 / f64::from(1 << 20));
    (mib(memory::peak_resident_bytes()), mib(memory::resident_bytes()))
}

/// Device memory in use on `device` (total - free), in MiB, if it is a GPU.
fn cuda_used_mib(device: Device) -> Option<f64> {
    let Device::Cuda(index) = device else {
        return None;
    };
    memory::cuda_mem_get_info(index).map(|(free, total)| (total - free) as f64 / f64::from(1 << 20))
}

fn parse_remat(name: &str) -> Result<Remat> {
    fn number<T: std::str::FromStr>(text: &str, name: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        text.parse().with_context(|| format!("--remat {name}"))
    }
    Ok(match name.split_once(':') {
        None if name == "naive" => Remat::Naive,
        None if name == "per_call" || name == "per-call" => Remat::PerCall,
        Some(("budget", n)) => Remat::Budget { stored_steps: number(n, name)? },
        Some(("memory", mib)) => Remat::MemoryBudget { mib: number(mib, name)? },
        Some(("free", percent)) => Remat::FreeMemory { percent: number(percent, name)? },
        _ => bail!("--remat {name}: expected naive, per_call, budget:N (stored calls), memory:MIB or free:PERCENT"),
    })
}

/// The network and its scheduler settings.
fn open_model(args: &BenchArgs, device: Device) -> Result<(Box<dyn DifferentiableDenoiser>, SchedulerConfig)> {
    let precision = NetworkPrecision::parse(&args.precision)?;
    let bf16 = precision == NetworkPrecision::Bf16;
    let (denoiser, scheduler): (Box<dyn DifferentiableDenoiser>, SchedulerConfig) = match &args.unet_config {
        Some(config_path) => {
            let config = UNet2DConfig::from_json_file(config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            tch::manual_seed(0);
            let mut model = UNet2DModel::new(config, device)?;
            model.var_store_mut().freeze();
            if bf16 {
                model.var_store_mut().bfloat16();
            }
            if args.channels_last {
                model.to_channels_last()?;
            }
            let beside = config_path.parent().map(|dir| dir.join("scheduler_config.json"));
            let scheduler = match beside.filter(|p| p.is_file()) {
                Some(path) => SchedulerConfig::from_file(&path)?,
                None => SchedulerConfig::default(),
            };
            let denoiser: Box<dyn DifferentiableDenoiser> =
                Box::new(UNetDenoiser::new(model, scheduler.prediction_type));
            let denoiser: Box<dyn DifferentiableDenoiser> =
                if args.channels_last { Box::new(ChannelsLastDenoiser(denoiser)) } else { denoiser };
            (denoiser, scheduler)
        }
        None => {
            if args.channels_last {
                bail!("--channels-last is only available with --unet-config");
            }
            let loaded = crate::common::load_model(&args.model, device, precision, args.cuda_graphs)?;
            return Ok((loaded.denoiser, loaded.scheduler));
        }
    };
    let denoiser: Box<dyn DifferentiableDenoiser> = if bf16 { Box::new(Bf16Denoiser(denoiser)) } else { denoiser };
    Ok((crate::common::graphed_if(denoiser, device, args.cuda_graphs)?, scheduler))
}

/// The feature network: as [`open_extractor`], plus `inception-random`. On CUDA the Inception
/// runs with TF32 convolutions, PyTorch's default for cuDNN and what the reference uses.
fn open_features(spec: &str, device: Device) -> Result<Box<dyn FeatureExtractor>> {
    let precision = if device.is_cuda() { Precision::Tf32 } else { Precision::F32 };
    Ok(match spec {
        "inception-random" => Box::new(Inception::random(0, device)?.with_precision(precision)),
        "inception" => Box::new(Inception::load_default(device)?.with_precision(precision)),
        other => open_extractor(other, device)?,
    })
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn save_noise(path: &Path, noise: BatchNoise, shape: [i64; 3], steps: usize, real: &Tensor) -> Result<()> {
    let (x_init, z) = noise.draw(0, noise.batch, shape, steps, Device::Cpu)?;
    let mut named = vec![("x_init".to_string(), x_init), ("real".to_string(), real.to_device(Device::Cpu))];
    named.extend(z.into_iter().enumerate().map(|(i, t)| (format!("z_{i}"), t)));
    Tensor::write_safetensors(&named, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One run of a workload, returning what it computed (loss and gradient norms, or nothing).
type Workload = Box<dyn FnMut() -> Result<serde_json::Value>>;

/// The `step` workload: one DDSS objective evaluation of `sampler` with its exact gradient, KID
/// on `--features` against a fixed random set of reference features. Adds `state_batch_mib` to
/// `extra`.
fn step_workload(
    args: &BenchArgs,
    sampler: GgdmSampler,
    model: Box<dyn DifferentiableDenoiser>,
    shape: [i64; 3],
    device: Device,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Workload> {
    let batch = args.batch;
    let feature_chunk = args.feature_chunk;
    let remat = parse_remat(&args.remat)?;
    let extractor = open_features(&args.features, device)?;
    // One f32 batch of states: what each further step adds to per-call rematerialisation
    // (its input, its prediction and its noise are kept, and the reverse sweep holds the
    // cotangents of its input and prediction; with CUDA graphs its output is kept too).
    let state_bytes = batch as f64 * (shape[0] * shape[1] * shape[2]) as f64 * 4.0;
    extra.insert("state_batch_mib".into(), (state_bytes / f64::from(1 << 20)).into());
    // Reference features: a fixed random set is enough to time the loss and its gradient.
    tch::manual_seed(0);
    let real = Tensor::randn([256, extractor.dim() as i64], (Kind::Float, Device::Cpu)).abs().to_device(device);
    let loss = FeatureLoss::new(LossKind::Kid, &real)?;
    let noise = BatchNoise { seed: 0, batch };
    let mut last_plan = None;
    if let Some(path) = &args.save_noise {
        save_noise(path, noise, shape, args.steps, &real)?;
    }
    Ok(Box::new(move || {
        let objective = Objective {
            sampler: &sampler,
            model: model.as_ref(),
            extractor: extractor.as_ref(),
            loss: &loss,
            remat,
            micro_batch: batch,
            feature_chunk,
            sample_shape: shape,
            device,
            state_kind: Kind::Float,
            teacher: None,
        };
        for p in sampler.trainable() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let evaluation = objective.loss_and_grad(noise)?;
        if let Some(plan) = evaluation.memory_plan {
            plan.log_if_changed(&mut last_plan);
        }
        let mut norms = serde_json::Map::new();
        for (name, p) in sampler.params.named() {
            let g = p.grad();
            if g.defined() {
                norms.insert(name.into(), g.norm().double_value(&[]).into());
            }
        }
        let plan = evaluation.memory_plan.map(|p| {
            let call_mib = p.call_bytes as f64 / f64::from(1 << 20);
            serde_json::json!({ "stored_steps": p.stored_steps, "call_activation_mib": call_mib })
        });
        Ok(serde_json::json!({ "loss": evaluation.loss, "grad_norms": norms, "memory_plan": plan }))
    }))
}

/// The `sample` workload: `sampler` on a batch of random noise, without autograd.
fn sample_workload(
    sampler: GgdmSampler,
    model: Box<dyn DifferentiableDenoiser>,
    batch: usize,
    shape: [i64; 3],
    device: Device,
) -> Workload {
    Box::new(move || {
        let full = [batch as i64, shape[0], shape[1], shape[2]];
        tch::no_grad(|| -> Result<()> {
            let x_init = Tensor::randn(full, (Kind::Float, device));
            let z: Vec<Tensor> = (0..sampler.steps).map(|_| Tensor::randn(full, (Kind::Float, device))).collect();
            let _ = sampler.sample(model.as_ref(), &x_init, &z)?;
            Ok(())
        })?;
        Ok(serde_json::Value::Null)
    })
}

/// The `features` workload: the feature network on a batch of random samples, without autograd.
/// Adds `feature_dim` to `extra`.
fn features_workload(
    args: &BenchArgs,
    shape: [i64; 3],
    device: Device,
    extra: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Workload> {
    let batch = args.batch;
    let extractor = open_features(&args.features, device)?;
    extra.insert("feature_dim".into(), extractor.dim().into());
    Ok(Box::new(move || {
        let x = Tensor::rand([batch as i64, shape[0], shape[1], shape[2]], (Kind::Float, device)) * 2.0 - 1.0;
        let _ = tch::no_grad(|| extractor.features(&x))?;
        Ok(serde_json::Value::Null)
    }))
}

/// Time and memory of a workload's runs.
struct Measurement {
    /// What the last run computed.
    value: serde_json::Value,
    /// Seconds of each timed run.
    times: Vec<f64>,
    /// Resident memory before the first run and its peak after the last, in MiB.
    rss_before: f64,
    peak_rss: f64,
    /// Device memory in use before the first run, in MiB (GPU only).
    cuda_before: Option<f64>,
    /// The caching allocator's counters before the first run and at the end of the warm-up (GPU
    /// only).
    allocator_before: Option<memory::DeviceMemory>,
    warmup_peak: Option<memory::DeviceMemory>,
}

/// Runs the workload `warmup` times, then `repeat` times timed, reading memory around them.
fn measure(run_once: &mut Workload, warmup: usize, repeat: usize, device: Device) -> Result<Measurement> {
    let (_, rss_before) = memory_mib();
    let cuda_before = cuda_used_mib(device);
    // The caching allocator's own counters (what the reference reports as max_memory_allocated).
    let allocator_before = memory::reset_peak(device).then(|| memory::device_stats(device)).flatten();
    let mut value = serde_json::Value::Null;
    for _ in 0..warmup {
        value = run_once()?;
        synchronize(device);
    }
    // The warm-up's peak (it includes capturing the CUDA graphs), then a fresh peak for the timed runs.
    let warmup_peak = allocator_before.and_then(|_| memory::device_stats(device));
    if warmup_peak.is_some() {
        memory::reset_peak(device);
    }
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let started = Instant::now();
        value = run_once()?;
        synchronize(device);
        times.push(started.elapsed().as_secs_f64());
    }
    let (peak_rss, _) = memory_mib();
    Ok(Measurement { value, times, rss_before, peak_rss, cuda_before, allocator_before, warmup_peak })
}

/// Adds the caching allocator's peaks (and with `--cuda-graphs` the graphs' pool) to `line`.
fn add_allocator_fields(line: &mut serde_json::Value, args: &BenchArgs, m: &Measurement, device: Device) {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    if let (Some(before), Some(after)) = (m.allocator_before, memory::device_stats(device)) {
        // The whole run's peaks: the larger of the warm-up's and the timed runs'.
        let warm = m.warmup_peak.unwrap_or(after);
        let peak_allocated = warm.peak_allocated.max(after.peak_allocated);
        let peak_reserved = warm.peak_reserved.max(after.peak_reserved);
        line["cuda_max_allocated_mib"] = (mib(peak_allocated) - mib(before.allocated)).into();
        line["cuda_max_reserved_mib"] = (mib(peak_reserved) - mib(before.reserved)).into();
        line["cuda_timed_max_allocated_mib"] = (mib(after.peak_allocated) - mib(before.allocated)).into();
        if args.cuda_graphs {
            // Replays use the graphs' pool without the allocator counting it as allocated.
            if let Some(pool) = ggdm_nets::cuda_graph::pool_memory(device) {
                line["cuda_graph_pool_mib"] = mib(pool.reserved).into();
            }
        }
    }
}

/// Adds the memory plan of the step's unroll (calls stored, MiB per call), which the step workload
/// returns with its value, to `line`.
fn add_plan_fields(line: &mut serde_json::Value, value: &serde_json::Value) {
    if let Some(plan) = value.get("memory_plan").filter(|p| !p.is_null()) {
        line["stored_steps"] = plan["stored_steps"].clone();
        line["call_activation_mib"] = plan["call_activation_mib"].clone();
    }
}

/// The JSON line of the measurement: the setting, the times and the memory.
fn report_line(args: &BenchArgs, m: &Measurement, device: Device) -> serde_json::Value {
    let seconds = median(m.times.clone());
    let (peak, rss_before) = (m.peak_rss, m.rss_before);
    let mut line = serde_json::json!({
        "side": "ours",
        "model": model_name(args),
        "what": args.what,
        "steps": args.steps,
        "batch": args.batch,
        "remat": if args.what == "step" { args.remat.clone() } else { "-".to_string() },
        "features": args.features,
        "precision": args.precision,
        "cuda_graphs": args.cuda_graphs,
        "channels_last": args.channels_last,
        "cudnn_benchmark": args.cudnn_benchmark,
        "host_malloc": crate::common::setup_host_memory(),
        "feature_chunk": args.feature_chunk,
        "random_weights": args.unet_config.is_some() || args.features == "inception-random",
        "device": format!("{device:?}"),
        "seconds": seconds,
        "times": m.times,
        "images_per_second": args.batch as f64 / seconds,
        "loss": m.value["loss"],
        "grad_norms": m.value["grad_norms"],
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
        "step_extra_mib": peak - rss_before,
    });
    add_allocator_fields(&mut line, args, m, device);
    add_plan_fields(&mut line, &m.value);
    if let (Some(before), Some(after)) = (m.cuda_before, cuda_used_mib(device)) {
        line["cuda_reserved_mib"] = (after - before).into();
        line["memory_mib"] = (after - before).into();
        line["memory_kind"] = "cuda reserved growth".into();
    } else {
        line["memory_mib"] = (peak - rss_before).into();
        line["memory_kind"] = "peak RSS - RSS before".into();
    }
    line
}

/// Runs `ddss-cli bench-unroll`.
pub fn run(args: BenchArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if args.feature_chunk == Some(0) {
        bail!("--feature-chunk must be at least 1");
    }
    crate::common::cudnn_benchmark_if(device, args.cudnn_benchmark);
    let (model, scheduler) = open_model(&args, device)?;
    let shape = model.sample_shape().context("the model does not fix its sample size")?;
    let sampler = GgdmSampler::init_from_spacing(
        &scheduler,
        args.steps,
        Spacing::Trailing,
        0.0,
        History::Full,
        Learnable::default(),
        device,
    )?;
    let mut extra = serde_json::Map::new();
    let mut run_once = match args.what.as_str() {
        "step" => step_workload(&args, sampler, model, shape, device, &mut extra)?,
        "sample" => sample_workload(sampler, model, args.batch, shape, device),
        "features" => features_workload(&args, shape, device, &mut extra)?,
        other => bail!("--what {other}: expected step, sample or features"),
    };
    let measurement = measure(&mut run_once, args.warmup, args.repeat, device)?;
    let mut line = report_line(&args, &measurement, device);
    if let Some(map) = line.as_object_mut() {
        map.extend(extra);
    }
    println!("{line}");
    Ok(())
}
