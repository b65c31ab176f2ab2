//! The building blocks of diffusers' `UNet2DModel`: time embeddings, the residual block, the
//! self-attention block, strided/nearest resampling and the down, mid and up blocks made of them.
//!
//! Every block lives at the `VarStore` path of the matching diffusers module, so parameter names
//! are diffusers' state-dict keys (`down_blocks.1.attentions.0.to_q.weight`, ...). The numerics
//! follow diffusers 0.42.1 operation for operation (same ops in the same order), so outputs agree
//! to float rounding.

use super::config::{Activation, Architecture, LevelKind, ResampleKind, TimeConditioning, TimeEmbeddingKind};
use super::layers::{Conv2d, GroupNorm, Linear, ParamInit};
use super::tape::{local_vjp1, record, spatial, Tape};
use crate::{Error, Result};
use tch::nn::Path;
use tch::Tensor;

/// Maps continuous timesteps `tau` (`[N]`) to the input of the time MLP.
#[derive(Debug)]
pub(crate) enum TimeProjection {
    /// diffusers' `Timesteps`: `[sin(tau w_k), cos(tau w_k)]` (or cos first) with
    /// `w_k = exp(-ln(10000) k / (half - freq_shift))`, zero-padded to `dim`.
    Positional { dim: i64, flip_sin_to_cos: bool, freq_shift: i64 },
    /// diffusers' `GaussianFourierProjection` (log input, `[sin, cos]`): fixed random frequencies
    /// `weight` (`time_proj.weight`, not trained).
    Fourier { weight: Tensor },
}

/// Standard deviation of diffusers' Gaussian Fourier frequencies in `UNet2DModel`.
const FOURIER_SCALE: f64 = 16.0;

impl TimeProjection {
    /// Builds the projection; returns it with its output width.
    pub fn new(path: &Path, arch: &Architecture, init: ParamInit) -> Result<(Self, i64)> {
        let channels = arch.block_out_channels[0];
        match arch.time_embedding {
            TimeEmbeddingKind::Positional => Ok((
                TimeProjection::Positional {
                    dim: channels,
                    flip_sin_to_cos: arch.flip_sin_to_cos,
                    freq_shift: arch.freq_shift,
                },
                channels,
            )),
            TimeEmbeddingKind::Fourier => {
                // A parameter with requires_grad=False in diffusers: stored, never trained.
                let mut weight = path.f_zeros_no_train("weight", &[channels])?;
                if init == ParamInit::PyTorchDefault {
                    let frequencies =
                        Tensor::f_randn([channels], (weight.kind(), weight.device()))?.f_mul_scalar(FOURIER_SCALE)?;
                    tch::no_grad(|| weight.f_copy_(&frequencies))?;
                }
                Ok((TimeProjection::Fourier { weight }, 2 * channels))
            }
        }
    }

    /// `tau` is `[N]` in the kind of the network; the result is `[N, width]`.
    pub fn forward(&self, tau: &Tensor) -> Result<Tensor> {
        match self {
            TimeProjection::Positional { dim, flip_sin_to_cos, freq_shift } => {
                let half = dim / 2;
                let log_max_period = 10000f64.ln();
                let exponent = Tensor::f_arange(half, (tau.kind(), tau.device()))?
                    .f_mul_scalar(-log_max_period)?
                    .f_div_scalar((half - freq_shift) as f64)?;
                let frequencies = exponent.f_exp()?;
                let angles = tau.f_unsqueeze(1)?.f_mul(&frequencies.f_unsqueeze(0)?)?;
                let (sin, cos) = (angles.f_sin()?, angles.f_cos()?);
                let embedding =
                    if *flip_sin_to_cos { Tensor::f_cat(&[cos, sin], -1)? } else { Tensor::f_cat(&[sin, cos], -1)? };
                if dim % 2 == 1 {
                    Ok(embedding.f_constant_pad_nd([0, 1, 0, 0])?)
                } else {
                    Ok(embedding)
                }
            }
            TimeProjection::Fourier { weight } => {
                let log_tau = tau.f_log()?;
                let angles = log_tau
                    .f_unsqueeze(1)?
                    .f_mul(&weight.f_unsqueeze(0)?)?
                    .f_mul_scalar(2.0)?
                    .f_mul_scalar(std::f64::consts::PI)?;
                Ok(Tensor::f_cat(&[angles.f_sin()?, angles.f_cos()?], -1)?)
            }
        }
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(t)))`.
#[derive(Debug)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(path: &Path, in_dim: i64, embed_dim: i64, init: ParamInit) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(&(path / "linear_1"), in_dim, embed_dim, init)?,
            linear_2: Linear::new(&(path / "linear_2"), embed_dim, embed_dim, init)?,
        })
    }

    pub fn forward(&self, projected: &Tensor) -> Result<Tensor> {
        let hidden = self.linear_1.forward(projected)?.f_silu()?;
        self.linear_2.forward(&hidden)
    }
}

/// Resolution change inside a residual block (diffusers' `ResnetBlock2D(up=True/down=True)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResnetResample {
    None,
    /// 2x2 average pooling of both paths.
    Down,
    /// Nearest-neighbour x2 of both paths.
    Up,
}

