//! DPM-Solver++ and UniPC against diffusers 0.42.1's `DPMSolverMultistepScheduler` /
//! `UniPCMultistepScheduler`: their `set_timesteps` lists, full sampling loops with a smooth
//! nonlinear dummy model, and loops on the committed tiny diffusers UNet (fixtures from
//! `tests/scripts/gen_solver_fixtures.py`); full loops on the cosine schedule, diffusers'
//! `lambda_min_clipped` truncation and diffusers-saved multistep scheduler configs (fixtures from
//! `tests/scripts/gen_solver_cosine_fixtures.py`). Agreement is 1e-5 in max abs difference.

use ddss_tests::read_json;
use ggdm_core::grid::{multistep_timesteps, Spacing};
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::solvers::{dpm_solver, unipc, DpmSolverOptions, FinalSigma, UniPcOptions, UniPcVariant};
use ggdm_core::{BetaSchedule, Denoiser, NoiseSchedule, PredictionType};
use ggdm_nets::unet::{UNet2DModel, UNetDenoiser};
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

/// Runs one reference loop of a solver fixture (`solver_loops*.json`) with our solver on
/// `schedule` and returns the max abs difference from diffusers' result.
fn loop_case_difference(case: &serde_json::Value, schedule: &NoiseSchedule) -> f64 {
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
    let final_sigma = match case["final_sigmas_type"].as_str().unwrap_or("zero") {
        "zero" => FinalSigma::Zero,
        _ => FinalSigma::SigmaMin,
    };
    let x_init = tensor(&case["x_init"], &shape);
    let result = match (case["solver"].as_str().expect("solver"), case["solver_type"].as_str().expect("type")) {
        ("dpmsolver++", "midpoint") => {
            let options = DpmSolverOptions { order, final_sigma, ..DpmSolverOptions::default() };
            dpm_solver(&model, schedule, &grid, &x_init, &options, &mut |_| {})
        }
        ("unipc", variant) => {
            let variant = if variant == "bh1" { UniPcVariant::Bh1 } else { UniPcVariant::Bh2 };
            let options = UniPcOptions { order, variant, final_sigma, ..UniPcOptions::default() };
            unipc(&model, schedule, &grid, &x_init, &options, &mut |_| {})
        }
        other => panic!("unexpected solver {other:?}"),
    }
    .expect("sampling");
    (&result - tensor(&case["result"], &shape)).abs().max().double_value(&[])
}

