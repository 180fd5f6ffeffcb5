//! SVG line charts drawn with plotters' SVG backend: one line per series (solid or dashed) with a marker per
//! point, a linear or log₁₀ x axis with the ticks of [`linear_ticks`] / [`log_ticks`], a grid, tick labels, axis
//! labels, a title, and a legend to the right of the plot with one entry per label. Text is written as SVG
//! `<text>` for the viewer to lay out, so nothing here reads fonts.
//!
//! Used by [`super::report`] for `accuracy_vs_round.svg` and `accuracy_vs_bytes.svg`.
use std::ops::Range;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A colour-blind-friendly palette (Tableau 10), cycled by series colour index.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text; series sharing a label share one legend entry (e.g. the seeds of one configuration).
    pub label: String,
    /// Stroke colour (e.g. from [`PALETTE`]).
    pub color: RGBColor,
    /// Dashed instead of solid.
    pub dashed: bool,
    /// The (x, y) points, in drawing order. Non-finite points (and x ≤ 0 on a log axis) are skipped.
    pub points: Vec<(f64, f64)>,
}

/// How an axis maps values to positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Linear; `integer` keeps ticks on whole numbers (e.g. rounds).
    Linear {
        /// Ticks only at whole numbers.
        integer: bool,
    },
    /// Base-10 logarithmic (positive values only).
    Log10,
}

/// A line chart.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// X axis scale (the y axis is always linear).
    pub x_scale: Scale,
    /// X tick label format.
    pub x_format: fn(f64) -> String,
    /// Y tick label format.
    pub y_format: fn(f64) -> String,
    /// The lines.
    pub series: Vec<Series>,
}

/// Drawing a chart failed (plotters' error, in words).
#[derive(Debug, thiserror::Error)]
#[error("drawing the chart: {0}")]
pub struct DrawError(String);

const WIDTH: u32 = 980;
const MIN_HEIGHT: u32 = 520;
/// Where the legend starts: the title, plot and axis labels are to its left.
const LEGEND_X: u32 = 720;
/// The legend's first row (its middle, from the top) and the distance between rows.
const LEGEND_TOP: i32 = 54;
const LEGEND_ROW: i32 = 20;
/// Series lines, in pixels; legend samples are a pixel wider.
pub(crate) const LINE_WIDTH: u32 = 2;
const MARKER_RADIUS: u32 = 3;
/// Dashes of dashed lines: drawn and skipped pixels.
const DASH: (u32, u32) = (7, 4);
const FONT: &str = "sans-serif";
/// plotters writes font sizes divided by 1.24 into the SVG: these give about 15, 13 and 12 px.
const TITLE_SIZE: f64 = 18.6;
const AXIS_LABEL_SIZE: f64 = 16.1;
const TEXT_SIZE: f64 = 14.9;
const GRID: RGBColor = RGBColor(0xe3, 0xe3, 0xe3);
const AXIS: RGBColor = RGBColor(0x55, 0x55, 0x55);
const TEXT: RGBColor = RGBColor(0x33, 0x33, 0x33);

/// A "nice" step (1, 2 or 5 × 10ᵏ) giving at most `max_ticks` ticks over `span`.
fn nice_step(span: f64, max_ticks: usize) -> f64 {
    let raw = span / max_ticks.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

/// Ticks at multiples of a nice step covering `[lo, hi]` (the first at or below `lo`, the last at or above
/// `hi`), at most about `max_ticks + 2` of them. `integer` keeps the step at 1 or more. A degenerate range is
/// widened to one unit around its value.
pub fn linear_ticks(lo: f64, hi: f64, max_ticks: usize, integer: bool) -> Vec<f64> {
    let (mut lo, mut hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    if !(lo.is_finite() && hi.is_finite()) {
        return vec![0.0, 1.0];
    }
    if hi - lo < 1e-12 {
        lo -= 0.5;
        hi += 0.5;
    }
    let mut step = nice_step(hi - lo, max_ticks);
    if integer {
        step = step.max(1.0).round();
    }
    let first = (lo / step).floor() as i64;
    let last = (hi / step).ceil() as i64;
    // Round to the step's decimals so labels read 0.1, not 0.30000000000000004.
    let decimals = (-step.log10().floor()).max(0.0) as i32 + 1;
    let scale = 10f64.powi(decimals);
    (first..=last).map(|i| (i as f64 * step * scale).round() / scale).collect()
}

/// Ticks for a log₁₀ axis covering `[lo, hi]` (both > 0): the powers of ten from the one at or below `lo` to
/// the one at or above `hi`, plus 2× and 5× of each when that spans at most two decades.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi > 0.0 && lo.is_finite() && hi.is_finite()) {
        return vec![1.0, 10.0];
    }
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    let mut a = lo.log10().floor() as i32;
    let mut b = hi.log10().ceil() as i32;
    if a == b {
        a -= 1;
        b += 1;
    }
    let mut ticks = Vec::new();
    for k in a..=b {
        let p = 10f64.powi(k);
        ticks.push(p);
        if b - a <= 2 && k < b {
            ticks.extend([2.0 * p, 5.0 * p]);
        }
    }
    ticks
}