/// Shared settings of the residual blocks of one network.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetSettings {
    pub groups: i64,
    pub eps: f64,
    pub temb_channels: i64,
    pub activation: Activation,
    pub time_conditioning: TimeConditioning,
    pub dropout: f64,
    pub init: ParamInit,
}

/// Every residual block's projection of the time embedding (its `time_emb_proj`), computed for
/// all blocks at once ([`Linear::forward_stacked`]) and handed out in the order the blocks run.
pub(crate) struct TimeProjections {
    parts: std::vec::IntoIter<Tensor>,
}

impl TimeProjections {
    /// `layers`: the blocks' projections in the order the blocks run; `temb_activated`:
    /// `act(time_embedding)` (`[N, temb_channels]`).
    pub fn new(layers: &[&Linear], temb_activated: &Tensor) -> Result<Self> {
        Ok(Self { parts: Linear::forward_stacked(layers, temb_activated)?.into_iter() })
    }

    /// The next block's projection, `[N, width]`.
    fn next(&mut self) -> Result<Tensor> {
        self.parts.next().ok_or_else(|| {
            Error::invalid("UNet time embedding", "more residual blocks ran than were projected (inconsistent network)")
        })
    }

    /// Checks that every projection was used.
    pub fn finish(self) -> Result<()> {
        match self.parts.len() {
            0 => Ok(()),
            left => Err(Error::invalid(
                "UNet time embedding",
                format!("{left} projections were not used by any residual block (inconsistent network)"),
            )),
        }
    }
}

/// diffusers' `ResnetBlock2D`:
/// `out = (shortcut(x) + conv2(drop(act(cond(norm2(conv1(act(norm1(x)))), temb))))) / scale`.
#[derive(Debug)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    activation: Activation,
    time_conditioning: TimeConditioning,
    dropout: f64,
    output_scale_factor: f64,
    resample: ResnetResample,
}

impl ResnetBlock2D {
    pub fn new(
        path: &Path,
        in_channels: i64,
        out_channels: i64,
        output_scale_factor: f64,
        settings: &ResnetSettings,
    ) -> Result<Self> {
        Self::with_resample(path, in_channels, out_channels, output_scale_factor, settings, ResnetResample::None)
    }

