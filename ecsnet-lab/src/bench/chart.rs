//! The benchmark's chart, drawn with plotters' SVG backend: ratios as horizontal bars, a group
//! per metric and a colour per series. Pure: it returns the document and writes nothing.

use plotters::{
    coord::Shift,
    element::DashedPathElement,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

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
    /// Vertical reference lines drawn dashed across the plot, with labels, e.g. (1.0, "= bridge").
    pub references: Vec<(f64, String)>,
    pub groups: Vec<Group>,
}

/// Canvas width, px: the group labels take what they need, the plot the rest.
const WIDTH: u32 = 900;
const MARGIN: u32 = 16;
/// Right of the plot: room for the value of a bar that reaches the end of the axis.
const VALUE_ROOM: u32 = 72;
const BAR_HEIGHT: u32 = 16;
const BAR_GAP: u32 = 3;
/// Space above the first and below the last bar of a group.
const GROUP_PAD: u32 = 9;
/// Title, subtitle, legend and the reference labels above the plot.
const HEADER: u32 = 96;
/// Space under the plot for the tick labels and the axis label.
const AXIS_SPACE: u32 = 44;
/// The x axis ends this much past the largest value, so its bar's value fits beside it.
const HEADROOM: f64 = 1.08;

/// Text sizes in plotters' units: the SVG backend writes `size / 1.24` px.
const TITLE_SIZE: f64 = 22.0;
const TEXT_SIZE: f64 = 15.0;
const SMALL_SIZE: f64 = 13.5;
/// A generous estimate of one character's width at `TEXT_SIZE`, px (no font metrics in SVG).
const CHAR_WIDTH: u32 = 7;

/// Distinguishable colours that stay readable on white; reused in order past the tenth series.
const PALETTE: [RGBColor; 10] = [
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
const GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);
const LIGHT: RGBColor = RGBColor(0xe0, 0xe0, 0xe0);
/// Reference lines and their labels.
const REFERENCE: RGBColor = RGBColor(0x33, 0x33, 0x33);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// The chart as a standalone SVG document.
pub fn svg(chart: &Chart) -> String {
    let layout = Layout::of(chart);
    let mut out = String::new();
    {
        let root =
            SVGBackend::with_string(&mut out, (layout.width, layout.height)).into_drawing_area();
        draw(chart, &layout, &root)
            .and_then(|()| root.present())
            .expect("drawing into a String does not fail");
    }
    out
}

/// Where things go, px.
struct Layout {
    width: u32,
    height: u32,
    /// Left of the plot: the group labels, right-aligned.
    labels: u32,
    /// Height of the plot, and the top of each group in it (from the plot's top).
    plot: u32,
    tops: Vec<u32>,
}

impl Layout {
    fn of(chart: &Chart) -> Self {
        let longest = chart.groups.iter().map(|g| g.label.chars().count());
        let labels = 12 + CHAR_WIDTH * u32::try_from(longest.max().unwrap_or(0)).unwrap_or(0);
        let mut tops = Vec::new();
        let mut plot = 0;
        for group in &chart.groups {
            tops.push(plot);
            plot += group_height(group.bars.len());
        }
        let plot = plot.max(group_height(1));
        Layout {
            width: WIDTH,
            height: HEADER + plot + AXIS_SPACE + MARGIN,
            labels,
            plot,
            tops,
        }
    }
}

fn group_height(bars: usize) -> u32 {
    let bars = u32::try_from(bars.max(1)).unwrap_or(u32::MAX / BAR_HEIGHT);
    2 * GROUP_PAD + bars * BAR_HEIGHT + (bars - 1) * BAR_GAP
}

