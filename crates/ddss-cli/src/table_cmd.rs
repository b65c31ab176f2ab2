//! `ddss-cli table`: scores several samplers at several step counts on one model against one set
//! of real images, with one or more feature networks, and writes the comparison as
//! `results.json` (the rows of a search's `results.json`), `table.md` (one Markdown table per
//! feature network: samplers down, K across, and the learned sampler against the best baseline)
//! and the `fid_vs_steps*` and `kid_vs_steps*` plots (PNG and SVG, [`crate::plot`]).
//!
//! Every sampler draws the same noise (sample `i` uses the stream `(seed, i)`, as `ddss-cli sample`
//! and `eval` do), samples are rounded to 8-bit levels, and each batch of samples is scored by all
//! feature networks at once, so a sampler is run once per K whatever the number of networks.

use crate::common::{parse_device, progress_images};
use crate::metrics_cmd::{check_eval_memory, load_image_source, sample_features_multi, EvalOptions};
use crate::plot::{plot_against_steps, Series};
use crate::search_cmd::ResultRow;
use anyhow::{bail, Context, Result};
use fid_metrics::data::ReadOptions;
use fid_metrics::features::{extract_features_batched, FeatureSpec};
use fid_metrics::FeatureExtractor;
use ggdm_core::ggdm::GgdmSampler;
use ggdm_core::registry::{split_spacing, SamplerChoice};
use ggdm_nets::model_dir::LoadedModel;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The arguments of `ddss-cli table`.
#[derive(clap::Args, Debug)]
pub struct TableArgs {
    /// Model directory (diffusers layout, or model.pt + model.json).
    #[arg(long, required_unless_present = "render")]
    pub model: Option<PathBuf>,
    /// Baselines, comma-separated: any `--sampler` name of `ddss-cli sample`; NAME@SPACING runs
    /// it on another grid (e.g. ddim@quadratic, the DDIM paper's quadratic stride, or
    /// unipc@logsnr, DPM-Solver's log-SNR-uniform grid).
    #[arg(long, value_delimiter = ',', default_value = "ddpm,ddim,ddim@quadratic")]
    pub samplers: Vec<String>,
    /// Step counts K of the baselines, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5,10,20")]
    pub steps: Vec<usize>,
    /// Learned samplers (`sampler.json` files of `ddss-cli search`), comma-separated; each is
    /// scored at its own K. LABEL=FILE names the row (samplers with one label form one line of
    /// the plot, e.g. learned-kid=runs/k5/sampler.json,learned-kid=runs/k10/sampler.json; labels
    /// should start with "learned"); without a label the row is "learned".
    #[arg(long, value_delimiter = ',')]
    pub learned: Vec<String>,
    /// Feature networks, comma-separated: inception and/or classifier .safetensors paths.
    #[arg(long, value_delimiter = ',', default_value = "inception")]
    pub features: Vec<String>,
    /// Real images to compare with: an image folder, an IDX(.gz) file, a .npy of samples, or a
    /// data set folder holding train-images-idx3-ubyte.gz.
    #[arg(long = "ref", required_unless_present = "render")]
    pub reference: Option<PathBuf>,
    /// Also read the images of --ref's subfolders (symlinked ones included), depth first in name
    /// order.
    #[arg(long)]
    pub recursive: bool,
    /// Use the first N real images (default: --num).
    #[arg(long)]
    pub ref_num: Option<usize>,
    /// Samples per sampler and K (at least 2).
    #[arg(long, required_unless_present = "render")]
    pub num: Option<usize>,
    /// Samples per network batch.
    #[arg(long, default_value_t = 250)]
    pub batch: usize,
    /// Noise seed (sample i uses stream (seed, i)).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (results.json, table.md, fid_vs_steps*.png/.svg, kid_vs_steps*.png/.svg).
    #[arg(long)]
    pub out: PathBuf,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub network: crate::common::NetworkArgs,
    /// The many-step reference line drawn in every table and plot: SAMPLER:STEPS of a
    /// deterministic solver on the same noise (computed once, then read from the teacher pair
    /// cache), or none.
    #[arg(long, default_value = "unipc:100", value_parser = crate::many_step::ManyStep::parse)]
    pub many_step: crate::many_step::ManyStep,
    /// Only redraw table.md and the plots in --out from its results.json (e.g. after a run was
    /// stopped: results.json is rewritten after every sampler). --model, --ref and --num are
    /// then not needed.
    #[arg(long)]
    pub render: bool,
}

