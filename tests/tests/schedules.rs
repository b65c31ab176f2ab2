//! Schedules and timestep grids against diffusers 0.42.1 (fixtures from
//! `tests/scripts/gen_scheduler_fixtures.py`).

use ddss_tests::read_json;
use ggdm_core::grid::{log_snr, logsnr_grid, logsnr_timesteps, timesteps, Spacing};
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::{BetaSchedule, NoiseSchedule};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn schedule_of(case: &Value) -> BetaSchedule {
    let start = case["beta_start"].as_f64().expect("beta_start");
    let end = case["beta_end"].as_f64().expect("beta_end");
    match case["beta_schedule"].as_str().expect("name") {
        "linear" => BetaSchedule::Linear { beta_start: start, beta_end: end },
        "scaled_linear" => BetaSchedule::ScaledLinear { beta_start: start, beta_end: end },
        "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
        other => panic!("unknown schedule {other}"),
    }
}

#[test]
fn schedules_equal_diffusers_definitions_in_f64() {
    let cases = read_json("schedules.json");
    for case in cases.as_array().expect("list") {
        let t_count = case["num_train_timesteps"].as_u64().expect("T") as usize;
        let schedule = NoiseSchedule::new(schedule_of(case), t_count).expect("schedule");
        for (ours, theirs, what) in [
            (schedule.betas(), floats(&case["betas_f64"]), "betas"),
            (schedule.abar(), floats(&case["alphas_cumprod_f64"]), "abar"),
        ] {
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                let rel = (a - b).abs() / b.abs();
                assert!(rel <= 1e-12, "{} {what}[{i}]: ours {a}, reference {b}", case["beta_schedule"]);
            }
        }
        // diffusers keeps float32 tables: ours rounded to f32 agree to f32 precision.
        for (ours, theirs, what) in [
            (schedule.betas(), floats(&case["betas_f32"]), "betas"),
            (schedule.abar(), floats(&case["alphas_cumprod_f32"]), "abar"),
        ] {
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                // float32 cumulative products drift by a few ulps per step; tiny values by more.
                let diff = ((*a as f32) as f64 - b).abs();
                assert!(
                    diff <= 2e-6 * b.abs() + 1e-10,
                    "{} f32 {what}[{i}]: ours {a}, diffusers {b}",
                    case["beta_schedule"]
                );
            }
        }
    }
}

/// [`NoiseSchedule::abar_f32`] is diffusers' float32 `alphas_cumprod`: bit for bit for the cosine
/// schedule (float32 betas rounded from f64, as ours are), within a few ulps for linear and
/// scaled-linear betas (float32 `linspace`, whose last bits ours do not follow). The cosine
/// schedule's last entry is where `abar` rounded to float32 is far off: its beta, capped at
/// 0.999, is 0.99900001 in float32.
#[test]
fn abar_f32_is_diffusers_float32_table() {
    let cases = read_json("schedules.json");
    for case in cases.as_array().expect("list") {
        let name = case["beta_schedule"].as_str().expect("name");
        let t_count = case["num_train_timesteps"].as_u64().expect("T") as usize;
        let schedule = NoiseSchedule::new(schedule_of(case), t_count).expect("schedule");
        let theirs: Vec<f32> = floats(&case["alphas_cumprod_f32"]).into_iter().map(|v| v as f32).collect();
        let ours = schedule.abar_f32();
        assert_eq!(ours.len(), theirs.len());
        let ulps = ours.iter().zip(&theirs).map(|(a, b)| (i64::from(a.to_bits()) - i64::from(b.to_bits())).abs());
        let worst = ulps.max().expect("entries");
        let bound = if name == "squaredcos_cap_v2" { 0 } else { 6 };
        assert!(worst <= bound, "{name} T={t_count}: abar_f32 is {worst} ulps off diffusers' table");
        if name == "squaredcos_cap_v2" && t_count == 1000 {
            let last = t_count - 1;
            let rounded = schedule.abar()[last] as f32;
            let rel = (f64::from(rounded) / f64::from(theirs[last]) - 1.0).abs();
            assert!(rel > 1e-5, "abar[{last}] rounded: {rounded}, diffusers {}", theirs[last]);
        }
    }
}

