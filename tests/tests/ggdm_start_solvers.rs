//! GGDM samplers that start as a training-free solver (`[sampler] init`, `base` of
//! `sampler.json`): at initialisation they are that solver, on every grid and for every prediction
//! type; with the residuals at 0 and the grid moved they are the solver run on the moved grid; and
//! the gradients through the solver base reach the grid logits, finite and equal to finite
//! differences.

use ggdm_core::ggdm::{GgdmBase, GgdmSampler, History, Learnable};
use ggdm_core::grid::{logsnr_grid, Spacing};
use ggdm_core::noise::SeededNoise;
use ggdm_core::samplers::{ddim, grid_steps, DdimOptions};
use ggdm_core::scheduler_config::SchedulerConfig;
use ggdm_core::solvers::{exact_noise_levels, FinalSigma, MultistepSolver};
use ggdm_core::{Denoiser, NoiseSchedule, PredictionType};
use tch::{Device, Kind, Tensor};

/// The spacings with an integer grid, which `ddss-cli sample` runs the solvers on too.
const INTEGER_SPACINGS: [Spacing; 4] = [Spacing::Leading, Spacing::Trailing, Spacing::Linspace, Spacing::Quadratic];
/// Every spacing a start accepts: the integer ones and the continuous log-SNR-uniform grid.
const SPACINGS: [Spacing; 5] =
    [Spacing::Leading, Spacing::Trailing, Spacing::Linspace, Spacing::Quadratic, Spacing::LogSnr];
const PREDICTION_TYPES: [PredictionType; 3] =
    [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction];

/// A smooth nonlinear toy network of `x` and `tau`, in the input's precision:
/// `x tau / (tau + 1) + (1 - tau / 1000) 0.1 sin(3 x) + 0.05 cos(tau / 100)`. It reads `tau` in
/// float32, as a network's time embedding does: the training-free solvers pass float32 timesteps
/// and the GGDM sampler passes them in the state's precision, and a continuous grid must not
/// differ for that reason alone.
struct ToyDenoiser {
    prediction_type: PredictionType,
}

impl Denoiser for ToyDenoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> ggdm_core::Result<Tensor> {
        let t = tau.to_kind(Kind::Float).to_kind(x.kind()).reshape([-1, 1, 1, 1]);
        let linear = x * &t / (&t + 1.0);
        let fade = (t.ones_like() - &t / 1000.0) * 0.1;
        Ok(linear + fade * (x * 3.0).sin() + (&t / 100.0).cos() * 0.05)
    }
    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
}

fn config(prediction_type: PredictionType) -> SchedulerConfig {
    SchedulerConfig { prediction_type, clip_sample: false, ..SchedulerConfig::default() }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().to_kind(Kind::Double).double_value(&[])
}

fn solver_of(base: GgdmBase) -> MultistepSolver {
    base.solver().expect("a multistep solver base")
}

const SOLVER_BASES: [GgdmBase; 4] = [GgdmBase::Dpmpp2m, GgdmBase::Dpmpp3m, GgdmBase::Unipc, GgdmBase::Unipc3];

/// The sampler at initialisation and the noise of one run (`f64` initial state).
fn start(base: GgdmBase, cfg: &SchedulerConfig, k: usize, spacing: Spacing) -> (GgdmSampler, Tensor, Vec<Tensor>) {
    let sampler = match base {
        GgdmBase::Ddim => {
            GgdmSampler::init_from_spacing(cfg, k, spacing, 0.0, History::Full, Learnable::all(), Device::Cpu)
        }
        _ => GgdmSampler::init_from_solver_spacing(base, cfg, k, spacing, History::Full, Learnable::all(), Device::Cpu),
    }
    .expect("init");
    assert_eq!(sampler.base, base);
    let (x_init, z) =
        sampler.draw_noise(&mut SeededNoise::new(k as u64 + 7), &[2, 1, 2, 2], Device::Cpu).expect("noise");
    (sampler, x_init.to_kind(Kind::Double), z)
}

/// The grid a start of `base` is placed on: DDIM's or the multistep solvers' integer list, or the
/// continuous log-SNR grid.
fn start_grid(base: GgdmBase, cfg: &SchedulerConfig, k: usize, spacing: Spacing) -> Vec<f64> {
    if spacing == Spacing::LogSnr {
        return logsnr_grid(&cfg.schedule().expect("schedule"), k).expect("grid");
    }
    let grid = match base {
        GgdmBase::Ddim => cfg.timesteps(k, spacing),
        _ => cfg.multistep_timesteps(k, spacing),
    };
    grid.expect("grid").into_iter().map(|t| t as f64).collect()
}

