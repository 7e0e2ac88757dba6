//! Layout stamps: what each pinned map looked like when it was made (type, key and value sizes,
//! capacity, flags and the meaning version of `ecsnet_common::LAYOUT_VERSIONS`), kept in a map
//! pinned beside the others (`pins::layout_pin`) with the hash of the datapath object that
//! wrote them. aya reuses a pinned map by name, so an upgrade compares these stamps with the new
//! object's before it changes anything, and refuses a map whose layout changed.
//!
//! An instance from before stamps has no `layout` pin: its stamps are read from the live maps'
//! own definitions (the kernel keeps those), each taken to be at `FIRST_LAYOUT_VERSION`.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use aya_obj::{
    EbpfSectionKind, Object,
    generated::bpf_map_type,
    maps::{LegacyMap, PinningType, bpf_map_def},
};
use ecsnet_common::{FIRST_LAYOUT_VERSION, LAYOUT_VERSIONS, PINNED_MAPS};

use crate::kernel::pins::InstancePaths;

/// One map's stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub version: u32,
}

impl Stamp {
    /// Field names and values, in the order a difference is reported.
    fn fields(&self) -> [(&'static str, u32); 6] {
        [
            ("type", self.map_type),
            ("key size", self.key_size),
            ("value size", self.value_size),
            ("max entries", self.max_entries),
            ("flags", self.flags),
            ("version", self.version),
        ]
    }

    fn to_value(self) -> Value {
        let mut v = [0; VALUE_WORDS];
        for (slot, (_, x)) in v.iter_mut().zip(self.fields()) {
            *slot = x;
        }
        v
    }

    fn from_value(v: &Value) -> Self {
        Self {
            map_type: v[0],
            key_size: v[1],
            value_size: v[2],
            max_entries: v[3],
            flags: v[4],
            version: v[5],
        }
    }
}

/// Every pinned map's stamp, by name.
pub type Layouts = BTreeMap<String, Stamp>;

/// What the stamps were written by: the datapath object's hash, and the stamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    /// FNV-1a of the object's bytes; `None` for an instance from before stamps.
    pub object: Option<u64>,
    pub layouts: Layouts,
}

/// A map whose layout differs between the running datapath and a new object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub map: String,
    pub field: &'static str,
    pub was: u32,
    pub now: u32,
}

