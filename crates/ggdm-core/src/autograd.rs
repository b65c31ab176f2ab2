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
        if !message.is_null() {
            // SAFETY: a non-null return is a NUL-terminated string allocated by the shim, freed once.
            let text = unsafe {
                let text = CStr::from_ptr(message).to_string_lossy().into_owned();
                ddss_autograd_free_error(message);
                text
            };
            return Err(crate::Error::invalid("autograd", text));
        }
        // SAFETY: see above; each result is a fresh heap-allocated at::Tensor.
        Ok(results.into_iter().map(|r| unsafe { tch::Tensor::from_ptr(r) }).collect())
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
