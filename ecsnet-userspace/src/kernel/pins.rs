//! Where an instance's datapath lives on bpffs: `/sys/fs/bpf/ecsnet/<instance>/` with `maps/`,
//! `progs/`, `links/` and the maps' layout stamps (`layout`). Pins only; the instance's run files are named in `store::paths`.

use std::path::PathBuf;

/// Root of every instance's pins.
pub const BPFFS: &str = "/sys/fs/bpf";

/// One instance, by name. Its pins are named here and its run files (socket, pid, log, meta,
/// applied state) in `store::paths`, so the kernel room needs nothing of the rooms above it.
#[derive(Debug, Clone)]
pub struct InstancePaths {
    pub name: String,
}

impl InstancePaths {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
    /// `/sys/fs/bpf/ecsnet/<instance>`: everything pinned by this instance.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(BPFFS).join("ecsnet").join(&self.name)
    }
    pub fn map_pin(&self, map: &str) -> PathBuf {
        self.pin_dir().join("maps").join(map)
    }
    pub fn prog_pin(&self, prog: &str) -> PathBuf {
        self.pin_dir().join("progs").join(prog)
    }
    /// The layout stamps of the pinned maps (`layout`): a map of its own, beside `maps/`.
    pub fn layout_pin(&self) -> PathBuf {
        self.pin_dir().join("layout")
    }
    /// Link pins are named by hook and ifindex: `tcx-ingress-7`, `xdp-2`.
    pub fn link_dir(&self) -> PathBuf {
        self.pin_dir().join("links")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let p = InstancePaths::new("x");
        assert_eq!(
            p.map_pin("STATS"),
            PathBuf::from("/sys/fs/bpf/ecsnet/x/maps/STATS")
        );
        assert_eq!(
            p.prog_pin("xdp_uplink"),
            PathBuf::from("/sys/fs/bpf/ecsnet/x/progs/xdp_uplink")
        );
    }
}