/// A value worth a bar: finite and not negative.
fn drawable(value: f64) -> Option<f64> {
    (value.is_finite() && value >= 0.0).then_some(value)
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

fn colour(series: &[&str], name: &str) -> RGBColor {
    let index = series.iter().position(|s| *s == name).unwrap_or(0);
    PALETTE[index % PALETTE.len()]
}

fn text(size: f64, colour: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    ("sans-serif", size)
        .into_font()
        .color(&colour)
        .pos(Pos::new(h, v))
}

fn px(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn draw(chart: &Chart, layout: &Layout, root: &Area) -> Drawn {
    root.fill(&WHITE)?;
    let series = series_order(chart);
    let (header, body) = root.split_vertically(HEADER);
    heading(chart, &series, &header)?;

    let values = chart.groups.iter().flat_map(|g| &g.bars).map(|b| b.value);
    let references = chart.references.iter().map(|(v, _)| *v);
    let largest = values
        .chain(references)
        .filter_map(drawable)
        .fold(0.0, f64::max);
    let max = if largest > 0.0 {
        largest * HEADROOM
    } else {
        1.0
    };
    // y runs up from the plot's bottom; the first group is drawn at the top.
    let plot = f64::from(layout.plot);
    let centre = |k: usize| {
        plot - f64::from(layout.tops[k]) - f64::from(group_height(chart.groups[k].bars.len())) / 2.0
    };
    let centres: Vec<f64> = (0..chart.groups.len()).map(centre).collect();
    let mut ctx = ChartBuilder::on(&body)
        .margin_left(MARGIN)
        .margin_right(VALUE_ROOM)
        .margin_bottom(MARGIN)
        .x_label_area_size(AXIS_SPACE)
        .y_label_area_size(layout.labels)
        .build_cartesian_2d(0.0..max, 0.0..plot)?;
    ctx.configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .max_light_lines(0)
        .bold_line_style(LIGHT)
        .axis_style(GREY)
        .x_labels(8)
        .x_desc(chart.axis.as_str())
        .label_style(("sans-serif", TEXT_SIZE))
        .axis_desc_style(("sans-serif", TEXT_SIZE))
        .draw()?;
    // The group labels, right-aligned left of the plot.
    let label = text(TEXT_SIZE, BLACK, HPos::Right, VPos::Center);
    for (group, y) in chart.groups.iter().zip(centres) {
        let (x, y) = ctx.backend_coord(&(0.0, y));
        root.draw(&Text::new(group.label.as_str(), (x - 8, y), label.clone()))?;
    }

    for (k, group) in chart.groups.iter().enumerate() {
        let top = plot - f64::from(layout.tops[k]);
        if k > 0 {
            ctx.draw_series([PathElement::new([(0.0, top), (max, top)], LIGHT)])?;
        }
        for (index, bar) in group.bars.iter().enumerate() {
            let offset = GROUP_PAD + u32::try_from(index).unwrap_or(0) * (BAR_HEIGHT + BAR_GAP);
            let y0 = top - f64::from(offset);
            let y1 = y0 - f64::from(BAR_HEIGHT);
            let fill = colour(&series, &bar.series);
            let mid = f64::midpoint(y0, y1);
            let small = text(SMALL_SIZE, BLACK, HPos::Left, VPos::Center);
            if let Some(value) = drawable(bar.value) {
                let label = format!("{value:.2}");
                ctx.draw_series([Rectangle::new([(0.0, y0), (value, y1)], fill.filled())])?;
                ctx.draw_series(
                    [EmptyElement::at((value, mid)) + Text::new(label, (4, 0), small)],
                )?;
            } else {
                // No bar: a thin mark in the series' colour says whose value is missing.
                let mark = fill.stroke_width(3);
                let missing = text(SMALL_SIZE, GREY, HPos::Left, VPos::Center);
                ctx.draw_series([PathElement::new([(0.0, y0), (0.0, y1)], mark)])?;
                ctx.draw_series(
                    [EmptyElement::at((0.0, mid)) + Text::new("n/a", (7, 0), missing)],
                )?;
            }
        }
    }

    let label = text(SMALL_SIZE, REFERENCE, HPos::Center, VPos::Bottom);
    for (value, name) in &chart.references {
        let Some(value) = drawable(*value) else {
            continue;
        };
        let line = DashedPathElement::new(
            [(value, plot), (value, 0.0)],
            5,
            3,
            REFERENCE.stroke_width(1),
        );
        ctx.draw_series([line])?;
        let (x, y) = ctx.backend_coord(&(value, plot));
        root.draw(&Text::new(name.as_str(), (x, y - 4), label.clone()))?;
    }
    Ok(())
}

/// Title, subtitle and legend: a swatch and a name per series, in rows that fit the width.
fn heading(chart: &Chart, series: &[&str], area: &Area) -> Drawn {
    let (width, _) = area.dim_in_pixel();
    let margin = px(MARGIN);
    let title = ("sans-serif", TITLE_SIZE, FontStyle::Bold)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Top));
    area.draw(&Text::new(chart.title.as_str(), (margin, margin), title))?;
    let subtitle = text(TEXT_SIZE, GREY, HPos::Left, VPos::Top);
    area.draw(&Text::new(
        chart.subtitle.as_str(),
        (margin, margin + 24),
        subtitle,
    ))?;
    let (mut x, mut y) = (margin, margin + 46);
    let name_style = text(TEXT_SIZE, BLACK, HPos::Left, VPos::Center);
    for name in series {
        let item = 18 + px(CHAR_WIDTH) * i32::try_from(name.chars().count()).unwrap_or(0);
        if x > margin && x + item > px(width) - margin {
            x = margin;
            y += 20;
        }
        let swatch = [(x, y), (x + 12, y + 12)];
        area.draw(&Rectangle::new(swatch, colour(series, name).filled()))?;
        area.draw(&Text::new(*name, (x + 18, y + 6), name_style.clone()))?;
        x += item + 20;
    }
    Ok(())
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

    /// The text of every `<text>` element, in order.
    fn texts(doc: &str) -> Vec<String> {
        doc.split("<text")
            .skip(1)
            .map(|t| {
                let body = &t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()];
                body.trim().to_owned()
            })
            .collect()
    }

    fn fill(c: RGBColor) -> String {
        format!(r##"fill="#{:02X}{:02X}{:02X}""##, c.0, c.1, c.2)
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
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == "TCP 1 stream, task to task"));
        assert!(
            texts
                .iter()
                .any(|t| t == "UDP &lt;&amp;&gt; &apos;quoted&apos; &quot;too&quot;")
        );
        assert!(!doc.contains("<&>"));
        for series in ["throughput", "CPU per byte", "latency p99"] {
            assert!(texts.iter().any(|t| t == series), "{series}");
        }
        assert!(
            texts
                .iter()
                .any(|t| t == "ratio (higher is better for ecsnet)")
        );
        assert!(doc.contains("host: 8 vCPU"));
    }

    #[test]
    fn long_labels_are_whole_and_fit() {
        let long = "TCP 8 streams, task to internet through the uplink NAT path";
        let doc = svg(&sample());
        assert!(texts(&doc).iter().any(|t| t == long));
        let layout = Layout::of(&sample());
        assert!(layout.labels >= CHAR_WIDTH * u32::try_from(long.len()).unwrap());
    }

    #[test]
    fn one_rect_per_finite_bar_and_per_series() {
        let doc = svg(&sample());
        let series_rects: usize = PALETTE[..3]
            .iter()
            .map(|c| {
                doc.lines()
                    .filter(|l| l.starts_with("<rect") && l.contains(&fill(*c)))
                    .count()
            })
            .sum();
        // Finite, non-negative bars: 1.12, 0.87, 1.43, 0.98; three series in the legend.
        assert_eq!(series_rects, 4 + 3, "{doc}");
        let texts = texts(&doc);
        // Three bars are not drawable: NaN, infinity and a negative value.
        assert_eq!(texts.iter().filter(|t| *t == "n/a").count(), 3);
        for value in ["1.12", "0.87", "1.43", "0.98"] {
            assert!(texts.iter().any(|t| t == value), "{value}");
        }
    }

    #[test]
    fn colours_follow_first_appearance() {
        let chart = sample();
        let series = series_order(&chart);
        assert_eq!(series, ["throughput", "CPU per byte", "latency p99"]);
        assert_eq!(colour(&series, "latency p99"), PALETTE[2]);
        let doc = svg(&chart);
        let legend_first = doc.find(&fill(PALETTE[0])).unwrap();
        let legend_second = doc.find(&fill(PALETTE[1])).unwrap();
        assert!(legend_first < legend_second);
    }

    #[test]
    fn references_are_drawn() {
        let mut chart = sample();
        chart.references.push((2.0, "2x <bridge>".to_string()));
        chart.references.push((f64::NAN, "never".to_string()));
        let doc = svg(&chart);
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == "= bridge"));
        assert!(texts.iter().any(|t| t == "2x &lt;bridge&gt;"));
        assert!(!doc.contains("never"));
        // Two dashed lines: many short segments in the reference colour, at two places.
        let dashes: Vec<&str> = doc
            .lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(r##"stroke="#333333""##))
            .collect();
        let places: std::collections::BTreeSet<&str> = dashes
            .iter()
            .filter_map(|l| l.split("points=\"").nth(1)?.split(',').next())
            .collect();
        assert_eq!(places.len(), 2, "{dashes:?}");
        assert!(dashes.len() > 2 * 10, "dashed, not solid: {dashes:?}");
        // The 2.0 reference stretches the axis past 2.0 (largest bar 1.43).
        assert!(texts.iter().any(|t| t == "2.0" || t == "2"), "{texts:?}");
    }

    #[test]
    fn more_groups_make_a_taller_chart() {
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
        assert!(!PALETTE.iter().any(|c| doc.contains(&fill(*c))));
    }

    /// Writes the sample chart to the path in `ECSNET_CHART_SAMPLE`, to look at.
    #[test]
    fn write_sample_when_asked() {
        if let Some(path) = std::env::var_os("ECSNET_CHART_SAMPLE") {
            std::fs::write(path, svg(&sample())).unwrap();
        }
    }
}