impl fmt::Display for Changed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "map {} changed its layout ({} {} -> {})",
            self.map, self.field, self.was, self.now
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("the datapath object does not parse: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("the datapath object has no map {0}")]
    MissingMap(&'static str),
    #[error("layout stamps {path}: {source}")]
    Map {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("pinning the layout stamps at {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
}

/// Key of the stamps map: a map's name, NUL-padded (the kernel's names are 15 bytes at most).
type Key = [u8; 16];
const VALUE_WORDS: usize = 8;
/// Value: a `Stamp`'s six fields, then two spare words.
type Value = [u32; VALUE_WORDS];
/// The entry that holds the object's hash (low, high word) instead of a map's stamp.
const OBJECT_KEY: &str = "@object";
/// Capacity of the stamps map: room for maps to come.
const MAX_STAMPS: u32 = 64;

fn key(name: &str) -> Key {
    let mut k = [0; 16];
    let n = name.len().min(15);
    k[..n].copy_from_slice(&name.as_bytes()[..n]);
    k
}

fn name_of(k: &Key) -> String {
    let end = k.iter().position(|b| *b == 0).unwrap_or(k.len());
    String::from_utf8_lossy(&k[..end]).into_owned()
}

/// FNV-1a, 64 bits: which object a datapath was loaded from (not a defence, an identity).
pub fn object_hash(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn version_of(map: &str) -> u32 {
    LAYOUT_VERSIONS
        .iter()
        .find(|(m, _)| *m == map)
        .map_or(FIRST_LAYOUT_VERSION, |(_, v)| *v)
}

/// The stamps a load of `object` gives its maps, with the capacities user space sets at load
/// time (`sizes`: map name, entries) in place of the object's defaults.
pub fn of_object(object: &[u8], sizes: &[(&str, u32)]) -> Result<Layouts, LayoutError> {
    let obj = Object::parse(object)?;
    PINNED_MAPS
        .iter()
        .map(|name| {
            let m = obj.maps.get(*name).ok_or(LayoutError::MissingMap(name))?;
            let max_entries = sizes
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, s)| *s);
            let stamp = Stamp {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
                flags: m.map_flags(),
                version: version_of(name),
            };
            Ok(((*name).to_owned(), stamp))
        })
        .collect()
}

/// The stamps of a loaded instance: the `layout` pin, or for an instance from before stamps the
/// live maps' definitions at `FIRST_LAYOUT_VERSION`.
pub fn read(paths: &InstancePaths) -> Result<Stamped, LayoutError> {
    let path = paths.layout_pin();
    if !path.exists() {
        return Ok(Stamped {
            object: None,
            layouts: live(paths),
        });
    }
    let map_err = |source| LayoutError::Map {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let map: HashMap<MapData, Key, Value> = Map::HashMap(data).try_into().map_err(map_err)?;
    let mut stamped = Stamped {
        object: None,
        layouts: Layouts::new(),
    };
    for entry in &map {
        let (k, v) = entry.map_err(map_err)?;
        let name = name_of(&k);
        if name == OBJECT_KEY {
            stamped.object = Some(u64::from(v[0]) | (u64::from(v[1]) << 32));
        } else {
            stamped.layouts.insert(name, Stamp::from_value(&v));
        }
    }
    Ok(stamped)
}

/// The pinned maps' definitions as the kernel has them; a map that is not pinned is left out.
fn live(paths: &InstancePaths) -> Layouts {
    PINNED_MAPS
        .iter()
        .filter_map(|name| {
            let info = MapInfo::from_pin(paths.map_pin(name)).ok()?;
            let stamp = Stamp {
                map_type: info.map_type().ok()? as u32,
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
                flags: info.map_flags(),
                version: FIRST_LAYOUT_VERSION,
            };
            Some(((*name).to_owned(), stamp))
        })
        .collect()
}

/// The first map whose stamp differs between `was` (running) and `now` (the new object). A map
/// only one side has is no change: a new map is made at load, an old one stays pinned unused.
pub fn first_change(was: &Layouts, now: &Layouts) -> Option<Changed> {
    now.iter().find_map(|(map, new)| {
        let old = was.get(map)?;
        old.fields()
            .into_iter()
            .zip(new.fields())
            .find(|((_, a), (_, b))| a != b)
            .map(|((field, a), (_, b))| Changed {
                map: map.clone(),
                field,
                was: a,
                now: b,
            })
    })
}

/// Writes the stamps of `layouts` and the hash of the object that made them into the `layout`
/// pin, made on first use.
pub fn write(paths: &InstancePaths, object: u64, layouts: &Layouts) -> Result<(), LayoutError> {
    let path = paths.layout_pin();
    let map_err = |source| LayoutError::Map {
        path: path.clone(),
        source,
    };
    let data = if path.exists() {
        MapData::from_pin(&path).map_err(map_err)?
    } else {
        let data = MapData::create(stamps_def(), "ecsnet_layout", None).map_err(map_err)?;
        data.pin(&path).map_err(|source| LayoutError::Pin {
            path: path.clone(),
            source,
        })?;
        data
    };
    let mut map: HashMap<MapData, Key, Value> = Map::HashMap(data).try_into().map_err(map_err)?;
    for (name, stamp) in layouts {
        map.insert(&key(name), &stamp.to_value(), 0)
            .map_err(map_err)?;
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the hash is stored as its two 32-bit halves"
    )]
    let halves = [object as u32, (object >> 32) as u32];
    let mut v = [0; VALUE_WORDS];
    v[..2].copy_from_slice(&halves);
    map.insert(&key(OBJECT_KEY), &v, 0).map_err(map_err)
}

/// The stamps map's own definition: a hash of name -> stamp. It never changes (it is how the
/// others are checked), so it is not stamped itself.
fn stamps_def() -> aya_obj::Map {
    aya_obj::Map::Legacy(LegacyMap {
        def: bpf_map_def {
            map_type: bpf_map_type::BPF_MAP_TYPE_HASH as u32,
            key_size: u32::try_from(size_of::<Key>()).expect("16 bytes"),
            value_size: u32::try_from(size_of::<Value>()).expect("32 bytes"),
            max_entries: MAX_STAMPS,
            map_flags: 0,
            id: 0,
            pinning: PinningType::None,
        },
        inner_def: None,
        section_index: 0,
        section_kind: EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::datapath::DATAPATH;

    fn stamp(max_entries: u32, version: u32) -> Stamp {
        Stamp {
            map_type: 1,
            key_size: 4,
            value_size: 8,
            max_entries,
            flags: 0,
            version,
        }
    }

    #[test]
    fn the_object_has_every_pinned_map_with_its_version() {
        let l = of_object(DATAPATH, &[("CT", 77)]).unwrap();
        assert_eq!(l.len(), PINNED_MAPS.len());
        assert_eq!(l["CT"].max_entries, 77, "sizes given at load win");
        assert_eq!(
            l["CT"].key_size,
            u32::try_from(size_of::<ecsnet_common::ct::CtKey>()).unwrap()
        );
        assert!(l.values().all(|s| s.version >= FIRST_LAYOUT_VERSION));
    }

    #[test]
    fn a_changed_field_is_named_and_new_or_gone_maps_are_not_changes() {
        let was: Layouts = [("A".into(), stamp(10, 1)), ("GONE".into(), stamp(1, 1))].into();
        let same: Layouts = [("A".into(), stamp(10, 1)), ("NEW".into(), stamp(5, 1))].into();
        assert_eq!(first_change(&was, &same), None);
        let bigger: Layouts = [("A".into(), stamp(20, 1))].into();
        let c = first_change(&was, &bigger).unwrap();
        assert_eq!(
            (c.map.as_str(), c.field, c.was, c.now),
            ("A", "max entries", 10, 20)
        );
        assert_eq!(
            c.to_string(),
            "map A changed its layout (max entries 10 -> 20)"
        );
        let bumped: Layouts = [("A".into(), stamp(10, 2))].into();
        assert_eq!(first_change(&was, &bumped).unwrap().field, "version");
    }

    #[test]
    fn stamps_and_names_round_trip() {
        let s = stamp(8192, 3);
        assert_eq!(Stamp::from_value(&s.to_value()), s);
        assert_eq!(name_of(&key("EVENT_BUDGET")), "EVENT_BUDGET");
        assert_ne!(object_hash(b"a"), object_hash(b"b"));
    }
}
