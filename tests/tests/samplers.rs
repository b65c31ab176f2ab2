//! DDIM and DDPM full loops against diffusers 0.42.1's `DDIMScheduler.step` /
//! `DDPMScheduler.step` with the same deterministic models and the same injected noise
//! (fixtures from `tests/scripts/gen_scheduler_fixtures.py`).

use ddss_tests::read_json;
use ggdm_core::analytic::{DiffusersDummyDenoiser, GaussianDataDenoiser};
use ggdm_core::noise::ListNoise;
use ggdm_core::samplers::{ddim, ddpm, diffusers_steps, grid_steps, DdimOptions, DdpmOptions};
use ggdm_core::scheduler_config::VarianceType;
use ggdm_core::{Denoiser, NoiseSchedule, PredictionType};
use serde_json::Value;
use tch::Tensor;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn tensor(v: &Value, shape: &[i64]) -> Tensor {
    Tensor::from_slice(&floats(v)).reshape(shape)
}

#[test]
fn full_loops_equal_diffusers() {
    let loops = read_json("loops.json");
    let schedule = NoiseSchedule::ddpm_linear_1000();
    let mut checked = 0;
    for case in loops.as_array().expect("list") {
        let shape: Vec<i64> =
            case["shape"].as_array().expect("shape").iter().map(|v| v.as_i64().expect("int")).collect();
        let grid: Vec<i64> =
            case["timesteps"].as_array().expect("ts").iter().map(|v| v.as_i64().expect("int")).collect();
        let prediction =
            PredictionType::from_diffusers_name(case["prediction_type"].as_str().expect("pt")).expect("pt");
        let model: Box<dyn Denoiser> = match case["model"].as_str().expect("model") {
            "dummy" => Box::new(DiffusersDummyDenoiser { prediction_type: prediction }),
            _ => Box::new(GaussianDataDenoiser::new(&schedule, 0.3, 0.5, [1, 4, 4])),
        };
        let x_init = tensor(&case["x_init"], &shape);
        let noise: Vec<Tensor> = case["noise"].as_array().expect("noise").iter().map(|z| tensor(z, &shape)).collect();
        let n_noise = noise.len();
        let mut noise = ListNoise::new(noise);
        let steps = diffusers_steps(&grid, 1000);
        let clip = case["clip_sample"].as_bool().expect("clip").then_some(1.0);
        let result = match case["sampler"].as_str().expect("sampler") {
            "ddim" => {
                let options =
                    DdimOptions { eta: case["eta"].as_f64().expect("eta"), clip, use_clipped_model_output: false };
                ddim(&model, &schedule, &steps, &x_init, &options, &mut noise, &mut |_| {})
            }
            _ => {
                // diffusers' DDPMScheduler steps to the next grid entry (not t - T // K).
                let grid_f: Vec<f64> = grid.iter().map(|&t| t as f64).collect();
                let options = DdpmOptions { variance_type: VarianceType::FixedSmall, clip };
                ddpm(&model, &schedule, &grid_steps(&grid_f), &x_init, &options, &mut noise, &mut |_| {})
            }
        }
        .expect("sampling");
        // Every recorded noise tensor was consumed, no more.
        assert!(
            ggdm_core::noise::NoiseSource::next(&mut noise, &shape, tch::Device::Cpu).is_err(),
            "{n_noise} noise tensors not all used"
        );
        let expected = tensor(&case["result"], &shape);
        let diff = (&result - &expected).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-5,
            "{} {} {} eta={} clip={} {} K={}: max |ours - diffusers| = {diff}",
            case["model"],
            case["prediction_type"],
            case["sampler"],
            case["eta"],
            case["clip_sample"],
            case["spacing"],
            case["steps"]
        );
        checked += 1;
    }
    assert_eq!(checked, 60);
}

#[test]
fn ddim_with_the_exact_denoiser_recovers_the_data_distribution() {
    // Data: i.i.d. N(0.3, 0.5^2). A 500-step DDIM with the Bayes-optimal denoiser must produce it.
    let schedule = NoiseSchedule::ddpm_linear_1000();
    let model = GaussianDataDenoiser::new(&schedule, 0.3, 0.5, [1, 8, 8]);
    let grid = ggdm_core::grid::timesteps(1000, 500, ggdm_core::grid::Spacing::Trailing, 0).expect("grid");
    let steps = diffusers_steps(&grid, 1000);
    let mut noise = ggdm_core::noise::SeededNoise::new(7);
    let x_init = ggdm_core::noise::NoiseSource::next(&mut noise, &[256, 1, 8, 8], tch::Device::Cpu).expect("noise");
    let out = ddim(&model, &schedule, &steps, &x_init, &DdimOptions::default(), &mut noise, &mut |_| {}).expect("ddim");
    let mean = out.mean(tch::Kind::Double).double_value(&[]);
    let std = out.std(true).double_value(&[]);
    assert!((mean - 0.3).abs() < 0.01, "mean {mean}");
    assert!((std - 0.5).abs() < 0.01, "std {std}");
}
