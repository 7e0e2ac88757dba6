//! What one benchmark run measures, and in which order: the modes, paths and metrics, and the
//! plan of steps made up front (so the progress line knows the total). Pure.

use serde::Serialize;

use super::BenchOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bridge,
    Ecsnet,
    Ceiling,
}

impl Mode {
    pub(super) const ALL: [Mode; 3] = [Mode::Bridge, Mode::Ecsnet, Mode::Ceiling];

    pub(super) fn name(self) -> &'static str {
        match self {
            Mode::Bridge => "bridge",
            Mode::Ecsnet => "ecsnet",
            Mode::Ceiling => "ceiling",
        }
    }
}

/// The address family a step measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// Which families a run measures (`--family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Families {
    Ipv4,
    Ipv6,
    Both,
}

impl Families {
    pub(super) fn list(self) -> &'static [Family] {
        match self {
            Families::Ipv4 => &[Family::Ipv4],
            Families::Ipv6 => &[Family::Ipv6],
            Families::Both => &[Family::Ipv4, Family::Ipv6],
        }
    }

    pub(super) fn has(self, f: Family) -> bool {
        self.list().contains(&f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPath {
    TaskToTask,
    Published,
    Outside,
}

impl BenchPath {
    pub(super) const ALL: [BenchPath; 3] = [
        BenchPath::TaskToTask,
        BenchPath::Published,
        BenchPath::Outside,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            BenchPath::TaskToTask => "task to task",
            BenchPath::Published => "client to published port",
            BenchPath::Outside => "task to outside",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    Tcp1,
    Tcp4,
    UdpSmall,
    RrP50,
    RrP90,
    RrP99,
    RrP999,
    ConnRate,
}

impl Metric {
    pub(super) fn name(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::UdpSmall => "UDP 64 B datagrams",
            Metric::RrP50 => "request/response p50",
            Metric::RrP90 => "request/response p90",
            Metric::RrP99 => "request/response p99",
            Metric::RrP999 => "request/response p99.9",
            Metric::ConnRate => "new connections",
        }
    }

    pub(super) fn unit(self) -> &'static str {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => "Gbit/s",
            Metric::UdpSmall => "kpkt/s",
            Metric::RrP50 | Metric::RrP90 | Metric::RrP99 | Metric::RrP999 => "us",
            Metric::ConnRate => "conn/s",
        }
    }

    /// Whether more is better (throughput) or less (latency).
    pub(super) fn higher_is_better(self) -> bool {
        !matches!(
            self,
            Metric::RrP50 | Metric::RrP90 | Metric::RrP99 | Metric::RrP999
        )
    }

    /// A raw sample in the unit shown.
    pub(super) fn scale(self, raw: f64) -> f64 {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => raw / 1e9,
            // Datagrams to thousands of them; nanoseconds to microseconds.
            Metric::UdpSmall | Metric::RrP50 | Metric::RrP90 | Metric::RrP99 | Metric::RrP999 => {
                raw / 1e3
            }
            Metric::ConnRate => raw,
        }
    }
}

/// What one step runs (one tool run, one or more samples).
#[derive(Debug, Clone, Copy)]
pub(super) enum Probe {
    Tcp(u32),
    Udp,
    Rr,
    Crr,
}

impl Probe {
    pub(super) fn name(self) -> &'static str {
        match self {
            Probe::Tcp(1) => "TCP 1 stream",
            Probe::Tcp(_) => "TCP 4 streams",
            Probe::Udp => "UDP 64 B",
            Probe::Rr => "request/response",
            Probe::Crr => "new connections",
        }
    }
}

/// The phases of a run, each with its own steps.
#[derive(Debug, Clone, Copy)]
pub(super) enum Phase {
    /// The three modes on the three paths, in one family.
    Main {
        family: Family,
        path: BenchPath,
        probe: Probe,
    },
    /// `n` more published ports and rules, bridge and ecsnet, through the published port.
    Scale { n: usize, probe: Probe },
    /// Flow logging on or off in the ecsnet lab, TCP 1 stream.
    FlowLogs { path: BenchPath, on: bool },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    pub(super) round: usize,
    pub(super) phase: Phase,
    pub(super) mode: Mode,
}

/// The probes of the main phase on `path` in `family`. IPv6 leaves out TCP with 4 streams and
/// new connections, so that a run of both families takes at most 1.5 times one of IPv4 alone:
/// 4 streams is the noisiest row on this VM (docs/BENCHMARKS.md, "TCP throughput on this VM")
/// and 1 stream measures the same path; new connections are IPv4's scaling metric, and the
/// request/response round trips cross the same translation on every packet.
pub(super) fn probes(family: Family, path: BenchPath) -> Vec<Probe> {
    match family {
        Family::Ipv4 if path == BenchPath::Published => vec![
            Probe::Tcp(1),
            Probe::Tcp(4),
            Probe::Udp,
            Probe::Rr,
            Probe::Crr,
        ],
        Family::Ipv4 => vec![Probe::Tcp(1), Probe::Tcp(4), Probe::Udp, Probe::Rr],
        Family::Ipv6 => vec![Probe::Tcp(1), Probe::Udp, Probe::Rr],
    }
}

