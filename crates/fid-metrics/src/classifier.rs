//! Domain classifiers: small CNNs trained on the labels of the data set (Fashion-MNIST here), whose
//! penultimate layer is a feature set for the KID loss of the search and for a "classifier-FID"
//! (DESIGN.md section 4, "DDSS objective" and "Metrics": KID and FID are computed on features of
//! samples; any [`FeatureExtractor`] can stand in for the Inception network).
//!
//! Two architectures, so that the network a sampler is optimised against differs from the one it
//! is judged by:
//!
//! * [`ClassifierArch::A`] (the search loss): `conv 3x3 (1->16) -> ReLU -> conv 3x3 (16->32) -> ReLU
//!   -> max-pool 2 -> conv 3x3 (32->64) -> ReLU -> max-pool 2 -> linear (64*7*7 -> 128) -> ReLU
//!   -> linear (128 -> 10)`. Features: the 128 activations after the last ReLU.
//! * [`ClassifierArch::B`] (held-out evaluation): five `conv 3x3 (no bias) -> GroupNorm(8) -> SiLU`
//!   blocks with channels 32, 64, 64, 128, 256 and strides 1, 2, 1, 2, 1 (28 -> 14 -> 7), global
//!   average pooling, `linear (256 -> 10)`. Features: the 256 pooled activations.
//!
//! All convolutions pad by 1. Tensor names follow PyTorch state dicts (`conv1.weight`,
//! `blocks.0.norm.bias`, `head.weight`, ...), so the weights load into the equivalent PyTorch
//! modules; for arch `a`:
//! ```python
//! class A(nn.Module):
//!     def __init__(self):
//!         super().__init__()
//!         self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
//!         self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
//!         self.fc, self.head = nn.Linear(64 * 7 * 7, 128), nn.Linear(128, 10)
//!     def features(self, x):
//!         x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
//!         x = F.max_pool2d(F.relu(self.conv3(x)), 2)
//!         return F.relu(self.fc(x.flatten(1)))
//! ```
//! and for arch `b` (`blocks` an `nn.Sequential` of modules with attributes `conv` and `norm`):
//! ```python
//! class Block(nn.Module):
//!     def __init__(self, c_in, c_out, stride):
//!         super().__init__()
//!         self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
//!         self.norm = nn.GroupNorm(8, c_out)
//!     def forward(self, x):
//!         return F.silu(self.norm(self.conv(x)))
//! # features(x) = blocks(x).mean((2, 3)); logits = head(features), head = nn.Linear(256, 10)
//! ```
//! (Both load with `load_state_dict(safetensors.torch.load_file(path), strict=True)` and give the
//! same features as this module.)
//!
//! Input: samples in [-1, 1], N x C x H x W. Three channels are averaged to one grey channel, and
//! other sizes than 28x28 are resized bilinearly (`align_corners = false`) to 28x28. The whole path
//! is differentiable with respect to the input.
//!
//! A classifier is stored as a safetensors file plus a JSON sidecar next to it with the same stem
//! (`fmnist-classifier-a.safetensors` + `fmnist-classifier-a.json`, see [`ClassifierInfo`]).
//! Training ([`train_classifier`]) is Adam on the cross-entropy with a cosine learning-rate
//! decay, seeded mini-batch shuffling, seeded initialisation and an optional random horizontal
//! flip; all randomness comes from the crate's [`SplitMix64`], so a seed gives the same network on
//! the same CPU setup.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::features::FeatureExtractor;
use crate::named_weights::{copy_by_name, CopyError};
use crate::rng::SplitMix64;

/// Value of [`ClassifierInfo::format`].
pub const SIDECAR_FORMAT: &str = "ddss-domain-classifier";
/// Value of [`ClassifierInfo::version`] this crate writes and reads.
pub const SIDECAR_VERSION: u32 = 1;
/// Height and width the networks take.
pub const INPUT_SIZE: i64 = 28;
/// Number of classes (Fashion-MNIST has 10).
pub const NUM_CLASSES: i64 = 10;
/// Groups of every GroupNorm of arch `b`.
const GROUP_NORM_GROUPS: i64 = 8;
/// GroupNorm epsilon (PyTorch's default).
const GROUP_NORM_EPS: f64 = 1e-5;

