//! A dependency-free SVG renderer for the benchmark's chart: a horizontal grouped bar chart of
//! ratios. Each group is one metric, each bar one series' value in it; every series keeps one
//! colour (in order of first appearance), shown in the legend at the top. Reference lines
//! (e.g. "= bridge" at 1.0) are drawn dashed across the plot. Values that are NaN, infinite or
//! negative have no bar and the label "n/a".
//!
//! Text widths are estimated (no font metrics), so the layout is generous rather than exact.

use std::fmt::{self, Write as _};

/// One bar: a series' value in a group.
#[derive(Debug, Clone)]
pub struct Bar {
    pub series: String,
    pub value: f64,
}

/// A group of bars: one metric (e.g. "TCP 1 stream, task to task").
#[derive(Debug, Clone)]
pub struct Group {
    pub label: String,
    pub bars: Vec<Bar>,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    /// Caption under the title, e.g. the machine and the command.
    pub subtitle: String,
    /// Axis label, e.g. "ratio (higher is better for ecsnet)".
    pub axis: String,
    /// Vertical reference lines drawn across the plot, with labels, e.g. (1.0, "= bridge").
    pub references: Vec<(f64, String)>,
    pub groups: Vec<Group>,
}

/// Canvas width, px.
const WIDTH: f64 = 900.0;
const MARGIN: f64 = 16.0;
/// Group labels longer than this many characters are shortened with "…".
const LABEL_CHARS: usize = 40;
/// Right edge (text anchor) of the group labels: room for `LABEL_CHARS` at `TEXT_SIZE`.
const LABEL_RIGHT: f64 = MARGIN + 290.0;
const PLOT_LEFT: f64 = LABEL_RIGHT + 10.0;
/// Leaves room for the value label of a bar that reaches the end of the axis.
const PLOT_RIGHT: f64 = WIDTH - 72.0;
const BAR_HEIGHT: f64 = 16.0;
const BAR_GAP: f64 = 3.0;
/// Space above the first and below the last bar of a group.
const GROUP_PAD: f64 = 9.0;

const TITLE_SIZE: f64 = 18.0;
const TEXT_SIZE: f64 = 12.0;
const SMALL_SIZE: f64 = 11.0;
/// Line height of the subtitle.
const SUBTITLE_LINE: f64 = 16.0;
const LEGEND_ROW: f64 = 20.0;
const SWATCH: f64 = 12.0;
/// Height of one row of reference-line labels above the plot.
const REFERENCE_ROW: f64 = 14.0;
/// Space under the plot for the tick labels and the axis label.
const AXIS_SPACE: f64 = 44.0;
/// The x axis gets at most about this many divisions.
const MAX_DIVISIONS: f64 = 6.0;

/// Distinguishable colours that stay readable on white; reused in order past the tenth series.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// The chart as a standalone SVG document.
pub fn svg(chart: &Chart) -> String {
    let mut body = String::new();
    let height = render(chart, &mut body).expect("writing to a String cannot fail");
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH:.0}" height="{height:.0}" viewBox="0 0 {WIDTH:.0} {height:.0}" font-family="sans-serif" font-size="{TEXT_SIZE:.0}" style="background:#fff">"#
    );
    let _ = writeln!(out, "<title>{}</title>", escape(&chart.title));
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

/// The x axis for values up to `largest`, as `(max, step)`: `step` is 1, 2, 2.5 or 5 times a
/// power of ten (…, 0.25, 0.5, 1, 2, 2.5, 5, 10, …), the smallest giving at most about six
/// divisions, and `max` the first multiple of `step` at or above `largest`. A `largest` that is
/// not a positive finite number gives `(1.0, 0.25)`.
pub fn nice_axis(largest: f64) -> (f64, f64) {
    if !(largest.is_finite() && largest > 0.0) {
        return (1.0, 0.25);
    }
    let raw = largest / MAX_DIVISIONS;
    let exponent = raw.log10().floor() as i32;
    // Dividing by a power of ten keeps steps like 0.25 exact.
    let scaled = |m: f64| {
        if exponent >= 0 {
            m * 10f64.powi(exponent)
        } else {
            m / 10f64.powi(-exponent)
        }
    };
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(scaled)
        .find(|&s| s >= raw)
        .unwrap_or_else(|| scaled(10.0));
    // The tolerance absorbs rounding in the division (1.1 / 0.1 is a little over 11).
    let divisions = (largest / step - 1e-9).ceil().max(1.0);
    (divisions * step, step)
}

