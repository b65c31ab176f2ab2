//! CUDA-graph replay (`--features cuda-graphs`, on a machine with a GPU; skipped without one):
//! replayed forward calls and VJPs equal the eager calls on the same inputs, a replay with new
//! inputs gives new results (no stale buffers), one graph is captured per call kind and shape,
//! and calls that need autograd still carry their graph. Also the CUDA caching allocator's counters
//! and the available device memory (`ggdm_nets::memory`, which the memory-budget rematerialisation
//! and the benchmarks read), as this binary is the one `tools/gpu_bench.sh` runs on the GPU before
//! its timings.
#![cfg(feature = "cuda-graphs")]

use ggdm_core::{Denoiser, PredictionType, Result};
use ggdm_nets::cuda_graph::GraphedDenoiser;
use ggdm_nets::differentiable::{eager_vjp, DifferentiableDenoiser};
use ggdm_nets::unet::{UNet2DConfig, UNet2DModel, UNetDenoiser};
use tch::{Device, Kind, Tensor};

const SMALL: &str = r#"{
  "sample_size": 16, "in_channels": 3, "out_channels": 3,
  "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8
}"#;

/// The tests share one device: a capture in global mode fails when another thread allocates device
/// memory meanwhile, and the allocator's counters are device-wide. Each test holds this lock.
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn device_lock() -> std::sync::MutexGuard<'static, ()> {
    DEVICE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unet(device: Device) -> UNetDenoiser {
    tch::manual_seed(0);
    let config = UNet2DConfig::from_json_str(SMALL).expect("config");
    let mut model = UNet2DModel::new(config, device).expect("model");
    model.var_store_mut().freeze();
    UNetDenoiser::new(model, PredictionType::Epsilon)
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

/// The device lock, an eager network and a graphed copy with the same weights; `None` (the test is
/// skipped) without a CUDA device.
fn eager_and_graphed() -> Option<(std::sync::MutexGuard<'static, ()>, UNetDenoiser, GraphedDenoiser)> {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return None;
    }
    let lock = device_lock();
    let graphed = GraphedDenoiser::new(Box::new(unet(Device::Cuda(0)))).expect("graphed network");
    Some((lock, unet(Device::Cuda(0)), graphed))
}

/// A call's input, timesteps (shifted by `shift`) and output cotangent on the GPU.
fn call_inputs(shift: f64) -> (Tensor, Tensor, Tensor) {
    let device = Device::Cuda(0);
    let x = Tensor::randn([4, 3, 16, 16], (Kind::Float, device));
    let tau = Tensor::from_slice(&[999.0f32, 500.0, 10.5, 0.0]).to_device(device) + shift;
    let g = Tensor::randn([4, 3, 16, 16], (Kind::Float, device));
    (x, tau, g)
}

#[test]
fn replayed_calls_equal_eager_calls() -> Result<()> {
    let Some((_device, eager, graphed)) = eager_and_graphed() else { return Ok(()) };
    let device = Device::Cuda(0);
    for round in 0..3 {
        let (x, tau, g) = call_inputs(f64::from(round));
        let want = tch::no_grad(|| eager.forward(&x, &tau))?;
        let got = tch::no_grad(|| graphed.forward(&x, &tau))?;
        let e = relative_error(&got, &want);
        assert!(e < 1e-5, "round {round}: replayed forward differs by {e}");
        let (want_gx, want_gtau) = eager_vjp(&eager, &x, &tau, &g)?;
        let (gx, gtau) = graphed.vjp(&x, &tau, &g)?;
        let (ex, etau) = (relative_error(&gx, &want_gx), relative_error(&gtau, &want_gtau));
        // cuDNN chooses the backward convolutions' algorithms per call and, with TF32 (PyTorch's
        // default for cuDNN convolutions), two algorithms agree to about 1e-4 relative.
        assert!(ex < 1e-4 && etau < 1e-4, "round {round}: replayed VJP differs by {ex} (x), {etau} (tau)");
    }
    // One forward graph and one VJP graph for this shape; a new batch size captures another.
    assert_eq!(graphed.captured_shapes(), 2);
    // Their shared pool holds device memory (at least the static outputs, which are allocated).
    let pool = ggdm_nets::cuda_graph::pool_memory(device).expect("the graphs' pool memory");
    let stats = ggdm_nets::memory::device_stats(device).expect("counters");
    let outputs = 2 * 4 * 3 * 16 * 16 * 4;
    assert!(pool.allocated >= outputs && pool.reserved >= pool.allocated, "{pool:?}");
    assert!(pool.reserved <= stats.reserved && pool.allocated <= stats.allocated, "{pool:?} within {stats:?}");
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, device));
    let tau = Tensor::from_slice(&[300.0f32, 20.0]).to_device(device);
    let e = relative_error(&tch::no_grad(|| graphed.forward(&x, &tau))?, &tch::no_grad(|| eager.forward(&x, &tau))?);
    assert!(e < 1e-5, "second shape differs by {e}");
    assert_eq!(graphed.captured_shapes(), 3);
    // A call under autograd runs eagerly and carries its graph.
    let x = x.set_requires_grad(true);
    let out = graphed.forward(&x, &tau)?;
    assert!(out.requires_grad());
    out.sum(Kind::Float).backward();
    assert!(x.grad().defined());
    Ok(())
}

