//! The memory-budget rematerialisation on the CPU, alone in its test binary so that no other test
//! allocates while it measures resident memory.

mod common;
use common::*;

use ddss_opt::unroll::{forward, Remat};
use ggdm_core::ggdm::Learnable;
use ggdm_core::noise::SeededNoise;
use ggdm_core::PredictionType;
use tch::{Device, Kind, Tensor};

/// The memory budget measures one call's activations and stores as many calls as fit: the
/// measurement agrees with the growth of live memory over a whole naive forward pass (K calls'
/// activations), and a budget of 2.5 measured calls stores 2.
#[test]
fn memory_budget_measures_a_call_and_stores_what_fits() {
    let model = tiny_unet(true, PredictionType::Epsilon);
    let s = tiny_sampler(Learnable::all());
    let mut noise = SeededNoise::new(3);
    let shape = [32, 1, 32, 32];
    let (x_init, z) = s.draw_noise(&mut noise, &shape, Device::Cpu).expect("noise");
    let x_init = x_init.to_kind(Kind::Double);
    let z: Vec<Tensor> = z.iter().map(|t| t.to_kind(Kind::Double)).collect();

    let live = || ggdm_core::memory::live_bytes(Device::Cpu).expect("live memory") as f64;
    let before = live();
    let naive = forward(&s, &model, &x_init, &z, Remat::Naive).expect("naive");
    let naive_per_call = (live() - before) / 4.0;
    drop(naive);

    let fwd = forward(&s, &model, &x_init, &z, Remat::MemoryBudget { mib: 1 << 30 }).expect("forward");
    let plan = fwd.memory_plan().expect("plan");
    drop(fwd);
    eprintln!("one call: {} bytes measured, {naive_per_call} per call in the naive pass", plan.call_bytes);
    assert_eq!((plan.stored_steps, plan.steps), (4, 4), "{plan:?}");
    let call = plan.call_bytes as f64;
    assert!(
        (call / naive_per_call - 1.0).abs() < 0.25,
        "one call measured at {call} bytes, the naive pass keeps {naive_per_call} per call"
    );

    let mib = (2.5 * call / f64::from(1 << 20)).round() as u64;
    let fwd = forward(&s, &model, &x_init, &z, Remat::MemoryBudget { mib }).expect("forward");
    let plan = fwd.memory_plan().expect("plan");
    assert_eq!(plan.stored_steps, 2, "budget {mib} MiB, {plan:?}");
    drop(fwd);
}