/// Bytes with decimal SI prefixes for axis ticks: `1 kB`, `20 MB`, `1.5 GB`.
pub fn fmt_si_bytes(x: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = x;
    let mut u = 0;
    while v.abs() >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    let s = format!("{v:.1}");
    let s = s.strip_suffix(".0").unwrap_or(&s);
    format!("{s} {}", units[u])
}

/// A plain number without needless decimals: `3`, `0.25`.
pub fn fmt_plain(x: f64) -> String {
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".to_string() } else { s.to_string() }
}

/// The middle of the legend's row `row` (from 0), from the top.
fn legend_y(row: usize) -> i32 {
    i32::try_from(row).unwrap_or(i32::MAX).saturating_mul(LEGEND_ROW).saturating_add(LEGEND_TOP)
}

fn min_max(it: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    it.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((a, b)) => Some((a.min(v), b.max(v))),
    })
}

/// A chart axis for plotters: linear or log₁₀ from the first tick to the last, with exactly those ticks as
/// its grid lines and labels (plotters' own tick choice is not used).
struct Axis {
    ticks: Vec<f64>,
    log: bool,
}

impl Axis {
    /// Where `v` falls between the first and the last tick, as a fraction (0.5 for a degenerate axis).
    fn fraction(&self, v: f64) -> f64 {
        let f = |x: f64| if self.log { x.log10() } else { x };
        let (lo, hi) = match (self.ticks.first(), self.ticks.last()) {
            (Some(&lo), Some(&hi)) => (f(lo), f(hi)),
            _ => return 0.5,
        };
        let t = (f(v) - lo) / (hi - lo);
        if t.is_finite() { t } else { 0.5 }
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        limit.0 + (self.fraction(*v) * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() { Vec::new() } else { self.ticks.clone() }
    }

    fn range(&self) -> Range<f64> {
        match (self.ticks.first(), self.ticks.last()) {
            (Some(&lo), Some(&hi)) => lo..hi,
            _ => 0.0..1.0,
        }
    }
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

impl Chart {
    fn visible(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (self.x_scale != Scale::Log10 || x > 0.0)
    }

    /// The legend's entries: the first series of each label, in order.
    pub fn legend(&self) -> Vec<&Series> {
        let mut legend: Vec<&Series> = Vec::new();
        for s in &self.series {
            if !legend.iter().any(|l| l.label == s.label) {
                legend.push(s);
            }
        }
        legend
    }

    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> Result<String, DrawError> {
        let pts: Vec<(f64, f64)> =
            self.series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| self.visible(*p)).collect();
        let (xmin, xmax) = min_max(pts.iter().map(|p| p.0)).unwrap_or((1.0, 10.0));
        let (ymin, ymax) = min_max(pts.iter().map(|p| p.1)).unwrap_or((0.0, 1.0));
        let x = match self.x_scale {
            Scale::Linear { integer } => Axis { ticks: linear_ticks(xmin, xmax, 8, integer), log: false },
            Scale::Log10 => Axis { ticks: log_ticks(xmin, xmax), log: true },
        };
        let y = Axis { ticks: linear_ticks(ymin, ymax, 8, false), log: false };
        // Tall enough for the legend.
        let below_legend = legend_y(self.legend().len()).saturating_add(LEGEND_ROW);
        let height = MIN_HEIGHT.max(u32::try_from(below_legend).unwrap_or(u32::MAX));
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
            let drawn = self.draw(&root, x, y);
            drawn.and_then(|()| root.present()).map_err(|e| DrawError(e.to_string()))?;
        }
        Ok(svg)
    }

