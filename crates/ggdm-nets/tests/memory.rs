//! Host memory measurement (the CPU side of `memory::live_bytes`, which the memory-budget
//! rematerialisation relies on) and the absence of device counters on the CPU. The measurements
//! run in one test, one after the other: a parallel test's allocations would show in them.

use ggdm_nets::memory;
use tch::{Device, Kind, Tensor};

/// `measure` grows by `bytes` (within `tolerance`, relative) while a tensor of that size lives, and
/// shrinks by as much when it is dropped.
fn follows_a_tensor(what: &str, tolerance: f64, measure: impl Fn() -> u64) {
    let bytes = 256u64 << 20;
    let before = measure();
    let t = Tensor::ones([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
    let with = measure();
    drop(t);
    let after = measure();
    let grew = with as f64 - before as f64;
    assert!(
        (grew - bytes as f64).abs() < tolerance * bytes as f64,
        "{what}: grew by {grew} bytes for a {bytes}-byte tensor"
    );
    let released = with as f64 - after as f64;
    assert!((released - bytes as f64).abs() < tolerance * bytes as f64, "{what}: released {released} of {bytes} bytes");
}

#[test]
fn host_measurements_follow_a_large_tensor() {
    follows_a_tensor("live_bytes", 0.02, || memory::live_bytes(Device::Cpu).expect("live memory is readable on Linux"));
    match memory::heap_allocated_bytes() {
        Some(_) => follows_a_tensor("heap", 0.02, || memory::heap_allocated_bytes().unwrap()),
        None => eprintln!("no mallinfo2 in this C library: heap measurement skipped"),
    }
    // The fallback of live_bytes where the heap cannot be asked.
    follows_a_tensor("resident", 0.1, || {
        assert!(memory::release_free_host_memory(), "malloc_trim is available with glibc");
        memory::resident_bytes().expect("VmRSS")
    });
}

#[test]
fn the_cpu_has_no_device_counters() {
    assert_eq!(memory::device_stats(Device::Cpu), None);
    assert!(!memory::reset_peak(Device::Cpu));
}
