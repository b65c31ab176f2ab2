//! Adam with decoupled state, gradient-norm clipping and learning-rate schedules (DESIGN.md
//! section 4, "Adam, gradient-norm clipping, learning-rate schedule").
//!
//! The optimiser state (`m`, `v`, step count) is plain tensors that can be saved and restored
//! exactly, so a resumed run continues bit for bit where it stopped; tch's built-in optimisers
//! cannot export their state.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Adam hyper-parameters (defaults: Kingma & Ba).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamConfig {
    /// First-moment decay (default 0.9).
    pub beta1: f64,
    /// Second-moment decay (default 0.999).
    pub beta2: f64,
    /// Denominator epsilon (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay (AdamW; default 0).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamConfig {
    /// Range checks naming the key.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(Error::config(name, format!("{value} (must be in [0, 1))")));
            }
        }
        if !(self.eps > 0.0) {
            return Err(Error::config("eps", format!("{} (must be > 0)", self.eps)));
        }
        if !(self.weight_decay >= 0.0) {
            return Err(Error::config("weight_decay", format!("{} (must be >= 0)", self.weight_decay)));
        }
        Ok(())
    }
}

/// Adam over a fixed list of parameter tensors.
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    step: u64,
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
}

impl Adam {
    /// Zero state for `params`.
    pub fn new(params: &[Tensor], config: AdamConfig) -> Self {
        let zeros = |p: &Tensor| p.detach().zeros_like();
        Self {
            config,
            step: 0,
            first_moment: params.iter().map(zeros).collect(),
            second_moment: params.iter().map(zeros).collect(),
        }
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` from the gradients currently in `params`
    /// (parameters without a gradient are skipped).
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
        self.step_scaled(params, lr, &vec![1.0; params.len()]);
    }

    /// [`Self::step`] with a learning-rate multiplier per parameter.
    pub fn step_scaled(&mut self, params: &[Tensor], lr: f64, lr_scales: &[f64]) {
        self.step += 1;
        let AdamConfig { beta1, beta2, eps, weight_decay } = self.config;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2 = 1.0 - beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for (((param, m), v), scale) in
                params.iter().zip(&mut self.first_moment).zip(&mut self.second_moment).zip(lr_scales)
            {
                let lr = lr * scale;
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let _ = m.g_mul_scalar_(beta1);
                let _ = m.g_add_(&(&grad * (1.0 - beta1)));
                let _ = v.g_mul_scalar_(beta2);
                let _ = v.g_add_(&(grad.square() * (1.0 - beta2)));
                let denom = (&*v / bias2).sqrt() + eps;
                let update = &*m / denom * (lr / bias1);
                let mut p = param.shallow_clone();
                if weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let _ = p.g_sub_(&update);
            }
        });
    }

    /// The state as named tensors (`adam.m.<i>`, `adam.v.<i>`, `adam.step`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("adam.step".to_string(), Tensor::from_slice(&[self.step as i64]))];
        for (i, (m, v)) in self.first_moment.iter().zip(&self.second_moment).enumerate() {
            out.push((format!("adam.m.{i}"), m.shallow_clone()));
            out.push((format!("adam.v.{i}"), v.shallow_clone()));
        }
        out
    }

    /// Restores a state written by [`Self::state`]; shapes must match the parameters.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let find = |name: &str| {
            named
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::config("optimizer state", format!("missing `{name}`")))
        };
        let step_tensor = find("adam.step")?;
        let step = step_tensor.f_reshape([-1]).and_then(|t| t.f_int64_value(&[0])).map_err(|_| {
            Error::config(
                "optimizer state",
                format!("`adam.step` must hold one number, found shape {:?}", step_tensor.size()),
            )
        })?;
        if step < 0 {
            return Err(Error::config("optimizer state", format!("negative step {step}")));
        }
        for i in 0..self.first_moment.len() {
            for (slot, prefix) in [(&mut self.first_moment[i], "m"), (&mut self.second_moment[i], "v")] {
                let name = format!("adam.{prefix}.{i}");
                let saved = find(&name)?;
                if saved.size() != slot.size() {
                    return Err(Error::Shape { what: name, expected: format!("{:?}", slot.size()), got: saved.size() });
                }
                tch::no_grad(|| slot.f_copy_(saved))?;
            }
        }
        self.step = step as u64;
        Ok(())
    }
}

/// Scales gradients so their joint L2 norm is at most `max_norm`; returns the norm before
/// clipping (non-finite if any gradient is).
pub fn clip_grad_norm(params: &[Tensor], max_norm: Option<f64>) -> f64 {
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
    if grads.is_empty() {
        return 0.0;
    }
    let total = tch::no_grad(|| {
        let squares: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Double).square().sum(Kind::Double)).collect();
        Tensor::stack(&squares, 0).sum(Kind::Double).sqrt().double_value(&[])
    });
    if let Some(max_norm) = max_norm {
        if total.is_finite() && total > max_norm {
            let scale = max_norm / (total + 1e-12);
            tch::no_grad(|| {
                for g in &grads {
                    let mut g = g.shallow_clone();
                    let _ = g.g_mul_scalar_(scale);
                }
            });
        }
    }
    total
}

/// Learning-rate schedule: linear warm-up, then constant or cosine decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up from 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// `"constant"` or `"cosine"` (to `min_lr_ratio * lr` at `total_steps`).
    #[serde(default = "default_decay")]
    pub decay: String,
    /// Floor of the cosine decay as a fraction of `lr` (default 0).
    #[serde(default)]
    pub min_lr_ratio: f64,
}

fn default_decay() -> String {
    "constant".into()
}

impl LrSchedule {
    /// Range checks.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0) || !self.lr.is_finite() {
            return Err(Error::config("lr", format!("{} (must be > 0)", self.lr)));
        }
        if self.decay != "constant" && self.decay != "cosine" {
            return Err(Error::config("decay", format!("`{}` (expected constant or cosine)", self.decay)));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::config("min_lr_ratio", format!("{} (must be in [0, 1])", self.min_lr_ratio)));
        }
        Ok(())
    }

    /// The learning rate for 0-based `step` of `total_steps`.
    pub fn at(&self, step: u64, total_steps: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay.as_str() {
            "cosine" => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let floor = self.min_lr_ratio * self.lr;
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            _ => self.lr,
        }
    }
}