/// The solver `base` on the exact f64 noise levels of `grid` (what the GGDM base is built from).
fn solver_on_exact_levels(base: GgdmBase, model: &dyn Denoiser, grid: &[f64], x_init: &Tensor) -> Tensor {
    let schedule = NoiseSchedule::ddpm_linear_1000();
    let levels = exact_noise_levels(&schedule, grid, FinalSigma::Zero).expect("levels");
    solver_of(base).run_on_levels(model, grid, &levels, x_init, &mut |_| {}).expect("solver")
}

/// What the start `base` is on `grid`: DDIM with eta = 0 for DDIM, the solver on the exact f64
/// noise levels for the others.
fn start_reference(
    base: GgdmBase,
    model: &ToyDenoiser,
    cfg: &SchedulerConfig,
    grid: &[f64],
    x_init: &Tensor,
) -> Tensor {
    if base == GgdmBase::Ddim {
        let options = DdimOptions { eta: 0.0, clip: None, use_clipped_model_output: false };
        let schedule = cfg.schedule().expect("schedule");
        let mut no_noise = SeededNoise::new(0);
        ddim(model, &schedule, &grid_steps(grid), x_init, &options, &mut no_noise, &mut |_| {}).expect("ddim")
    } else {
        solver_on_exact_levels(base, model, grid, x_init)
    }
}

/// Every start is exact: for K = 1..20, every prediction type and every spacing of the grid the
/// start is placed on (the multistep solvers' grid for the solvers, the DDIM grid for DDIM, the
/// continuous log-SNR grid for `logsnr`), the sampler at initialisation equals the f64 solver on
/// exact noise levels to 1e-9.
#[test]
fn every_start_equals_its_solver_on_exact_levels() {
    let mut worst = 0.0f64;
    for prediction_type in PREDICTION_TYPES {
        let cfg = config(prediction_type);
        let model = ToyDenoiser { prediction_type };
        for k in 1..=20usize {
            for spacing in SPACINGS {
                for base in GgdmBase::ALL {
                    let (sampler, x_init, z) = start(base, &cfg, k, spacing);
                    let grid = start_grid(base, &cfg, k, spacing);
                    for (ours, theirs) in sampler.timesteps().iter().zip(&grid) {
                        assert!((ours - theirs).abs() < 1e-9, "{base:?} K={k} {spacing:?}: grid {ours} vs {theirs}");
                    }
                    let ours = tch::no_grad(|| sampler.sample(&model, &x_init, &z)).expect("ggdm");
                    let reference = start_reference(base, &model, &cfg, &grid, &x_init);
                    let diff = max_abs_diff(&ours, &reference);
                    worst = worst.max(diff);
                    assert!(diff <= 1e-9, "{base:?} {prediction_type:?} K={k} {spacing:?}: |GGDM - solver| = {diff}");
                }
            }
        }
    }
    eprintln!("worst |GGDM at init - solver on exact levels| = {worst:e}");
}