/// The two classifier architectures (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClassifierArch {
    /// Plain conv/max-pool network with a 128-d fully connected feature layer (search loss).
    #[serde(rename = "a")]
    A,
    /// GroupNorm/SiLU network with global average pooling to 256-d features (evaluation).
    #[serde(rename = "b")]
    B,
}

impl ClassifierArch {
    /// Parses `a` or `b`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "a" => Ok(Self::A),
            "b" => Ok(Self::B),
            other => Err(Error::invalid("classifier architecture", format!("`{other}`: expected `a` or `b`"))),
        }
    }

    /// `"a"` or `"b"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    /// Length of the feature vector (128 for `a`, 256 for `b`).
    pub fn feature_dim(self) -> usize {
        match self {
            Self::A => 128,
            Self::B => 256,
        }
    }

    /// A one-line description of the layers.
    pub fn describe(self) -> &'static str {
        match self {
            Self::A => {
                "conv3x3 1->16, ReLU, conv3x3 16->32, ReLU, maxpool2, conv3x3 32->64, ReLU, maxpool2, \
                 fc 3136->128, ReLU (features), fc 128->10"
            }
            Self::B => {
                "5 x [conv3x3 (no bias), GroupNorm(8), SiLU] with channels 32/64/64/128/256 and strides \
                 1/2/1/2/1, global average pool (features, 256), fc 256->10"
            }
        }
    }
}

impl std::fmt::Display for ClassifierArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON sidecar of a classifier weights file: what network it is and how it was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierInfo {
    /// Always [`SIDECAR_FORMAT`].
    pub format: String,
    /// Always [`SIDECAR_VERSION`].
    pub version: u32,
    /// The architecture.
    pub arch: ClassifierArch,
    /// Length of the feature vector; must equal the architecture's.
    pub feature_dim: usize,
    /// Training seed (initialisation, shuffling, augmentation).
    pub seed: u64,
    /// Training epochs (0 for an untrained network).
    pub epochs: usize,
    /// Accuracy on the test split, if it was measured.
    pub test_accuracy: Option<f64>,
    /// What the network was trained on, in words (e.g. `"fashion-mnist train 60k"`).
    pub data: String,
    /// Mini-batch size of the training run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Peak learning rate of the training run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Whether random horizontal flips were used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<bool>,
    /// Wall-clock training time in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
}

impl ClassifierInfo {
    /// The sidecar of an untrained network.
    pub fn untrained(arch: ClassifierArch, seed: u64) -> Self {
        Self {
            format: SIDECAR_FORMAT.to_string(),
            version: SIDECAR_VERSION,
            arch,
            feature_dim: arch.feature_dim(),
            seed,
            epochs: 0,
            test_accuracy: None,
            data: "untrained".to_string(),
            batch_size: None,
            learning_rate: None,
            augment: None,
            train_seconds: None,
        }
    }
}

/// Where the sidecar of a weights file lives: the same path with the extension `.json`.
pub fn sidecar_path(weights_path: &Path) -> PathBuf {
    weights_path.with_extension("json")
}

/// A 3x3 convolution with padding 1.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_conv2d(&self.weight, self.bias.as_ref(), [self.stride, self.stride], [1, 1], [1, 1], 1)?)
    }
}

/// A fully connected layer `x W^T + b`.
#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, Some(&self.bias))?)
    }
}

/// GroupNorm with a per-channel affine transform.
#[derive(Debug)]
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
}

impl GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_group_norm(GROUP_NORM_GROUPS, Some(&self.weight), Some(&self.bias), GROUP_NORM_EPS, false)?)
    }
}