    fn with_resample(
        path: &Path,
        in_channels: i64,
        out_channels: i64,
        output_scale_factor: f64,
        settings: &ResnetSettings,
        resample: ResnetResample,
    ) -> Result<Self> {
        let init = settings.init;
        let projection_width = match settings.time_conditioning {
            TimeConditioning::Add => out_channels,
            TimeConditioning::ScaleShift => 2 * out_channels,
        };
        let norm1 =
            GroupNorm::new(&(path / "norm1"), settings.groups, in_channels, settings.eps, "norm_num_groups", init)?;
        let conv1 = Conv2d::new(&(path / "conv1"), in_channels, out_channels, 3, 1, 1, init)?;
        let time_emb_proj = Linear::new(&(path / "time_emb_proj"), settings.temb_channels, projection_width, init)?;
        let norm2 =
            GroupNorm::new(&(path / "norm2"), settings.groups, out_channels, settings.eps, "norm_num_groups", init)?;
        let conv2 = Conv2d::new(&(path / "conv2"), out_channels, out_channels, 3, 1, 1, init)?;
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(&(path / "conv_shortcut"), in_channels, out_channels, 1, 1, 0, init)?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            activation: settings.activation,
            time_conditioning: settings.time_conditioning,
            dropout: settings.dropout,
            output_scale_factor,
            resample,
        })
    }

    /// The projection of the time embedding this block adds ([`TimeProjections`] applies it).
    pub fn time_projection(&self) -> &Linear {
        &self.time_emb_proj
    }

    /// `temb` hands out this block's projection of the time embedding. With a `tape` (a forward
    /// pass without autograd), records what [`Self::backward`] needs besides the input.
    pub fn forward(
        &self,
        input: &Tensor,
        temb: &mut TimeProjections,
        train: bool,
        mut tape: Option<&mut Tape>,
    ) -> Result<Tensor> {
        let hidden = self.activation.apply(&self.norm1.forward_taped(input, &mut tape)?)?;
        let (input, hidden) = match self.resample {
            ResnetResample::None => (input.shallow_clone(), hidden),
            ResnetResample::Down => (avg_pool_2x2(input)?, avg_pool_2x2(&hidden)?),
            ResnetResample::Up => (nearest_2x(input)?, nearest_2x(&hidden)?),
        };
        let hidden = self.conv1.forward(&hidden)?;
        let temb = temb.next()?.f_unsqueeze(-1)?.f_unsqueeze(-1)?;
        let hidden = match self.time_conditioning {
            TimeConditioning::Add => {
                let hidden = hidden.f_add(&temb)?;
                let normed = self.norm2.forward_taped(&hidden, &mut tape)?;
                record(&mut tape, &hidden);
                normed
            }
            TimeConditioning::ScaleShift => {
                record(&mut tape, &hidden);
                record(&mut tape, &temb);
                self.scale_shift(&hidden, &temb)?
            }
        };
        let hidden = self.activation.apply(&hidden)?;
        let hidden = if self.dropout > 0.0 { hidden.f_dropout(self.dropout, train)? } else { hidden };
        let hidden = self.conv2.forward(&hidden)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(&input)?,
            None => input,
        };
        divide_unless_one(shortcut.f_add(&hidden)?, self.output_scale_factor)
    }

    /// `norm2(hidden) * (1 + scale) + shift` with `temb = [scale, shift]` along the channels.
    fn scale_shift(&self, hidden: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let halves = temb.f_chunk(2, 1)?;
        let (scale, shift) = (&halves[0], &halves[1]);
        Ok(self.norm2.forward(hidden)?.f_mul(&scale.f_add_scalar(1.0)?)?.f_add(shift)?)
    }

    /// The input gradient from the output gradient `grad`, for the `input` of a taped forward pass
    /// whose own entries are next on `tape`; pushes the gradient of this block's time projection
    /// (`[N, width]`) onto `temb_grads`.
    pub fn backward(
        &self,
        input: &Tensor,
        grad: &Tensor,
        tape: &mut Tape,
        temb_grads: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let grad = divide_unless_one(grad.shallow_clone(), self.output_scale_factor)?;
        let (grad_conv1_out, grad_temb) = match self.time_conditioning {
            TimeConditioning::Add => {
                let hidden = tape.pop()?;
                let grad_act = self.conv2.input_grad(&grad, spatial(&hidden))?;
                let grad_hidden = self.norm2.act_input_grad(self.activation, &hidden, &grad_act, tape)?;
                let grad_temb = grad_hidden.f_sum_dim_intlist([2i64, 3].as_slice(), false, grad_hidden.kind())?;
                (grad_hidden, grad_temb)
            }
            TimeConditioning::ScaleShift => {
                let temb = tape.pop()?;
                let hidden = tape.pop()?;
                let grad_act = self.conv2.input_grad(&grad, spatial(&hidden))?;
                let grads = crate::autograd::vjp(&[&hidden, &temb], &grad_act, |leaves| {
                    self.activation.apply(&self.scale_shift(&leaves[0], &leaves[1])?)
                })?;
                let [grad_hidden, grad_temb]: [Tensor; 2] = grads.try_into().map_err(|_| {
                    Error::invalid("UNet backward pass", "autograd returned the wrong number of gradients")
                })?;
                (grad_hidden, grad_temb.f_flatten(1, -1)?)
            }
        };
        temb_grads.push(grad_temb);
        let (height, width) = spatial(input);
        let resampled = match self.resample {
            ResnetResample::None => (height, width),
            ResnetResample::Down => (height / 2, width / 2),
            ResnetResample::Up => (height * 2, width * 2),
        };
        let grad_activated = self.resample_grad(input, &self.conv1.input_grad(&grad_conv1_out, resampled)?)?;
        let grad_input = self.norm1.act_input_grad(self.activation, input, &grad_activated, tape)?;
        let grad_shortcut = match &self.conv_shortcut {
            Some(conv) => conv.input_grad(&grad, resampled)?,
            None => grad,
        };
        Ok(grad_input.f_add(&self.resample_grad(input, &grad_shortcut)?)?)
    }

    /// The gradient at the resolution of `input` from one at the resampled resolution.
    fn resample_grad(&self, input: &Tensor, grad: &Tensor) -> Result<Tensor> {
        match self.resample {
            ResnetResample::None => Ok(grad.shallow_clone()),
            ResnetResample::Down => Ok(input.f_avg_pool2d_backward(grad, [2, 2], [2, 2], [0, 0], false, true, None)?),
            ResnetResample::Up => {
                let (height, width) = spatial(input);
                Ok(Tensor::f_upsample_nearest2d_backward(grad, [2 * height, 2 * width], input.size(), 2.0, 2.0)?)
            }
        }
    }
}

