//! The differentiable unroll of a GGDM sampler (DESIGN.md section 4, "Rematerialisation"):
//! sample a batch, get the loss gradient at the output, and push it back through every step into
//! the sampler's parameters.
//!
//! The strategy is one type, [`Remat`], chosen in one place:
//! * [`Remat::Naive`]: autograd through the whole chain (every network call's activations are kept);
//! * [`Remat::PerCall`]: the forward pass runs without autograd and keeps only each step's input
//!   `x_i` and prediction `x0_hat_i`; the reverse sweep recomputes one network call at a time
//!   (memory: K state batches + one call's activations, flat in K);
//! * [`Remat::Budget`]: the first `stored_steps` network calls are kept from the forward pass (no
//!   recompute), the rest are recomputed — the memory-budget middle ground;
//! * [`Remat::MemoryBudget`]: the same, with the number of stored calls chosen from a byte budget.
//!   Each forward pass measures the memory the first call keeps ([`ggdm_nets::memory::live_bytes`]
//!   before and after it) and stores as many calls as fit (`floor(budget / per_call)`, at most
//!   K); [`Forward::memory_plan`] reports the choice;
//! * [`Remat::FreeMemory`]: the same, with the budget a share of the memory free at the start of
//!   each forward pass.
//!
//! How the budget strategies keep a call: a network that records tapes
//! ([`DifferentiableDenoiser::forward_taped`]; the UNet does) runs it without autograd and keeps
//! its tape, about a quarter of the memory of autograd's graph of the call (the cifar10 UNet at
//! batch 4: 53 MiB against 178 MiB), and the sweep hands the output's cotangent to
//! [`DifferentiableDenoiser::backward_taped`], which redoes the norms and activations but no
//! convolution. Their recomputed calls go through a tape too, so the memory a recomputed call
//! needs at the peak shrinks the same way. Other networks keep autograd's graph.
//! [`Remat::PerCall`] recomputes under autograd: on the CPU that is the faster way to recompute a
//! call (the tape's backward pass redoes the norms).
//!
//! A network with its own [`DifferentiableDenoiser::vjp`] (a CUDA-graphed one) changes how a
//! recomputed step is swept: the forward pass also keeps each call's output, and the sweep
//! differentiates the post-processing `x0_hat(x_i, output)` with that output as a leaf, then hands
//! the output's cotangent to `vjp` (one replayed forward + backward of the call) and pushes the
//! input cotangents into `x_i` and the timestep. The gradient is the same.
//!
//! Each forward pass resolves its strategy into what it keeps (a `Keeping`: how many calls are
//! stored, how the sweep recovers the others, whether outputs are kept for `vjp`), and every step
//! leaves one `Kept` value (nothing, its output, its graph or its tape) that the forward pass makes
//! and the reverse sweep consumes.
//!
//! The reverse sweep, for `i = K..1`: the cotangent of `x_{i+1}` flows through the linear
//! combination into every earlier `x_j`, `x0_hat_j` and into `u, w, sigma`; once all uses of
//! `x0_hat_i` are accounted for, `model(x_i, tau_i)` is evaluated with autograd (recomputed or
//! stored) and its cotangent pushed to `x_i`, `tau_i`, `p_i`, `q_i`. The coefficients are computed
//! once from the parameters; the sweep differentiates with respect to detached copies of them,
//! and a final backward pass carries those gradients into the parameters (tch has no
//! `grad_outputs`: we back-propagate `sum(y * g.detach())`).

use crate::Result;
use ggdm_core::ggdm::{Coefficients, GgdmSampler};
use ggdm_nets::{CallTape, DifferentiableDenoiser};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How activations of the network calls are kept for the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Remat {
    /// Autograd through everything.
    Naive,
    /// Keep only each call's input; recompute in the reverse sweep (default).
    #[default]
    PerCall,
    /// Keep the first `stored_steps` calls (on the network's tapes when it records them),
    /// recompute the rest (on tapes too).
    Budget {
        /// Network calls whose activations are stored.
        stored_steps: usize,
    },
    /// Keep as many calls as fit in `mib` MiB (on top of what `Budget { stored_steps: 0 }` needs:
    /// per-call rematerialisation on tapes), recompute the rest. The memory one call keeps is
    /// measured on the first call of every forward pass: exactly on a CUDA device (the caching
    /// allocator's counters), from the C heap's in-use bytes on the CPU ([`ggdm_nets::memory::live_bytes`]).
    MemoryBudget {
        /// The memory for stored activations, in MiB.
        mib: u64,
    },
    /// [`Self::MemoryBudget`] with the budget a share of the memory the device has free when each
    /// forward pass starts ([`ggdm_nets::memory::available_bytes`]: free device memory plus the
    /// caching allocator's unused cache on CUDA, `MemAvailable` or the cgroup limit's room on the
    /// CPU). The rest of the free memory is left for the loss and the reverse sweep; 50 is a safe
    /// start.
    FreeMemory {
        /// The share of the free memory for stored activations, in percent (0 to 100).
        percent: u32,
    },
}

