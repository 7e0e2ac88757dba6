//! What a run reports: a row per metric with its medians and ratios, the targets
//! checked against them, the table `ecsnet bench` prints and the chart. Pure.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    chart, median,
    plan::{BenchPath, Family, Metric, Mode},
};
use crate::progcost::{self, ProgramCost};

/// Samples as they come: (metric, path, family, scale, flow logs) -> per mode, values in raw
/// units.
pub(super) type Key = (Metric, BenchPath, Family, Option<usize>, Option<bool>);

/// Medians of one metric on one path (or at one scale) in every mode measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub metric: Metric,
    pub label: String,
    pub unit: &'static str,
    pub path: BenchPath,
    /// IPv4 or IPv6; ratios are against the other modes in the same family.
    pub family: Family,
    /// The extra published ports and rules of a scaling row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<usize>,
    /// Flow logging of a flow-log row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_logs: Option<bool>,
    pub higher_is_better: bool,
    /// Median per mode, in `unit`.
    pub median: BTreeMap<Mode, f64>,
    /// Every round's sample per mode, in `unit`.
    pub samples: BTreeMap<Mode, Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecsnet_vs_bridge: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecsnet_vs_ceiling: Option<f64>,
}

/// A target of the benchmark issue, checked against this run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub what: String,
    /// "<= 0.75", ">= 1.05" ...
    pub want: String,
    pub got: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub rounds: usize,
    pub seconds: u64,
    pub quick: bool,
    /// TCP congestion control of the labs.
    pub congestion: String,
    /// Address families measured (`--family`).
    pub families: Vec<Family>,
    pub kernel: String,
    pub cpus: usize,
    pub rows: Vec<Row>,
    pub programs: Vec<ProgramCost>,
    pub targets: Vec<Target>,
    /// Failed connection attempts of the new-connection runs, per mode (should be 0).
    pub conn_failures: BTreeMap<Mode, u64>,
    pub wall_seconds: f64,
}

/// The rows of a run's samples, each with its medians and ratios.
pub(super) fn rows(values: &BTreeMap<Key, BTreeMap<Mode, Vec<f64>>>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (&(metric, path, family, scale, flow_logs), by_mode) in values {
        let samples: BTreeMap<Mode, Vec<f64>> = by_mode
            .iter()
            .map(|(m, v)| (*m, v.iter().map(|x| metric.scale(*x)).collect()))
            .collect();
        let med: BTreeMap<Mode, f64> = samples.iter().map(|(m, v)| (*m, median(v))).collect();
        let ratio = |other: Mode| {
            let (e, o) = (med.get(&Mode::Ecsnet)?, med.get(&other)?);
            (*o > 0.0).then(|| e / o)
        };
        let mut label = format!("{}, {}", metric.name(), path.name());
        if let Some(n) = scale {
            label = format!("{}, {n} ports and rules", metric.name());
        }
        if let Some(on) = flow_logs {
            label = format!(
                "{}, {}, flow logs {}",
                metric.name(),
                path.name(),
                if on { "on" } else { "off" }
            );
        }
        if family == Family::Ipv6 {
            label.push_str(", IPv6");
        }
        rows.push(Row {
            metric,
            label,
            unit: metric.unit(),
            path,
            family,
            scale,
            flow_logs,
            higher_is_better: metric.higher_is_better(),
            ecsnet_vs_bridge: ratio(Mode::Bridge),
            ecsnet_vs_ceiling: ratio(Mode::Ceiling),
            median: med,
            samples,
        });
    }
    // Main rows first (by path, then metric, the IPv6 row under the IPv4 one), then scaling,
    // then flow logs.
    rows.sort_by_key(|r| {
        (
            u8::from(r.scale.is_some()) + 2 * u8::from(r.flow_logs.is_some()),
            r.path,
            r.scale,
            r.metric,
            r.family,
            r.flow_logs,
        )
    });
    rows
}

/// The IPv4 row of `metric` on `path` (at `scale`): the targets are IPv4's.
fn find(rows: &[Row], metric: Metric, path: BenchPath, scale: Option<usize>) -> Option<&Row> {
    rows.iter().find(|r| {
        r.metric == metric
            && r.path == path
            && r.family == Family::Ipv4
            && r.scale == scale
            && r.flow_logs.is_none()
    })
}

