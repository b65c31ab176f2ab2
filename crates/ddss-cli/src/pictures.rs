//! The pictures a search writes next to its numbers, so that what it did can be seen:
//! - `before_after.png`: the start solver's and the learned sampler's grids on the same noise,
//!   side by side and labelled ([`write_after`]);
//! - `curves.png` (and `.svg`): the training loss and the validation metric against the step,
//!   from `metrics.jsonl` ([`Curves`]);
//! - `sampler.png` (and `.svg`): the learned grid against the start grid, and the `u`/`w`
//!   coefficient matrices (DESIGN.md section 4) against the start solver's
//!   ([`crate::sampler_picture`]).

use crate::figure::{drawing_error, text, Figure, GRID_GREY, PALETTE};
use anyhow::{Context, Result};
use ggdm_core::ggdm::GgdmSampler;
use ggdm_core::registry::SamplerChoice;
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use tch::Tensor;

/// Writes `curves.png` and `sampler.png` (each with an SVG) into `run_dir`, from its
/// `metrics.jsonl` and the start (`initial`, a GGDM sampler) and learned samplers. A picture that
/// cannot be drawn is a warning, not an error: the search's results are already saved.
pub fn write_search_pictures(run_dir: &Path, initial: &SamplerChoice, learned: &GgdmSampler) {
    if let Err(error) = try_write_search_pictures(run_dir, initial, learned) {
        tracing::warn!("the pictures of {} were not all drawn: {error:#}", run_dir.display());
    }
}

fn try_write_search_pictures(run_dir: &Path, initial: &SamplerChoice, learned: &GgdmSampler) -> Result<()> {
    let SamplerChoice::Ggdm(start) = initial else {
        anyhow::bail!("the start of a search is a GGDM sampler; cannot draw {}", run_dir.join("sampler.png").display())
    };
    let metrics = run_dir.join("metrics.jsonl");
    let curves = Curves::read(&metrics, &learned.provenance)?;
    if curves.loss.is_empty() {
        tracing::warn!("{} holds no finite loss; curves.png not written", metrics.display());
    } else {
        crate::figure::write_png(&curves, &run_dir.join("curves.png"))?;
        crate::figure::write_svg(&curves, &run_dir.join("curves.svg"))?;
    }
    crate::sampler_picture::write(start, learned, &run_dir.join("sampler.png"))
}

/// Writes `after` as `after.png` in `run_dir` (see [`crate::common::write_grid`]), and next to
/// it `before_after.png`: `before.png` (the start solver `start_name` on the same noise) and
/// `after.png` side by side under a label each.
pub fn write_after(after: &Tensor, columns: usize, run_dir: &Path, start_name: &str) -> Result<()> {
    crate::common::write_grid(after, columns, &run_dir.join("after.png"))?;
    let read = |name: &str| -> Result<RgbImage> {
        let path = run_dir.join(name);
        Ok(image::open(&path).with_context(|| format!("reading {}", path.display()))?.to_rgb8())
    };
    let picture = before_after(&read("before.png")?, &read("after.png")?, &format!("start solver ({start_name})"))?;
    crate::figure::encode_png(&picture, &run_dir.join("before_after.png"))
}

/// Height of the label band above the grids of `before_after.png`, and the gap between them.
const LABEL_BAND: u32 = 40;
const PANEL_GAP: u32 = 24;

/// `before` and `after` side by side on white, under the labels `before_label` and "learned".
fn before_after(before: &RgbImage, after: &RgbImage, before_label: &str) -> Result<RgbImage> {
    crate::figure::register_font()?;
    let width = before.width() + PANEL_GAP + after.width();
    let height = LABEL_BAND + before.height().max(after.height());
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut canvas, before, 0, LABEL_BAND as i64);
    image::imageops::replace(&mut canvas, after, (before.width() + PANEL_GAP) as i64, LABEL_BAND as i64);
    {
        let (w, h) = canvas.dimensions();
        let area = BitMapBackend::with_buffer(&mut canvas, (w, h)).into_drawing_area();
        // Labels of 20 px, smaller where a narrow grid would not hold them.
        let room = (before.width().min(after.width()) + PANEL_GAP / 2) as f64;
        let size = (20.0 * room / crate::figure::text_width(before_label, 20.0).max(1) as f64).clamp(9.0, 20.0);
        let centred = text(size).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ));
        let mid = LABEL_BAND as i32 / 2;
        area.draw_text(before_label, &centred, (before.width() as i32 / 2, mid)).map_err(drawing_error)?;
        let after_x = (before.width() + PANEL_GAP + after.width() / 2) as i32;
        area.draw_text("learned", &centred, (after_x, mid)).map_err(drawing_error)?;
        area.present().map_err(drawing_error)?;
    }
    Ok(canvas)
}

