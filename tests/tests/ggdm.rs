//! The GGDM sampler: at initialisation it is DDIM(eta) to float precision, gradients reach every
//! learnable part, and `sampler.json` round-trips bit for bit and rejects bad files clearly.

use ggdm_core::analytic::{DiffusersDummyDenoiser, GaussianDataDenoiser};
use ggdm_core::ggdm::{GgdmBase, GgdmSampler, History, Learnable, Query, SAMPLER_VERSION};
use ggdm_core::grid::{timesteps, Spacing};
use ggdm_core::noise::{ListNoise, NoiseSource, SeededNoise};
use ggdm_core::samplers::{ddim, grid_steps, DdimOptions};
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::{Denoiser, PredictionType};
use tch::{Device, Kind, Tensor};

fn config(prediction_type: PredictionType) -> SchedulerConfig {
    SchedulerConfig { prediction_type, clip_sample: false, ..SchedulerConfig::default() }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().to_kind(Kind::Double).double_value(&[])
}

#[allow(clippy::too_many_arguments)] // a test matrix: every argument is one axis
fn check_matches_ddim(
    model: &dyn Denoiser,
    cfg: &SchedulerConfig,
    k: usize,
    spacing: Spacing,
    eta: f64,
    history: History,
    kind: Kind,
    tol: f64,
) {
    let sampler =
        GgdmSampler::init_from_spacing(cfg, k, spacing, eta, history, Learnable::all(), Device::Cpu).expect("init");
    let grid = sampler.timesteps();
    let expected_grid = timesteps(1000, k, spacing, 0).expect("grid");
    for (ours, theirs) in grid.iter().zip(&expected_grid) {
        assert!((ours - *theirs as f64).abs() < 1e-9, "grid {ours} vs {theirs}");
    }
    let shape = [3i64, 1, 4, 4];
    let mut source = SeededNoise::new(k as u64 * 31 + (eta * 10.0) as u64);
    let (x_init, z) = sampler.draw_noise(&mut source, &shape, Device::Cpu).expect("noise");
    let x_init = x_init.to_kind(kind);
    let ours = sampler.sample(model, &x_init, &z).expect("ggdm sample");
    let grid_f: Vec<f64> = expected_grid.iter().map(|&t| t as f64).collect();
    let mut replay = ListNoise::new(z.iter().map(|t| t.copy()).collect());
    let options = DdimOptions { eta, clip: None, use_clipped_model_output: false };
    let schedule = cfg.schedule().expect("schedule");
    let reference =
        ddim(model, &schedule, &grid_steps(&grid_f), &x_init, &options, &mut replay, &mut |_| {}).expect("ddim");
    let diff = max_abs_diff(&ours, &reference);
    assert!(diff <= tol, "K={k} {spacing:?} eta={eta} {history:?} {kind:?}: |GGDM - DDIM| = {diff}");
}

/// In f64 the two agree to 1e-9, far inside the required 1e-6 (they are the same computation up to
/// rounding); in f32 they agree to the accumulated rounding of a 50-step f32 loop.
#[test]
fn ggdm_at_init_reproduces_ddim() {
    let cfg = config(PredictionType::Epsilon);
    let schedule = cfg.schedule().expect("schedule");
    let gaussian = GaussianDataDenoiser::new(&schedule, 0.3, 0.5, [1, 4, 4]);
    for k in [1usize, 5, 10, 50] {
        for eta in [0.0, 0.5, 1.0] {
            for spacing in [Spacing::Leading, Spacing::Trailing, Spacing::Quadratic] {
                check_matches_ddim(&gaussian, &cfg, k, spacing, eta, History::Full, Kind::Double, 1e-9);
                check_matches_ddim(&gaussian, &cfg, k, spacing, eta, History::Full, Kind::Float, 5e-6);
            }
        }
        check_matches_ddim(&gaussian, &cfg, k, Spacing::Linspace, 0.0, History::Last, Kind::Double, 1e-9);
        check_matches_ddim(&gaussian, &cfg, k, Spacing::Linspace, 0.0, History::Last, Kind::Float, 5e-6);
    }
}

