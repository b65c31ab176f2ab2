//! The one interface every network is used through: `model(x, tau) -> prediction`, plus the
//! prediction convention and the schedule it was trained with (DESIGN.md section 4).
//!
//! Implementations must not switch off gradients internally: the DDSS search differentiates
//! through `forward` with respect to `x` and `tau`.

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

    /// Whether [`Self::vjp`] has its own implementation (a replayed CUDA graph). The unroll then
    /// keeps each call's output from its forward pass and asks `vjp` for the backward step
    /// instead of recomputing the call under autograd.
    fn has_vjp(&self) -> bool {
        false
    }

    /// `(dL/dx, dL/dtau)` of `L = sum(forward(x, tau) * grad_out)` for `x` and `tau` that do not
    /// require grad; gradients of the network's own weights are not computed. The default runs
    /// the call under autograd.
    fn vjp(&self, x: &Tensor, tau: &Tensor, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        eager_vjp(self, x, tau, grad_out)
    }
}

/// [`Denoiser::vjp`] by autograd through `model.forward`.
pub fn eager_vjp<D: Denoiser + ?Sized>(
    model: &D,
    x: &Tensor,
    tau: &Tensor,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let x = x.f_detach()?.set_requires_grad(true);
    let tau = tau.f_detach()?.set_requires_grad(true);
    let out = model.forward(&x, &tau)?;
    let scalar = out.f_mul(&grad_out.f_detach()?)?.f_sum(out.kind())?;
    let grads = Tensor::f_run_backward(&[scalar], &[&x, &tau], false, false)?;
    let mut grads = grads.into_iter();
    match (grads.next(), grads.next()) {
        // An input the network ignores gets an undefined gradient: make it zeros.
        (Some(gx), Some(gtau)) => Ok((
            if gx.defined() { gx } else { x.f_zeros_like()? },
            if gtau.defined() { gtau } else { tau.f_zeros_like()? },
        )),
        _ => Err(crate::Error::invalid("vjp", "autograd returned fewer gradients than inputs")),
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
            fn has_vjp(&self) -> bool {
                (**self).has_vjp()
            }
            fn vjp(&self, x: &Tensor, tau: &Tensor, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
                (**self).vjp(x, tau, grad_out)
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
    if output.size() != x.size() {
        return Err(crate::Error::Shape {
            what: "network output (it must predict one value per input value: epsilon, x0 or v; a \
                   learned-variance model with extra output channels is not supported)"
                .into(),
            expected: format!("{:?} like the input", x.size()),
            got: output.size(),
        });
    }
    Ok(output)
}