/// `xs / factor`, skipping the division (a kernel and a pass over the activations in each
/// direction) when the factor is 1, where it is the identity.
fn divide_unless_one(xs: Tensor, factor: f64) -> Result<Tensor> {
    if factor == 1.0 {
        Ok(xs)
    } else {
        Ok(xs.f_div_scalar(factor)?)
    }
}

fn avg_pool_2x2(xs: &Tensor) -> Result<Tensor> {
    Ok(xs.f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)?)
}

fn nearest_2x(xs: &Tensor) -> Result<Tensor> {
    let (height, width) = spatial(xs);
    Ok(xs.f_upsample_nearest2d([2 * height, 2 * width], 2.0, 2.0)?)
}

/// diffusers' `Attention` as `UNet2DModel` uses it: spatial self-attention over `H*W` tokens with
/// an optional GroupNorm, `to_q`/`to_k`/`to_v`/`to_out.0` projections, a residual connection and a
/// final division by `rescale_output_factor`.
#[derive(Debug)]
pub(crate) struct Attention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    head_dim: i64,
    rescale_output_factor: f64,
}

impl Attention {
    /// The attention layer after a residual block of an attention level (down or up), with the
    /// architecture's group norm and head width.
    fn of_level(path: &Path, arch: &Architecture, channels: i64, init: ParamInit) -> Result<Self> {
        let norm = (arch.norm_num_groups, arch.norm_eps, "norm_num_groups");
        Self::new(path, channels, arch.attention_head_dim, Some(norm), 1.0, init)
    }

