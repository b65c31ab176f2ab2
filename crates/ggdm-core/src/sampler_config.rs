//! The configuration of a GGDM sampler a search starts from: the `[sampler]` table of a DDSS
//! search config (DESIGN.md section 4), with its checks and the sampler it describes.

use crate::ggdm::{GgdmBase, GgdmSampler, History, Learnable, Query};
use crate::grid::Spacing;
use crate::scheduler_config::SchedulerConfig;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

/// `[sampler]`. Unknown keys are errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerSection {
    /// Number of steps K.
    pub steps: usize,
    /// The start solver the search starts from, and whose coefficients at the current grid the
    /// learned residuals are added to: `ddim` (DDIM(eta) on the DDIM grid of `spacing`, the
    /// default), or on the multistep solvers' grid of `spacing` `dpmpp2m` / `dpmpp3m`
    /// (DPM-Solver++(2M) / (3M)) or `unipc` / `unipc3` (UniPC bh2 of order 2 / 3 with the UniC
    /// corrector, as `ddss-cli sample --sampler unipc` runs it); the solvers need `eta = 0` and
    /// `history = "full"`.
    #[serde(default)]
    pub init: GgdmBase,
    /// DDIM eta of the initialisation (and of the `ddim` baseline).
    #[serde(default)]
    pub eta: f64,
    /// Grid the search starts from (also the DDIM/DDPM baselines' grid).
    #[serde(default = "default_spacing")]
    pub spacing: Spacing,
    /// History depth.
    #[serde(default)]
    pub history: History,
    /// `grid` (the model is queried at the grid's times; default) or `marginal` (paper-faithful
    /// GGDM: predictions use the marginal the learned coefficients imply).
    #[serde(default)]
    pub query: Query,
    /// Learnable parts.
    #[serde(default)]
    pub learn: Learnable,
}

fn default_spacing() -> Spacing {
    Spacing::Trailing
}

impl SamplerSection {
    /// Range checks naming the key: at least one step, `eta >= 0`, and an `init` that can hold
    /// `eta` and `history` ([`GgdmBase::check`]). Errors are [`Error::Config`].
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("[sampler] steps = 0: need at least 1"));
        }
        if !(self.eta >= 0.0) {
            return Err(Error::config(format!("[sampler] eta = {}: must be >= 0", self.eta)));
        }
        if self.init.check(self.steps, self.eta, self.history).is_err() {
            return Err(Error::config(format!(
                "[sampler] init = \"{}\" needs eta = 0 and history = \"full\" (got eta = {}, history = {:?})",
                self.init.name(),
                self.eta,
                self.history
            )));
        }
        Ok(())
    }

    /// The sampler the section describes for a model with `scheduler`, on `device`: `init` on
    /// the grid of `spacing` with `steps` steps (the DDIM/DDPM grid for `ddim`, the multistep
    /// solvers' grid otherwise), every residual at 0.
    pub fn init_sampler(&self, scheduler: &SchedulerConfig, device: Device) -> Result<GgdmSampler> {
        let sampler = match self.init {
            GgdmBase::Ddim => GgdmSampler::init_from_spacing(
                scheduler,
                self.steps,
                self.spacing,
                self.eta,
                self.history,
                self.learn,
                device,
            )?,
            solver => GgdmSampler::init_from_solver_spacing(
                solver,
                scheduler,
                self.steps,
                self.spacing,
                self.history,
                self.learn,
                device,
            )?,
        };
        Ok(sampler.with_query(self.query))
    }
}

#[cfg(test)]
mod tests {
    use super::SamplerSection;
    use crate::ggdm::{GgdmBase, History};
    use crate::grid::Spacing;

    fn section(json: &str) -> Result<SamplerSection, String> {
        serde_json::from_str::<SamplerSection>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let s = section(r#"{ "steps": 10 }"#).expect("valid");
        assert_eq!((s.init, s.eta, s.spacing, s.history), (GgdmBase::Ddim, 0.0, Spacing::Trailing, History::Full));
        s.validate().expect("valid");
        let err = section(r#"{ "steps": 10, "stpes": 4 }"#).expect_err("unknown key");
        assert!(err.contains("stpes"), "{err}");
    }

    #[test]
    fn checks_name_the_key_and_value() {
        let err = |json: &str| section(json).expect("parses").validate().expect_err("invalid").to_string();
        assert_eq!(err(r#"{ "steps": 0 }"#), "[sampler] steps = 0: need at least 1");
        assert_eq!(err(r#"{ "steps": 4, "eta": -0.5 }"#), "[sampler] eta = -0.5: must be >= 0");
        assert_eq!(
            err(r#"{ "steps": 4, "init": "dpmpp2m", "eta": 0.5 }"#),
            "[sampler] init = \"dpmpp2m\" needs eta = 0 and history = \"full\" (got eta = 0.5, history = Full)"
        );
        assert!(err(r#"{ "steps": 4, "init": "unipc", "history": "last" }"#).contains("history = Last"));
        section(r#"{ "steps": 4, "eta": 0.5, "history": "last" }"#).expect("parses").validate().expect("ddim");
    }
}
