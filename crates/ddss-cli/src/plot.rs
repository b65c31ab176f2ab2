//! Line plots of a metric against the number of sampling steps (the "FID vs steps" picture of a
//! search run and of `ddss-cli table`), drawn into a PNG with no system fonts: text uses the
//! public-domain 8x8 bitmap font of the `font8x8` crate, scaled up.
//!
//! The x axis (steps) is logarithmic with a tick at every step count that occurs; the y axis is
//! logarithmic when the values span more than a factor of 4 and linear otherwise. A series with a
//! single point (a learned sampler at its own K) is drawn as a marker.

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

/// One line of the plot: a label and `(steps, value)` points.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(usize, f64)>,
    /// A reference level (e.g. the model's many-step quality): drawn as a dashed line across the
    /// whole plot at its first point's value, which does not add a step to the x axis.
    pub horizontal: bool,
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;
const LEFT: i64 = 110;
const RIGHT: i64 = 300;
const TOP: i64 = 70;
const BOTTOM: i64 = 80;
const TEXT_SCALE: i64 = 2;
const GLYPH: i64 = 8 * TEXT_SCALE;

const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GREY: Rgb<u8> = Rgb([225, 225, 225]);

struct Canvas {
    image: RgbImage,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, colour: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.image.width() && (y as u32) < self.image.height() {
            self.image.put_pixel(x as u32, y as u32, colour);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, colour: Rgb<u8>) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.put(x, y, colour);
            }
        }
    }

    /// A line `width` pixels thick (Bresenham with a square brush).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), width: i64, colour: Rgb<u8>) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let half = width / 2;
        loop {
            self.rect(x - half, y - half, x - half + width - 1, y - half + width - 1, colour);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at `(x, y)`; `vertical` draws it bottom-to-top.
    fn text(&mut self, x: i64, y: i64, text: &str, colour: Rgb<u8>, vertical: bool) {
        for (i, ch) in text.chars().enumerate() {
            let code = if ch.is_ascii() { ch as usize } else { b'?' as usize };
            let glyph = font8x8::legacy::BASIC_LEGACY[code];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) == 0 {
                        continue;
                    }
                    let (gx, gy) = (i as i64 * GLYPH + col * TEXT_SCALE, row as i64 * TEXT_SCALE);
                    let (px, py) = if vertical { (x + gy, y - gx - TEXT_SCALE) } else { (x + gx, y + gy) };
                    self.rect(px, py, px + TEXT_SCALE - 1, py + TEXT_SCALE - 1, colour);
                }
            }
        }
    }
}

fn text_width(text: &str) -> i64 {
    text.chars().count() as i64 * GLYPH
}