/// The layers of one architecture.
#[derive(Debug)]
enum Network {
    A { conv1: Conv, conv2: Conv, conv3: Conv, fc: Dense, head: Dense },
    B { blocks: Vec<(Conv, GroupNorm)>, head: Dense },
}

/// (input channels, output channels, stride) of the blocks of arch `b`.
const ARCH_B_BLOCKS: [(i64, i64, i64); 5] = [(1, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 256, 1)];

/// Creates the variables of `arch` under `root` with a seeded initialisation: convolution and
/// feature-layer weights Kaiming-uniform for ReLU (`U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`), the
/// classification head `U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))`, biases 0, GroupNorm scale 1 and
/// shift 0. Variables are created in name order.
fn build_network(root: &nn::Path, arch: ClassifierArch, seed: u64) -> Result<Network> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed_c1a5_51f1_e700);
    let mut uniform = |dims: &[i64], bound: f64| -> Result<Tensor> {
        let count: i64 = dims.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| {
                let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * unit - 1.0) * bound) as f32
            })
            .collect();
        Ok(Tensor::from_slice(&values).f_reshape(dims)?)
    };
    let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
    let ones = |n: i64| Tensor::ones([n], (Kind::Float, Device::Cpu));
    let conv = |path: &nn::Path,
                uniform: &mut dyn FnMut(&[i64], f64) -> Result<Tensor>,
                c_in: i64,
                c_out: i64,
                stride: i64,
                with_bias: bool|
     -> Result<Conv> {
        let fan_in = (c_in * 9) as f64;
        let weight = path.f_var_copy("weight", &uniform(&[c_out, c_in, 3, 3], (6.0 / fan_in).sqrt())?)?;
        let bias = if with_bias { Some(path.f_var_copy("bias", &zeros(c_out))?) } else { None };
        Ok(Conv { weight, bias, stride })
    };
    let dense = |path: &nn::Path,
                 uniform: &mut dyn FnMut(&[i64], f64) -> Result<Tensor>,
                 c_in: i64,
                 c_out: i64,
                 bound: f64|
     -> Result<Dense> {
        let weight = path.f_var_copy("weight", &uniform(&[c_out, c_in], bound)?)?;
        let bias = path.f_var_copy("bias", &zeros(c_out))?;
        Ok(Dense { weight, bias })
    };
    match arch {
        ClassifierArch::A => {
            let conv1 = conv(&(root / "conv1"), &mut uniform, 1, 16, 1, true)?;
            let conv2 = conv(&(root / "conv2"), &mut uniform, 16, 32, 1, true)?;
            let conv3 = conv(&(root / "conv3"), &mut uniform, 32, 64, 1, true)?;
            let flat = 64 * 7 * 7;
            let fc = dense(&(root / "fc"), &mut uniform, flat, 128, (6.0 / flat as f64).sqrt())?;
            let head = dense(&(root / "head"), &mut uniform, 128, NUM_CLASSES, 1.0 / 128f64.sqrt())?;
            Ok(Network::A { conv1, conv2, conv3, fc, head })
        }
        ClassifierArch::B => {
            let mut blocks = Vec::with_capacity(ARCH_B_BLOCKS.len());
            for (index, &(c_in, c_out, stride)) in ARCH_B_BLOCKS.iter().enumerate() {
                let block = root / "blocks" / index;
                let conv = conv(&(&block / "conv"), &mut uniform, c_in, c_out, stride, false)?;
                let norm_path = &block / "norm";
                let norm = GroupNorm {
                    weight: norm_path.f_var_copy("weight", &ones(c_out))?,
                    bias: norm_path.f_var_copy("bias", &zeros(c_out))?,
                };
                blocks.push((conv, norm));
            }
            let width = ARCH_B_BLOCKS[ARCH_B_BLOCKS.len() - 1].1;
            let head = dense(&(root / "head"), &mut uniform, width, NUM_CLASSES, 1.0 / (width as f64).sqrt())?;
            Ok(Network::B { blocks, head })
        }
    }
}