/// What a [`Remat::MemoryBudget`] or [`Remat::FreeMemory`] forward pass chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The budget, in bytes.
    pub budget_bytes: u64,
    /// The measured memory of one network call's stored activations, in bytes.
    pub call_bytes: u64,
    /// Network calls stored (the rest are recomputed).
    pub stored_steps: usize,
    /// Network calls in the unroll (K).
    pub steps: usize,
}

impl MemoryPlan {
    /// Whether this is another choice than `previous`: another number of stored calls, or a budget
    /// more than a tenth away (a share of the free memory moves a little from pass to pass).
    pub fn differs_from(&self, previous: &MemoryPlan) -> bool {
        (previous.stored_steps, previous.steps) != (self.stored_steps, self.steps)
            || previous.budget_bytes.abs_diff(self.budget_bytes) > previous.budget_bytes.max(self.budget_bytes) / 10
    }

    /// Logs the plan when there is no `last` one or it [differs](Self::differs_from) from it, and
    /// makes it the `last`: a run logs its plan once, and again when the choice changes.
    pub fn log_if_changed(self, last: &mut Option<MemoryPlan>) {
        if last.is_none_or(|p| self.differs_from(&p)) {
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            let choice = match (self.stored_steps, self.steps) {
                (0, k) => format!("storing none of {k} calls, recomputing each"),
                (s, k) if s == k => format!("storing all {k} calls, recomputing none"),
                (s, k) => format!("storing {s} of {k} calls, recomputing the rest"),
            };
            tracing::info!(
                "memory budget {:.0} MiB: one network call keeps {:.1} MiB of activations; {choice}",
                mib(self.budget_bytes),
                mib(self.call_bytes),
            );
        }
        *last = Some(self);
    }
}

/// Memory live on `device`, or an error naming the budget that needs it.
fn measure_live(device: tch::Device) -> Result<u64> {
    ggdm_nets::memory::live_bytes(device).ok_or_else(|| {
        crate::Error::config(
            "remat",
            format!(
                "memory_budget needs the memory statistics of {device:?}, which cannot be read here; \
                 give the number of stored calls instead: {{ budget = {{ stored_steps = N }} }}"
            ),
        )
    })
}

/// `percent` of the memory `device` has free now, in bytes, or an error naming the setting.
fn free_memory_budget(device: tch::Device, percent: u32) -> Result<u64> {
    if percent > 100 {
        return Err(crate::Error::config("remat", format!("free_memory percent = {percent}: expected 0 to 100")));
    }
    let available = ggdm_nets::memory::available_bytes(device).ok_or_else(|| {
        crate::Error::config(
            "remat",
            format!(
                "free_memory needs the free memory of {device:?}, which cannot be read here; give a \
                 budget instead: {{ memory_budget = {{ mib = M }} }}"
            ),
        )
    })?;
    Ok(u64::try_from(u128::from(available) * u128::from(percent) / 100).unwrap_or(u64::MAX))
}

/// What a sampler run returns before the loss: the output and the state needed for the sweep.
pub struct Forward {
    /// `x_{K+1}`, detached.
    pub output: Tensor,
    plan: Option<MemoryPlan>,
    inner: ForwardInner,
}

impl Forward {
    /// What a [`Remat::MemoryBudget`] or [`Remat::FreeMemory`] pass chose (`None` for the other
    /// strategies).
    pub fn memory_plan(&self) -> Option<MemoryPlan> {
        self.plan
    }
}

enum ForwardInner {
    Naive { output_with_graph: Tensor, x_init: Tensor },
    Swept(Box<SweepState>),
}

struct SweepState {
    coeffs: Coefficients,
    leaves: Coefficients,
    states: Vec<Tensor>,
    x0_hats: Vec<Tensor>,
    /// What the forward pass kept of each step's network call.
    kept: Vec<Kept>,
    /// How the sweep recovers a call of which nothing was kept.
    recompute: Recompute,
    z: Vec<Tensor>,
}

