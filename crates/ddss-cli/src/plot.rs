//! Line plots of a metric against the number of sampling steps (the "FID vs steps" and "KID vs
//! steps" pictures of a search run and of `ddss-cli table`), drawn with `plotters` in the
//! embedded font ([`crate::figure`]) as a PNG and an SVG of the same picture.
//!
//! The x axis (steps) is logarithmic with a tick at every step count that occurs; the y axis is
//! logarithmic when the values span more than a factor of 4 and linear otherwise. A series with a
//! single point (a learned sampler at its own K) is drawn as a large diamond, a reference series
//! (`horizontal`) as a dashed line across the plot, and a series with a `spread` gets error bars.
//! The legend sits right of the plot and is as wide as its longest label.

use crate::figure::{drawing_error, text, text_width, Figure, GRID_GREY, PALETTE};
use anyhow::{bail, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One line of the plot: a label and `(steps, value)` points.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(usize, f64)>,
    /// A reference level (e.g. the model's many-step quality): drawn as a dashed line across the
    /// whole plot at its first point's value, which does not add a step to the x axis.
    pub horizontal: bool,
    /// One standard deviation for each point, drawn as error bars (empty: none).
    pub spread: Vec<f64>,
}

/// Width of the plot without its legend, and height of the picture.
const PLOT_WIDTH: u32 = 900;
const HEIGHT: u32 = 600;
const LEGEND_TEXT: f64 = 17.0;
const LEGEND_ROW: i32 = 30;
/// Where the legend's label starts, right of its line sample.
const LEGEND_LABEL_X: i32 = 62;

type StepsChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<Ticked, Ticked>>;

/// A linear axis over `[lo, hi]` whose ticks (and grid lines) are exactly `ticks`.
#[derive(Debug, Clone)]
pub(crate) struct Ticked {
    pub lo: f64,
    pub hi: f64,
    pub ticks: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let fraction = (value - self.lo) / (self.hi - self.lo);
        limit.0 + (fraction * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Tick values for a log axis over `[lo, hi]`: 1, 2, 5 times powers of ten (thinned when many).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let (first, last) = (lo.log10().floor() as i32 - 1, hi.log10().ceil() as i32 + 1);
    for exp in first..=last {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(exp);
            if v >= lo * 0.999 && v <= hi * 1.001 {
                ticks.push(v);
            }
        }
    }
    if ticks.len() > 10 {
        ticks.retain(|v| (v.log10().fract().abs() < 1e-9) || (v.log10().fract() - 1.0).abs() < 1e-9);
    }
    ticks
}

/// Tick values for a linear axis over `[lo, hi]` with a 1/2/5 step.
pub(crate) fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| span / s <= 7.0).unwrap_or(magnitude * 10.0);
    let mut v = (lo / step).ceil() * step;
    let mut ticks = Vec::new();
    while v <= hi + step * 1e-9 {
        ticks.push(v);
        v += step;
    }
    ticks
}

