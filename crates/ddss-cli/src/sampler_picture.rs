//! `sampler.png`: what a search learned, drawn from the `derived` section of the start and the
//! learned `sampler.json` (DESIGN.md section 4): the learned grid `tau_i` against the start grid
//! and their difference, and the `u` (state) and `w` (prediction) coefficient matrices of the
//! update `x_{i+1} = sum_j u_ij x_j + w_ij x0_hat_j` as heat maps, start | learned | learned −
//! start, on a diverging colour scale centred on 0.

use crate::figure::{drawing_error, text, Figure, GRID_GREY, PALETTE};
use anyhow::{bail, Result};
use ggdm_core::ggdm::{DerivedFile, GgdmSampler};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Writes `path` (a PNG) and the same picture as an SVG next to it.
pub fn write(start: &GgdmSampler, learned: &GgdmSampler, path: &Path) -> Result<()> {
    if start.steps != learned.steps {
        bail!(
            "cannot draw {}: the start has {} steps, the learned sampler {}",
            path.display(),
            start.steps,
            learned.steps
        );
    }
    let history = format!("{:?}", learned.history).to_lowercase();
    let query = format!("{:?}", learned.query).to_lowercase();
    let title = format!(
        "learned sampler: K = {}, started from {} ({history} history, {query} query)",
        learned.steps,
        learned.base.name()
    );
    let picture = SamplerPicture { start: start.to_file().derived, learned: learned.to_file().derived, title };
    crate::figure::write_png(&picture, path)?;
    crate::figure::write_svg(&picture, &path.with_extension("svg"))
}

/// The [`Figure`] of `sampler.png`.
pub struct SamplerPicture {
    pub start: DerivedFile,
    pub learned: DerivedFile,
    pub title: String,
}

/// Colours of the ends of the diverging scale (ColorBrewer RdBu) and of the unused upper
/// triangle.
pub const NEGATIVE: RGBColor = RGBColor(33, 102, 172);
pub const POSITIVE: RGBColor = RGBColor(178, 24, 43);
const UNUSED: RGBColor = RGBColor(242, 242, 242);

/// `value / scale` on the diverging scale: white at 0, [`POSITIVE`] at +1, [`NEGATIVE`] at -1.
fn diverging(value: f64, scale: f64) -> RGBColor {
    let t = if scale > 0.0 { (value / scale).clamp(-1.0, 1.0) } else { 0.0 };
    let end = if t >= 0.0 { POSITIVE } else { NEGATIVE };
    let mix = |c: u8| (255.0 + (c as f64 - 255.0) * t.abs()).round() as u8;
    RGBColor(mix(end.0), mix(end.1), mix(end.2))
}

/// The largest `|value|` of the lower triangles of `matrices` (1 when all are 0).
fn largest(matrices: &[&[Vec<f64>]]) -> f64 {
    let max = matrices.iter().flat_map(|m| m.iter().flatten()).fold(0.0f64, |acc, v| acc.max(v.abs()));
    if max > 0.0 {
        max
    } else {
        1.0
    }
}

fn difference(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    a.iter().zip(b).map(|(ra, rb)| ra.iter().zip(rb).map(|(x, y)| x - y).collect()).collect()
}

fn centred() -> Pos {
    Pos::new(HPos::Center, VPos::Center)
}

