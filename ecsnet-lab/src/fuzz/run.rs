//! The fuzz run: one private datapath (both ingress programs and the tail-called one loaded
//! once), for each episode its maps cleared and seeded, its frames run with
//! `BPF_PROG_TEST_RUN` and through the model, and every verdict, output frame and map compared.
//! It runs on a thread of its own in a network namespace of its own (no routes, so no FIB
//! lookup finds an uplink), which goes away with the thread.

use std::{
    collections::HashMap as StdHashMap,
    fmt::Write as _,
    hash::Hash,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader, Pod,
    maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
};
use ecsnet::{
    plan::sg::Compiled,
    state::{
        self, DefaultPolicy, GroupPair, IpPermission, IpRange, SecurityGroup, State as StateFile,
        Task,
    },
};
use ecsnet_common::{
    ct::{CtEntry, CtKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    maps::{
        Counters, DropKey, FragKey, FragKey6, FragPorts, IfaceInfo, MAP_CONFIG, MAP_CT,
        MAP_CT_EVENTS, MAP_CT_NEW, MAP_DROPS, MAP_FRAGS, MAP_FRAGS6, MAP_IFACES, MAP_LOCAL_ADDRS,
        MAP_PORTS, MAP_STATS, MAP_TASKS, PortKey, PortTarget, StatsKey, TaskInfo,
    },
    policy::{MAP_SG_PEERS, MAP_SG_RULES, PeerKey, PeerRules, RuleKey},
};

use super::{
    r#gen::{self, Episode, Rng},
    model::{self, Entry, Hook, OutOfModel, Sg, SgRule, Stamp, State, Traffic},
};
use crate::fixture::{
    conntrack::{Table, show_entry, show_key},
    datapath::{Datapath, DatapathError, coarse_ns, now_ns},
    packet::{compare_frames, verify_checksums},
    world::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, show_addr},
};

/// The programs a fuzz run loads.
const PROGRAMS: [&str; 4] = [
    "tc_uplink_ingress",
    "tc_task_ingress",
    "tc_task_egress",
    "xdp_uplink",
];

/// The policy maps' entries for `sg`: the same rules the model reads, written as the security
/// groups of a state file and compiled by `ecsnet apply`'s own validation and compiler.
pub fn compile(sg: &Sg) -> Compiled {
    let id = |g: usize| format!("sg-{g}");
    let perm = |r: &SgRule| {
        let ports = |lo: u16, hi: u16| Some((i32::from(lo), i32::from(hi)));
        let (proto, ports) = match r.traffic {
            Traffic::All => ("-1".to_owned(), None),
            Traffic::Tcp(lo, hi) => ("tcp".to_owned(), ports(lo, hi)),
            Traffic::Udp(lo, hi) => ("udp".to_owned(), ports(lo, hi)),
            Traffic::IcmpAll => ("icmp".to_owned(), Some((-1, -1))),
            Traffic::IcmpType(t) => ("icmp".to_owned(), Some((i32::from(t), -1))),
            Traffic::IcmpCode(t, c) => ("icmp".to_owned(), Some((i32::from(t), i32::from(c)))),
            Traffic::Other(p) => (p.to_string(), None),
        };
        let mut p = IpPermission::from_cidr(&proto, ports, "0.0.0.0/0");
        p.ip_ranges = r
            .cidrs
            .iter()
            .map(|&(a, len)| IpRange {
                cidr_ip: format!("{}/{len}", Ipv4Addr::from(a)),
                description: None,
            })
            .collect();
        p.user_id_group_pairs = r
            .groups
            .iter()
            .map(|&g| GroupPair { group_id: id(g) })
            .collect();
        p
    };
    let mut host = state::Host::default();
    if sg.default_deny {
        host.default_policy = DefaultPolicy::Deny;
    }
    let mut tasks: Vec<Task> = sg
        .members
        .iter()
        .map(|(a, groups)| Task {
            security_groups: groups.iter().map(|&g| id(g)).collect(),
            ..Task::new(format!("task-{}", a[3]), Ipv4Addr::from(*a))
        })
        .collect();
    tasks.sort_by_key(|t| t.ipv4_address);
    let state = StateFile {
        host,
        security_groups: sg
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| SecurityGroup {
                group_id: id(i),
                group_name: None,
                ip_permissions: g.inbound.iter().map(perm).collect(),
                ip_permissions_egress: g.outbound.iter().map(perm).collect(),
            })
            .collect(),
        tasks,
    };
    let rules = state::validate(&state, state::BridgeNet::default())
        .unwrap_or_else(|e| panic!("the generator's security groups are valid: {e}"));
    Compiled::new(&rules, 0).expect("a handful of rules fits")
}