/// Against the solvers as `ddss-cli sample --sampler NAME` runs them: float32 states and
/// diffusers' noise levels, formed from diffusers' float32 `abar` with `alpha` and `sigma` in
/// float32 ([`ggdm_core::solvers::noise_levels`]). The GGDM start uses the exact f64 levels
/// instead, so the two differ by that rounding plus, in float32 states, the rounding of the loop
/// itself. Measured over this matrix (K = 1..20, three prediction types, the four integer spacings,
/// four solvers; samples of size ~1; `logsnr` is left out, as the CLI runs it on diffusers' integer
/// list and a start on the continuous grid):
/// * grids that end at `t = 0` (the quadratic spacing): at most 2.8e-5, in f64 and f32 states
///   alike. There `1 - abar_0 = 1e-4`, and float32 `abar_0` moves the noise scale of the last
///   level by ~3e-4 relative; that level is where the sample is formed.
/// * every other grid: at most 9.0e-6 in f64 states (the level rounding alone) and 1.05e-5 in f32
///   states, both at K = 1 with epsilon prediction: the one step from t = 999, where `sigma eps`
///   cancels all but ~1e-3 of `x`, so float32 `sigma` (one ulp, 6e-8) moves the data prediction by
///   ~6e-5 relative. With K >= 2 at most 2.2e-6 (f64 states) and 4.4e-6 (f32 states).
///
/// The bounds, 6e-5 and 2e-5, are about twice the worst measured and two orders of magnitude below
/// an 8-bit image's quantum (1/127.5 ~ 8e-3 on the [-1, 1] scale), while a wrong coefficient shows
/// up at 1e-3 or more.
#[test]
fn every_start_matches_the_cli_solver_within_the_level_rounding() {
    const TOLERANCE_ENDING_AT_ZERO: f64 = 6e-5;
    const TOLERANCE: f64 = 2e-5;
    let schedule = NoiseSchedule::ddpm_linear_1000();
    let (mut worst_at_zero, mut worst) = (0.0f64, 0.0f64);
    for prediction_type in PREDICTION_TYPES {
        let cfg = config(prediction_type);
        let model = ToyDenoiser { prediction_type };
        for k in 1..=20usize {
            for spacing in INTEGER_SPACINGS {
                for base in SOLVER_BASES {
                    let (sampler, x_init, z) = start(base, &cfg, k, spacing);
                    let grid = start_grid(base, &cfg, k, spacing);
                    let ends_at_zero = grid[k - 1] == 0.0;
                    for kind in [Kind::Double, Kind::Float] {
                        let x = x_init.to_kind(kind);
                        let ours = tch::no_grad(|| sampler.sample(&model, &x, &z)).expect("ggdm");
                        let cli = tch::no_grad(|| solver_of(base).run(&model, &schedule, &grid, &x, &mut |_| {}))
                            .expect("solver");
                        let diff = max_abs_diff(&ours, &cli);
                        let (bound, worst) = if ends_at_zero {
                            (TOLERANCE_ENDING_AT_ZERO, &mut worst_at_zero)
                        } else {
                            (TOLERANCE, &mut worst)
                        };
                        *worst = worst.max(diff);
                        assert!(
                            diff <= bound,
                            "{base:?} {prediction_type:?} K={k} {spacing:?} {kind:?}: |GGDM - CLI solver| = {diff}"
                        );
                    }
                }
            }
        }
    }
    eprintln!("worst |GGDM at init - CLI solver|: {worst_at_zero:e} on grids ending at t = 0, {worst:e} on the others");
}

/// Logits moved by a fixed pseudo-random offset of up to `size` (the grid stays in `[0, T - 1]`).
fn move_grid(sampler: &GgdmSampler, seed: u64, size: f64) {
    let k = sampler.steps as i64;
    let offset = SeededNoise::new(seed).next_tensor(k) * size;
    tch::no_grad(|| {
        let mut logits = sampler.params.grid_logits.shallow_clone();
        let _ = logits.g_add_(&offset);
    });
}

trait NextTensor {
    fn next_tensor(&mut self, n: i64) -> Tensor;
}

impl NextTensor for SeededNoise {
    fn next_tensor(&mut self, n: i64) -> Tensor {
        use ggdm_core::noise::NoiseSource;
        self.next(&[n], Device::Cpu).expect("noise").to_kind(Kind::Double).tanh()
    }
}

/// The grid-moved consistency check: with the residuals at 0 and the grid logits moved, the
/// sampler equals its start solver run on the moved (continuous) grid, to 1e-9 in f64; and the
/// grid really moved (by more than a timestep somewhere).
#[test]
fn a_moved_grid_keeps_the_start_solver() {
    for prediction_type in PREDICTION_TYPES {
        let cfg = config(prediction_type);
        let model = ToyDenoiser { prediction_type };
        for k in [1usize, 2, 3, 4, 7, 10, 20] {
            for base in GgdmBase::ALL {
                let (sampler, x_init, z) = start(base, &cfg, k, Spacing::Trailing);
                let before = sampler.timesteps();
                move_grid(&sampler, 40 + k as u64, 0.3);
                let grid = sampler.timesteps();
                let moved = before.iter().zip(&grid).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(k == 1 || moved > 1.0, "{base:?} K={k}: the grid moved by only {moved}");
                assert!(grid[k - 1] > 0.0, "{base:?} K={k}: the moved grid left [0, T-1]: {grid:?}");
                let ours = tch::no_grad(|| sampler.sample(&model, &x_init, &z)).expect("ggdm");
                let reference = start_reference(base, &model, &cfg, &grid, &x_init);
                let diff = max_abs_diff(&ours, &reference);
                assert!(diff <= 1e-9, "{base:?} {prediction_type:?} K={k}: |GGDM on moved grid - solver| = {diff}");
            }
        }
    }
}