pub(crate) fn format_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}").trim_end_matches(".0").to_string()
    } else {
        // Three significant digits, however small.
        let decimals = (2 - v.abs().log10().floor() as i64).clamp(0, 12) as usize;
        let s = format!("{v:.decimals$}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The axes of a plot against steps, in drawing coordinates: `ln(steps)` across, and the value
/// (or its logarithm on a log axis) up.
struct Axes {
    x_range: (f64, f64),
    steps: Vec<usize>,
    y_range: (f64, f64),
    y_ticks: Vec<f64>,
    log_y: bool,
}

impl Axes {
    /// The axes that hold every point of `series` and its error bar; an error names `path` when
    /// there is nothing to plot or a point cannot be drawn.
    fn of(series: &[Series], path: &Path) -> Result<Self> {
        let points: Vec<(usize, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
        if points.is_empty() {
            bail!("nothing to plot for {}", path.display());
        }
        if let Some(bad) = points.iter().find(|(k, v)| *k == 0 || !v.is_finite()) {
            bail!("cannot plot the point (steps {}, value {}) in {}", bad.0, bad.1, path.display());
        }
        if let Some(s) = series.iter().find(|s| !s.spread.is_empty() && s.spread.len() != s.points.len()) {
            bail!(
                "series `{}` has {} points but {} error bars ({})",
                s.label,
                s.points.len(),
                s.spread.len(),
                path.display()
            );
        }
        let mut steps: Vec<usize> =
            series.iter().filter(|s| !s.horizontal).flat_map(|s| s.points.iter().map(|p| p.0)).collect();
        if steps.is_empty() {
            bail!("nothing but reference lines to plot in {}", path.display());
        }
        steps.sort_unstable();
        steps.dedup();
        let (lo, hi) = ((steps[0] as f64).ln(), (steps[steps.len() - 1] as f64).ln());
        let (lo, hi) = if hi - lo < 1e-9 { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
        let pad = (hi - lo) * 0.06;
        let (v_min, v_max) = value_range(series);
        let log_y = v_min > 0.0 && v_max / v_min > 4.0;
        let (y_range, y_ticks) = if log_y {
            let (lo, hi) = (v_min / 1.15, v_max * 1.15);
            ((lo.ln(), hi.ln()), log_ticks(lo, hi))
        } else {
            let pad = ((v_max - v_min) * 0.1).max(v_max.abs() * 0.05).max(1e-12);
            let (lo, hi) = ((v_min - pad).max(if v_min >= 0.0 { 0.0 } else { f64::NEG_INFINITY }), v_max + pad);
            ((lo, hi), linear_ticks(lo, hi))
        };
        Ok(Self { x_range: (lo - pad, hi + pad), steps, y_range, y_ticks, log_y })
    }

    fn x(&self, steps: usize) -> f64 {
        (steps as f64).ln()
    }

    /// The drawing coordinate of `value`, clamped into the plot (an error bar reaching below 0
    /// on a log axis ends at its bottom).
    fn y(&self, value: f64) -> f64 {
        let y = if self.log_y { value.max(f64::MIN_POSITIVE).ln() } else { value };
        y.clamp(self.y_range.0, self.y_range.1)
    }
}

/// The smallest and largest value of `series`, error bars included (a lower bar below 0 is left
/// out when the values themselves are positive, so it does not rule out a log axis).
fn value_range(series: &[Series]) -> (f64, f64) {
    let (mut v_min, mut v_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for s in series {
        for (i, &(_, v)) in s.points.iter().enumerate() {
            let spread = s.spread.get(i).copied().unwrap_or(0.0).abs();
            let low = if v > 0.0 && v - spread <= 0.0 { v } else { v - spread };
            v_min = v_min.min(low);
            v_max = v_max.max(v + spread);
        }
    }
    (v_min, v_max)
}

/// A metric against steps: the [`Figure`] [`plot_against_steps`] draws.
struct StepsPlot<'a> {
    series: &'a [Series],
    title: &'a str,
    y_label: String,
    axes: Axes,
}

impl StepsPlot<'_> {
    fn legend_width(&self) -> u32 {
        let widest = self.series.iter().map(|s| text_width(&s.label, LEGEND_TEXT)).max().unwrap_or(0);
        (widest + LEGEND_LABEL_X as u32 + 24).max(160)
    }

    /// How far series `i` is moved across (in `ln(steps)`) when series have error bars.
    fn dodge(&self, i: usize) -> f64 {
        let n = self.series.iter().filter(|s| !s.horizontal).count().max(1) as f64;
        let width = self.axes.x_range.1 - self.axes.x_range.0;
        (i as f64 - (n - 1.0) / 2.0) * width * 0.008
    }

    fn draw_series<DB: DrawingBackend>(&self, chart: &mut StepsChart<'_, DB>, i: usize, s: &Series) -> Result<()> {
        let colour = PALETTE[i % PALETTE.len()];
        let axes = &self.axes;
        if s.horizontal {
            let y = axes.y(s.points[0].1);
            let ends = [(axes.x_range.0, y), (axes.x_range.1, y)];
            let dashes = DashedLineSeries::new(ends, 14, 10, colour.stroke_width(3));
            chart.draw_series(dashes).map_err(drawing_error)?;
            return Ok(());
        }
        let mut order: Vec<usize> = (0..s.points.len()).collect();
        order.sort_by_key(|&j| s.points[j].0);
        // Series with error bars are moved apart a little so their bars do not hide each other.
        let dodge = if s.spread.is_empty() { 0.0 } else { self.dodge(i) };
        let at = |j: usize| (axes.x(s.points[j].0) + dodge, axes.y(s.points[j].1));
        if !s.spread.is_empty() {
            let style = colour.stroke_width(2);
            for &j in &order {
                let (x, v, spread) = (at(j).0, s.points[j].1, s.spread[j].abs());
                let (low, high) = ((x, axes.y(v - spread)), (x, axes.y(v + spread)));
                let cap = |end| EmptyElement::at(end) + PathElement::new(vec![(-6, 0), (6, 0)], style);
                chart.draw_series([PathElement::new(vec![low, high], style)]).map_err(drawing_error)?;
                chart.draw_series([cap(low), cap(high)]).map_err(drawing_error)?;
            }
        }
        if order.len() == 1 {
            let diamond = EmptyElement::at(at(order[0]))
                + Polygon::new(vec![(0, -11), (11, 0), (0, 11), (-11, 0)], colour.filled());
            chart.draw_series(std::iter::once(diamond)).map_err(drawing_error)?;
            return Ok(());
        }
        chart
            .draw_series(LineSeries::new(order.iter().map(|&j| at(j)), colour.stroke_width(3)))
            .map_err(drawing_error)?;
        let markers =
            order.iter().map(|&j| EmptyElement::at(at(j)) + Rectangle::new([(-5, -5), (5, 5)], colour.filled()));
        chart.draw_series(markers).map_err(drawing_error)?;
        Ok(())
    }

    /// The legend: one row per series, its line (or marker) sample and its full label.
    fn draw_legend<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()> {
        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let y = 60 + i as i32 * LEGEND_ROW;
            let style = colour.stroke_width(3);
            if s.horizontal {
                for x in [4, 20, 36] {
                    area.draw(&PathElement::new(vec![(x, y), (x + 10, y)], style)).map_err(drawing_error)?;
                }
            } else if s.points.len() == 1 {
                area.draw(&Polygon::new(vec![(30, y - 9), (39, y), (30, y + 9), (21, y)], colour.filled()))
                    .map_err(drawing_error)?;
            } else {
                area.draw(&PathElement::new(vec![(8, y), (52, y)], style)).map_err(drawing_error)?;
                area.draw(&Rectangle::new([(25, y - 5), (35, y + 5)], colour.filled())).map_err(drawing_error)?;
            }
            let label = text(LEGEND_TEXT).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Left,
                plotters::style::text_anchor::VPos::Center,
            ));
            area.draw_text(&s.label, &label, (LEGEND_LABEL_X, y)).map_err(drawing_error)?;
        }
        Ok(())
    }
}