/// Draws everything below the `<svg>` tag into `out`; returns the document's height.
fn render(chart: &Chart, out: &mut String) -> Result<f64, fmt::Error> {
    let series = series_order(chart);
    let (max, step) = nice_axis(largest(chart));
    let scale = Scale { max };

    let mut y = heading(out, chart, MARGIN)?;
    y = legend(out, &series, y)?;
    let references = place_references(&chart.references, &scale);
    let rows = references.iter().map(|r| r.row + 1).max().unwrap_or(0);
    y += rows as f64 * REFERENCE_ROW;

    let plot_top = y;
    let heights: Vec<f64> = chart.groups.iter().map(group_height).collect();
    let plot_height = heights.iter().sum::<f64>().max(group_height_for(1));
    let plot_bottom = plot_top + plot_height;

    grid(out, &chart.axis, &scale, step, plot_top, plot_bottom)?;
    let mut top = plot_top;
    for (index, (group, height)) in chart.groups.iter().zip(&heights).enumerate() {
        if index > 0 {
            line(
                out,
                PLOT_LEFT - 6.0,
                top,
                PLOT_RIGHT,
                top,
                r##" stroke="#e8e8e8""##,
            )?;
        }
        draw_group(out, group, &series, &scale, top, *height)?;
        top += height;
    }
    for reference in &references {
        draw_reference(out, reference, plot_top, plot_bottom)?;
    }
    let axis = r##" stroke="#333""##;
    line(out, PLOT_LEFT, plot_top, PLOT_LEFT, plot_bottom, axis)?;
    line(out, PLOT_LEFT, plot_bottom, PLOT_RIGHT, plot_bottom, axis)?;
    Ok(plot_bottom + AXIS_SPACE + MARGIN)
}

/// Maps values onto the plot's x coordinates.
struct Scale {
    max: f64,
}

impl Scale {
    fn x(&self, value: f64) -> f64 {
        PLOT_LEFT + value / self.max * (PLOT_RIGHT - PLOT_LEFT)
    }
}

/// A value worth a bar: finite and not negative.
fn drawable(value: f64) -> Option<f64> {
    (value.is_finite() && value >= 0.0).then_some(value)
}

/// The largest drawable bar value or reference line (0 if none).
fn largest(chart: &Chart) -> f64 {
    let bars = chart.groups.iter().flat_map(|g| &g.bars).map(|b| b.value);
    let references = chart.references.iter().map(|(v, _)| *v);
    bars.chain(references)
        .filter_map(drawable)
        .fold(0.0, f64::max)
}

/// Distinct series names in order of first appearance.
fn series_order(chart: &Chart) -> Vec<&str> {
    let mut order: Vec<&str> = Vec::new();
    for bar in chart.groups.iter().flat_map(|g| &g.bars) {
        if !order.contains(&bar.series.as_str()) {
            order.push(&bar.series);
        }
    }
    order
}

fn colour(series: &[&str], name: &str) -> &'static str {
    let index = series.iter().position(|s| *s == name).unwrap_or(0);
    PALETTE[index % PALETTE.len()]
}

fn group_height(group: &Group) -> f64 {
    group_height_for(group.bars.len().max(1))
}

fn group_height_for(bars: usize) -> f64 {
    let bars = bars as f64;
    2.0 * GROUP_PAD + bars * BAR_HEIGHT + (bars - 1.0) * BAR_GAP
}

