//! The exporter the agent runs on a thread of its own: it closes the capture window in
//! `FLOW_STATE` when it is due, writes the window's records (`records`) to the journal and the
//! sink, and only then deletes the window's flows from the kernel, with a checkpoint before
//! each step (`journal`). With flow logs off it closes nothing.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use ecsnet_common::flow::{FlowKey, FlowKey6, FlowState, FlowStats, FlowStats6};

use crate::{
    clock::{monotonic_ns, wall_offset_ns},
    flowlog::{
        FlowLogError,
        format::Format,
        journal::{
            Checkpoint, JOURNAL_MAX_BYTES, Phase, append, file_len, journal_lines, read_checkpoint,
            rotate, truncate, write_checkpoint,
        },
        records::build_records,
    },
    kernel::maps,
    store::{directory::Directory, files::FlowLogOptions, paths::InstancePaths},
};

/// How long programs that read the old window number may still be counting under it after the
/// flip. A BPF program runs to completion in microseconds, without sleeping.
const GRACE: Duration = Duration::from_millis(20);
/// The exporter the agent runs; see the module comment for the steps.
pub struct Exporter {
    paths: InstancePaths,
    opts: FlowLogOptions,
    format: Format,
}

impl Exporter {
    pub fn new(paths: &InstancePaths, opts: &FlowLogOptions) -> Result<Self, FlowLogError> {
        Ok(Self {
            paths: paths.clone(),
            format: opts.format()?,
            opts: opts.clone(),
        })
    }

    fn window_ns(&self) -> u64 {
        self.opts.window_secs.max(1) * 1_000_000_000
    }

    /// Finishes whatever a killed agent left half done. Call once before `close_due`.
    pub fn recover(&self) -> Result<(), FlowLogError> {
        let Some(cp) = read_checkpoint(&self.paths)? else {
            return Ok(());
        };
        match cp.phase {
            Phase::Exporting => {
                let st = maps::read_flow_state(&self.paths)?;
                if st.epoch == cp.window {
                    // Killed between the checkpoint and the flip.
                    self.flip(&st, cp.end_ns)?;
                }
                self.finish(cp)
            }
            Phase::Exported => {
                maps::remove_window(&self.paths, cp.window)?;
                write_checkpoint(
                    &self.paths,
                    &Checkpoint {
                        phase: Phase::Done,
                        ..cp
                    },
                )
            }
            Phase::Done => Ok(()),
        }
    }

    /// How long until the open window is due to close; zero when it is (or flow logs are off
    /// and there is nothing to do: then the window length, to look again later).
    pub fn due_in(&self) -> Result<Duration, FlowLogError> {
        let st = maps::read_flow_state(&self.paths)?;
        if st.enabled == 0 {
            return Ok(Duration::from_nanos(self.window_ns()));
        }
        let due = st.window_start_ns.saturating_add(self.window_ns());
        Ok(Duration::from_nanos(due.saturating_sub(monotonic_ns())))
    }

    /// Closes the open window and exports it.
    pub fn close(&self) -> Result<(), FlowLogError> {
        let st = maps::read_flow_state(&self.paths)?;
        let counters = read_checkpoint(&self.paths)?
            .map(|c| c.counters)
            .unwrap_or_default();
        let journal = self.paths.flow_journal();
        rotate(&journal, JOURNAL_MAX_BYTES, 1)?;
        if let Some(sink) = &self.opts.sink {
            rotate(sink, self.opts.max_bytes, self.opts.keep)?;
        }
        let now = monotonic_ns();
        let cp = Checkpoint {
            phase: Phase::Exporting,
            window: st.epoch,
            start_ns: st.window_start_ns,
            end_ns: now,
            journal_len: file_len(&journal)?,
            sink_len: match &self.opts.sink {
                Some(s) => Some(file_len(s)?),
                None => None,
            },
            counters,
        };
        write_checkpoint(&self.paths, &cp)?;
        self.flip(&st, now)?;
        self.finish(cp)
    }

    /// Opens window `st.epoch + 1` at `now_ns`, then waits out the programs still counting
    /// under the old number.
    fn flip(&self, st: &FlowState, now_ns: u64) -> Result<(), FlowLogError> {
        let next = FlowState {
            epoch: st.epoch + 1,
            window_start_ns: now_ns,
            ..*st
        };
        maps::write_flow_state(&self.paths, &next)?;
        std::thread::sleep(GRACE);
        Ok(())
    }

