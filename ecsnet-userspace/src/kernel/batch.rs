//! Whole-map reads and deletes of hash maps in chunks (`BPF_MAP_LOOKUP_BATCH`, `_DELETE_BATCH`,
//! kernel 5.6+), which aya lacks: one syscall per few thousand entries where aya makes two each.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries per syscall. The agent reads the whole connection table every second, hundreds of
/// thousands of entries on a busy host. A hash map hands over whole buckets, so a chunk must
/// hold the fullest bucket (ENOSPC otherwise); buckets hold a handful.
const CHUNK: usize = 4096;

/// A buffer's address as the kernel's `__u64` pointer fields take it.
fn addr<T>(p: *const T) -> u64 {
    p as u64
}

/// The map's fd as `bpf_attr` takes it (an open fd is never negative).
fn map_fd(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd().cast_unsigned()
}

/// The `bpf(2)` syscall; its non-negative result (a new fd for the commands that make one).
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a whole, initialised bpf_attr whose pointers point into buffers the
    // caller keeps alive and large enough for `count` entries.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            libc::c_uint::try_from(size_of::<bpf_attr>()).expect("bpf_attr is small"),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is plain data; the kernel wants unused fields zero.
    unsafe { std::mem::zeroed() }
}

/// Calls `each` with the key and value bytes of every entry of the hash map `fd`, whose keys
/// are `key_size` and values `value_size` bytes (all CPUs' for a per-CPU map). Entries added
/// or removed meanwhile may or may not be seen.
fn lookup_raw(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8], &[u8]),
) -> io::Result<()> {
    let mut keys = vec![0u8; key_size * CHUNK];
    let mut values = vec![0u8; value_size * CHUNK];
    // For a hash map the position between calls is a bucket index.
    let (mut at, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = zeroed_attr();
        attr.batch.in_batch = if first { 0 } else { addr(&raw const at) };
        attr.batch.out_batch = addr(&raw mut next);
        attr.batch.keys = addr(keys.as_mut_ptr());
        attr.batch.values = addr(values.as_mut_ptr());
        attr.batch.count = u32::try_from(CHUNK).expect("CHUNK fits the count");
        attr.batch.map_fd = map_fd(fd);
        let r = bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr).map(drop);
        // SAFETY: the kernel wrote back how many entries it copied, also with ENOENT.
        let n = (unsafe { attr.batch.count } as usize).min(CHUNK);
        for i in 0..n {
            each(
                &keys[i * key_size..(i + 1) * key_size],
                &values[i * value_size..(i + 1) * value_size],
            );
        }
        match r {
            Ok(()) => {
                at = next;
                first = false;
            }
            // The end of the map; this call's entries are in.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn read<T: Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: `bytes` holds a T the kernel copied out; T is plain data.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// Every entry of the hash map `fd`, whose key and value sizes must be `K`'s and `V`'s
/// (`check_sizes`).
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    lookup_raw(fd, size_of::<K>(), size_of::<V>(), |k, v| {
        out.push((read(k), read(v)));
    })?;
    Ok(out)
}

/// Calls `each` with every entry of the hash map `fd` (sizes as for [`lookup_all`]), without
/// holding them all at once.
pub fn for_each<K: Pod, V: Pod>(fd: BorrowedFd<'_>, mut each: impl FnMut(K, V)) -> io::Result<()> {
    lookup_raw(fd, size_of::<K>(), size_of::<V>(), |k, v| {
        each(read(k), read(v));
    })
}

/// Every entry of the per-CPU hash map `fd` with each of the `cpus` possible CPUs' values (the
/// kernel lays them out 8-byte aligned).
pub fn lookup_all_per_cpu<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    cpus: usize,
) -> io::Result<Vec<(K, Vec<V>)>> {
    let stride = size_of::<V>().next_multiple_of(8);
    let mut out = Vec::new();
    lookup_raw(fd, size_of::<K>(), stride * cpus, |k, v| {
        out.push((read(k), v.chunks_exact(stride).map(read).collect()));
    })?;
    Ok(out)
}