/// The loss and the validation metric of a search against the step.
#[derive(Debug)]
pub struct Curves {
    /// `(step, loss)` of every step with a finite loss.
    pub loss: Vec<(f64, f64)>,
    /// `(step, value)` of every validation, the start's (step 0) first when known.
    pub validation: Vec<(f64, f64)>,
    /// What the loss is (e.g. "KID on classifier a").
    pub loss_label: String,
    /// What the validation metric is (e.g. "validation KID").
    pub validation_label: String,
    /// The step whose parameters the search kept, when known.
    pub best_step: Option<f64>,
}

impl Curves {
    /// Reads `metrics.jsonl` (one JSON record per step; a later record of the same step, as a
    /// resumed run writes, replaces the earlier) and the learned sampler's provenance.
    pub fn read(metrics: &Path, provenance: &serde_json::Value) -> Result<Self> {
        let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
        let mut records = std::collections::BTreeMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let record: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}: line {} is not JSON", metrics.display(), i + 1))?;
            let step = record["step"]
                .as_u64()
                .with_context(|| format!("{}: line {} has no step", metrics.display(), i + 1))?;
            records.insert(step, record);
        }
        let finite = |v: &serde_json::Value| v.as_f64().filter(|x| x.is_finite());
        let loss = records.iter().filter_map(|(s, r)| Some((*s as f64, finite(&r["loss"])?))).collect();
        let key = if records.values().any(|r| r.get("validation_kid").is_some()) {
            "validation_kid"
        } else {
            "validation_teacher_distance"
        };
        let search = &provenance["search"];
        let metric = key.trim_start_matches("validation_");
        let start = finite(&search[format!("initial_validation_{metric}")]).map(|v| (0.0, v));
        let validation =
            start.into_iter().chain(records.iter().filter_map(|(s, r)| Some((*s as f64, finite(&r[key])?)))).collect();
        let validation_label = match key {
            "validation_kid" => "validation KID".to_string(),
            _ => format!(
                "validation teacher distance ({})",
                provenance["config"]["loss"]["teacher"]["distance"].as_str().unwrap_or("l2")
            ),
        };
        let best_step = search["best_step"].as_u64().map(|s| s as f64);
        Ok(Self {
            loss,
            validation,
            loss_label: loss_label(&provenance["config"]["loss"]),
            validation_label,
            best_step,
        })
    }

    /// One panel under `caption`: `points` against the step (`y_desc` up), dotted when there
    /// are few; on the validation panel the kept step is marked.
    fn draw_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        points: &[(f64, f64)],
        (caption, y_desc): (&str, &str),
        colour: RGBColor,
        validation: bool,
    ) -> Result<()> {
        let max_step = self.loss.iter().chain(points).map(|p| p.0).fold(1.0, f64::max);
        let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let pad = ((hi - lo) * 0.08).max(hi.abs().max(lo.abs()) * 0.02).max(1e-12);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, text(17.0))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(85)
            .build_cartesian_2d(step_axis(max_step), (lo - pad)..(hi + pad))
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .bold_line_style(GRID_GREY)
            .light_line_style(TRANSPARENT)
            .x_desc("search step")
            .y_desc(y_desc)
            .axis_desc_style(text(16.0))
            .label_style(text(14.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| crate::plot::format_tick(*v))
            .draw()
            .map_err(drawing_error)?;
        chart.draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2))).map_err(drawing_error)?;
        if validation || points.len() <= 100 {
            let dots = points.iter().map(|&p| Circle::new(p, 4, colour.filled()));
            chart.draw_series(dots).map_err(drawing_error)?;
        }
        if let Some(best) = self.best_step.and_then(|b| points.iter().find(|p| p.0 == b)).filter(|_| validation) {
            let diamond =
                EmptyElement::at(*best) + Polygon::new(vec![(0, -10), (10, 0), (0, 10), (-10, 0)], BLACK.filled());
            chart.draw_series(std::iter::once(diamond)).map_err(drawing_error)?;
            let note = EmptyElement::at(*best) + Text::new("kept", (12, -22), text(15.0));
            chart.draw_series(std::iter::once(note)).map_err(drawing_error)?;
        }
        Ok(())
    }
}

