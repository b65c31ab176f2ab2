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
fn the_cpu_has_no_device_counters() {
    assert_eq!(memory::device_stats(Device::Cpu), None);
    assert!(!memory::reset_peak(Device::Cpu));
}
