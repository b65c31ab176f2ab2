//! Memory measurements: the device caching allocator's counters (the numbers behind
//! `torch.cuda.memory_allocated` and `max_memory_allocated`, read through c10's device-generic
//! allocator interface by a small C++ shim, `csrc/memory.cpp`) and the process's resident memory
//! on the host.
//!
//! [`live_bytes`] is the one measure the memory-budget rematerialisation uses: on a CUDA device the
//! bytes the allocator has handed out (exact; no device synchronisation needed, the allocator's
//! bookkeeping is on the host), on the CPU the resident set size after the heap's free pages were
//! returned to the system (an estimate: it includes page rounding and memory other threads hold).

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

/// The memory live on `device` now, in bytes (see the module documentation for what is counted);
/// `None` where it cannot be measured.
pub fn live_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            if !release_free_host_memory() {
                return None;
            }
            resident_bytes()
        }
        other => device_stats(other).map(|m| m.allocated),
    }
}
