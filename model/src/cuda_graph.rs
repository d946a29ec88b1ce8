//! CUDA graphs: a sequence of libtorch kernels captured once and replayed with one launch
//! (`at::cuda::CUDAGraph`, which tch does not bind). The rollout engine captures its static decode step
//! ([`crate::Transformer::decode_static`] plus device-side sampling) so that a step costs one graph launch
//! instead of hundreds of kernel launches from the host.
//!
//! The C++ shim (csrc/cuda_graph.cpp) is a shared library built with the crate and carried inside the binary;
//! it is written to the temporary directory and loaded on first use, after the CUDA preload
//! ([`crate::runtime::preload_cuda`]) has brought in libtorch_cuda, whose symbols it uses. A binary built
//! without the CUDA headers, or running where CUDA is absent, reports graphs unavailable and callers run
//! the same step eagerly.
//!
//! What a captured step may do (PyTorch's rules for graph capture): only device work on tensors whose
//! addresses stay fixed — no host↔device copies, no host reads of device values, no reallocation of the
//! tensors it reads or writes in place. Temporaries are fine (they come from the graph's memory pool).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;
use tch::Device;

type NewFn = unsafe extern "C" fn(c_int) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type UnitFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type BeginFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;
type ErrFn = unsafe extern "C" fn() -> *const c_char;

struct Shim {
    new: NewFn,
    free: FreeFn,
    side_begin: UnitFn,
    side_end: UnitFn,
    capture_begin: BeginFn,
    capture_end: UnitFn,
    replay: UnitFn,
    last_error: ErrFn,
    _lib: libloading::Library,
}

static SHIM: OnceLock<Result<Shim, String>> = OnceLock::new();

#[cfg(whet_cuda_graph_shim)]
fn shim_bytes() -> Option<&'static [u8]> {
    Some(include_bytes!(env!("WHET_CUDA_GRAPH_SO")))
}

#[cfg(not(whet_cuda_graph_shim))]
fn shim_bytes() -> Option<&'static [u8]> {
    None
}

fn load() -> Result<Shim, String> {
    let bytes = shim_bytes().ok_or("this binary was built without the CUDA-graph shim (no CUDA headers at build time)")?;
    if !tch::Cuda::is_available() {
        return Err("CUDA is not available".into());
    }
    // one file per shim build, written atomically (several processes may start at once)
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let path = std::env::temp_dir().join(format!("whet-cuda-graph-{hash:016x}.so"));
    if std::fs::metadata(&path).map(|m| m.len() != bytes.len() as u64).unwrap_or(true) {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    // SAFETY: our own shim; its initialisers do nothing, its undefined symbols are libtorch's CUDA ones
    let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("loading the CUDA-graph shim: {e}"))?;
    // SAFETY: the symbols exist in the shim with these signatures (csrc/cuda_graph.cpp)
    unsafe {
        let sym = |name: &[u8]| -> Result<*const c_void, String> {
            lib.get::<*const c_void>(name).map(|s| *s).map_err(|e| format!("CUDA-graph shim: {e}"))
        };
        Ok(Shim {
            new: std::mem::transmute::<*const c_void, NewFn>(sym(b"whet_cuda_graph_new")?),
            free: std::mem::transmute::<*const c_void, FreeFn>(sym(b"whet_cuda_graph_free")?),
            side_begin: std::mem::transmute::<*const c_void, UnitFn>(sym(b"whet_cuda_graph_side_begin")?),
            side_end: std::mem::transmute::<*const c_void, UnitFn>(sym(b"whet_cuda_graph_side_end")?),
            capture_begin: std::mem::transmute::<*const c_void, BeginFn>(sym(b"whet_cuda_graph_capture_begin")?),
            capture_end: std::mem::transmute::<*const c_void, UnitFn>(sym(b"whet_cuda_graph_capture_end")?),
            replay: std::mem::transmute::<*const c_void, UnitFn>(sym(b"whet_cuda_graph_replay")?),
            last_error: std::mem::transmute::<*const c_void, ErrFn>(sym(b"whet_cuda_graph_last_error")?),
            _lib: lib,
        })
    }
}

fn shim() -> Result<&'static Shim, String> {
    SHIM.get_or_init(load).as_ref().map_err(|e| e.clone())
}

/// Whether steps on `device` can be captured: `Err` says why not (not a CUDA device, no CUDA, a binary
/// built without the shim).
pub fn available(device: Device) -> Result<(), String> {
    match device {
        Device::Cuda(_) => shim().map(|_| ()),
        d => Err(format!("CUDA graphs need a CUDA device, not {d:?}")),
    }
}

/// A captured sequence of kernels.
pub struct CudaGraph {
    ptr: *mut c_void,
    shim: &'static Shim,
}

fn check(shim: &Shim, rc: c_int, what: &str) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a thread-local C string that lives until its next error
    let msg = unsafe { CStr::from_ptr((shim.last_error)()) }.to_string_lossy().into_owned();
    Err(format!("CUDA graph {what}: {}", msg.lines().next().unwrap_or("")))
}

impl CudaGraph {
    /// Runs `step` once for real on a side stream (the warm-up capture needs: lazy initialisations such as
    /// cuBLAS workspaces happen then) and captures it a second time without running it. So a call does
    /// exactly one step's work; [`CudaGraph::replay`] does each further one. `pool`: a graph whose memory
    /// pool this one shares (safe when they are replayed in the order captured and never at once).
    pub fn record(device: Device, pool: Option<&CudaGraph>, mut step: impl FnMut()) -> Result<CudaGraph, String> {
        available(device)?;
        let shim = shim()?;
        let index = match device {
            Device::Cuda(i) => i as c_int,
            _ => unreachable!("checked by available"),
        };
        // SAFETY: the shim's functions on a graph it made; freed once, in Drop
        let ptr = unsafe { (shim.new)(index) };
        if ptr.is_null() {
            return Err(check(shim, -1, "creation").unwrap_err());
        }
        let graph = CudaGraph { ptr, shim };
        unsafe {
            check(shim, (shim.side_begin)(ptr), "warm-up")?;
            step();
            check(shim, (shim.side_end)(ptr), "warm-up")?;
            check(shim, (shim.capture_begin)(ptr, pool.map_or(std::ptr::null_mut(), |p| p.ptr)), "capture")?;
            step();
            check(shim, (shim.capture_end)(ptr), "capture")?;
        }
        Ok(graph)
    }

    /// Launches the captured kernels on the current stream.
    pub fn replay(&self) -> Result<(), String> {
        // SAFETY: a captured graph of this shim
        check(self.shim, unsafe { (self.shim.replay)(self.ptr) }, "replay")
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: made by this shim, dropped once
        unsafe { (self.shim.free)(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphs_are_unavailable_off_cuda_with_a_reason() {
        let e = available(Device::Cpu).unwrap_err();
        assert!(e.contains("CUDA device"), "{e}");
        assert!(CudaGraph::record(Device::Cpu, None, || panic!("a CPU step is never recorded")).is_err());
    }
}
