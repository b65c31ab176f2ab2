//! Memory measurements: the device caching allocator's counters (the numbers behind
//! `torch.cuda.memory_allocated` and `max_memory_allocated`, read through c10's device-generic
//! allocator interface by a small C++ shim, `csrc/memory.cpp`) and the process's resident memory
//! on the host.
//!
//! [`live_bytes`] is the one measure the memory-budget rematerialisation uses: on a CUDA device the
//! bytes the allocator has handed out (exact; no device synchronisation needed, the allocator's
//! bookkeeping is on the host), on the CPU the bytes the C heap has handed out (glibc's
//! `mallinfo2`, which libtorch's CPU tensors come from; looked up at run time), or where that is
//! missing the resident set size after the heap's free pages were returned to the system (an
//! estimate, and a slow one: the returned pages fault in again when reused).
//!
//! [`keep_freed_host_memory`] sets the C heap up for the unroll's pattern of allocations: every
//! network call frees and re-allocates buffers of the same sizes, which glibc's defaults serve
//! with fresh `mmap`s and page faults (see its documentation).

use tch::Device;

/// The device caching allocator's counters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes in tensors now.
    pub allocated: u64,
    /// The most bytes in tensors since the last [`reset_peak`].
    pub peak_allocated: u64,
    /// Bytes the allocator holds from the device now (in tensors or cached).
    pub reserved: u64,
    /// The most bytes held since the last [`reset_peak`].
    pub peak_reserved: u64,
}

/// c10's `DeviceType` codes for the devices whose allocator we can query.
fn device_code(device: Device) -> Option<(i32, i32)> {
    match device {
        Device::Cuda(index) => Some((1, i32::try_from(index).ok()?)),
        _ => None,
    }
}

#[cfg(ddss_memory_shim)]
mod shim {
    extern "C" {
        pub fn ddss_device_memory_stats(device_type: i32, device_index: i32, out: *mut i64) -> i32;
        pub fn ddss_device_memory_reset_peak(device_type: i32, device_index: i32) -> i32;
        pub fn ddss_host_release_free_memory() -> i32;
    }
}

/// The caching allocator's counters for `device`; `None` on the CPU, or where the allocator cannot
/// be queried (not initialised, or a libtorch without the shim).
pub fn device_stats(device: Device) -> Option<DeviceMemory> {
    let (kind, index) = device_code(device)?;
    #[cfg(ddss_memory_shim)]
    {
        let mut out = [0i64; 4];
        // SAFETY: the shim writes exactly four integers into `out` and catches every C++ exception.
        let status = unsafe { shim::ddss_device_memory_stats(kind, index, out.as_mut_ptr()) };
        if status != 0 {
            return None;
        }
        let [allocated, peak_allocated, reserved, peak_reserved] = out.map(|v| u64::try_from(v).unwrap_or(0));
        Some(DeviceMemory { allocated, peak_allocated, reserved, peak_reserved })
    }
    #[cfg(not(ddss_memory_shim))]
    {
        let _ = (kind, index);
        None
    }
}

/// Starts a new peak for [`DeviceMemory::peak_allocated`] and `peak_reserved`; `false` where the
/// device has no such counters.
pub fn reset_peak(device: Device) -> bool {
    let Some((kind, index)) = device_code(device) else {
        return false;
    };
    #[cfg(ddss_memory_shim)]
    {
        // SAFETY: the shim catches every C++ exception.
        unsafe { shim::ddss_device_memory_reset_peak(kind, index) == 0 }
    }
    #[cfg(not(ddss_memory_shim))]
    {
        let _ = (kind, index);
        false
    }
}

/// A field of `/proc/self/status` (given in kB there), in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's resident memory now (`VmRSS`), in bytes; `None` off Linux.
pub fn resident_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS")
}

/// The process's peak resident memory (`VmHWM`), in bytes; `None` off Linux.
pub fn peak_resident_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM")
}