impl Figure for StepsPlot<'_> {
    fn size(&self) -> (u32, u32) {
        (PLOT_WIDTH + self.legend_width(), HEIGHT)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let width = self.size().0;
        let title_size = (22.0 * (width - 30) as f64 / text_width(self.title, 22.0).max(1) as f64).min(22.0);
        let root = root.titled(self.title, text(title_size)).map_err(drawing_error)?;
        let (plot_area, legend_area) = root.split_horizontally(PLOT_WIDTH);
        let axes = &self.axes;
        let x_keys: Vec<f64> = axes.steps.iter().map(|&k| axes.x(k)).collect();
        let y_keys: Vec<f64> = axes.y_ticks.iter().map(|&v| axes.y(v)).collect();
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(15)
            .x_label_area_size(60)
            .y_label_area_size(90)
            .build_cartesian_2d(
                Ticked { lo: axes.x_range.0, hi: axes.x_range.1, ticks: x_keys },
                Ticked { lo: axes.y_range.0, hi: axes.y_range.1, ticks: y_keys },
            )
            .map_err(drawing_error)?;
        let y_label = if axes.log_y { format!("{} (log scale)", self.y_label) } else { self.y_label.clone() };
        let log_y = axes.log_y;
        chart
            .configure_mesh()
            .bold_line_style(GRID_GREY)
            .light_line_style(TRANSPARENT)
            .x_desc("sampling steps (network evaluations)")
            .y_desc(y_label)
            .axis_desc_style(text(18.0))
            .label_style(text(16.0))
            .x_label_formatter(&|v| format!("{}", v.exp().round()))
            .y_label_formatter(&|v| format_tick(if log_y { v.exp() } else { *v }))
            .draw()
            .map_err(drawing_error)?;
        for (i, s) in self.series.iter().enumerate() {
            self.draw_series(&mut chart, i, s)?;
        }
        chart
            .plotting_area()
            .draw(&Rectangle::new(
                [(axes.x_range.0, axes.y_range.0), (axes.x_range.1, axes.y_range.1)],
                BLACK.stroke_width(1),
            ))
            .map_err(drawing_error)?;
        self.draw_legend(&legend_area)
    }
}

