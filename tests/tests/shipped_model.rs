//! The shipped Fashion-MNIST model (`models/fashion-mnist-ddpm`) loads through `ggdm-core` and
//! gives diffusers 0.42.1's output for a fixed input (fixture from
//! `tests/scripts/gen_shipped_model_fixture.py`).

use ddss_tests::fixture_path;
use ggdm_core::model_dir::load_model_dir;
use ggdm_core::PredictionType;
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