/// Returns the host heap's free pages to the system (glibc's `malloc_trim`), so that
/// [`resident_bytes`] counts live memory; `false` where that is not possible.
pub fn release_free_host_memory() -> bool {
    #[cfg(ddss_memory_shim)]
    {
        // SAFETY: malloc_trim has no preconditions.
        unsafe { shim::ddss_host_release_free_memory() == 0 }
    }
    #[cfg(not(ddss_memory_shim))]
    {
        false
    }
}

extern "C" {
    fn dlopen(filename: *const std::ffi::c_char, flag: std::ffi::c_int) -> *mut std::ffi::c_void;
    fn dlsym(handle: *mut std::ffi::c_void, symbol: *const std::ffi::c_char) -> *mut std::ffi::c_void;
}

/// The symbol `name` of the library `handle` (null: the process's global symbols), looked up at run
/// time; `None` where it is missing, so that the binary also starts without it.
fn symbol_in(handle: *mut std::ffi::c_void, name: &std::ffi::CStr) -> Option<*mut std::ffi::c_void> {
    // SAFETY: `handle` is null (RTLD_DEFAULT) or a handle from `dlopen`; `name` is NUL-terminated.
    let symbol = unsafe { dlsym(handle, name.as_ptr()) };
    (!symbol.is_null()).then_some(symbol)
}

/// A C library function looked up at run time (`None` where the C library lacks it).
fn c_function(name: &std::ffi::CStr) -> Option<*mut std::ffi::c_void> {
    symbol_in(std::ptr::null_mut(), name)
}

/// glibc's `mallopt` parameters (`malloc.h`).
const M_TRIM_THRESHOLD: i32 = -1;
const M_MMAP_THRESHOLD: i32 = -3;

/// The largest `M_MMAP_THRESHOLD` glibc accepts on 64-bit systems (32 MiB).
pub const HOST_MMAP_THRESHOLD: usize = 32 << 20;

/// Makes the C heap keep freed memory for reuse instead of handing it back to the system: blocks
/// up to [`HOST_MMAP_THRESHOLD`] come from the heap (glibc's default starts at 128 KiB and only
/// grows as mmapped blocks are freed), and the heap's free top is kept (no trimming). libtorch's
/// CPU tensors come from this heap, and an unroll frees and re-allocates buffers of the same sizes
/// at every network call; with the defaults many of them are fresh mappings whose pages fault in
/// (and are zeroed) on first touch, every step. The resident memory then stays at its peak rather
/// than shrinking between steps; the peak itself is unchanged.
///
/// Does nothing, and returns `false`, where the C library has no `mallopt` or where the user set
/// malloc's parameters through the environment (`GLIBC_TUNABLES` with a `glibc.malloc.` tunable,
/// or a `MALLOC_*_` variable): their choice stands. Call it early, before large allocations.
pub fn keep_freed_host_memory() -> bool {
    let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
        || std::env::vars_os().any(|(k, _)| k.to_str().is_some_and(|k| k.starts_with("MALLOC_") && k.ends_with('_')));
    if user_set {
        return false;
    }
    type MalloptFn = unsafe extern "C" fn(i32, i32) -> i32;
    let Some(symbol) = c_function(c"mallopt") else {
        return false;
    };
    // SAFETY: glibc's `int mallopt(int param, int value)`.
    let mallopt = unsafe { std::mem::transmute::<*mut std::ffi::c_void, MalloptFn>(symbol) };
    // Both set, in this order: setting either turns off glibc's dynamic threshold, and a trim
    // threshold alone would leave every block above 128 KiB to mmap.
    // SAFETY: plain integer parameters.
    unsafe { mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD as i32) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1 }
}

/// glibc's `struct mallinfo2` (glibc 2.33 and later).
#[repr(C)]
#[derive(Default)]
struct MallInfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

