//! The loss curve of a training run as a picture, for the "Flux LoRA Loss
//! Graph" node: raw loss and its smoothed (EMA) form over the steps, drawn
//! with `plotters` into an RGB buffer.
//!
//! Owns: the layout (plot area, grid, tick marks), the scales and the colours.
//! There is no text: CI machines have no fonts, and plotters' font-less build
//! panics on any text, so nothing here may draw a caption or a label.
//!
//! Must not: encode the image (the caller makes the PNG with `image`), or
//! compute the smoothing (the trainer's numbers are drawn as given).

use std::ops::RangeInclusive;

use plotters::backend::{BitMapBackend, RGBPixel};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::{
    Cartesian2d, ChartBuilder, ChartContext, Circle, Color, IntoDrawingArea, LineSeries,
    PathElement, RGBColor, ShapeStyle,
};

/// Accepted widths and heights, in pixels.
const SIZES: RangeInclusive<u32> = 64..=4096;
/// The raw loss: a thin light line.
const RAW: RGBColor = RGBColor(150, 180, 225);
/// The smoothed loss: a thicker dark line.
const SMOOTHED: RGBColor = RGBColor(20, 50, 120);
const GRID: RGBColor = RGBColor(232, 232, 232);
/// The axes along the left and bottom of the plot and their tick marks.
const AXIS: RGBColor = RGBColor(110, 110, 110);
const BACKGROUND: RGBColor = RGBColor(255, 255, 255);
/// The grid divides the plot into this many columns and rows.
const X_DIVISIONS: u32 = 10;
const Y_DIVISIONS: u32 = 5;
/// Fraction of the plot's height left free above and below the values.
const Y_MARGIN: f64 = 0.05;

/// Why no graph was drawn.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum LossGraphError {
    #[error("the loss graph has no points to draw: train for at least one step first")]
    NoPoints,
    #[error("a loss graph of {width}x{height} pixels was asked for; width and height must each be 64 to 4096")]
    SizeOutOfRange { width: u32, height: u32 },
    #[error("every loss value is NaN or infinite: the run diverged, there is no curve to draw")]
    AllNonFinite,
    #[error("plotters could not draw the loss graph: {0}")]
    Draw(String),
}

/// Draws the loss curve, points being `(step, value)`: on white, a light grid
/// with tick marks on the left and bottom axes, `loss` as a thin light line and
/// `smoothed` (when given) as a thicker dark one. x runs from the first to the
/// last step, y over the finite values with a small margin. Non-finite values
/// are skipped; a series with one finite point is drawn as a dot.
pub(crate) fn draw(
    loss: &[(u64, f64)],
    smoothed: Option<&[(u64, f64)]>,
    width: u32,
    height: u32,
) -> Result<image::RgbImage, LossGraphError> {
    if !SIZES.contains(&width) || !SIZES.contains(&height) {
        return Err(LossGraphError::SizeOutOfRange { width, height });
    }
    if loss.is_empty() {
        return Err(LossGraphError::NoPoints);
    }
    let raw = finite(loss);
    let smoothed = smoothed.map(finite).unwrap_or_default();
    let scale = Scale::of(raw.iter().chain(&smoothed)).ok_or(LossGraphError::AllNonFinite)?;

    let mut image = image::RgbImage::new(width, height);
    render(&mut image, &raw, &smoothed, &scale)?;
    Ok(image)
}

/// Draws the graph over all of `image`, a new (black) one of an accepted size.
fn render(
    image: &mut image::RgbImage,
    raw: &[(u64, f64)],
    smoothed: &[(u64, f64)],
    scale: &Scale,
) -> Result<(), LossGraphError> {
    let (width, height) = image.dimensions();
    let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(image, (width, height))
        .map_err(drawing)?;
    let root = backend.into_drawing_area();
    root.fill(&BACKGROUND).map_err(drawing)?;

    let short_side = width.min(height);
    let pad = (short_side / 40).max(4);
    let tick = (short_side / 80).max(3);
    let mut chart = ChartBuilder::on(&root)
        .margin_top(pad)
        .margin_right(pad)
        .margin_left(pad + tick)
        .margin_bottom(pad + tick)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(drawing)?;

    // The grid inside the plot, in its own coordinates (0..1 both ways).
    let columns = (0..=X_DIVISIONS).map(|i| f64::from(i) / f64::from(X_DIVISIONS));
    let rows = (0..=Y_DIVISIONS).map(|j| f64::from(j) / f64::from(Y_DIVISIONS));
    let lines = columns
        .clone()
        .map(|x| [(x, 0.0), (x, 1.0)])
        .chain(rows.clone().map(|y| [(0.0, y), (1.0, y)]));
    chart
        .draw_series(lines.map(|line| PathElement::new(line, GRID)))
        .map_err(drawing)?;

    // The axes and the outward tick marks, in pixels: they leave the plot.
    let at = |x: f64, y: f64| chart.backend_coord(&(x, y));
    let tick = tick as i32; // at most 4096 / 80
    let mut marks = vec![vec![at(0.0, 1.0), at(0.0, 0.0), at(1.0, 0.0)]];
    marks.extend(
        columns
            .map(|x| at(x, 0.0))
            .map(|(x, y)| vec![(x, y), (x, y + tick)]),
    );
    marks.extend(
        rows.map(|y| at(0.0, y))
            .map(|(x, y)| vec![(x, y), (x - tick, y)]),
    );
    for mark in marks {
        root.draw(&PathElement::new(mark, AXIS)).map_err(drawing)?;
    }

    let thick = (short_side / 200).max(2);
    let dot = (short_side / 50).max(3);
    series(&mut chart, raw, scale, RAW.stroke_width(1), dot)?;
    series(
        &mut chart,
        smoothed,
        scale,
        SMOOTHED.stroke_width(thick),
        dot,
    )?;
    root.present().map_err(drawing)
}

