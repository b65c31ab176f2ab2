//! What every picture of a run shares: a [`Figure`] is drawn once with `plotters` onto any
//! backend, so the same code writes its PNG (through `image`) and its SVG. Text is set in DejaVu
//! Sans, committed in `crates/ddss-cli/assets/fonts` with its licence and embedded in the binary,
//! so drawing needs no system font.

use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// The family name the embedded font is registered under.
pub const FONT: &str = "sans-serif";

/// DejaVu Sans 2.37 (Bitstream Vera licence, `assets/fonts/DejaVuSans-LICENSE.txt`).
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The colours of the series, in order (matplotlib's `tab10`).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// The light grey of grid lines.
pub const GRID_GREY: RGBColor = RGBColor(225, 225, 225);

/// Registers the embedded font with `plotters` (once per process).
pub fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded DejaVu Sans font could not be read"))
    }
}

/// Text of `size` pixels in the embedded font.
pub fn text(size: f64) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font())
}

/// A drawing error of any backend, as an `anyhow` error.
pub fn drawing_error<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow!("drawing failed: {error}")
}

/// A picture that can be drawn onto any `plotters` backend.
pub trait Figure {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws the whole picture onto `area` (already filled white).
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// The figure as an RGB image.
pub fn render(figure: &impl Figure) -> Result<RgbImage> {
    register_font()?;
    let (width, height) = figure.size();
    let mut buffer = vec![255u8; width as usize * height as usize * 3];
    {
        let area = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        area.fill(&WHITE).map_err(drawing_error)?;
        figure.draw(&area)?;
        area.present().map_err(drawing_error)?;
    }
    RgbImage::from_raw(width, height, buffer).context("the drawing buffer has the wrong size")
}

/// The figure as SVG text.
pub fn render_svg(figure: &impl Figure) -> Result<String> {
    register_font()?;
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, figure.size()).into_drawing_area();
        area.fill(&WHITE).map_err(drawing_error)?;
        figure.draw(&area)?;
        area.present().map_err(drawing_error)?;
    }
    Ok(svg)
}

/// Writes the figure as a PNG to `path` (atomically).
pub fn write_png(figure: &impl Figure, path: &Path) -> Result<()> {
    let image = render(figure).with_context(|| format!("drawing {}", path.display()))?;
    encode_png(&image, path)
}

/// Writes the figure as an SVG to `path` (atomically).
pub fn write_svg(figure: &impl Figure, path: &Path) -> Result<()> {
    let svg = render_svg(figure).with_context(|| format!("drawing {}", path.display()))?;
    ggdm_core::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

/// Encodes `image` as a PNG at `path` (atomically).
pub fn encode_png(image: &RgbImage, path: &Path) -> Result<()> {
    let mut encoded = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    ggdm_core::io::write_atomic(path, &encoded)?;
    Ok(())
}

/// Width in pixels of `label` in the embedded font at `size` (an estimate when the font is not
/// readable, which [`register_font`] reports).
pub fn text_width(label: &str, size: f64) -> u32 {
    if register_font().is_err() {
        return (label.chars().count() as f64 * size * 0.6) as u32;
    }
    let style = text(size);
    match style.font.box_size(label) {
        Ok((w, _)) => w,
        Err(_) => (label.chars().count() as f64 * size * 0.6) as u32,
    }
}

/// Pixels of exactly `colour` in `image` (for tests).
#[cfg(test)]
pub fn count_colour(image: &RgbImage, colour: RGBColor) -> usize {
    image.pixels().filter(|p| p.0 == [colour.0, colour.1, colour.2]).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_font_is_readable_and_measures_text() {
        register_font().unwrap();
        let short = text_width("FID", 16.0);
        let long = text_width("ddim-noclip@trailing", 16.0);
        assert!(short > 10 && long > 3 * short, "widths {short} and {long}");
    }
}