/// Draws `series` (value against steps) and writes a PNG to `path` and an SVG of the same
/// picture next to it (`path` with the extension `svg`), both atomically.
pub fn plot_against_steps(series: &[Series], title: &str, y_label: &str, path: &Path) -> Result<()> {
    let axes = Axes::of(series, path)?;
    let plot = StepsPlot { series, title, y_label: y_label.to_string(), axes };
    crate::figure::write_png(&plot, path)?;
    crate::figure::write_svg(&plot, &path.with_extension("svg"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::figure::count_colour;

    #[test]
    fn ticks_cover_the_range() {
        assert_eq!(log_ticks(0.3, 3.0), vec![0.5, 1.0, 2.0]);
        assert_eq!(linear_ticks(0.0, 1.0), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(format_tick(0.5), "0.5");
        assert_eq!(format_tick(20.0), "20");
        assert_eq!(format_tick(150.0), "150");
        assert_eq!(format_tick(0.00125), "0.00125");
        assert_eq!(format_tick(0.0005), "0.0005");
    }

    fn series() -> Vec<Series> {
        vec![
            Series {
                label: "ddim-noclip@trailing".into(),
                points: vec![(5, 3.0), (10, 0.8), (20, 0.4)],
                horizontal: false,
                spread: vec![0.5, 0.1, 0.05],
            },
            Series { label: "learned".into(), points: vec![(10, 0.39)], horizontal: false, spread: vec![0.05] },
            Series { label: "unipc 100 steps".into(), points: vec![(100, 0.3)], horizontal: true, spread: vec![] },
        ]
    }

    #[test]
    fn draws_series_in_their_colours_with_a_full_legend() {
        let dir = std::env::temp_dir().join(format!("ddss-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.png");
        plot_against_steps(&series(), "FID vs steps", "FID", &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.height(), HEIGHT);
        assert!(image.width() > PLOT_WIDTH + text_width("ddim-noclip@trailing", LEGEND_TEXT));
        for colour in [PALETTE[0], PALETTE[1], PALETTE[2]] {
            let count = count_colour(&image, colour);
            assert!(count > 100, "colour {colour:?} drawn on {count} pixels");
        }
        let dark = count_colour(&image, BLACK);
        assert!(dark > 1000, "axes and text: {dark} black pixels");
        let svg = std::fs::read_to_string(path.with_extension("svg")).unwrap();
        for label in ["ddim-noclip@trailing", "learned", "unipc 100 steps", "FID vs steps", "sampling steps"] {
            assert!(svg.contains(label), "the SVG lacks `{label}`");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_what_it_cannot_draw() {
        let path = std::env::temp_dir().join("ddss-plot-never-written.png");
        assert!(plot_against_steps(&[], "t", "FID", &path).is_err());
        let bad = vec![Series { label: "x".into(), points: vec![(5, f64::NAN)], horizontal: false, spread: vec![] }];
        assert!(plot_against_steps(&bad, "t", "FID", &path).is_err());
        let only_reference =
            vec![Series { label: "r".into(), points: vec![(100, 0.3)], horizontal: true, spread: vec![] }];
        assert!(plot_against_steps(&only_reference, "t", "FID", &path).is_err());
        let mut uneven = series();
        uneven[0].spread.pop();
        assert!(plot_against_steps(&uneven, "t", "FID", &path).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn a_wide_range_gets_a_log_axis_and_a_bar_below_zero_keeps_it() {
        let path = Path::new("unused.png");
        assert!(Axes::of(&series(), path).unwrap().log_y);
        let narrow =
            vec![Series { label: "a".into(), points: vec![(5, 1.0), (10, 1.5)], horizontal: false, spread: vec![] }];
        assert!(!Axes::of(&narrow, path).unwrap().log_y);
        let negative =
            vec![Series { label: "a".into(), points: vec![(5, -0.1), (10, 2.0)], horizontal: false, spread: vec![] }];
        assert!(!Axes::of(&negative, path).unwrap().log_y);
    }
}