#[test]
fn timestep_lists_equal_diffusers_exactly() {
    let cases = read_json("timesteps.json");
    let mut checked = 0;
    for case in cases.as_array().expect("list") {
        let t_count = case["num_train_timesteps"].as_u64().expect("T") as usize;
        let k = case["steps"].as_u64().expect("K") as usize;
        let spacing = Spacing::parse(case["spacing"].as_str().expect("spacing")).expect("spacing");
        let offset = case["steps_offset"].as_u64().expect("offset") as usize;
        let expected: Vec<i64> =
            case["ddim"].as_array().expect("ddim").iter().map(|v| v.as_i64().expect("int")).collect();
        let ddpm: Vec<i64> = case["ddpm"].as_array().expect("ddpm").iter().map(|v| v.as_i64().expect("int")).collect();
        assert_eq!(expected, ddpm, "DDIM and DDPM schedulers agree in the fixture");
        match timesteps(t_count, k, spacing, offset) {
            Ok(ours) => assert_eq!(ours, expected, "T={t_count} K={k} {spacing:?} offset={offset}"),
            Err(e) => {
                // diffusers itself produces an out-of-range timestep here (leading + offset with K = T).
                assert!(expected.iter().any(|&t| t >= t_count as i64), "unexpected error {e} for T={t_count} K={k}");
            }
        }
        checked += 1;
    }
    assert!(checked > 200);
}

#[test]
fn continuous_abar_is_exact_at_integers_and_log_linear_between() {
    let schedule = NoiseSchedule::ddpm_linear_1000();
    for t in [0usize, 1, 17, 500, 999] {
        assert_eq!(schedule.abar_continuous(t as f64), schedule.abar()[t]);
    }
    assert_eq!(schedule.abar_continuous(-1.0), 1.0);
    let mid = schedule.abar_continuous(10.25);
    let expected = (0.75 * schedule.abar()[10].ln() + 0.25 * schedule.abar()[11].ln()).exp();
    assert!((mid - expected).abs() < 1e-15);
    // The inverse.
    for tau in [-0.5, 0.0, 3.3, 250.75, 998.5] {
        let back = schedule.tau_for_abar(schedule.abar_continuous(tau));
        assert!((back - tau).abs() < 1e-9, "{tau} -> {back}");
    }
    // The tensor version agrees and is differentiable.
    let table = schedule.log_abar_table(tch::Kind::Double, tch::Device::Cpu);
    let tau = tch::Tensor::from_slice(&[10.25f64, 500.0, -1.0]).set_requires_grad(true);
    let abar = NoiseSchedule::abar_tensor(&table, &tau);
    let values = ggdm_core::ggdm::tensor_to_vec(&abar);
    assert!((values[0] - mid).abs() < 1e-15);
    assert!((values[1] / schedule.abar()[500] - 1.0).abs() < 1e-14);
    assert_eq!(values[2], 1.0);
    abar.sum(tch::Kind::Double).backward();
    let grad = ggdm_core::ggdm::tensor_to_vec(&tau.grad());
    assert!(grad[0] < 0.0 && grad[0].is_finite());
}

#[test]
fn bad_requests_are_errors() {
    assert!(timesteps(1000, 0, Spacing::Leading, 0).unwrap_err().to_string().contains("steps"));
    assert!(timesteps(100, 101, Spacing::Trailing, 0).unwrap_err().to_string().contains("101"));
    assert!(NoiseSchedule::from_betas(vec![0.1, 1.5]).unwrap_err().to_string().contains("beta[1]"));
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("int")).collect()
}

fn logsnr_case(case: &Value) -> (SchedulerConfig, usize, String) {
    let t_count = case["num_train_timesteps"].as_u64().expect("T") as usize;
    let k = case["steps"].as_u64().expect("K") as usize;
    let scheduler =
        SchedulerConfig { num_train_timesteps: t_count, beta_schedule: schedule_of(case), ..Default::default() };
    let label = format!("{} T={t_count} K={k}", case["beta_schedule"]);
    (scheduler, k, label)
}

