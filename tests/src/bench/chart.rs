//! The report's chart (`docs/benchmarks.svg`), written by hand (no plotting crate): per workload,
//! sharddb's throughput beside plain Postgres (the anchor) and beside the same SQL sent one
//! transaction per request, on a log scale, with sharddb's ratio to plain Postgres in a column of
//! its own. The layout is computed first ([`layout`]) from conservative text widths, so every
//! label fits its margin whatever the workload titles are; a test checks it. Pure.

use crate::bench::report::{Report, ResultRow, fmt_num};
use std::fmt::Write as _;

/// The chart's font, first choice; the widths below are those of DejaVu Sans, which is wider
/// than the usual fallbacks (Liberation Sans, Arial, Helvetica), so they bound those too.
pub const FONT: &str = "DejaVu Sans, Verdana, Arial, sans-serif";

/// An upper bound of the width of `text` in pixels at `size` px, regular or bold. Per character,
/// the largest advance width in its class in DejaVu Sans (in ems: lowercase 0.635 but m 0.974 and
/// w 0.818, uppercase 0.79 but M 0.863 and W 0.989, digits 0.636, `: ; |` 0.337, ...), rounded
/// up, plus 5%; bold adds 12% (DejaVu Sans Bold is up to 12% wider per class, 23% for `i` which
/// the narrow class's rounding covers). Characters outside ASCII count as a full em.
pub fn text_width(text: &str, size: f64, bold: bool) -> f64 {
    let ems: f64 = text
        .chars()
        .map(|c| match c {
            ' ' => 0.32,
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '\'' | '|' | 'I' => 0.34,
            'f' | 't' | 'r' | '(' | ')' | '[' | ']' | '/' | '\\' | '-' | '!' => 0.42,
            'm' => 0.98,
            'w' => 0.82,
            'M' => 0.87,
            'W' => 1.0,
            '%' | '@' => 1.0,
            'a'..='z' | '0'..='9' => 0.64,
            'A'..='Z' => 0.80,
            c if c.is_ascii() => 0.84,
            _ => 1.0,
        })
        .sum();
    ems * size * 1.05 * if bold { 1.12 } else { 1.0 }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

/// One piece of text placed on the chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Text {
    pub x: f64,
    pub y: f64,
    pub anchor: Anchor,
    pub size: f64,
    pub bold: bool,
    pub fill: &'static str,
    pub text: String,
}

impl Text {
    /// Leftmost and rightmost pixel the text may cover.
    pub fn extent(&self) -> (f64, f64) {
        let w = text_width(&self.text, self.size, self.bold);
        match self.anchor {
            Anchor::Start => (self.x, self.x + w),
            Anchor::Middle => (self.x - w / 2.0, self.x + w / 2.0),
            Anchor::End => (self.x - w, self.x),
        }
    }
}

/// A filled rectangle or a line.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    Rect { x: f64, y: f64, w: f64, h: f64, fill: &'static str },
    Line { x1: f64, y1: f64, x2: f64, y2: f64, stroke: &'static str, width: f64, dash: bool },
}

/// The chart, placed.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub width: f64,
    pub height: f64,
    /// Where the workload labels end (right-aligned there).
    pub label_right: f64,
    pub texts: Vec<Text>,
    pub shapes: Vec<Shape>,
}

const SHARDDB: &str = "#2f5fa7";
const POSTGRES: &str = "#e07b00";
const PER_REQUEST: &str = "#b8b8b8";
const INK: &str = "#222222";
const MUTED: &str = "#666666";
const PAD: f64 = 12.0;
const LABEL_SIZE: f64 = 12.0;
const VALUE_SIZE: f64 = 11.0;
const TITLE_SIZE: f64 = 15.0;
const PLOT_W: f64 = 520.0;
const BAR_H: f64 = 12.0;
const GROUP_GAP: f64 = 14.0;

fn text(x: f64, y: f64, anchor: Anchor, size: f64, bold: bool, fill: &'static str, t: impl Into<String>) -> Text {
    Text { x, y, anchor, size, bold, fill, text: t.into() }
}

