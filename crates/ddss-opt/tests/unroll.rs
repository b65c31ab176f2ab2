//! The unroll's gradients: PerCall and Budget rematerialisation equal naive autograd (f64,
//! relative 1e-6) and all equal central finite differences (1e-4), on a tiny random UNet with
//! every part of the sampler learnable, K = 4.

mod common;
use common::*;

use ddss_opt::unroll::{backward, forward, MemoryPlan, Remat};
use ggdm_core::ggdm::{GgdmSampler, History, Learnable, Query};
use ggdm_core::grid::Spacing;
use ggdm_core::noise::{NoiseSource, SeededNoise};
use ggdm_core::{Denoiser, PredictionType};
use ggdm_nets::unet::UNetDenoiser;
use ggdm_nets::DifferentiableDenoiser;
use tch::{Device, Kind, Tensor};

fn tiny_model(prediction_type: PredictionType) -> UNetDenoiser {
    tiny_unet(true, prediction_type)
}

fn sampler(history: History) -> GgdmSampler {
    let s =
        GgdmSampler::init_from_spacing(&scheduler(), 4, Spacing::Trailing, 0.5, history, Learnable::all(), Device::Cpu)
            .expect("sampler");
    // Move every parameter off its initial value so no gradient is trivially zero.
    tch::no_grad(|| {
        for (i, (_, t)) in s.params.named().into_iter().enumerate() {
            let delta =
                SeededNoise::new(50 + i as u64).next(&t.size(), Device::Cpu).expect("noise").to_kind(Kind::Double);
            let mut t = t.shallow_clone();
            let _ = t.g_add_(&(delta * 0.05));
        }
    });
    s
}

struct Problem {
    x_init: Tensor,
    z: Vec<Tensor>,
    weights: Tensor,
}

fn problem(s: &GgdmSampler) -> Problem {
    let mut noise = SeededNoise::new(9);
    let (x_init, z) = s.draw_noise(&mut noise, &[2, 1, 8, 8], Device::Cpu).expect("noise");
    let weights = noise.next(&[2, 1, 8, 8], Device::Cpu).expect("w").to_kind(Kind::Double);
    Problem { x_init: x_init.to_kind(Kind::Double), z: z.iter().map(|t| t.to_kind(Kind::Double)).collect(), weights }
}

/// A smooth, non-linear loss of the output: `sum(w * x) + 0.5 sum(x^2)`.
fn loss_and_grad(x: &Tensor, w: &Tensor) -> (f64, Tensor) {
    let loss = (x * w).sum(Kind::Double) + x.square().sum(Kind::Double) * 0.5;
    (loss.double_value(&[]), w + x)
}

