//! What the DDSS unroll needs from a network beyond [`Denoiser::forward`]: vector-Jacobian products
//! with respect to the input and the timestep, and, for networks that record one, a taped forward
//! pass whose backward pass keeps far less memory than autograd's graph.
//!
//! Every method has a default that runs the call under autograd, so a network gets a VJP in one
//! line:
//! - the networks of `ggdm-core` (the TorchScript adapter and the closed-form denoisers) implement
//!   [`DifferentiableDenoiser`] here with the defaults;
//! - a user's own [`Denoiser`] either writes `impl DifferentiableDenoiser for MyNet {}` or, when
//!   the type is not theirs to extend, is wrapped in [`Autograd`];
//! - the UNet ([`crate::unet::UNetDenoiser`]) and the replayed CUDA graph
//!   ([`crate::cuda_graph::GraphedDenoiser`]) override them with their own passes.
//!
//! (A blanket `impl<D: Denoiser> DifferentiableDenoiser for D` would collide with the UNet's own
//! implementation, hence the one-line impls and the wrapper.)

use ggdm_core::analytic::{DiffusersDummyDenoiser, GaussianDataDenoiser};
use ggdm_core::torchscript::TorchScriptDenoiser;
use ggdm_core::{Denoiser, Error, PredictionType, Result};
use tch::Tensor;

/// A [`Denoiser`] the DDSS unroll can differentiate through, with the network's own backward pass
/// where it has one.
pub trait DifferentiableDenoiser: Denoiser {
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
        Err(Error::invalid("backward_taped", "this network records no tapes"))
    }
}

/// A network call recorded by [`DifferentiableDenoiser::forward_taped`], opaque to everyone but the
/// network that recorded it.
pub struct CallTape(Box<dyn std::any::Any>);

impl CallTape {
    /// Wraps a network's own record.
    pub fn new<T: 'static>(record: T) -> Self {
        CallTape(Box::new(record))
    }

    /// The network's own record; an error when another kind of network recorded it.
    pub fn downcast<T: 'static>(self) -> Result<T> {
        self.0
            .downcast::<T>()
            .map(|record| *record)
            .map_err(|_| Error::invalid("backward_taped", "the tape was recorded by a different kind of network"))
    }
}

impl std::fmt::Debug for CallTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallTape")
    }
}

/// [`DifferentiableDenoiser::vjp`] by autograd through `model.forward`.
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
        _ => Err(Error::invalid("vjp", "autograd returned fewer gradients than inputs")),
    }
}

/// Any [`Denoiser`] made differentiable by autograd: every [`DifferentiableDenoiser`] method is
/// the default one. For a network type defined elsewhere, e.g.
/// `Autograd(my_net)` where `my_net` implements only [`Denoiser`].
#[derive(Debug, Clone)]
pub struct Autograd<D>(pub D);

impl<D: Denoiser> Denoiser for Autograd<D> {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        self.0.forward(x, tau)
    }
    fn prediction_type(&self) -> PredictionType {
        self.0.prediction_type()
    }
    fn sample_shape(&self) -> Option<[i64; 3]> {
        self.0.sample_shape()
    }
}

impl<D: Denoiser> DifferentiableDenoiser for Autograd<D> {}

// `ggdm-core`'s own networks: the TorchScript adapter and the closed-form denoisers, by autograd.
impl DifferentiableDenoiser for TorchScriptDenoiser {}
impl DifferentiableDenoiser for GaussianDataDenoiser {}
impl DifferentiableDenoiser for DiffusersDummyDenoiser {}

/// Forwards every [`DifferentiableDenoiser`] method through a pointer type to the network it points
/// to.
macro_rules! forward_differentiable {
    ($($pointer:ty),*) => {$(
        impl<D: DifferentiableDenoiser + ?Sized> DifferentiableDenoiser for $pointer {
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

forward_differentiable!(&D, Box<D>);