/// A `K x K` lower-triangular matrix as a heat map filling `area`: the title on top, cell
/// `(i, j)` at row `i` (the step) and column `j` (the earlier state or prediction), and a colour
/// bar from `-scale` to `+scale` below.
fn draw_heatmap<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    matrix: &[Vec<f64>],
    scale: f64,
    title: &str,
) -> Result<()> {
    let (width, height) = area.dim_in_pixel();
    let k = matrix.len().max(1) as i32;
    let side = (width as i32 - 70).min(height as i32 - 100).max(k);
    let cell = side / k;
    let (x0, y0) = ((width as i32 - cell * k) / 2 + 10, 34);
    area.draw_text(title, &text(16.0).pos(centred()), (width as i32 / 2, 12)).map_err(drawing_error)?;
    let every = if k <= 12 { 1 } else { 5 };
    for (i, row) in matrix.iter().enumerate() {
        for (j, &value) in row.iter().enumerate() {
            let colour = if j > i { UNUSED } else { diverging(value, scale) };
            let (x, y) = (x0 + j as i32 * cell, y0 + i as i32 * cell);
            area.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], colour.filled())).map_err(drawing_error)?;
        }
        if i as i32 % every == 0 {
            let label = text(12.0).pos(Pos::new(HPos::Right, VPos::Center));
            area.draw_text(&i.to_string(), &label, (x0 - 4, y0 + i as i32 * cell + cell / 2)).map_err(drawing_error)?;
        }
    }
    area.draw(&Rectangle::new([(x0, y0), (x0 + cell * k, y0 + cell * k)], BLACK.stroke_width(1)))
        .map_err(drawing_error)?;
    let bar_y = y0 + cell * k + 14;
    let bar_width = cell * k;
    for s in 0..bar_width {
        let value = scale * (2.0 * s as f64 / (bar_width - 1).max(1) as f64 - 1.0);
        let x = x0 + s;
        area.draw(&PathElement::new(vec![(x, bar_y), (x, bar_y + 12)], diverging(value, scale)))
            .map_err(drawing_error)?;
    }
    let small = text(13.0).pos(centred());
    let scale_text = crate::plot::format_tick(scale);
    for (label, x) in [
        (format!("-{scale_text}"), x0),
        ("0".to_string(), x0 + bar_width / 2),
        (format!("+{scale_text}"), x0 + bar_width),
    ] {
        area.draw_text(&label, &small, (x, bar_y + 24)).map_err(drawing_error)?;
    }
    Ok(())
}

impl SamplerPicture {
    /// The start and learned grids against the step index (left), and their difference (right).
    fn draw_grids<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()> {
        let (left, right) = area.split_horizontally(area.dim_in_pixel().0 / 2);
        let index =
            |taus: &[f64]| -> Vec<(f64, f64)> { taus.iter().enumerate().map(|(i, &t)| (i as f64, t)).collect() };
        let (start, learned) = (index(&self.start.timesteps), index(&self.learned.timesteps));
        let change: Vec<(f64, f64)> = learned.iter().zip(&start).map(|(l, s)| (l.0, l.1 - s.1)).collect();
        let k = start.len().max(1) as f64;
        let tau_max = start.iter().chain(&learned).map(|p| p.1).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&left)
            .caption("timesteps tau_i", text(18.0))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..k - 0.5, 0.0..tau_max * 1.05)
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .bold_line_style(GRID_GREY)
            .light_line_style(TRANSPARENT)
            .x_desc("step i")
            .label_style(text(13.0))
            .axis_desc_style(text(15.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(drawing_error)?;
        // The start as large rings under the learned dots, so both show where they agree.
        for (points, colour, name, radius) in [(&start, PALETTE[0], "start", 8), (&learned, PALETTE[1], "learned", 4)] {
            let style = if radius > 4 { colour.stroke_width(3) } else { colour.filled() };
            chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
                .map_err(drawing_error)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, radius, style))).map_err(drawing_error)?;
        }
        chart
            .configure_series_labels()
            .label_font(text(15.0))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(drawing_error)?;
        let reach = change.iter().fold(1e-9f64, |acc, p| acc.max(p.1.abs())) * 1.15;
        let mut chart = ChartBuilder::on(&right)
            .caption("learned - start timestep", text(18.0))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..k - 0.5, -reach..reach)
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .bold_line_style(GRID_GREY)
            .light_line_style(TRANSPARENT)
            .x_desc("step i")
            .label_style(text(13.0))
            .axis_desc_style(text(15.0))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| crate::plot::format_tick(*v))
            .draw()
            .map_err(drawing_error)?;
        chart
            .draw_series(LineSeries::new([(-0.5, 0.0), (k - 0.5, 0.0)], BLACK.stroke_width(1)))
            .map_err(drawing_error)?;
        let bars = change.iter().map(|&(i, d)| Rectangle::new([(i - 0.3, 0.0), (i + 0.3, d)], PALETTE[1].filled()));
        chart.draw_series(bars).map_err(drawing_error)?;
        Ok(())
    }
}

