//! CUDA-graph replay of network calls made without autograd (the `cuda-graphs` cargo feature).
//!
//! A UNet call at small resolution and batch is a few hundred short kernels; on a fast GPU the
//! time goes into launching them from the CPU rather than running them. [`GraphedDenoiser`]
//! captures the first no-autograd call for each input shape into a CUDA graph (after eager
//! warm-up calls on a side stream, as PyTorch's `torch.cuda.graph` does) and afterwards replays it:
//! the input is copied into the graph's static buffers, the graph is launched as one unit, and the
//! output is copied out. The numbers are those of the eager call (the same kernels run).
//!
//! Calls that need autograd (an input requiring grad, or a network whose output would require
//! grad) always run eagerly, as do calls on the CPU. A shape whose capture fails is logged once and
//! then also runs eagerly.
//!
//! Memory: all graphs of one denoiser share one memory pool, kept for as long as the denoiser
//! lives; its size is about the largest captured call's working set (one call's activations when a
//! VJP is captured). Sharing is safe because replays run one at a time on one stream and a replay's
//! outputs are copied out before the next replay can overwrite the pool.
//!
//! Building with the feature compiles `csrc/cuda_graph.cpp` against the libtorch headers and the
//! CUDA runtime headers (`cargo xtask setup` installs them into the project's venv).

use crate::differentiable::{eager_vjp, CallTape, DifferentiableDenoiser};
use crate::{Error, PredictionType, Result};
use ggdm_core::Denoiser;
use std::cell::RefCell;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Whether this build can capture CUDA graphs (the `cuda-graphs` feature).
pub const AVAILABLE: bool = cfg!(feature = "cuda-graphs");

#[cfg(feature = "cuda-graphs")]
mod ffi {
    use std::ffi::{c_char, c_int, c_void, CStr};

    extern "C" {
        fn ddss_graph_free_error(message: *mut c_char);
        fn ddss_side_stream_enter(device: c_int, out: *mut *mut c_void) -> *mut c_char;
        fn ddss_side_stream_exit(handle: *mut c_void) -> *mut c_char;
        fn ddss_graph_new(out: *mut *mut c_void) -> *mut c_char;
        fn ddss_graph_pool_handle(first: *mut u64, second: *mut u64) -> *mut c_char;
        fn ddss_graph_capture_begin(graph: *mut c_void, first: u64, second: u64) -> *mut c_char;
        fn ddss_graph_capture_end(graph: *mut c_void) -> *mut c_char;
        fn ddss_graph_replay(graph: *mut c_void) -> *mut c_char;
        fn ddss_graph_delete(graph: *mut c_void);
        fn ddss_private_pool_bytes(device: c_int, reserved: *mut u64, allocated: *mut u64) -> *mut c_char;
    }

    fn check(what: &str, message: *mut c_char) -> crate::Result<()> {
        if message.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null return is a NUL-terminated string allocated by the shim, freed once here.
        let text = unsafe {
            let text = CStr::from_ptr(message).to_string_lossy().into_owned();
            ddss_graph_free_error(message);
            text
        };
        Err(crate::Error::invalid("CUDA graph", format!("{what}: {text}")))
    }

    /// A pooled CUDA stream made current for the calling thread until [`SideStream::exit`].
    pub struct SideStream(*mut c_void);

    impl SideStream {
        pub fn enter(device: usize) -> crate::Result<Self> {
            let mut handle = std::ptr::null_mut();
            // SAFETY: `handle` is written by the shim on success only.
            check("entering a side stream", unsafe { ddss_side_stream_enter(device as c_int, &mut handle) })?;
            Ok(Self(handle))
        }

        /// Waits for the side stream and restores the previous current stream.
        pub fn exit(self) -> crate::Result<()> {
            let handle = self.0;
            std::mem::forget(self);
            // SAFETY: `handle` came from `ddss_side_stream_enter` and is released exactly once.
            check("leaving the side stream", unsafe { ddss_side_stream_exit(handle) })
        }
    }