/// The benchmark issue's targets (IPv4's), as this run measured them.
pub(super) fn targets(rows: &[Row]) -> Vec<Target> {
    let mut out = Vec::new();
    let mut check = |what: String, got: Option<f64>, at_most: bool, bound: f64| {
        let Some(got) = got.filter(|g| g.is_finite()) else {
            return;
        };
        let met = if at_most { got <= bound } else { got >= bound };
        let want = format!("{} {bound:.2}", if at_most { "<=" } else { ">=" });
        out.push(Target {
            what,
            want,
            got,
            met,
        });
    };
    for path in [BenchPath::TaskToTask, BenchPath::Published] {
        let r = |m| find(rows, m, path, None).and_then(|r| r.ecsnet_vs_bridge);
        let p = path.name();
        check(
            format!("latency p50 ecsnet/bridge, {p}"),
            r(Metric::RrP50),
            true,
            0.75,
        );
        check(
            format!("latency p99 ecsnet/bridge, {p}"),
            r(Metric::RrP99),
            true,
            0.85,
        );
    }
    for path in BenchPath::ALL {
        let p = path.name();
        let row = |m| find(rows, m, path, None);
        check(
            format!("TCP 1 stream ecsnet/bridge, {p}"),
            row(Metric::Tcp1).and_then(|r| r.ecsnet_vs_bridge),
            false,
            1.05,
        );
        check(
            format!("TCP 4 streams ecsnet/bridge, {p}"),
            row(Metric::Tcp4).and_then(|r| r.ecsnet_vs_bridge),
            false,
            1.10,
        );
        for m in [Metric::Tcp1, Metric::Tcp4] {
            check(
                format!("{} ecsnet/ceiling, {p}", m.name()),
                row(m).and_then(|r| r.ecsnet_vs_ceiling),
                false,
                0.95,
            );
        }
    }
    check(
        "new connections/s ecsnet/bridge, published port".to_owned(),
        find(rows, Metric::ConnRate, BenchPath::Published, None).and_then(|r| r.ecsnet_vs_bridge),
        false,
        1.3,
    );
    let scales: Vec<usize> = rows.iter().filter_map(|r| r.scale).collect();
    if let (Some(lo), Some(hi)) = (scales.iter().min(), scales.iter().max())
        && lo != hi
    {
        let p50 = |n, mode| {
            find(rows, Metric::RrP50, BenchPath::Published, Some(n))
                .and_then(|r| r.median.get(&mode).copied())
        };
        if let (Some(a), Some(b)) = (p50(*lo, Mode::Ecsnet), p50(*hi, Mode::Ecsnet)) {
            check(
                format!("ecsnet latency p50 growth, {hi} vs {lo} ports and rules"),
                Some(b / a),
                true,
                1.05,
            );
        }
    }
    for path in [BenchPath::TaskToTask, BenchPath::Published] {
        let m = |on| {
            rows.iter()
                .find(|r| r.flow_logs == Some(on) && r.path == path)
                .and_then(|r| r.median.get(&Mode::Ecsnet).copied())
        };
        if let (Some(on), Some(off)) = (m(true), m(false)) {
            check(
                format!("TCP 1 stream flow logs on/off, {}", path.name()),
                Some(on / off),
                false,
                0.97,
            );
        }
    }
    out
}

fn fmt_value(v: Option<&f64>) -> String {
    match v {
        Some(v) if v.is_finite() && *v >= 100.0 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "-".to_owned(),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite())
        .map_or("-".to_owned(), |v| format!("{v:.3}"))
}

/// The table `ecsnet bench` prints.
pub fn render(r: &BenchReport) -> String {
    let mut out = format!(
        "ecsnet bench{}: {} round(s) of {} s per tool run, medians; {}; TCP {}; kernel {}, {} CPUs, {:.0} s\n\n",
        if r.quick {
            " --quick (proves the benchmark runs; too short to judge speed)"
        } else {
            ""
        },
        r.rounds,
        r.seconds,
        families(&r.families),
        r.congestion,
        r.kernel,
        r.cpus,
        r.wall_seconds
    );
    table_line(
        &mut out,
        [
            "METRIC", "UNIT", "BRIDGE", "ECSNET", "CEILING", "E/BR", "E/CEIL",
        ],
    );
    for row in &r.rows {
        let values = Mode::ALL.map(|mode| fmt_value(row.median.get(&mode)));
        let ratios = [row.ecsnet_vs_bridge, row.ecsnet_vs_ceiling].map(fmt_ratio);
        let [bridge, ecsnet, ceiling] = values.each_ref().map(String::as_str);
        let [vs_bridge, vs_ceiling] = ratios.each_ref().map(String::as_str);
        let cells = [
            &row.label, row.unit, bridge, ecsnet, ceiling, vs_bridge, vs_ceiling,
        ];
        table_line(&mut out, cells);
    }
    if r.conn_failures.values().any(|&n| n > 0) {
        let _ = writeln!(out, "failed connection attempts: {:?}", r.conn_failures);
    }
    out.push('\n');
    out.push_str(&progcost::render_programs(&r.programs));
    out.push_str("\nTARGETS (from the benchmark issue)\n");
    for t in &r.targets {
        let verdict = if t.met { "met" } else { "MISSED" };
        let _ = writeln!(
            out,
            "{:<62} {:>8} {:>8.3}  {verdict}",
            t.what, t.want, t.got
        );
    }
    out
}