/// Gradients through every base reach the grid logits and are finite (the clean level's
/// infinite log-SNR has no gradient path), at initialisation and with a moved grid.
#[test]
fn gradients_through_every_base_are_finite() {
    let cfg = config(PredictionType::Epsilon);
    let model = ToyDenoiser { prediction_type: PredictionType::Epsilon };
    for k in [1usize, 2, 3, 5, 10] {
        for base in GgdmBase::ALL {
            for moved in [false, true] {
                let (sampler, x_init, z) = start(base, &cfg, k, Spacing::Linspace);
                if moved {
                    move_grid(&sampler, 5, 0.3);
                }
                let out = sampler.sample(&model, &x_init, &z).expect("sample");
                out.square().sum(Kind::Double).backward();
                for (name, t) in sampler.params.named() {
                    let grad = t.grad();
                    assert!(grad.defined(), "{base:?} K={k}: {name} has no gradient");
                    let finite = grad.isfinite().all().int64_value(&[]) == 1;
                    assert!(finite, "{base:?} K={k} moved={moved}: {name} has a non-finite gradient {grad:?}");
                }
                let norm = sampler.params.grid_logits.grad().abs().sum(Kind::Double).double_value(&[]);
                assert!(k == 1 || norm > 0.0, "{base:?} K={k}: no gradient reaches the grid logits");
            }
        }
    }
}

/// `sum(u A) + sum(w B)` for fixed pseudo-random `A`, `B`: a scalar that depends on every base
/// coefficient.
fn coefficient_functional(sampler: &GgdmSampler) -> Tensor {
    let k = sampler.steps as i64;
    let c = sampler.coefficients();
    let a = SeededNoise::new(11).next_tensor(k * k).reshape([k, k]);
    let b = SeededNoise::new(12).next_tensor(k * k).reshape([k, k]);
    (c.u * a).sum(Kind::Double) + (c.w * b).sum(Kind::Double)
}

/// d(coefficients)/d(grid logits) of the UniPC bases by autograd equals central finite
/// differences in f64 (relative 1e-6; the finite differences themselves are good to ~1e-8).
#[test]
fn unipc_base_gradient_equals_finite_differences() {
    let cfg = config(PredictionType::Epsilon);
    for base in [GgdmBase::Unipc, GgdmBase::Unipc3] {
        let k = 6usize;
        let sampler = GgdmSampler::init_from_solver_spacing(
            base,
            &cfg,
            k,
            Spacing::Trailing,
            History::Full,
            Learnable::all(),
            Device::Cpu,
        )
        .expect("init");
        move_grid(&sampler, 3, 0.2);
        coefficient_functional(&sampler).backward();
        let autograd: Vec<f64> = Vec::<f64>::try_from(&sampler.params.grid_logits.grad()).expect("grad");
        let step = 1e-5;
        for (i, &by_autograd) in autograd.iter().enumerate() {
            let value_at = |delta: f64| {
                tch::no_grad(|| {
                    let mut logits = sampler.params.grid_logits.shallow_clone();
                    let original = logits.copy();
                    let _ = logits.get(i as i64).g_add_scalar_(delta);
                    let value = coefficient_functional(&sampler).double_value(&[]);
                    logits.copy_(&original);
                    value
                })
            };
            let central = (value_at(step) - value_at(-step)) / (2.0 * step);
            let error = (central - by_autograd).abs();
            assert!(
                error <= 1e-6 * by_autograd.abs().max(1.0),
                "{base:?} logit {i}: autograd {by_autograd} vs finite differences {central}"
            );
        }
        let largest = autograd.iter().fold(0.0f64, |m, g| m.max(g.abs()));
        assert!(largest > 1e-3, "{base:?}: the coefficients barely depend on the grid ({largest})");
    }
}

/// The solver bases need `history = "full"` and `eta = 0`, with errors that name the key.
#[test]
fn solver_bases_reject_last_history_and_eta() {
    let cfg = config(PredictionType::Epsilon);
    for base in SOLVER_BASES {
        let init_last = |k| {
            GgdmSampler::init_from_solver_spacing(
                base,
                &cfg,
                k,
                Spacing::Trailing,
                History::Last,
                Learnable::all(),
                Device::Cpu,
            )
        };
        let err = init_last(5).expect_err("history last").to_string();
        assert!(err.contains("history") && err.contains(base.name()), "{err}");
        // K = 1 is a single first-order step: `last` holds it.
        init_last(1).expect("K = 1");
        let err = base.check(5, 0.5, History::Full).expect_err("eta").to_string();
        assert!(err.contains("eta") && err.contains("0.5"), "{err}");
    }
    GgdmBase::Ddim.check(5, 0.5, History::Last).expect("DDIM takes any eta and history");
}