/// What the datapath's maps hold after an episode, in the model's terms.
#[derive(Debug, PartialEq)]
struct Maps {
    ct: StdHashMap<CtKey, (Table, CtEntry)>,
    frags: StdHashMap<FragKey, FragPorts>,
    frags6: StdHashMap<FragKey6, FragPorts>,
    drops: StdHashMap<DropKey, u64>,
    stats: StdHashMap<StatsKey, (u64, u64)>,
    tasks: StdHashMap<u32, TaskInfo>,
    ct_events: [u64; 3],
}

/// What one frame did: the datapath's answer and the model's.
struct Step {
    input: Vec<u8>,
    got: (u32, Vec<u8>),
    want: Result<model::Expect, OutOfModel>,
}

/// A fuzz run's private datapath.
pub struct Fuzzer {
    dp: Datapath,
}

/// Totals of a run.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub packets: u64,
    pub episodes: u64,
    pub disagreements: u64,
    /// Frames the model does not answer for, by reason.
    pub out_of_model: StdHashMap<String, u64>,
    /// Compared frames by the verdict the datapath gave (pass, redirect, drop reason).
    pub verdicts: StdHashMap<String, u64>,
    /// The first few disagreements, each one readable report.
    pub reports: Vec<String>,
    pub elapsed: Duration,
}

/// Entries of each hash map of a fuzz run's datapath.
const SMALL_MAPS: u32 = 512;

/// Reports kept in full; the rest are counted.
const MAX_REPORTS: usize = 5;

