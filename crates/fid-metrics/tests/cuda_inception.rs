//! CUDA checks of the Inception port and the metrics (run with `--features cuda-tests` on a machine
//! with a GPU): every `Precision` against the CPU f32 result on the same weights, input gradients,
//! throughput, and KID/FID/KID-loss on CUDA tensors against the CPU values.
#![cfg(feature = "cuda-tests")]

use std::time::Instant;

use fid_metrics::fid::fid_from_features;
use fid_metrics::inception::default_weights_path;
use fid_metrics::kid::{kid, mmd2_unbiased, KidLoss, KidOptions};
use fid_metrics::{Inception, Precision, Result};
use tch::{Device, Kind, Tensor};

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

/// Features and input gradients of sum(features * weights).
fn features_and_grad(net: &Inception, samples: &Tensor, weights: &Tensor) -> Result<(Tensor, Tensor)> {
    // A fresh leaf on the device: `samples` itself may require grad from an earlier call.
    let x = samples.to_device(net.device()).detach().set_requires_grad(true);
    let features = net.features_from_samples(&x)?;
    (&features * weights.to_device(features.device())).sum(Kind::Float).backward();
    Ok((features.to_device(Device::Cpu), x.grad().to_device(Device::Cpu)))
}

#[test]
fn cuda_precisions_agree_with_cpu_f32() -> Result<()> {
    assert!(tch::Cuda::is_available(), "no CUDA device visible to libtorch");
    let cuda = Device::Cuda(0);
    let path = default_weights_path()?;
    tch::manual_seed(0);
    let samples = Tensor::rand([3, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let grey = Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let weights = Tensor::randn([3, 2048], (Kind::Float, Device::Cpu));
    let cpu_net = Inception::load(&path, Device::Cpu)?;
    let (cpu_features, cpu_grad) = features_and_grad(&cpu_net, &samples, &weights)?;
    let cpu_grey = tch::no_grad(|| cpu_net.features_from_samples(&grey))?;
    let batch = Tensor::rand([64, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let mut failures = Vec::new();
    for (precision, feature_tol, grad_tol) in [
        // Measured on an H200: F32 features 1.3e-6, input gradients 3.9e-3 (the resize's backward
        // accumulates with atomics; cuDNN picks other backward algorithms); TF32 7.8e-4 and 7.0e-2;
        // bf16 2.1e-2 and 2.9e-1; f16 1.1e-3 and 8.5e-2.
        (Precision::F32, 1e-4, 1e-2),
        (Precision::Tf32, 5e-3, 2e-1),
        (Precision::Bf16, 1e-1, 5e-1),
        (Precision::F16, 5e-2, 3e-1),
    ] {
        let net = Inception::load(&path, cuda)?.with_precision(precision);
        assert_eq!(net.precision(), precision);
        let (features, grad) = features_and_grad(&net, &samples, &weights)?;
        assert_eq!(features.kind(), Kind::Float);
        let feature_err = relative_error(&features, &cpu_features);
        let grad_err = relative_error(&grad, &cpu_grad);
        let grey_err = relative_error(&tch::no_grad(|| net.features_from_samples(&grey.to_device(cuda)))?, &cpu_grey);
        // Throughput at batch 64 (32x32 inputs resized to 299): forward without grad, and with backward.
        let x = batch.to_device(cuda);
        let _ = tch::no_grad(|| net.features_from_samples(&x))?;
        tch::Cuda::synchronize(0);
        let start = Instant::now();
        for _ in 0..5 {
            let _ = tch::no_grad(|| net.features_from_samples(&x))?;
        }
        tch::Cuda::synchronize(0);
        let forward_rate = 5.0 * 64.0 / start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..3 {
            let xg = x.copy().set_requires_grad(true);
            net.features_from_samples(&xg)?.sum(Kind::Float).backward();
            let _ = xg.grad();
        }
        tch::Cuda::synchronize(0);
        let backward_rate = 3.0 * 64.0 / start.elapsed().as_secs_f64();
        println!(
            "{precision:?}: features rel err {feature_err:.2e} (grey {grey_err:.2e}), input-gradient rel err \
             {grad_err:.2e}; {forward_rate:.0} images/s forward, {backward_rate:.0} images/s forward+backward"
        );
        failures
            .extend((feature_err > feature_tol || grey_err > feature_tol).then(|| {
                format!("{precision:?} features {feature_err:.2e} / grey {grey_err:.2e} > {feature_tol:.0e}")
            }));
        failures
            .extend((grad_err > grad_tol).then(|| format!("{precision:?} gradients {grad_err:.2e} > {grad_tol:.0e}")));
    }
    assert!(failures.is_empty(), "{failures:?}");
    Ok(())
}

#[test]
fn metrics_on_cuda_tensors_equal_cpu_values() -> Result<()> {
    assert!(tch::Cuda::is_available(), "no CUDA device visible to libtorch");
    let cuda = Device::Cuda(0);
    tch::manual_seed(1);
    let a = Tensor::rand([600, 2048], (Kind::Float, Device::Cpu)) * 3.0;
    let b = Tensor::rand([500, 2048], (Kind::Float, Device::Cpu)) * 3.2;
    let options = KidOptions { num_subsets: 10, subset_size: 200, seed: 3 };
    let start = Instant::now();
    let kid_cpu = kid(&a, &b, &options)?;
    let cpu_time = start.elapsed();
    let start = Instant::now();
    let kid_cuda = kid(&a.to_device(cuda), &b.to_device(cuda), &options)?;
    let cuda_time = start.elapsed();
    println!("KID cpu {kid_cpu:?} in {cpu_time:.2?}; cuda {kid_cuda:?} in {cuda_time:.2?}");
    assert!((kid_cpu.mean - kid_cuda.mean).abs() <= 1e-9 * kid_cpu.mean.abs().max(1e-12));
    let fid_cpu = fid_from_features(&a, &b)?;
    let fid_cuda = fid_from_features(&a.to_device(cuda), &b.to_device(cuda))?;
    assert!((fid_cpu - fid_cuda).abs() <= 1e-9 * fid_cpu.abs());
    let full = mmd2_unbiased(&a, &b)?;
    let generated = a.narrow(0, 0, 64).to_device(cuda).set_requires_grad(true);
    let loss = KidLoss::new(&b.to_device(cuda))?;
    let value = loss.loss(&generated)?;
    value.backward();
    let reference = mmd2_unbiased(&a.narrow(0, 0, 64), &b)?;
    println!("KID loss on cuda {} vs cpu {reference}; full-set {full}", value.double_value(&[]));
    assert!((value.double_value(&[]) - reference).abs() <= 1e-9 * reference.abs().max(1e-12));
    assert!(bool::try_from(generated.grad().isfinite().all())?);
    Ok(())
}
