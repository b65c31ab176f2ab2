//! `ddss-cli stats`, `ddss-cli fid` and `ddss-cli eval`: feature statistics files, FID/KID
//! between two sources, and FID/KID of a sampler against reference statistics (DESIGN.md section 4,
//! "Metrics", and section 7, the command-line contract).
//!
//! Statistics files are pytorch-fid's `.npz` (`mu` float64 [d], `sigma` float64 [d, d], written
//! deflate-compressed like `np.savez_compressed`) with two extra arrays: `features` (float32
//! [N, d]), so that KID can be computed against the file later, and `feature_set` (the feature
//! extractor's name as UTF-8 bytes, uint8 [n]), so that files made with different networks are
//! never compared. pytorch-fid reads only `mu` and `sigma` and ignores other keys. [`evaluate`] draws samples exactly as `ddss-cli sample` does (sample
//! `i` uses the noise stream `(seed, i)`), so `eval` scores the very images `sample` writes.

use crate::common::{parse_device, progress_images, NetworkArgs};
use crate::memory_check::{check_request, Request};
use crate::sample::ModelSamplerArgs;
use anyhow::{bail, Context, Result};
use ddss_opt::collective::{shard, Collective, SingleProcess};
use fid_metrics::data::{load_idx_images_with, load_images_with, quantize_to_uint8_levels, ReadOptions};
use fid_metrics::features::{extract_features_batched, FeatureSpec};
use fid_metrics::kid::{kid, KidOptions};
use fid_metrics::stats::{npz_keys, read_features_npz, read_npz_array, FEATURES_KEY, MU_KEY, SIGMA_KEY};
use fid_metrics::{FeatureExtractor, FeatureStats};
use ggdm_core::noise::{NoiseSource, PerSampleNoise};
use ggdm_core::registry::SamplerChoice;
use ggdm_nets::model_dir::LoadedModel;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Key of the feature set's name (UTF-8 bytes) in a statistics file.
pub const FEATURE_SET_KEY: &str = "feature_set";

/// Names of the training images inside an MNIST-layout data set folder.
const DATASET_TRAIN_IMAGES: [&str; 2] = ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"];

/// Loads an image source as samples in [-1, 1] (N x C x H x W, CPU): a folder of images (read as
/// pytorch-fid reads them, see [`fid_metrics::data`]), an IDX(.gz) image file, a float32 `.npy`
/// of samples, or a data set folder holding `train-images-idx3-ubyte(.gz)` (then its training
/// images). `options` says whether subfolders are read and how many images at most.
pub fn load_image_source(path: &Path, options: ReadOptions) -> Result<Tensor> {
    if !path.exists() {
        bail!(
            "{}: not found. Expected a folder of images (bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp), \
             an IDX(.gz) image file, a float32 N x C x H x W .npy of samples in [-1, 1], or a folder \
             holding train-images-idx3-ubyte.gz",
            path.display()
        );
    }
    if path.is_dir() {
        for name in DATASET_TRAIN_IMAGES {
            let candidate = path.join(name);
            if candidate.is_file() {
                return Ok(load_idx_images_with(&candidate, options.limit)?);
            }
        }
    }
    Ok(load_images_with(path, options)?)
}

/// Whether `path` names a statistics file (by its `.npz` extension).
fn is_npz(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "npz")
}

/// Features of a stored statistics file or of an image source: the statistics, and the feature
/// matrix when it is known (needed for KID).
pub struct FeatureSummary {
    /// Mean and covariance of the features.
    pub stats: FeatureStats,
    /// The N x d features themselves (f32 or f64, CPU), if available.
    pub features: Option<Tensor>,
    /// The feature set's name when known (`inception`, `classifier:<name>`).
    pub feature_set: Option<String>,
    /// Where they came from (a file or folder), for messages.
    pub source: PathBuf,
}