/// diffusers: `DPMSolverMultistepScheduler(use_lu_lambdas=True).set_timesteps(K).timesteps`, repeats
/// included; the sampler-facing lists equal it where it does not repeat and refuse it where it does.
#[test]
fn logsnr_timesteps_equal_diffusers_use_lu_lambdas() {
    let cases = read_json("logsnr_timesteps.json");
    let mut repeating = 0;
    for case in cases.as_array().expect("list") {
        let (scheduler, k, label) = logsnr_case(case);
        let expected = ints(&case["timesteps"]);
        assert_eq!(logsnr_timesteps(&scheduler, k).expect("list"), expected, "{label}");
        if expected.windows(2).all(|w| w[1] < w[0]) {
            assert_eq!(scheduler.timesteps(k, Spacing::LogSnr).expect("grid"), expected, "{label}");
            assert_eq!(scheduler.multistep_timesteps(k, Spacing::LogSnr).expect("grid"), expected, "{label}");
        } else {
            repeating += 1;
            let err = scheduler.multistep_timesteps(k, Spacing::LogSnr).expect_err("repeats").to_string();
            assert!(err.contains("repeat a timestep"), "{label}: {err}");
        }
    }
    assert_eq!(cases.as_array().expect("list").len(), 24);
    // linear K = 50 (T = 1000 and 100), linear T = 100 K = 20, scaled_linear K = 50, cosine K >= 10.
    assert_eq!(repeating, 7);
}

/// Our continuous grid: its levels are exactly uniform in log-SNR and are diffusers' unrounded
/// sigmas (which diffusers computes from float32 tables).
#[test]
fn logsnr_grid_levels_are_uniform_and_equal_diffusers_sigmas() {
    let cases = read_json("logsnr_timesteps.json");
    for case in cases.as_array().expect("list") {
        let (scheduler, k, label) = logsnr_case(case);
        let schedule = scheduler.schedule().expect("schedule");
        let grid = logsnr_grid(&schedule, k).expect("grid");
        assert_eq!(grid.len(), k);
        assert_eq!(grid[0], schedule.tau_max(), "{label}");
        if k > 1 {
            assert_eq!(grid[k - 1], 0.0, "{label}");
        }
        assert!(grid.windows(2).all(|w| w[1] < w[0]), "{label}: {grid:?}");
        let lambdas: Vec<f64> = grid.iter().map(|&tau| log_snr(schedule.abar_continuous(tau))).collect();
        let gap = if k > 1 { (lambdas[k - 1] - lambdas[0]) / (k - 1) as f64 } else { 0.0 };
        for (i, lambda) in lambdas.iter().enumerate() {
            let uniform = lambdas[0] + gap * i as f64;
            assert!((lambda - uniform).abs() < 1e-9, "{label}: lambda[{i}] = {lambda}, uniform {uniform}");
        }
        check_against_diffusers_sigmas(&schedule, &grid, &floats(&case["sigmas"]), &label);
    }
}

/// diffusers forms its sigmas from float32 tables: `1 - abar_0` in float32 moves its smallest sigma
/// by up to 3e-4 relative (cosine schedule), and since its levels are uniform in `log sigma`
/// between the two ends, that error spreads linearly over the interior levels. So: ours and
/// diffusers' agree to 5e-4 relative, and their log-ratio is linear in the step index to 1e-6.
fn check_against_diffusers_sigmas(schedule: &NoiseSchedule, grid: &[f64], theirs: &[f64], label: &str) {
    let k = grid.len();
    let log_ratios: Vec<f64> = grid
        .iter()
        .zip(theirs)
        .map(|(&tau, &sigma)| {
            let abar = schedule.abar_continuous(tau);
            (((1.0 - abar) / abar).sqrt() / sigma).ln()
        })
        .collect();
    for (i, d) in log_ratios.iter().enumerate() {
        assert!(d.abs() < 5e-4, "{label}: sigma[{i}] differs from diffusers' by {d:e} in log");
        let ramp = if k > 1 { i as f64 / (k - 1) as f64 } else { 0.0 };
        let linear = log_ratios[0] + (log_ratios[k - 1] - log_ratios[0]) * ramp;
        assert!((d - linear).abs() < 1e-6, "{label}: sigma[{i}] log-ratio {d:e}, linear part {linear:e}");
    }
}

#[test]
fn logsnr_is_a_spacing_name() {
    assert_eq!(Spacing::parse("logsnr").expect("parse"), Spacing::LogSnr);
    assert_eq!(Spacing::LogSnr.name(), "logsnr");
    assert_eq!(serde_json::to_string(&Spacing::LogSnr).expect("serialise"), "\"logsnr\"");
    assert!(Spacing::parse("log_snr").unwrap_err().to_string().contains("logsnr"));
    assert!(logsnr_grid(&NoiseSchedule::ddpm_linear_1000(), 0).unwrap_err().to_string().contains("steps"));
}
