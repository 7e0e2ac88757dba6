//! The export's files: the checkpoint that makes each window's counts land exactly once, and
//! the journal (`flows tail` reads it) and file sink, appended to, cut back to a checkpoint
//! after a killed export, and rotated. Nothing is written with flow logs off.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    flowlog::{ExportCounters, FlowLogError, format::Record, io},
    store::paths::InstancePaths,
};

/// The journal `flows tail` reads is rotated (one old file kept) past this size, bytes.
pub const JOURNAL_MAX_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The window is being closed: the files may hold part of its records past these lengths.
    Exporting,
    /// Its records are written; its flows may still be in the kernel.
    Exported,
    Done,
}

/// Where the export of one window stands. Written (atomically, by rename) before each step.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub phase: Phase,
    pub window: u32,
    /// The window's bounds, `CLOCK_MONOTONIC` ns.
    pub start_ns: u64,
    pub end_ns: u64,
    pub journal_len: u64,
    pub sink_len: Option<u64>,
    pub counters: ExportCounters,
}

pub fn read_checkpoint(paths: &InstancePaths) -> Result<Option<Checkpoint>, FlowLogError> {
    let path = paths.flow_checkpoint();
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| FlowLogError::Checkpoint { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

pub fn write_checkpoint(paths: &InstancePaths, cp: &Checkpoint) -> Result<(), FlowLogError> {
    let path = paths.flow_checkpoint();
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(cp).expect("checkpoints serialize");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_data().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))
}

pub fn file_len(path: &Path) -> Result<u64, FlowLogError> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(path)(e)),
    }
}

/// Cuts `path` back to `len` bytes: what a killed export left past its checkpoint.
pub fn truncate(path: &Path, len: u64) -> Result<(), FlowLogError> {
    if file_len(path)? > len {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(len).map_err(io(path))?;
    }
    Ok(())
}

pub fn append(path: &Path, text: &[u8]) -> Result<(), FlowLogError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text).map_err(io(path))?;
    f.sync_data().map_err(io(path))
}

/// The journal's lines for `records`: one JSON object each, every field, addresses as text
/// (`"172.17.0.2"`, `"2001:db8::2"`).
pub fn journal_lines(records: &[Record]) -> String {
    let mut lines = String::new();
    for r in records {
        lines.push_str(&serde_json::to_string(r).expect("records serialize"));
        lines.push('\n');
    }
    lines
}

/// The records of journal text. Lines written by older versions (IPv4 only) read as they were;
/// a line that does not parse (a journal from a newer ecsnet) is skipped, not fatal.
pub fn parse_journal(text: &str) -> impl Iterator<Item = Record> + '_ {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Record>(l).ok())
}

/// `path.N` for rotation.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Moves `path` to `path.1` (and `path.1` to `path.2`, ... keeping `keep`) once it is past
/// `max_bytes`.
pub fn rotate(path: &Path, max_bytes: u64, keep: u32) -> Result<(), FlowLogError> {
    if file_len(path)? <= max_bytes {
        return Ok(());
    }
    if keep == 0 {
        return fs::remove_file(path).map_err(io(path));
    }
    for n in (1..keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            let to = rotated(path, n + 1);
            fs::rename(&from, &to).map_err(io(&to))?;
        }
    }
    let to = rotated(path, 1);
    fs::rename(path, &to).map_err(io(&to))
}

/// Bytes of the journal that belong to finished exports: a window being exported may have
/// written part of its records, which recovery would cut and write again.
pub fn committed_len(paths: &InstancePaths, file_len: u64) -> u64 {
    match read_checkpoint(paths).ok().flatten() {
        Some(cp) if cp.phase == Phase::Exporting => cp.journal_len.min(file_len),
        _ => file_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flowlog::format::{
        Format, TrafficType,
        examples::{OLD_JOURNAL_LINE, aws_example, aws_ipv6_example, old_journal_record},
    };

    /// A fresh directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ecsnet-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = scratch("rot");
        let f = dir.join("flows.log");
        for i in 0..4 {
            fs::write(&f, format!("generation {i} ").repeat(10)).unwrap();
            rotate(&f, 50, 2).unwrap();
        }
        assert!(!f.exists(), "past the limit it moved away");
        assert!(
            fs::read_to_string(rotated(&f, 1))
                .unwrap()
                .starts_with("generation 3")
        );
        assert!(
            fs::read_to_string(rotated(&f, 2))
                .unwrap()
                .starts_with("generation 2")
        );
        assert!(!rotated(&f, 3).exists(), "only `keep` old files");
        fs::write(&f, "small").unwrap();
        rotate(&f, 50, 2).unwrap();
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            "small",
            "under the limit it stays"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_killed_export_is_cut_back_to_its_checkpoint() {
        let dir = scratch("trunc");
        let f = dir.join("j");
        append(&f, b"window 1\n").unwrap();
        let len = file_len(&f).unwrap();
        append(&f, b"half of window 2").unwrap();
        truncate(&f, len).unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "window 1\n");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn ipv6_records_come_back_from_the_journal_beside_old_ipv4_lines() {
        let dir = scratch("journal6");
        let f = dir.join("flows.jsonl");
        // Written by the version before IPv6, then an upgrade appends a dual-stack window.
        append(&f, format!("{OLD_JOURNAL_LINE}\n").as_bytes()).unwrap();
        let v4 = Record {
            traffic_type: Some(TrafficType::Ipv4),
            window: 4,
            ..aws_example()
        };
        let v6 = Record {
            traffic_type: Some(TrafficType::Ipv6),
            pkt_srcaddr: "2001:db8:a::1".parse().ok(),
            pkt_dstaddr: "2001:db8:1234:a102:3304:8879:34cf:4071".parse().ok(),
            window: 4,
            ..aws_ipv6_example()
        };
        append(&f, journal_lines(&[v4.clone(), v6.clone()]).as_bytes()).unwrap();
        append(&f, b"{\"from\":\"a newer ecsnet\"\n").unwrap();
        let text = fs::read_to_string(&f).unwrap();
        let back: Vec<Record> = parse_journal(&text).collect();
        assert_eq!(back, [old_journal_record(), v4, v6]);
        let f = Format::parse("${type} ${srcaddr} ${pkt-srcaddr} ${dstport}").unwrap();
        let lines: Vec<String> = back.iter().map(|r| f.render(r)).collect();
        assert_eq!(
            lines,
            [
                "IPv4 1.2.3.4 - -",
                "IPv4 172.31.16.139 - 22",
                "IPv6 2001:db8:1234:a100:8d6e:3477:df66:f105 2001:db8:a::1 22",
            ]
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