/// How the reverse sweep recomputes a network call the forward pass kept nothing of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recompute {
    /// Under autograd ([`Remat::PerCall`]; on the CPU the faster way).
    Autograd,
    /// On the network's tape, a fraction of autograd's memory, or under autograd when the network
    /// records no tapes (the budget strategies).
    Tape,
}

/// What the forward pass keeps of one step's network call for the reverse sweep (besides the
/// step input `x_i` and prediction `x0_hat_i`, which it always keeps).
enum Kept {
    /// Nothing: the sweep recomputes the call ([`Recompute`]).
    Nothing,
    /// The call's output, for a network with its own [`DifferentiableDenoiser::vjp`]: the sweep
    /// differentiates the post-processing again and hands the output's cotangent to `vjp`.
    Output(Tensor),
    /// Autograd's graph from the step input `x_i` (a leaf) to `x0_hat_i`.
    Graph { x_leaf: Tensor, x0_hat: Tensor },
    /// The network's own record of the call ([`DifferentiableDenoiser::forward_taped`], far
    /// smaller than the graph) and its output; the sweep differentiates the post-processing again
    /// and hands the output's cotangent to [`DifferentiableDenoiser::backward_taped`].
    Tape { output: Tensor, tape: CallTape },
}

/// How a forward pass keeps the network calls: [`Remat`] (other than [`Remat::Naive`]) resolved
/// for one pass.
struct Keeping {
    /// The first `stored` calls are stored ([`Kept::Tape`], or [`Kept::Graph`] for a network that
    /// records no tapes); a budget pass stores all K until it has measured its first call.
    stored: usize,
    /// The byte budget that the first call's measured memory divides (the memory-budget
    /// strategies).
    budget: Option<u64>,
    /// How the sweep recovers a call that is not stored.
    recompute: Recompute,
    /// Whether a call that is not stored keeps its output ([`Kept::Output`]: a network with its
    /// own [`DifferentiableDenoiser::vjp`]).
    keep_outputs: bool,
}

impl Keeping {
    /// What `remat` keeps of the `steps` calls of a pass on `device`; `None` for [`Remat::Naive`].
    fn of(remat: Remat, steps: usize, device: tch::Device, keep_outputs: bool) -> Result<Option<Self>> {
        let (stored, budget, recompute) = match remat {
            Remat::Naive => return Ok(None),
            Remat::PerCall => (0, None, Recompute::Autograd),
            Remat::Budget { stored_steps } => (stored_steps.min(steps), None, Recompute::Tape),
            Remat::MemoryBudget { mib } => (steps, Some(mib.saturating_mul(1 << 20)), Recompute::Tape),
            Remat::FreeMemory { percent } => (steps, Some(free_memory_budget(device, percent)?), Recompute::Tape),
        };
        Ok(Some(Self { stored, budget, recompute, keep_outputs }))
    }

    /// Runs step `i`'s network call in the forward pass: `x0_hat_i` (detached), what is kept of
    /// the call, and the plan when this call was measured (the first call of a budget pass, which
    /// sets how many calls are stored).
    fn call<D: DifferentiableDenoiser + ?Sized>(
        &mut self,
        cx: &StepContext<D>,
        i: usize,
        x_i: &Tensor,
    ) -> Result<(Tensor, Kept, Option<MemoryPlan>)> {
        if i >= self.stored {
            let (x0_hat, output) =
                tch::no_grad(|| cx.sampler.predict_x0_and_output(cx.model, cx.leaves, i, x_i, cx.kind))?;
            return Ok((x0_hat, self.unstored(output), None));
        }
        let measuring = self.budget.filter(|_| i == 0);
        let before = measuring.map(|_| measure_live(x_i.device())).transpose()?;
        let (x0_hat, output, kept) = cx.stored_call(i, x_i)?;
        let mut plan = None;
        if let (Some(budget), Some(before)) = (measuring, before) {
            // At least a page, so that a measurement lost in the noise cannot divide by zero.
            let call_bytes = measure_live(x_i.device())?.saturating_sub(before).max(4096);
            let steps = cx.sampler.steps;
            self.stored = usize::try_from(budget / call_bytes).unwrap_or(usize::MAX).min(steps);
            plan = Some(MemoryPlan { budget_bytes: budget, call_bytes, stored_steps: self.stored, steps });
        }
        if i < self.stored {
            return Ok((x0_hat, kept, plan));
        }
        // The measured call does not fit the budget: its graph or tape is dropped, and the sweep
        // treats it like any other call that is not stored.
        drop(kept);
        Ok((x0_hat, self.unstored(output.detach()), plan))
    }

