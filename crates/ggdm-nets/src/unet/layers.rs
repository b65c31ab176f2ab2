//! The primitive layers of the UNet (convolution, linear, GroupNorm, activation), created in a
//! `VarStore` under PyTorch's parameter names (`weight`, `bias`) and run with tch's fallible `f_`
//! ops, so a bad input is an error and never a panic.

use super::config::Activation;
use super::tape::{local_vjp1, Tape};
use crate::{Error, Result};
use tch::nn::{Init, Path};
use tch::Tensor;

/// How fresh parameters are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamInit {
    /// PyTorch's defaults: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for convolution and linear weights
    /// and biases, ones/zeros for GroupNorm, N(0, 16^2) for the Fourier features.
    PyTorchDefault,
    /// Zeros everywhere: cheap placeholders about to be overwritten by a checkpoint.
    Placeholder,
}

impl ParamInit {
    fn fan_in_uniform(self, fan_in: i64) -> Init {
        match self {
            ParamInit::PyTorchDefault => {
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                Init::Uniform { lo: -bound, up: bound }
            }
            ParamInit::Placeholder => Init::Const(0.0),
        }
    }

    fn constant(self, value: f64) -> Init {
        match self {
            ParamInit::PyTorchDefault => Init::Const(value),
            ParamInit::Placeholder => Init::Const(0.0),
        }
    }
}

/// `nn.Conv2d` with a bias.
#[derive(Debug)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// A square-kernel convolution at `path` (`path.weight`, `path.bias`).
    pub fn new(
        path: &Path,
        in_channels: i64,
        out_channels: i64,
        kernel_size: i64,
        stride: i64,
        padding: i64,
        init: ParamInit,
    ) -> Result<Self> {
        let fan_in = in_channels * kernel_size * kernel_size;
        let weight =
            path.f_var("weight", &[out_channels, in_channels, kernel_size, kernel_size], init.fan_in_uniform(fan_in))?;
        let bias = path.f_var("bias", &[out_channels], init.fan_in_uniform(fan_in))?;
        Ok(Conv2d { weight, bias, stride, padding })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )?)
    }

    /// The gradient of a loss with respect to this convolution's input (of height and width
    /// `input_hw`) from its gradient with respect to the output: the transposed convolution with the
    /// same weight (no weight or bias gradient, and nothing of the input but its size is needed).
    pub fn input_grad(&self, grad: &Tensor, input_hw: (i64, i64)) -> Result<Tensor> {
        let kernel = self.weight.size()[2];
        let out = grad.size();
        let (out_h, out_w) = (out[out.len() - 2], out[out.len() - 1]);
        // The rows and columns a strided convolution skipped at the end come back as output padding.
        let covered = |out: i64| (out - 1) * self.stride - 2 * self.padding + kernel;
        Ok(grad.f_conv_transpose2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [input_hw.0 - covered(out_h), input_hw.1 - covered(out_w)],
            1,
            [1, 1],
        )?)
    }

    /// The floating-point kind of the parameters.
    pub fn kind(&self) -> tch::Kind {
        self.weight.kind()
    }
}

/// `nn.Linear` with a bias.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// A linear layer at `path` (`path.weight` of shape `[out, in]`, `path.bias`).
    pub fn new(path: &Path, in_features: i64, out_features: i64, init: ParamInit) -> Result<Self> {
        let weight = path.f_var("weight", &[out_features, in_features], init.fan_in_uniform(in_features))?;
        let bias = path.f_var("bias", &[out_features], init.fan_in_uniform(in_features))?;
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_linear(&self.weight, Some(&self.bias))?)
    }

    /// `[layer.forward(xs) for layer in layers]` as one matrix product with the layers' weights
    /// stacked (one kernel instead of one per layer, and in the backward pass one product and one
    /// concatenation instead of a product and an accumulation per layer). The outputs are views of
    /// one tensor.
    pub fn forward_stacked(layers: &[&Linear], xs: &Tensor) -> Result<Vec<Tensor>> {
        match layers {
            [] => Ok(Vec::new()),
            [layer] => Ok(vec![layer.forward(xs)?]),
            _ => {
                let widths: Vec<i64> = layers.iter().map(|l| l.bias.size()[0]).collect();
                Ok(Self::forward_joined(layers, xs)?.f_split_with_sizes(widths, -1)?)
            }
        }
    }

    /// The outputs of [`Linear::forward_stacked`] concatenated along the last dimension.
    pub fn forward_joined(layers: &[&Linear], xs: &Tensor) -> Result<Tensor> {
        let weight = Tensor::f_cat(&layers.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0)?;
        let bias = Tensor::f_cat(&layers.iter().map(|l| &l.bias).collect::<Vec<_>>(), 0)?;
        Ok(xs.f_linear(&weight, Some(&bias))?)
    }
}

