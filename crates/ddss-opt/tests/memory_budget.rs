//! The memory-budget rematerialisation on the CPU, alone in its test binary so that no other test
//! allocates while it measures resident memory.

mod common;
use common::*;

use ddss_opt::unroll::{forward, Remat};
use ggdm_core::ggdm::Learnable;
use ggdm_core::noise::SeededNoise;
use ggdm_core::PredictionType;
use tch::{Device, Kind, Tensor};

/// The memory budget measures one call's kept memory and stores as many calls as fit: the
/// measurement agrees with the growth of live memory over a forward pass that stores every call
/// (K taped calls), a taped call keeps well under half of what autograd's graph of a call keeps
/// (the growth of a naive forward pass per call), and a budget of 2.5 measured calls stores 2.
#[test]
fn memory_budget_measures_a_call_and_stores_what_fits() {
    let model = tiny_unet(true, PredictionType::Epsilon);
    let s = tiny_sampler(Learnable::all());
    let mut noise = SeededNoise::new(3);
    let shape = [32, 1, 32, 32];
    let (x_init, z) = s.draw_noise(&mut noise, &shape, Device::Cpu).expect("noise");
    let x_init = x_init.to_kind(Kind::Double);
    let z: Vec<Tensor> = z.iter().map(|t| t.to_kind(Kind::Double)).collect();

    let live = || ggdm_nets::memory::live_bytes(Device::Cpu).expect("live memory") as f64;
    let before = live();
    let naive = forward(&s, &model, &x_init, &z, Remat::Naive).expect("naive");
    let naive_per_call = (live() - before) / 4.0;
    drop(naive);
    // What a pass keeps besides the calls (states and predictions): the per-call pass's growth.
    let before = live();
    let per_call = forward(&s, &model, &x_init, &z, Remat::PerCall).expect("per call");
    let states = live() - before;
    drop(per_call);
    let before = live();
    let all_stored = forward(&s, &model, &x_init, &z, Remat::Budget { stored_steps: 4 }).expect("stored");
    let taped_per_call = (live() - before - states) / 4.0;
    drop(all_stored);

    let fwd = forward(&s, &model, &x_init, &z, Remat::MemoryBudget { mib: 1 << 30 }).expect("forward");
    let plan = fwd.memory_plan().expect("plan");
    drop(fwd);
    eprintln!(
        "one call: {} bytes measured, {taped_per_call} per call stored on tapes, {naive_per_call} per call \
         in the naive pass",
        plan.call_bytes
    );
    assert_eq!((plan.stored_steps, plan.steps), (4, 4), "{plan:?}");
    let call = plan.call_bytes as f64;
    assert!(
        (call / taped_per_call - 1.0).abs() < 0.25,
        "one call measured at {call} bytes, a pass storing every call keeps {taped_per_call} per call"
    );
    assert!(call < 0.5 * naive_per_call, "a taped call keeps {call} bytes, autograd's graph {naive_per_call}");

    let mib = (2.5 * call / f64::from(1 << 20)).round() as u64;
    let fwd = forward(&s, &model, &x_init, &z, Remat::MemoryBudget { mib }).expect("forward");
    let plan = fwd.memory_plan().expect("plan");
    assert_eq!(plan.stored_steps, 2, "budget {mib} MiB, {plan:?}");
    drop(fwd);
}