impl Network {
    /// N x 1 x 28 x 28 network input -> (features, logits).
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Network::A { conv1, conv2, conv3, fc, head } => {
                let h = conv1.forward(x)?.f_relu()?;
                let h = conv2.forward(&h)?.f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
                let h = conv3.forward(&h)?.f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
                let features = fc.forward(&h.f_flatten(1, -1)?)?.f_relu()?;
                let logits = head.forward(&features)?;
                Ok((features, logits))
            }
            Network::B { blocks, head } => {
                let mut h = x.shallow_clone();
                for (conv, norm) in blocks {
                    h = norm.forward(&conv.forward(&h)?)?.f_silu()?;
                }
                let features = h.f_mean_dim(&[2i64, 3][..], false, Kind::Float)?;
                let logits = head.forward(&features)?;
                Ok((features, logits))
            }
        }
    }
}

/// Samples in [-1, 1] (N x C x H x W, C = 1 or 3) -> the N x 1 x 28 x 28 f32 network input on
/// `device`: channels averaged, bilinear resize when the size differs. Differentiable.
pub fn samples_to_classifier_input(x: &Tensor, device: Device) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 || !(size[1] == 1 || size[1] == 3) || size[2] < 1 || size[3] < 1 {
        return Err(Error::shape("classifier input samples", "N x C x H x W with C = 1 or 3", size));
    }
    let mut h = x.f_to_device(device)?.f_to_kind(Kind::Float)?;
    if size[1] == 3 {
        h = h.f_mean_dim(&[1i64][..], true, Kind::Float)?;
    }
    if size[2] != INPUT_SIZE || size[3] != INPUT_SIZE {
        h = h.f_upsample_bilinear2d([INPUT_SIZE, INPUT_SIZE], false, None, None)?;
    }
    Ok(h)
}

/// A domain classifier: features for KID/FID and class logits.
#[derive(Debug)]
pub struct DomainClassifier {
    var_store: nn::VarStore,
    network: Network,
    info: ClassifierInfo,
    name: String,
}

impl DomainClassifier {
    /// A freshly initialised (untrained, trainable) network; the seed fixes the initial weights.
    pub fn new(arch: ClassifierArch, seed: u64, device: Device) -> Result<Self> {
        let var_store = nn::VarStore::new(Device::Cpu);
        let network = build_network(&var_store.root(), arch, seed)?;
        let mut classifier = Self {
            var_store,
            network,
            info: ClassifierInfo::untrained(arch, seed),
            name: format!("classifier:arch-{arch}"),
        };
        // `set_device` replaces the data of every variable in place, so the layer handles follow.
        classifier.var_store.set_device(device);
        Ok(classifier)
    }