impl Fuzzer {
    pub fn new() -> Result<Fuzzer, DatapathError> {
        // Small maps: an episode holds a handful of entries, and clearing or reading a hash map
        // walks all its buckets.
        let mut loader = EbpfLoader::new();
        for name in [
            MAP_TASKS,
            MAP_PORTS,
            MAP_LOCAL_ADDRS,
            MAP_IFACES,
            MAP_CT,
            MAP_STATS,
            MAP_DROPS,
        ] {
            loader.map_max_entries(name, SMALL_MAPS);
        }
        // An LRU map's free nodes sit partly in per-CPU lists (up to 128 each) that other CPUs
        // cannot take from: with fewer entries than those lists can hold, an insert could evict
        // on a machine with many CPUs while the map is nearly empty.
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| DatapathError::Map(MAP_CT_NEW, e.into()))?
            .get();
        for name in [MAP_CT_NEW, MAP_FRAGS, MAP_FRAGS6] {
            loader.map_max_entries(name, SMALL_MAPS + 2 * 128 * cpus);
        }
        // The policy maps hold what the compiler makes of up to three random groups: a port
        // range can take dozens of blocks, in every rule set that holds it.
        loader.map_max_entries(MAP_SG_PEERS, 8192);
        loader.map_max_entries(MAP_SG_RULES, 32_768);
        let mut dp = Datapath::load_with(&mut loader)?;
        dp.set_first(MAP_CONFIG, crate::fixture::world::config(1))?;
        dp.load_programs(&PROGRAMS)?;
        dp.load_tail_called()?;
        Ok(Fuzzer { dp })
    }

    /// Every entry of the hash map `name` removed.
    fn clear<K: Pod, V: Pod>(&mut self, name: &'static str) -> Result<(), DatapathError> {
        let failed = |e| DatapathError::Map(name, e);
        let map = self.dp.ebpf.map(name).expect("the datapath has the map");
        let keys: Vec<K> = if matches!(map, Map::PerCpuHashMap(_)) {
            PerCpuHashMap::<_, K, V>::try_from(map)
                .map_err(failed)?
                .keys()
                .collect::<Result<_, _>>()
        } else {
            HashMap::<_, K, V>::try_from(map)
                .map_err(failed)?
                .keys()
                .collect::<Result<_, _>>()
        }
        .map_err(failed)?;
        self.dp.remove::<K, V>(name, &keys)
    }

    /// The maps as a fresh host has them, then `ep`'s seeds.
    fn reset(&mut self, ep: &Episode) -> Result<(), DatapathError> {
        self.clear::<u32, TaskInfo>(MAP_TASKS)?;
        self.clear::<PortKey, PortTarget>(MAP_PORTS)?;
        self.clear::<u32, u32>(MAP_LOCAL_ADDRS)?;
        self.clear::<u32, IfaceInfo>(MAP_IFACES)?;
        for t in Table::BOTH {
            self.clear::<CtKey, CtEntry>(t.map())?;
        }
        self.clear::<FragKey, FragPorts>(MAP_FRAGS)?;
        self.clear::<FragKey6, FragPorts>(MAP_FRAGS6)?;
        self.clear::<PeerKey, PeerRules>(MAP_SG_PEERS)?;
        self.clear::<RuleKey, u32>(MAP_SG_RULES)?;
        self.clear::<StatsKey, Counters>(MAP_STATS)?;
        self.clear::<DropKey, u64>(MAP_DROPS)?;
        let failed = |e| DatapathError::Map(MAP_CT_EVENTS, e);
        let map = self
            .dp
            .ebpf
            .map_mut(MAP_CT_EVENTS)
            .expect("the datapath has CT_EVENTS");
        let mut ev = PerCpuArray::<&mut MapData, u64>::try_from(map).map_err(failed)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| failed(e.into()))?;
        for slot in 0..3 {
            let zeros = PerCpuValues::try_from(vec![
                0u64;
                usize::try_from(cpus.get())
                    .expect("a CPU count fits")
            ])
            .map_err(|e| failed(e.into()))?;
            ev.set(slot, zeros, 0).map_err(failed)?;
        }
        self.dp.set_first(MAP_CONFIG, ep.config)?;
        self.dp.seed(&ep.seeds)
    }

    fn maps(&self) -> Result<Maps, DatapathError> {
        let mut ct = StdHashMap::new();
        for t in Table::BOTH {
            for (k, e) in self.dp.hash::<CtKey, CtEntry>(t.map())? {
                ct.insert(k, (t, e));
            }
        }
        let map = self
            .dp
            .ebpf
            .map(MAP_CT_EVENTS)
            .expect("the datapath has CT_EVENTS");
        let failed = |e| DatapathError::Map(MAP_CT_EVENTS, e);
        let ev = PerCpuArray::<&MapData, u64>::try_from(map).map_err(failed)?;
        let mut ct_events = [0; 3];
        for (slot, n) in ct_events.iter_mut().enumerate() {
            let slot = u32::try_from(slot).expect("three slots");
            *n = ev.get(&slot, 0).map_err(failed)?.iter().sum();
        }
        Ok(Maps {
            ct,
            frags: self.dp.hash(MAP_FRAGS)?,
            frags6: self.dp.hash(MAP_FRAGS6)?,
            drops: self.dp.drops()?,
            stats: self.dp.counters(MAP_STATS)?,
            tasks: self.dp.hash(MAP_TASKS)?,
            ct_events,
        })
    }

    /// The source port the datapath gave the flow `key` (its original entry's), if any.
    fn chosen_port(&self, key: &CtKey) -> Option<u16> {
        Table::BOTH.iter().find_map(|t| {
            let m: HashMap<&MapData, CtKey, CtEntry> =
                HashMap::try_from(self.dp.ebpf.map(t.map())?).ok()?;
            m.get(key, 0).ok().map(|e| u16::from_be(e.nat_sport))
        })
    }

    /// Runs one episode; a disagreement is returned as its report.
    pub fn episode(
        &mut self,
        ep: &Episode,
        label: &str,
        summary: &mut Summary,
    ) -> Result<Option<String>, DatapathError> {
        self.reset(ep)?;
        let mut st = ep.state.clone();
        let mut steps = Vec::new();
        let mut out_of_model = false;
        for f in &ep.frames {
            let t0 = coarse_ns();
            let run = self
                .dp
                .test_run(program(ep.host.hook), f, 1)
                .inspect_err(|_| {
                    eprintln!("fuzz: {label}: the test run refused frame {}", hex(f));
                })?;
            let t1 = now_ns();
            summary.packets += 1;
            let now = Stamp { lo: t0, hi: t1 };
            let chosen = |k: &CtKey| self.chosen_port(k);
            let want = if out_of_model {
                Err(OutOfModel::AfterOne)
            } else {
                model::step(&ep.host, &mut st, f, now, &chosen)
            };
            if let Err(o) = want {
                out_of_model = true;
                *summary.out_of_model.entry(format!("{o:?}")).or_default() += 1;
            }
            steps.push(Step {
                input: f.clone(),
                got: (run.verdict, run.output),
                want,
            });
        }
        summary.episodes += 1;
        let mut errs = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let Ok(w) = &s.want else { break };
            let name = match (ep.host.hook, s.got.0) {
                (Hook::Xdp, XDP_PASS) => "xdp pass",
                (Hook::Xdp, XDP_DROP) => "xdp drop",
                (_, TC_ACT_OK) => "pass",
                (_, TC_ACT_REDIRECT) => "redirect",
                (_, TC_ACT_SHOT) => "drop",
                _ => "other",
            };
            let path = if w.path.is_empty() {
                name.to_owned()
            } else {
                format!("{name}: {}", w.path)
            };
            *summary.verdicts.entry(path).or_default() += 1;
            if s.got.0 != w.verdict {
                errs.push(format!(
                    "frame {i}: verdict {} (datapath) != {} (model)",
                    s.got.0, w.verdict
                ));
            }
            if let Err(e) = compare_frames(&s.got.1, &w.output) {
                errs.push(format!("frame {i}: output (datapath vs model): {e}"));
            }
            if s.got.1 != s.input
                && rewritten_well_formed(&s.input)
                && let Err(e) = verify_checksums(&s.got.1)
            {
                errs.push(format!("frame {i}: rewritten output: {e}"));
            }
        }
        if !out_of_model {
            let got = self.maps()?;
            compare_maps(&got, &st, &mut errs);
        }
        if errs.is_empty() {
            return Ok(None);
        }
        summary.disagreements += 1;
        Ok(Some(report(label, ep, &steps, &errs)))
    }
}

