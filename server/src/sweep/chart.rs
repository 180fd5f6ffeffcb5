//! Small SVG line charts (no plotting crate): one polyline per series with point markers, linear or log₁₀
//! x axis, nice ticks, grid, axis labels and a legend to the right of the plot.
//!
//! Used by [`super::report`] for `accuracy_vs_round.svg` and `accuracy_vs_bytes.svg`.
use std::fmt::Write as _;

/// A colour-blind-friendly palette (Tableau 10), cycled by series colour index.
pub const PALETTE: [&str; 10] =
    ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text; series sharing a label share one legend entry (e.g. the seeds of one configuration).
    pub label: String,
    /// Stroke colour (CSS colour, e.g. from [`PALETTE`]).
    pub color: String,
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

const WIDTH: f64 = 980.0;
const MIN_HEIGHT: f64 = 520.0;
const LEFT: f64 = 72.0;
const TOP: f64 = 44.0;
const PLOT_W: f64 = 620.0;
const PLOT_H: f64 = 400.0;
const LEGEND_X: f64 = LEFT + PLOT_W + 28.0;
const LEGEND_ROW: f64 = 20.0;

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

/// Escapes text for SVG content and attribute values.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

impl Chart {
    fn visible(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (self.x_scale != Scale::Log10 || x > 0.0)
    }

    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let pts: Vec<(f64, f64)> =
            self.series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| self.visible(*p)).collect();
        let (xmin, xmax) = min_max(pts.iter().map(|p| p.0)).unwrap_or((1.0, 10.0));
        let (ymin, ymax) = min_max(pts.iter().map(|p| p.1)).unwrap_or((0.0, 1.0));
        let x_ticks = match self.x_scale {
            Scale::Linear { integer } => linear_ticks(xmin, xmax, 8, integer),
            Scale::Log10 => log_ticks(xmin, xmax),
        };
        let y_ticks = linear_ticks(ymin, ymax, 8, false);
        let (x0, x1) = (x_ticks[0], x_ticks[x_ticks.len() - 1]);
        let (y0, y1) = (y_ticks[0], y_ticks[y_ticks.len() - 1]);
        let fx = |x: f64| -> f64 {
            let t = match self.x_scale {
                Scale::Log10 => (x.log10() - x0.log10()) / (x1.log10() - x0.log10()),
                Scale::Linear { .. } => (x - x0) / (x1 - x0),
            };
            LEFT + t * PLOT_W
        };
        let fy = |y: f64| -> f64 { TOP + PLOT_H - (y - y0) / (y1 - y0) * PLOT_H };

        let mut legend: Vec<&Series> = Vec::new();
        for s in &self.series {
            if !legend.iter().any(|l| l.label == s.label) {
                legend.push(s);
            }
        }
        let height = MIN_HEIGHT.max(TOP + 30.0 + legend.len() as f64 * LEGEND_ROW);

        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            LEFT + PLOT_W / 2.0,
            escape(&self.title)
        );
        // Grid and ticks.
        o.push_str("<g class=\"grid\" stroke=\"#e3e3e3\" stroke-width=\"1\">\n");
        for &t in &x_ticks {
            let _ = writeln!(o, r#"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}"/>"#, fx(t), TOP + PLOT_H);
        }
        for &t in &y_ticks {
            let _ = writeln!(o, r#"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}"/>"#, fy(t), LEFT + PLOT_W);
        }
        o.push_str("</g>\n");
        let _ = writeln!(
            o,
            r##"<rect class="frame" x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#555"/>"##
        );
        o.push_str("<g class=\"ticks\" fill=\"#333\">\n");
        for &t in &x_ticks {
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                fx(t),
                TOP + PLOT_H + 18.0,
                escape(&(self.x_format)(t))
            );
        }
        for &t in &y_ticks {
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 8.0,
                fy(t) + 4.0,
                escape(&(self.y_format)(t))
            );
        }
        o.push_str("</g>\n");
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            LEFT + PLOT_W / 2.0,
            TOP + PLOT_H + 42.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            o,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle" font-size="13">{}</text>"#,
            TOP + PLOT_H / 2.0,
            escape(&self.y_label)
        );
        // Lines and markers.
        for s in &self.series {
            let pts: Vec<String> = s
                .points
                .iter()
                .filter(|p| self.visible(**p))
                .map(|&(x, y)| format!("{:.1},{:.1}", fx(x), fy(y)))
                .collect();
            let dash = if s.dashed { r#" stroke-dasharray="7 4""# } else { "" };
            let _ = writeln!(
                o,
                r#"<polyline class="series" points="{}" fill="none" stroke="{}" stroke-width="2"{dash}><title>{}</title></polyline>"#,
                pts.join(" "),
                escape(&s.color),
                escape(&s.label)
            );
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(o, r#"<circle cx="{x}" cy="{y}" r="3" fill="{}"/>"#, escape(&s.color));
            }
        }
        // Legend.
        o.push_str("<g class=\"legend\">\n");
        for (i, s) in legend.iter().enumerate() {
            let y = TOP + 10.0 + i as f64 * LEGEND_ROW;
            let dash = if s.dashed { r#" stroke-dasharray="7 4""# } else { "" };
            let _ = writeln!(
                o,
                r#"<line x1="{LEGEND_X}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2.5"{dash}/>"#,
                LEGEND_X + 30.0,
                escape(&s.color)
            );
            let _ = writeln!(o, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, LEGEND_X + 38.0, y + 4.0, escape(&s.label));
        }
        o.push_str("</g>\n</svg>\n");
        o
    }
}