impl FeatureSummary {
    /// Summary of a feature matrix computed from `source` with the feature set `feature_set`.
    pub fn from_features(features: Tensor, feature_set: &str, source: &Path) -> Result<Self> {
        let stats = FeatureStats::from_features(&features).with_context(|| {
            format!("{}: statistics need at least 2 samples (got {})", source.display(), features.size()[0])
        })?;
        Ok(Self {
            stats,
            features: Some(features),
            feature_set: Some(feature_set.to_string()),
            source: source.to_path_buf(),
        })
    }

    /// Reads a statistics `.npz`: `mu` + `sigma` (pytorch-fid), optionally `features`; a file
    /// with only `features` gets its statistics computed from them.
    pub fn read_npz(path: &Path) -> Result<Self> {
        let keys = npz_keys(path)?;
        let has = |key: &str| keys.iter().any(|k| k == key);
        let features = if has(FEATURES_KEY) { Some(read_features_npz(path)?) } else { None };
        let stats = if has(MU_KEY) || has(SIGMA_KEY) {
            FeatureStats::read_npz(path)?
        } else if let Some(features) = &features {
            FeatureStats::from_features(features)
                .with_context(|| format!("{}: statistics of the array `{FEATURES_KEY}`", path.display()))?
        } else {
            bail!(
                "{}: not a statistics file: it needs `{MU_KEY}` and `{SIGMA_KEY}` (and optionally \
                 `{FEATURES_KEY}`), but holds: {}",
                path.display(),
                if keys.is_empty() { "nothing".to_string() } else { keys.join(", ") }
            );
        };
        if let Some(features) = &features {
            let d = features.size()[1] as usize;
            if d != stats.dim() {
                bail!(
                    "{}: array `{FEATURES_KEY}` has {d} columns but `{MU_KEY}` has length {}",
                    path.display(),
                    stats.dim()
                );
            }
        }
        let feature_set = if has(FEATURE_SET_KEY) { Some(read_feature_set_name(path)?) } else { None };
        Ok(Self { stats, features, feature_set, source: path.to_path_buf() })
    }

    /// Fails when this summary records a feature set other than `expected`.
    pub fn check_feature_set(&self, expected: &str) -> Result<()> {
        match &self.feature_set {
            Some(recorded) if recorded != expected => bail!(
                "{}: computed with the feature set `{recorded}`, but `{expected}` is in use; compute both \
                 sides with the same --features",
                self.source.display()
            ),
            _ => Ok(()),
        }
    }

    /// Feature dimension d.
    pub fn dim(&self) -> usize {
        self.stats.dim()
    }
}

/// Reads the `feature_set` array (UTF-8 bytes) of a statistics file.
fn read_feature_set_name(path: &Path) -> Result<String> {
    let bytes = read_npz_array::<u8>(path, FEATURE_SET_KEY)?;
    if bytes.ndim() != 1 {
        bail!("{}: array `{FEATURE_SET_KEY}` is not a uint8 vector (shape {:?})", path.display(), bytes.shape());
    }
    String::from_utf8(bytes.into_raw_vec_and_offset().0)
        .with_context(|| format!("{}: array `{FEATURE_SET_KEY}` is not UTF-8 text", path.display()))
}

/// Writes `mu`, `sigma` (float64, as pytorch-fid), `features` (float32 [N, d]) and
/// `feature_set` (the name as UTF-8 bytes) to a deflate-compressed `.npz`, atomically.
pub fn write_stats_npz(path: &Path, stats: &FeatureStats, features: &Tensor, feature_set: &str) -> Result<()> {
    let size = features.size();
    if size.len() != 2 || size[1] as usize != stats.dim() {
        bail!("features of shape {size:?} do not match statistics of dimension {}", stats.dim());
    }
    let flat = features.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().reshape([-1]);
    let values = Vec::<f32>::try_from(&flat)?;
    let features = ndarray::Array2::from_shape_vec((size[0] as usize, size[1] as usize), values)?;
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut writer = ndarray_npy::NpzWriter::new_compressed(&mut buffer);
        writer.add_array(MU_KEY, &stats.mu)?;
        writer.add_array(SIGMA_KEY, &stats.sigma)?;
        writer.add_array(FEATURES_KEY, &features)?;
        writer.add_array(FEATURE_SET_KEY, &ndarray::Array1::from_vec(feature_set.as_bytes().to_vec()))?;
        writer.finish()?;
    }
    ggdm_core::io::write_atomic(path, buffer.get_ref())?;
    Ok(())
}