impl Figure for Curves {
    fn size(&self) -> (u32, u32) {
        (1000, 760)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let root = root.titled("search: loss and validation against the step", text(22.0)).map_err(drawing_error)?;
        let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
        let loss_caption = format!("training loss: {}", self.loss_label);
        self.draw_panel(&top, &self.loss, (&loss_caption, "loss"), PALETTE[0], false)?;
        if self.validation.is_empty() {
            let note = "no validation in metrics.jsonl";
            bottom.draw_text(note, &text(18.0), (120, 100)).map_err(drawing_error)?;
            return Ok(());
        }
        let caption = format!("{} (step 0: the start; the search keeps the best)", self.validation_label);
        self.draw_panel(&bottom, &self.validation, (&caption, "validation"), PALETTE[1], true)
    }
}

/// The step axis of [`Curves`]: `[0, max_step]` with ticks at whole steps only.
fn step_axis(max_step: f64) -> crate::plot::Ticked {
    let hi = max_step * 1.02;
    let ticks = crate::plot::linear_ticks(0.0, max_step).into_iter().filter(|t| t.fract() == 0.0).collect();
    crate::plot::Ticked { lo: 0.0, hi, ticks }
}

/// What the search minimised, from its config's `[loss]` (as `sampler.json`'s provenance holds
/// it): the loss on its feature network, or the teacher distance plus the weighted loss.
fn loss_label(loss: &serde_json::Value) -> String {
    let kind = match &loss["kind"] {
        serde_json::Value::String(s) => s.to_uppercase(),
        serde_json::Value::Object(o) => o.keys().next().cloned().unwrap_or_default().to_uppercase(),
        _ => "KID".into(),
    };
    let features = loss["features"].as_str().map(feature_name).unwrap_or_default();
    let on_features = if features.is_empty() { kind.clone() } else { format!("{kind} on {features}") };
    let teacher = &loss["teacher"];
    if teacher.is_object() {
        let distance = teacher["distance"].as_str().unwrap_or("l2");
        let sampler = teacher["sampler"].as_str().unwrap_or("teacher");
        let steps = teacher["steps"].as_u64().map(|s| format!(" {s} steps")).unwrap_or_default();
        let weight = teacher["kid_weight"].as_f64().unwrap_or(0.0);
        let plus = if weight > 0.0 { format!(" + {weight} x {on_features}") } else { String::new() };
        format!("{distance} distance to {sampler}{steps}{plus}")
    } else {
        on_features
    }
}

