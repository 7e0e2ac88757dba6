//! `--ct-timeouts`: comma-separated `state=seconds` for the conntrack states, read into
//! `ecsnet_common::ct::Timeouts` and written back the same way. States not named keep defaults.

use std::fmt;

use ecsnet_common::ct::Timeouts;

/// Longest idle timeout accepted, seconds (30 days).
const MAX_SECS: u64 = 30 * 86_400;

/// Where one state's timeout is in a `Timeouts`.
type Slot = fn(&mut Timeouts) -> &mut u64;

/// The states by the name the flag uses, each with its slot.
const STATES: [(&str, Slot); 6] = [
    ("tcp-syn", |t| &mut t.tcp_syn),
    ("tcp-established", |t| &mut t.tcp_established),
    ("tcp-closing", |t| &mut t.tcp_closing),
    ("tcp-reset", |t| &mut t.tcp_reset),
    ("udp", |t| &mut t.udp),
    ("icmp", |t| &mut t.icmp),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeoutsError {
    #[error("{part:?} is not STATE=SECONDS")]
    NotStateSeconds { part: String },
    #[error("{value:?} for {state} is not a number of seconds in 1..={MAX_SECS}")]
    BadSeconds { state: String, value: String },
    #[error(
        "unknown state {state:?}: use tcp-syn, tcp-established, tcp-closing, tcp-reset, udp or icmp"
    )]
    UnknownState { state: String },
}

/// Parses a `--ct-timeouts` spec; empty is every default.
pub fn parse(spec: &str) -> Result<Timeouts, TimeoutsError> {
    let mut t = Timeouts::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| TimeoutsError::NotStateSeconds {
                part: part.to_owned(),
            })?;
        let secs: u64 = v
            .parse()
            .ok()
            .filter(|s| (1..=MAX_SECS).contains(s))
            .ok_or_else(|| TimeoutsError::BadSeconds {
                state: k.to_owned(),
                value: v.to_owned(),
            })?;
        let (_, slot) = STATES.iter().find(|(name, _)| *name == k).ok_or_else(|| {
            TimeoutsError::UnknownState {
                state: k.to_owned(),
            }
        })?;
        *slot(&mut t) = secs;
    }
    Ok(t)
}

/// Every state's timeout as `--ct-timeouts` spells it: what [`parse`] reads back.
pub struct Spec(pub Timeouts);

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mut t = self.0;
        for (i, (name, slot)) in STATES.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{name}={}", *slot(&mut t))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_and_reject() {
        let t = parse("udp=5, tcp-established=100").unwrap();
        assert_eq!((t.udp, t.tcp_established), (5, 100));
        assert_eq!(t.tcp_syn, Timeouts::default().tcp_syn);
        assert_eq!(parse("").unwrap(), Timeouts::default());
        assert!(
            parse("udp")
                .unwrap_err()
                .to_string()
                .contains("STATE=SECONDS")
        );
        assert!(parse("udp=0").unwrap_err().to_string().contains("seconds"));
        assert!(
            parse("sctp=5")
                .unwrap_err()
                .to_string()
                .contains("unknown state")
        );
    }

    #[test]
    fn messages_are_the_flags() {
        assert_eq!(
            parse("udp=x").unwrap_err().to_string(),
            "\"x\" for udp is not a number of seconds in 1..=2592000"
        );
        assert_eq!(
            parse("sctp=5").unwrap_err().to_string(),
            "unknown state \"sctp\": use tcp-syn, tcp-established, tcp-closing, tcp-reset, udp or icmp"
        );
        assert_eq!(
            parse("udp").unwrap_err().to_string(),
            "\"udp\" is not STATE=SECONDS"
        );
    }

    #[test]
    fn the_spec_reads_back() {
        let t = parse("udp=5,icmp=7").unwrap();
        let spec = Spec(t).to_string();
        assert_eq!(
            spec,
            "tcp-syn=60,tcp-established=21600,tcp-closing=30,tcp-reset=10,udp=5,icmp=7"
        );
        assert_eq!(parse(&spec).unwrap(), t);
    }
}