/// Features of an image source (its first `read.limit` images when given), with a progress bar.
fn image_source_features(
    path: &Path,
    read: ReadOptions,
    extractor: &dyn FeatureExtractor,
    batch: usize,
    quiet: bool,
) -> Result<Tensor> {
    let images = load_image_source(path, read)?;
    let total = images.size()[0] as u64;
    tracing::info!(
        "{}: {} images of shape {:?}, features {}",
        path.display(),
        total,
        &images.size()[1..],
        extractor.name()
    );
    let bar = progress_images(total, quiet, "features");
    let features = extract_features_batched(extractor, &images, batch, |done, _| bar.set_position(done as u64))
        .with_context(|| format!("computing features of {}", path.display()))?;
    bar.finish_and_clear();
    Ok(features)
}

/// [`image_source_features`] split across the ranks of `comm`: every rank reads the source, takes
/// a contiguous run of its `batch`-sized batches, and the features are all-gathered (the same
/// batches, hence the same features, as one process).
fn image_source_features_sharded(
    path: &Path,
    read: ReadOptions,
    extractor: &dyn FeatureExtractor,
    batch: usize,
    comm: &dyn Collective,
) -> Result<Tensor> {
    if batch == 0 {
        bail!("--batch 0: need at least 1");
    }
    let images = load_image_source(path, read)?;
    let total = images.size()[0] as usize;
    let batches = shard(total.div_ceil(batch), comm.rank(), comm.size());
    let (start, end) = ((batches.start * batch).min(total), (batches.end * batch).min(total));
    tracing::info!(
        "{}: {total} images, features {}{}",
        path.display(),
        extractor.name(),
        crate::dist::ranks_note(comm)
    );
    let dim = extractor.dim() as i64;
    let local = if end > start {
        let part = images.narrow(0, start as i64, (end - start) as i64);
        extract_features_batched(extractor, &part, batch, |_, _| {})
            .with_context(|| format!("computing features of {}", path.display()))?
    } else {
        Tensor::zeros([0, dim], (Kind::Float, Device::Cpu))
    };
    gather_rows(&local, &[dim], comm)
}

/// Opens `--features`, naming the flag in errors.
fn open_features(spec: &FeatureSpec, device: Device) -> Result<Box<dyn FeatureExtractor>> {
    spec.open(device).with_context(|| format!("--features {}", spec_text(spec)))
}

/// The `--features` value as given.
fn spec_text(spec: &FeatureSpec) -> String {
    match spec {
        FeatureSpec::Inception => "inception".to_string(),
        FeatureSpec::Classifier(path) => path.display().to_string(),
    }
}

/// Fails unless two feature sets have the same dimension.
fn check_same_dim(a: &FeatureSummary, b: &FeatureSummary) -> Result<()> {
    if a.dim() != b.dim() {
        bail!(
            "feature dimensions differ: {} has {}-d features, {} has {}-d; both sides must use the same \
             --features (inception: 2048, classifier a: 128, classifier b: 256)",
            a.source.display(),
            a.dim(),
            b.source.display(),
            b.dim()
        );
    }
    Ok(())
}

/// KID when both sides hold their features (default [`KidOptions`]), else `None`.
fn kid_if_possible(a: &FeatureSummary, b: &FeatureSummary) -> Result<Option<fid_metrics::KidEstimate>> {
    match (&a.features, &b.features) {
        (Some(fa), Some(fb)) => Ok(Some(kid(fa, fb, &KidOptions::default())?)),
        _ => Ok(None),
    }
}

