//! ddss-opt: the differentiable unroll of a GGDM sampler, rematerialisation strategies, losses and
//! the search loop (DESIGN.md section 4, "DDSS objective" and "Rematerialisation"), plus the
//! optimiser shared with model training ([`optim`]: Adam with exportable state, gradient clipping,
//! LR schedules) and teacher matching ([`teacher`]: the distance to a many-step solver's samples
//! from the same noise, with its pairs cached by [`pair_cache`]).

pub mod collective;
pub mod error;
pub mod loss;
pub mod objective;
pub mod optim;
pub mod pair_cache;
pub mod search;
pub mod teacher;
pub mod unroll;

pub use error::{Error, Result};