impl Figure for SamplerPicture {
    fn size(&self) -> (u32, u32) {
        (1200, 1060)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let root = root.titled(&self.title, text(22.0)).map_err(drawing_error)?;
        let (grids, matrices) = root.split_vertically(340);
        self.draw_grids(&grids)?;
        let cells = matrices.split_evenly((2, 3));
        let rows = [
            ("u_ij (weight of x_j)", &self.start.u, &self.learned.u),
            ("w_ij (weight of x0_hat_j)", &self.start.w, &self.learned.w),
        ];
        for (r, (name, start, learned)) in rows.into_iter().enumerate() {
            let scale = largest(&[start, learned]);
            let change = difference(learned, start);
            let change_scale = largest(&[&change]);
            draw_heatmap(&cells[3 * r], start, scale, &format!("{name}, start"))?;
            draw_heatmap(&cells[3 * r + 1], learned, scale, &format!("{name}, learned"))?;
            draw_heatmap(&cells[3 * r + 2], &change, change_scale, &format!("{name}: learned - start"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::figure::count_colour;
    use ggdm_core::ggdm::{GgdmBase, History, Learnable};
    use ggdm_core::grid::Spacing;

    fn unipc(steps: usize) -> GgdmSampler {
        let scheduler = ggdm_core::scheduler_config::SchedulerConfig::default();
        let (history, learn, cpu) = (History::Full, Learnable::all(), tch::Device::Cpu);
        GgdmSampler::init_from_solver_spacing(
            GgdmBase::Unipc,
            &scheduler,
            steps,
            Spacing::Trailing,
            history,
            learn,
            cpu,
        )
        .unwrap()
    }

    fn samplers() -> (GgdmSampler, GgdmSampler) {
        let (start, mut learned) = (unipc(6), unipc(6));
        tch::no_grad(|| {
            learned.params.grid_logits.copy_(&tch::Tensor::from_slice(&[0.3, -0.2, 0.1, 0.0, -0.1, 0.2]));
            let _ = learned.params.u_residual.fill_(0.05);
            let _ = learned.params.w_residual.fill_(-0.05);
        });
        (start, learned)
    }

    #[test]
    fn draws_both_grids_and_the_heat_maps() {
        let (start, learned) = samplers();
        let dir = std::env::temp_dir().join(format!("ddss-sampler-picture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sampler.png");
        write(&start, &learned, &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (1200, 1060));
        for colour in [PALETTE[0], PALETTE[1], POSITIVE, NEGATIVE, UNUSED] {
            let count = count_colour(&image, colour);
            assert!(count > 100, "colour {colour:?} drawn on {count} pixels");
        }
        let svg = std::fs::read_to_string(path.with_extension("svg")).unwrap();
        for label in [
            "timesteps tau_i",
            "u_ij (weight of x_j), start",
            "u_ij (weight of x_j), learned",
            "w_ij (weight of x0_hat_j): learned - start",
            "K = 6, started from unipc",
        ] {
            assert!(svg.contains(label), "the SVG lacks `{label}`");
        }
        assert!(write(&start, &unipc(5), &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_colour_scale_is_centred_on_zero() {
        assert_eq!(diverging(0.0, 1.0), RGBColor(255, 255, 255));
        assert_eq!(diverging(2.0, 1.0), POSITIVE);
        assert_eq!(diverging(-1.0, 1.0), NEGATIVE);
        assert_eq!(largest(&[&[vec![0.0, 0.0]]]), 1.0);
        assert_eq!(largest(&[&[vec![0.5, -2.0]], &[vec![1.0]]]), 2.0);
    }
}