/// A feature network's short name: a file's stem (`models/fmnist-classifier-a.safetensors` ->
/// `fmnist-classifier-a`), or the name as given (`inception`).
fn feature_name(spec: &str) -> String {
    Path::new(spec).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| spec.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::figure::count_colour;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ddss-pictures-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn before_after_puts_both_grids_under_their_labels() {
        let before = RgbImage::from_pixel(170, 170, image::Rgb([10, 200, 10]));
        let after = RgbImage::from_pixel(170, 170, image::Rgb([200, 10, 200]));
        let picture = before_after(&before, &after, "start solver (unipc)").unwrap();
        assert_eq!(picture.dimensions(), (170 + PANEL_GAP + 170, LABEL_BAND + 170));
        assert_eq!(picture.get_pixel(5, LABEL_BAND + 5).0, [10, 200, 10]);
        assert_eq!(picture.get_pixel(170 + PANEL_GAP + 5, LABEL_BAND + 5).0, [200, 10, 200]);
        let band = (0..picture.width()).flat_map(|x| (0..LABEL_BAND).map(move |y| (x, y)));
        let inked = band.filter(|&(x, y)| picture.get_pixel(x, y).0[0] < 128).count();
        assert!(inked > 100, "the labels drew {inked} dark pixels");
    }

    #[test]
    fn write_after_writes_the_grid_and_the_labelled_pair() {
        let dir = temp_dir("after");
        let samples = Tensor::zeros([4, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
        crate::common::write_grid(&(samples.ones_like() * -1.0), 2, &dir.join("before.png")).unwrap();
        write_after(&samples, 2, &dir, "ddim").unwrap();
        let after = image::open(dir.join("after.png")).unwrap().to_rgb8();
        let pair = image::open(dir.join("before_after.png")).unwrap().to_rgb8();
        assert_eq!(pair.dimensions(), (2 * after.width() + PANEL_GAP, after.height() + LABEL_BAND));
        // before is black, after mid grey (0 in [-1, 1] is 128).
        assert_eq!(pair.get_pixel(10, LABEL_BAND + 10).0, [0, 0, 0]);
        assert_eq!(pair.get_pixel(after.width() + PANEL_GAP + 10, LABEL_BAND + 10).0, [128, 128, 128]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn curves_read_metrics_and_draw_both_panels() {
        let dir = temp_dir("curves");
        let metrics = dir.join("metrics.jsonl");
        let mut lines = String::new();
        for step in 1..=20u64 {
            let loss = 0.01 / step as f64;
            let validation =
                if step % 5 == 0 { format!(",\"validation_kid\":{}", 0.02 / step as f64) } else { String::new() };
            lines.push_str(&format!(
                "{{\"step\":{step},\"loss\":{loss},\"grad_norm\":1.0,\"lr\":0.01{validation},\"elapsed_s\":1.0}}\n"
            ));
        }
        lines.push_str(
            "{\"step\":21,\"loss\":null,\"grad_norm\":1.0,\"lr\":0.01,\"event\":\"rejected\",\"elapsed_s\":1.0}\n",
        );
        std::fs::write(&metrics, lines).unwrap();
        let provenance = serde_json::json!({
            "config": {"loss": {"kind": "kid", "features": "models/fmnist-classifier-a.safetensors"}},
            "search": {"best_step": 20, "initial_validation_kid": 0.03},
        });
        let curves = Curves::read(&metrics, &provenance).unwrap();
        assert_eq!(curves.loss.len(), 20);
        assert_eq!(
            curves.validation,
            vec![(0.0, 0.03), (5.0, 0.004), (10.0, 0.002), (15.0, 0.02 / 15.0), (20.0, 0.001)]
        );
        assert_eq!(curves.loss_label, "KID on fmnist-classifier-a");
        let image = crate::figure::render(&curves).unwrap();
        assert_eq!(image.dimensions(), (1000, 760));
        for colour in [PALETTE[0], PALETTE[1]] {
            assert!(count_colour(&image, colour) > 200, "{colour:?}");
        }
        let svg = crate::figure::render_svg(&curves).unwrap();
        for label in ["training loss: KID on fmnist-classifier-a", "validation KID", "search step", "kept"] {
            assert!(svg.contains(label), "the SVG lacks `{label}`");
        }
        std::fs::write(&metrics, "{\"loss\":1.0}\n").unwrap();
        assert!(Curves::read(&metrics, &provenance).unwrap_err().to_string().contains("line 1 has no step"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_step_axis_ticks_whole_steps() {
        assert_eq!(step_axis(4.0).ticks, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(step_axis(1.0).ticks, vec![0.0, 1.0]);
        assert_eq!(step_axis(60.0).ticks, vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
    }

    #[test]
    fn the_loss_label_names_a_teacher() {
        let loss = serde_json::json!({
            "kind": "kid", "features": "inception",
            "teacher": {"distance": "l2", "sampler": "unipc", "steps": 100, "kid_weight": 0.1},
        });
        assert_eq!(loss_label(&loss), "l2 distance to unipc 100 steps + 0.1 x KID on inception");
        assert_eq!(loss_label(&serde_json::json!({"kind": {"mmd_rbf": {}}})), "MMD_RBF");
    }

    /// The start of the search that learned `learned`, from the `[sampler]` section of the
    /// config its provenance holds.
    fn start_of(learned: &GgdmSampler) -> GgdmSampler {
        let section = learned.provenance["config"]["sampler"].clone();
        let section: ggdm_core::sampler_config::SamplerSection = serde_json::from_value(section).unwrap();
        section.init_sampler(&learned.scheduler, tch::Device::Cpu).unwrap()
    }

    /// Redraws the pictures of the run directory `DDSS_RENDER_DIR` (its sampler.json,
    /// metrics.jsonl and, when there, results.json) into it, to look at them on a real search.
    #[test]
    #[ignore = "draws a real run directory named by DDSS_RENDER_DIR"]
    fn render_a_run_directory() {
        let dir = std::path::PathBuf::from(std::env::var("DDSS_RENDER_DIR").expect("DDSS_RENDER_DIR"));
        let learned = GgdmSampler::load(&dir.join("sampler.json"), tch::Device::Cpu).unwrap();
        let initial = SamplerChoice::Ggdm(Box::new(start_of(&learned)));
        try_write_search_pictures(&dir, &initial, &learned).unwrap();
        if let Ok(text) = std::fs::read_to_string(dir.join("results.json")) {
            let rows: Vec<crate::search_cmd::ResultRow> = serde_json::from_str(&text).unwrap();
            crate::table_cmd::write_plots(&rows, &dir, "render").unwrap();
        }
    }
}