/// The arguments of `ddss-cli stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Images: a folder of images (the files pytorch-fid reads: extensions bmp, jpg, jpeg, pgm,
    /// png, ppm, tif, tiff, webp, in any case, in file-name order; other files are skipped), an
    /// IDX(.gz) image file, a float32 N x C x H x W .npy of samples in [-1, 1], or a data set
    /// folder holding train-images-idx3-ubyte.gz (its training images).
    pub path: PathBuf,
    /// Output statistics file (.npz).
    #[arg(long)]
    pub out: PathBuf,
    /// Feature set: inception (the FID Inception; DDSS_INCEPTION overrides where its weights
    /// are found) or the path of a domain classifier .safetensors (its .json sidecar next to
    /// it).
    #[arg(long, default_value = "inception")]
    pub features: String,
    /// Use only the first N images of PATH (in file-name order for folders, file order for
    /// IDX/.npy); default: all.
    #[arg(long)]
    pub num: Option<usize>,
    /// Also read the images of PATH's subfolders (symlinked ones included), depth first in
    /// name order; pytorch-fid reads none.
    #[arg(long)]
    pub recursive: bool,
    /// Images per network batch.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Set from the global --quiet.
    #[arg(skip)]
    pub quiet: bool,
}

/// Runs `ddss-cli stats`.
pub fn run_stats(args: StatsArgs) -> Result<()> {
    let spec = FeatureSpec::parse(&args.features).context("--features")?;
    if is_npz(&args.path) {
        bail!("{}: already a statistics file; `stats` takes images", args.path.display());
    }
    if args.num.is_some_and(|n| n < 2) {
        bail!("--num {}: statistics need at least 2 images", args.num.unwrap_or(0));
    }
    ggdm_core::io::check_output_path(&args.out).context("--out")?;
    let comm = crate::dist::world();
    let comm = comm.as_ref();
    let device = crate::dist::rank_device(parse_device(&args.device)?, comm);
    let extractor = open_features(&spec, device)?;
    let read = ReadOptions { recursive: args.recursive, limit: args.num };
    let features = if comm.size() <= 1 {
        image_source_features(&args.path, read, extractor.as_ref(), args.batch, args.quiet)?
    } else {
        image_source_features_sharded(&args.path, read, extractor.as_ref(), args.batch, comm)?
    };
    if !comm.is_root() {
        return Ok(());
    }
    let stats = FeatureStats::from_features(&features).with_context(|| {
        format!("{}: statistics need at least 2 images (got {})", args.path.display(), features.size()[0])
    })?;
    write_stats_npz(&args.out, &stats, &features, extractor.name())?;
    println!(
        "wrote {}: mu, sigma and features ({} x {}) of {}",
        args.out.display(),
        features.size()[0],
        stats.dim(),
        extractor.name()
    );
    Ok(())
}

/// The arguments of `ddss-cli fid`.
#[derive(clap::Args, Debug)]
pub struct FidArgs {
    /// First image source or .npz.
    pub path1: PathBuf,
    /// Second image source or .npz.
    pub path2: PathBuf,
    /// Feature set for image sources: inception (the default) or the path of a classifier
    /// .safetensors. Statistics files written by `stats` record their feature set, and a
    /// different one on the other side (or here) is an error.
    #[arg(long)]
    pub features: Option<String>,
    /// Use only the first N images of each image source (.npz files are used as they are).
    #[arg(long)]
    pub num: Option<usize>,
    /// Also read the images of the image folders' subfolders (symlinked ones included), depth
    /// first in name order; pytorch-fid reads none.
    #[arg(long)]
    pub recursive: bool,
    /// Images per network batch.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Set from the global --quiet.
    #[arg(skip)]
    pub quiet: bool,
}

