//! `ddss-cli sample --step-noise FILE.npy` / `--out-step-noise FILE.npy`: the step noise
//! `z_1..z_K` of a learned sampler (DESIGN.md section 4, "GGDM step") as a float32
//! `[K, N, C, H, W]` array, `[i, n]` being step `i + 1`'s noise for sample `n`. With
//! `--init-noise`, these files fix a run completely, so another implementation (the Python package
//! in `python/`) can run the same sampler on the same numbers.
//!
//! The noise is in the convention of `sampler.json`'s `derived.sigma`, which holds `|sigma_i|`:
//! `x_{i+1} = ... + derived.sigma_i * z_i`. A learned `sigma_i` may be negative (it only ever
//! multiplies symmetric noise), so where it is, the sampler here is given `-z_i`; the sample is
//! the one `derived` describes either way.

use crate::common::write_npy;
use crate::sample::gather_samples;
use anyhow::{bail, Context, Result};
use ddss_opt::collective::Collective;
use ggdm_core::ggdm::{tensor_to_vec, GgdmSampler};
use ggdm_core::noise::NoiseSource;
use ggdm_nets::model_dir::LoadedModel;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The step noise of one `sample` run: read from a file, written to one, or both.
pub struct StepNoise {
    /// `--step-noise`: the file and its `[K, N, C, H, W]` values (CPU).
    given: Option<(PathBuf, Tensor)>,
    /// `--out-step-noise`: where the noise goes, and each batch's `[K, b, C, H, W]`.
    out: Option<(PathBuf, Vec<Tensor>)>,
    /// `+1` or `-1` per step: the sign of the sampler's `sigma_i` (see the module documentation).
    signs: Vec<f64>,
    /// `[C, H, W]` of the samples.
    shape: [i64; 3],
}

impl StepNoise {
    /// The step noise `--step-noise` / `--out-step-noise` ask for (`None` when neither is given) for
    /// `num` samples of `shape` from `sampler` (`None` for a built-in sampler, which is an error here).
    pub fn from_args(
        given: Option<&Path>,
        out: Option<&Path>,
        sampler: Option<&GgdmSampler>,
        num: usize,
        shape: [i64; 3],
    ) -> Result<Option<Self>> {
        if given.is_none() && out.is_none() {
            return Ok(None);
        }
        let Some(sampler) = sampler else {
            bail!(
                "--step-noise / --out-step-noise: only a learned sampler (--sampler FILE.json) takes step noise; the \
                 built-in samplers draw theirs from --seed"
            );
        };
        if let Some(path) = out {
            ggdm_core::io::check_output_path(path)?;
        }
        let expected = [sampler.steps as i64, num as i64, shape[0], shape[1], shape[2]];
        let given = match given {
            Some(path) => Some((path.to_path_buf(), load(path, expected)?)),
            None => None,
        };
        let sigma = tch::no_grad(|| sampler.coefficients().sigma);
        let signs = tensor_to_vec(&sigma).iter().map(|s| if *s < 0.0 { -1.0 } else { 1.0 }).collect();
        Ok(Some(Self { given, out: out.map(|p| (p.to_path_buf(), Vec::new())), signs, shape }))
    }

    /// Samples one batch (samples `first..first + b`) with `sampler` from `x_init`; the step noise
    /// is the file's, or else drawn from `noise` exactly as a run without these flags draws it.
    pub fn run_batch(
        &mut self,
        sampler: &GgdmSampler,
        model: &LoadedModel,
        x_init: &Tensor,
        noise: &mut dyn NoiseSource,
        first: usize,
    ) -> Result<Tensor> {
        let size = x_init.size();
        let device = x_init.device();
        let mut used = Vec::with_capacity(sampler.steps);
        let mut in_file_convention = Vec::with_capacity(sampler.steps);
        for (i, &sign) in self.signs.iter().enumerate() {
            let (z_used, z_file) = match &self.given {
                Some((_, all)) => {
                    let z_file = all.f_get(i as i64)?.f_narrow(0, first as i64, size[0])?.f_to_device(device)?;
                    (z_file.f_mul_scalar(sign)?, z_file)
                }
                None => {
                    let z_used = noise.next(&size, device)?;
                    let z_file = z_used.f_mul_scalar(sign)?;
                    (z_used, z_file)
                }
            };
            used.push(z_used);
            in_file_convention.push(z_file.f_to_device(Device::Cpu)?);
        }
        if let Some((_, batches)) = &mut self.out {
            batches.push(Tensor::f_stack(&in_file_convention, 0)?);
        }
        let samples = tch::no_grad(|| sampler.sample(model.denoiser.as_ref(), x_init, &used))?;
        Ok(samples)
    }

    /// Writes `--out-step-noise` (every rank's batches, gathered to rank 0, which writes).
    pub fn write(&self, comm: &dyn Collective) -> Result<()> {
        let Some((path, batches)) = &self.out else {
            return Ok(());
        };
        let k = self.signs.len() as i64;
        let [c, h, w] = self.shape;
        // Gathered per sample ([b, K * C, H, W]), so that every rank's samples stay together.
        let per_sample: Vec<Tensor> = batches
            .iter()
            .map(|b| b.f_permute([1, 0, 2, 3, 4])?.f_reshape([-1, k * c, h, w]))
            .collect::<Result<_, _>>()?;
        let all = gather_samples(&per_sample, [k * c, h, w], true, comm)?;
        if comm.is_root() {
            let noise = all.f_reshape([-1, k, c, h, w])?.f_permute([1, 0, 2, 3, 4])?;
            write_npy(&noise, path).with_context(|| format!("--out-step-noise {}", path.display()))?;
            tracing::info!("step noise written to {}", path.display());
        }
        Ok(())
    }
}

/// Reads `--step-noise` and checks its shape against `expected` (`[K, N, C, H, W]`).
fn load(path: &Path, expected: [i64; 5]) -> Result<Tensor> {
    let noise = fid_metrics::data::load_float_npy(path).with_context(|| format!("--step-noise {}", path.display()))?;
    if noise.size() != expected {
        bail!(
            "--step-noise {}: the array has shape {:?}, this run needs [K, N, C, H, W] = {:?} (K steps of the \
             sampler, N samples)",
            path.display(),
            noise.size(),
            expected
        );
    }
    Ok(noise)
}