    /// `head_dim`: channels per head (`None`: one head of all channels). `heads = channels /
    /// head_dim` (integer division, as diffusers), inner width `heads * head_dim`.
    pub fn new(
        path: &Path,
        channels: i64,
        head_dim: Option<i64>,
        norm: Option<(i64, f64, &str)>,
        rescale_output_factor: f64,
        init: ParamInit,
    ) -> Result<Self> {
        let head_dim = head_dim.unwrap_or(channels);
        let heads = channels / head_dim;
        if heads < 1 {
            return Err(Error::invalid(
                "attention_head_dim",
                format!(
                    "{head_dim} is larger than the {channels} channels of attention block `{}`",
                    path.path("to_q").trim_end_matches(".to_q")
                ),
            ));
        }
        let inner = heads * head_dim;
        let group_norm = match norm {
            Some((groups, eps, key)) => Some(GroupNorm::new(&(path / "group_norm"), groups, channels, eps, key, init)?),
            None => None,
        };
        Ok(Attention {
            group_norm,
            to_q: Linear::new(&(path / "to_q"), channels, inner, init)?,
            to_k: Linear::new(&(path / "to_k"), channels, inner, init)?,
            to_v: Linear::new(&(path / "to_v"), channels, inner, init)?,
            to_out: Linear::new(&(path / "to_out" / 0), inner, channels, init)?,
            heads,
            head_dim,
            rescale_output_factor,
        })
    }

    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let size = input.size();
        let &[batch, channels, height, width] = size.as_slice() else {
            return Err(Error::Shape { what: "attention input".into(), expected: "N x C x H x W".into(), got: size });
        };
        let tokens = height * width;
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(input)?,
            None => input.shallow_clone(),
        };
        // [N, C, H, W] -> [N, H*W, C], made contiguous: a transposed input would make the
        // projection copy it and add its bias in a separate kernel.
        let sequence = normed.f_view([batch, channels, tokens])?.f_transpose(1, 2)?.f_contiguous()?;
        let split_heads = |projected: Tensor| -> Result<Tensor> {
            Ok(projected.f_view([batch, tokens, self.heads, self.head_dim])?.f_transpose(1, 2)?)
        };
        // The three projections as one matrix product; each result is a view of its output.
        let [query, key, value]: [Tensor; 3] =
            Linear::forward_stacked(&[&self.to_q, &self.to_k, &self.to_v], &sequence)?
                .try_into()
                .map_err(|_| Error::invalid("attention", "the stacked projection did not give three parts"))?;
        let (query, key, value) = (split_heads(query)?, split_heads(key)?, split_heads(value)?);
        let attended =
            Tensor::f_scaled_dot_product_attention(&query, &key, &value, None::<Tensor>, 0.0, false, None, false)?;
        let merged = attended.f_transpose(1, 2)?.f_reshape([batch, tokens, self.heads * self.head_dim])?;
        let projected = self.to_out.forward(&merged)?;
        let spatial = projected.f_transpose(-1, -2)?.f_reshape([batch, channels, height, width])?;
        divide_unless_one(spatial.f_add(input)?, self.rescale_output_factor)
    }

    /// The input gradient from the output gradient: the block is small (it runs at low
    /// resolution), so it is recomputed under autograd from its input.
    pub fn backward(&self, input: &Tensor, grad: &Tensor) -> Result<Tensor> {
        local_vjp1(input, grad, |x| self.forward(x))
    }
}

/// diffusers' `Downsample2D(use_conv=True)`: a stride-2 3x3 convolution; with `padding == 0` the
/// input is first zero-padded by one row/column at the bottom/right.
#[derive(Debug)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
    padding: i64,
}

impl Downsample2D {
    pub fn new(path: &Path, channels: i64, padding: i64, init: ParamInit) -> Result<Self> {
        Ok(Downsample2D { conv: Conv2d::new(&(path / "conv"), channels, channels, 3, 2, padding, init)?, padding })
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour x2, then a 3x3 convolution.
#[derive(Debug)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(path: &Path, channels: i64, init: ParamInit) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::new(&(path / "conv"), channels, channels, 3, 1, 1, init)? })
    }
}

/// A convolutional resampling layer ([`Downsample2D`], [`Upsample2D`]).
trait ConvResample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor>;
    /// The input gradient from the output gradient (`input`: what the forward pass was given).
    fn backward(&self, input: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

impl ConvResample for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            self.conv.forward(&xs.f_constant_pad_nd([0, 1, 0, 1])?)
        } else {
            self.conv.forward(xs)
        }
    }

    fn backward(&self, input: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (height, width) = spatial(input);
        if self.padding == 0 {
            let padded = self.conv.input_grad(grad, (height + 1, width + 1))?;
            Ok(padded.f_narrow(2, 0, height)?.f_narrow(3, 0, width)?)
        } else {
            self.conv.input_grad(grad, (height, width))
        }
    }
}

impl ConvResample for Upsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(&nearest_2x(xs)?)
    }

    fn backward(&self, input: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (height, width) = spatial(input);
        let upsampled = self.conv.input_grad(grad, (2 * height, 2 * width))?;
        Ok(Tensor::f_upsample_nearest2d_backward(&upsampled, [2 * height, 2 * width], input.size(), 2.0, 2.0)?)
    }
}

/// The resolution change at the end of a down or up block: a resampling convolution, or a residual
/// block that resamples.
#[derive(Debug)]
enum Resampler<C> {
    Conv(C),
    Resnet(Box<ResnetBlock2D>),
}

impl<C: ConvResample> Resampler<C> {
    /// With a `tape`, records what [`Self::backward`] needs, the input included.
    fn forward(
        &self,
        input: &Tensor,
        temb: &mut TimeProjections,
        train: bool,
        mut tape: Option<&mut Tape>,
    ) -> Result<Tensor> {
        let output = match self {
            Resampler::Conv(conv) => conv.forward(input)?,
            Resampler::Resnet(resnet) => resnet.forward(input, temb, train, tape.as_deref_mut())?,
        };
        record(&mut tape, input);
        Ok(output)
    }

