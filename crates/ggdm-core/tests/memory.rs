//! Host memory measurement (the CPU side of `memory::live_bytes`, which the memory-budget
//! rematerialisation relies on) and the absence of device counters on the CPU.

use ggdm_core::memory;
use tch::{Device, Kind, Tensor};

#[test]
fn live_bytes_follow_a_large_tensor_on_the_cpu() {
    let before = memory::live_bytes(Device::Cpu).expect("resident memory is readable on Linux");
    let bytes = 256u64 << 20;
    let t = Tensor::ones([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
    let with = memory::live_bytes(Device::Cpu).unwrap();
    drop(t);
    let after = memory::live_bytes(Device::Cpu).unwrap();
    let grew = with as f64 - before as f64;
    assert!((grew - bytes as f64).abs() < 0.1 * bytes as f64, "grew by {grew} bytes for a {bytes}-byte tensor");
    let released = with as f64 - after as f64;
    assert!((released - bytes as f64).abs() < 0.1 * bytes as f64, "released {released} of {bytes} bytes");
}

#[test]
fn the_heap_counts_a_tensor_exactly() {
    let Some(before) = memory::heap_allocated_bytes() else {
        eprintln!("no mallinfo2 in this C library: skipped");
        return;
    };
    let bytes = 64u64 << 20;
    let t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
    let with = memory::heap_allocated_bytes().unwrap();
    drop(t);
    let after = memory::heap_allocated_bytes().unwrap();
    // Other tests of this binary run on other threads; a tensor this large dwarfs what they hold.
    assert!((with as f64 - before as f64 - bytes as f64).abs() < 0.02 * bytes as f64, "{before} -> {with}");
    assert!((with as f64 - after as f64 - bytes as f64).abs() < 0.02 * bytes as f64, "{with} -> {after}");
}

#[test]
fn the_cpu_has_no_device_counters() {
    assert_eq!(memory::device_stats(Device::Cpu), None);
    assert!(!memory::reset_peak(Device::Cpu));
}
