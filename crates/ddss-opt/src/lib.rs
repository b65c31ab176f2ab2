//! ddss-opt: the differentiable unroll of a GGDM sampler, rematerialisation strategies, losses and
//! the search loop (DESIGN.md section 4, "DDSS objective" and "Rematerialisation").
//!
//! This crate is being built up; it currently exposes nothing.