    /// Loads a classifier from its safetensors file and the JSON sidecar next to it (see
    /// [`sidecar_path`]). The network is frozen (no parameter gradients) but stays differentiable
    /// with respect to its input. Its [`FeatureExtractor::name`] is `classifier:<file stem>`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::weights(
                path,
                "classifier weights file not found (a domain classifier is a .safetensors file with a \
                 .json sidecar of the same name; `ddss-cli train-classifier` writes both)",
            ));
        }
        let sidecar = sidecar_path(path);
        let text = match std::fs::read_to_string(&sidecar) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::format(
                    &sidecar,
                    format!(
                        "sidecar of the classifier {} not found (it records the architecture; \
                         `ddss-cli train-classifier` writes it next to the weights)",
                        path.display()
                    ),
                ))
            }
            Err(e) => return Err(Error::io(&sidecar, e)),
        };
        let info: ClassifierInfo = serde_json::from_str(&text)
            .map_err(|e| Error::format(&sidecar, format!("not a valid classifier sidecar: {e}")))?;
        if info.format != SIDECAR_FORMAT || info.version != SIDECAR_VERSION {
            return Err(Error::format(
                &sidecar,
                format!(
                    "format `{}` version {}, expected `{SIDECAR_FORMAT}` version {SIDECAR_VERSION}",
                    info.format, info.version
                ),
            ));
        }
        if info.feature_dim != info.arch.feature_dim() {
            return Err(Error::format(
                &sidecar,
                format!(
                    "feature_dim {} does not match arch `{}` ({} features)",
                    info.feature_dim,
                    info.arch,
                    info.arch.feature_dim()
                ),
            ));
        }
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| Error::weights(path, format!("cannot read as safetensors: {e}")))?;
        let mut classifier = Self::new(info.arch, info.seed, Device::Cpu)?;
        classifier.copy_named_tensors(tensors, path)?;
        classifier.var_store.set_device(device);
        classifier.var_store.freeze();
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        classifier.name = format!("classifier:{stem}");
        classifier.info = info;
        Ok(classifier)
    }

    /// Writes the weights (f32 safetensors) and the sidecar, each atomically (temporary file in
    /// the same folder, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors = self
            .named_tensors()
            .into_iter()
            .map(|(name, t)| {
                Ok((name, t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?))
            })
            .collect::<Result<Vec<_>>>()?;
        ggdm_core::io::write_atomic_with(path, |temporary| {
            Tensor::write_safetensors(&tensors, temporary)
                .map_err(|e| Error::weights(path, format!("cannot write safetensors: {e}")))
        })?;
        let sidecar = sidecar_path(path);
        let mut json = serde_json::to_string_pretty(&self.info)
            .map_err(|e| Error::format(&sidecar, format!("cannot encode the sidecar: {e}")))?;
        json.push('\n');
        Ok(ggdm_core::io::write_atomic(&sidecar, json.as_bytes())?)
    }

    /// The sidecar information (architecture, training record).
    pub fn info(&self) -> &ClassifierInfo {
        &self.info
    }

    /// Replaces the training record (the architecture and feature dimension are kept).
    pub fn set_info(&mut self, mut info: ClassifierInfo) {
        info.arch = self.info.arch;
        info.feature_dim = self.info.arch.feature_dim();
        self.info = info;
    }

    /// The architecture.
    pub fn arch(&self) -> ClassifierArch {
        self.info.arch
    }

    /// Sets the name reported by [`FeatureExtractor::name`]. Returns the classifier.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// All weights by name (PyTorch state-dict names), sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors: Vec<(String, Tensor)> = self.var_store.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    }

    /// Number of scalar weights.
    pub fn num_parameters(&self) -> i64 {
        self.var_store.variables().values().map(|t| t.numel() as i64).sum()
    }

    /// Samples in [-1, 1] -> (features N x dim, logits N x 10), f32 on the classifier's device.
    /// Differentiable with respect to `x`.
    pub fn features_and_logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let input = samples_to_classifier_input(x, self.var_store.device())?;
        self.network.forward(&input)
    }

    /// Samples in [-1, 1] -> class logits N x 10.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.features_and_logits(x)?.1)
    }

    /// Fraction of `images` (samples in [-1, 1]) whose predicted class equals `labels`, evaluated
    /// in batches of `batch_size` without gradients.
    pub fn accuracy(&self, images: &Tensor, labels: &[u8], batch_size: usize) -> Result<f64> {
        let total = check_labelled(images, labels)?;
        if batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        let targets = Tensor::from_slice(labels).f_to_kind(Kind::Int64)?;
        let mut correct = 0i64;
        let mut start = 0usize;
        while start < total {
            let len = batch_size.min(total - start);
            let batch = images.f_narrow(0, start as i64, len as i64)?;
            let predicted = tch::no_grad(|| self.logits(&batch))?.f_argmax(1, false)?.f_to_device(Device::Cpu)?;
            let expected = targets.f_narrow(0, start as i64, len as i64)?;
            correct += predicted.f_eq_tensor(&expected)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            start += len;
        }
        Ok(correct as f64 / total.max(1) as f64)
    }

    /// Copies named tensors into the network; every tensor must be present with its exact shape
    /// and no other tensor may be.
    fn copy_named_tensors(&mut self, tensors: Vec<(String, Tensor)>, source: &Path) -> Result<()> {
        let mismatch = match copy_by_name(&self.var_store, tensors) {
            Ok(mismatch) => mismatch,
            Err(CopyError::Shape { name, got, want }) => {
                return Err(Error::weights(
                    source,
                    format!("tensor `{name}` has shape {got:?}, arch `{}` needs {want:?}", self.info.arch),
                ))
            }
            Err(CopyError::Torch(e)) => return Err(e.into()),
        };
        if !mismatch.is_empty() {
            return Err(Error::weights(
                source,
                format!(
                    "not the weights of a classifier of arch `{}` (as the sidecar says): missing {:?}, \
                     unexpected {:?}",
                    self.info.arch, mismatch.missing, mismatch.unexpected
                ),
            ));
        }
        Ok(())
    }
}