/// What `ddss-cli fid --json` prints.
#[derive(Debug, Serialize)]
pub struct FidReport {
    /// FID between the two sides.
    pub fid: f64,
    /// KID mean over subsets (`null` unless both sides have features).
    pub kid_mean: Option<f64>,
    /// KID standard deviation over subsets.
    pub kid_std: Option<f64>,
    /// The feature set (`inception`, `classifier:<name>`).
    pub features: String,
}

/// Runs `ddss-cli fid`.
pub fn run_fid(args: FidArgs) -> Result<()> {
    let spec = FeatureSpec::parse(args.features.as_deref().unwrap_or("inception")).context("--features")?;
    if args.num.is_some_and(|n| n < 2) {
        bail!("--num {}: statistics need at least 2 images", args.num.unwrap_or(0));
    }
    let device = parse_device(&args.device)?;
    let paths = [&args.path1, &args.path2];
    let needs_network = paths.iter().any(|path| !is_npz(path));
    let extractor = if needs_network { Some(open_features(&spec, device)?) } else { None };
    // Statistics files first: they are quick to read, so a mismatch fails before any network runs.
    let mut stored = Vec::with_capacity(2);
    for path in paths {
        let summary = if is_npz(path) { Some(FeatureSummary::read_npz(path)?) } else { None };
        if let Some(summary) = &summary {
            match &extractor {
                Some(net) => {
                    if summary.dim() != net.dim() {
                        bail!(
                            "{}: holds {}-d features, but --features {} gives {}-d features; compute both \
                             sides with the same --features",
                            path.display(),
                            summary.dim(),
                            net.name(),
                            net.dim()
                        );
                    }
                    summary.check_feature_set(net.name())?;
                }
                None if args.features.is_some() => summary.check_feature_set(&spec.name())?,
                None => {}
            }
        }
        stored.push(summary);
    }
    let mut sides = Vec::with_capacity(2);
    for (path, summary) in paths.into_iter().zip(stored) {
        let summary = match (summary, &extractor) {
            (Some(summary), _) => summary,
            (None, Some(net)) => {
                let read = ReadOptions { recursive: args.recursive, limit: args.num };
                let features = image_source_features(path, read, net.as_ref(), args.batch, args.quiet)?;
                FeatureSummary::from_features(features, net.name(), path)?
            }
            (None, None) => bail!("{}: no feature network was opened for this image source", path.display()),
        };
        sides.push(summary);
    }
    check_same_dim(&sides[0], &sides[1])?;
    if let Some(recorded) = &sides[0].feature_set {
        sides[1].check_feature_set(recorded)?;
    }
    let fid = fid_metrics::fid::fid_from_stats(&sides[0].stats, &sides[1].stats)
        .with_context(|| format!("FID between {} and {}", sides[0].source.display(), sides[1].source.display()))?;
    let kid = kid_if_possible(&sides[0], &sides[1])?;
    let features = match (&extractor, &args.features) {
        (Some(net), _) => net.name().to_string(),
        (None, Some(_)) => spec.name(),
        (None, None) => sides
            .iter()
            .find_map(|side| side.feature_set.clone())
            .unwrap_or_else(|| "unknown (both files lack `feature_set`; pass --features)".to_string()),
    };
    if args.json {
        let report = FidReport { fid, kid_mean: kid.map(|k| k.mean), kid_std: kid.map(|k| k.std), features };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("FID {fid:.6}  (features: {features})");
        match kid {
            Some(k) => println!("KID {:.6} ± {:.6}  ({} subsets of {})", k.mean, k.std, k.num_subsets, k.subset_size),
            None => println!("KID n/a  (a side has only mu/sigma; `ddss-cli stats` keeps the features needed for KID)"),
        }
    }
    Ok(())
}

