//! `ecsnet flows tail`: the journal's records, filtered and printed in a format, then with
//! `--follow` every record as its window is exported. It only reads; without flow logs the
//! journal is empty.

use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    time::Duration,
};

use crate::{
    flowlog::{
        FlowLogError,
        filter::Filter,
        format::{Format, Record},
        io,
        journal::{committed_len, parse_journal, rotated},
    },
    store::paths::InstancePaths,
};

/// How `flows tail` prints.
pub struct TailOptions {
    pub format: Format,
    pub json: bool,
    pub filter: Filter,
    /// Print only the last this many matching records first; None: all of them.
    pub lines: Option<usize>,
    pub follow: bool,
}

fn print_record(
    out: &mut impl std::io::Write,
    opts: &TailOptions,
    r: &Record,
) -> std::io::Result<()> {
    if opts.json {
        writeln!(out, "{}", opts.format.to_json(r))
    } else {
        writeln!(out, "{}", opts.format.render(r))
    }
}

/// `ecsnet flows tail`: the journal's records (the rotated file first), then, with `follow`,
/// every record as its window is exported, until printing fails (the reader went away).
pub fn tail(paths: &InstancePaths, opts: &TailOptions) -> Result<(), FlowLogError> {
    use std::os::unix::fs::MetadataExt as _;

    let journal = paths.flow_journal();
    let old = rotated(&journal, 1);
    let mut text = fs::read_to_string(&old).unwrap_or_default();
    let mut file = match File::open(&journal) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&journal)(e)),
    };
    let mut pos = 0u64;
    if let Some(f) = file.as_mut() {
        let len = committed_len(paths, f.metadata().map_err(io(&journal))?.len());
        let buf = read_range(f, 0, len).map_err(io(&journal))?;
        text.push_str(&String::from_utf8_lossy(&buf));
        pos = buf.len() as u64;
    }
    let matching: Vec<Record> = parse_journal(&text)
        .filter(|r| opts.filter.matches(r))
        .collect();
    let skip = opts.lines.map_or(0, |n| matching.len().saturating_sub(n));
    if !print(opts, matching[skip..].iter()) || !opts.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(f) = file.as_mut() else {
            file = File::open(&journal).ok();
            pos = 0;
            continue;
        };
        let len = f.metadata().map_err(io(&journal))?.len();
        // Cut back by a recovery: what was past the cut was never printed (see committed_len).
        pos = pos.min(len);
        let replaced =
            fs::metadata(&journal).is_ok_and(|m| m.ino() != f.metadata().map_or(0, |o| o.ino()));
        // A rotated-away file is complete: read it to its end before moving on.
        let end = if replaced {
            len
        } else {
            committed_len(paths, len)
        };
        if end > pos {
            let buf = read_range(f, pos, end).map_err(io(&journal))?;
            // Only whole lines; a partial one waits for the next round.
            let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            pos += whole as u64;
            let chunk = String::from_utf8_lossy(&buf[..whole]);
            let records: Vec<Record> = parse_journal(&chunk)
                .filter(|r| opts.filter.matches(r))
                .collect();
            if !print(opts, records.iter()) {
                return Ok(());
            }
        }
        if replaced && pos >= len {
            file = File::open(&journal).ok();
            pos = 0;
        }
    }
}

/// Bytes `from..to` of `f` (fewer if it was cut meanwhile).
fn read_range(f: &mut File, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(to.saturating_sub(from)).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Prints `records` to stdout; false when it is closed (the reader went away).
fn print<'r>(opts: &TailOptions, records: impl Iterator<Item = &'r Record>) -> bool {
    let mut out = std::io::stdout().lock();
    for r in records {
        if print_record(&mut out, opts, r).is_err() {
            return false;
        }
    }
    out.flush().is_ok()
}
