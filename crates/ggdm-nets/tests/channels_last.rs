//! Channels-last network calls (`UNet2DModel::to_channels_last` + `ChannelsLastDenoiser`) give the
//! outputs and input gradients of the default layout.

use ggdm_core::{Denoiser, PredictionType};
use ggdm_nets::model_dir::{to_channels_last, ChannelsLastDenoiser};
use ggdm_nets::unet::{UNet2DConfig, UNet2DModel, UNetDenoiser};
use ggdm_nets::DifferentiableDenoiser;
use tch::{Device, Kind, Tensor};

const SMALL: &str = r#"{
  "sample_size": 8, "in_channels": 3, "out_channels": 3,
  "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8
}"#;

/// The tests of this file draw from the shared random generator (seeded for the weights): each
/// holds this lock, so that another test's draws cannot come between a seed and its weights.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn model() -> UNet2DModel {
    tch::manual_seed(3);
    let mut model = UNet2DModel::new(UNet2DConfig::from_json_str(SMALL).expect("config"), Device::Cpu).expect("model");
    model.var_store_mut().double();
    model.var_store_mut().freeze();
    model
}

fn output_and_grad(net: &dyn Denoiser, x: &Tensor, tau: &Tensor) -> (Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let out = net.forward(&x, tau).expect("forward");
    (out.square().sum(Kind::Double)).backward();
    (out.detach(), x.grad())
}

#[test]
fn channels_last_calls_equal_the_default_layout() {
    let _serial = serial();
    let x = Tensor::randn([2, 3, 8, 8], (Kind::Double, Device::Cpu));
    let tau = Tensor::from_slice(&[900.0f64, 15.5]);
    let plain = UNetDenoiser::new(model(), PredictionType::Epsilon);
    let mut converted = model();
    converted.to_channels_last().expect("convert");
    let weight = converted.var_store().variables().into_iter().find(|(_, t)| t.dim() == 4).expect("a conv").1;
    assert_eq!(weight.stride()[1], 1, "conv weights are NHWC in memory");
    let channels_last = ChannelsLastDenoiser(Box::new(UNetDenoiser::new(converted, PredictionType::Epsilon)));
    let (want, want_grad) = output_and_grad(&plain, &x, &tau);
    let (got, got_grad) = output_and_grad(&channels_last, &x, &tau);
    assert!(got.is_contiguous(), "the output is handed back contiguous");
    let rel = |a: &Tensor, b: &Tensor| ((a - b).abs().max().double_value(&[])) / b.abs().max().double_value(&[]);
    assert!(rel(&got, &want) < 1e-10, "outputs differ by {}", rel(&got, &want));
    assert!(rel(&got_grad, &want_grad) < 1e-10, "input gradients differ by {}", rel(&got_grad, &want_grad));
    let nhwc = to_channels_last(&x).expect("convert");
    assert_eq!(nhwc.stride()[1], 1);
    assert!(nhwc.equal(&x));
}

/// A channels-last network and a bf16 network record tapes through their wrappers: the taped
/// backward pass gives the input gradients autograd gives through the same wrapper, in the kinds
/// and layout of the caller's tensors.
#[test]
fn wrapped_networks_record_tapes_and_match_autograd() {
    let _serial = serial();
    use ggdm_nets::differentiable::eager_vjp;
    use ggdm_nets::model_dir::Bf16Denoiser;
    let x = Tensor::randn([2, 3, 8, 8], (Kind::Double, Device::Cpu));
    let tau = Tensor::from_slice(&[900.0f64, 15.5]);
    let g = Tensor::randn([2, 3, 8, 8], (Kind::Double, Device::Cpu));
    let rel = |a: &Tensor, b: &Tensor| {
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    };

    let mut converted = model();
    converted.to_channels_last().expect("convert");
    let channels_last = ChannelsLastDenoiser(Box::new(UNetDenoiser::new(converted, PredictionType::Epsilon)));
    let (want_x, want_tau) = eager_vjp(&channels_last, &x, &tau, &g).expect("autograd");
    let (out, tape) = channels_last.forward_taped(&x, &tau).expect("taped").expect("a tape");
    assert!(out.is_contiguous());
    let (got_x, got_tau) = channels_last.backward_taped(tape, &g).expect("taped backward");
    assert!(got_x.is_contiguous(), "the input gradient is handed back contiguous");
    assert!(rel(&got_x, &want_x) < 1e-10, "channels-last dx differs by {}", rel(&got_x, &want_x));
    assert!(rel(&got_tau, &want_tau) < 1e-9, "channels-last dtau differs by {}", rel(&got_tau, &want_tau));

    let mut half = model();
    half.var_store_mut().bfloat16();
    let bf16 = Bf16Denoiser(Box::new(UNetDenoiser::new(half, PredictionType::Epsilon)));
    let x = x.to_kind(Kind::Float);
    let g = g.to_kind(Kind::Float);
    let tau = tau.to_kind(Kind::Float);
    let (want_x, _) = eager_vjp(&bf16, &x, &tau, &g).expect("autograd");
    let (out, tape) = bf16.forward_taped(&x, &tau).expect("taped").expect("a tape");
    assert_eq!(out.kind(), Kind::Float, "the output comes back in the input's kind");
    let (got_x, got_tau) = bf16.backward_taped(tape, &g).expect("taped backward");
    assert_eq!((got_x.kind(), got_tau.kind()), (Kind::Float, Kind::Float));
    // bf16 keeps 8 bits of mantissa: the two backward passes round differently.
    assert!(rel(&got_x, &want_x) < 0.05, "bf16 dx differs by {}", rel(&got_x, &want_x));
}
