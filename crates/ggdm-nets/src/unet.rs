//! A native port of diffusers' `UNet2DModel` (diffusers 0.42.1) to tch: the noise-prediction
//! network of DDPM / DDIM checkpoints such as `google/ddpm-cifar10-32` and
//! `google/ddpm-ema-church-256`, queried at continuous timesteps `tau` (DESIGN.md section 4: "the
//! network is queried at continuous `tau`").
//!
//! * [`UNet2DConfig`] is diffusers' `config.json`, key for key; unsupported values are
//!   [`Error::Invalid`] naming the key.
//! * [`UNet2DModel`] owns its `VarStore`, whose variable names are diffusers' state-dict keys, so
//!   `diffusion_pytorch_model.safetensors` loads by name ([`UNet2DModel::load`]) and what
//!   [`UNet2DModel::save`] writes loads back in diffusers with `UNet2DModel.from_pretrained`.
//! * [`UNetDenoiser`] adds the prediction type (which lives in the scheduler config, not in the
//!   model) and implements [`Denoiser`].
//!
//! `forward` never switches gradients off: the output is differentiable with respect to the input
//! sample and to `tau` (through the time embedding), as the DDSS search requires.
//!
//! ```no_run
//! use ggdm_nets::unet::{UNet2DModel, UNetDenoiser};
//! use ggdm_core::{Denoiser, PredictionType};
//! # fn main() -> ggdm_core::Result<()> {
//! let unet = UNet2DModel::load("checkpoints/ddpm-cifar10-32", tch::Device::Cpu)?;
//! let denoiser = UNetDenoiser::new(unet, PredictionType::Epsilon);
//! let x = tch::Tensor::randn([4, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
//! let tau = tch::Tensor::from_slice(&[999.0f32, 500.5, 10.0, 0.0]);
//! let eps = denoiser.forward(&x, &tau)?;
//! # Ok(()) }
//! ```

mod blocks;
mod checkpoint;
mod config;
mod layers;
mod tape;

pub use checkpoint::{WeightStorage, CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_FILE_FP16, WEIGHTS_FILE_PICKLE};
pub use config::{SampleSize, UNet2DConfig, DIFFUSERS_REFERENCE_VERSION, UNET_2D_CLASS_NAME, UNET_2D_CONFIG_KEYS};