/// Deletes `keys` from the hash map `fd` in order, skipping keys already gone. Returns how many
/// it deleted.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let (mut done, mut deleted) = (0, 0);
    while done < keys.len() {
        let chunk = &keys[done..keys.len().min(done + CHUNK)];
        let mut attr = zeroed_attr();
        // The kernel only reads `keys`.
        attr.batch.keys = addr(chunk.as_ptr());
        attr.batch.count = u32::try_from(chunk.len()).expect("at most CHUNK keys");
        attr.batch.map_fd = map_fd(fd);
        let r = bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr).map(drop);
        // SAFETY: the kernel wrote back how many keys it deleted before stopping.
        let n = (unsafe { attr.batch.count } as usize).min(chunk.len());
        deleted += n;
        done += n;
        match r {
            Ok(()) => {}
            // keys[done] was not there (the datapath or another sweep got to it): skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Inserts or updates `entries` in the hash map `fd` in chunks (`BPF_MAP_UPDATE_BATCH`), whose
/// key and value sizes must be `K`'s and `V`'s. Stops at the first entry the kernel refuses
/// (a full map: E2BIG), with the error; `Ok` is every entry written.
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> io::Result<()> {
    for chunk in entries.chunks(CHUNK) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = zeroed_attr();
        // The kernel only reads `keys` and `values`.
        attr.batch.keys = addr(keys.as_ptr());
        attr.batch.values = addr(values.as_ptr());
        attr.batch.count = u32::try_from(chunk.len()).expect("at most CHUNK entries");
        attr.batch.map_fd = map_fd(fd);
        bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// Refuses a map whose key or value size is not `K`'s or `V`'s.
pub fn check_sizes<K, V>(key_size: u32, value_size: u32) -> io::Result<()> {
    if key_size as usize == size_of::<K>() && value_size as usize == size_of::<V>() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "map has {key_size}-byte keys and {value_size}-byte values, expected {} and {}",
                size_of::<K>(),
                size_of::<V>()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use aya_obj::generated::bpf_map_type;

    use super::*;

    /// A map of the test's own (needs root, as every ecsnet test does).
    fn create(map_type: bpf_map_type, max_entries: u32) -> OwnedFd {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_1.map_type = map_type as u32;
        attr.__bindgen_anon_1.key_size = 4;
        attr.__bindgen_anon_1.value_size = 8;
        attr.__bindgen_anon_1.max_entries = max_entries;
        let fd = bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr)
            .expect("BPF_MAP_CREATE (run the tests as root)");
        // SAFETY: the kernel just gave us this fd.
        unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) }
    }

    fn update(fd: BorrowedFd<'_>, key: u32, value: &[u64]) {
        let mut attr = zeroed_attr();
        // `key` and `value` outlive the call.
        attr.__bindgen_anon_2.map_fd = map_fd(fd);
        attr.__bindgen_anon_2.key = addr(&raw const key);
        attr.__bindgen_anon_2.__bindgen_anon_1.value = addr(value.as_ptr());
        bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).expect("BPF_MAP_UPDATE_ELEM");
    }

    #[test]
    fn reads_every_entry_across_chunks_and_deletes_skipping_missing_keys() {
        let n = u32::try_from(CHUNK * 2 + 100).unwrap();
        let map = create(bpf_map_type::BPF_MAP_TYPE_HASH, n);
        for k in 0..n {
            update(map.as_fd(), k, &[u64::from(k) * 3]);
        }
        let mut all: Vec<(u32, u64)> = lookup_all(map.as_fd()).unwrap();
        all.sort_unstable();
        assert_eq!(all.len(), n as usize);
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, &(k, v))| k as usize == i && v == 3 * u64::from(k))
        );

        // Every even key, with keys that were never there mixed in (and one given twice).
        let mut doomed: Vec<u32> = (0..n).step_by(2).collect();
        doomed.insert(10, n + 7);
        doomed.push(0);
        doomed.push(n + 8);
        assert_eq!(
            delete(map.as_fd(), &doomed).unwrap(),
            n.div_ceil(2) as usize
        );
        let left: Vec<(u32, u64)> = lookup_all(map.as_fd()).unwrap();
        assert_eq!(left.len(), (n / 2) as usize);
        assert!(left.iter().all(|(k, _)| k % 2 == 1));
        assert_eq!(delete::<u32>(map.as_fd(), &[]).unwrap(), 0);
    }

    #[test]
    fn updates_in_chunks_and_stops_at_a_full_map() {
        let n = u32::try_from(CHUNK + 10).unwrap();
        let map = create(bpf_map_type::BPF_MAP_TYPE_HASH, n);
        let entries: Vec<(u32, u64)> = (0..n).map(|k| (k, u64::from(k) + 1)).collect();
        super::update(map.as_fd(), &entries).unwrap();
        let mut all: Vec<(u32, u64)> = lookup_all(map.as_fd()).unwrap();
        all.sort_unstable();
        assert_eq!(all, entries);
        let more = [(n, 1u64), (n + 1, 2)];
        assert!(
            super::update(map.as_fd(), &more).is_err(),
            "the map is full"
        );
        super::update(map.as_fd(), &[(0u32, 9u64)]).expect("an update of a key that is there fits");
        assert_eq!(
            lookup_all::<u32, u64>(map.as_fd()).unwrap().len(),
            n as usize
        );
    }

    #[test]
    fn an_empty_map_reads_as_nothing() {
        let map = create(bpf_map_type::BPF_MAP_TYPE_HASH, 16);
        assert!(lookup_all::<u32, u64>(map.as_fd()).unwrap().is_empty());
    }

    #[test]
    fn per_cpu_values_come_back_per_cpu() {
        let cpus = aya::util::nr_cpus().unwrap().get() as usize;
        let map = create(bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH, 64);
        for k in 0..50u32 {
            let values: Vec<u64> = (0..cpus as u64).map(|c| u64::from(k) * 100 + c).collect();
            update(map.as_fd(), k, &values);
        }
        let mut all: Vec<(u32, Vec<u64>)> = lookup_all_per_cpu(map.as_fd(), cpus).unwrap();
        all.sort_unstable();
        assert_eq!(all.len(), 50);
        for (k, values) in all {
            let want: Vec<u64> = (0..cpus as u64).map(|c| u64::from(k) * 100 + c).collect();
            assert_eq!(values, want, "key {k}");
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(check_sizes::<u32, u64>(4, 8).is_ok());
        let e = check_sizes::<u32, u64>(4, 16).unwrap_err();
        assert!(e.to_string().contains("16-byte values"), "{e}");
    }
}