/// How [`evaluate`] draws its samples.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Number of samples (at least 2).
    pub num: usize,
    /// Samples per network batch.
    pub batch: usize,
    /// Noise seed: sample `i` uses the stream `(seed, i)`, as in `ddss-cli sample`.
    pub seed: u64,
    /// Round samples to the 256 levels of an 8-bit image before the features, as writing PNGs and
    /// reading them back would (so `eval` equals `sample --out-dir` + `fid`).
    pub quantize: bool,
    /// Device the initial noise is placed on (the model's device).
    pub device: Device,
}

/// One row of a comparison: what `ddss-cli eval --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    /// The sampler (`ddim`, `ddpm`, a `sampler.json` path, or a caller's label).
    pub sampler: String,
    /// Network evaluations per sample.
    pub steps: usize,
    /// Number of samples.
    pub num: usize,
    /// The feature set.
    pub features: String,
    /// FID against the reference statistics.
    pub fid: f64,
    /// KID mean (`null` when the reference has no features).
    pub kid_mean: Option<f64>,
    /// KID standard deviation over subsets.
    pub kid_std: Option<f64>,
}

/// Fails, naming `names` (the flags or keys of the batch size and of the number of samples), when
/// drawing `options.num` samples in batches of `options.batch` and keeping `feature_dims` features
/// of each cannot fit in memory ([`crate::memory_check`]).
pub fn check_eval_memory(
    model: &LoadedModel,
    options: &EvalOptions,
    feature_dims: usize,
    names: [&str; 2],
) -> Result<()> {
    let Some(shape) = model.sample_shape() else {
        return Ok(());
    };
    let request = Request {
        batch: options.batch,
        batch_name: names[0],
        num: options.num,
        num_name: names[1],
        // float32 chunks, then their concatenation.
        kept_per_sample: (feature_dims as u64).saturating_mul(2 * 4),
        kept_what: "the features",
    };
    check_request(model, shape, options.device, &request)
}

/// Draws `options.num` samples from `model` with `choice` (per-sample noise exactly as
/// `ddss-cli sample`) and returns their features (N x d, f32, CPU). `on_batch(done, total)` is
/// called after every batch.
pub fn sample_features(
    model: &LoadedModel,
    choice: &SamplerChoice,
    options: &EvalOptions,
    extractor: &dyn FeatureExtractor,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let (mut features, _) = sample_features_multi(model, choice, options, &[extractor], 0, on_batch)?;
    Ok(features.remove(0))
}

/// Like [`sample_features`], but scores every sample with each of `extractors` (one features
/// tensor per extractor, in order) and also returns the first `keep` samples (CPU, quantized
/// when `options.quantize`), e.g. for a picture. Samples are drawn once, batch by batch.
pub fn sample_features_multi(
    model: &LoadedModel,
    choice: &SamplerChoice,
    options: &EvalOptions,
    extractors: &[&dyn FeatureExtractor],
    keep: usize,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Tensor>, Tensor)> {
    sample_features_sharded(model, choice, options, extractors, keep, on_batch, &SingleProcess)
}