    impl Drop for SideStream {
        fn drop(&mut self) {
            // SAFETY: as in `exit`; only reached when `exit` was not called (an error path).
            let _ = check("leaving the side stream", unsafe { ddss_side_stream_exit(self.0) });
        }
    }

    /// A new memory-pool id for captures to share.
    pub fn pool_handle() -> crate::Result<(u64, u64)> {
        let (mut first, mut second) = (0u64, 0u64);
        // SAFETY: both outputs are plain integers written by the shim.
        check("creating a memory pool", unsafe { ddss_graph_pool_handle(&mut first, &mut second) })?;
        Ok((first, second))
    }

    /// `(reserved, allocated)` bytes of the private memory pools on `device`.
    pub fn private_pool_bytes(device: usize) -> crate::Result<(u64, u64)> {
        let (mut reserved, mut allocated) = (0u64, 0u64);
        // SAFETY: both outputs are plain integers written by the shim.
        check("reading the graph memory pools", unsafe {
            ddss_private_pool_bytes(device as c_int, &mut reserved, &mut allocated)
        })?;
        Ok((reserved, allocated))
    }

    /// An `at::cuda::CUDAGraph`.
    pub struct Graph(*mut c_void);

    impl Graph {
        pub fn new() -> crate::Result<Self> {
            let mut handle = std::ptr::null_mut();
            // SAFETY: `handle` is written by the shim on success only.
            check("creating a graph", unsafe { ddss_graph_new(&mut handle) })?;
            Ok(Self(handle))
        }
        /// Begins capturing into the shared memory pool `pool` (from [`pool_handle`]).
        pub fn capture_begin(&self, pool: (u64, u64)) -> crate::Result<()> {
            // SAFETY: `self.0` is a live graph.
            check("beginning the capture", unsafe { ddss_graph_capture_begin(self.0, pool.0, pool.1) })
        }
        pub fn capture_end(&self) -> crate::Result<()> {
            // SAFETY: `self.0` is a live graph.
            check("ending the capture", unsafe { ddss_graph_capture_end(self.0) })
        }
        pub fn replay(&self) -> crate::Result<()> {
            // SAFETY: `self.0` is a live, captured graph.
            check("replaying", unsafe { ddss_graph_replay(self.0) })
        }
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            // SAFETY: `self.0` came from `ddss_graph_new` and is deleted exactly once.
            unsafe { ddss_graph_delete(self.0) }
        }
    }
}

/// Device memory in the CUDA caching allocator's private pools, where captured graphs keep their
/// working memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolMemory {
    /// Bytes the pools hold from the device. Replays use them without the allocator counting them
    /// as allocated, so a process that replays graphs needs its allocated peak plus this.
    pub reserved: u64,
    /// Bytes of the pools in live tensors (the graphs' static outputs).
    pub allocated: u64,
}

/// The memory of every CUDA graph's private pool on `device` in this process; `None` on the CPU or
/// where it cannot be read, and zero in a build without the `cuda-graphs` feature (which captures
/// nothing).
pub fn pool_memory(device: Device) -> Option<PoolMemory> {
    let Device::Cuda(index) = device else {
        return None;
    };
    #[cfg(feature = "cuda-graphs")]
    {
        match ffi::private_pool_bytes(index) {
            Ok((reserved, allocated)) => Some(PoolMemory { reserved, allocated }),
            Err(e) => {
                tracing::debug!("{e}");
                None
            }
        }
    }
    #[cfg(not(feature = "cuda-graphs"))]
    {
        let _ = index;
        Some(PoolMemory::default())
    }
}

/// One captured call: static input buffers, the graph, and its static outputs (the network output,
/// or for a VJP the cotangent `g` as a third input and `(dx, dtau)` as outputs).
struct Captured {
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    #[cfg(feature = "cuda-graphs")]
    graph: ffi::Graph,
}