fn zero_grads(s: &GgdmSampler) {
    for (_, t) in s.params.named() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn gradients<D: DifferentiableDenoiser>(
    s: &GgdmSampler,
    model: &D,
    p: &Problem,
    remat: Remat,
) -> (Vec<Tensor>, Tensor) {
    gradients_and_plan(s, model, p, remat).0
}

fn gradients_and_plan<D: DifferentiableDenoiser>(
    s: &GgdmSampler,
    model: &D,
    p: &Problem,
    remat: Remat,
) -> ((Vec<Tensor>, Tensor), Option<MemoryPlan>) {
    zero_grads(s);
    let fwd = forward(s, model, &p.x_init, &p.z, remat).expect("forward");
    let plan = fwd.memory_plan();
    let (_, g) = loss_and_grad(&fwd.output, &p.weights);
    let x_grad = backward(s, model, fwd, &g).expect("backward");
    ((s.params.named().iter().map(|(_, t)| t.grad().copy()).collect(), x_grad), plan)
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let num = (a - b).abs().max().double_value(&[]);
    let den = b.abs().max().double_value(&[]).max(1e-12);
    num / den
}

#[test]
fn remat_gradients_equal_naive_autograd() {
    for prediction_type in [PredictionType::Epsilon, PredictionType::VPrediction] {
        let model = tiny_model(prediction_type);
        for history in [History::Full, History::Last] {
            let s = sampler(history);
            let p = problem(&s);
            let (naive, naive_x) = gradients(&s, &model, &p, Remat::Naive);
            for remat in [
                Remat::PerCall,
                Remat::Budget { stored_steps: 2 },
                Remat::Budget { stored_steps: 4 },
                Remat::MemoryBudget { mib: 0 },
                Remat::MemoryBudget { mib: 1 << 30 },
                Remat::FreeMemory { percent: 0 },
                Remat::FreeMemory { percent: 50 },
            ] {
                let ((ours, ours_x), plan) = gradients_and_plan(&s, &model, &p, remat);
                let expected = match remat {
                    Remat::MemoryBudget { mib } => Some(if mib == 0 { 0 } else { 4 }),
                    Remat::FreeMemory { percent } => Some(if percent == 0 { 0 } else { 4 }),
                    _ => None,
                };
                if let Some(expected) = expected {
                    let plan = plan.expect("a memory-budget forward pass reports its plan");
                    assert_eq!(plan.stored_steps, expected, "{plan:?}");
                }
                for ((name, _), (a, b)) in s.params.named().iter().zip(ours.iter().zip(&naive)) {
                    let d = rel_diff(a, b);
                    assert!(d <= 1e-6, "{prediction_type:?} {history:?} {remat:?}: {name} differs from naive by {d}");
                    if *name != "u_residual" && *name != "w_residual" || history == History::Full {
                        assert!(b.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}: zero gradient");
                    }
                }
                let d = rel_diff(&ours_x, &naive_x);
                assert!(d <= 1e-6, "{remat:?}: dL/dx_init differs by {d}");
            }
        }
    }
}

#[test]
fn gradients_equal_central_finite_differences() {
    let model = tiny_model(PredictionType::Epsilon);
    let s = sampler(History::Full);
    let p = problem(&s);
    let (grads, _) = gradients(&s, &model, &p, Remat::PerCall);
    // Probe entries of every parameter: grid logits (through tau and the time embedding), the
    // coefficient residuals (including history terms), sigma, p and q.
    let probes: [(usize, &[i64]); 8] =
        [(0, &[0]), (0, &[3]), (1, &[2, 0]), (1, &[3, 3]), (2, &[3, 1]), (3, &[1]), (4, &[2]), (5, &[0])];
    assert_matches_finite_differences(&s, &model, &p, &grads, &probes, "grid query");
}

/// Central finite differences of the loss at `probes` (parameter index, element index) against the
/// autograd gradients `grads`, to 1e-4 relative.
fn assert_matches_finite_differences(
    s: &GgdmSampler,
    model: &UNetDenoiser,
    p: &Problem,
    grads: &[Tensor],
    probes: &[(usize, &[i64])],
    what: &str,
) {
    let loss_at = || -> f64 {
        let out = tch::no_grad(|| s.sample(model, &p.x_init, &p.z)).expect("sample");
        loss_and_grad(&out, &p.weights).0
    };
    let h = 1e-6;
    for &(param_index, index) in probes {
        let (name, t) = s.params.named()[param_index];
        let original = t.double_value(index);
        let set = |v: f64| set_entry(t, index, v);
        set(original + h);
        let plus = loss_at();
        set(original - h);
        let minus = loss_at();
        set(original);
        let fd = (plus - minus) / (2.0 * h);
        let analytic = grads[param_index].double_value(index);
        let rel = (fd - analytic).abs() / analytic.abs().max(1e-3);
        assert!(rel <= 1e-4, "{what} {name}{index:?}: autograd {analytic}, finite differences {fd} (rel {rel})");
    }
}

/// The marginal query mode (`Query::Marginal`): rematerialised gradients equal naive autograd, and
/// both equal central finite differences, including through the inverted schedule.
#[test]
fn marginal_query_gradients_equal_naive_and_finite_differences() {
    for prediction_type in [PredictionType::Epsilon, PredictionType::Sample] {
        let model = tiny_model(prediction_type);
        let s = sampler(History::Full).with_query(Query::Marginal);
        let p = problem(&s);
        let (naive, _) = gradients(&s, &model, &p, Remat::Naive);
        let (ours, _) = gradients(&s, &model, &p, Remat::PerCall);
        for ((name, _), (a, b)) in s.params.named().iter().zip(ours.iter().zip(&naive)) {
            let d = rel_diff(a, b);
            assert!(d <= 1e-6, "{prediction_type:?}: {name} differs from naive by {d}");
            assert!(b.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}: zero gradient");
        }
        let probes: [(usize, &[i64]); 5] = [(0, &[1]), (1, &[2, 0]), (2, &[3, 1]), (3, &[1]), (4, &[2])];
        assert_matches_finite_differences(&s, &model, &p, &ours, &probes, &format!("marginal {prediction_type:?}"));
    }
}

/// A network that brings its own [`DifferentiableDenoiser::vjp`] (here the default, autograd through one call),
/// as a CUDA-graphed network does: the unroll keeps the forward pass's outputs and sweeps back
/// through `vjp` instead of recomputing the calls.
struct OwnVjp(UNetDenoiser);

impl Denoiser for OwnVjp {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> ggdm_core::Result<Tensor> {
        self.0.forward(x, tau)
    }
    fn prediction_type(&self) -> PredictionType {
        self.0.prediction_type()
    }
}

impl DifferentiableDenoiser for OwnVjp {
    fn has_vjp(&self) -> bool {
        true
    }
}

#[test]
fn sweep_through_the_network_vjp_equals_naive_autograd() {
    for prediction_type in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
        for query in [Query::Grid, Query::Marginal] {
            let model = OwnVjp(tiny_model(prediction_type));
            let s = sampler(History::Full).with_query(query);
            let p = problem(&s);
            let (naive, naive_x) = gradients(&s, &model.0, &p, Remat::Naive);
            for remat in [Remat::PerCall, Remat::Budget { stored_steps: 2 }, Remat::MemoryBudget { mib: 0 }] {
                let (ours, ours_x) = gradients(&s, &model, &p, remat);
                for ((name, _), (a, b)) in s.params.named().iter().zip(ours.iter().zip(&naive)) {
                    let d = rel_diff(a, b);
                    assert!(d <= 1e-6, "{prediction_type:?} {query:?} {remat:?}: {name} differs from naive by {d}");
                    assert!(b.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}: zero gradient");
                }
                let d = rel_diff(&ours_x, &naive_x);
                assert!(d <= 1e-6, "{prediction_type:?} {query:?} {remat:?}: dL/dx_init differs by {d}");
            }
        }
    }
}

