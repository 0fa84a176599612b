//! Minimal SVG line charts drawn from the same numbers that go into the CSV files: no font
//! or plotting dependency, text left to the viewer's default sans-serif font.

use std::fmt::Write as _;

/// One line: a name and its points (x, y) in data units.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// Axis scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scale {
    Linear,
    Log,
}

/// A chart.
#[derive(Debug)]
pub(crate) struct Chart<'a> {
    pub(crate) title: &'a str,
    pub(crate) x_label: &'a str,
    pub(crate) y_label: &'a str,
    pub(crate) x_scale: Scale,
    pub(crate) y_scale: Scale,
    pub(crate) series: &'a [Series],
}

const W: f64 = 760.0;
const H: f64 = 480.0;
const L: f64 = 80.0;
const R: f64 = 180.0;
const T: f64 = 40.0;
const B: f64 = 60.0;
const COLORS: [&str; 12] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8"];

fn tr(v: f64, s: Scale) -> f64 {
    match s {
        Scale::Linear => v,
        Scale::Log => v.max(1e-12).log10(),
    }
}

fn ticks(lo: f64, hi: f64, s: Scale) -> Vec<f64> {
    match s {
        Scale::Log => (lo.floor() as i32..=hi.ceil() as i32).map(|e| 10f64.powi(e)).collect(),
        Scale::Linear => {
            let span = (hi - lo).max(1e-9);
            let step = 10f64.powf((span / 5.0).log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * step).find(|s| span / s <= 6.0).unwrap_or(step * 10.0);
            let mut v = (lo / step).ceil() * step;
            let mut out = vec![];
            while v <= hi + 1e-9 {
                out.push(v);
                v += step;
            }
            out
        }
    }
}

fn label(v: f64) -> String {
    if v >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 && (v / 1e3).fract() == 0.0 {
        format!("{}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.2}")
    }
}

/// Render the chart as an SVG document.
pub(crate) fn render(c: &Chart<'_>) -> String {
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        let (x, y) = (tr(x, c.x_scale), tr(y, c.y_scale));
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if c.y_scale == Scale::Linear {
        y0 = y0.min(0.0);
    } else {
        (y0, y1) = (y0.floor(), y1.ceil());
    }
    if c.x_scale == Scale::Log {
        (x0, x1) = (x0.floor(), x1.ceil());
    }
    if (x1 - x0).abs() < 1e-9 {
        x1 = x0 + 1.0;
    }
    if (y1 - y0).abs() < 1e-9 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| L + (tr(x, c.x_scale) - x0) / (x1 - x0) * (W - L - R);
    let py = |y: f64| H - B - (tr(y, c.y_scale) - y0) / (y1 - y0) * (H - T - B);
    let mut o = String::new();
    let _ = writeln!(o, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(o, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, (W - R + L) / 2.0, c.title);
    let (gx0, gx1) = (if c.x_scale == Scale::Log { 10f64.powf(x0) } else { x0 }, if c.x_scale == Scale::Log { 10f64.powf(x1) } else { x1 });
    let (gy0, gy1) = (if c.y_scale == Scale::Log { 10f64.powf(y0) } else { y0 }, if c.y_scale == Scale::Log { 10f64.powf(y1) } else { y1 });
    for t in ticks(x0, x1, c.x_scale).into_iter().filter(|t| *t >= gx0 * 0.999 && *t <= gx1 * 1.001) {
        let x = px(t);
        let _ = writeln!(o, r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#ddd"/>"##, H - B);
        let _ = writeln!(o, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, H - B + 16.0, label(t));
    }
    for t in ticks(y0, y1, c.y_scale).into_iter().filter(|t| *t >= gy0 * 0.999 && *t <= gy1 * 1.001) {
        let y = py(t);
        let _ = writeln!(o, r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##, W - R);
        let _ = writeln!(o, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, L - 6.0, y + 4.0, label(t));
    }
    let _ = writeln!(o, r#"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="black"/>"#, W - L - R, H - T - B);
    let _ = writeln!(o, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (W - R + L) / 2.0, H - 18.0, c.x_label);
    let _ = writeln!(
        o,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>"#,
        (H - B + T) / 2.0,
        (H - B + T) / 2.0,
        c.y_label
    );
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(o, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        if s.points.len() <= 40 {
            for &(x, y) in &s.points {
                let _ = writeln!(o, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#, px(x), py(y));
            }
        }
        let ly = T + 20.0 + i as f64 * 20.0;
        let _ = writeln!(o, r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#, W - R + 12.0, W - R + 36.0);
        let _ = writeln!(o, r#"<text x="{}" y="{}">{}</text>"#, W - R + 42.0, ly + 4.0, s.name);
    }
    o.push_str("</svg>\n");
    o
}

/// Empirical CDF points of `values` (sorted copy), as (value, fraction).
pub(crate) fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter().enumerate().map(|(i, x)| (*x, (i + 1) as f64 / n)).collect()
}

/// Write `svg` to `path` (`.svg`) and, when `rsvg-convert` (Debian's librsvg2-bin) is
/// installed, a PNG rendering beside it. Returns the files written.
pub(crate) fn write(path: &std::path::Path, svg: &str) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::write(path, svg)?;
    let mut written = vec![path.to_path_buf()];
    let png = path.with_extension("png");
    let ok = std::process::Command::new("rsvg-convert")
        .arg("-o")
        .arg(&png)
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        written.push(png);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_and_axis() {
        let s = vec![
            Series { name: "new".into(), points: vec![(1e3, 100.0), (1e6, 5000.0)] },
            Series { name: "warm".into(), points: vec![(1e3, 50.0), (1e6, 1000.0)] },
        ];
        let svg = render(&Chart { title: "FCT", x_label: "bytes", y_label: "µs", x_scale: Scale::Log, y_scale: Scale::Log, series: &s });
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">new<") && svg.contains(">warm<") && svg.contains(">1M<"));
        let c = cdf(&[3.0, 1.0, 2.0]);
        assert_eq!(c, vec![(1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]);
    }
}