/// Title and wrapped subtitle from `y` down; returns the y below them.
fn heading(out: &mut String, chart: &Chart, mut y: f64) -> Result<f64, fmt::Error> {
    if !chart.title.is_empty() {
        y += TITLE_SIZE;
        let attrs = format!(r#" font-size="{TITLE_SIZE:.0}" font-weight="bold""#);
        text(out, MARGIN, y, &attrs, &chart.title)?;
    }
    let chars = ((WIDTH - 2.0 * MARGIN) / char_width(TEXT_SIZE)) as usize;
    for subtitle_line in wrap(&chart.subtitle, chars) {
        y += SUBTITLE_LINE;
        text(out, MARGIN, y, r##" fill="#555""##, &subtitle_line)?;
    }
    Ok(y + 10.0)
}

/// One swatch and name per series, in rows that fit the width; returns the y below them.
fn legend(out: &mut String, series: &[&str], y: f64) -> Result<f64, fmt::Error> {
    if series.is_empty() {
        return Ok(y);
    }
    let (mut x, mut row_top) = (MARGIN, y);
    for (index, name) in series.iter().enumerate() {
        let name = shorten(name, LABEL_CHARS);
        let item = SWATCH + 6.0 + text_width(&name, TEXT_SIZE);
        if x > MARGIN && x + item > WIDTH - MARGIN {
            x = MARGIN;
            row_top += LEGEND_ROW;
        }
        let fill = PALETTE[index % PALETTE.len()];
        writeln!(
            out,
            r#"<rect x="{x:.1}" y="{row_top:.1}" width="{SWATCH:.0}" height="{SWATCH:.0}" fill="{fill}"/>"#
        )?;
        text(out, x + SWATCH + 6.0, row_top + SWATCH - 2.0, "", &name)?;
        x += item + 20.0;
    }
    Ok(row_top + LEGEND_ROW + 8.0)
}

/// Vertical gridlines, tick labels and the axis label.
fn grid(
    out: &mut String,
    axis: &str,
    scale: &Scale,
    step: f64,
    top: f64,
    bottom: f64,
) -> fmt::Result {
    let divisions = (scale.max / step).round() as usize;
    let decimals = decimals(step);
    let tick_attrs = format!(r##" font-size="{SMALL_SIZE:.0}" text-anchor="middle" fill="#444""##);
    for k in 0..=divisions {
        let value = k as f64 * step;
        let x = scale.x(value);
        if k > 0 {
            line(out, x, top, x, bottom, r##" stroke="#e0e0e0""##)?;
        }
        let label = format!("{value:.decimals$}");
        text(out, x, bottom + 15.0, &tick_attrs, &label)?;
    }
    let centre = (PLOT_LEFT + PLOT_RIGHT) / 2.0;
    text(
        out,
        centre,
        bottom + 35.0,
        r##" text-anchor="middle" fill="#222""##,
        axis,
    )
}

/// The group's label on the left and its bars, each with its value at its end.
fn draw_group(
    out: &mut String,
    group: &Group,
    series: &[&str],
    scale: &Scale,
    top: f64,
    height: f64,
) -> fmt::Result {
    let label = shorten(&group.label, LABEL_CHARS);
    let baseline = top + height / 2.0 + TEXT_SIZE / 3.0;
    write!(
        out,
        r#"<text x="{LABEL_RIGHT:.1}" y="{baseline:.1}" text-anchor="end">{}"#,
        escape(&label)
    )?;
    if label != group.label {
        write!(out, "<title>{}</title>", escape(&group.label))?;
    }
    writeln!(out, "</text>")?;

    let value_attrs = format!(r##" font-size="{SMALL_SIZE:.0}" fill="#222""##);
    for (index, bar) in group.bars.iter().enumerate() {
        let y = top + GROUP_PAD + index as f64 * (BAR_HEIGHT + BAR_GAP);
        let baseline = y + BAR_HEIGHT / 2.0 + SMALL_SIZE / 3.0;
        let fill = colour(series, &bar.series);
        let tooltip = escape(&format!("{}: {}", group.label, bar.series));
        match drawable(bar.value) {
            Some(value) => {
                let width = scale.x(value) - PLOT_LEFT;
                writeln!(
                    out,
                    r#"<rect x="{PLOT_LEFT:.1}" y="{y:.1}" width="{width:.1}" height="{BAR_HEIGHT:.0}" fill="{fill}"><title>{tooltip} {value:.2}</title></rect>"#
                )?;
                let label = format!("{value:.2}");
                text(out, PLOT_LEFT + width + 4.0, baseline, &value_attrs, &label)?;
            }
            None => {
                // No bar: a thin mark in the series' colour says whose value is missing.
                let attrs = format!(r#" stroke="{fill}" stroke-width="3""#);
                line(
                    out,
                    PLOT_LEFT + 1.5,
                    y,
                    PLOT_LEFT + 1.5,
                    y + BAR_HEIGHT,
                    &attrs,
                )?;
                writeln!(
                    out,
                    r##"<text x="{:.1}" y="{baseline:.1}" font-size="{SMALL_SIZE:.0}" fill="#777">n/a<title>{tooltip}</title></text>"##,
                    PLOT_LEFT + 7.0
                )?;
            }
        }
    }
    Ok(())
}

/// A reference line's label, placed in a row above the plot so labels do not overlap.
struct ReferenceLabel {
    x: f64,
    /// Where the label's text is centred (kept inside the canvas).
    centre: f64,
    row: usize,
    label: String,
}

/// The drawable reference lines (finite, not negative), each given a label row: row 0 sits just
/// above the plot, further rows above it, used only when labels would overlap.
fn place_references(references: &[(f64, String)], scale: &Scale) -> Vec<ReferenceLabel> {
    let mut drawable: Vec<(f64, &str)> = references
        .iter()
        .filter_map(|(value, label)| Some((drawable(*value)?, label.as_str())))
        .collect();
    drawable.sort_by(|a, b| a.0.total_cmp(&b.0));
    // The right end of the last label in each row.
    let mut row_ends: Vec<f64> = Vec::new();
    let mut placed = Vec::new();
    for (value, label) in drawable {
        let x = scale.x(value);
        let half = text_width(label, SMALL_SIZE) / 2.0;
        let centre = x.clamp(MARGIN + half, (WIDTH - MARGIN - half).max(MARGIN + half));
        let row = match row_ends.iter().position(|end| *end + 6.0 <= centre - half) {
            Some(row) => row,
            None => {
                row_ends.push(f64::NEG_INFINITY);
                row_ends.len() - 1
            }
        };
        row_ends[row] = centre + half;
        placed.push(ReferenceLabel {
            x,
            centre,
            row,
            label: label.to_string(),
        });
    }
    placed
}

fn draw_reference(
    out: &mut String,
    reference: &ReferenceLabel,
    top: f64,
    bottom: f64,
) -> fmt::Result {
    let x = reference.x;
    let attrs = r##" stroke="#333" stroke-width="1.2" stroke-dasharray="5 3""##;
    line(out, x, top - 2.0, x, bottom, attrs)?;
    let y = top - 5.0 - reference.row as f64 * REFERENCE_ROW;
    let attrs = format!(r##" font-size="{SMALL_SIZE:.0}" text-anchor="middle" fill="#333""##);
    text(out, reference.centre, y, &attrs, &reference.label)
}

/// A `<text>` element; `attrs` (each with a leading space) are added as they are, `content` is
/// escaped.
fn text(out: &mut String, x: f64, y: f64, attrs: &str, content: &str) -> fmt::Result {
    writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}"{attrs}>{}</text>"#,
        escape(content)
    )
}

fn line(out: &mut String, x1: f64, y1: f64, x2: f64, y2: f64, attrs: &str) -> fmt::Result {
    writeln!(
        out,
        r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}"{attrs}/>"#
    )
}

/// `s` made safe as XML text or attribute value: the five special characters as entities,
/// control characters XML cannot carry dropped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// `s` cut to at most `max` characters, ending in "…" when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let kept: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{}…", kept.trim_end())
}

/// `s` split into lines of at most `max` characters at whitespace; words longer than a line are
/// split.
fn wrap(s: &str, max: usize) -> Vec<String> {
    let max = max.max(1);
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in s.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = current.chars().count();
            let room = if used == 0 {
                max
            } else {
                max.saturating_sub(used + 1)
            };
            if word.len() <= room {
                if used > 0 {
                    current.push(' ');
                }
                current.extend(&word);
                break;
            }
            if used > 0 {
                lines.push(std::mem::take(&mut current));
                continue;
            }
            let rest = word.split_off(max);
            lines.push(word.into_iter().collect());
            word = rest;
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// A generous estimate of the average character width of sans-serif text.
fn char_width(size: f64) -> f64 {
    size * 0.6
}

fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * char_width(size)
}

/// How many decimals show multiples of `step` exactly (0.25 -> 2, 0.5 -> 1, 2 -> 0).
fn decimals(step: f64) -> usize {
    (0..=6)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(series: &str, value: f64) -> Bar {
        Bar {
            series: series.to_string(),
            value,
        }
    }

    fn sample() -> Chart {
        Chart {
            title: "ecsnet vs bridge".to_string(),
            subtitle:
                "host: 8 vCPU, kernel 6.8; command: ecsnet bench --duration 10s --streams 1,8"
                    .to_string(),
            axis: "ratio (higher is better for ecsnet)".to_string(),
            references: vec![(1.0, "= bridge".to_string())],
            groups: vec![
                Group {
                    label: "TCP 1 stream, task to task".to_string(),
                    bars: vec![bar("throughput", 1.12), bar("CPU per byte", 0.87)],
                },
                Group {
                    label: "UDP <&> 'quoted' \"too\"".to_string(),
                    bars: vec![bar("throughput", f64::NAN), bar("latency p99", 1.43)],
                },
                Group {
                    label: "TCP 8 streams, task to internet through the uplink NAT path"
                        .to_string(),
                    bars: vec![
                        bar("throughput", 0.98),
                        bar("CPU per byte", f64::INFINITY),
                        bar("latency p99", -1.0),
                    ],
                },
            ],
        }
    }

    #[test]
    fn document_is_one_svg_element() {
        let doc = svg(&sample());
        assert!(doc.starts_with("<svg"), "{doc}");
        assert!(doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<svg").count(), 1);
        assert_eq!(doc.matches("</svg>").count(), 1);
        assert!(doc.contains(r#"font-family="sans-serif""#));
        assert!(doc.contains(r#"width="900""#));
        // Every opened text is closed.
        assert_eq!(doc.matches("<text").count(), doc.matches("</text>").count());
    }

    #[test]
    fn labels_and_series_are_escaped() {
        let doc = svg(&sample());
        assert!(doc.contains("TCP 1 stream, task to task"));
        assert!(doc.contains("UDP &lt;&amp;&gt; &apos;quoted&apos; &quot;too&quot;"));
        assert!(!doc.contains("<&>"));
        for series in ["throughput", "CPU per byte", "latency p99"] {
            assert!(doc.contains(&format!(">{series}</text>")), "{series}");
        }
        assert!(doc.contains("ratio (higher is better for ecsnet)"));
        assert!(doc.contains("host: 8 vCPU"));
    }

    #[test]
    fn long_labels_are_shortened() {
        let doc = svg(&sample());
        let long = "TCP 8 streams, task to internet through the uplink NAT path";
        let shortened = shorten(long, LABEL_CHARS);
        assert_eq!(shortened.chars().count(), LABEL_CHARS);
        assert!(shortened.ends_with('…'));
        assert!(doc.contains(&format!(">{shortened}<title>{long}</title></text>")));
        assert_eq!(shorten("short", 40), "short");
    }

    #[test]
    fn one_rect_per_finite_bar_and_per_series() {
        let doc = svg(&sample());
        // Finite, non-negative bars: 1.12, 0.87, 1.43, 0.98; three series in the legend.
        assert_eq!(doc.matches("<rect").count(), 4 + 3);
        // Three bars are not drawable: NaN, infinity and a negative value.
        assert_eq!(doc.matches(">n/a<").count(), 3);
        for value in ["1.12", "0.87", "1.43", "0.98"] {
            assert!(doc.contains(&format!(">{value}</text>")), "{value}");
        }
    }

    #[test]
    fn colours_follow_first_appearance() {
        let chart = sample();
        let series = series_order(&chart);
        assert_eq!(series, ["throughput", "CPU per byte", "latency p99"]);
        assert_eq!(colour(&series, "latency p99"), PALETTE[2]);
        let doc = svg(&chart);
        let legend_first = doc.find(&format!(r#"fill="{}"/>"#, PALETTE[0])).unwrap();
        let legend_second = doc.find(&format!(r#"fill="{}"/>"#, PALETTE[1])).unwrap();
        assert!(legend_first < legend_second);
    }

    #[test]
    fn references_are_drawn() {
        let mut chart = sample();
        chart.references.push((2.0, "2x <bridge>".to_string()));
        chart.references.push((f64::NAN, "never".to_string()));
        let doc = svg(&chart);
        assert!(doc.contains(">= bridge</text>"));
        assert!(doc.contains(">2x &lt;bridge&gt;</text>"));
        assert!(!doc.contains("never"));
        assert_eq!(doc.matches("stroke-dasharray").count(), 2);
        // The 2.0 reference stretches the axis to 2.0 (largest bar 1.43).
        assert!(doc.contains(">2.00</text>") || doc.contains(">2.0</text>"));
    }

    #[test]
    fn overlapping_reference_labels_get_their_own_rows() {
        let scale = Scale { max: 2.0 };
        let references = vec![
            (1.0, "= bridge".to_string()),
            (1.01, "= host".to_string()),
            (2.0, "2x".to_string()),
        ];
        let placed = place_references(&references, &scale);
        let rows: Vec<usize> = placed.iter().map(|r| r.row).collect();
        assert_eq!(rows, [0, 1, 0]);
    }

    #[test]
    fn nice_axis_rounds_up_to_a_step() {
        let cases = [
            (1.0, 1.0, 0.2),
            (0.9, 1.0, 0.2),
            (1.02, 1.2, 0.2),
            (1.3, 1.5, 0.25),
            (1.43, 1.5, 0.25),
            (2.3, 2.5, 0.5),
            (3.7, 4.0, 1.0),
            (0.8, 0.8, 0.2),
            (1.1, 1.2, 0.2),
            (12.0, 12.0, 2.0),
            (100.0, 100.0, 20.0),
            (0.0, 1.0, 0.25),
            (f64::NAN, 1.0, 0.25),
        ];
        for (largest, max, step) in cases {
            let (got_max, got_step) = nice_axis(largest);
            assert!(
                (got_max - max).abs() < 1e-9 && (got_step - step).abs() < 1e-12,
                "nice_axis({largest}) = ({got_max}, {got_step}), want ({max}, {step})"
            );
            if largest.is_finite() {
                assert!(got_max >= largest);
            }
        }
    }

    #[test]
    fn tick_labels_use_the_steps_decimals() {
        assert_eq!(decimals(0.25), 2);
        assert_eq!(decimals(0.5), 1);
        assert_eq!(decimals(0.2), 1);
        assert_eq!(decimals(2.0), 0);
        let doc = svg(&sample());
        // Largest value 1.43: axis 0 to 1.5 by 0.25.
        for tick in ["0.00", "0.25", "1.50"] {
            assert!(doc.contains(&format!(">{tick}</text>")), "{tick}");
        }
        assert!(!doc.contains(">1.75</text>"));
    }

    #[test]
    fn wraps_and_sizes() {
        assert_eq!(wrap("a bb ccc", 4), ["a bb", "ccc"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert!(wrap("", 10).is_empty());
        // More groups, taller chart.
        let mut chart = sample();
        let small = svg(&chart);
        chart.groups.extend(sample().groups);
        let big = svg(&chart);
        let height = |doc: &str| -> f64 {
            let start = doc.find("height=\"").unwrap() + 8;
            doc[start..].split('"').next().unwrap().parse().unwrap()
        };
        assert!(height(&big) > height(&small));
    }

    #[test]
    fn empty_chart_is_still_a_document() {
        let chart = Chart {
            title: String::new(),
            subtitle: String::new(),
            axis: String::new(),
            references: Vec::new(),
            groups: Vec::new(),
        };
        let doc = svg(&chart);
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<rect").count(), 0);
    }

    /// Writes the sample chart to the path in ECSNET_CHART_SAMPLE, to look at.
    #[test]
    fn write_sample_when_asked() {
        if let Some(path) = std::env::var_os("ECSNET_CHART_SAMPLE") {
            std::fs::write(path, svg(&sample())).unwrap();
        }
    }
}
