//! Vector-Jacobian products with explicit output cotangents (PyTorch's
//! `torch.autograd.grad(outputs, inputs, grad_outputs)`), which tch's API lacks: it back-propagates
//! from scalars only. Built against the libtorch headers (the usual build), this calls
//! `torch::autograd::grad` through a small C++ shim (`csrc/autograd.cpp`); otherwise it
//! back-propagates `sum(output * cotangent)`, the same gradients at the cost of one more product,
//! sum and backward pass over the outputs.

use crate::{Error, Result};
use tch::Tensor;

#[cfg(ddss_autograd_shim)]
mod ffi {
    use std::ffi::{c_char, c_int, CStr};
    use torch_sys::C_tensor;

    extern "C" {
        fn ddss_autograd_free_error(message: *mut c_char);
        fn ddss_group_norm_input_grad(
            grad_out: *mut C_tensor,
            input: *mut C_tensor,
            mean: *mut C_tensor,
            rstd: *mut C_tensor,
            weight: *mut C_tensor,
            groups: i64,
            result: *mut *mut C_tensor,
        ) -> *mut c_char;
        fn ddss_autograd_grad(
            outputs: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            n_outputs: c_int,
            inputs: *const *mut C_tensor,
            n_inputs: c_int,
            results: *mut *mut C_tensor,
        ) -> *mut c_char;
    }

    pub fn grad(
        outputs: &[&tch::Tensor],
        grads: &[&tch::Tensor],
        inputs: &[&tch::Tensor],
    ) -> crate::Result<Vec<tch::Tensor>> {
        let handle = |t: &&tch::Tensor| t.as_ptr() as *mut C_tensor;
        let outputs: Vec<*mut C_tensor> = outputs.iter().map(handle).collect();
        let grads: Vec<*mut C_tensor> = grads.iter().map(handle).collect();
        let inputs: Vec<*mut C_tensor> = inputs.iter().map(handle).collect();
        let mut results = vec![std::ptr::null_mut(); inputs.len()];
        // SAFETY: every handle points to a live at::Tensor borrowed for the call; on success the shim
        // writes one newly allocated at::Tensor per input, owned from here on by a tch::Tensor.
        let message = unsafe {
            ddss_autograd_grad(
                outputs.as_ptr(),
                grads.as_ptr(),
                outputs.len() as c_int,
                inputs.as_ptr(),
                inputs.len() as c_int,
                results.as_mut_ptr(),
            )
        };
        check(message)?;
        // SAFETY: see above; each result is a fresh heap-allocated at::Tensor.
        Ok(results.into_iter().map(|r| unsafe { tch::Tensor::from_ptr(r) }).collect())
    }

    fn check(message: *mut c_char) -> crate::Result<()> {
        if message.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null return is a NUL-terminated string allocated by the shim, freed once.
        let text = unsafe {
            let text = CStr::from_ptr(message).to_string_lossy().into_owned();
            ddss_autograd_free_error(message);
            text
        };
        Err(crate::Error::invalid("autograd", text))
    }

    pub fn group_norm_input_grad(
        grad_out: &tch::Tensor,
        input: &tch::Tensor,
        mean: &tch::Tensor,
        rstd: &tch::Tensor,
        weight: &tch::Tensor,
        groups: i64,
    ) -> crate::Result<tch::Tensor> {
        let handle = |t: &tch::Tensor| t.as_ptr() as *mut C_tensor;
        let mut result = std::ptr::null_mut();
        // SAFETY: the handles point to live at::Tensors borrowed for the call; on success the shim
        // writes one newly allocated at::Tensor, owned from here on by a tch::Tensor.
        check(unsafe {
            ddss_group_norm_input_grad(
                handle(grad_out),
                handle(input),
                handle(mean),
                handle(rstd),
                handle(weight),
                groups,
                &mut result,
            )
        })?;
        // SAFETY: see above.
        Ok(unsafe { tch::Tensor::from_ptr(result) })
    }
}

/// The input gradient of a GroupNorm with `groups` groups and affine `weight` from the gradient
/// `grad_out` of its output, its `input`, and the per-group `mean` and `rstd` of its forward pass
/// (`native_group_norm`'s second and third outputs): PyTorch's own GroupNorm backward kernel.
/// `None` in a build without the shim.
pub fn group_norm_input_grad(
    grad_out: &Tensor,
    input: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    weight: &Tensor,
    groups: i64,
) -> Result<Option<Tensor>> {
    #[cfg(ddss_autograd_shim)]
    {
        ffi::group_norm_input_grad(grad_out, input, mean, rstd, weight, groups).map(Some)
    }
    #[cfg(not(ddss_autograd_shim))]
    {
        let _ = (grad_out, input, mean, rstd, weight, groups);
        Ok(None)
    }
}

/// The gradients of `sum_j <outputs[j], grads[j]>` with respect to each of `inputs` (undefined
/// tensors for inputs the outputs do not depend on). The graph behind `outputs` is freed.
pub fn grad(outputs: &[&Tensor], grads: &[&Tensor], inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    if outputs.len() != grads.len() {
        return Err(Error::invalid("autograd", format!("{} outputs but {} cotangents", outputs.len(), grads.len())));
    }
    for (output, grad) in outputs.iter().zip(grads) {
        if output.size() != grad.size() {
            return Err(Error::Shape {
                what: "cotangent of an autograd output".into(),
                expected: format!("{:?} like the output", output.size()),
                got: grad.size(),
            });
        }
    }
    #[cfg(ddss_autograd_shim)]
    {
        ffi::grad(outputs, grads, inputs)
    }
    #[cfg(not(ddss_autograd_shim))]
    {
        let mut terms = Vec::with_capacity(outputs.len());
        for (output, grad) in outputs.iter().zip(grads) {
            terms.push(output.f_mul(&grad.f_detach()?)?.f_sum(tch::Kind::Double)?);
        }
        let scalar = Tensor::f_stack(&terms, 0)?.f_sum(tch::Kind::Double)?;
        Ok(Tensor::f_run_backward(&[scalar], inputs, false, false)?)
    }
}

/// The gradients of `sum(f(inputs) * cotangent)` with respect to each of `inputs`, running `f` under
/// autograd on detached copies of them (zeros for an input `f` does not use): a vector-Jacobian
/// product of `f` at `inputs`, whatever the caller's grad mode.
pub fn vjp(inputs: &[&Tensor], cotangent: &Tensor, f: impl FnOnce(&[Tensor]) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    tch::with_grad(|| {
        let leaves =
            inputs.iter().map(|t| Ok(t.f_detach()?.set_requires_grad(true))).collect::<Result<Vec<Tensor>>>()?;
        let output = f(&leaves)?;
        let grads = grad(&[&output], &[cotangent], &leaves.iter().collect::<Vec<_>>())?;
        grads
            .into_iter()
            .zip(&leaves)
            .map(|(g, leaf)| if g.defined() { Ok(g) } else { Ok(leaf.f_zeros_like()?) })
            .collect()
    })
}