/// Which computation a graph holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Call {
    /// `forward(x, tau)` without autograd.
    Forward,
    /// `vjp(x, tau, g)`: forward and backward of one call.
    Vjp,
}

/// What a call looks like, as far as a captured graph is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    call: Call,
    x: Vec<i64>,
    x_kind: Kind,
    tau: Vec<i64>,
    tau_kind: Kind,
    device: Device,
}

/// A [`Denoiser`] whose no-autograd CUDA calls are captured once per input shape and then replayed
/// as CUDA graphs (see the module documentation).
pub struct GraphedDenoiser {
    inner: Box<dyn DifferentiableDenoiser>,
    /// `None`: capturing this shape failed or is not possible; run it eagerly.
    graphs: RefCell<HashMap<Key, Option<Captured>>>,
    /// The memory pool every capture of this denoiser shares (made at the first capture).
    #[cfg_attr(not(feature = "cuda-graphs"), allow(dead_code))]
    pool: std::cell::Cell<Option<(u64, u64)>>,
}

/// Eager calls on the side stream before a capture (cuDNN/cuBLAS set-up happens outside the graph).
#[cfg(feature = "cuda-graphs")]
const WARMUP_CALLS: usize = 3;

impl GraphedDenoiser {
    /// Wraps `inner`. Fails when this build lacks the `cuda-graphs` feature.
    pub fn new(inner: Box<dyn DifferentiableDenoiser>) -> Result<Self> {
        if !AVAILABLE {
            return Err(Error::invalid(
                "cuda_graphs",
                "this build has no CUDA-graph support; rebuild with `--features cuda-graphs` \
                 (it needs the CUDA runtime headers that `cargo xtask setup` installs)",
            ));
        }
        Ok(Self { inner, graphs: RefCell::new(HashMap::new()), pool: std::cell::Cell::new(None) })
    }

    /// Number of input shapes replayed from a captured graph so far.
    pub fn captured_shapes(&self) -> usize {
        self.graphs.borrow().values().filter(|c| c.is_some()).count()
    }

    /// Runs `call` eagerly on `inputs` (`[x, tau]` or `[x, tau, g]`); the flag is false when the
    /// result carries autograd history (a network with trainable weights) and so must not be
    /// replayed from a graph.
    fn eager(&self, call: Call, inputs: &[&Tensor]) -> Result<(Vec<Tensor>, bool)> {
        match call {
            Call::Forward => {
                let out = self.inner.forward(inputs[0], inputs[1])?;
                let replayable = !out.requires_grad();
                Ok((vec![out], replayable))
            }
            Call::Vjp => {
                let (gx, gtau) = eager_vjp(self.inner.as_ref(), inputs[0], inputs[1], inputs[2])?;
                Ok((vec![gx, gtau], true))
            }
        }
    }

    #[cfg(feature = "cuda-graphs")]
    fn capture(&self, call: Call, inputs: &[&Tensor], device: usize) -> Result<Option<Captured>> {
        let inputs: Vec<Tensor> =
            inputs.iter().map(|t| t.f_detach().map(|t| t.copy())).collect::<std::result::Result<_, _>>()?;
        let views: Vec<&Tensor> = inputs.iter().collect();
        let side = ffi::SideStream::enter(device)?;
        for _ in 0..WARMUP_CALLS {
            if !self.eager(call, &views)?.1 {
                side.exit()?;
                return Ok(None);
            }
        }
        let pool = match self.pool.get() {
            Some(pool) => pool,
            None => {
                let pool = ffi::pool_handle()?;
                self.pool.set(Some(pool));
                pool
            }
        };
        let graph = ffi::Graph::new()?;
        graph.capture_begin(pool)?;
        let outputs = self.eager(call, &views);
        let ended = graph.capture_end();
        side.exit()?;
        ended?;
        let (outputs, _) = outputs?;
        Ok(Some(Captured { inputs, outputs, graph }))
    }