/// A share of the free memory as the budget: all of it stores every call (the tiny network's
/// activations are far below the machine's free memory), none of it stores none, and the budget
/// recorded is that share of what was free; more than 100 percent is an error naming the setting.
#[test]
fn free_memory_budget_is_a_share_of_the_free_memory() {
    let model = tiny_model(PredictionType::Epsilon);
    let s = sampler(History::Full);
    let mut noise = SeededNoise::new(4);
    let (x_init, z) = s.draw_noise(&mut noise, &[4, 1, 32, 32], Device::Cpu).expect("noise");

    let free = ggdm_nets::memory::available_bytes(Device::Cpu).expect("MemAvailable on Linux") as f64;
    let fwd = forward(&s, &model, &x_init, &z, Remat::FreeMemory { percent: 100 }).expect("forward");
    let plan = fwd.memory_plan().expect("plan");
    drop(fwd);
    assert_eq!((plan.stored_steps, plan.steps), (4, 4), "{plan:?}");
    let share = plan.budget_bytes as f64 / free;
    assert!((share - 1.0).abs() < 0.2, "budget {} bytes with {free} bytes free", plan.budget_bytes);

    let fwd = forward(&s, &model, &x_init, &z, Remat::FreeMemory { percent: 0 }).expect("forward");
    assert_eq!(fwd.memory_plan().expect("plan").stored_steps, 0);
    drop(fwd);

    let err = forward(&s, &model, &x_init, &z, Remat::FreeMemory { percent: 101 }).err().expect("over 100 percent");
    let text = err.to_string();
    assert!(text.contains("free_memory") && text.contains("101"), "{text}");
}