    /// Writes the records of the closed window `cp.window` and then forgets its flows.
    fn finish(&self, cp: Checkpoint) -> Result<(), FlowLogError> {
        let journal = self.paths.flow_journal();
        truncate(&journal, cp.journal_len)?;
        if let (Some(sink), Some(len)) = (&self.opts.sink, cp.sink_len) {
            truncate(sink, len)?;
        }
        let flows: Vec<(FlowKey, FlowStats)> = maps::read_flows(&self.paths)?
            .into_iter()
            .filter(|(k, _)| k.epoch == cp.window)
            .map(|(k, v)| (k, FlowStats::merge(&v)))
            .collect();
        // IPv6 flows: none until the datapath pins `FLOWS6` (`read_flows6`).
        let flows6: Vec<(FlowKey6, FlowStats6)> = maps::read_flows6(&self.paths)?
            .into_iter()
            .filter(|(k, _)| k.epoch == cp.window)
            .map(|(k, v)| (k, FlowStats6::merge(&v)))
            .collect();
        let mut lost: BTreeMap<u32, u64> = BTreeMap::new();
        for (k, c) in maps::read_flow_lost(&self.paths)? {
            if k.epoch == cp.window {
                *lost.entry(k.ifindex).or_default() += c.packets;
            }
        }
        let lost: Vec<(u32, u64)> = lost.into_iter().collect();
        let dir = Directory::load(&self.paths)?;
        let records = build_records(
            &dir,
            cp.window,
            (cp.start_ns, cp.end_ns),
            &flows,
            &flows6,
            &lost,
            wall_offset_ns(),
        );
        append(&journal, journal_lines(&records).as_bytes())?;
        if let (Some(sink), Some(len)) = (&self.opts.sink, cp.sink_len) {
            let mut text = String::new();
            if len == 0 {
                text.push_str(&self.format.header());
                text.push('\n');
            }
            for r in &records {
                text.push_str(&self.format.render(r));
                text.push('\n');
            }
            append(sink, text.as_bytes())?;
        }
        let mut counters = cp.counters;
        counters.windows += 1;
        counters.records += records.len() as u64;
        counters.skipdata_records += lost.len() as u64;
        counters.lost_packets += lost.iter().map(|(_, p)| p).sum::<u64>();
        let cp = Checkpoint {
            phase: Phase::Exported,
            counters,
            ..cp
        };
        write_checkpoint(&self.paths, &cp)?;
        maps::remove_window(&self.paths, cp.window)?;
        if !lost.is_empty() {
            log::warn!(
                "flow table full in window {}: {} packet(s) on {} interface(s) not in any record (SKIPDATA); raise --flow-table-size",
                cp.window,
                lost.iter().map(|(_, p)| p).sum::<u64>(),
                lost.len()
            );
        }
        write_checkpoint(
            &self.paths,
            &Checkpoint {
                phase: Phase::Done,
                ..cp
            },
        )
    }

    /// One turn of the loop: closes the window if it is due. The pause until the next turn;
    /// Err when an export failed and recovery must run first.
    fn step(&self) -> Result<Duration, Duration> {
        match self.due_in() {
            Ok(d) if d.is_zero() => self.close().map(|()| Duration::ZERO).map_err(|e| {
                log::warn!("flow-log export: {e}; retrying");
                Duration::from_millis(500)
            }),
            Ok(d) => Ok(d.min(Duration::from_secs(1))),
            Err(e) => {
                log::warn!("flow-log state: {e}");
                Ok(Duration::from_secs(1))
            }
        }
    }

    /// Closes and exports the open window now, when the agent stops cleanly (`down`, SIGTERM),
    /// so the counts since the last window reach the file sink instead of vanishing with the
    /// maps.
    pub fn close_on_stop(&self) -> Result<(), FlowLogError> {
        let st = maps::read_flow_state(&self.paths)?;
        if st.enabled == 0 {
            return Ok(());
        }
        self.recover()?;
        self.close()
    }
}

/// The agent's loop: recover, then close each window when it is due. Errors are logged and
/// retried; they never stop the agent. The lock is held for each step, never while sleeping, so
/// the agent can take it to close the last window when it stops.
pub fn run(exporter: &Mutex<Exporter>) {
    let mut recovered = false;
    loop {
        let Ok(ex) = exporter.lock() else {
            return;
        };
        if !recovered {
            match ex.recover() {
                Ok(()) => recovered = true,
                Err(e) => log::warn!("flow-log recovery: {e}; retrying"),
            }
        }
        let pause = if recovered {
            ex.step().unwrap_or_else(|pause| {
                recovered = false;
                pause
            })
        } else {
            Duration::from_secs(1)
        };
        drop(ex);
        std::thread::sleep(pause);
    }
}