/// A loop's description for failure messages.
fn loop_label(case: &serde_json::Value) -> String {
    ["solver", "order", "solver_type", "final_sigmas_type", "prediction_type", "spacing", "steps"]
        .iter()
        .map(|key| format!("{key} {}", case[*key]))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn full_loops_equal_diffusers() {
    let fixture = read_json("solver_loops.json");
    let schedule = NoiseSchedule::ddpm_linear_1000();
    let mut worst = 0.0f64;
    let loops = fixture["loops"].as_array().expect("list");
    for case in loops {
        let diff = loop_case_difference(case, &schedule);
        worst = worst.max(diff);
        assert!(diff <= 1e-5, "{}: max |ours - diffusers| = {diff}", loop_label(case));
    }
    assert!(loops.len() >= 100, "{} loops", loops.len());
    println!("{} loops, worst max abs difference {worst:e}", loops.len());
}

/// The cosine schedule (`squaredcos_cap_v2`, betas capped at 0.999, so `abar_999` is about 2.4e-9
/// and `lambda` reaches -9.9 at t = 999) with diffusers' default `lambda_min_clipped = -inf`, which
/// leaves the timestep range whole (`solver_loops_cosine.json`; UniPC has no such setting).
/// Measured against diffusers 0.42.1: worst max abs difference 1.4e-6 over the 48 loops (epsilon
/// 1.4e-6, v_prediction 3.0e-7), on results of size up to ~11. Every loop starts at t = 999, where
/// an epsilon prediction is ill-conditioned (`sigma eps` cancels all but ~1e-3 of `x`), so the
/// noise levels must be diffusers' float32 ones ([`ggdm_core::solvers::noise_levels`]): from `abar`
/// rounded to float32 and `alpha`, `sigma` in f64 the difference was 8.2e-4.
#[test]
fn cosine_loops_equal_diffusers() {
    let fixture = read_json("solver_loops_cosine.json");
    let schedule = NoiseSchedule::new(BetaSchedule::SquaredCosCapV2, 1000).expect("cosine schedule");
    let mut worst = 0.0f64;
    let loops = fixture["loops"].as_array().expect("list");
    for case in loops {
        assert_eq!(case["beta_schedule"], "squaredcos_cap_v2");
        let diff = loop_case_difference(case, &schedule);
        worst = worst.max(diff);
        assert!(diff <= 1e-5, "cosine {}: max |ours - diffusers| = {diff}", loop_label(case));
    }
    assert_eq!(loops.len(), 48);
    println!("{} cosine loops, worst max abs difference {worst:e}", loops.len());
}

/// `lambda_min_clipped` (diffusers' DPMSolverMultistepScheduler only) against diffusers'
/// `set_timesteps`: our reader accepts a value exactly where diffusers keeps the whole timestep
/// range (then our list is diffusers'), and otherwise names the key, the value and the first
/// timestep diffusers would leave out.
#[test]
fn lambda_min_clipped_is_accepted_exactly_where_diffusers_keeps_the_whole_range() {
    let fixture = read_json("solver_loops_cosine.json");
    let cases = fixture["lambda_min_clipped"].as_array().expect("list");
    let (mut accepted, mut rejected) = (0, 0);
    for case in cases {
        let value = case["lambda_min_clipped"].as_f64().expect("value");
        let schedule = case["beta_schedule"].as_str().expect("schedule");
        let map = serde_json::json!({
            "_class_name": "DPMSolverMultistepScheduler",
            "beta_schedule": schedule,
            "beta_start": case["beta_start"],
            "beta_end": case["beta_end"],
            "lambda_min_clipped": value,
        });
        let label = format!("{schedule} lambda_min_clipped = {value}");
        let expected = ints(&case["timesteps"]);
        match SchedulerConfig::from_json_map(map.as_object().expect("object")) {
            Ok(cfg) => {
                assert_eq!(expected, ints(&case["unclipped"]), "{label}: accepted, but diffusers truncates");
                let k = case["steps"].as_u64().expect("K") as usize;
                assert_eq!(cfg.multistep_timesteps(k, Spacing::Linspace).expect("grid"), expected, "{label}");
                accepted += 1;
            }
            Err(err) => {
                assert_ne!(expected, ints(&case["unclipped"]), "{label}: rejected, but diffusers keeps the range");
                // diffusers' linspace list starts at its last kept timestep.
                let first_left_out = format!("t >= {}", expected[0] + 1);
                let smallest = format!("{:.4}", case["lambda_min"].as_f64().expect("lambda_min"));
                let err = err.to_string();
                for needle in ["lambda_min_clipped", &value.to_string(), &first_left_out, &smallest] {
                    assert!(err.contains(needle), "{label}: `{needle}` missing from: {err}");
                }
                rejected += 1;
            }
        }
    }
    assert!(accepted >= 8 && rejected >= 8, "{accepted} accepted, {rejected} rejected");
}

/// Configs saved by diffusers 0.42.1's `save_config` (`tests/fixtures/scheduler_configs/`):
/// DPMSolverMultistepScheduler writes its default `lambda_min_clipped` as the bare token
/// `-Infinity`, which strict JSON rejects, and both multistep schedulers write keys of other sigma
/// schedules; they load. A value that would truncate the timestep range is an error naming the
/// file, the key and the value.
#[test]
fn diffusers_saved_multistep_scheduler_configs_load() {
    let path = |name: &str| ddss_tests::fixture_path(&format!("scheduler_configs/{name}/scheduler_config.json"));
    let text = std::fs::read_to_string(path("dpmsolver_cosine")).expect("config");
    assert!(text.contains("\"lambda_min_clipped\": -Infinity"), "{text}");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "strict JSON should reject -Infinity");
    for name in ["dpmsolver_cosine", "unipc_cosine", "ddpm_cosine"] {
        let cfg = SchedulerConfig::from_file(&path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.beta_schedule, BetaSchedule::SquaredCosCapV2, "{name}");
        assert_eq!(cfg.prediction_type, PredictionType::VPrediction, "{name}");
        assert_eq!(cfg.num_train_timesteps, 1000, "{name}");
        assert_eq!(cfg.multistep_spacing(), Spacing::Linspace, "{name}");
    }
    // -5.1 lies below the DDPM linear schedule's smallest log-SNR (-5.0588): nothing is truncated.
    let cfg = SchedulerConfig::from_file(&path("dpmsolver_linear_clip_5.1")).expect("linear, -5.1");
    assert_eq!(cfg.beta_schedule, BetaSchedule::ddpm_linear());
    // On the cosine schedule -5.1 leaves t >= 996 out.
    let file = path("dpmsolver_cosine_clip_5.1");
    let err = SchedulerConfig::from_file(&file).expect_err("cosine, -5.1").to_string();
    for needle in [file.to_str().expect("path"), "lambda_min_clipped", "-5.1", "t >= 996"] {
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    }
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
