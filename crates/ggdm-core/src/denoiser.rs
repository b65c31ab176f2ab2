//! The one interface every network is used through: `model(x, tau) -> prediction`, plus the
//! prediction convention and the schedule it was trained with (DESIGN.md section 4).
//!
//! Implementations must not switch off gradients internally: the DDSS search differentiates
//! through `forward` with respect to `x` and `tau`. What the search needs beyond `forward` (a
//! network's own vector-Jacobian product, or a taped forward and backward pass) is the
//! `DifferentiableDenoiser` extension trait of the `ggdm-nets` crate.

use crate::prediction::PredictionType;
use crate::Result;
use tch::Tensor;

/// A denoising network queried at continuous timesteps.
pub trait Denoiser {
    /// Network output for a batch `x` (`N x C x H x W`) at timesteps `tau` (shape `[N]`, float,
    /// in `[0, num_train_timesteps - 1]`, possibly requiring grad).
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor>;

    /// What `forward` returns.
    fn prediction_type(&self) -> PredictionType;

    /// `[C, H, W]` of the samples, when the model fixes it.
    fn sample_shape(&self) -> Option<[i64; 3]> {
        None
    }
}

/// Forwards every [`Denoiser`] method through a pointer type to the network it points to.
macro_rules! forward_denoiser {
    ($($pointer:ty),*) => {$(
        impl<D: Denoiser + ?Sized> Denoiser for $pointer {
            fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
                (**self).forward(x, tau)
            }
            fn prediction_type(&self) -> PredictionType {
                (**self).prediction_type()
            }
            fn sample_shape(&self) -> Option<[i64; 3]> {
                (**self).sample_shape()
            }
        }
    )*};
}

forward_denoiser!(&D, Box<D>);

/// `model.forward(x, tau)` with the output's shape checked against `x`: a network whose output is
/// not a prediction of the same shape (e.g. one that also predicts a learned variance, with twice
/// the channels) is an error naming both shapes, and a non-finite output is left to the caller.
pub fn checked_forward<D: Denoiser + ?Sized>(model: &D, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
    let output = model.forward(x, tau)?;
    check_output(x, &output)?;
    Ok(output)
}

/// The shape check of [`checked_forward`]: `output` must have the shape of the input `x`.
pub fn check_output(x: &Tensor, output: &Tensor) -> Result<()> {
    if output.size() != x.size() {
        return Err(crate::Error::Shape {
            what: "network output (it must predict one value per input value: epsilon, x0 or v; a \
                   learned-variance model with extra output channels is not supported)"
                .into(),
            expected: format!("{:?} like the input", x.size()),
            got: output.size(),
        });
    }
    Ok(())
}
