//! `ddss-cli train-classifier`: trains a domain classifier ([`fid_metrics::classifier`]) on the
//! labelled training split of an MNIST-layout data set (Fashion-MNIST), measures its accuracy on
//! the test split, and writes the weights plus their JSON sidecar. The classifier's penultimate
//! layer then serves as `--features FILE.safetensors` for `stats`, `fid`, `eval` and the search
//! loss (DESIGN.md section 4, "DDSS objective" and "Metrics").

use crate::common::{parse_device, progress};
use anyhow::{bail, Context, Result};
use fid_metrics::classifier::{train_classifier, ClassifierArch, TrainOptions};
use fid_metrics::data::{load_idx_images, load_idx_labels};
use std::path::{Path, PathBuf};

/// Images evaluated per batch when measuring test accuracy.
const EVAL_BATCH: usize = 500;

/// The arguments of `ddss-cli train-classifier`.
#[derive(clap::Args, Debug)]
pub struct TrainClassifierArgs {
    /// Data set folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
    /// t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (e.g.
    /// /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    pub data: PathBuf,
    /// Output weights file; must end in .safetensors (the sidecar gets the same name with .json).
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture: a (search loss, 128-d features) or b (evaluation, 256-d features).
    #[arg(long)]
    pub arch: String,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Passes over the training set.
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Peak Adam learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Turn off the random horizontal flips.
    #[arg(long)]
    pub no_augment: bool,
    /// Train on the first N training images only (default: all).
    #[arg(long)]
    pub num: Option<usize>,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Set from the global --quiet.
    #[arg(skip)]
    pub quiet: bool,
}

/// `DIR/<stem>.gz` or `DIR/<stem>`, whichever exists.
fn find_split_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let candidate = dir.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "--data {}: no {stem}.gz (or {stem}) in this folder. It must hold the four MNIST-layout files \
         train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and \
         t10k-labels-idx1-ubyte.gz (Fashion-MNIST: /usr/share/datasets/fashion-mnist)",
        dir.display()
    )
}

/// Images and labels of one split (`train` or `t10k`), checked to have the same count.
fn load_split(dir: &Path, split: &str) -> Result<(tch::Tensor, Vec<u8>)> {
    let images_path = find_split_file(dir, &format!("{split}-images-idx3-ubyte"))?;
    let labels_path = find_split_file(dir, &format!("{split}-labels-idx1-ubyte"))?;
    let images = load_idx_images(&images_path)?;
    let labels = load_idx_labels(&labels_path)?;
    if images.size()[0] as usize != labels.len() {
        bail!(
            "{} holds {} images but {} holds {} labels",
            images_path.display(),
            images.size()[0],
            labels_path.display(),
            labels.len()
        );
    }
    Ok((images, labels))
}

/// `60000` -> `60k`, `1234` -> `1234`.
fn count_in_words(count: usize) -> String {
    let thousands = count / 1000;
    if thousands > 0 && thousands * 1000 == count {
        format!("{thousands}k")
    } else {
        count.to_string()
    }
}

/// Runs `ddss-cli train-classifier`.
pub fn run(args: TrainClassifierArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let arch = ClassifierArch::parse(&args.arch).with_context(|| format!("--arch {}", args.arch))?;
    if args.out.extension() != Some(std::ffi::OsStr::new("safetensors")) {
        bail!("--out {}: the weights file name must end in .safetensors", args.out.display());
    }
    ggdm_core::io::check_output_path(&args.out).context("--out")?;
    if !args.data.is_dir() {
        bail!(
            "--data {}: not a folder. Give the folder holding train-images-idx3-ubyte.gz, \
             train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz \
             (Fashion-MNIST: /usr/share/datasets/fashion-mnist)",
            args.data.display()
        );
    }
    let (mut train_images, mut train_labels) = load_split(&args.data, "train")?;
    let (test_images, test_labels) = load_split(&args.data, "t10k")?;
    if let Some(num) = args.num {
        if num == 0 {
            bail!("--num 0: need at least one training image");
        }
        let keep = num.min(train_labels.len());
        train_images = train_images.narrow(0, 0, keep as i64);
        train_labels.truncate(keep);
    }
    let options = TrainOptions {
        arch,
        seed: args.seed,
        epochs: args.epochs,
        batch_size: args.batch,
        learning_rate: args.lr,
        augment: !args.no_augment,
    };
    let steps_per_epoch = train_labels.len().div_ceil(args.batch.max(1));
    tracing::info!(
        "training classifier arch {arch} ({}) on {} images for {} epochs ({} steps) on {device:?}",
        arch.describe(),
        train_labels.len(),
        args.epochs,
        steps_per_epoch * args.epochs
    );
    let bar = progress((steps_per_epoch * args.epochs) as u64, args.quiet, "train-classifier");
    let mut classifier = train_classifier(&train_images, &train_labels, &options, device, |state| {
        bar.set_position(state.step as u64);
        bar.set_message(format!("epoch {} loss {:.4} acc {:.4}", state.epoch, state.epoch_loss, state.epoch_accuracy));
        if state.step % steps_per_epoch == 0 {
            bar.suspend(|| {
                tracing::info!(
                    "epoch {}: mean loss {:.4}, training accuracy {:.4}",
                    state.epoch,
                    state.epoch_loss,
                    state.epoch_accuracy
                )
            });
        }
    })?;
    bar.finish_and_clear();
    let test_accuracy = classifier.accuracy(&test_images, &test_labels, EVAL_BATCH)?;
    let data_name = args.data.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut info = classifier.info().clone();
    info.test_accuracy = Some((test_accuracy * 1e4).round() / 1e4);
    info.data = format!("{data_name} train {}", count_in_words(train_labels.len()));
    classifier.set_info(info);
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    classifier.save(&args.out)?;
    println!(
        "test accuracy {test_accuracy:.4} on {} images; {} parameters; trained in {:.1} s; wrote {} and {}",
        test_labels.len(),
        classifier.num_parameters(),
        classifier.info().train_seconds.unwrap_or(0.0),
        args.out.display(),
        fid_metrics::classifier::sidecar_path(&args.out).display()
    );
    Ok(())
}
