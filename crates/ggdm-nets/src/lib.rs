//! # ggdm-nets
//!
//! The networks behind `ggdm-core`'s [`Denoiser`] trait, and what the DDSS search needs from them
//! beyond a forward pass:
//! - [`unet`]: a native port of diffusers' `UNet2DModel`, with a hand-written backward pass that
//!   keeps about a quarter of autograd's memory;
//! - [`model_dir`]: a model folder as users bring it (diffusers layout or TorchScript), with its
//!   scheduler config, at f32 or bf16 and optionally channels-last;
//! - [`differentiable`]: the [`DifferentiableDenoiser`] extension trait (vector-Jacobian products,
//!   taped forward and backward passes) and the [`Autograd`] wrapper that gives any [`Denoiser`]
//!   one by autograd;
//! - [`autograd`]: vector-Jacobian products with explicit cotangents (a small C++ shim over
//!   `torch::autograd::grad`);
//! - [`cuda_graph`]: CUDA-graph replay of network calls (the `cuda-graphs` feature);
//! - [`memory`]: the device allocator's counters and the host heap, for memory-budgeted
//!   rematerialisation and benchmarks.
//!
//! Sampling needs only `ggdm-core` plus this crate for the UNet; the optimiser (`ddss-opt`) and
//! the metrics (`fid-metrics`) are not needed. Errors are `ggdm-core`'s ([`Error`]).

pub mod autograd;
pub mod cuda_graph;
pub mod differentiable;
pub mod memory;
pub mod model_dir;
pub mod unet;

pub use differentiable::{Autograd, CallTape, DifferentiableDenoiser};
pub use ggdm_core::{Denoiser, Error, PredictionType, Result};
