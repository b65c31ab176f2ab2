//! Schedules and timestep grids against diffusers 0.42.1 (fixtures from
//! `tests/scripts/gen_scheduler_fixtures.py`).

use ddss_tests::read_json;
use ggdm_core::grid::{timesteps, Spacing};
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