    fn backward(&self, grad: &Tensor, tape: &mut Tape, temb_grads: &mut Vec<Tensor>) -> Result<Tensor> {
        let input = tape.pop()?;
        match self {
            Resampler::Conv(conv) => conv.backward(&input, grad),
            Resampler::Resnet(resnet) => resnet.backward(&input, grad, tape, temb_grads),
        }
    }

    /// The residual block's time projection, if this is one.
    fn time_projection(&self) -> Option<&Linear> {
        match self {
            Resampler::Conv(_) => None,
            Resampler::Resnet(resnet) => Some(resnet.time_projection()),
        }
    }
}

/// The resolution change at the end of a down block.
type Downsampler = Resampler<Downsample2D>;

/// The resolution change at the end of an up block.
type Upsampler = Resampler<Upsample2D>;

/// diffusers' `DownBlock2D` / `AttnDownBlock2D`: residual blocks (each followed by attention in the
/// attention variant), then an optional downsampler. Returns every intermediate state as a skip.
#[derive(Debug)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    downsampler: Option<Downsampler>,
}

impl DownBlock {
    pub fn new(
        path: &Path,
        arch: &Architecture,
        level: usize,
        in_channels: i64,
        settings: &ResnetSettings,
    ) -> Result<Self> {
        let kind = arch.down_levels[level];
        let out_channels = arch.block_out_channels[level];
        let is_last = level + 1 == arch.block_out_channels.len();
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for layer in 0..arch.layers_per_block {
            let resnet_in = if layer == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock2D::new(&(path / "resnets" / layer), resnet_in, out_channels, 1.0, settings)?);
            if kind == LevelKind::Attention {
                attentions.push(Attention::of_level(
                    &(path / "attentions" / layer),
                    arch,
                    out_channels,
                    settings.init,
                )?);
            }
        }
        let sampler_path = path / "downsamplers" / 0;
        // Only the attention variant honours `downsample_type`; DownBlock2D always convolves.
        let downsampler = match (is_last, kind, arch.downsample) {
            (true, _, _) => None,
            (false, LevelKind::Attention, ResampleKind::Resnet) => {
                Some(Downsampler::Resnet(Box::new(ResnetBlock2D::with_resample(
                    &sampler_path,
                    out_channels,
                    out_channels,
                    1.0,
                    settings,
                    ResnetResample::Down,
                )?)))
            }
            (false, _, _) => Some(Downsampler::Conv(Downsample2D::new(
                &sampler_path,
                out_channels,
                arch.downsample_padding,
                settings.init,
            )?)),
        };
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    /// Appends the residual blocks' time projections in the order they run.
    pub fn time_projections<'a>(&'a self, out: &mut Vec<&'a Linear>) {
        out.extend(self.resnets.iter().map(ResnetBlock2D::time_projection));
        out.extend(self.downsampler.as_ref().and_then(Downsampler::time_projection));
    }

    /// Returns the block output and appends the skip states to `skips`.
    pub fn forward(
        &self,
        input: &Tensor,
        temb: &mut TimeProjections,
        train: bool,
        skips: &mut Vec<Tensor>,
        mut tape: Option<&mut Tape>,
    ) -> Result<Tensor> {
        let mut hidden = input.shallow_clone();
        for (layer, resnet) in self.resnets.iter().enumerate() {
            let output = resnet.forward(&hidden, temb, train, tape.as_deref_mut())?;
            record(&mut tape, &hidden);
            hidden = output;
            if let Some(attention) = self.attentions.get(layer) {
                let output = attention.forward(&hidden)?;
                record(&mut tape, &hidden);
                hidden = output;
            }
            skips.push(hidden.shallow_clone());
        }
        if let Some(downsampler) = &self.downsampler {
            hidden = downsampler.forward(&hidden, temb, train, tape)?;
            skips.push(hidden.shallow_clone());
        }
        Ok(hidden)
    }

    /// The input gradient from the output gradient `grad` after a taped forward pass; takes the
    /// gradients of this block's skip states from the end of `skip_grads`.
    pub fn backward(
        &self,
        grad: &Tensor,
        tape: &mut Tape,
        skip_grads: &mut Vec<Tensor>,
        temb_grads: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut grad = grad.shallow_clone();
        if let Some(downsampler) = &self.downsampler {
            grad = downsampler.backward(&grad.f_add(&pop_skip_grad(skip_grads)?)?, tape, temb_grads)?;
        }
        for (layer, resnet) in self.resnets.iter().enumerate().rev() {
            grad = grad.f_add(&pop_skip_grad(skip_grads)?)?;
            if let Some(attention) = self.attentions.get(layer) {
                grad = attention.backward(&tape.pop()?, &grad)?;
            }
            let input = tape.pop()?;
            grad = resnet.backward(&input, &grad, tape, temb_grads)?;
        }
        Ok(grad)
    }
}