/// The C heap's bookkeeping from glibc's `mallinfo2`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapInfo {
    /// Bytes the heap holds from the system (its arenas, in use or free), mmapped blocks aside.
    pub arena: u64,
    /// Bytes handed out from the arenas.
    pub in_use: u64,
    /// Bytes in blocks mmapped on their own (each returned to the system when freed).
    pub mmapped: u64,
}

/// [`HeapInfo`] now; `None` where the C library has no `mallinfo2` (glibc before 2.33). The
/// function is looked up at run time, so the binary also starts on an older glibc.
pub fn heap_info() -> Option<HeapInfo> {
    type MallInfo2Fn = unsafe extern "C" fn() -> MallInfo2;
    static FUNCTION: std::sync::OnceLock<Option<MallInfo2Fn>> = std::sync::OnceLock::new();
    let function = FUNCTION.get_or_init(|| {
        // SAFETY: a non-null "mallinfo2" is glibc's function of the signature declared above.
        c_function(c"mallinfo2")
            .map(|symbol| unsafe { std::mem::transmute::<*mut std::ffi::c_void, MallInfo2Fn>(symbol) })
    });
    // SAFETY: mallinfo2 takes no arguments and returns the structure by value.
    let info = unsafe { (*function)?() };
    Some(HeapInfo { arena: info.arena as u64, in_use: info.uordblks as u64, mmapped: info.hblkhd as u64 })
}

/// Bytes the C heap has handed out and not taken back (in-use arena chunks plus mmapped
/// chunks, over all arenas), from [`heap_info`].
pub fn heap_allocated_bytes() -> Option<u64> {
    heap_info().map(|h| h.in_use.saturating_add(h.mmapped))
}

/// `cudaMemGetInfo` for CUDA device `index`: `(free, total)` bytes, from the CUDA runtime libtorch
/// already loaded (looked up at run time, so nothing extra is linked); the calling thread's current
/// device is restored afterwards. `None` where no CUDA runtime is loaded or a call fails.
pub fn cuda_mem_get_info(index: usize) -> Option<(u64, u64)> {
    use std::ffi::{c_int, c_void, CStr};
    const RTLD_LAZY: c_int = 1;
    const RTLD_NOLOAD: c_int = 4;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
    type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    let index = c_int::try_from(index).ok()?;
    let names: [&CStr; 3] = [c"libcudart.so.13", c"libcudart.so.12", c"libcudart.so"];
    for name in names {
        // SAFETY: dlopen with RTLD_NOLOAD only returns a library already in the process; the three
        // runtime functions have the signatures declared above in every CUDA runtime release.
        unsafe {
            let handle = dlopen(name.as_ptr(), RTLD_LAZY | RTLD_NOLOAD);
            if handle.is_null() {
                continue;
            }
            let [Some(info), Some(get), Some(set)] =
                [c"cudaMemGetInfo", c"cudaGetDevice", c"cudaSetDevice"].map(|s| symbol_in(handle, s))
            else {
                continue;
            };
            let get_info = std::mem::transmute::<*mut c_void, MemGetInfo>(info);
            let get_device = std::mem::transmute::<*mut c_void, GetDevice>(get);
            let set_device = std::mem::transmute::<*mut c_void, SetDevice>(set);
            let mut current: c_int = 0;
            if get_device(&mut current) != 0 {
                return None;
            }
            if current != index && set_device(index) != 0 {
                return None;
            }
            let (mut free, mut total) = (0usize, 0usize);
            let status = get_info(&mut free, &mut total);
            if current != index {
                set_device(current);
            }
            return (status == 0).then_some((free as u64, total as u64));
        }
    }
    None
}

