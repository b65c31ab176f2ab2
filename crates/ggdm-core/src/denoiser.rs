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

    /// `forward(x, tau)` without autograd, plus a record of the call from which
    /// [`Self::backward_taped`] computes the gradients [`Self::vjp`] would give, usually keeping
    /// far less memory than autograd's graph of the call (the UNet keeps about a quarter). `None`:
    /// this network records no tape (the default); keep the call's autograd graph instead.
    fn forward_taped(&self, x: &Tensor, tau: &Tensor) -> Result<Option<(Tensor, CallTape)>> {
        let _ = (x, tau);
        Ok(None)
    }

    /// `(dL/dx, dL/dtau)` of `L = sum(output * grad_out)` for the call `tape` recorded (see
    /// [`Self::forward_taped`]).
    fn backward_taped(&self, tape: CallTape, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let _ = (tape, grad_out);
        Err(crate::Error::invalid("backward_taped", "this network records no tapes"))
    }
}

/// A network call recorded by [`Denoiser::forward_taped`], opaque to everyone but the network that
/// recorded it.
pub struct CallTape(Box<dyn std::any::Any>);

impl CallTape {
    /// Wraps a network's own record.
    pub fn new<T: 'static>(record: T) -> Self {
        CallTape(Box::new(record))
    }

    /// The network's own record; an error when another kind of network recorded it.
    pub fn downcast<T: 'static>(self) -> Result<T> {
        self.0.downcast::<T>().map(|record| *record).map_err(|_| {
            crate::Error::invalid("backward_taped", "the tape was recorded by a different kind of network")
        })
    }
}

impl std::fmt::Debug for CallTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallTape")
    }
}

/// [`Denoiser::vjp`] by autograd through `model.forward`.
pub fn eager_vjp<D: Denoiser + ?Sized>(
    model: &D,
    x: &Tensor,
    tau: &Tensor,
    grad_out: &Tensor,
) -> Result<(Tensor, Tensor)> {
    // An input the network ignores gets zeros.
    let mut grads =
        crate::autograd::vjp(&[x, tau], grad_out, |leaves| model.forward(&leaves[0], &leaves[1]))?.into_iter();
    match (grads.next(), grads.next()) {
        (Some(gx), Some(gtau)) => Ok((gx, gtau)),
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
            fn forward_taped(&self, x: &Tensor, tau: &Tensor) -> Result<Option<(Tensor, CallTape)>> {
                (**self).forward_taped(x, tau)
            }
            fn backward_taped(&self, tape: CallTape, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
                (**self).backward_taped(tape, grad_out)
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