/// File-name-safe form of a feature network's name (`classifier:x` -> `classifier-x`).
fn slug(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect()
}

/// Distinct values in order of first appearance.
fn distinct<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// A metric the plots draw against steps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PlotMetric {
    Fid,
    /// KID x 1e3 (as in the tables), with error bars of one standard deviation over subsets.
    Kid,
}

impl PlotMetric {
    fn stem(self) -> &'static str {
        match self {
            Self::Fid => "fid",
            Self::Kid => "kid",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Fid => "FID",
            Self::Kid => "KID x1e3",
        }
    }

    fn axis_label(self) -> &'static str {
        match self {
            Self::Fid => "FID",
            Self::Kid => "KID x1e3 (bars: ±1 std over subsets)",
        }
    }

    /// The row's value and its error bar (0 for FID, which has none).
    fn of(self, row: &ResultRow) -> (f64, f64) {
        match self {
            Self::Fid => (row.fid, 0.0),
            Self::Kid => (row.kid_mean * 1e3, row.kid_std * 1e3),
        }
    }
}

/// One series per sampler of `rows` (all of one feature network), then one reference line per
/// many-step reference row.
fn plot_series(rows: &[&ResultRow], metric: PlotMetric) -> Vec<Series> {
    let samplers = distinct(rows.iter().filter(|r| !r.reference).map(|r| r.sampler.clone()));
    let mut series: Vec<Series> = samplers
        .iter()
        .map(|name| {
            let of_sampler: Vec<&&ResultRow> = rows.iter().filter(|r| &r.sampler == name && !r.reference).collect();
            Series {
                label: name.clone(),
                points: of_sampler.iter().map(|r| (r.steps, metric.of(r).0)).collect(),
                horizontal: false,
                spread: if metric == PlotMetric::Kid {
                    of_sampler.iter().map(|r| metric.of(r).1).collect()
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    series.extend(rows.iter().filter(|r| r.reference).map(|r| Series {
        label: format!("{} {} steps", r.sampler, r.steps),
        points: vec![(r.steps, metric.of(r).0)],
        horizontal: true,
        spread: Vec::new(),
    }));
    series
}

/// Writes `fid_vs_steps_<features>.png` and `kid_vs_steps_<features>.png` (KID with error bars)
/// for every feature network in `rows`, and `fid_vs_steps.png` and `kid_vs_steps.png` for the
/// first held-out one (or the first one), each with an `.svg` of the same picture next to it;
/// returns the paths.
pub fn write_plots(rows: &[ResultRow], dir: &Path, title: &str) -> Result<Vec<PathBuf>> {
    let feature_sets = distinct(rows.iter().map(|r| r.features.clone()));
    let primary =
        rows.iter().find(|r| r.held_out).map(|r| r.features.clone()).or_else(|| feature_sets.first().cloned());
    let mut written = Vec::new();
    for features in &feature_sets {
        let of_set: Vec<&ResultRow> = rows.iter().filter(|r| &r.features == features).collect();
        let num = of_set.first().map(|r| r.num).unwrap_or(0);
        for metric in [PlotMetric::Fid, PlotMetric::Kid] {
            let series = plot_series(&of_set, metric);
            let title = format!("{title}: {} ({features}, {num} samples)", metric.name());
            let mut paths = vec![dir.join(format!("{}_vs_steps_{}.png", metric.stem(), slug(features)))];
            if Some(features) == primary.as_ref() {
                paths.push(dir.join(format!("{}_vs_steps.png", metric.stem())));
            }
            for path in paths {
                plot_against_steps(&series, &title, metric.axis_label(), &path)?;
                written.push(path.clone());
                written.push(path.with_extension("svg"));
            }
        }
    }
    Ok(written)
}

/// One Markdown table per feature network: samplers down, K across, cells `FID (KID x1e3)`;
/// then the many-step reference line, and for each K with a learned sampler its verdict against
/// the best baseline ([`verdicts`]).
pub fn markdown_tables(rows: &[ResultRow]) -> String {
    let mut out = String::new();
    for features in distinct(rows.iter().map(|r| r.features.clone())) {
        let of_set: Vec<&ResultRow> = rows.iter().filter(|r| r.features == features && !r.reference).collect();
        let mut ks = distinct(of_set.iter().map(|r| r.steps));
        ks.sort_unstable();
        let num = of_set.first().map(|r| r.num).unwrap_or(0);
        out.push_str(&format!("FID (KID x1e3), features `{features}`, {num} samples per cell\n\n| sampler |"));
        for k in &ks {
            out.push_str(&format!(" K = {k} |"));
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(ks.len()));
        out.push('\n');
        for sampler in distinct(of_set.iter().map(|r| r.sampler.clone())) {
            let learned = sampler.starts_with("learned");
            out.push_str(&if learned { format!("| **{sampler}** |") } else { format!("| {sampler} |") });
            for k in &ks {
                match of_set.iter().find(|r| r.sampler == sampler && r.steps == *k) {
                    Some(r) => {
                        let cell = format!("{:.3} ({:.2})", r.fid, r.kid_mean * 1e3);
                        out.push_str(&if learned { format!(" **{cell}** |") } else { format!(" {cell} |") });
                    }
                    None => out.push_str(" |"),
                }
            }
            out.push('\n');
        }
        out.push('\n');
        let set: Vec<&ResultRow> = rows.iter().filter(|r| r.features == features).collect();
        out.push_str(&verdict_lines(&set));
        out.push('\n');
    }
    out
}

/// The verdicts of [`verdict_lines`] for every feature network (only the held-out ones when
/// `held_out_only` and there is one), each under a heading naming the network.
pub fn verdicts(rows: &[ResultRow], held_out_only: bool) -> String {
    let any_held_out = rows.iter().any(|r| r.held_out);
    let mut out = String::new();
    for features in distinct(rows.iter().map(|r| r.features.clone())) {
        let set: Vec<&ResultRow> = rows.iter().filter(|r| r.features == features).collect();
        let held_out = set.iter().any(|r| r.held_out);
        if held_out_only && any_held_out && !held_out {
            continue;
        }
        let num = set.first().map(|r| r.num).unwrap_or(0);
        let note = if held_out { "held out" } else { "the search's own loss network" };
        out.push_str(&format!("Verdict, features `{features}` ({note}), {num} samples:\n"));
        out.push_str(&verdict_lines(&set));
    }
    out
}

/// For a feature network's rows: the many-step reference line, then for each K with a learned
/// sampler whether its FID beats the best baseline's at that K, by how much, and how much of the
/// gap from that baseline to the reference line it closes.
fn verdict_lines(set: &[&ResultRow]) -> String {
    let mut out = String::new();
    let reference = set.iter().find(|r| r.reference);
    if let Some(r) = reference {
        out.push_str(&format!(
            "* Reference: {} at {} steps, FID {:.3} (the model's many-step quality on the same noise).\n",
            r.sampler, r.steps, r.fid
        ));
    }
    let mut ks = distinct(set.iter().filter(|r| !r.reference).map(|r| r.steps));
    ks.sort_unstable();
    for k in ks {
        let at_k = || set.iter().filter(move |r| r.steps == k && !r.reference);
        let best = at_k().filter(|r| !r.sampler.starts_with("learned")).min_by(|a, b| a.fid.total_cmp(&b.fid));
        let Some(best) = best else { continue };
        for learned in at_k().filter(|r| r.sampler.starts_with("learned")) {
            let verdict = if learned.fid < best.fid { "beats" } else { "does not beat" };
            let gap = match reference {
                Some(r) if learned.fid <= r.fid => format!("; it is at or below the {}-step reference", r.steps),
                Some(r) if best.fid > r.fid => format!(
                    "; it closes {:.0}% of the gap from {} to the {}-step reference",
                    100.0 * (best.fid - learned.fid) / (best.fid - r.fid),
                    best.sampler,
                    r.steps
                ),
                _ => String::new(),
            };
            out.push_str(&format!(
                "* K = {k}: {} FID {:.3} is {:.2}x the best baseline's ({} {:.3}): it {verdict} the best \
                 baseline{gap}{}.\n",
                learned.sampler,
                learned.fid,
                learned.fid / best.fid,
                best.sampler,
                best.fid,
                if learned.held_out { "" } else { " (this network is the search's loss: not held out)" }
            ));
        }
    }
    out
}

/// Whether the sampler's search loss used the feature network `features` (by extractor name).
fn loss_used(sampler: &GgdmSampler, features: &str) -> bool {
    let loss = sampler.provenance.pointer("/config/loss/features").and_then(|v| v.as_str());
    match loss.map(FeatureSpec::parse) {
        Some(Ok(spec)) => spec.name() == features,
        _ => false,
    }
}

/// Writes table.md and the plots for `rows` into `out`; returns the Markdown.
fn render(rows: &[ResultRow], out: &Path, title: &str) -> Result<(String, Vec<PathBuf>)> {
    // Baselines first, learned samplers last, each in their order of appearance.
    let (learned, baselines): (Vec<ResultRow>, Vec<ResultRow>) =
        rows.iter().cloned().partition(|r| r.sampler.starts_with("learned"));
    let rows: Vec<ResultRow> = baselines.into_iter().chain(learned).collect();
    let tables = markdown_tables(&rows);
    ggdm_core::io::write_atomic(&out.join("table.md"), tables.as_bytes())?;
    let plots = write_plots(&rows, out, title)?;
    Ok((tables, plots))
}

fn print_written(out: &Path, tables: &str, plots: &[PathBuf]) {
    println!("{tables}");
    println!(
        "written: {}, {}, {}",
        out.join("results.json").display(),
        out.join("table.md").display(),
        plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
}

/// `--render`: redraws table.md and the plots in `--out` from its results.json.
fn render_only(args: &TableArgs) -> Result<()> {
    let path = args.out.join("results.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<ResultRow> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a list of result rows", path.display()))?;
    let title = args.model.as_ref().and_then(|m| m.file_name()).map(|s| s.to_string_lossy().to_string());
    let (tables, plots) = render(&rows, &args.out, &title.unwrap_or_else(|| "results".into()))?;
    print_written(&args.out, &tables, &plots);
    Ok(())
}

/// `--model`, `--ref` and `--num`, after the checks of the arguments that need no model.
fn check_args(args: &TableArgs) -> Result<(PathBuf, PathBuf, usize)> {
    let (Some(model_dir), Some(reference), Some(num)) = (args.model.clone(), args.reference.clone(), args.num) else {
        bail!("--model, --ref and --num are required (unless --render)");
    };
    if num < 2 {
        bail!("--num {num}: FID needs at least 2 samples");
    }
    if args.batch == 0 {
        bail!("--batch 0: need at least 1");
    }
    if args.steps.contains(&0) {
        bail!("--steps: step counts must be >= 1");
    }
    if args.samplers.is_empty() && args.learned.is_empty() {
        bail!("nothing to compare: give --samplers and/or --learned");
    }
    Ok((model_dir, reference, num))
}

/// A row label of the table with its sampler; for a learned sampler also the sampler itself
/// (its provenance tells which feature network its loss used).
struct Entry {
    label: String,
    choice: SamplerChoice,
    learned: Option<GgdmSampler>,
}

/// The baselines of `--samplers` at every `--steps`, then the learned samplers of `--learned`
/// (a label that two samplers of one K share gets the run folder's name appended).
fn entries(args: &TableArgs, model: &LoadedModel, device: Device) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for &k in &args.steps {
        for spec in &args.samplers {
            let (name, spacing) = split_spacing(spec);
            let choice = crate::sample::choose(name, Some(k), 0.0, spacing, model, device)
                .with_context(|| format!("--samplers {spec}"))?;
            entries.push(Entry { label: spec.clone(), choice, learned: None });
        }
    }
    let mut learned_entries: Vec<(String, PathBuf, GgdmSampler)> = Vec::new();
    for spec in &args.learned {
        let (label, path) = match spec.split_once('=') {
            Some((label, path)) => (label.to_string(), PathBuf::from(path)),
            None => ("learned".to_string(), PathBuf::from(spec)),
        };
        let sampler = GgdmSampler::load(&path, device).with_context(|| format!("--learned {}", path.display()))?;
        sampler
            .check_compatible(&model.scheduler, model.sample_shape())
            .with_context(|| format!("--learned {}", path.display()))?;
        learned_entries.push((label, path, sampler));
    }
    for (label, path, sampler) in learned_entries {
        let clash = entries.iter().any(|other| other.label == label && other.choice.steps() == sampler.steps);
        let label = if clash {
            let run = path.parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().to_string());
            format!("{label}:{}", run.unwrap_or_else(|| path.display().to_string()))
        } else {
            label
        };
        let choice = SamplerChoice::Ggdm(Box::new(GgdmSampler::load(&path, device)?));
        entries.push(Entry { label, choice, learned: Some(sampler) });
    }
    Ok(entries)
}

/// The feature networks of `--features`, each with the features of the real images `real`.
fn reference_features(
    specs: &[FeatureSpec],
    real: &Tensor,
    batch: usize,
    device: Device,
    quiet: bool,
) -> Result<Vec<(Box<dyn FeatureExtractor>, Tensor)>> {
    let mut references = Vec::new();
    for spec in specs {
        let extractor = spec.open(device)?;
        let bar = progress_images(real.size()[0] as u64, quiet, &format!("reference {}", extractor.name()));
        let feats = extract_features_batched(&crate::search_cmd::DynExtractor(extractor.as_ref()), real, batch, {
            let bar = bar.clone();
            move |done, _| bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        references.push((extractor, feats));
    }
    Ok(references)
}

/// Writes `rows` as `OUT/results.json`.
fn write_results(out: &Path, rows: &[ResultRow]) -> Result<()> {
    let results = out.join("results.json");
    ggdm_core::io::write_atomic(&results, serde_json::to_string_pretty(rows)?.as_bytes())?;
    Ok(())
}

/// What the samplers are scored with: the model, the noise and batching, and each feature
/// network with the real images' features.
struct Scoring<'a> {
    model: &'a LoadedModel,
    options: EvalOptions,
    extractors: Vec<&'a dyn FeatureExtractor>,
    references: Vec<&'a Tensor>,
    quiet: bool,
}

impl Scoring<'_> {
    /// The rows of `entry` (one per feature network). A network is held out unless it is the one
    /// the learned sampler's loss used.
    fn rows(&self, entry: &Entry) -> Result<Vec<ResultRow>> {
        let (label, steps) = (&entry.label, entry.choice.steps());
        let bar = progress_images(self.options.num as u64, self.quiet, &format!("{label} K={steps}"));
        let (features, _) =
            sample_features_multi(self.model, &entry.choice, &self.options, &self.extractors, 0, &mut |done, _| {
                bar.set_position(done as u64)
            })?;
        bar.finish_and_clear();
        let mut rows = Vec::new();
        for ((extractor, reference), feats) in self.extractors.iter().zip(&self.references).zip(&features) {
            let name = extractor.name();
            let held_out = entry.learned.as_ref().is_none_or(|s| !loss_used(s, name));
            let row = ResultRow::score(label, steps, name, held_out, feats, reference)?;
            tracing::info!("{label} K={steps} {name}: FID {:.4}, KID {:.6}", row.fid, row.kid_mean);
            rows.push(row);
        }
        Ok(rows)
    }
}

/// Runs `ddss-cli table`.
pub fn run(args: TableArgs, quiet: bool) -> Result<()> {
    if args.render {
        return render_only(&args);
    }
    let (model_dir, reference, num) = check_args(&args)?;
    let specs = args
        .features
        .iter()
        .map(|f| FeatureSpec::parse(f).with_context(|| format!("--features {f}")))
        .collect::<Result<Vec<_>>>()?;
    let device = parse_device(&args.device)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let model = args.network.load(&model_dir, device)?;
    let options = EvalOptions { num, batch: args.batch, seed: args.seed, quantize: true, device };
    // The sample size and --batch before the reference features are computed; --num with them.
    check_eval_memory(&model, &options, 0, ["--batch", "--num"])?;
    let entries = entries(&args, &model, device)?;

    let ref_num = args.ref_num.unwrap_or(num);
    let read = ReadOptions { recursive: args.recursive, limit: Some(ref_num) };
    let real = load_image_source(&reference, read).with_context(|| format!("--ref {}", reference.display()))?;
    if let Some(shape) = model.sample_shape() {
        if real.size()[1..] != shape[..] {
            bail!("--ref {}: images are {:?}, the model samples {:?}", reference.display(), &real.size()[1..], shape);
        }
    }
    let references = reference_features(&specs, &real, args.batch, device, quiet)?;
    let scoring = Scoring {
        model: &model,
        options,
        extractors: references.iter().map(|(e, _)| e.as_ref()).collect(),
        references: references.iter().map(|(_, r)| r).collect(),
        quiet,
    };
    let feature_dims = scoring.extractors.iter().map(|e| e.dim()).sum();
    check_eval_memory(&model, &scoring.options, feature_dims, ["--batch", "--num"])?;
    let mut rows = Vec::new();
    // Learned samplers first: if the run is stopped, results.json (rewritten after every
    // sampler) already holds them.
    let (learned_first, baselines): (Vec<_>, Vec<_>) = entries.iter().partition(|e| e.learned.is_some());
    for entry in learned_first.into_iter().chain(baselines) {
        rows.extend(scoring.rows(entry)?);
        write_results(&args.out, &rows)?;
    }
    if args.many_step.enabled() {
        let precision = ggdm_nets::model_dir::NetworkPrecision::parse(&args.network.precision)?;
        let with_reference: Vec<(&dyn FeatureExtractor, &Tensor, bool)> =
            scoring.extractors.iter().zip(&scoring.references).map(|(e, r)| (*e, *r, true)).collect();
        rows.extend(args.many_step.rows(&model, &scoring.options, precision, &with_reference, quiet)?);
        write_results(&args.out, &rows)?;
    }
    let title = model_dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    let (tables, plots) = render(&rows, &args.out, &title)?;
    print_written(&args.out, &tables, &plots);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(sampler: &str, steps: usize, fid: f64, held_out: bool) -> ResultRow {
        ResultRow {
            sampler: sampler.into(),
            steps,
            num: 100,
            features: "classifier:b".into(),
            held_out,
            fid,
            kid_mean: fid / 1000.0,
            kid_std: 0.0,
            reference: false,
        }
    }

    #[test]
    fn tables_compare_the_learned_sampler_with_the_best_baseline() {
        let rows = vec![
            row("ddim", 5, 2.0, true),
            row("ddpm", 5, 3.0, true),
            row("ddim", 10, 1.0, true),
            row("ddpm", 10, 0.8, true),
            row("learned", 10, 0.4, true),
            row("learned", 5, 2.5, true),
        ];
        let text = markdown_tables(&rows);
        assert!(text.contains("| sampler | K = 5 | K = 10 |"), "{text}");
        assert!(text.contains("| ddim | 2.000 (2.00) | 1.000 (1.00) |"), "{text}");
        assert!(text.contains("K = 10: learned FID 0.400 is 0.50x the best baseline's (ddpm 0.800): it beats the best"));
        assert!(text.contains("K = 5: learned FID 2.500 is 1.25x the best baseline's (ddim 2.000): it does not beat"));
        assert_eq!(slug("classifier:fmnist-classifier-b"), "classifier-fmnist-classifier-b");
    }

    #[test]
    fn the_many_step_reference_is_a_line_not_a_baseline() {
        let mut reference = row("unipc", 100, 0.2, true);
        reference.reference = true;
        let rows = vec![row("unipc", 10, 0.4, true), row("learned", 10, 0.3, true), reference.clone()];
        let text = markdown_tables(&rows);
        assert!(!text.contains("K = 100"), "the reference is not a column: {text}");
        assert!(text.contains("Reference: unipc at 100 steps, FID 0.200"), "{text}");
        assert!(
            text.contains("it beats the best baseline; it closes 50% of the gap from unipc to the 100-step"),
            "{text}"
        );
        let below = vec![row("unipc", 10, 0.4, true), row("learned", 10, 0.1, true), reference.clone()];
        assert!(markdown_tables(&below).contains("at or below the 100-step reference"));
        // The reference never counts as the best baseline, even when it is better.
        let text = verdicts(&rows, true);
        assert!(text.contains("0.75x the best baseline's (unipc 0.400)"), "{text}");
        let json = serde_json::to_string(&rows[0]).unwrap();
        assert!(!json.contains("reference"), "false is left out: {json}");
        let back: ResultRow = serde_json::from_str(&serde_json::to_string(&reference).unwrap()).unwrap();
        assert!(back.reference);
    }
}