/// Room left under this process's cgroup memory limit (limit - usage), in bytes; `None` without a
/// limit. `cgroups` is the text of /proc/self/cgroup and `root` the cgroup mount (/sys/fs/cgroup):
/// cgroup v2 (`0::PATH`, `memory.max` and `memory.current`) or v1 (`N:memory:PATH`,
/// `memory.limit_in_bytes` and `memory.usage_in_bytes`, at PATH or, where a container mounts its own
/// cgroup as the root, at the root).
fn cgroup_room(cgroups: &str, root: &std::path::Path) -> Option<u64> {
    let read = |dir: &std::path::Path, file: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let (dirs, limit_file, usage_file) = if controllers.is_empty() {
            (vec![root.join(path), root.to_path_buf()], "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                vec![root.join("memory").join(path), root.join("memory")],
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        for dir in dirs {
            // "max" (v2) does not parse: no limit. v1 writes "no limit" as a huge number.
            if let (Some(limit), Some(usage)) = (read(&dir, limit_file), read(&dir, usage_file)) {
                if limit < 1 << 60 {
                    return Some(limit.saturating_sub(usage));
                }
            }
        }
    }
    None
}

/// The memory `device` could still give to tensors, in bytes: on a CUDA device the memory free
/// on the device plus what the caching allocator holds unused (reserved, not allocated), less the
/// unused part of the CUDA graphs' private pools (only their replays can use it); on the CPU
/// the system's available memory (`MemAvailable` in /proc/meminfo), or the room under this
/// process's cgroup memory limit where that is less. `None` where it cannot be read.
pub fn available_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            let system = kib * 1024;
            // The process's cgroups do not change; their limit and usage are read fresh each time.
            static CGROUPS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            let cgroups = CGROUPS.get_or_init(|| std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
            Some(cgroup_room(cgroups, std::path::Path::new("/sys/fs/cgroup")).map_or(system, |room| room.min(system)))
        }
        Device::Cuda(index) => {
            let stats = device_stats(device)?;
            let (free, _) = cuda_mem_get_info(index)?;
            // The unused part of the CUDA graphs' pools serves their replays only.
            let pools = crate::cuda_graph::pool_memory(device).unwrap_or_default();
            let cached = stats.reserved.saturating_sub(stats.allocated);
            Some(free + cached.saturating_sub(pools.reserved.saturating_sub(pools.allocated)))
        }
        _ => None,
    }
}

/// The memory live on `device` now, in bytes (see the module documentation for what is counted);
/// `None` where it cannot be measured.
pub fn live_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => heap_allocated_bytes().or_else(|| {
            if !release_free_host_memory() {
                return None;
            }
            resident_bytes()
        }),
        other => device_stats(other).map(|m| m.allocated),
    }
}

#[cfg(test)]
mod tests {
    use super::cgroup_room;

    fn write(dir: &std::path::Path, file: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn cgroup_limits_v2_v1_and_none() {
        let root = std::env::temp_dir().join(format!("ddss-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // v2: the process's own cgroup directory.
        write(&root.join("user/job"), "memory.max", "8589934592\n");
        write(&root.join("user/job"), "memory.current", "1073741824\n");
        assert_eq!(cgroup_room("0::/user/job\n", &root), Some(7 << 30));
        // v2 without a limit.
        write(&root.join("free"), "memory.max", "max\n");
        write(&root.join("free"), "memory.current", "1\n");
        assert_eq!(cgroup_room("0::/free\n", &root), None);
        // v1, the container's cgroup mounted as the root of the memory hierarchy.
        write(&root.join("memory"), "memory.limit_in_bytes", "4294967296\n");
        write(&root.join("memory"), "memory.usage_in_bytes", "1073741824\n");
        assert_eq!(cgroup_room("4:memory:/docker/abc\n3:cpu:/\n", &root), Some(3 << 30));
        // v1 "no limit" (a page-rounded i64::MAX).
        write(&root.join("memory/open"), "memory.limit_in_bytes", "9223372036854771712\n");
        write(&root.join("memory/open"), "memory.usage_in_bytes", "5\n");
        write(&root.join("memory"), "memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(cgroup_room("4:memory:/open\n", &root), None);
        // Nothing readable.
        assert_eq!(cgroup_room("", &root), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