/// [`sample_features_multi`] split across the ranks of `comm`: the `ceil(num / batch)` batches
/// are divided into contiguous runs, one per rank, so every rank draws exactly the batches (and
/// noise streams) one process would, and the features and kept samples are all-gathered. Every
/// rank returns the full result; `on_batch` reports this rank's progress scaled to `num`.
pub fn sample_features_sharded(
    model: &LoadedModel,
    choice: &SamplerChoice,
    options: &EvalOptions,
    extractors: &[&dyn FeatureExtractor],
    keep: usize,
    on_batch: &mut dyn FnMut(usize, usize),
    comm: &dyn Collective,
) -> Result<(Vec<Tensor>, Tensor)> {
    if options.batch == 0 {
        bail!("--batch 0: need at least 1");
    }
    let Some(shape) = model.sample_shape() else {
        bail!("the model {} does not fix its sample size (no sample_size in config.json)", model.dir.display());
    };
    let feature_dims = extractors.iter().map(|e| e.dim()).sum();
    check_eval_memory(model, options, feature_dims, ["batch", "num"])?;
    let device = options.device;
    let mut chunks: Vec<Vec<Tensor>> = extractors.iter().map(|_| Vec::new()).collect();
    let mut kept = Vec::new();
    let batches = shard(options.num.div_ceil(options.batch), comm.rank(), comm.size());
    let mut first = (batches.start * options.batch).min(options.num);
    let (start, end) = (first, (batches.end * options.batch).min(options.num));
    while first < end {
        let len = options.batch.min(end - first);
        let mut noise = PerSampleNoise::new(options.seed, first as u64, len);
        let x_init = noise.next(&[len as i64, shape[0], shape[1], shape[2]], device)?;
        let mut samples = crate::sample::run_batch(choice, model, &x_init, &mut noise)?;
        if options.quantize {
            samples = quantize_to_uint8_levels(&samples)?;
        }
        for (extractor, out) in extractors.iter().zip(chunks.iter_mut()) {
            let features = tch::no_grad(|| extractor.features(&samples))?;
            out.push(features.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?);
        }
        if first < keep {
            kept.push(samples.f_narrow(0, 0, (keep - first).min(len) as i64)?.f_to_device(Device::Cpu)?);
        }
        first += len;
        on_batch((first - start) * options.num / (end - start).max(1), options.num);
    }
    if comm.size() <= 1 {
        let features = chunks.iter().map(|c| Tensor::f_cat(c, 0)).collect::<Result<_, _>>()?;
        let kept =
            if kept.is_empty() { Tensor::f_zeros([0], (Kind::Float, Device::Cpu))? } else { Tensor::f_cat(&kept, 0)? };
        return Ok((features, kept));
    }
    let mut features = Vec::with_capacity(extractors.len());
    for (extractor, c) in extractors.iter().zip(&chunks) {
        let dim = extractor.dim() as i64;
        let local = if c.is_empty() { Tensor::zeros([0, dim], (Kind::Float, Device::Cpu)) } else { Tensor::cat(c, 0) };
        features.push(gather_rows(&local, &[dim], comm)?);
    }
    let row = [shape[0], shape[1], shape[2]];
    let local = if kept.is_empty() {
        Tensor::zeros([0, row[0], row[1], row[2]], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(&kept, 0)
    };
    let kept = gather_rows(&local, &row, comm)?;
    let kept = if kept.size()[0] == 0 { Tensor::zeros([0], (Kind::Float, Device::Cpu)) } else { kept };
    Ok((features, kept))
}

/// All-gathers the rows (`[n_rank, row...]`, any `n_rank`) of every rank, in rank order, as f32 on
/// the CPU.
fn gather_rows(local: &Tensor, row: &[i64], comm: &dyn Collective) -> Result<Tensor> {
    let flat = local.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().reshape([-1]);
    let all = comm.all_gather_f32(&Vec::<f32>::try_from(&flat)?)?;
    let mut shape = vec![-1];
    shape.extend_from_slice(row);
    Ok(Tensor::from_slice(&all).reshape(&shape))
}

/// Samples with `choice` and scores the samples against `reference`: FID against its
/// statistics, KID against its features when it has them. `sampler` labels the result. The
/// sampling is split across the ranks of `comm` ([`sample_features_sharded`]); every rank returns
/// the same result, equal to one process's.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &LoadedModel,
    choice: &SamplerChoice,
    sampler: &str,
    options: &EvalOptions,
    extractor: &dyn FeatureExtractor,
    reference: &FeatureSummary,
    on_batch: &mut dyn FnMut(usize, usize),
    comm: &dyn Collective,
) -> Result<EvalResult> {
    if options.num < 2 {
        bail!("--num {}: FID needs at least 2 samples", options.num);
    }
    if extractor.dim() != reference.dim() {
        bail!(
            "{}: holds {}-d statistics, but the features {} are {}-d; make the reference with the same \
             --features (ddss-cli stats ... --features ...)",
            reference.source.display(),
            reference.dim(),
            extractor.name(),
            extractor.dim()
        );
    }
    reference.check_feature_set(extractor.name())?;
    let features = if comm.size() <= 1 {
        sample_features(model, choice, options, extractor, on_batch)?
    } else {
        sample_features_sharded(model, choice, options, &[extractor], 0, on_batch, comm)?.0.remove(0)
    };
    let generated = FeatureSummary::from_features(features, extractor.name(), Path::new("generated samples"))?;
    let fid = fid_metrics::fid::fid_from_stats(&generated.stats, &reference.stats)
        .with_context(|| format!("FID against {}", reference.source.display()))?;
    let kid = kid_if_possible(&generated, reference)?;
    Ok(EvalResult {
        sampler: sampler.to_string(),
        steps: choice.steps(),
        num: options.num,
        features: extractor.name().to_string(),
        fid,
        kid_mean: kid.map(|k| k.mean),
        kid_std: kid.map(|k| k.std),
    })
}

