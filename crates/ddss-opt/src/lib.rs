//! ddss-opt: the differentiable unroll of a GGDM sampler, rematerialisation strategies, losses and
//! the search loop (DESIGN.md section 4, "DDSS objective" and "Rematerialisation"), plus the
//! optimiser shared with model training.
//!
//! Implemented so far: [`optim`] (Adam with exportable state, gradient clipping, LR schedules).

pub mod collective;
pub mod error;
pub mod loss;
pub mod objective;
pub mod optim;
pub mod search;
pub mod unroll;

pub use error::{Error, Result};