/// The points whose value is finite.
fn finite(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(_, value)| value.is_finite())
        .collect()
}

fn drawing(error: impl std::fmt::Display) -> LossGraphError {
    LossGraphError::Draw(error.to_string())
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b, RGBPixel>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws one series: a line through two or more points, a dot for one.
fn series(
    chart: &mut Chart<'_, '_>,
    points: &[(u64, f64)],
    scale: &Scale,
    style: ShapeStyle,
    dot: u32,
) -> Result<(), LossGraphError> {
    match points {
        [] => Ok(()),
        [point] => chart
            .draw_series([Circle::new(scale.map(*point), dot, style.filled())])
            .map(drop)
            .map_err(drawing),
        _ => chart
            .draw_series(LineSeries::new(
                points.iter().map(|&point| scale.map(point)),
                style,
            ))
            .map(drop)
            .map_err(drawing),
    }
}

/// Maps `(step, value)` into the plot's 0..1 square.
#[derive(Debug)]
struct Scale {
    first: u64,
    last: u64,
    low: f64,
    high: f64,
}

impl Scale {
    /// The scale spanning these (finite) points; `None` when there are none.
    fn of<'a>(points: impl Iterator<Item = &'a (u64, f64)>) -> Option<Scale> {
        points.fold(None, |scale, &(step, value)| {
            Some(match scale {
                None => Scale {
                    first: step,
                    last: step,
                    low: value,
                    high: value,
                },
                Some(s) => Scale {
                    first: s.first.min(step),
                    last: s.last.max(step),
                    low: s.low.min(value),
                    high: s.high.max(value),
                },
            })
        })
    }

    fn map(&self, (step, value): (u64, f64)) -> (f64, f64) {
        let x = if self.last == self.first {
            0.5
        } else {
            step.saturating_sub(self.first) as f64 / (self.last - self.first) as f64
        };
        // Halved so that the span of two finite values cannot overflow.
        let span = self.high / 2.0 - self.low / 2.0;
        let y = if span > 0.0 {
            Y_MARGIN + (1.0 - 2.0 * Y_MARGIN) * ((value / 2.0 - self.low / 2.0) / span)
        } else {
            0.5
        };
        (x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pixels within `tolerance` (per channel) of `colour`, as (x, y).
    fn pixels(image: &image::RgbImage, colour: RGBColor, tolerance: u8) -> Vec<(u32, u32)> {
        let RGBColor(r, g, b) = colour;
        image
            .enumerate_pixels()
            .filter(|(_, _, p)| {
                p.0.iter()
                    .zip([r, g, b])
                    .all(|(&have, want)| have.abs_diff(want) <= tolerance)
            })
            .map(|(x, y, _)| (x, y))
            .collect()
    }

    /// The mean row of the pixels in the left third and in the right third.
    fn left_and_right_rows(pixels: &[(u32, u32)], width: u32) -> (f64, f64) {
        let mean = |keep: &dyn Fn(u32) -> bool| {
            let rows: Vec<f64> = pixels
                .iter()
                .filter(|(x, _)| keep(*x))
                .map(|&(_, y)| f64::from(y))
                .collect();
            assert!(
                rows.len() > 5,
                "too few curve pixels in a third: {}",
                rows.len()
            );
            rows.iter().sum::<f64>() / rows.len() as f64
        };
        (mean(&|x| x < width / 3), mean(&|x| x >= 2 * width / 3))
    }

    type Points = Vec<(u64, f64)>;

    /// A noisy loss falling (or rising) over 200 steps, and its EMA.
    fn run(falling: bool) -> (Points, Points) {
        let mut ema = None;
        (0..200u64)
            .map(|i| {
                let trend = if falling {
                    1.0 - i as f64 / 250.0
                } else {
                    0.2 + i as f64 / 250.0
                };
                let noise = ((i * 7919) % 13) as f64 / 13.0 * 0.1 - 0.05;
                let value = trend + noise;
                let smooth = ema.map_or(value, |e: f64| 0.9 * e + 0.1 * value);
                ema = Some(smooth);
                ((i + 1) * 5, value, smooth)
            })
            .map(|(step, value, smooth)| ((step, value), (step, smooth)))
            .unzip()
    }

    #[test]
    fn image_has_the_requested_size_on_white() {
        let (loss, smoothed) = run(true);
        for (width, height) in [(64, 64), (320, 200), (130, 4096)] {
            let image = draw(&loss, Some(&smoothed), width, height).unwrap();
            assert_eq!(image.dimensions(), (width, height));
            assert_eq!(image.get_pixel(0, 0).0, [255, 255, 255]);
            assert_eq!(image.get_pixel(width - 1, height - 1).0, [255, 255, 255]);
        }
    }

    #[test]
    fn falling_smoothed_loss_sits_high_on_the_left() {
        let (loss, smoothed) = run(true);
        let image = draw(&loss, Some(&smoothed), 480, 320).unwrap();
        let (left, right) = left_and_right_rows(&pixels(&image, SMOOTHED, 40), 480);
        assert!(
            left + 40.0 < right,
            "left third at row {left}, right third at row {right}"
        );
    }

    #[test]
    fn rising_raw_loss_sits_high_on_the_right() {
        let (loss, _) = run(false);
        let image = draw(&loss, None, 480, 320).unwrap();
        assert!(
            pixels(&image, SMOOTHED, 40).is_empty(),
            "no smoothed series, no dark line"
        );
        let (left, right) = left_and_right_rows(&pixels(&image, RAW, 20), 480);
        assert!(
            right + 40.0 < left,
            "left third at row {left}, right third at row {right}"
        );
    }

    #[test]
    fn grid_and_ticks_are_drawn() {
        let (loss, smoothed) = run(true);
        let image = draw(&loss, Some(&smoothed), 400, 300).unwrap();
        assert!(pixels(&image, GRID, 0).len() > 400, "grid lines");
        // Tick marks hang below the plot's bottom axis, in the margin.
        let axis = pixels(&image, AXIS, 0);
        let bottom = axis.iter().map(|&(_, y)| y).max().unwrap();
        let ticks = axis.iter().filter(|&&(_, y)| y == bottom).count();
        assert_eq!(
            ticks,
            X_DIVISIONS as usize + 1,
            "one tick per grid column edge"
        );
    }

    #[test]
    fn one_point_draws_a_dot_in_the_middle() {
        let image = draw(&[(7, 0.5)], None, 200, 200).unwrap();
        let dot = pixels(&image, RAW, 0);
        assert!(dot.len() > 10, "dot of {} pixels", dot.len());
        let (cx, cy) = dot
            .iter()
            .fold((0u32, 0u32), |(sx, sy), &(x, y)| (sx + x, sy + y));
        let (cx, cy) = (cx / dot.len() as u32, cy / dot.len() as u32);
        assert!(
            (90..=110).contains(&cx) && (90..=110).contains(&cy),
            "dot at {cx},{cy}"
        );
        // A smoothed series of one point is a dark dot.
        let image = draw(&[(7, 0.5), (8, 0.4)], Some(&[(8, 0.45)]), 64, 64).unwrap();
        assert!(!pixels(&image, SMOOTHED, 0).is_empty());
    }

    #[test]
    fn non_finite_values_are_skipped() {
        let loss = [
            (1, 1.0),
            (2, f64::NAN),
            (3, f64::INFINITY),
            (4, 0.5),
            (5, f64::NEG_INFINITY),
        ];
        let image = draw(&loss, Some(&[(1, f64::NAN), (4, 0.75), (5, 0.7)]), 128, 96).unwrap();
        assert!(!pixels(&image, RAW, 20).is_empty());
        assert!(!pixels(&image, SMOOTHED, 40).is_empty());
        // Extreme finite values and a single step neither overflow nor panic.
        let wide = [
            (u64::MAX, f64::MAX),
            (u64::MAX, -f64::MAX),
            (0, f64::MIN_POSITIVE),
        ];
        draw(&wide, Some(&wide), 64, 64).unwrap();
        draw(&[(3, 1.0), (3, 2.0)], Some(&[(3, 1.5), (3, 1.5)]), 64, 64).unwrap();
    }

    #[test]
    fn errors() {
        let loss = [(1, 1.0), (2, 0.9)];
        assert_eq!(draw(&[], None, 256, 256), Err(LossGraphError::NoPoints));
        assert_eq!(
            draw(&[], Some(&loss), 256, 256),
            Err(LossGraphError::NoPoints)
        );
        for (width, height) in [(63, 256), (256, 63), (4097, 256), (256, 4097), (0, 0)] {
            assert_eq!(
                draw(&loss, None, width, height),
                Err(LossGraphError::SizeOutOfRange { width, height })
            );
        }
        let diverged = [(1, f64::NAN), (2, f64::INFINITY), (3, f64::NEG_INFINITY)];
        assert_eq!(
            draw(&diverged, None, 256, 256),
            Err(LossGraphError::AllNonFinite)
        );
        assert_eq!(
            draw(&diverged, Some(&diverged), 256, 256),
            Err(LossGraphError::AllNonFinite)
        );
        assert!(LossGraphError::SizeOutOfRange {
            width: 1,
            height: 2
        }
        .to_string()
        .contains("64 to 4096"));
    }
}