    /// What is kept of a call that is not stored, whose output is `output`.
    fn unstored(&self, output: Tensor) -> Kept {
        if self.keep_outputs {
            Kept::Output(output)
        } else {
            Kept::Nothing
        }
    }
}

impl Kept {
    /// Pushes `grad_x0`, the cotangent of `x0_hat_i`, through step `i`'s network call into the
    /// step input `x_i` and the coefficient leaves: from what was kept, or by recomputing the call
    /// as `recompute` says. Returns the leaf made of `x_i`, which holds its cotangent.
    fn recover<D: DifferentiableDenoiser + ?Sized>(
        self,
        cx: &StepContext<D>,
        recompute: Recompute,
        i: usize,
        x_i: &Tensor,
        grad_x0: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Kept::Graph { x_leaf, x0_hat } => {
                if grad_x0.defined() {
                    vjp_scalar(&x0_hat, grad_x0).backward();
                }
                Ok(x_leaf)
            }
            Kept::Tape { output, tape } => {
                cx.through_output(i, x_i, &output, grad_x0, |_, _, g| Ok(cx.model.backward_taped(tape, g)?))
            }
            Kept::Output(output) => cx.through_output(i, x_i, &output, grad_x0, |x, t, g| Ok(cx.model.vjp(x, t, g)?)),
            Kept::Nothing => recompute.recover(cx, i, x_i, grad_x0),
        }
    }
}

impl Recompute {
    /// [`Kept::recover`] for a call the forward pass kept nothing of: recomputes step `i`'s
    /// network call (on a tape, or under autograd) and pushes `grad_x0` through it.
    fn recover<D: DifferentiableDenoiser + ?Sized>(
        self,
        cx: &StepContext<D>,
        i: usize,
        x_i: &Tensor,
        grad_x0: &Tensor,
    ) -> Result<Tensor> {
        if self == Recompute::Tape && grad_x0.defined() {
            if let Some((_, output, tape)) = cx.taped_call(i, x_i)? {
                return cx.through_output(i, x_i, &output, grad_x0, |_, _, g| Ok(cx.model.backward_taped(tape, g)?));
            }
        }
        cx.recompute_under_autograd(i, x_i, grad_x0)
    }
}

/// What a step's network call needs besides the step: the sampler, the model, the coefficient
/// leaves and the kind of the states.
struct StepContext<'a, D: ?Sized> {
    sampler: &'a GgdmSampler,
    model: &'a D,
    leaves: &'a Coefficients,
    kind: Kind,
}

