//! `UNet2DConfig`: diffusers' `UNet2DModel` `config.json`, key for key, and its validation into the
//! architecture this port builds.
//!
//! The accepted keys are exactly the parameters of `UNet2DModel.__init__` in diffusers 0.42.1 plus
//! the metadata keys diffusers writes (`_class_name`, `_diffusers_version`, `_name_or_path`). Every
//! default below is diffusers' default for that parameter. A value this port does not implement
//! (a class embedding, a cross-attention block, ...) is an [`Error::Invalid`] naming the key.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `_class_name` diffusers writes for this model.
pub const UNET_2D_CLASS_NAME: &str = "UNet2DModel";

/// The diffusers release whose `UNet2DModel` this port reproduces (written as `_diffusers_version`
/// when a config without one is saved).
pub const DIFFUSERS_REFERENCE_VERSION: &str = "0.42.1";

/// `sample_size`: one integer (square samples) or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// `height == width`.
    Square(i64),
    /// `[height, width]`.
    HeightWidth([i64; 2]),
}

impl SampleSize {
    /// `[height, width]`.
    pub fn height_width(self) -> [i64; 2] {
        match self {
            SampleSize::Square(size) => [size, size],
            SampleSize::HeightWidth(hw) => hw,
        }
    }
}

/// diffusers' `UNet2DModel` configuration (`config.json`). Field names are diffusers' keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNet2DConfig {
    /// Metadata: the diffusers class (`"UNet2DModel"`); any other class is rejected.
    #[serde(rename = "_class_name", default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Metadata: the diffusers version that wrote the file (informational).
    #[serde(rename = "_diffusers_version", default, skip_serializing_if = "Option::is_none")]
    pub diffusers_version: Option<String>,
    /// Metadata: where diffusers loaded the model from (informational).
    #[serde(rename = "_name_or_path", default, skip_serializing_if = "Option::is_none")]
    pub name_or_path: Option<String>,
    /// Height and width of the samples (default `None`: not fixed by the model).
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    /// Channels of the input sample (default 3).
    #[serde(default = "default_three")]
    pub in_channels: i64,
    /// Channels of the output (default 3).
    #[serde(default = "default_three")]
    pub out_channels: i64,
    /// Map the input from `[0, 1]` to `[-1, 1]` with `2 x - 1` first (default false).
    #[serde(default)]
    pub center_input_sample: bool,
    /// `"positional"` (sinusoidal, DDPM) or `"fourier"` (Gaussian Fourier features of `log t`,
    /// score-SDE); default `"positional"`. `"learned"` is not supported.
    #[serde(default = "default_time_embedding_type")]
    pub time_embedding_type: String,
    /// Width of the time embedding (default `None`: `4 * block_out_channels[0]`).
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    /// Frequency shift of the positional embedding (default 0; DDPM checkpoints use 1).
    #[serde(default)]
    pub freq_shift: i64,
    /// Positional embedding as `[cos, sin]` instead of `[sin, cos]` (default true; DDPM
    /// checkpoints use false). Ignored by the Fourier embedding, as in diffusers.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// One `"DownBlock2D"` or `"AttnDownBlock2D"` per resolution level (a `"UNetRes"` prefix is
    /// accepted, as diffusers does).
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// `"UNetMidBlock2D"` or `None` (no mid block); default `"UNetMidBlock2D"`.
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    /// One `"UpBlock2D"` or `"AttnUpBlock2D"` per resolution level, coarsest first.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Output channels of each resolution level (default `[224, 448, 672, 896]`).
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<i64>,
    /// Residual blocks per down level; up levels get one more (default 2).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: i64,
    /// Output scale of the mid block's residual and attention blocks (default 1).
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    /// Padding of the strided downsampling convolution; 0 means diffusers' asymmetric
    /// `(0, 1, 0, 1)` zero padding first (default 1; DDPM checkpoints use 0).
    #[serde(default = "default_downsample_padding")]
    pub downsample_padding: i64,
    /// Downsampler of `AttnDownBlock2D`: `"conv"` or `"resnet"` (default `"conv"`).
    #[serde(default = "default_conv")]
    pub downsample_type: String,
    /// Upsampler of `AttnUpBlock2D`: `"conv"` or `"resnet"` (default `"conv"`).
    #[serde(default = "default_conv")]
    pub upsample_type: String,
    /// Dropout in the residual blocks, active only in training (default 0).
    #[serde(default)]
    pub dropout: f64,
    /// Activation of the residual blocks: `"silu"`/`"swish"`, `"mish"`, `"gelu"`, `"relu"`
    /// (default `"silu"`).
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Channels per attention head (default 8; `None`: one head over all channels).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: Option<i64>,
    /// Groups of every GroupNorm (default 32).
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: i64,
    /// Groups of the mid-block attention's GroupNorm (default `None`: `norm_num_groups` with
    /// `"default"` time conditioning, no GroupNorm with `"scale_shift"`).
    #[serde(default)]
    pub attn_norm_num_groups: Option<i64>,
    /// Epsilon of every GroupNorm (default 1e-5; DDPM checkpoints use 1e-6).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Time conditioning of the residual blocks: `"default"` (add) or `"scale_shift"`.
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    /// Attention in the mid block (default true).
    #[serde(default = "default_true")]
    pub add_attention: bool,
    /// Class conditioning; only `None` is supported.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Number of classes of a class embedding; only `None` is supported.
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    /// Only used by the unsupported `"learned"` time embedding; accepted and ignored.
    #[serde(default)]
    pub num_train_timesteps: Option<i64>,
}

