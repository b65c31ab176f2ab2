//! The memory-lean backward pass of one network call ([`crate::Denoiser::forward_taped`]).
//!
//! Autograd keeps, for every operation, the tensors its backward formula could need: for each
//! GroupNorm -> activation -> convolution chain of a residual block that is the norm's input, the
//! activation's input and the convolution's input. With frozen weights most of that is never
//! read: a convolution's input gradient needs only its weight. A forward pass run without autograd
//! can instead record on a [`Tape`] just each residual block's input and the input of its second
//! norm, plus every norm's per-group statistics (`[N, groups]`); the backward pass walks the blocks
//! in reverse, takes convolution input gradients as transposed convolutions, renormalises each
//! norm's input in one pass from its statistics and runs the activation's and the norm's own
//! backward kernels, and recomputes the small attention blocks and the time embedding under
//! autograd. A call then keeps about a quarter of the activations autograd would, at the price of
//! redoing the elementwise work, so many more calls fit in the same memory without recomputing
//! their convolutions.
//!
//! Convention: a block records its own intermediate tensors while it runs, and its caller records
//! the block's input right after it ran (a shallow copy: no memory beyond keeping it alive). The
//! backward pass pops in the reverse order: first the input, then the block's own entries.

use crate::{Error, Result};
use tch::Tensor;

/// What a forward pass without autograd recorded for the backward pass.
#[derive(Debug, Default)]
pub(crate) struct Tape {
    saved: Vec<Tensor>,
}

impl Tape {
    /// Records `t` (a shallow copy).
    pub fn push(&mut self, t: &Tensor) {
        self.saved.push(t.shallow_clone());
    }

    /// The most recently recorded tensor not yet taken back.
    pub fn pop(&mut self) -> Result<Tensor> {
        self.saved.pop().ok_or_else(|| {
            Error::invalid("UNet backward pass", "the tape ran out of recorded tensors (inconsistent network)")
        })
    }

    /// Checks that the backward pass took back everything that was recorded.
    pub fn finish(self) -> Result<()> {
        match self.saved.len() {
            0 => Ok(()),
            left => Err(Error::invalid(
                "UNet backward pass",
                format!("{left} recorded tensors were not used (inconsistent network)"),
            )),
        }
    }
}

/// Records `t` on `tape` when there is one.
pub(crate) fn record(tape: &mut Option<&mut Tape>, t: &Tensor) {
    if let Some(tape) = tape {
        tape.push(t);
    }
}

/// [`crate::autograd::vjp`] of a function of one input: the backward pass of a block recomputed
/// under autograd from its input.
pub(crate) fn local_vjp1(input: &Tensor, grad: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    crate::autograd::vjp(&[input], grad, |leaves| f(&leaves[0]))?
        .pop()
        .ok_or_else(|| Error::invalid("UNet backward pass", "autograd returned no gradient"))
}

/// Height and width of an `N x C x H x W` tensor.
pub(crate) fn spatial(t: &Tensor) -> (i64, i64) {
    let size = t.size();
    (size[size.len() - 2], size[size.len() - 1])
}