/// The arguments of `ddss-cli eval`.
#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("model", |a| a.required(true)), mut_arg("sampler", |a| a.required(true)))]
pub struct EvalArgs {
    #[command(flatten)]
    pub run: ModelSamplerArgs,
    /// Sampling steps K (required, except for a sampler.json, which has its own K).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Number of samples (at least 2).
    #[arg(long)]
    pub num: usize,
    /// Reference statistics (.npz from `ddss-cli stats` or pytorch-fid), made with the same
    /// --features.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// Feature set: inception or the path of a classifier .safetensors.
    #[arg(long, default_value = "inception")]
    pub features: String,
    /// Samples per network batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Noise seed (sample i uses stream (seed, i)).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Score the raw float samples instead of their 8-bit rounding.
    #[arg(long)]
    pub no_quantize: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Set from the global --quiet.
    #[arg(skip)]
    pub quiet: bool,
}

/// Runs `ddss-cli eval`.
pub fn run_eval(args: EvalArgs) -> Result<()> {
    let spec = FeatureSpec::parse(&args.features).context("--features")?;
    let sampler = args.run.sampler_name()?;
    if args.steps.is_none() && !sampler.ends_with(".json") {
        bail!("--steps is required with --sampler {sampler} (only a sampler.json has its own K)");
    }
    let reference = FeatureSummary::read_npz(&args.reference).context("--ref")?;
    let comm = crate::dist::world();
    let comm = comm.as_ref();
    let device = crate::dist::rank_device(parse_device(&args.device)?, comm);
    let (model, choice) = args.run.load(&args.network, args.steps, device)?;
    let extractor = open_features(&spec, device)?;
    let options =
        EvalOptions { num: args.num, batch: args.batch, seed: args.seed, quantize: !args.no_quantize, device };
    check_eval_memory(&model, &options, extractor.dim(), ["--batch", "--num"])?;
    if comm.is_root() {
        tracing::info!(
            "eval: {} samples with {} ({} steps), features {}, reference {}{}",
            args.num,
            sampler,
            choice.steps(),
            extractor.name(),
            args.reference.display(),
            crate::dist::ranks_note(comm)
        );
    }
    let bar = progress_images(args.num as u64, args.quiet || !comm.is_root(), "eval");
    let result = evaluate(
        &model,
        &choice,
        sampler,
        &options,
        extractor.as_ref(),
        &reference,
        &mut |done, _| bar.set_position(done as u64),
        comm,
    )?;
    bar.finish_and_clear();
    if !comm.is_root() {
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        let kid = match (result.kid_mean, result.kid_std) {
            (Some(mean), Some(std)) => format!("KID {mean:.6} ± {std:.6}"),
            _ => "KID n/a (the reference has no features)".to_string(),
        };
        println!(
            "{} ({} steps, {} samples, features {}): FID {:.6}, {kid}",
            result.sampler, result.steps, result.num, result.features, result.fid
        );
    }
    Ok(())
}