impl FeatureExtractor for DomainClassifier {
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.features_and_logits(x)?.0)
    }

    fn dim(&self) -> usize {
        self.info.arch.feature_dim()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn device(&self) -> Device {
        self.var_store.device()
    }
}

/// Settings of [`train_classifier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// Architecture (default `a`).
    pub arch: ClassifierArch,
    /// Seed of initialisation, shuffling and augmentation (default 0).
    pub seed: u64,
    /// Passes over the training set (default 4).
    pub epochs: usize,
    /// Mini-batch size (default 128).
    pub batch_size: usize,
    /// Peak Adam learning rate, decayed to 0 by a cosine over all steps (default 2e-3).
    pub learning_rate: f64,
    /// Random horizontal flips (each image with probability 1/2; default on).
    pub augment: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { arch: ClassifierArch::A, seed: 0, epochs: 4, batch_size: 128, learning_rate: 2e-3, augment: true }
    }
}

/// Where a training run is, passed to the progress callback after every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainProgress {
    /// Current epoch, 1-based.
    pub epoch: usize,
    /// Optimiser steps done so far.
    pub step: usize,
    /// Optimiser steps of the whole run.
    pub total_steps: usize,
    /// Mean cross-entropy over this epoch's steps so far.
    pub epoch_loss: f64,
    /// Training accuracy over this epoch's steps so far.
    pub epoch_accuracy: f64,
    /// Learning rate of this step.
    pub learning_rate: f64,
}