fn min_max(it: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    it.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((a, b)) => Some((a.min(v), b.max(v))),
    })
}

#[cfg(test)]
mod tests {
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

    fn series(label: &str, dashed: bool, points: &[(f64, f64)]) -> Series {
        Series { label: label.into(), color: PALETTE[0].into(), dashed, points: points.to_vec() }
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
    fn svg_is_well_formed_with_one_polyline_per_series_and_one_legend_entry_per_label() {
        let c = chart(
            Scale::Log10,
            vec![
                series("fedsb r16 iid", false, &[(1e4, 0.7), (2e4, 0.8)]),
                series("fedsb r16 iid", false, &[(1e4, 0.72), (2e4, 0.79)]),
                series("fedit r16 dirichlet", true, &[(1e6, 0.6), (2e6, f64::NAN), (3e6, 0.75)]),
                series("empty", false, &[(0.0, 0.5)]),
            ],
        );
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("</polyline>").count(), 4);
        // Legend: one entry per distinct label.
        let legend = svg.split("<g class=\"legend\">").nth(1).unwrap();
        assert_eq!(legend.matches("<line").count(), 3);
        assert!(legend.contains("stroke-dasharray"));
        // The title is escaped; the NaN and the x = 0 point (log axis) are dropped: 2 + 2 + 2 + 0 markers.
        assert!(svg.contains("A &amp; B &lt;test&gt;"));
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Log ticks: 10 kB … 10 MB decades.
        for t in ["10 kB", "100 kB", "1 MB", "10 MB"] {
            assert!(svg.contains(&format!(">{t}</text>")), "{t}");
        }
        // Every opened element is closed (a crude well-formedness check: tags balance).
        for tag in ["svg", "g", "text", "polyline"] {
            let open = svg.matches(&format!("<{tag} ")).count() + svg.matches(&format!("<{tag}>")).count();
            assert_eq!(open, svg.matches(&format!("</{tag}>")).count(), "{tag}");
        }
    }

    #[test]
    fn empty_chart_still_renders() {
        let svg = chart(Scale::Linear { integer: true }, vec![]).to_svg();
        assert!(svg.contains("</svg>"));
        assert!(!svg.contains("NaN"));
    }
}