/// The steps of a run, in order: each round measures every metric in every mode before the
/// next metric, and the mode that goes first rotates from round to round. On each path the
/// IPv6 metrics follow the IPv4 ones. The scaling and flow-log phases are IPv4's only.
pub(super) fn plan(o: &BenchOptions) -> Vec<Step> {
    let mut steps = Vec::new();
    let rotate = |modes: &[Mode], round: usize| -> Vec<Mode> {
        let k = round % modes.len();
        modes[k..].iter().chain(&modes[..k]).copied().collect()
    };
    for round in 0..o.rounds {
        for path in BenchPath::ALL {
            for &family in o.families.list() {
                for probe in probes(family, path) {
                    for mode in rotate(&Mode::ALL, round) {
                        steps.push(Step {
                            round,
                            phase: Phase::Main {
                                family,
                                path,
                                probe,
                            },
                            mode,
                        });
                    }
                }
            }
        }
    }
    if !o.families.has(Family::Ipv4) {
        return steps;
    }
    for round in 0..o.rounds {
        for &n in &o.scale {
            for probe in [Probe::Rr, Probe::Crr] {
                for mode in rotate(&[Mode::Bridge, Mode::Ecsnet], round) {
                    steps.push(Step {
                        round,
                        phase: Phase::Scale { n, probe },
                        mode,
                    });
                }
            }
        }
    }
    for round in 0..o.rounds {
        for path in [BenchPath::TaskToTask, BenchPath::Published] {
            for on in on_off(round) {
                steps.push(Step {
                    round,
                    phase: Phase::FlowLogs { path, on },
                    mode: Mode::Ecsnet,
                });
            }
        }
    }
    steps
}

/// Flow logging off then on in even rounds, on then off in odd ones.
pub(super) fn on_off(round: usize) -> [bool; 2] {
    if round.is_multiple_of(2) {
        [false, true]
    } else {
        [true, false]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_interleaves_modes_and_covers_every_metric() {
        let o = BenchOptions {
            rounds: 2,
            families: Families::Ipv4,
            ..BenchOptions::quick()
        };
        let steps = plan(&o);
        // Per round: 3 paths x 4 probes x 3 modes + crr x 3 modes; scaling 2 x 2 x 2; flow
        // logs 2 paths x 2.
        let ipv4 = 3 * 4 * 3 + 3 + 2 * 2 * 2 + 2 * 2;
        assert_eq!(steps.len(), 2 * ipv4);
        let first: Vec<Mode> = steps[..3].iter().map(|s| s.mode).collect();
        assert_eq!(first, [Mode::Bridge, Mode::Ecsnet, Mode::Ceiling]);
        let second_round = steps.iter().find(|s| s.round == 1).unwrap();
        assert_eq!(second_round.mode, Mode::Ecsnet, "the first mode rotates");

        // IPv6: 3 paths x 3 probes x 3 modes more, after IPv4 on each path.
        let ipv6 = 3 * 3 * 3;
        let both = plan(&BenchOptions {
            families: Families::Both,
            ..o.clone()
        });
        assert_eq!(both.len(), 2 * (ipv4 + ipv6));
        let main: Vec<(Family, BenchPath)> = both
            .iter()
            .filter_map(|s| match s.phase {
                Phase::Main { family, path, .. } if s.round == 0 => Some((family, path)),
                _ => None,
            })
            .collect();
        let mut runs = main.clone();
        runs.dedup();
        assert_eq!(runs.len(), 6, "each path: IPv4 then IPv6: {runs:?}");
        assert_eq!(runs[0], (Family::Ipv4, BenchPath::TaskToTask));
        assert_eq!(runs[1], (Family::Ipv6, BenchPath::TaskToTask));
        // IPv6 alone: its main steps only.
        let only = plan(&BenchOptions {
            families: Families::Ipv6,
            ..o
        });
        assert_eq!(only.len(), 2 * ipv6);
        assert!(only.iter().all(|s| matches!(
            s.phase,
            Phase::Main {
                family: Family::Ipv6,
                ..
            }
        )));
    }

    /// The default run of both families stays within 1.5 times the steps of IPv4 alone.
    #[test]
    #[expect(
        clippy::cast_precision_loss,
        reason = "step counts are small whole numbers"
    )]
    fn both_families_cost_at_most_half_again() {
        let steps = |families| {
            plan(&BenchOptions {
                families,
                ..BenchOptions::full()
            })
            .len() as f64
        };
        assert!(steps(Families::Both) <= 1.5 * steps(Families::Ipv4));
    }
}