/// `nn.GroupNorm` with affine parameters.
#[derive(Debug)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: i64,
    eps: f64,
}

impl GroupNorm {
    /// A GroupNorm at `path`; `groups_key` names the config key the group count came from, for
    /// the error when it does not divide `channels`.
    pub fn new(
        path: &Path,
        num_groups: i64,
        channels: i64,
        eps: f64,
        groups_key: &str,
        init: ParamInit,
    ) -> Result<Self> {
        if num_groups < 1 || channels % num_groups != 0 {
            return Err(Error::invalid(
                groups_key,
                format!(
                    "{num_groups} groups do not divide the {channels} channels of GroupNorm `{}`",
                    path.path("weight").trim_end_matches(".weight")
                ),
            ));
        }
        let weight = path.f_var("weight", &[channels], init.constant(1.0))?;
        let bias = path.f_var("bias", &[channels], init.constant(0.0))?;
        Ok(GroupNorm { weight, bias, num_groups, eps })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_group_norm(self.num_groups, Some(&self.weight), Some(&self.bias), self.eps, true)?)
    }

    /// [`Self::forward`] with a tape: records the per-group mean and reciprocal standard deviation
    /// (`[N, groups]` each) that [`Self::act_input_grad`] needs besides the input.
    pub fn forward_taped(&self, xs: &Tensor, tape: &mut Option<&mut Tape>) -> Result<Tensor> {
        let Some(tape) = tape else {
            return self.forward(xs);
        };
        // The CUDA kernel takes only a contiguous input (the CPU one any memory format), as
        // `group_norm` arranges before calling it.
        let xs = if xs.device() == tch::Device::Cpu { xs.shallow_clone() } else { xs.f_contiguous()? };
        let size = xs.size();
        let (n, c) = (size[0], size[1]);
        let hxw = size[2..].iter().product();
        let (output, mean, rstd) =
            xs.f_native_group_norm(Some(&self.weight), Some(&self.bias), n, c, hxw, self.num_groups, self.eps)?;
        tape.push(&mean);
        tape.push(&rstd);
        Ok(output)
    }

    /// The gradient with respect to the input `xs` of `act(norm(xs))` from the gradient `grad` of
    /// its output, with the statistics [`Self::forward_taped`] recorded next on `tape`: the
    /// normalised input is recomputed in one pass from them, then the activation's and the norm's
    /// own backward kernels run.
    pub fn act_input_grad(&self, act: Activation, xs: &Tensor, grad: &Tensor, tape: &mut Tape) -> Result<Tensor> {
        let rstd = tape.pop()?;
        let mean = tape.pop()?;
        let size = xs.size();
        let (n, c) = (size[0], size[1]);
        let groups = self.num_groups;
        // y = xs * scale + shift with per-(sample, channel) scale = rstd * weight and
        // shift = bias - mean * rstd * weight.
        let per_channel = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_view([n, groups, 1])?
                .f_mul(&self.weight.f_view([1, groups, c / groups])?)?
                .f_reshape([n, c, 1, 1])?)
        };
        let scale = per_channel(&rstd)?;
        let shift = self.bias.f_view([1, c, 1, 1])?.f_sub(&per_channel(&mean.f_mul(&rstd)?)?)?;
        let normed = shift.f_addcmul(xs, &scale)?;
        let grad_normed = act.input_grad(grad, &normed)?;
        drop(normed);
        match crate::autograd::group_norm_input_grad(&grad_normed, xs, &mean, &rstd, &self.weight, groups)? {
            Some(grad) => Ok(grad),
            None => local_vjp1(xs, &grad_normed, |x| self.forward(x)),
        }
    }
}

impl Activation {
    /// The gradient with respect to the activation's input `xs` from the gradient of its output.
    pub fn input_grad(self, grad: &Tensor, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => xs.f_silu_backward(grad)?,
            Activation::Mish => xs.f_mish_backward(grad)?,
            Activation::Gelu => xs.f_gelu_backward(grad, "none")?,
            Activation::Relu => xs.f_threshold_backward(grad, 0.0)?,
        })
    }

    /// Applies the activation.
    pub fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => xs.f_silu()?,
            Activation::Mish => xs.f_mish()?,
            Activation::Gelu => xs.f_gelu("none")?,
            Activation::Relu => xs.f_relu()?,
        })
    }
}