#[test]
fn ggdm_at_init_reproduces_ddim_for_every_prediction_type() {
    for prediction_type in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
        let cfg = config(prediction_type);
        let dummy = DiffusersDummyDenoiser { prediction_type };
        for k in [1usize, 5, 10] {
            check_matches_ddim(&dummy, &cfg, k, Spacing::Trailing, 1.0, History::Full, Kind::Double, 1e-9);
            check_matches_ddim(&dummy, &cfg, k, Spacing::Trailing, 1.0, History::Full, Kind::Float, 1e-6);
        }
    }
}

#[test]
fn gradients_reach_every_learnable_part() {
    let cfg = config(PredictionType::Epsilon);
    let schedule = cfg.schedule().expect("schedule");
    let model = GaussianDataDenoiser::new(&schedule, 0.3, 0.5, [1, 4, 4]);
    let sampler =
        GgdmSampler::init_from_spacing(&cfg, 4, Spacing::Trailing, 0.5, History::Full, Learnable::all(), Device::Cpu)
            .expect("init");
    let mut source = SeededNoise::new(3);
    let (x_init, z) = sampler.draw_noise(&mut source, &[2, 1, 4, 4], Device::Cpu).expect("noise");
    let out = sampler.sample(&model, &x_init, &z).expect("sample");
    (out.square().sum(Kind::Double)).backward();
    for (name, t) in sampler.params.named() {
        let g = t.grad();
        assert!(g.defined(), "{name} has no gradient");
        let norm = g.abs().sum(Kind::Double).double_value(&[]);
        assert!(norm.is_finite() && norm > 0.0, "{name}: |grad| = {norm}");
    }
    // Frozen parts get no gradient.
    let frozen =
        GgdmSampler::init_from_spacing(&cfg, 4, Spacing::Trailing, 0.5, History::Full, Learnable::none(), Device::Cpu)
            .expect("init");
    assert!(frozen.trainable().is_empty());
    let out = tch::no_grad(|| frozen.sample(&model, &x_init, &z)).expect("sample");
    assert!(!out.requires_grad());
}

fn trained_sampler() -> GgdmSampler {
    let cfg = config(PredictionType::Epsilon);
    let sampler =
        GgdmSampler::init_from_spacing(&cfg, 5, Spacing::Quadratic, 0.3, History::Full, Learnable::all(), Device::Cpu)
            .expect("init");
    trained(sampler)
}

/// A sampler started as the multistep solver `base` for `prediction_type`, then trained as
/// [`trained_sampler`].
fn trained_solver_sampler(base: GgdmBase, prediction_type: PredictionType) -> GgdmSampler {
    let sampler = GgdmSampler::init_from_solver_spacing(
        base,
        &config(prediction_type),
        6,
        Spacing::Linspace,
        History::Full,
        Learnable::all(),
        Device::Cpu,
    )
    .expect("init");
    trained(sampler)
}

fn trained(mut sampler: GgdmSampler) -> GgdmSampler {
    // Move every parameter away from its initial value, with awkward floats.
    tch::no_grad(|| {
        for (i, (_, t)) in sampler.params.named().into_iter().enumerate() {
            let mut gen = SeededNoise::new(100 + i as u64);
            let delta = gen.next(&t.size(), Device::Cpu).expect("noise").to_kind(Kind::Double) * (1.0 / 3.0) * 1e-2;
            let mut t = t.shallow_clone();
            let _ = t.g_add_(&delta);
        }
    });
    sampler.model.name = "models/fashion-mnist-ddpm".into();
    sampler.model.sample_shape = Some([1, 28, 28]);
    sampler.provenance = serde_json::json!({"loss_history": {"first": 0.5, "last": 0.1}});
    sampler
}

