//! The shipped Fashion-MNIST model (`models/fashion-mnist-ddpm`) loads through `ggdm-core` and
//! gives diffusers 0.42.1's output for a fixed input (fixture from
//! `tests/scripts/gen_shipped_model_fixture.py`).

use ddss_tests::fixture_path;
use ggdm_core::PredictionType;
use ggdm_nets::model_dir::load_model_dir;
use std::path::PathBuf;
use tch::{Device, Tensor};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("models").join("fashion-mnist-ddpm")
}

#[test]
fn shipped_model_matches_diffusers() {
    let model = load_model_dir(&model_dir(), Device::Cpu).expect("load shipped model");
    assert_eq!(model.sample_shape(), Some([1, 28, 28]));
    assert_eq!(model.scheduler.prediction_type, PredictionType::Epsilon);
    assert_eq!(model.scheduler.num_train_timesteps, 1000);
    let io = Tensor::read_safetensors(fixture_path("shipped_model_io.safetensors")).expect("fixture");
    let get = |name: &str| io.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).expect(name);
    let ours = tch::no_grad(|| model.denoiser.forward(&get("x"), &get("t"))).expect("forward");
    let diff = (&ours - get("out")).abs().max().double_value(&[]);
    assert!(diff <= 1e-4, "max |ours - diffusers| = {diff}");
}

#[test]
fn shipped_model_is_small_enough_to_ship() {
    let weights = model_dir().join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::metadata(&weights).expect("weights").len();
    assert!(bytes <= 10 * 1024 * 1024, "{bytes} bytes");
}

/// bf16 network calls: the output stays f32 and close to the f32 network's (bf16 keeps about three
/// significant digits), gradients flow to the input, and a TorchScript model refuses bf16.
#[test]
fn bf16_network_calls_stay_close_to_f32() {
    use ggdm_nets::model_dir::{load_model_dir_with, NetworkPrecision};
    let f32_model = load_model_dir(&model_dir(), Device::Cpu).expect("f32");
    let bf16_model = load_model_dir_with(&model_dir(), Device::Cpu, NetworkPrecision::Bf16).expect("bf16");
    let io = Tensor::read_safetensors(fixture_path("shipped_model_io.safetensors")).expect("fixture");
    let get = |name: &str| io.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).expect(name);
    let x = get("x").set_requires_grad(true);
    let full = tch::no_grad(|| f32_model.denoiser.forward(&x, &get("t"))).expect("f32 forward");
    let half = bf16_model.denoiser.forward(&x, &get("t")).expect("bf16 forward");
    assert_eq!(half.kind(), tch::Kind::Float);
    let rel = ((&half - &full).norm().double_value(&[])) / full.norm().double_value(&[]);
    assert!(rel > 0.0 && rel < 5e-2, "bf16 vs f32 relative difference {rel}");
    half.sum(tch::Kind::Float).backward();
    assert!(x.grad().abs().sum(tch::Kind::Float).double_value(&[]) > 0.0, "no gradient through bf16");
    assert_eq!(NetworkPrecision::parse("bf16").expect("parse"), NetworkPrecision::Bf16);
    assert!(NetworkPrecision::parse("fp8").expect_err("fp8").to_string().contains("fp8"));
    let torchscript = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("unet").join("torchscript");
    let err = load_model_dir_with(&torchscript, Device::Cpu, NetworkPrecision::Bf16).map(|_| ()).expect_err("refused");
    assert!(err.to_string().contains("bf16"), "{err}");
}