use crate::differentiable::{CallTape, DifferentiableDenoiser};
use crate::{Denoiser, Error, PredictionType, Result};
use blocks::{
    pop_skip_grad, DownBlock, MidBlock, ResnetSettings, TimeProjection, TimeProjections, TimestepEmbedding, UpBlock,
};
use config::{Activation, Architecture, TimeEmbeddingKind};
use layers::{Conv2d, GroupNorm, Linear, ParamInit};
use std::path::Path;
use tape::{local_vjp1, record, spatial, Tape};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// The layers of the network (their tensors are shallow copies of the `VarStore` variables).
struct UNet2DNetwork {
    arch: Architecture,
    conv_in: Conv2d,
    time_proj: TimeProjection,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DNetwork {
    fn build(var_store: &VarStore, arch: Architecture, init: ParamInit) -> Result<Self> {
        let root = var_store.root();
        let channels = &arch.block_out_channels;
        let conv_in = Conv2d::new(&(&root / "conv_in"), arch.in_channels, channels[0], 3, 1, 1, init)?;
        let (time_proj, projection_width) = TimeProjection::new(&(&root / "time_proj"), &arch, init)?;
        let time_embedding =
            TimestepEmbedding::new(&(&root / "time_embedding"), projection_width, arch.time_embed_dim, init)?;
        let settings = ResnetSettings {
            groups: arch.norm_num_groups,
            eps: arch.norm_eps,
            temb_channels: arch.time_embed_dim,
            activation: arch.activation,
            time_conditioning: arch.time_conditioning,
            dropout: arch.dropout,
            init,
        };
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut in_channels = channels[0];
        for (level, &out_channels) in channels.iter().enumerate() {
            down_blocks.push(DownBlock::new(&(&root / "down_blocks" / level), &arch, level, in_channels, &settings)?);
            in_channels = out_channels;
        }
        let mid_block =
            if arch.mid_block { Some(MidBlock::new(&(&root / "mid_block"), &arch, &settings)?) } else { None };
        let up_blocks = (0..channels.len())
            .map(|level| UpBlock::new(&(&root / "up_blocks" / level), &arch, level, &settings))
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = GroupNorm::new(
            &(&root / "conv_norm_out"),
            arch.norm_num_groups,
            channels[0],
            arch.norm_eps,
            "norm_num_groups",
            init,
        )?;
        let conv_out = Conv2d::new(&(&root / "conv_out"), channels[0], arch.out_channels, 3, 1, 1, init)?;
        Ok(UNet2DNetwork {
            arch,
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Every residual block's time projection, in the order the blocks run.
    fn time_projections(&self) -> Vec<&Linear> {
        let mut layers = Vec::new();
        for block in &self.down_blocks {
            block.time_projections(&mut layers);
        }
        if let Some(mid) = &self.mid_block {
            mid.time_projections(&mut layers);
        }
        for block in &self.up_blocks {
            block.time_projections(&mut layers);
        }
        layers
    }

    /// `act(time_embedding(time_proj(tau)))` in the network's `kind`: the input of the residual
    /// blocks' time projections.
    fn activated_time_embedding(&self, tau: &Tensor, kind: Kind) -> Result<Tensor> {
        // The projection is computed in the kind of `tau` (f32 for reduced-precision networks, as
        // diffusers does), then joins the network's kind.
        let projected = self.time_proj.forward(tau)?.f_to_kind(kind)?;
        let embedding = self.time_embedding.forward(&projected)?;
        // Every residual block applies the block activation to the embedding before its own
        // projection; computing it once is the same arithmetic.
        self.arch.activation.apply(&embedding)
    }

    /// `sample` and `tau` are already checked and converted (`[N, C, H, W]` in the network kind,
    /// `[N]` in the network kind or, for a half/bf16 network, f32). With a `tape` (a forward pass
    /// without autograd and dropout), records what [`Self::backward`] needs.
    fn forward(&self, sample: &Tensor, tau: &Tensor, train: bool, mut tape: Option<&mut Tape>) -> Result<Tensor> {
        let sample = if self.arch.center_input_sample {
            sample.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?
        } else {
            sample.shallow_clone()
        };
        let temb_activated = self.activated_time_embedding(tau, sample.kind())?;
        let mut temb = TimeProjections::new(&self.time_projections(), &temb_activated)?;

        let mut hidden = self.conv_in.forward(&sample)?;
        let mut skips = vec![hidden.shallow_clone()];
        for block in &self.down_blocks {
            hidden = block.forward(&hidden, &mut temb, train, &mut skips, tape.as_deref_mut())?;
        }
        if let Some(mid) = &self.mid_block {
            hidden = mid.forward(&hidden, &mut temb, train, tape.as_deref_mut())?;
        }
        for block in &self.up_blocks {
            hidden = block.forward(&hidden, &mut skips, &mut temb, train, tape.as_deref_mut())?;
        }
        temb.finish()?;
        let normed = self.conv_norm_out.forward_taped(&hidden, &mut tape)?;
        record(&mut tape, &hidden);
        let hidden = normed.f_silu()?;
        let output = self.conv_out.forward(&hidden)?;
        match self.arch.time_embedding {
            // Score-SDE convention kept by diffusers: the output is divided by the noise level.
            TimeEmbeddingKind::Fourier => Ok(output.f_div(&tau.f_to_kind(output.kind())?.f_view([-1, 1, 1, 1])?)?),
            TimeEmbeddingKind::Positional => Ok(output),
        }
    }

    /// `(dL/dsample, dL/dtau)` from `grad = dL/doutput` after a taped forward pass that returned
    /// `output` (of the sample's height and width).
    fn backward(&self, tape: &mut Tape, tau: &Tensor, output: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let kind = output.kind();
        // The Fourier variant's output is `raw / tau`.
        let (grad, grad_tau_direct) = match self.arch.time_embedding {
            TimeEmbeddingKind::Fourier => {
                let tau_column = tau.f_to_kind(kind)?.f_view([-1, 1, 1, 1])?;
                let grad_tau = grad
                    .f_mul(output)?
                    .f_sum_dim_intlist([1i64, 2, 3].as_slice(), false, tau.kind())?
                    .f_div(tau)?
                    .f_neg()?;
                (grad.f_div(&tau_column)?, Some(grad_tau))
            }
            TimeEmbeddingKind::Positional => (grad.shallow_clone(), None),
        };
        let normed = tape.pop()?;
        let grad = self.conv_out.input_grad(&grad, spatial(&normed))?;
        let mut grad = self.conv_norm_out.act_input_grad(Activation::Silu, &normed, &grad, tape)?;
        drop(normed);
        let mut skip_grads = Vec::new();
        let mut temb_grads = Vec::new();
        for block in self.up_blocks.iter().rev() {
            grad = block.backward(&grad, tape, &mut skip_grads, &mut temb_grads)?;
        }
        if let Some(mid) = &self.mid_block {
            grad = mid.backward(&grad, tape, &mut temb_grads)?;
        }
        for block in self.down_blocks.iter().rev() {
            grad = block.backward(&grad, tape, &mut skip_grads, &mut temb_grads)?;
        }
        let grad = grad.f_add(&pop_skip_grad(&mut skip_grads)?)?;
        if !skip_grads.is_empty() {
            return Err(Error::invalid(
                "UNet backward pass",
                "skip-state gradients were left over (inconsistent network)",
            ));
        }
        let grad_sample = self.conv_in.input_grad(&grad, spatial(output))?;
        let grad_sample = if self.arch.center_input_sample { grad_sample.f_mul_scalar(2.0)? } else { grad_sample };
        temb_grads.reverse();
        let grad_temb = Tensor::f_cat(&temb_grads, 1)?;
        drop(temb_grads);
        let layers = self.time_projections();
        let grad_tau =
            local_vjp1(tau, &grad_temb, |t| Linear::forward_joined(&layers, &self.activated_time_embedding(t, kind)?))?;
        let grad_tau = match grad_tau_direct {
            Some(direct) => grad_tau.f_add(&direct)?,
            None => grad_tau,
        };
        Ok((grad_sample, grad_tau))
    }
}

/// What [`UNet2DModel::forward_taped`] recorded for [`UNet2DModel::backward_taped`]: the inputs of
/// the residual and attention blocks and of the residual blocks' second norms (about a quarter of
/// the activations autograd keeps), plus the call's inputs.
#[derive(Debug)]
pub struct UNetTape {
    tape: Tape,
    /// `tau` as the network saw it (`[N]`, on the network's device).
    tau: Tensor,
    /// The call's output; it has the sample's height and width.
    output: Tensor,
    x_kind: Kind,
    tau_size: Vec<i64>,
    tau_kind: Kind,
    tau_device: Device,
}

/// diffusers' `UNet2DModel`: configuration, parameters (a `VarStore` named like diffusers' state
/// dict) and the forward pass at continuous timesteps.
pub struct UNet2DModel {
    config: UNet2DConfig,
    var_store: VarStore,
    network: UNet2DNetwork,
}

impl std::fmt::Debug for UNet2DModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UNet2DModel")
            .field("config", &self.config)
            .field("device", &self.var_store.device())
            .field("num_parameters", &self.num_parameters())
            .finish()
    }
}

impl UNet2DModel {
    /// A freshly initialised network (PyTorch's default initialisation) on `device`; its
    /// parameters are trainable. Errors name the config key that is invalid or unsupported.
    pub fn new(config: UNet2DConfig, device: Device) -> Result<Self> {
        Self::build(config, device, ParamInit::PyTorchDefault)
    }

    fn build(config: UNet2DConfig, device: Device, init: ParamInit) -> Result<Self> {
        let arch = config.architecture()?;
        let var_store = VarStore::new(device);
        let network = UNet2DNetwork::build(&var_store, arch, init)?;
        Ok(UNet2DModel { config, var_store, network })
    }

    /// Loads a diffusers model directory: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or, if only that exists, `diffusion_pytorch_model.fp16.safetensors`). A pipeline folder
    /// whose `unet/` subfolder holds them works too. f16/bf16/f64 weights are converted to f32.
    ///
    /// Loading is strict by name: a missing key, an unexpected key or a shape mismatch is an error
    /// naming the key. Attention weights saved under diffusers' deprecated names (`query`, `key`,
    /// `value`, `proj_attn`) are accepted, as diffusers does.
    ///
    /// The loaded parameters are frozen (`requires_grad == false`): samplers differentiate through
    /// the network with respect to its inputs, never its weights. Call
    /// `var_store_mut().unfreeze()` to fine-tune.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = checkpoint::resolve_model_dir(dir.as_ref())?;
        let config = UNet2DConfig::from_json_file(dir.join(CONFIG_FILE))?;
        let weights = checkpoint::resolve_weights_file(&dir)?;
        let mut model = Self::build(config, device, ParamInit::Placeholder)?;
        model.load_weights(&weights)?;
        model.var_store.freeze();
        Ok(model)
    }

    /// Overwrites the parameters with a safetensors state dict (strict by name, see
    /// [`UNet2DModel::load`]). Trainability of the parameters is unchanged.
    pub fn load_weights(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors = checkpoint::read_safetensors(path)?;
        checkpoint::load_into(&self.var_store, tensors, path)
    }

    /// Saves in diffusers' layout: `dir/config.json` (with `_class_name: "UNet2DModel"`) and
    /// `dir/diffusion_pytorch_model.safetensors` in float32, each written atomically. Creates `dir`
    /// if needed. `diffusers.UNet2DModel.from_pretrained(dir)` loads the result.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_with_storage(dir, WeightStorage::F32)
    }

