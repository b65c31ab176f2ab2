//! fid-metrics: the FID Inception network in tch, FID, KID and feature statistics files
//! (DESIGN.md section 3, "FID Inception weights", and section 4, "Metrics").
//!
//! * [`inception`]: a native tch port of the FID Inception-v3 (`default_1.pt`), differentiable from
//!   samples in [-1, 1] to N x 2048 features; weights from the TorchScript file or a safetensors
//!   export.
//! * [`fid`]: the Frechet distance in f64 by the symmetric eigen route.
//! * [`kid`]: KID (unbiased MMD^2, cubic polynomial kernel) as mean +- std over subsets, and the
//!   differentiable [`kid::KidLoss`] used by the sampler search.
//! * [`stats`]: mean/covariance in f64 and pytorch-fid compatible `.npz` files.
//! * [`data`]: IDX(.gz), image-folder and `.npy` loaders returning samples in [-1, 1].
//! * [`features`]: the [`features::FeatureExtractor`] trait, batched extraction and
//!   [`features::open_extractor`] (`inception` or a classifier file).
//! * [`classifier`]: small domain classifiers (Fashion-MNIST CNNs) whose penultimate layer is a
//!   cheap feature set for the KID loss and for a held-out "classifier-FID".
//! * [`torchscript_backend`]: the TorchScript file run directly through `tch::CModule`, the live
//!   reference the native port is tested against on the machine the tests run on.
//!
//! ```no_run
//! use fid_metrics::{data, fid, features, inception::Inception, kid, stats::FeatureStats};
//! # fn main() -> fid_metrics::Result<()> {
//! let net = Inception::load_default(tch::Device::Cpu)?;
//! let real = data::load_images("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")?;
//! let real = data::subsample(&real, 64, data::Subsample::First)?;
//! let feats = features::extract_features_batched(&net, &real, 16, |done, total| {
//!     eprintln!("{done}/{total}")
//! })?;
//! FeatureStats::from_features(&feats)?.write_npz("fashion_stats.npz")?;
//! # let generated_feats = feats.shallow_clone();
//! let fid = fid::fid_from_features(&generated_feats, &feats)?;
//! let kid = kid::kid(&generated_feats, &feats, &kid::KidOptions::default())?;
//! println!("FID {fid:.3}  KID {:.5} +- {:.5}", kid.mean, kid.std);
//! # Ok(())
//! # }
//! ```

pub mod classifier;
pub mod data;
pub mod error;
pub mod features;
pub mod fid;
pub mod inception;
pub mod kid;
mod named_weights;
pub mod rng;
pub mod stats;
pub mod torchscript_backend;

pub use classifier::{ClassifierArch, DomainClassifier};
pub use error::{Error, Result};
pub use features::{open_extractor, FeatureExtractor, FeatureSpec};
pub use inception::{default_weights_path, Inception, InputResize, Precision};
pub use kid::{KidEstimate, KidLoss, KidOptions};
pub use stats::FeatureStats;