    /// Draws the chart on `root`: title, grid, axes and tick labels over `x` × `y`, the lines, the legend.
    fn draw(&self, root: &DrawingArea<SVGBackend<'_>, Shift>, x: Axis, y: Axis) -> DrawResult {
        root.fill(&WHITE)?;
        let (plot_area, legend_area) = root.split_horizontally(LEGEND_X);
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(&self.title, (FONT, TITLE_SIZE).into_font().style(FontStyle::Bold))
            .margin(10)
            .x_label_area_size(50)
            .y_label_area_size(64)
            .build_cartesian_2d(x, y)?;
        let x_format = |v: &f64| (self.x_format)(*v);
        let y_format = |v: &f64| (self.y_format)(*v);
        chart
            .configure_mesh()
            .bold_line_style(GRID.stroke_width(1))
            .axis_style(AXIS.stroke_width(1))
            .label_style((FONT, TEXT_SIZE).into_font().color(&TEXT))
            .axis_desc_style((FONT, AXIS_LABEL_SIZE))
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .x_label_formatter(&x_format)
            .y_label_formatter(&y_format)
            .draw()?;
        for s in &self.series {
            let points: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| self.visible(*p)).collect();
            if points.is_empty() {
                continue;
            }
            let style = s.color.stroke_width(LINE_WIDTH);
            if s.dashed {
                chart.draw_series([DashedPathElement::new(points.clone(), DASH.0, DASH.1, style)])?;
            } else {
                chart.draw_series([PathElement::new(points.clone(), style)])?;
            }
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, MARKER_RADIUS, s.color.filled())))?;
        }
        let label_style = (FONT, TEXT_SIZE).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
        for (i, s) in self.legend().into_iter().enumerate() {
            let y = legend_y(i);
            let sample = [(8, y), (38, y)];
            let style = s.color.stroke_width(LINE_WIDTH + 1);
            if s.dashed {
                legend_area.draw(&DashedPathElement::new(sample, DASH.0, DASH.1, style))?;
            } else {
                legend_area.draw(&PathElement::new(sample, style))?;
            }
            legend_area.draw(&Text::new(s.label.as_str(), (46, y), label_style.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{attr, elements, polylines, texts};
    use super::*;

    fn chart(scale: Scale, series: Vec<Series>) -> Chart {
        Chart {
            title: "A & B <test>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_scale: scale,
            x_format: fmt_si_bytes,
            y_format: fmt_plain,
            series,
        }
    }

    fn series(label: &str, color: RGBColor, dashed: bool, points: &[(f64, f64)]) -> Series {
        Series { label: label.into(), color, dashed, points: points.to_vec() }
    }

    #[test]
    fn linear_ticks_are_nice_and_cover_the_range() {
        assert_eq!(linear_ticks(72.3, 84.1, 8, false), [72.0, 74.0, 76.0, 78.0, 80.0, 82.0, 84.0, 86.0]);
        assert_eq!(linear_ticks(0.0, 1.0, 5, false), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(linear_ticks(1.0, 3.0, 8, true), [1.0, 2.0, 3.0]);
        assert_eq!(linear_ticks(0.1, 0.3, 8, false), [0.1, 0.15, 0.2, 0.25, 0.3]);
        // A single value is widened.
        assert_eq!(linear_ticks(1.0, 1.0, 8, true), [0.0, 1.0, 2.0]);
    }

    #[test]
    fn log_ticks_are_decades_plus_two_and_five_for_short_ranges() {
        assert_eq!(log_ticks(1500.0, 2e6), [1e3, 1e4, 1e5, 1e6, 1e7]);
        assert_eq!(log_ticks(1e3, 1e6), [1e3, 1e4, 1e5, 1e6]);
        assert_eq!(log_ticks(1e3, 1e5), [1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5]);
        assert_eq!(log_ticks(2e4, 3e5), [1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6]);
        // One value: a decade on each side.
        assert_eq!(log_ticks(1e4, 1e4), [1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5]);
        assert_eq!(log_ticks(0.0, 10.0), [1.0, 10.0]);
    }

    #[test]
    fn byte_and_plain_formats() {
        assert_eq!(fmt_si_bytes(1e3), "1 kB");
        assert_eq!(fmt_si_bytes(2e7), "20 MB");
        assert_eq!(fmt_si_bytes(1.5e9), "1.5 GB");
        assert_eq!(fmt_si_bytes(500.0), "500 B");
        assert_eq!(fmt_plain(3.0), "3");
        assert_eq!(fmt_plain(0.25), "0.25");
        assert_eq!(fmt_plain(-0.0), "0");
    }

    #[test]
    fn svg_is_well_formed_with_one_line_per_series_and_one_legend_entry_per_label() {
        let [solid, dashed, empty] = [PALETTE[0], PALETTE[1], PALETTE[2]];
        let c = chart(
            Scale::Log10,
            vec![
                series("fedsb r16 iid", solid, false, &[(1e4, 0.7), (2e4, 0.8)]),
                series("fedsb r16 iid", solid, false, &[(1e4, 0.72), (2e4, 0.79)]),
                series("fedit r16 dirichlet", dashed, true, &[(1e6, 0.6), (2e6, f64::NAN), (3e6, 0.75)]),
                series("empty", empty, false, &[(0.0, 0.5)]),
            ],
        );
        let svg = c.to_svg().unwrap();
        assert!(svg.starts_with("<svg ") && svg.contains("xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        // A solid series is one polyline with a marker per point; a dashed one is drawn in short dashes.
        assert_eq!(polylines(&svg, solid, LINE_WIDTH).len(), 2);
        let dashes = polylines(&svg, dashed, LINE_WIDTH);
        assert!(dashes.len() >= 2, "{svg}");
        // The x = 0 point (log axis) and the NaN are dropped: no line for "empty"; 2 + 2 + 2 + 0 markers.
        assert!(polylines(&svg, empty, LINE_WIDTH).is_empty());
        assert_eq!(elements(&svg, "circle").len(), 6);
        for e in elements(&svg, "circle") {
            assert_eq!(attr(e, "r"), Some("3"), "{e}");
        }
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Legend: one entry per distinct label, its sample solid or dashed like its lines.
        let texts = texts(&svg);
        for label in ["fedsb r16 iid", "fedit r16 dirichlet", "empty"] {
            assert_eq!(texts.iter().filter(|t| **t == label).count(), 1, "{label}: {texts:?}");
        }
        assert_eq!(polylines(&svg, solid, LINE_WIDTH + 1).len(), 1);
        assert!(polylines(&svg, dashed, LINE_WIDTH + 1).len() >= 2);
        assert_eq!(polylines(&svg, empty, LINE_WIDTH + 1).len(), 1);
        // The title (escaped) and the axis labels.
        assert!(svg.contains("A &amp; B &lt;test&gt;"));
        assert!(texts.contains(&"x") && texts.contains(&"y"), "{texts:?}");
        // Log ticks: 10 kB … 10 MB decades.
        for t in ["10 kB", "100 kB", "1 MB", "10 MB"] {
            assert!(texts.contains(&t), "{t}: {texts:?}");
        }
        // Every opened element is closed (a crude well-formedness check: tags balance).
        for tag in ["svg", "text"] {
            assert_eq!(elements(&svg, tag).len(), svg.matches(&format!("</{tag}>")).count(), "{tag}");
        }
        for tag in ["polyline", "circle", "line", "rect"] {
            assert!(elements(&svg, tag).iter().all(|e| e.ends_with('/')), "{tag}");
        }
    }

    #[test]
    fn empty_chart_still_renders() {
        let svg = chart(Scale::Linear { integer: true }, vec![]).to_svg().unwrap();
        assert!(svg.contains("</svg>"));
        assert!(!svg.contains("NaN"));
    }
}
