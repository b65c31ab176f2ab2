//! DPM-Solver++ and UniPC against diffusers 0.42.1's `DPMSolverMultistepScheduler` /
//! `UniPCMultistepScheduler`: their `set_timesteps` lists, full sampling loops with a smooth
//! nonlinear dummy model, and loops on the committed tiny diffusers UNet (fixtures from
//! `tests/scripts/gen_solver_fixtures.py`). Agreement is 1e-5 in max abs difference.

use ddss_tests::read_json;
use ggdm_core::grid::{multistep_timesteps, Spacing};
use ggdm_core::solvers::{dpm_solver, unipc, DpmSolverOptions, FinalSigma, UniPcOptions, UniPcVariant};
use ggdm_core::unet::{UNet2DModel, UNetDenoiser};
use ggdm_core::{Denoiser, NoiseSchedule, PredictionType};
use serde_json::Value;
use tch::Tensor;

/// The fixture script's `smooth_model`: `x * t / (t + 1) + (1 - t / 1000) * 0.1 * sin(3 x)`, in
/// float32 like the script:
/// ```python
/// t = t.float(); x * t / (t + 1) + (1 - t / 1000) * 0.1 * torch.sin(x * 3)
/// ```
struct SmoothDummy {
    prediction_type: PredictionType,
}

impl Denoiser for SmoothDummy {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> ggdm_core::Result<Tensor> {
        let t = tau.to_kind(x.kind()).reshape([-1, 1, 1, 1]);
        let linear = x * &t / (&t + 1.0);
        let fade = (t.ones_like() - &t / 1000.0) * 0.1;
        Ok(linear + fade * (x * 3.0).sin())
    }
    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("integer")).collect()
}

fn tensor(v: &Value, shape: &[i64]) -> Tensor {
    let values: Vec<f32> = v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect();
    Tensor::from_slice(&values).reshape(shape)
}

#[test]
fn timesteps_equal_diffusers() {
    let fixture = read_json("solver_loops.json");
    let cases = fixture["timesteps"].as_array().expect("list");
    for case in cases {
        let t_count = case["num_train_timesteps"].as_u64().expect("T") as usize;
        let k = case["steps"].as_u64().expect("K") as usize;
        let spacing = Spacing::parse(case["spacing"].as_str().expect("spacing")).expect("spacing");
        let offset = case["steps_offset"].as_u64().expect("offset") as usize;
        let ours = multistep_timesteps(t_count, k, spacing, offset).expect("grid");
        assert_eq!(ours, ints(&case["dpmsolver"]), "DPM-Solver T={t_count} K={k} {spacing:?} offset={offset}");
        assert_eq!(ours, ints(&case["unipc"]), "UniPC T={t_count} K={k} {spacing:?} offset={offset}");
    }
    assert!(cases.len() >= 150, "{} cases", cases.len());
}

#[test]
fn full_loops_equal_diffusers() {
    let fixture = read_json("solver_loops.json");
    let schedule = NoiseSchedule::ddpm_linear_1000();
    let mut worst = 0.0f64;
    let loops = fixture["loops"].as_array().expect("list");
    for case in loops {
        let shape = ints(&case["shape"]);
        let grid = ints(&case["timesteps"]);
        let spacing = Spacing::parse(case["spacing"].as_str().expect("spacing")).expect("spacing");
        let k = case["steps"].as_u64().expect("K") as usize;
        assert_eq!(grid, multistep_timesteps(1000, k, spacing, 0).expect("grid"));
        let grid: Vec<f64> = grid.iter().map(|&t| t as f64).collect();
        let prediction_type =
            PredictionType::from_diffusers_name(case["prediction_type"].as_str().expect("pt")).expect("pt");
        let model = SmoothDummy { prediction_type };
        let order = case["order"].as_u64().expect("order") as usize;
        let final_sigma = match case["final_sigmas_type"].as_str().expect("final") {
            "zero" => FinalSigma::Zero,
            _ => FinalSigma::SigmaMin,
        };
        let x_init = tensor(&case["x_init"], &shape);
        let result = match (case["solver"].as_str().expect("solver"), case["solver_type"].as_str().expect("type")) {
            ("dpmsolver++", "midpoint") => {
                let options = DpmSolverOptions { order, final_sigma, ..DpmSolverOptions::default() };
                dpm_solver(&model, &schedule, &grid, &x_init, &options, &mut |_| {})
            }
            ("unipc", variant) => {
                let variant = if variant == "bh1" { UniPcVariant::Bh1 } else { UniPcVariant::Bh2 };
                let options = UniPcOptions { order, variant, final_sigma, ..UniPcOptions::default() };
                unipc(&model, &schedule, &grid, &x_init, &options, &mut |_| {})
            }
            other => panic!("unexpected solver {other:?}"),
        }
        .expect("sampling");
        let expected = tensor(&case["result"], &shape);
        let diff = (&result - &expected).abs().max().double_value(&[]);
        worst = worst.max(diff);
        assert!(
            diff <= 1e-5,
            "{} order {} {} {} {} {} K={}: max |ours - diffusers| = {diff}",
            case["solver"],
            order,
            case["solver_type"],
            case["final_sigmas_type"],
            case["prediction_type"],
            case["spacing"],
            k
        );
    }
    assert!(loops.len() >= 100, "{} loops", loops.len());
    println!("{} loops, worst max abs difference {worst:e}", loops.len());
}

#[test]
fn unet_loops_equal_diffusers() {
    let fixture = read_json("solver_loops.json");
    let schedule = NoiseSchedule::ddpm_linear_1000();
    let loops = fixture["unet_loops"].as_array().expect("list");
    for case in loops {
        let name = case["model"].as_str().expect("model");
        let path = ddss_tests::fixture_path(&format!("unet/{name}"));
        let network = UNet2DModel::load(&path, tch::Device::Cpu).expect("tiny UNet");
        let prediction_type =
            PredictionType::from_diffusers_name(case["prediction_type"].as_str().expect("pt")).expect("pt");
        let model = UNetDenoiser::new(network, prediction_type);
        let shape = ints(&case["shape"]);
        let k = case["steps"].as_u64().expect("K") as usize;
        let spacing = Spacing::parse(case["spacing"].as_str().expect("spacing")).expect("spacing");
        let grid = multistep_timesteps(1000, k, spacing, 0).expect("grid");
        assert_eq!(grid, ints(&case["timesteps"]));
        let grid: Vec<f64> = grid.iter().map(|&t| t as f64).collect();
        let order = case["order"].as_u64().expect("order") as usize;
        let x_init = tensor(&case["x_init"], &shape);
        let result = tch::no_grad(|| match case["solver"].as_str().expect("solver") {
            "dpmsolver++" => {
                let options = DpmSolverOptions { order, ..DpmSolverOptions::default() };
                dpm_solver(&model, &schedule, &grid, &x_init, &options, &mut |_| {})
            }
            _ => {
                let options = UniPcOptions { order, ..UniPcOptions::default() };
                unipc(&model, &schedule, &grid, &x_init, &options, &mut |_| {})
            }
        })
        .expect("sampling");
        let diff = (&result - tensor(&case["result"], &shape)).abs().max().double_value(&[]);
        eprintln!("{} order {order} on {name}: max |ours - diffusers| = {diff:e}", case["solver"]);
        assert!(diff <= 1e-5, "{} order {order} on {name}: max |ours - diffusers| = {diff}", case["solver"]);
    }
    assert_eq!(loops.len(), 4);
}