fn program(hook: Hook) -> &'static str {
    match hook {
        Hook::Uplink => "tc_uplink_ingress",
        Hook::Task => "tc_task_ingress",
        Hook::TaskEgress => "tc_task_egress",
        Hook::Xdp => "xdp_uplink",
    }
}

/// Whether `f` is a whole, unfragmented IPv4 packet whose checksums all verify, so that what
/// the datapath made of it must verify too.
fn rewritten_well_formed(f: &[u8]) -> bool {
    if f.len() < 34 || f[12..14] != [8, 0] || f[14] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(f[14] & 15) * 4;
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let frag = u16::from_be_bytes([f[20], f[21]]) & 0x3fff;
    let l4_min = match f[23] {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP => 8,
        _ => 0,
    };
    ihl >= 20 && frag == 0 && tot >= ihl + l4_min && f.len() >= 14 + tot && {
        let icmp_error = f[23] == PROTO_ICMP && matches!(f[14 + ihl], 3 | 11 | 12);
        !icmp_error && verify_checksums(f).is_ok()
    }
}

fn compare_maps(got: &Maps, st: &State, errs: &mut Vec<String>) {
    let mut ct_errs = Vec::new();
    for (k, w) in &st.ct {
        match got.ct.get(k) {
            None => ct_errs.push(format!(
                "CT {} missing; model: {} {}",
                show_key(k),
                r#gen::table_name(w.table),
                show_entry(&w.e)
            )),
            Some((t, g)) => {
                if let Some(e) = entry_diff(*t, g, w) {
                    ct_errs.push(format!("CT {}: {e}", show_key(k)));
                }
            }
        }
    }
    for (k, (t, g)) in &got.ct {
        if !st.ct.contains_key(k) {
            ct_errs.push(format!(
                "CT {} unexpected: {} {}",
                show_key(k),
                r#gen::table_name(*t),
                show_entry(g)
            ));
        }
    }
    errs.extend(ct_errs);
    let nonzero = |m: &StdHashMap<DropKey, u64>| -> StdHashMap<DropKey, u64> {
        m.iter()
            .filter(|(_, n)| **n != 0)
            .map(|(k, n)| (*k, *n))
            .collect()
    };
    diff_map("FRAGS", &got.frags, &st.frags, errs);
    diff_map("FRAGS6", &got.frags6, &st.frags6, errs);
    diff_map("DROPS", &nonzero(&got.drops), &nonzero(&st.drops), errs);
    diff_map("STATS", &got.stats, &st.stats, errs);
    diff_map("TASKS", &got.tasks, &st.tasks, errs);
    if got.ct_events != st.ct_events {
        errs.push(format!(
            "CT_EVENTS [created, assured, full]: datapath {:?}, model {:?}",
            got.ct_events, st.ct_events
        ));
    }
}