impl<D: DifferentiableDenoiser + ?Sized> StepContext<'_, D> {
    /// Step `i`'s network call recorded on a tape, without autograd: `(x0_hat_i, output, tape)`,
    /// or `None` when the network records no tapes.
    fn taped_call(&self, i: usize, x_i: &Tensor) -> Result<Option<(Tensor, Tensor, CallTape)>> {
        let Self { sampler, model, leaves, kind } = *self;
        tch::no_grad(|| {
            let (x_net, tau_net) = sampler.network_input(leaves, i, x_i, kind);
            let Some((output, tape)) = model.forward_taped(&x_net, &tau_net)? else {
                return Ok(None);
            };
            ggdm_core::denoiser::check_output(&x_net, &output)?;
            let x0_hat = sampler.x0_from_output(leaves, i, x_i, &x_net, &output, model.prediction_type(), kind);
            Ok(Some((x0_hat, output, tape)))
        })
    }

    /// Step `i`'s network call stored for the sweep: on the network's tape when it records one,
    /// else with autograd's graph. Returns `(x0_hat_i (detached), output, kept)`.
    fn stored_call(&self, i: usize, x_i: &Tensor) -> Result<(Tensor, Tensor, Kept)> {
        Ok(match self.taped_call(i, x_i)? {
            Some((x0_hat, output, tape)) => (x0_hat, output.shallow_clone(), Kept::Tape { output, tape }),
            None => {
                let x_leaf = x_i.detach().set_requires_grad(true);
                let (x0_hat, output) =
                    self.sampler.predict_x0_and_output(self.model, self.leaves, i, &x_leaf, self.kind)?;
                (x0_hat.detach(), output, Kept::Graph { x_leaf, x0_hat })
            }
        })
    }

    /// Recomputes step `i`'s network call under autograd from the leaf made of `x_i` and pushes
    /// `grad_x0` through it; returns the leaf.
    fn recompute_under_autograd(&self, i: usize, x_i: &Tensor, grad_x0: &Tensor) -> Result<Tensor> {
        let x_in = x_i.detach().set_requires_grad(true);
        if grad_x0.defined() {
            let x0_hat = self.sampler.predict_x0(self.model, self.leaves, i, &x_in, self.kind)?;
            vjp_scalar(&x0_hat, grad_x0).backward();
        }
        Ok(x_in)
    }

    /// The network step of the reverse sweep through the network's own backward step: the
    /// post-processing `x0_hat_i(x_i, output)` is differentiated with the forward pass's `output`
    /// as a leaf, the output's cotangent goes through `network_vjp`, and the input cotangents are
    /// pushed into `x_i` and the coefficient leaves. The same gradient as recomputing the call
    /// under autograd.
    ///
    /// `network_vjp(x_net, tau_net, grad_output)` is the network's backward step:
    /// [`DifferentiableDenoiser::vjp`] (a replayed CUDA graph for
    /// [`ggdm_nets::cuda_graph::GraphedDenoiser`]), or [`DifferentiableDenoiser::backward_taped`]
    /// for a call kept on a tape. Returns the leaf made of the step input `x_i`, which holds its
    /// cotangent.
    fn through_output(
        &self,
        i: usize,
        x_i: &Tensor,
        output: &Tensor,
        grad_x0: &Tensor,
        network_vjp: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let Self { sampler, model, leaves, kind } = *self;
        let leaf = x_i.detach().set_requires_grad(true);
        if !grad_x0.defined() {
            return Ok(leaf);
        }
        let x_in = &leaf;
        let (x_net, tau_net) = sampler.network_input(leaves, i, x_in, kind);
        // The post-processing sees the network input as a leaf too, so that the graph from `x_i` to
        // `x_net` is walked once, with both of its cotangents.
        let x_net_leaf = x_net.detach().set_requires_grad(true);
        let output = output.detach().set_requires_grad(true);
        let x0_hat = sampler.x0_from_output(leaves, i, x_in, &x_net_leaf, &output, model.prediction_type(), kind);
        vjp_scalar(&x0_hat, grad_x0).backward();
        drop(x0_hat);
        let grad_out = output.grad();
        let mut grad_x_net = x_net_leaf.grad();
        let mut terms = Vec::with_capacity(2);
        if grad_out.defined() {
            let (through_net, grad_tau) = network_vjp(&x_net.detach(), &tau_net.detach(), &grad_out)?;
            grad_x_net = if grad_x_net.defined() { grad_x_net + through_net } else { through_net };
            if tau_net.requires_grad() {
                terms.push(vjp_scalar(&tau_net, &grad_tau));
            }
        }
        if grad_x_net.defined() && x_net.requires_grad() {
            terms.push(vjp_scalar(&x_net, &grad_x_net));
        }
        if !terms.is_empty() {
            Tensor::stack(&terms, 0).sum(Kind::Double).backward();
        }
        Ok(leaf)
    }
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

/// `sum(y * g)` over all elements, in f64 (the scalar whose gradient is the VJP with `g`).
fn vjp_scalar(y: &Tensor, g: &Tensor) -> Tensor {
    (y * g.detach()).sum(Kind::Double)
}