fn default_three() -> i64 {
    3
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_time_embedding_type() -> String {
    "positional".into()
}
fn default_down_block_types() -> Vec<String> {
    ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"].map(String::from).to_vec()
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2D".into())
}
fn default_up_block_types() -> Vec<String> {
    ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"].map(String::from).to_vec()
}
fn default_block_out_channels() -> Vec<i64> {
    vec![224, 448, 672, 896]
}
fn default_layers_per_block() -> i64 {
    2
}
fn default_downsample_padding() -> i64 {
    1
}
fn default_conv() -> String {
    "conv".into()
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_attention_head_dim() -> Option<i64> {
    Some(8)
}
fn default_norm_num_groups() -> i64 {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_resnet_time_scale_shift() -> String {
    "default".into()
}

impl Default for UNet2DConfig {
    /// diffusers' defaults for every key (no metadata).
    fn default() -> Self {
        UNet2DConfig {
            class_name: None,
            diffusers_version: None,
            name_or_path: None,
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: default_time_embedding_type(),
            time_embedding_dim: None,
            freq_shift: 0,
            flip_sin_to_cos: true,
            down_block_types: default_down_block_types(),
            mid_block_type: default_mid_block_type(),
            up_block_types: default_up_block_types(),
            block_out_channels: default_block_out_channels(),
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: default_conv(),
            upsample_type: default_conv(),
            dropout: 0.0,
            act_fn: default_act_fn(),
            attention_head_dim: default_attention_head_dim(),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: default_resnet_time_scale_shift(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// Every key `config.json` may hold: diffusers' metadata keys and the parameters of
/// `UNet2DModel.__init__` (diffusers 0.42.1).
pub const UNET_2D_CONFIG_KEYS: &[&str] = &[
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "class_embed_type",
    "num_class_embeds",
    "num_train_timesteps",
];

/// Activation of the residual blocks (diffusers' `get_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    Mish,
    Gelu,
    Relu,
}

/// Time embedding of the network input timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeEmbeddingKind {
    Positional,
    Fourier,
}

/// Block types of a resolution level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LevelKind {
    Plain,
    Attention,
}

/// How `AttnDownBlock2D` / `AttnUpBlock2D` change resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResampleKind {
    Conv,
    Resnet,
}

/// How a residual block is conditioned on the time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeConditioning {
    /// `h + proj(temb)` before the second GroupNorm.
    Add,
    /// `norm2(h) * (1 + scale) + shift`.
    ScaleShift,
}

/// The validated, typed form of a [`UNet2DConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Architecture {
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub time_embedding: TimeEmbeddingKind,
    pub time_embed_dim: i64,
    pub freq_shift: i64,
    pub flip_sin_to_cos: bool,
    pub down_levels: Vec<LevelKind>,
    pub up_levels: Vec<LevelKind>,
    pub mid_block: bool,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub mid_block_scale_factor: f64,
    pub downsample_padding: i64,
    pub downsample: ResampleKind,
    pub upsample: ResampleKind,
    pub dropout: f64,
    pub activation: Activation,
    pub attention_head_dim: Option<i64>,
    pub norm_num_groups: i64,
    /// `None`: the mid-block attention has no GroupNorm.
    pub mid_attention_groups: Option<i64>,
    pub norm_eps: f64,
    pub time_conditioning: TimeConditioning,
    pub add_attention: bool,
}

fn unsupported(key: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::invalid(key, msg)
}

fn strip_unet_res(block_type: &str) -> &str {
    block_type.strip_prefix("UNetRes").unwrap_or(block_type)
}

impl UNet2DConfig {
    /// Parses a `config.json` text. Unknown keys and values of the wrong type are errors naming the
    /// key; the values are not validated yet (see [`UNet2DConfig::validate`]).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid("UNet2DModel config", format!("not valid JSON: {e}")))?;
        Self::from_json_value(value)
    }

    /// [`UNet2DConfig::from_json_str`] on an already parsed JSON value.
    pub fn from_json_value(value: serde_json::Value) -> Result<Self> {
        let serde_json::Value::Object(map) = &value else {
            return Err(Error::invalid("UNet2DModel config", "expected a JSON object of UNet2DModel parameters"));
        };
        if let Some(key) = map.keys().find(|k| !UNET_2D_CONFIG_KEYS.contains(&k.as_str())) {
            return Err(unsupported(
                format!("config key `{key}`"),
                "not a parameter of diffusers' UNet2DModel (diffusers 0.42.1 `UNet2DModel.__init__`); \
                 is this the config of another model class?",
            ));
        }
        match serde_json::from_value::<UNet2DConfig>(value.clone()) {
            Ok(config) => Ok(config),
            Err(whole_error) => Err(Self::diagnose_value_error(map, whole_error)),
        }
    }

    /// Finds the key whose value does not deserialize by trying each one alone on top of the
    /// defaults, so the error names it (serde_json's own message does not).
    fn diagnose_value_error(map: &serde_json::Map<String, serde_json::Value>, whole_error: serde_json::Error) -> Error {
        let defaults = match serde_json::to_value(UNet2DConfig::default()) {
            Ok(serde_json::Value::Object(defaults)) => defaults,
            _ => return Error::invalid("UNet2DModel config", whole_error.to_string()),
        };
        for (key, value) in map {
            let mut single = defaults.clone();
            single.insert(key.clone(), value.clone());
            if let Err(e) = serde_json::from_value::<UNet2DConfig>(serde_json::Value::Object(single)) {
                return Error::invalid(format!("config key `{key}`"), format!("value {value}: {e}"));
            }
        }
        Error::invalid("UNet2DModel config", whole_error.to_string())
    }

    /// Reads and parses a `config.json` file; errors name the file and the key.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config = Self::from_json_str(&text).map_err(|e| in_file(e, path))?;
        config.validate().map_err(|e| in_file(e, path))?;
        Ok(config)
    }

    /// The config as diffusers writes it (with `_class_name`; `_diffusers_version` filled in when
    /// absent).
    pub fn to_json_string(&self) -> Result<String> {
        let mut config = self.clone();
        config.class_name = Some(UNET_2D_CLASS_NAME.into());
        if config.diffusers_version.is_none() {
            config.diffusers_version = Some(DIFFUSERS_REFERENCE_VERSION.into());
        }
        let mut text =
            serde_json::to_string_pretty(&config).map_err(|e| Error::invalid("UNet2DModel config", e.to_string()))?;
        text.push('\n');
        Ok(text)
    }

    /// `[C, H, W]` of the samples when `sample_size` is set (`C = in_channels`).
    pub fn sample_shape(&self) -> Option<[i64; 3]> {
        self.sample_size.map(|size| {
            let [height, width] = size.height_width();
            [self.in_channels, height, width]
        })
    }

    /// Checks every value against what this port implements. Errors are [`Error::Invalid`] naming
    /// the key (and, for lists, the index).
    pub fn validate(&self) -> Result<()> {
        self.architecture().map(|_| ())
    }

    /// Validates and resolves the config into the typed architecture the builder uses. The checks
    /// run in a fixed order (shapes, blocks, time embedding, layers, normalisation, conditioning),
    /// so a config with several faults always reports the same first one.
    pub(crate) fn architecture(&self) -> Result<Architecture> {
        self.check_shapes()?;
        let (down_levels, up_levels) = self.levels()?;
        let mid_block = self.mid_block()?;
        let (time_embedding, time_embed_dim) = self.time_embedding()?;
        let (downsample, upsample, activation) = self.layers()?;
        let time_conditioning = self.normalisation_and_conditioning()?;
        let mid_attention_groups = match (self.attn_norm_num_groups, time_conditioning) {
            (Some(groups), _) => Some(groups),
            (None, TimeConditioning::Add) => Some(self.norm_num_groups),
            (None, TimeConditioning::ScaleShift) => None,
        };
        Ok(Architecture {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            center_input_sample: self.center_input_sample,
            time_embedding,
            time_embed_dim,
            freq_shift: self.freq_shift,
            flip_sin_to_cos: self.flip_sin_to_cos,
            down_levels,
            up_levels,
            mid_block,
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            mid_block_scale_factor: self.mid_block_scale_factor,
            downsample_padding: self.downsample_padding,
            downsample,
            upsample,
            dropout: self.dropout,
            activation,
            attention_head_dim: self.attention_head_dim,
            norm_num_groups: self.norm_num_groups,
            mid_attention_groups,
            norm_eps: self.norm_eps,
            time_conditioning,
            add_attention: self.add_attention,
        })
    }

    /// The class name, the channel counts, the sample size and the per-level list lengths.
    fn check_shapes(&self) -> Result<()> {
        if let Some(class_name) = &self.class_name {
            if class_name != UNET_2D_CLASS_NAME {
                return Err(unsupported(
                    "_class_name",
                    format!("`{class_name}`: only diffusers' {UNET_2D_CLASS_NAME} is supported"),
                ));
            }
        }
        positive("in_channels", self.in_channels)?;
        positive("out_channels", self.out_channels)?;
        if let Some(size) = self.sample_size {
            for side in size.height_width() {
                positive("sample_size", side)?;
            }
        }
        if self.block_out_channels.is_empty() {
            return Err(unsupported("block_out_channels", "must not be empty"));
        }
        for (i, &channels) in self.block_out_channels.iter().enumerate() {
            positive(&format!("block_out_channels[{i}]"), channels)?;
        }
        let levels = self.block_out_channels.len();
        if self.down_block_types.len() != levels {
            return Err(unsupported(
                "down_block_types",
                format!("{} entries, but block_out_channels has {levels}", self.down_block_types.len()),
            ));
        }
        if self.up_block_types.len() != levels {
            return Err(unsupported(
                "up_block_types",
                format!("{} entries, but block_out_channels has {levels}", self.up_block_types.len()),
            ));
        }
        Ok(())
    }

    /// The kind (plain or with attention) of each down and up level.
    fn levels(&self) -> Result<(Vec<LevelKind>, Vec<LevelKind>)> {
        let down_levels = self
            .down_block_types
            .iter()
            .enumerate()
            .map(|(i, name)| match strip_unet_res(name) {
                "DownBlock2D" => Ok(LevelKind::Plain),
                "AttnDownBlock2D" => Ok(LevelKind::Attention),
                _ => Err(unsupported(
                    format!("down_block_types[{i}]"),
                    format!("`{name}` is not supported (supported: DownBlock2D, AttnDownBlock2D)"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_levels = self
            .up_block_types
            .iter()
            .enumerate()
            .map(|(i, name)| match strip_unet_res(name) {
                "UpBlock2D" => Ok(LevelKind::Plain),
                "AttnUpBlock2D" => Ok(LevelKind::Attention),
                _ => Err(unsupported(
                    format!("up_block_types[{i}]"),
                    format!("`{name}` is not supported (supported: UpBlock2D, AttnUpBlock2D)"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((down_levels, up_levels))
    }

    /// Whether the network has a mid block.
    fn mid_block(&self) -> Result<bool> {
        Ok(match self.mid_block_type.as_deref() {
            None => false,
            Some("UNetMidBlock2D") => true,
            Some(other) => {
                return Err(unsupported(
                    "mid_block_type",
                    format!("`{other}` is not supported (supported: UNetMidBlock2D or null)"),
                ))
            }
        })
    }

    /// The timestep embedding's kind and width.
    fn time_embedding(&self) -> Result<(TimeEmbeddingKind, i64)> {
        let time_embedding = match self.time_embedding_type.as_str() {
            "positional" => TimeEmbeddingKind::Positional,
            "fourier" => TimeEmbeddingKind::Fourier,
            "learned" => {
                return Err(unsupported(
                    "time_embedding_type",
                    "`learned` (a lookup table indexed by integer timesteps) is not supported: \
                     the network must accept continuous timesteps",
                ))
            }
            other => {
                return Err(unsupported(
                    "time_embedding_type",
                    format!("`{other}` is not supported (supported: positional, fourier)"),
                ))
            }
        };
        let time_embed_dim = match self.time_embedding_dim {
            Some(dim) => {
                positive("time_embedding_dim", dim)?;
                dim
            }
            None => 4 * self.block_out_channels[0],
        };
        if time_embedding == TimeEmbeddingKind::Positional && self.block_out_channels[0] / 2 == self.freq_shift {
            return Err(unsupported(
                "freq_shift",
                format!("{} equals half the embedding width, which divides by zero", self.freq_shift),
            ));
        }
        Ok((time_embedding, time_embed_dim))
    }

    /// The ResNet layers: their count, the mid block's scale, the resampling kinds, dropout and
    /// the activation function.
    fn layers(&self) -> Result<(ResampleKind, ResampleKind, Activation)> {
        positive("layers_per_block", self.layers_per_block)?;
        if !self.mid_block_scale_factor.is_finite() || self.mid_block_scale_factor == 0.0 {
            return Err(unsupported(
                "mid_block_scale_factor",
                format!("{} (must be finite and non-zero)", self.mid_block_scale_factor),
            ));
        }
        if self.downsample_padding < 0 {
            return Err(unsupported("downsample_padding", format!("{} (must be >= 0)", self.downsample_padding)));
        }
        let resample = |key: &str, value: &str| match value {
            "conv" => Ok(ResampleKind::Conv),
            "resnet" => Ok(ResampleKind::Resnet),
            other => Err(unsupported(key, format!("`{other}` is not supported (supported: conv, resnet)"))),
        };
        let downsample = resample("downsample_type", &self.downsample_type)?;
        let upsample = resample("upsample_type", &self.upsample_type)?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(unsupported("dropout", format!("{} (must be in [0, 1))", self.dropout)));
        }
        let activation = match self.act_fn.to_lowercase().as_str() {
            "silu" | "swish" => Activation::Silu,
            "mish" => Activation::Mish,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => {
                return Err(unsupported(
                    "act_fn",
                    format!("`{other}` is not supported (supported: silu, swish, mish, gelu, relu)"),
                ))
            }
        };
        Ok((downsample, upsample, activation))
    }

    /// Attention heads, group norms, and the time conditioning of the ResNet blocks; class
    /// conditioning is refused.
    fn normalisation_and_conditioning(&self) -> Result<TimeConditioning> {
        if let Some(dim) = self.attention_head_dim {
            positive("attention_head_dim", dim)?;
        }
        positive("norm_num_groups", self.norm_num_groups)?;
        if let Some(groups) = self.attn_norm_num_groups {
            positive("attn_norm_num_groups", groups)?;
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(unsupported("norm_eps", format!("{} (must be > 0)", self.norm_eps)));
        }
        let time_conditioning = match self.resnet_time_scale_shift.as_str() {
            "default" => TimeConditioning::Add,
            "scale_shift" => TimeConditioning::ScaleShift,
            other => {
                return Err(unsupported(
                    "resnet_time_scale_shift",
                    format!("`{other}` is not supported (supported: default, scale_shift)"),
                ))
            }
        };
        if let Some(kind) = &self.class_embed_type {
            return Err(unsupported(
                "class_embed_type",
                format!("`{kind}`: class-conditional models are not supported (must be null)"),
            ));
        }
        if let Some(classes) = self.num_class_embeds {
            return Err(unsupported(
                "num_class_embeds",
                format!("{classes}: class-conditional models are not supported (must be null)"),
            ));
        }
        Ok(time_conditioning)
    }
}

fn positive(key: &str, value: i64) -> Result<()> {
    if value >= 1 {
        Ok(())
    } else {
        Err(unsupported(key, format!("{value} (must be >= 1)")))
    }
}

/// Adds the file to an error about one of its keys.
fn in_file(error: Error, path: &Path) -> Error {
    match error {
        Error::Invalid { what, msg } => Error::Invalid { what: format!("{what} in {}", path.display()), msg },
        other => other,
    }
}