    #[cfg(not(feature = "cuda-graphs"))]
    fn capture(&self, _call: Call, _inputs: &[&Tensor], _device: usize) -> Result<Option<Captured>> {
        Ok(None)
    }

    fn replay(captured: &Captured, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        tch::no_grad(|| -> Result<Vec<Tensor>> {
            for (buffer, value) in captured.inputs.iter().zip(inputs) {
                buffer.shallow_clone().f_copy_(value)?;
            }
            #[cfg(feature = "cuda-graphs")]
            captured.graph.replay()?;
            // One copy kernel per output (the buffers are overwritten by the next replay).
            Ok(captured.outputs.iter().map(Tensor::f_detach_copy).collect::<std::result::Result<_, _>>()?)
        })
    }

    /// `call` on `inputs` (`inputs[0]` is `x`, `inputs[1]` is `tau`): replayed from its graph when
    /// one is (or can be) captured for these shapes, else eagerly.
    fn run(&self, call: Call, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let (x, tau) = (inputs[0], inputs[1]);
        let device = match x.device() {
            Device::Cuda(index) if inputs.iter().all(|t| !t.requires_grad()) => Some(index),
            _ => None,
        };
        let key =
            Key { call, x: x.size(), x_kind: x.kind(), tau: tau.size(), tau_kind: tau.kind(), device: x.device() };
        if let Some(device) = device {
            if !self.graphs.borrow().contains_key(&key) {
                let captured = match self.capture(call, inputs, device) {
                    Ok(captured) => captured,
                    Err(e) => {
                        tracing::warn!(
                            "CUDA graph capture of {call:?} failed for input {:?}; running it eagerly: {e}",
                            key.x
                        );
                        None
                    }
                };
                if captured.is_some() {
                    tracing::info!("captured a CUDA graph of {call:?} for input {:?} {:?}", key.x, key.x_kind);
                }
                self.graphs.borrow_mut().insert(key.clone(), captured);
            }
            if let Some(Some(captured)) = self.graphs.borrow().get(&key) {
                return Self::replay(captured, inputs);
            }
        }
        Ok(self.eager(call, inputs)?.0)
    }
}

impl Denoiser for GraphedDenoiser {
    fn forward(&self, x: &Tensor, tau: &Tensor) -> Result<Tensor> {
        if !x.device().is_cuda() || x.requires_grad() || tau.requires_grad() {
            return self.inner.forward(x, tau);
        }
        let mut outputs = self.run(Call::Forward, &[x, tau])?;
        outputs.pop().ok_or_else(|| Error::invalid("CUDA graph", "a forward call returned nothing"))
    }

    fn prediction_type(&self) -> PredictionType {
        self.inner.prediction_type()
    }

    fn sample_shape(&self) -> Option<[i64; 3]> {
        self.inner.sample_shape()
    }
}

impl DifferentiableDenoiser for GraphedDenoiser {
    fn has_vjp(&self) -> bool {
        true
    }

    // Taped calls run eagerly: a tape's tensors must outlive the call, a graph's are overwritten
    // by its next replay.
    fn forward_taped(&self, x: &Tensor, tau: &Tensor) -> Result<Option<(Tensor, CallTape)>> {
        self.inner.forward_taped(x, tau)
    }

    fn backward_taped(&self, tape: CallTape, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        self.inner.backward_taped(tape, grad_out)
    }

    fn vjp(&self, x: &Tensor, tau: &Tensor, grad_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut outputs = self.run(Call::Vjp, &[x, tau, grad_out])?.into_iter();
        match (outputs.next(), outputs.next()) {
            (Some(gx), Some(gtau)) => Ok((gx, gtau)),
            _ => Err(Error::invalid("CUDA graph", "a VJP returned fewer than two gradients")),
        }
    }
}