    /// [`UNet2DModel::save`] with the weights stored as `storage` (f16/bf16 halve the file; the
    /// file name stays `diffusion_pytorch_model.safetensors`).
    pub fn save_with_storage(&self, dir: impl AsRef<Path>, storage: WeightStorage) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        checkpoint::save_var_store(&self.var_store, &dir.join(WEIGHTS_FILE), storage)?;
        let config_text = self.config.to_json_string()?;
        let config_path = dir.join(CONFIG_FILE);
        checkpoint::write_atomically(&config_path, |temporary| {
            std::fs::write(temporary, &config_text).map_err(|e| Error::io(temporary, e))
        })
    }

    /// The network output for `x` (`N x C x H x W`) at timesteps `tau` (shape `[N]`, `[1]` or `[]`,
    /// any float or integer kind), in inference mode (dropout off). Differentiable with respect to
    /// `x` and `tau`.
    pub fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        self.forward_t(x, tau, false)
    }

    /// [`UNet2DModel::forward`] with dropout active when `train` is true.
    pub fn forward_t(&self, x: &Tensor, tau: &Tensor, train: bool) -> Result<Tensor> {
        let (x, tau) = self.prepare_inputs(x, tau)?;
        self.network.forward(&x, &tau, train, None)
    }

    /// [`UNet2DModel::forward`] without autograd, recording a tape from which
    /// [`UNet2DModel::backward_taped`] computes the input gradients: the memory-lean way to keep a
    /// call for its backward pass (see the `tape` module). The output does not require grad.
    pub fn forward_taped(&self, x: &Tensor, tau: &Tensor) -> Result<(Tensor, UNetTape)> {
        let (prepared_x, prepared_tau) = self.prepare_inputs(x, tau)?;
        tch::no_grad(|| {
            let mut tape = Tape::default();
            let output = self.network.forward(&prepared_x, &prepared_tau, false, Some(&mut tape))?;
            let recorded = UNetTape {
                tape,
                tau: prepared_tau,
                output: output.shallow_clone(),
                x_kind: x.kind(),
                tau_size: tau.size(),
                tau_kind: tau.kind(),
                tau_device: tau.device(),
            };
            Ok((output, recorded))
        })
    }

    /// `(dL/dx, dL/dtau)` of `L = sum(output * grad_out)` for the call `tape` recorded, in the
    /// shapes and kinds `x` and `tau` had: the gradients autograd would give through
    /// [`UNet2DModel::forward`] (no gradient of the weights is computed).
    pub fn backward_taped(&self, tape: UNetTape, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let UNetTape { mut tape, tau, output, x_kind, tau_size, tau_kind, tau_device } = tape;
        if grad_out.size() != output.size() {
            return Err(Error::Shape {
                what: "UNet2DModel output gradient".into(),
                expected: format!("{:?} like the output", output.size()),
                got: grad_out.size(),
            });
        }
        tch::no_grad(|| {
            let grad = grad_out.f_to_device(output.device())?.f_to_kind(output.kind())?;
            let (grad_x, grad_tau) = self.network.backward(&mut tape, &tau, &output, &grad)?;
            tape.finish()?;
            let grad_x = grad_x.f_to_kind(x_kind)?;
            // `tau` was broadcast to one value per sample: sum back to the shape it came in.
            let grad_tau = if tau_size.iter().product::<i64>() == grad_tau.numel() as i64 {
                grad_tau.f_reshape(&tau_size)?
            } else {
                grad_tau.f_sum(grad_tau.kind())?.f_reshape(&tau_size)?
            };
            let grad_tau = match tau_kind {
                Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => grad_tau.f_to_kind(tau_kind)?,
                _ => grad_tau,
            };
            Ok((grad_x, grad_tau.f_to_device(tau_device)?))
        })
    }

    /// Checks shapes, device and kind of the inputs; converts them to the parameters' kind and
    /// broadcasts `tau` to `[N]`.
    fn prepare_inputs(&self, x: &Tensor, tau: &Tensor) -> Result<(Tensor, Tensor)> {
        let size = x.size();
        let &[batch, channels, height, width] = size.as_slice() else {
            return Err(Error::Shape {
                what: "UNet2DModel input x".into(),
                expected: "N x C x H x W".into(),
                got: size,
            });
        };
        let arch = &self.network.arch;
        if channels != arch.in_channels {
            return Err(Error::Shape {
                what: "UNet2DModel input x".into(),
                expected: format!("{} channels (in_channels of config.json)", arch.in_channels),
                got: size,
            });
        }
        let factor = 1i64 << (arch.block_out_channels.len() - 1);
        if height % factor != 0 || width % factor != 0 {
            return Err(Error::Shape {
                what: "UNet2DModel input x".into(),
                expected: format!(
                    "height and width divisible by {factor} (2^(levels - 1) for {} levels)",
                    arch.block_out_channels.len()
                ),
                got: size,
            });
        }
        let device = self.var_store.device();
        if x.device() != device {
            return Err(Error::invalid(
                "UNet2DModel input x",
                format!("is on {:?} but the model is on {device:?}", x.device()),
            ));
        }
        let kind = self.network.conv_in.kind();
        if !x.is_floating_point() {
            return Err(Error::invalid(
                "UNet2DModel input x",
                format!("must be a floating-point tensor, got {:?}", x.kind()),
            ));
        }
        let x = if x.kind() == kind { x.shallow_clone() } else { x.f_to_kind(kind)? };
        let tau = match tau.size().as_slice() {
            [] | [1] => tau.f_reshape([1])?.f_expand([batch], false)?,
            [n] if *n == batch => tau.shallow_clone(),
            _ => {
                return Err(Error::Shape {
                    what: "UNet2DModel timesteps tau".into(),
                    expected: format!("[{batch}], [1] or [] (one timestep per sample)"),
                    got: tau.size(),
                })
            }
        };
        let tau = tau.f_to_device(device)?;
        // bf16 cannot even hold the timestep 999 (it rounds to 1000): a half/bf16 network takes its
        // timesteps in f32.
        let tau_kind = match kind {
            Kind::BFloat16 | Kind::Half => Kind::Float,
            other => other,
        };
        let tau = if tau.kind() == tau_kind { tau } else { tau.f_to_kind(tau_kind)? };
        Ok((x, tau))
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &UNet2DConfig {
        &self.config
    }

    /// The parameters, named like diffusers' state dict.
    pub fn var_store(&self) -> &VarStore {
        &self.var_store
    }

    /// The parameters, mutably (to move them, change their kind, or (un)freeze them).
    pub fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.var_store
    }

    /// Gives every 4-D weight (the convolutions) channels-last strides, PyTorch's
    /// `model.to(memory_format=torch.channels_last)`: cuDNN then runs NHWC kernels when the input is
    /// channels-last too (see [`crate::model_dir::ChannelsLastDenoiser`]). Values are unchanged.
    pub fn to_channels_last(&mut self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (_, mut variable) in self.var_store.variables() {
                if variable.dim() == 4 {
                    let converted = crate::model_dir::to_channels_last(&variable)?;
                    variable.f_set_data(&converted)?;
                }
            }
            Ok(())
        })
    }

    /// Total number of parameters (diffusers' `num_parameters()`, fixed Fourier features included).
    pub fn num_parameters(&self) -> i64 {
        self.var_store.variables().values().map(|t| t.numel() as i64).sum()
    }

    /// Parameter names and shapes, sorted by name (diffusers' state-dict keys).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let mut shapes: Vec<(String, Vec<i64>)> =
            self.var_store.variables().into_iter().map(|(name, tensor)| (name, tensor.size())).collect();
        shapes.sort();
        shapes
    }

    /// The device of the parameters.
    pub fn device(&self) -> Device {
        self.var_store.device()
    }

    /// The floating-point kind of the parameters.
    pub fn kind(&self) -> Kind {
        self.network.conv_in.kind()
    }

    /// `[C, H, W]` of the samples when the config fixes `sample_size`.
    pub fn sample_shape(&self) -> Option<[i64; 3]> {
        self.config.sample_shape()
    }
}