/// Runs the sampler from `x_init` with step noise `z`, keeping what `remat` needs for
/// [`backward`].
pub fn forward<D: DifferentiableDenoiser + ?Sized>(
    sampler: &GgdmSampler,
    model: &D,
    x_init: &Tensor,
    z: &[Tensor],
    remat: Remat,
) -> Result<Forward> {
    let k = sampler.steps;
    if remat != Remat::Naive && z.len() != k {
        return Err(crate::Error::config("noise", format!("{} step-noise tensors for K = {k}", z.len())));
    }
    let Some(mut keeping) = Keeping::of(remat, k, x_init.device(), model.has_vjp())? else {
        return naive_forward(sampler, model, x_init, z);
    };
    let coeffs = sampler.coefficients();
    let leaves = coeffs.map(leaf);
    let kind = x_init.kind();
    let cx = StepContext { sampler, model, leaves: &leaves, kind };
    let mut states = vec![x_init.detach()];
    let mut x0_hats = Vec::with_capacity(k);
    let mut kept = Vec::with_capacity(k);
    let mut plan = None;
    for i in 0..k {
        let (x0_hat, kept_i, measured) = keeping.call(&cx, i, &states[i])?;
        plan = plan.or(measured);
        x0_hats.push(x0_hat);
        kept.push(kept_i);
        let next = tch::no_grad(|| sampler.combine(&leaves, i, &states, &x0_hats, &z[i], kind));
        states.push(next);
    }
    let output = states[k].shallow_clone();
    let z = z.iter().map(|t| t.shallow_clone()).collect();
    let recompute = keeping.recompute;
    Ok(Forward {
        output,
        plan,
        inner: ForwardInner::Swept(Box::new(SweepState { coeffs, leaves, states, x0_hats, kept, recompute, z })),
    })
}

/// [`forward`] with [`Remat::Naive`]: the sampler under autograd.
fn naive_forward<D: DifferentiableDenoiser + ?Sized>(
    sampler: &GgdmSampler,
    model: &D,
    x_init: &Tensor,
    z: &[Tensor],
) -> Result<Forward> {
    let x_init = x_init.detach().set_requires_grad(true);
    let output_with_graph = sampler.sample(model, &x_init, z)?;
    Ok(Forward {
        output: output_with_graph.detach(),
        plan: None,
        inner: ForwardInner::Naive { output_with_graph, x_init },
    })
}

/// Back-propagates `grad_output = dL/dx_out` through the sampler into its parameters
/// (accumulating into their `.grad()`), recomputing network calls as the strategy says.
/// Returns `dL/dx_init`.
pub fn backward<D: DifferentiableDenoiser + ?Sized>(
    sampler: &GgdmSampler,
    model: &D,
    forward: Forward,
    grad_output: &Tensor,
) -> Result<Tensor> {
    match forward.inner {
        ForwardInner::Naive { output_with_graph, x_init } => {
            vjp_scalar(&output_with_graph, grad_output).backward();
            Ok(x_init.grad().detach())
        }
        ForwardInner::Swept(state) => state.sweep(sampler, model, grad_output),
    }
}

impl SweepState {
    /// The reverse sweep of a swept forward pass (see the module documentation).
    fn sweep<D: DifferentiableDenoiser + ?Sized>(
        self,
        sampler: &GgdmSampler,
        model: &D,
        grad_output: &Tensor,
    ) -> Result<Tensor> {
        let SweepState { coeffs, leaves, states, x0_hats, kept, recompute, z } = self;
        let k = sampler.steps;
        let kind = states[0].kind();
        let cx = StepContext { sampler, model, leaves: &leaves, kind };
        let state_leaves: Vec<Tensor> = states[..k].iter().map(|s| s.detach().set_requires_grad(true)).collect();
        let x0_leaves: Vec<Tensor> = x0_hats.iter().map(|s| s.detach().set_requires_grad(true)).collect();
        let mut grad_next = grad_output.detach();
        // Each step's kept call is dropped once the sweep has passed it.
        for (i, kept_i) in kept.into_iter().enumerate().rev() {
            // x_{i+1} = sum_j u_ij x_j + w_ij x0_hat_j + sigma_i z_i
            let next = sampler.combine(&leaves, i, &state_leaves, &x0_leaves, &z[i], kind);
            vjp_scalar(&next, &grad_next).backward();
            // Every use of x0_hat_i is now accounted for: push its cotangent through the network.
            let x_in = kept_i.recover(&cx, recompute, i, &states[i], &x0_leaves[i].grad())?;
            let mut total = state_leaves[i].grad().detach().copy();
            let through_model = x_in.grad();
            if through_model.defined() {
                total += through_model;
            }
            grad_next = total;
        }
        // Carry the coefficient gradients into the sampler parameters.
        let mut terms = Vec::new();
        for ((_, graph), (_, leaf)) in coeffs.named().into_iter().zip(leaves.named()) {
            let g = leaf.grad();
            if g.defined() && graph.requires_grad() {
                terms.push(vjp_scalar(graph, &g));
            }
        }
        if !terms.is_empty() {
            Tensor::stack(&terms, 0).sum(Kind::Double).backward();
        }
        Ok(grad_next)
    }
}
