//! Channels-last network calls (`UNet2DModel::to_channels_last` + `ChannelsLastDenoiser`) give the
//! outputs and input gradients of the default layout.

use ggdm_core::model_dir::{to_channels_last, ChannelsLastDenoiser};
use ggdm_core::unet::{UNet2DConfig, UNet2DModel, UNetDenoiser};
use ggdm_core::{Denoiser, PredictionType};
use tch::{Device, Kind, Tensor};

const SMALL: &str = r#"{
  "sample_size": 8, "in_channels": 3, "out_channels": 3,
  "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8
}"#;

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