/// A [`UNet2DModel`] with the prediction convention it was trained for: the [`Denoiser`] the
/// samplers use. The prediction type comes from the checkpoint's scheduler config (default
/// epsilon, diffusers' default).
#[derive(Debug)]
pub struct UNetDenoiser {
    model: UNet2DModel,
    prediction_type: PredictionType,
}

impl UNetDenoiser {
    /// Wraps `model`, declaring what its output is.
    pub fn new(model: UNet2DModel, prediction_type: PredictionType) -> Self {
        UNetDenoiser { model, prediction_type }
    }

    /// [`UNet2DModel::load`] wrapped as an epsilon-predicting denoiser; set the prediction type
    /// from the scheduler config with [`UNetDenoiser::with_prediction_type`].
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        Ok(Self::new(UNet2DModel::load(dir, device)?, PredictionType::Epsilon))
    }

    /// The same network declared to predict `prediction_type`.
    pub fn with_prediction_type(mut self, prediction_type: PredictionType) -> Self {
        self.prediction_type = prediction_type;
        self
    }

    /// The wrapped network.
    pub fn model(&self) -> &UNet2DModel {
        &self.model
    }

    /// The wrapped network, mutably.
    pub fn model_mut(&mut self) -> &mut UNet2DModel {
        &mut self.model
    }

    /// Unwraps the network.
    pub fn into_model(self) -> UNet2DModel {
        self.model
    }
}

impl Denoiser for UNetDenoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        self.model.forward(x, tau)
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn sample_shape(&self) -> Option<[i64; 3]> {
        self.model.sample_shape()
    }
}

impl DifferentiableDenoiser for UNetDenoiser {
    fn forward_taped(&self, x: &Tensor, tau: &Tensor) -> Result<Option<(Tensor, CallTape)>> {
        let (output, tape) = self.model.forward_taped(x, tau)?;
        Ok(Some((output, CallTape::new(tape))))
    }

    fn backward_taped(&self, tape: CallTape, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        self.model.backward_taped(tape.downcast::<UNetTape>()?, grad_out)
    }
}