/// How the datapath's entry differs from the model's, stamps within their windows.
fn entry_diff(t: Table, g: &CtEntry, w: &Entry) -> Option<String> {
    let mut errs = Vec::new();
    if t != w.table {
        errs.push(format!(
            "in {} (model: {})",
            r#gen::table_name(t),
            r#gen::table_name(w.table)
        ));
    }
    for (what, ns, s) in [
        ("last_seen_ns", g.last_seen_ns, w.seen),
        ("created_ns", g.created_ns, w.created),
    ] {
        if !(s.lo..=s.hi).contains(&ns) {
            errs.push(format!("{what} {ns} outside [{}, {}]", s.lo, s.hi));
        }
    }
    let mut g = *g;
    (g.last_seen_ns, g.created_ns) = (w.e.last_seen_ns, w.e.created_ns);
    if g != w.e {
        errs.push(format!(
            "\n      datapath {}\n      model    {}",
            show_entry(&g),
            show_entry(&w.e)
        ));
    }
    (!errs.is_empty()).then(|| errs.join(", "))
}

fn diff_map<K: Eq + Hash + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    name: &str,
    got: &StdHashMap<K, V>,
    want: &StdHashMap<K, V>,
    errs: &mut Vec<String>,
) {
    for (k, w) in want {
        match got.get(k) {
            Some(g) if g == w => {}
            g => errs.push(format!("{name} {k:?}: datapath {g:?}, model {w:?}")),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            errs.push(format!("{name} {k:?}: datapath {g:?}, model none"));
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// One readable report of a disagreement: how to replay it, the host, every frame with both
/// answers, and what differs.
fn report(label: &str, ep: &Episode, steps: &[Step], errs: &[String]) -> String {
    let mut s = String::new();
    let h = &ep.host;
    let _ = writeln!(s, "DISAGREEMENT {label}");
    let _ = writeln!(
        s,
        "  host: {:?} hook, IMDS {}, tasks {}",
        h.hook,
        if h.block_imds { "blocked" } else { "open" },
        ep.state
            .tasks
            .iter()
            .map(|(a, t)| format!(
                "{} (ifindex {}, mac {:02x?}, policy {})",
                show_addr(*a),
                t.ifindex,
                t.mac,
                t.policy
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(s, "  security groups: {:?}", h.sg);
    for (k, e) in &ep.state.ct {
        let _ = writeln!(
            s,
            "  seeded {} {}: {}",
            r#gen::table_name(e.table),
            show_key(k),
            show_entry(&e.e)
        );
    }
    for (i, st) in steps.iter().enumerate() {
        let _ = writeln!(s, "  frame {i} in:  {}", hex(&st.input));
        let _ = writeln!(
            s,
            "    datapath: verdict {} out {}",
            st.got.0,
            hex(&st.got.1)
        );
        match &st.want {
            Ok(w) => {
                let _ = writeln!(
                    s,
                    "    model:    verdict {} out {}",
                    w.verdict,
                    hex(&w.output)
                );
            }
            Err(o) => {
                let _ = writeln!(s, "    model:    out of model ({o:?})");
            }
        }
    }
    let _ = writeln!(s, "  differences:");
    for e in errs {
        let _ = writeln!(s, "    {e}");
    }
    s
}

/// What a fuzz run is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// At least this many packets (whole episodes).
    pub packets: u64,
    pub seed: u64,
    /// Only the episode of this seed (a report's replay line).
    pub replay: Option<u64>,
    /// Progress on stderr every this often.
    pub progress: Option<Duration>,
}

/// Runs `plan` on a thread in a network namespace of its own.
pub fn run(plan: Plan) -> anyhow::Result<Summary> {
    std::thread::spawn(move || -> anyhow::Result<Summary> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut fz = Fuzzer::new()?;
        let mut s = Summary::default();
        let start = Instant::now();
        let mut last = start;
        let mut master = Rng::new(plan.seed);
        while s.packets < plan.packets {
            let ep_seed = plan.replay.unwrap_or_else(|| master.next_u64());
            let ep = r#gen::episode(&mut Rng::new(ep_seed));
            let label = format!(
                "(run seed {}, episode {}; replay: ecsnet-lab fuzz --replay {ep_seed})",
                plan.seed, s.episodes
            );
            if let Some(r) = fz.episode(&ep, &label, &mut s)?
                && s.reports.len() < MAX_REPORTS
            {
                s.reports.push(r);
            }
            if plan.replay.is_some() {
                break;
            }
            if let Some(every) = plan.progress
                && last.elapsed() >= every
            {
                last = Instant::now();
                eprintln!(
                    "fuzz: {} packets, {} episodes, {:.0} packets/s, {} disagreements",
                    s.packets,
                    s.episodes,
                    rate(s.packets, start.elapsed()),
                    s.disagreements
                );
            }
        }
        s.elapsed = start.elapsed();
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the fuzz thread panicked"))?
}

/// A seed from the clock and the process, for runs not given one.
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Rng::new(u64::from(t.subsec_nanos()) ^ t.as_secs() << 20 ^ u64::from(std::process::id()))
        .next_u64()
}

/// Packets per second.
pub fn rate(packets: u64, d: Duration) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a rate for people to read")]
    let p = packets as f64;
    p / d.as_secs_f64().max(1e-9)
}

/// The summary as printed: the totals, then the verdict mix and what the model left out.
pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    for r in &s.reports {
        let _ = writeln!(out, "{r}");
    }
    let _ = writeln!(
        out,
        "fuzz: {} packets in {} episodes, {:.1} s, {:.0} packets/s, {} disagreements",
        s.packets,
        s.episodes,
        s.elapsed.as_secs_f64(),
        rate(s.packets, s.elapsed),
        s.disagreements
    );
    let mut v: Vec<_> = s.verdicts.iter().collect();
    v.sort();
    let _ = writeln!(
        out,
        "  compared, by the datapath's verdict and the model's path:"
    );
    for (path, n) in v {
        let _ = writeln!(out, "    {n:>10}  {path}");
    }
    let mut o: Vec<_> = s.out_of_model.iter().collect();
    o.sort();
    let _ = writeln!(out, "  out of the model (not compared): {o:?}");
    out
}