#[test]
fn sampler_json_round_trips_bit_exactly() {
    let dir = std::env::temp_dir().join(format!("ggdm-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let path = dir.join("sampler.json");
    let sampler = trained_sampler();
    sampler.save(&path).expect("save");
    let loaded = GgdmSampler::load(&path, Device::Cpu).expect("load");
    for ((name, a), (_, b)) in sampler.params.named().into_iter().zip(loaded.params.named()) {
        assert!(a.equal(b), "{name} differs after round trip");
    }
    assert_eq!(sampler.to_file(), loaded.to_file());
    let path2 = dir.join("again.json");
    loaded.save(&path2).expect("save again");
    assert_eq!(std::fs::read(&path).expect("read"), std::fs::read(&path2).expect("read"));
    // The loaded sampler samples identically.
    let cfg = config(PredictionType::Epsilon);
    let model = GaussianDataDenoiser::new(&cfg.schedule().expect("schedule"), 0.0, 1.0, [1, 4, 4]);
    let (x, z) = sampler.draw_noise(&mut SeededNoise::new(1), &[2, 1, 4, 4], Device::Cpu).expect("noise");
    let a = tch::no_grad(|| sampler.sample(&model, &x, &z)).expect("sample");
    let b = tch::no_grad(|| loaded.sample(&model, &x, &z)).expect("sample");
    assert!(a.equal(&b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn try_clone_equals_the_file_round_trip_and_shares_no_tensor() {
    let mut sampler = trained_solver_sampler(GgdmBase::Unipc, PredictionType::Epsilon).with_query(Query::Marginal);
    sampler.provenance = serde_json::json!({ "note": "kept" });
    let copy = sampler.try_clone().expect("clone");
    let reloaded = GgdmSampler::from_file(sampler.to_file(), Device::Cpu).expect("from_file");
    assert_eq!(copy.to_file(), reloaded.to_file());
    for (((name, a), (_, b)), (_, c)) in
        sampler.params.named().into_iter().zip(copy.params.named()).zip(reloaded.params.named())
    {
        assert!(a.equal(b) && b.equal(c), "{name} differs");
        assert_eq!(b.requires_grad(), c.requires_grad(), "{name}: requires_grad");
    }
    // Changing the copy leaves the original alone.
    let before = sampler.params.u_residual.detach().copy();
    tch::no_grad(|| {
        let _ = copy.params.u_residual.shallow_clone().fill_(7.0);
    });
    assert!(sampler.params.u_residual.equal(&before));
    let cfg = config(PredictionType::Epsilon);
    let model = GaussianDataDenoiser::new(&cfg.schedule().expect("schedule"), 0.0, 1.0, [1, 4, 4]);
    let (x, z) = sampler.draw_noise(&mut SeededNoise::new(2), &[2, 1, 4, 4], Device::Cpu).expect("noise");
    let a = tch::no_grad(|| sampler.sample(&model, &x, &z)).expect("sample");
    let fresh = sampler.try_clone().expect("clone");
    let b = tch::no_grad(|| fresh.sample(&model, &x, &z)).expect("sample");
    assert!(a.equal(&b));
}

#[test]
fn bad_sampler_files_give_clear_errors() {
    let text = serde_json::to_string(&trained_sampler().to_file()).expect("json");
    let cases: Vec<(String, &str)> = vec![
        (text[..text.len() / 2].to_string(), "not valid JSON"),
        (
            text.replace("\"version\":2", "\"version\":7"),
            "version 7 is not supported; this build reads versions 1 and 2",
        ),
        (text.replace("\"base\":\"ddim\"", "\"base\":\"dpmpp9m\""), "unknown variant `dpmpp9m`"),
        (text.replace("\"base\":\"ddim\"", "\"base\":\"unipc\""), "eta"),
        (text.replace("ddss-ggdm-sampler", "something-else"), "not a GGDM sampler file"),
        (text.replace("\"steps\":5", "\"steps\":6"), "grid_logits"),
        (text.replace("\"eta\":", "\"etta\":"), "unknown field `etta`"),
        ("[1, 2]".to_string(), "not a GGDM sampler file"),
    ];
    for (bad, expected) in cases {
        let err = GgdmSampler::from_json(&bad, Device::Cpu).expect_err("must fail").to_string();
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
    }
    let missing =
        GgdmSampler::load(std::path::Path::new("/nonexistent/sampler.json"), Device::Cpu).expect_err("missing");
    assert!(missing.to_string().contains("/nonexistent/sampler.json"));
}

#[test]
fn sampler_for_another_schedule_or_shape_is_rejected() {
    let sampler = trained_sampler();
    let cosine =
        SchedulerConfig { beta_schedule: ggdm_core::BetaSchedule::SquaredCosCapV2, ..config(PredictionType::Epsilon) };
    let err = sampler.check_compatible(&cosine, Some([1, 28, 28])).expect_err("schedule").to_string();
    assert!(err.contains("squaredcos_cap_v2"), "{err}");
    let err =
        sampler.check_compatible(&config(PredictionType::Epsilon), Some([3, 32, 32])).expect_err("shape").to_string();
    assert!(err.contains("[3, 32, 32]"), "{err}");
    sampler.check_compatible(&config(PredictionType::Epsilon), Some([1, 28, 28])).expect("compatible");
}

/// The paper-faithful marginal query equals the grid query at DDIM initialisation, for every
/// prediction type.
#[test]
fn marginal_query_at_init_equals_grid_query() {
    for prediction_type in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
        let cfg = config(prediction_type);
        let dummy = DiffusersDummyDenoiser { prediction_type };
        for k in [1usize, 5, 10] {
            for eta in [0.0, 1.0] {
                let init = || {
                    GgdmSampler::init_from_spacing(
                        &cfg,
                        k,
                        Spacing::Trailing,
                        eta,
                        History::Full,
                        Learnable::all(),
                        Device::Cpu,
                    )
                    .expect("init")
                };
                let grid = init();
                let marginal = init().with_query(Query::Marginal);
                let (x_init, z) = grid.draw_noise(&mut SeededNoise::new(k as u64), &[2, 1, 4, 4], Device::Cpu).unwrap();
                let (x_init, z): (Tensor, Vec<Tensor>) =
                    (x_init.to_kind(Kind::Double), z.iter().map(|t| t.to_kind(Kind::Double)).collect());
                let a = tch::no_grad(|| grid.sample(&dummy, &x_init, &z)).unwrap();
                let b = tch::no_grad(|| marginal.sample(&dummy, &x_init, &z)).unwrap();
                let diff = max_abs_diff(&a, &b);
                assert!(diff <= 1e-9, "{prediction_type:?} K={k} eta={eta}: |marginal - grid| = {diff}");
            }
        }
    }
}

/// Away from initialisation the marginal follows the recursion `a_{i+1} = sum_j u_ij a_j + sum_j
/// w_ij`, `c_{i+1} = sum_j u_ij c_j + sigma_i e_{i+1}`, `v = |c|^2`, and the model is queried where
/// `abar = a^2 / (a^2 + v)`.
#[test]
fn marginal_query_follows_the_recursion() {
    let cfg = config(PredictionType::Epsilon);
    let sampler = trained_sampler().with_query(Query::Marginal);
    let c = tch::no_grad(|| sampler.coefficients());
    let k = sampler.steps;
    let abar: Vec<f64> = Vec::<f64>::try_from(&c.abar).unwrap();
    let u = |i: usize, j: usize| c.u.double_value(&[i as i64, j as i64]);
    let w = |i: usize, j: usize| c.w.double_value(&[i as i64, j as i64]);
    let mut signal = vec![abar[0].sqrt()];
    let mut noise = vec![vec![0.0; k + 1]];
    noise[0][0] = (1.0 - abar[0]).sqrt();
    for i in 0..k - 1 {
        let mut a = 0.0;
        let mut coeffs = vec![0.0; k + 1];
        coeffs[i + 1] = c.sigma.double_value(&[i as i64]);
        for j in 0..=i {
            a += u(i, j) * signal[j] + w(i, j);
            for (n, value) in coeffs.iter_mut().enumerate() {
                *value += u(i, j) * noise[j][n];
            }
        }
        signal.push(a);
        noise.push(coeffs);
    }
    let schedule = cfg.schedule().unwrap();
    for i in 0..k {
        let variance: f64 = noise[i].iter().map(|c| c * c).sum();
        let got_a = 1.0 / c.pred_scale.double_value(&[i as i64]);
        let got_v = c.sqrt_one_minus_abar.double_value(&[i as i64]).powi(2);
        assert!((got_a - signal[i]).abs() <= 1e-12 && (got_v - variance).abs() <= 1e-12, "step {i}");
        let query_abar = signal[i].powi(2) / (signal[i].powi(2) + variance);
        assert!((c.query_abar.double_value(&[i as i64]) - query_abar).abs() <= 1e-12);
        let tau = c.query_tau.double_value(&[i as i64]);
        assert!((schedule.abar_continuous(tau) - query_abar).abs() <= 1e-10 * query_abar, "step {i}: tau {tau}");
        let scale = c.input_scale.double_value(&[i as i64]);
        assert!((scale - 1.0 / (signal[i].powi(2) + variance).sqrt()).abs() <= 1e-12);
    }
    // The trained parameters move the marginal away from the grid's.
    assert!((c.query_tau.double_value(&[k as i64 - 1]) - c.tau.double_value(&[k as i64 - 1])).abs() > 1e-3);
    // And the file keeps the mode.
    let back = GgdmSampler::from_json(&serde_json::to_string(&sampler.to_file()).unwrap(), Device::Cpu).unwrap();
    assert_eq!(back.query, Query::Marginal);
    let text = serde_json::to_string(&trained_sampler().to_file()).unwrap();
    assert!(!text.contains("\"query\""), "the default mode is not written, so older files stay identical");
}

/// A version 2 file of `sampler` turned into the version 1 it would have been: no `base`, and
/// only the derived values version 1 had.
fn as_version_1(sampler: &GgdmSampler) -> serde_json::Value {
    let mut value = serde_json::to_value(sampler.to_file()).expect("json");
    let file = value.as_object_mut().expect("object");
    assert_eq!(file.remove("base"), Some(serde_json::json!("ddim")));
    file.insert("version".into(), serde_json::json!(1));
    let derived = file["derived"].as_object_mut().expect("derived");
    derived.retain(|key, _| ["timesteps", "sigma", "u", "w"].contains(&key.as_str()));
    value
}

/// Version 1 files (always a DDIM(eta) base) still load with the meaning they had, and are
/// written back as the current version; a version 1 file keeps version 1's schema.
#[test]
fn version_1_files_load_as_a_ddim_base() {
    let sampler = trained_sampler();
    let old = as_version_1(&sampler);
    let loaded = GgdmSampler::from_json(&old.to_string(), Device::Cpu).expect("version 1 loads");
    assert_eq!(loaded.base, GgdmBase::Ddim);
    for ((name, a), (_, b)) in sampler.params.named().into_iter().zip(loaded.params.named()) {
        assert!(a.equal(b), "{name} differs after loading version 1");
    }
    let model = DiffusersDummyDenoiser { prediction_type: PredictionType::Epsilon };
    let (x, z) = sampler.draw_noise(&mut SeededNoise::new(4), &[2, 1, 4, 4], Device::Cpu).expect("noise");
    let a = tch::no_grad(|| sampler.sample(&model, &x, &z)).expect("sample");
    let b = tch::no_grad(|| loaded.sample(&model, &x, &z)).expect("sample");
    assert!(a.equal(&b), "a version 1 file samples differently");
    assert_eq!(loaded.to_file().version, SAMPLER_VERSION);
    assert_eq!(loaded.to_file(), sampler.to_file());
    // Version 1 has no `base` and no new derived values.
    let mut with_base = old.clone();
    with_base["base"] = serde_json::json!("ddim");
    let err = GgdmSampler::from_json(&with_base.to_string(), Device::Cpu).expect_err("base in v1").to_string();
    assert!(err.contains("unknown field `base`"), "{err}");
    // A version 2 file without `base` is incomplete.
    let mut no_base = serde_json::to_value(sampler.to_file()).expect("json");
    no_base.as_object_mut().expect("object").remove("base");
    let err = GgdmSampler::from_json(&no_base.to_string(), Device::Cpu).expect_err("no base").to_string();
    assert!(err.contains("missing field `base`"), "{err}");
}

/// A sampler started as a solver round-trips with its base, and its file checks the base's
/// settings.
#[test]
fn solver_bases_round_trip_and_are_checked_when_loading() {
    for base in [GgdmBase::Dpmpp2m, GgdmBase::Dpmpp3m, GgdmBase::Unipc, GgdmBase::Unipc3] {
        let sampler = trained_solver_sampler(base, PredictionType::VPrediction);
        let text = serde_json::to_string(&sampler.to_file()).expect("json");
        assert!(text.contains(&format!("\"base\":\"{}\"", base.name())), "{text}");
        let loaded = GgdmSampler::from_json(&text, Device::Cpu).expect("load");
        assert_eq!(loaded.base, base);
        assert_eq!(loaded.to_file(), sampler.to_file());
        let last = text.replace("\"history\":\"full\"", "\"history\":\"last\"");
        let err = GgdmSampler::from_json(&last, Device::Cpu).expect_err("history last").to_string();
        assert!(err.contains("history") && err.contains(base.name()), "{err}");
    }
}

/// `docs/sampler_json.md`'s recipe, run from the file's `derived` values alone (plain JSON
/// numbers, no schedule and no solver), reproduces the sampler for every prediction type, both
/// query modes, and a DDIM and a UniPC base: `x0_hat_i = p_i x_i + q_i eps_i`, with `eps_i` the
/// network's epsilon at `(input_scale_i x_i, query_timesteps_i)` (converted with `query_abar_i`),
/// then `x_{i+1} = sum_j u_ij x_j + sum_j w_ij x0_hat_j + sigma_i z_i`. `derived.sigma` is
/// `|sigma|`, so the comparison flips `z_i` where the learned sigma is negative.
#[test]
fn derived_coefficients_alone_run_the_sampler() {
    for prediction_type in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
        let model = DiffusersDummyDenoiser { prediction_type };
        for query in [Query::Grid, Query::Marginal] {
            let ddim = trained(
                GgdmSampler::init_from_spacing(
                    &config(prediction_type),
                    5,
                    Spacing::Trailing,
                    0.4,
                    History::Full,
                    Learnable::all(),
                    Device::Cpu,
                )
                .expect("init"),
            );
            for sampler in [ddim, trained_solver_sampler(GgdmBase::Unipc, prediction_type)] {
                let sampler = sampler.with_query(query);
                let label = format!("{:?} {prediction_type:?} {query:?}", sampler.base);
                let derived = serde_json::to_value(sampler.to_file()).expect("json")["derived"].clone();
                let (x_init, z) = sampler.draw_noise(&mut SeededNoise::new(9), &[2, 1, 3, 3], Device::Cpu).unwrap();
                let x_init = x_init.to_kind(Kind::Double);
                let from_derived = run_from_derived(&derived, &model, &x_init, &z);
                let signs = tch::no_grad(|| sampler.coefficients()).sigma.sign();
                let z_signed: Vec<Tensor> = z.iter().enumerate().map(|(i, z)| z * signs.get(i as i64)).collect();
                let ours = tch::no_grad(|| sampler.sample(&model, &x_init, &z_signed)).expect("sample");
                let diff = max_abs_diff(&ours, &from_derived);
                assert!(diff <= 1e-9, "{label}: |sampler - derived recipe| = {diff}");
            }
        }
    }
}

fn run_from_derived(derived: &serde_json::Value, model: &dyn Denoiser, x_init: &Tensor, z: &[Tensor]) -> Tensor {
    let vector = |key: &str| -> Vec<f64> { serde_json::from_value(derived[key].clone()).expect(key) };
    let matrix = |key: &str| -> Vec<Vec<f64>> { serde_json::from_value(derived[key].clone()).expect(key) };
    let (u, w, sigma) = (matrix("u"), matrix("w"), vector("sigma"));
    let (p, q) = (vector("p"), vector("q"));
    let (query_tau, query_abar, input_scale) = (vector("query_timesteps"), vector("query_abar"), vector("input_scale"));
    let n = x_init.size()[0];
    let mut states = vec![x_init.shallow_clone()];
    let mut x0_hats: Vec<Tensor> = Vec::new();
    for i in 0..u.len() {
        let x_net = &states[i] * input_scale[i];
        let tau = Tensor::full([n], query_tau[i], (Kind::Double, Device::Cpu));
        let output = tch::no_grad(|| model.forward(&x_net, &tau)).expect("network");
        let (signal, noise) = (query_abar[i].sqrt(), (1.0 - query_abar[i]).sqrt());
        let eps = match model.prediction_type() {
            PredictionType::Epsilon => output,
            PredictionType::Sample => (&x_net - output * signal) / noise,
            PredictionType::VPrediction => output * signal + &x_net * noise,
        };
        x0_hats.push(&states[i] * p[i] + eps * q[i]);
        let mut next = z[i].to_kind(Kind::Double) * sigma[i];
        for j in 0..=i {
            next = next + &states[j] * u[i][j] + &x0_hats[j] * w[i][j];
        }
        states.push(next);
    }
    states.pop().expect("a state")
}