/// The most recent skip state (forward pass) or skip-state gradient (backward pass) not yet used;
/// `what` names the pass in the error of an inconsistent network.
pub(crate) fn pop_skip(skips: &mut Vec<Tensor>, what: &str) -> Result<Tensor> {
    skips.pop().ok_or_else(|| Error::invalid(what, "ran out of skip connections (inconsistent network)"))
}

/// [`pop_skip`] in the backward pass.
pub(crate) fn pop_skip_grad(skip_grads: &mut Vec<Tensor>) -> Result<Tensor> {
    pop_skip(skip_grads, "UNet backward pass")
}

/// diffusers' `UNetMidBlock2D`: residual block, then (attention, residual block) per layer.
#[derive(Debug)]
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Option<Attention>>,
}

impl MidBlock {
    pub fn new(path: &Path, arch: &Architecture, settings: &ResnetSettings) -> Result<Self> {
        let channels =
            *arch.block_out_channels.last().ok_or_else(|| Error::invalid("block_out_channels", "must not be empty"))?;
        let scale = arch.mid_block_scale_factor;
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(&(path / "resnets" / i), channels, channels, scale, settings))
            .collect::<Result<Vec<_>>>()?;
        let attention = if arch.add_attention {
            let groups_key = if arch.mid_attention_groups == Some(arch.norm_num_groups) {
                "norm_num_groups"
            } else {
                "attn_norm_num_groups"
            };
            Some(Attention::new(
                &(path / "attentions" / 0),
                channels,
                arch.attention_head_dim,
                arch.mid_attention_groups.map(|groups| (groups, arch.norm_eps, groups_key)),
                scale,
                settings.init,
            )?)
        } else {
            None
        };
        Ok(MidBlock { resnets, attentions: vec![attention] })
    }

    /// Appends the residual blocks' time projections in the order they run.
    pub fn time_projections<'a>(&'a self, out: &mut Vec<&'a Linear>) {
        out.extend(self.resnets.iter().map(ResnetBlock2D::time_projection));
    }

    pub fn forward(
        &self,
        input: &Tensor,
        temb: &mut TimeProjections,
        train: bool,
        mut tape: Option<&mut Tape>,
    ) -> Result<Tensor> {
        let mut hidden = self.resnets[0].forward(input, temb, train, tape.as_deref_mut())?;
        record(&mut tape, input);
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            if let Some(attention) = attention {
                let output = attention.forward(&hidden)?;
                record(&mut tape, &hidden);
                hidden = output;
            }
            let output = resnet.forward(&hidden, temb, train, tape.as_deref_mut())?;
            record(&mut tape, &hidden);
            hidden = output;
        }
        Ok(hidden)
    }

    /// The input gradient from the output gradient after a taped forward pass.
    pub fn backward(&self, grad: &Tensor, tape: &mut Tape, temb_grads: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut grad = grad.shallow_clone();
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]).rev() {
            let input = tape.pop()?;
            grad = resnet.backward(&input, &grad, tape, temb_grads)?;
            if let Some(attention) = attention {
                grad = attention.backward(&tape.pop()?, &grad)?;
            }
        }
        let input = tape.pop()?;
        self.resnets[0].backward(&input, &grad, tape, temb_grads)
    }
}

/// diffusers' `UpBlock2D` / `AttnUpBlock2D`: `layers_per_block + 1` residual blocks, each fed the
/// concatenation of the running state and one skip state (each followed by attention in the
/// attention variant), then an optional upsampler.
#[derive(Debug)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    upsampler: Option<Upsampler>,
}

