//! `memory::keep_freed_host_memory`: after it, a tensor of a few MiB comes from the C heap rather
//! than a mapping of its own, the heap keeps the memory once the tensor is dropped, and tensors
//! allocated and dropped over and over reuse it (the heap reaches a steady size). Alone in its binary: it changes malloc's parameters for
//! the whole process, and parallel tests' allocations would show in the heap's numbers.

use ggdm_nets::memory::{self, HeapInfo};
use tch::{Device, Kind, Tensor};

const BYTES: u64 = 16 << 20;

fn heap() -> HeapInfo {
    memory::heap_info().expect("glibc 2.33+ has mallinfo2")
}

#[test]
fn freed_tensors_stay_in_the_heap_for_reuse() {
    if memory::heap_info().is_none() {
        eprintln!("no mallinfo2 in this C library: skipped");
        return;
    }
    // glibc's default: a fresh 16 MiB block is a mapping of its own (the threshold starts at
    // 128 KiB), handed back to the system when freed.
    let before = heap();
    let t = Tensor::ones([(BYTES / 4) as i64], (Kind::Float, Device::Cpu));
    let with = heap();
    assert!(with.mmapped >= before.mmapped + BYTES, "glibc default: {before:?} -> {with:?}");
    drop(t);
    assert!(heap().mmapped + BYTES <= with.mmapped, "glibc default: the mapping is returned");

    assert!(memory::keep_freed_host_memory(), "mallopt is available with glibc");
    let before = heap();
    let t = Tensor::ones([(BYTES / 4) as i64], (Kind::Float, Device::Cpu));
    let with = heap();
    assert!(with.mmapped < before.mmapped + BYTES, "kept: the tensor is not a mapping ({before:?} -> {with:?})");
    assert!(with.in_use >= before.in_use + BYTES, "kept: the tensor comes from the heap ({before:?} -> {with:?})");
    drop(t);
    let after = heap();
    assert!(after.in_use + BYTES <= with.in_use, "the tensor is freed ({with:?} -> {after:?})");
    assert!(after.arena >= with.arena, "the heap keeps the freed memory ({with:?} -> {after:?})");
    // Later tensors of that size reuse it. A block freed right before may not fit an aligned
    // request of the same size while a small allocation sits above it, so the heap grows by a few
    // blocks at first; then the freed blocks are reused, and it stops growing.
    let churn = |rounds: usize| {
        for _ in 0..rounds {
            let t = Tensor::ones([(BYTES / 4) as i64], (Kind::Float, Device::Cpu));
            let _small = Tensor::ones([16], (Kind::Float, Device::Cpu));
            drop(t);
        }
    };
    churn(50);
    let settled = heap();
    assert!(settled.arena <= after.arena + 8 * BYTES, "reused: the heap grew from {after:?} to {settled:?}");
    churn(100);
    let end = heap();
    assert_eq!(end.arena, settled.arena, "steady: the heap does not grow any more ({settled:?} -> {end:?})");
    assert_eq!(end.mmapped, after.mmapped, "no new mappings");
}