#[test]
fn allocator_counters_follow_a_tensor() {
    use ggdm_nets::memory;
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: skipped");
        return;
    }
    let _device = device_lock();
    let device = Device::Cuda(0);
    let _warm = Tensor::zeros([1], (Kind::Float, device));
    let before = memory::device_stats(device).expect("the CUDA caching allocator's counters");
    assert!(memory::reset_peak(device));
    let bytes = 64u64 << 20;
    let t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, device));
    let with = memory::device_stats(device).expect("counters");
    assert_eq!(with.allocated - before.allocated, bytes, "{before:?} -> {with:?}");
    assert!(with.peak_allocated >= with.allocated && with.reserved >= with.allocated, "{with:?}");
    drop(t);
    let after = memory::device_stats(device).expect("counters");
    assert_eq!(after.allocated, before.allocated, "{after:?}");
    assert_eq!(after.peak_allocated, with.peak_allocated, "the peak stays until reset");
    assert_eq!(memory::live_bytes(device), Some(after.allocated));
    assert!(memory::reset_peak(device));
    assert_eq!(memory::device_stats(device).expect("counters").peak_allocated, after.allocated);

    // The memory still available to tensors (free device memory plus the allocator's unused
    // cache, what `remat = { free_memory = ... }` takes its share of) drops by a new tensor's size.
    let (free, total) = memory::cuda_mem_get_info(0).expect("cudaMemGetInfo");
    assert!(free <= total && total > 0, "{free} of {total}");
    let available = memory::available_bytes(device).expect("available device memory");
    let t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, device));
    let with = memory::available_bytes(device).expect("available device memory");
    let dropped = available as f64 - with as f64;
    assert!((dropped - bytes as f64).abs() < 4.0 * f64::from(1 << 20), "{available} -> {with} for {bytes} bytes");
    drop(t);
}

/// A call kept on a tape (the budget rematerialisations' way of storing and recomputing calls) runs
/// on the GPU, directly and through the graphed wrapper, and its gradients equal autograd's.
#[test]
fn taped_calls_equal_autograd_on_the_gpu() -> Result<()> {
    let Some((_device, eager, graphed)) = eager_and_graphed() else { return Ok(()) };
    let (x, tau, g) = call_inputs(0.0);
    let want = tch::no_grad(|| eager.forward(&x, &tau))?;
    let (want_gx, want_gtau) = eager_vjp(&eager, &x, &tau, &g)?;
    for (name, model) in
        [("eager", &eager as &dyn DifferentiableDenoiser), ("graphed", &graphed as &dyn DifferentiableDenoiser)]
    {
        let (out, tape) = model.forward_taped(&x, &tau)?.expect("the UNet records tapes");
        let e = relative_error(&out, &want);
        assert!(e < 1e-5, "{name}: taped forward differs by {e}");
        let (gx, gtau) = model.backward_taped(tape, &g)?;
        let (ex, etau) = (relative_error(&gx, &want_gx), relative_error(&gtau, &want_gtau));
        // TF32 convolutions (PyTorch's default for cuDNN) with other algorithms: about 1e-4.
        assert!(ex < 1e-4 && etau < 1e-4, "{name}: taped VJP differs by {ex} (x), {etau} (tau)");
    }
    Ok(())
}