impl UpBlock {
    /// `level` counts from the coarsest resolution (diffusers' `up_blocks` index).
    pub fn new(path: &Path, arch: &Architecture, level: usize, settings: &ResnetSettings) -> Result<Self> {
        let kind = arch.up_levels[level];
        let reversed: Vec<i64> = arch.block_out_channels.iter().rev().copied().collect();
        let last = reversed.len() - 1;
        let out_channels = reversed[level];
        let prev_output_channels = reversed[level.saturating_sub(1)];
        let skip_channels_of_last = reversed[(level + 1).min(last)];
        let num_layers = arch.layers_per_block + 1;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for layer in 0..num_layers {
            let skip_channels = if layer == num_layers - 1 { skip_channels_of_last } else { out_channels };
            let resnet_in = if layer == 0 { prev_output_channels } else { out_channels };
            resnets.push(ResnetBlock2D::new(
                &(path / "resnets" / layer),
                resnet_in + skip_channels,
                out_channels,
                1.0,
                settings,
            )?);
            if kind == LevelKind::Attention {
                attentions.push(Attention::of_level(
                    &(path / "attentions" / layer),
                    arch,
                    out_channels,
                    settings.init,
                )?);
            }
        }
        let sampler_path = path / "upsamplers" / 0;
        // Only the attention variant honours `upsample_type`; UpBlock2D always convolves.
        let upsampler = match (level == last, kind, arch.upsample) {
            (true, _, _) => None,
            (false, LevelKind::Attention, ResampleKind::Resnet) => {
                Some(Upsampler::Resnet(Box::new(ResnetBlock2D::with_resample(
                    &sampler_path,
                    out_channels,
                    out_channels,
                    1.0,
                    settings,
                    ResnetResample::Up,
                )?)))
            }
            (false, _, _) => Some(Upsampler::Conv(Upsample2D::new(&sampler_path, out_channels, settings.init)?)),
        };
        Ok(UpBlock { resnets, attentions, upsampler })
    }

    /// Appends the residual blocks' time projections in the order they run.
    pub fn time_projections<'a>(&'a self, out: &mut Vec<&'a Linear>) {
        out.extend(self.resnets.iter().map(ResnetBlock2D::time_projection));
        out.extend(self.upsampler.as_ref().and_then(Upsampler::time_projection));
    }

    /// Consumes one skip state per residual block from the end of `skips`.
    pub fn forward(
        &self,
        input: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &mut TimeProjections,
        train: bool,
        mut tape: Option<&mut Tape>,
    ) -> Result<Tensor> {
        let mut hidden = input.shallow_clone();
        for (layer, resnet) in self.resnets.iter().enumerate() {
            let skip = pop_skip(skips, "up block")?;
            let joined = Tensor::f_cat(&[&hidden, &skip], 1)?;
            let output = resnet.forward(&joined, temb, train, tape.as_deref_mut())?;
            // The two halves, not the concatenation: they are kept alive anyway.
            record(&mut tape, &hidden);
            record(&mut tape, &skip);
            hidden = output;
            if let Some(attention) = self.attentions.get(layer) {
                let output = attention.forward(&hidden)?;
                record(&mut tape, &hidden);
                hidden = output;
            }
        }
        if let Some(upsampler) = &self.upsampler {
            hidden = upsampler.forward(&hidden, temb, train, tape)?;
        }
        Ok(hidden)
    }

    /// The input gradient from the output gradient after a taped forward pass; appends the
    /// gradients of the skip states it consumed to `skip_grads` (last consumed first).
    pub fn backward(
        &self,
        grad: &Tensor,
        tape: &mut Tape,
        skip_grads: &mut Vec<Tensor>,
        temb_grads: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut grad = grad.shallow_clone();
        if let Some(upsampler) = &self.upsampler {
            grad = upsampler.backward(&grad, tape, temb_grads)?;
        }
        for (layer, resnet) in self.resnets.iter().enumerate().rev() {
            if let Some(attention) = self.attentions.get(layer) {
                grad = attention.backward(&tape.pop()?, &grad)?;
            }
            let skip = tape.pop()?;
            let hidden = tape.pop()?;
            let joined = Tensor::f_cat(&[&hidden, &skip], 1)?;
            let grad_joined = resnet.backward(&joined, &grad, tape, temb_grads)?;
            drop(joined);
            let channels = hidden.size()[1];
            skip_grads.push(grad_joined.f_narrow(1, channels, skip.size()[1])?);
            grad = grad_joined.f_narrow(1, 0, channels)?;
        }
        Ok(grad)
    }
}