/// "IPv4 and IPv6", "IPv6 only" ...
fn families(f: &[Family]) -> &'static str {
    match f {
        [Family::Ipv4] => "IPv4 only",
        [Family::Ipv6] => "IPv6 only (the labs dual stack)",
        _ => "IPv4 and IPv6 (the labs dual stack, IPv6 ratios against IPv6)",
    }
}

/// A line of the table: the metric, its unit, the three modes' medians and the two ratios.
fn table_line(out: &mut String, cells: [&str; 7]) {
    let [metric, unit, bridge, ecsnet, ceiling, vs_bridge, vs_ceiling] = cells;
    let _ = writeln!(
        out,
        "{metric:<62} {unit:>7} {bridge:>9} {ecsnet:>9} {ceiling:>9} {vs_bridge:>8} {vs_ceiling:>8}"
    );
}

/// The chart: ecsnet/bridge and ecsnet/ceiling for every main and scaling row, oriented so
/// that more is better for ecsnet (latency ratios are inverted: bridge/ecsnet).
pub fn svg(r: &BenchReport) -> String {
    let flip = |row: &Row, v: Option<f64>| -> f64 {
        match v {
            Some(v) if row.higher_is_better => v,
            Some(v) if v > 0.0 => 1.0 / v,
            _ => f64::NAN,
        }
    };
    let groups = r
        .rows
        .iter()
        .filter(|row| row.flow_logs.is_none())
        .filter(|row| !matches!(row.metric, Metric::RrP90 | Metric::RrP999))
        .map(|row| {
            let mut bars = vec![chart::Bar {
                series: "vs bridge".to_owned(),
                value: flip(row, row.ecsnet_vs_bridge),
            }];
            if row.median.contains_key(&Mode::Ceiling) {
                bars.push(chart::Bar {
                    series: "vs ceiling".to_owned(),
                    value: flip(row, row.ecsnet_vs_ceiling),
                });
            }
            chart::Group {
                label: row.label.clone(),
                bars,
            }
        })
        .collect();
    chart::svg(&chart::Chart {
        title: "ecsnet against Docker bridge mode and the machine's ceiling".to_owned(),
        subtitle: format!(
            "ecsnet bench{}, {} rounds x {} s, medians; kernel {}, {} CPUs",
            if r.quick { " --quick" } else { "" },
            r.rounds,
            r.seconds,
            r.kernel,
            r.cpus
        ),
        axis: "ratio, higher is better for ecsnet (latency: bridge/ecsnet, ceiling/ecsnet)"
            .to_owned(),
        references: vec![(1.0, "= the other mode".to_owned())],
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples of TCP 1 stream task to task in both families: bridge 10 and 20 Gbit/s for
    /// IPv4, 5 for IPv6.
    fn both_families() -> BTreeMap<Key, BTreeMap<Mode, Vec<f64>>> {
        let key = |family| (Metric::Tcp1, BenchPath::TaskToTask, family, None, None);
        let by_mode = |bridge: f64, ecsnet: f64, ceiling: f64| {
            BTreeMap::from([
                (Mode::Bridge, vec![bridge * 1e9]),
                (Mode::Ecsnet, vec![ecsnet * 1e9]),
                (Mode::Ceiling, vec![ceiling * 1e9]),
            ])
        };
        BTreeMap::from([
            (key(Family::Ipv6), by_mode(5.0, 10.0, 20.0)),
            (key(Family::Ipv4), by_mode(20.0, 10.0, 40.0)),
        ])
    }

    #[test]
    #[expect(clippy::float_cmp, reason = "ratios of exact small binary fractions")]
    fn ipv6_rows_sit_under_ipv4_with_their_own_ratios() {
        let rows = rows(&both_families());
        let got: Vec<(Family, &str)> = rows.iter().map(|r| (r.family, r.label.as_str())).collect();
        assert_eq!(
            got,
            [
                (Family::Ipv4, "TCP 1 stream, task to task"),
                (Family::Ipv6, "TCP 1 stream, task to task, IPv6"),
            ]
        );
        assert_eq!(rows[0].ecsnet_vs_bridge, Some(0.5));
        assert_eq!(rows[0].ecsnet_vs_ceiling, Some(0.25));
        assert_eq!(rows[1].ecsnet_vs_bridge, Some(2.0), "against IPv6 bridge");
        assert_eq!(rows[1].ecsnet_vs_ceiling, Some(0.5), "against IPv6 ceiling");
        let json = serde_json::to_value(&rows[1]).unwrap();
        assert_eq!(json["family"], "ipv6");

        // The targets read IPv4's row only.
        let t = targets(&rows);
        let tcp = t
            .iter()
            .find(|t| t.what == "TCP 1 stream ecsnet/bridge, task to task")
            .expect("the IPv4 target");
        assert_eq!(tcp.got, 0.5);
        assert!(t.iter().all(|t| !t.what.contains("IPv6")));
    }
}
