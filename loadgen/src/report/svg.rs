//! Line charts as inline SVG for the HTML page: a fixed 860×300 canvas, a plot area with a grid,
//! "nice" y ticks from zero, a linear or percentile x axis, an optional shaded x band (the
//! measured phase) and a legend on the right. No scripts; every text is escaped.

use std::fmt::Write as _;

use super::html::esc;

/// Canvas width.
const W: f64 = 860.0;
/// Canvas height.
const H: f64 = 300.0;
/// Margin left of the plot area (y tick labels).
const LEFT: f64 = 64.0;
/// Margin right of the plot area (the legend).
const RIGHT: f64 = 170.0;
/// Margin above the plot area.
const TOP: f64 = 16.0;
/// Margin below the plot area (x tick labels and the x label).
const BOTTOM: f64 = 42.0;
/// Plot area width.
const PW: f64 = W - LEFT - RIGHT;
/// Plot area height.
const PH: f64 = H - TOP - BOTTOM;

/// One line of a chart.
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// CSS colour.
    pub color: &'a str,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// How the x axis is labelled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    /// Plain numbers.
    Linear,
    /// x = -log10(1 - q), labelled as percentiles (50%, 90%, 99%, ...).
    Percentile,
}

/// A chart as an inline SVG element. `band` shades an x range (the measured phase).
pub fn line_chart(
    y_label: &str,
    x_label: &str,
    series: &[Series<'_>],
    x_axis: XAxis,
    band: Option<(f64, f64)>,
) -> String {
    let mut o = String::new();
    let _ = write!(o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-size=\"11\" font-family=\"sans-serif\">");
    let Some(scale) = Scale::fit(series, x_axis, band) else {
        let _ = writeln!(o, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text></svg>", W / 2.0, H / 2.0);
        return o;
    };
    if let Some(band) = band {
        shade(&mut o, &scale, band);
    }
    y_grid(&mut o, &scale);
    x_grid(&mut o, &scale, x_axis);
    frame_and_labels(&mut o, x_label, y_label);
    for (i, s) in series.iter().enumerate() {
        draw_series(&mut o, &scale, i, s);
    }
    o.push_str("</svg>\n");
    o
}

/// The data ranges shown and how they map onto the plot area.
struct Scale {
    /// Left end of the x axis.
    x0: f64,
    /// Right end of the x axis.
    x1: f64,
    /// Top of the y axis (the bottom is 0).
    y1: f64,
}

impl Scale {
    /// Ranges that hold every point (and the band on a linear axis); `None` without points.
    fn fit(series: &[Series<'_>], x_axis: XAxis, band: Option<(f64, f64)>) -> Option<Self> {
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
        for &(x, y) in series.iter().flat_map(|s| s.points.iter()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            return None;
        }
        match x_axis {
            XAxis::Percentile => {
                x0 = 0.0;
                x1 = x1.max(3.0).ceil();
            }
            XAxis::Linear => {
                x0 = x0.min(0.0);
                if let Some((_, b)) = band {
                    x1 = x1.max(b);
                }
            }
        }
        if x1 - x0 < 1e-9 {
            x1 = x0 + 1.0;
        }
        Some(Self { x0, x1, y1: nice_ceil(y1.max(1e-3)) })
    }

    /// The canvas x of a data x.
    fn x(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * PW
    }

    /// The canvas y of a data y.
    fn y(&self, y: f64) -> f64 {
        TOP + PH - (y / self.y1) * PH
    }
}

/// Shades the part of `(a, b)` inside the x axis.
fn shade(o: &mut String, scale: &Scale, (a, b): (f64, f64)) {
    let (a, b) = (a.max(scale.x0), b.min(scale.x1));
    if b > a {
        let _ = write!(
            o,
            "<rect x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{PH}\" fill=\"#f3f7ff\"/>",
            scale.x(a),
            scale.x(b) - scale.x(a)
        );
    }
}

/// Six horizontal grid lines from 0 to the top, labelled.
fn y_grid(o: &mut String, scale: &Scale) {
    for i in 0..=5 {
        let v = scale.y1 * i as f64 / 5.0;
        let y = scale.y(v);
        let _ = write!(o, "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>", LEFT + PW);
        let _ =
            write!(o, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", LEFT - 6.0, y + 4.0, fmt_num(v));
    }
}

/// The x ticks: every power-of-ten percentile, or about eight "nice" steps.
fn x_ticks(scale: &Scale, x_axis: XAxis) -> Vec<(f64, String)> {
    match x_axis {
        XAxis::Percentile => (0..=(scale.x1 as i32)).map(|k| (k as f64, percentile_label(k as usize))).collect(),
        XAxis::Linear => {
            let step = nice_ceil((scale.x1 - scale.x0) / 8.0);
            let mut t = (scale.x0 / step).ceil() * step;
            let mut v = Vec::new();
            while t <= scale.x1 + 1e-9 {
                v.push((t, fmt_num(t)));
                t += step;
            }
            v
        }
    }
}

/// Vertical grid lines at the x ticks, labelled below the plot area.
fn x_grid(o: &mut String, scale: &Scale, x_axis: XAxis) {
    for (x, label) in x_ticks(scale, x_axis) {
        let px = scale.x(x);
        let _ = write!(o, "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"#eee\"/>", TOP + PH);
        let _ =
            write!(o, "<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", TOP + PH + 14.0, esc(&label));
    }
}

/// The plot area's border and the axis labels.
fn frame_and_labels(o: &mut String, x_label: &str, y_label: &str) {
    let _ = write!(o, "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{PW}\" height=\"{PH}\" fill=\"none\" stroke=\"#999\"/>");
    let _ = write!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        LEFT + PW / 2.0,
        H - 6.0,
        esc(x_label)
    );
    let _ = write!(
        o,
        "<text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        TOP + PH / 2.0,
        esc(y_label)
    );
}

/// Series `i`: its line (when it has points) and its legend entry.
fn draw_series(o: &mut String, scale: &Scale, i: usize, s: &Series<'_>) {
    if !s.points.is_empty() {
        let pts: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", scale.x(x), scale.y(y))).collect();
        let _ = write!(
            o,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" points=\"{}\"/>",
            esc(s.color),
            pts.join(" ")
        );
    }
    let ly = TOP + 14.0 + 18.0 * i as f64;
    let lx = LEFT + PW + 12.0;
    let _ = write!(
        o,
        "<line x1=\"{lx}\" x2=\"{:.1}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"3\"/>",
        lx + 18.0,
        esc(s.color)
    );
    let _ = write!(o, "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>", lx + 24.0, ly + 4.0, esc(s.name));
}

/// The percentile at x = k on a -log10(1 - q) axis: 0%, 90%, 99%, 99.9%, ...
fn percentile_label(k: usize) -> String {
    match k {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        _ => format!("99.{}%", "9".repeat(k - 2)),
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `v`.
fn nice_ceil(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v - 1e-12 {
            return m * mag;
        }
    }
    10.0 * mag
}

/// A tick label: integers without a decimal point, others with up to three decimals.
fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_numbers() {
        assert_eq!(nice_ceil(7.3), 10.0);
        assert_eq!(nice_ceil(0.21), 0.25);
        assert_eq!(nice_ceil(1.0), 1.0);
        assert_eq!(nice_ceil(160.0), 200.0);
        assert_eq!(fmt_num(99.9), "99.9");
        assert_eq!(fmt_num(5.0), "5");
    }

    #[test]
    fn charts_are_well_formed_svg() {
        let svg = line_chart(
            "ms",
            "t <s>",
            &[Series { name: "a&b", color: "#123", points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)] }],
            XAxis::Linear,
            Some((0.5, 1.5)),
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("a&amp;b") && svg.contains("t &lt;s&gt;"));
        let empty = line_chart("ms", "x", &[], XAxis::Percentile, None);
        assert!(empty.contains("no data"));
        let p = line_chart(
            "ms",
            "percentile",
            &[Series { name: "e2e", color: "red", points: vec![(0.3, 1.0), (2.0, 5.0), (4.0, 9.0)] }],
            XAxis::Percentile,
            None,
        );
        assert!(p.contains("99.99%"), "{p}");
        assert_eq!(percentile_label(6), "99.9999%");
    }
}