/// The ratio column's text for a row: sharddb ÷ plain Postgres.
fn ratio_text(r: &ResultRow) -> Option<String> {
    r.anchor_ratio.map(|x| format!("{x:.2}× Postgres"))
}

/// What stands in for bar `j` of a row that has no value: the HTTP floor has no counterpart on
/// plain Postgres or as SQL, and the copy none in `pgbench`.
fn missing(x: &ResultRow, j: usize) -> &'static str {
    match (x.workload.as_str(), j) {
        ("http-floor", 1 | 2) | ("copy", 1) => "no equivalent",
        _ => "not measured",
    }
}

fn value_text(v: f64, errors: bool) -> String {
    format!("{}{}", fmt_num(v), if errors { " (errors)" } else { "" })
}

/// Places everything: the label margin is as wide as the widest label needs, the value room as
/// wide as the widest value, the ratio column as wide as its widest entry.
pub fn layout(r: &Report) -> Chart {
    let rows: Vec<&ResultRow> = r.results.iter().collect();
    let bars = |x: &ResultRow| {
        [
            (Some(x.ops_per_s), SHARDDB, x.errors > 0),
            (x.anchor_ops_per_s, POSTGRES, x.anchor_errors > 0),
            (x.baseline_ops_per_s, PER_REQUEST, x.baseline_errors > 0),
        ]
    };
    let label_w = rows.iter().map(|x| text_width(&x.title, LABEL_SIZE, false)).fold(0.0, f64::max);
    let value_w = rows
        .iter()
        .flat_map(|x| bars(x).into_iter().filter_map(|(v, _, e)| v.map(|v| value_text(v, e))))
        .chain(["not measured".to_owned(), "no equivalent".to_owned()])
        .map(|t| text_width(&t, VALUE_SIZE, false))
        .fold(0.0, f64::max);
    let ratio_w = rows
        .iter()
        .filter_map(|x| ratio_text(x))
        .chain(std::iter::once("vs plain Postgres".to_owned()))
        .map(|t| text_width(&t, LABEL_SIZE, true))
        .fold(0.0, f64::max);
    let label_right = PAD + label_w.ceil();
    let plot_x = label_right + 10.0;
    let ratio_x = plot_x + PLOT_W + value_w.ceil() + 16.0;
    let title = "Throughput per workload: sharddb beside plain Postgres (log scale)";
    let legend: [(&'static str, &str); 3] = [
        (SHARDDB, "sharddb (router, replicated)"),
        (POSTGRES, "plain Postgres (pgbench, same concurrency)"),
        (PER_REQUEST, "same SQL, one transaction per request"),
    ];
    let legend_w: f64 = legend.iter().map(|(_, t)| 18.0 + text_width(t, LABEL_SIZE, false) + 18.0).sum();
    let width = (ratio_x + ratio_w.ceil() + PAD)
        .max(PAD + text_width(title, TITLE_SIZE, true).ceil() + PAD)
        .max(PAD + legend_w + PAD)
        .ceil();

    let top = 78.0;
    let group_h = 3.0 * BAR_H + GROUP_GAP;
    let plot_bottom = top + group_h * rows.len().max(1) as f64;
    let height = (plot_bottom + 52.0).ceil();
    let mut texts = vec![text(PAD, 24.0, Anchor::Start, TITLE_SIZE, true, INK, title)];
    let mut shapes = Vec::new();
    let mut lx = PAD;
    for (color, t) in legend {
        shapes.push(Shape::Rect { x: lx, y: 38.0, w: 12.0, h: 12.0, fill: color });
        texts.push(text(lx + 18.0, 48.5, Anchor::Start, LABEL_SIZE, false, INK, t));
        lx += 18.0 + text_width(t, LABEL_SIZE, false) + 18.0;
    }
    texts.push(text(ratio_x, top - 8.0, Anchor::Start, LABEL_SIZE, true, INK, "vs plain Postgres"));

    let values: Vec<f64> = rows
        .iter()
        .flat_map(|x| bars(x).into_iter().filter_map(|b| b.0))
        .filter(|v| *v > 0.0 && v.is_finite())
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min).max(1.0).log10().floor();
    let hi = values.iter().copied().fold(1.0, f64::max).log10().ceil().max(lo + 1.0);
    let x_of = |v: f64| plot_x + (v.max(1.0).log10() - lo) / (hi - lo) * PLOT_W;
    for e in (lo as i32)..=(hi as i32) {
        let x = x_of(10f64.powi(e));
        shapes.push(Shape::Line {
            x1: x,
            y1: top - 4.0,
            x2: x,
            y2: plot_bottom,
            stroke: "#e2e2e2",
            width: 1.0,
            dash: false,
        });
        texts.push(text(x, plot_bottom + 16.0, Anchor::Middle, VALUE_SIZE, false, MUTED, fmt_num(10f64.powi(e))));
    }
    for (i, x) in rows.iter().enumerate() {
        let y = top + i as f64 * group_h;
        texts.push(text(label_right, y + 1.5 * BAR_H + 4.0, Anchor::End, LABEL_SIZE, false, INK, x.title.clone()));
        for (j, (v, color, errors)) in bars(x).into_iter().enumerate() {
            let by = y + j as f64 * BAR_H;
            match v {
                Some(v) if v > 0.0 && v.is_finite() => {
                    let w = (x_of(v) - plot_x).max(1.0);
                    shapes.push(Shape::Rect { x: plot_x, y: by, w, h: BAR_H - 2.0, fill: color });
                    texts.push(text(
                        plot_x + w + 4.0,
                        by + BAR_H - 3.0,
                        Anchor::Start,
                        VALUE_SIZE,
                        false,
                        INK,
                        value_text(v, errors),
                    ));
                }
                _ => texts.push(text(
                    plot_x + 4.0,
                    by + BAR_H - 3.0,
                    Anchor::Start,
                    VALUE_SIZE,
                    false,
                    MUTED,
                    missing(x, j),
                )),
            }
        }
        if let Some(t) = ratio_text(x) {
            let fill = if x.anchor_ratio.is_some_and(|r| r < 1.0) { POSTGRES } else { SHARDDB };
            texts.push(text(ratio_x, y + 1.5 * BAR_H + 4.0, Anchor::Start, LABEL_SIZE, true, fill, t));
        }
    }
    shapes.push(Shape::Line {
        x1: plot_x,
        y1: top - 4.0,
        x2: plot_x,
        y2: plot_bottom,
        stroke: MUTED,
        width: 1.0,
        dash: false,
    });
    texts.push(text(
        plot_x,
        height - 12.0,
        Anchor::Start,
        VALUE_SIZE,
        false,
        MUTED,
        "operations per second (rows per second for the copy); the right column is sharddb ÷ plain Postgres",
    ));
    let mut chart = Chart { width, height, label_right, texts, shapes };
    // The caption is the one text not laid out against a margin: widen the chart for it.
    let right = chart.texts.iter().map(|t| t.extent().1).fold(0.0, f64::max);
    chart.width = chart.width.max((right + PAD).ceil());
    chart
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The chart as one SVG document.
pub fn svg(r: &Report) -> String {
    let c = layout(r);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="{FONT}" font-size="{LABEL_SIZE}">"#,
        w = c.width,
        h = c.height
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    for shape in &c.shapes {
        match shape {
            Shape::Rect { x, y, w, h, fill } => {
                let _ = writeln!(s, r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"/>"#);
            }
            Shape::Line { x1, y1, x2, y2, stroke, width, dash } => {
                let dash = if *dash { r#" stroke-dasharray="4 2""# } else { "" };
                let _ = writeln!(
                    s,
                    r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{stroke}" stroke-width="{width}"{dash}/>"#
                );
            }
        }
    }
    for t in &c.texts {
        let anchor = match t.anchor {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        };
        let weight = if t.bold { r#" font-weight="bold""# } else { "" };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="{anchor}" font-size="{}" fill="{}"{weight}>{}</text>"#,
            t.x,
            t.y,
            t.size,
            t.fill,
            escape(&t.text)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every title the benchmark gives a row, the longest variant suffix included.
    fn every_title() -> Vec<String> {
        let mut t: Vec<String> = [
            "A-1 single-row writes",
            "A-1 single-key reads",
            "HTTP floor: GET /healthz (router only)",
            "A-2 single-row writes",
            "A-3 single-key reads",
            "Batch writes (100 rows, one shard each)",
            "Range reads, 1 shard (100 keys)",
            "Range reads across 3 shards (~4,200 keys)",
            "Mixed 80% reads / 20% writes",
            "Shard copy: full snapshot stream (rows/s)",
        ]
        .map(String::from)
        .into();
        t.push("A-1 single-row writes [internal TLS off, confirmed reads]".into());
        t
    }

    fn report(titles: &[String]) -> Report {
        let results = titles
            .iter()
            .enumerate()
            .map(|(i, title)| ResultRow {
                workload: format!("w{i}"),
                title: title.clone(),
                ops_per_s: 1234567.0 / (i + 1) as f64,
                errors: (i % 3) as u64,
                anchor_ops_per_s: (i % 2 == 0).then_some(17_075.0),
                anchor_ratio: (i % 2 == 0).then_some(0.35),
                baseline_ops_per_s: (i % 4 != 3).then_some(500.0),
                baseline_errors: 1,
                ..ResultRow::default()
            })
            .collect();
        Report { results, ..Report::default() }
    }

    fn assert_fits(c: &Chart) {
        for t in &c.texts {
            let (l, r) = t.extent();
            assert!(l >= 0.0 && r <= c.width, "{:?} spans {l:.0}..{r:.0}, outside the chart's 0..{}", t.text, c.width);
        }
        for t in c.texts.iter().filter(|t| t.anchor == Anchor::End) {
            assert!(t.x <= c.label_right, "{:?}", t.text);
            assert!(t.extent().0 >= PAD - 0.5, "{:?} does not fit the label margin", t.text);
        }
    }

    #[test]
    fn every_label_fits_its_margin() {
        let c = layout(&report(&every_title()));
        assert_fits(&c);
        let labels: Vec<&str> = c.texts.iter().filter(|t| t.anchor == Anchor::End).map(|t| t.text.as_str()).collect();
        assert_eq!(labels.len(), every_title().len(), "every workload is labelled in full");
        assert!(labels.contains(&"HTTP floor: GET /healthz (router only)"));
        // A title twice as long still fits: the margin follows the labels.
        let long: Vec<String> = every_title().iter().map(|t| format!("{t} — {t}")).collect();
        assert_fits(&layout(&report(&long)));
    }

    #[test]
    fn widths_are_conservative_for_the_font() {
        // Advance widths summed from the DejaVu Sans and DejaVu Sans Bold font files, at 12 px.
        let label = "HTTP floor: GET /healthz (router only)";
        assert!(text_width(label, 12.0, false) >= 225.4);
        assert!(text_width(label, 12.0, true) >= 255.6);
        assert!(text_width("Range reads across 3 shards (~4,200 keys)", 12.0, false) >= 262.6);
        assert!(text_width("WWWW", 12.0, false) >= 47.5 && text_width("WWWW", 12.0, true) >= 52.9);
        assert!(text_width("mmmm", 12.0, false) >= 46.8 && text_width("mmmm", 12.0, true) >= 50.0);
        assert!(text_width("iiii", 12.0, false) >= 13.3 && text_width("iiii", 12.0, true) >= 16.5);
        assert!(text_width("0.35× Postgres", 12.0, true) >= 103.5);
        // Not wildly so: the margin stays reasonable.
        assert!(text_width(label, 12.0, false) <= 1.25 * 225.4);
        assert!(text_width("×", 12.0, true) > text_width("×", 12.0, false));
    }

    #[test]
    fn the_anchor_is_drawn_and_the_document_is_whole() {
        let s = svg(&report(&every_title()));
        assert!(s.starts_with("<svg ") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<svg").count(), 1);
        assert!(s.contains(POSTGRES) && s.contains("plain Postgres (pgbench, same concurrency)"));
        assert!(s.contains("0.35× Postgres"));
        assert!(s.contains("(errors)") && s.contains("not measured"));
        assert!(s.contains("~4,200 keys"));
        let r = Report::default();
        assert!(svg(&r).contains("</svg>"));
    }
}