/// Splits `text` at spaces into lines of at most `max_chars` characters (longer words are cut).
fn wrap(text: &str, max_chars: i64) -> Vec<String> {
    let max = max_chars.max(1) as usize;
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > max {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines.into_iter().map(|l| l.chars().take(max).collect()).take(2).collect()
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
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
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

fn format_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}").trim_end_matches(".0").to_string()
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draws `series` (value against steps) and writes a PNG to `path` (atomically).
pub fn plot_against_steps(series: &[Series], title: &str, y_label: &str, path: &Path) -> Result<()> {
    let points: Vec<(usize, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    if points.is_empty() {
        bail!("nothing to plot for {}", path.display());
    }
    if let Some(bad) = points.iter().find(|(k, v)| *k == 0 || !v.is_finite()) {
        bail!("cannot plot the point (steps {}, value {}) in {}", bad.0, bad.1, path.display());
    }
    let mut steps: Vec<usize> =
        series.iter().filter(|s| !s.horizontal).flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    if steps.is_empty() {
        bail!("nothing but reference lines to plot in {}", path.display());
    }
    steps.sort_unstable();
    steps.dedup();
    let (x_lo, x_hi) = ((steps[0] as f64).ln(), (steps[steps.len() - 1] as f64).ln());
    let (x_lo, x_hi) = if x_hi - x_lo < 1e-9 { (x_lo - 0.5, x_hi + 0.5) } else { (x_lo, x_hi) };
    let v_min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let v_max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let log_y = v_min > 0.0 && v_max / v_min > 4.0;
    let (y_lo, y_hi, ticks) = if log_y {
        let (lo, hi) = (v_min / 1.15, v_max * 1.15);
        let ticks = log_ticks(lo, hi);
        (lo.ln(), hi.ln(), ticks)
    } else {
        let pad = ((v_max - v_min) * 0.1).max(v_max.abs() * 0.05).max(1e-12);
        let (lo, hi) = ((v_min - pad).max(if v_min >= 0.0 { 0.0 } else { f64::NEG_INFINITY }), v_max + pad);
        (lo, hi, linear_ticks(lo, hi))
    };
    let y_of = |v: f64| if log_y { v.ln() } else { v };

    let mut canvas = Canvas { image: RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255])) };
    let (plot_x0, plot_x1) = (LEFT, WIDTH as i64 - RIGHT);
    let (plot_y0, plot_y1) = (TOP, HEIGHT as i64 - BOTTOM);
    let margin = 30.0;
    let px = |steps: usize| -> i64 {
        let f = ((steps as f64).ln() - x_lo) / (x_hi - x_lo);
        plot_x0 + margin as i64 + (f * ((plot_x1 - plot_x0) as f64 - 2.0 * margin)).round() as i64
    };
    let py = |v: f64| -> i64 {
        let f = (y_of(v) - y_lo) / (y_hi - y_lo);
        plot_y1 - (f * (plot_y1 - plot_y0) as f64).round() as i64
    };

    for &t in &ticks {
        let y = py(t);
        canvas.line((plot_x0, y), (plot_x1, y), 1, GREY);
        let label = format_tick(t);
        canvas.text(plot_x0 - 8 - text_width(&label), y - GLYPH / 2, &label, BLACK, false);
    }
    for &k in &steps {
        let x = px(k);
        canvas.line((x, plot_y0), (x, plot_y1), 1, GREY);
        let label = k.to_string();
        canvas.text(x - text_width(&label) / 2, plot_y1 + 10, &label, BLACK, false);
    }
    canvas.line((plot_x0, plot_y0), (plot_x0, plot_y1), 2, BLACK);
    canvas.line((plot_x0, plot_y1), (plot_x1, plot_y1), 2, BLACK);
    canvas.line((plot_x1, plot_y0), (plot_x1, plot_y1), 1, BLACK);
    canvas.line((plot_x0, plot_y0), (plot_x1, plot_y0), 1, BLACK);

    for (i, line) in wrap(title, (WIDTH as i64 - 20) / GLYPH).iter().enumerate() {
        canvas.text((WIDTH as i64 - text_width(line)) / 2, 10 + i as i64 * (GLYPH + 4), line, BLACK, false);
    }
    let x_label = "sampling steps (network evaluations)";
    canvas.text((plot_x0 + plot_x1 - text_width(x_label)) / 2, plot_y1 + 40, x_label, BLACK, false);
    let y_label = if log_y { format!("{y_label} (log scale)") } else { y_label.to_string() };
    canvas.text(20, (plot_y0 + plot_y1 + text_width(&y_label)) / 2, &y_label, BLACK, true);

    for (i, s) in series.iter().enumerate() {
        let colour = Rgb(PALETTE[i % PALETTE.len()]);
        if s.horizontal {
            let y = py(s.points[0].1);
            for x in (plot_x0..plot_x1).step_by(24) {
                canvas.line((x, y), ((x + 14).min(plot_x1), y), 3, colour);
            }
            legend(&mut canvas, i, &s.label, colour, (plot_x1, plot_y0));
            continue;
        }
        let mut pts = s.points.clone();
        pts.sort_by_key(|p| p.0);
        for pair in pts.windows(2) {
            canvas.line((px(pair[0].0), py(pair[0].1)), (px(pair[1].0), py(pair[1].1)), 3, colour);
        }
        for &(k, v) in &pts {
            let (x, y) = (px(k), py(v));
            if pts.len() == 1 {
                // A lone point: a larger diamond so it stands out.
                for d in 0..=8i64 {
                    canvas.rect(x - (8 - d), y - d, x + (8 - d), y - d, colour);
                    canvas.rect(x - (8 - d), y + d, x + (8 - d), y + d, colour);
                }
            } else {
                canvas.rect(x - 5, y - 5, x + 5, y + 5, colour);
            }
        }
        legend(&mut canvas, i, &s.label, colour, (plot_x1, plot_y0));
    }

    let mut encoded = Vec::new();
    canvas
        .image
        .write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    ggdm_core::io::write_atomic(path, &encoded)?;
    Ok(())
}

/// The legend entry of series `i`, right of the plot whose top-right corner is `corner`.
fn legend(canvas: &mut Canvas, i: usize, label: &str, colour: Rgb<u8>, corner: (i64, i64)) {
    let legend_y = corner.1 + 10 + i as i64 * (GLYPH + 12);
    let legend_x = corner.0 + 20;
    canvas.rect(legend_x, legend_y + 2, legend_x + 24, legend_y + GLYPH - 3, colour);
    let label: String = label.chars().take(((RIGHT - 52) / GLYPH) as usize).collect();
    canvas.text(legend_x + 32, legend_y, &label, BLACK, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_cover_the_range() {
        assert_eq!(log_ticks(0.3, 3.0), vec![0.5, 1.0, 2.0]);
        assert_eq!(linear_ticks(0.0, 1.0), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(format_tick(0.5), "0.5");
        assert_eq!(format_tick(20.0), "20");
        assert_eq!(format_tick(150.0), "150");
        assert_eq!(wrap("a bb ccc", 4), vec!["a bb", "ccc"]);
    }

    #[test]
    fn draws_series_in_their_colours() {
        let dir = std::env::temp_dir().join(format!("ddss-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.png");
        let series = vec![
            Series { label: "ddim".into(), points: vec![(5, 3.0), (10, 0.8), (20, 0.4)], horizontal: false },
            Series { label: "learned".into(), points: vec![(10, 0.39)], horizontal: false },
            Series { label: "unipc 100 steps".into(), points: vec![(100, 0.3)], horizontal: true },
        ];
        plot_against_steps(&series, "FID vs steps", "FID", &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (WIDTH, HEIGHT));
        for colour in [PALETTE[0], PALETTE[1], PALETTE[2]] {
            let count = image.pixels().filter(|p| p.0 == colour).count();
            assert!(count > 100, "colour {colour:?} drawn on {count} pixels");
        }
        let dark = image.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(dark > 1000, "axes and text: {dark} black pixels");
        assert!(plot_against_steps(&[], "t", "FID", &path).is_err());
        let bad = vec![Series { label: "x".into(), points: vec![(5, f64::NAN)], horizontal: false }];
        assert!(plot_against_steps(&bad, "t", "FID", &path).is_err());
        let only_reference = vec![Series { label: "r".into(), points: vec![(100, 0.3)], horizontal: true }];
        assert!(plot_against_steps(&only_reference, "t", "FID", &path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
