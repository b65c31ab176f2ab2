//! The many-step reference line of the comparisons (a search's `[eval] many_step`, `ddss-cli
//! table --many-step`): the model's own quality under a deterministic solver run for many steps,
//! on the same evaluation noise as the samplers it is compared with. A table then shows how much
//! of the gap between the best few-step baseline and the model's many-step quality a learned
//! sampler closes (or whether it goes past it, which only a sample-quality loss can).
//!
//! The samples come from the teacher pair cache ([`crate::search_cmd::cached_solver_samples`],
//! keyed by the model's files, the solver, the evaluation seed and the number of samples), so
//! after the first run the line costs only the feature passes.

use crate::metrics_cmd::EvalOptions;
use crate::search_cmd::ResultRow;
use anyhow::{bail, Context, Result};
use fid_metrics::data::quantize_to_uint8_levels;
use fid_metrics::FeatureExtractor;
use ggdm_nets::model_dir::{LoadedModel, NetworkPrecision};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The solver and step count of the reference line: `many_step = { sampler = "unipc", steps =
/// 100 }` in `[eval]`, `--many-step unipc:100` on the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManyStep {
    /// A deterministic `ddss-cli sample --sampler` name (default `unipc`; not `ddpm`).
    #[serde(default = "default_sampler")]
    pub sampler: String,
    /// Its steps (default 100; 0 leaves the line out).
    #[serde(default = "default_steps")]
    pub steps: usize,
}

fn default_sampler() -> String {
    "unipc".into()
}
fn default_steps() -> usize {
    100
}

impl Default for ManyStep {
    fn default() -> Self {
        Self { sampler: default_sampler(), steps: default_steps() }
    }
}

impl ManyStep {
    /// `SAMPLER:STEPS` (e.g. `unipc:100`), or `none`.
    pub fn parse(text: &str) -> Result<Self> {
        if text == "none" {
            return Ok(Self { steps: 0, ..Self::default() });
        }
        let (sampler, steps) = text
            .split_once(':')
            .with_context(|| format!("`{text}`: expected SAMPLER:STEPS (e.g. unipc:100) or none"))?;
        let steps = steps.parse().with_context(|| format!("`{text}`: `{steps}` is not a step count"))?;
        Ok(Self { sampler: sampler.to_string(), steps })
    }

    /// Whether the line is drawn (`steps > 0`).
    pub fn enabled(&self) -> bool {
        self.steps > 0
    }

    /// The reference rows (one per feature network, `reference: true`) of the samples of
    /// `options.seed`, `0 .. options.num`, against `references` (the real features of each of
    /// `extractors`).
    pub fn rows(
        &self,
        model: &LoadedModel,
        options: &EvalOptions,
        precision: NetworkPrecision,
        extractors: &[(&dyn FeatureExtractor, &Tensor, bool)],
        quiet: bool,
    ) -> Result<Vec<ResultRow>> {
        if self.sampler == "ddpm" {
            bail!("many-step reference `ddpm`: the reference line needs a deterministic solver (e.g. unipc)");
        }
        let samples = crate::search_cmd::cached_solver_samples(
            &self.sampler,
            self.steps,
            model,
            options.seed,
            options.num,
            options.batch,
            precision,
            options.device,
            quiet,
        )
        .with_context(|| format!("the many-step reference line ({} at {} steps)", self.sampler, self.steps))?;
        let mut rows = Vec::new();
        for (extractor, reference, held_out) in extractors {
            let features = features_of(&samples, *extractor, options)?;
            let row = ResultRow::score(&self.sampler, self.steps, extractor.name(), *held_out, &features, reference)?;
            rows.push(ResultRow { reference: true, ..row });
        }
        Ok(rows)
    }
}

/// The features of `samples` (on the CPU), rounded to 8-bit levels as the evaluation rounds its
/// samples, in batches of `options.batch` on `options.device`.
fn features_of(samples: &Tensor, extractor: &dyn FeatureExtractor, options: &EvalOptions) -> Result<Tensor> {
    let n = samples.size()[0];
    let mut chunks = Vec::new();
    for start in (0..n).step_by(options.batch.max(1)) {
        let len = (options.batch as i64).min(n - start);
        let batch = samples.f_narrow(0, start, len)?.f_to_device(options.device)?;
        let batch = if options.quantize { quantize_to_uint8_levels(&batch)? } else { batch };
        let features = tch::no_grad(|| extractor.features(&batch))?;
        chunks.push(features.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?);
    }
    Ok(Tensor::f_cat(&chunks, 0)?)
}

#[cfg(test)]
mod tests {
    use super::ManyStep;

    #[test]
    fn many_step_specs_parse_and_bad_ones_are_named() {
        assert_eq!(ManyStep::parse("unipc:100").unwrap(), ManyStep::default());
        assert_eq!(ManyStep::parse("ddim:250").unwrap(), ManyStep { sampler: "ddim".into(), steps: 250 });
        assert!(!ManyStep::parse("none").unwrap().enabled());
        let err = format!("{:#}", ManyStep::parse("unipc").unwrap_err());
        assert!(err.contains("SAMPLER:STEPS"), "{err}");
        let err = format!("{:#}", ManyStep::parse("unipc:many").unwrap_err());
        assert!(err.contains("many"), "{err}");
    }
}