/// Trains a classifier of `options.arch` on `images` (N x C x H x W samples in [-1, 1], on any
/// device; see [`samples_to_classifier_input`]) with `labels` (N classes in 0..10), on `device`.
/// Adam on the mean cross-entropy of mini-batches, learning rate `lr * (1 + cos(pi * step /
/// total_steps)) / 2`; each epoch visits the images in a fresh seeded order (the last, partial
/// batch included). `progress` is called after every step. The returned classifier's sidecar
/// records seed, epochs, batch size, learning rate and augmentation (`data` and `test_accuracy`
/// are for the caller to fill in with [`DomainClassifier::set_info`]).
pub fn train_classifier<P>(
    images: &Tensor,
    labels: &[u8],
    options: &TrainOptions,
    device: Device,
    mut progress: P,
) -> Result<DomainClassifier>
where
    P: FnMut(&TrainProgress),
{
    let total = check_labelled(images, labels)?;
    if options.batch_size == 0 {
        return Err(Error::invalid("batch_size", "must be at least 1"));
    }
    if options.epochs == 0 {
        return Err(Error::invalid("epochs", "must be at least 1"));
    }
    if !(options.learning_rate > 0.0) || !options.learning_rate.is_finite() {
        return Err(Error::invalid("learning_rate", format!("{} must be positive", options.learning_rate)));
    }
    if let Some(&bad) = labels.iter().find(|&&l| i64::from(l) >= NUM_CLASSES) {
        return Err(Error::invalid("labels", format!("label {bad} is not a class in 0..{NUM_CLASSES}")));
    }
    let started = std::time::Instant::now();
    let mut classifier = DomainClassifier::new(options.arch, options.seed, device)?;
    let inputs = tch::no_grad(|| samples_to_classifier_input(images, device))?;
    let targets = Tensor::from_slice(labels).f_to_kind(Kind::Int64)?.f_to_device(device)?;
    let mut optimizer = nn::OptimizerConfig::build(nn::Adam::default(), &classifier.var_store, options.learning_rate)?;
    let steps_per_epoch = total.div_ceil(options.batch_size);
    let total_steps = steps_per_epoch * options.epochs;
    let mut order_rng = SplitMix64::new(options.seed ^ 0x0d0e_5eed_0f0d_a7a0);
    let mut step = 0usize;
    for epoch in 1..=options.epochs {
        let order = order_rng.choose_without_replacement(total, total);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0i64, 0usize);
        for batch_rows in order.chunks(options.batch_size) {
            let learning_rate =
                options.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps as f64).cos());
            optimizer.set_lr(learning_rate);
            let rows: Vec<i64> = batch_rows.iter().map(|&r| r as i64).collect();
            let rows = Tensor::from_slice(&rows).f_to_device(device)?;
            let mut batch = inputs.f_index_select(0, &rows)?;
            if options.augment {
                let flips: Vec<bool> = batch_rows.iter().map(|_| order_rng.next_u64() >> 63 == 1).collect();
                let mask = Tensor::from_slice(&flips).f_to_device(device)?.f_reshape([-1, 1, 1, 1])?;
                batch = batch.f_flip([3])?.f_where_self(&mask, &batch)?;
            }
            let batch_targets = targets.f_index_select(0, &rows)?;
            let (_, logits) = classifier.network.forward(&batch)?;
            let loss = logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
                &batch_targets,
                None::<Tensor>,
                tch::Reduction::Mean,
                -100,
            )?;
            optimizer.zero_grad();
            loss.f_backward()?;
            optimizer.step();
            let loss_value = loss.f_double_value(&[])?;
            if !loss_value.is_finite() {
                return Err(Error::invalid(
                    "training",
                    format!("the loss became {loss_value} at step {step}; lower the learning rate"),
                ));
            }
            loss_sum += loss_value * batch_rows.len() as f64;
            correct += tch::no_grad(|| -> Result<i64> {
                Ok(logits.f_argmax(1, false)?.f_eq_tensor(&batch_targets)?.f_sum(Kind::Int64)?.f_int64_value(&[])?)
            })?;
            seen += batch_rows.len();
            step += 1;
            progress(&TrainProgress {
                epoch,
                step,
                total_steps,
                epoch_loss: loss_sum / seen as f64,
                epoch_accuracy: correct as f64 / seen as f64,
                learning_rate,
            });
        }
    }
    let mut info = ClassifierInfo::untrained(options.arch, options.seed);
    info.epochs = options.epochs;
    info.data = format!("{total} labelled images");
    info.batch_size = Some(options.batch_size);
    info.learning_rate = Some(options.learning_rate);
    info.augment = Some(options.augment);
    info.train_seconds = Some((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    classifier.info = info;
    classifier.name = format!("classifier:arch-{}", options.arch);
    Ok(classifier)
}

/// Checks N x C x H x W images against N labels; returns N.
fn check_labelled(images: &Tensor, labels: &[u8]) -> Result<usize> {
    let size = images.size();
    if size.len() != 4 {
        return Err(Error::shape("labelled images", "N x C x H x W", size));
    }
    if size[0] as usize != labels.len() {
        return Err(Error::invalid(
            "labels",
            format!("{} labels for {} images; every image needs one label", labels.len(), size[0]),
        ));
    }
    if labels.is_empty() {
        return Err(Error::invalid("labelled images", "the set is empty"));
    }
    Ok(labels.len())
}
