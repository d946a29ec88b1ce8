//! Data-parallel communication for whet on PyTorch's own engine, c10d: a `TCPStore` for rendezvous,
//! `ProcessGroupGloo` for CPU tensors and (feature `nccl`) `ProcessGroupNCCL` for CUDA tensors, reached
//! through a small C++ shim (`csrc/c10d_shim.cpp`; recipe and pitfalls in
//! ../shared/notes/distributed-c10d.md).
//!
//! The trainer sees [`Communicator`]: rank, world size, in-place SUM all-reduce, broadcast, barrier, and on
//! top of those gradient all-reduce in flat buckets in a fixed parameter order, scalar reductions and the
//! gathering of small byte strings. [`Single`] is the one-process implementation (every collective is the
//! identity); [`C10d`] the distributed one. [`from_env`] picks one from torchrun's environment.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::time::Duration;
use tch::{Device, Tensor};

mod ffi;
pub mod env;

pub use env::{from_env, WorkerEnv};

/// A c10d or set-up failure, with c10d's own message (no C++ backtrace).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DistError(pub String);

pub type Result<T> = std::result::Result<T, DistError>;

fn last_error(what: &str) -> DistError {
    // SAFETY: the shim returns NULL or a NUL-terminated thread-local string valid until its next call.
    let msg = unsafe {
        let p = ffi::c10d_last_error();
        if p.is_null() {
            "unknown error".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    DistError(format!("{what}: {}", one_line(&msg)))
}

/// c10's CUDA checks append fixed hints (a docs link, CUDA_LAUNCH_BLOCKING, device-side assertions) to the
/// message; drop them and join what is left, so a failure stays one line (e.g. NCCL without a GPU:
/// `CUDA error: CUDA driver version is insufficient for CUDA runtime version`).
fn one_line(msg: &str) -> String {
    const HINTS: [&str; 5] = [
        "Search for `cuda",
        "CUDA kernel errors might be asynchronously reported",
        "For debugging consider passing CUDA_LAUNCH_BLOCKING",
        "Device-side assertions were explicitly omitted",
        "Compile with `TORCH_USE_CUDA_DSA`",
    ];
    let lines: Vec<&str> = msg.lines().map(str::trim).filter(|l| !l.is_empty() && !HINTS.iter().any(|h| l.starts_with(h))).collect();
    if lines.is_empty() {
        "unknown error".into()
    } else {
        lines.join("; ")
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError(format!("{s:?} contains a NUL byte")))
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// c10d's key-value store over TCP (the rendezvous of every process group).
pub struct Store {
    ptr: *mut ffi::c10d_store,
}

// The TCPStore client is used from one thread at a time (it lives in the trainer's thread).
unsafe impl Send for Store {}

impl Store {
    /// Hosts the store on `host:port` (0: any free port; [`Store::port`] tells which).
    pub fn server(host: &str, port: u16, timeout: Duration) -> Result<Store> {
        Self::new(host, port, true, timeout)
    }

    /// Connects to a store, retrying until `timeout`.
    pub fn client(host: &str, port: u16, timeout: Duration) -> Result<Store> {
        Self::new(host, port, false, timeout)
    }

    fn new(host: &str, port: u16, server: bool, timeout: Duration) -> Result<Store> {
        let h = cstring(host)?;
        // SAFETY: h outlives the call; the shim copies it.
        let ptr = unsafe { ffi::c10d_store_new(h.as_ptr(), port as c_int, server as c_int, ms(timeout)) };
        if ptr.is_null() {
            let what = if server { format!("hosting the rendezvous store on {host}:{port}") } else { format!("connecting to the rendezvous store at {host}:{port}") };
            return Err(last_error(&what));
        }
        Ok(Store { ptr })
    }

    /// The port the store listens on (the real one when hosted on port 0).
    pub fn port(&self) -> Result<u16> {
        // SAFETY: ptr is a live store.
        let p = unsafe { ffi::c10d_store_port(self.ptr) };
        if p < 0 {
            return Err(last_error("store port"));
        }
        Ok(p as u16)
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstring(key)?;
        // SAFETY: pointers valid for the call.
        let rc = unsafe { ffi::c10d_store_set(self.ptr, k.as_ptr(), value.as_ptr(), value.len() as i64) };
        if rc != 0 {
            return Err(last_error(&format!("store set {key}")));
        }
        Ok(())
    }

    /// The value of `key`, waiting for it to be set (up to the store's timeout).
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = cstring(key)?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf has buf.len() bytes.
            let n = unsafe { ffi::c10d_store_get(self.ptr, k.as_ptr(), buf.as_mut_ptr(), buf.len() as i64) };
            if n < 0 {
                return Err(last_error(&format!("store get {key}")));
            }
            if n as usize <= buf.len() {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            buf = vec![0u8; n as usize];
        }
    }

    /// Atomically adds `delta` to the integer at `key`; returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstring(key)?;
        // SAFETY: k valid for the call.
        let v = unsafe { ffi::c10d_store_add(self.ptr, k.as_ptr(), delta) };
        if v == i64::MIN {
            return Err(last_error(&format!("store add {key}")));
        }
        Ok(v)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: ptr came from c10d_store_new and is freed once.
        unsafe { ffi::c10d_store_free(self.ptr) }
    }
}

/// Which c10d backend a process group runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// CPU tensors; binds to `bind_host` (None: `GLOO_SOCKET_IFNAME`, else the host name, as torch).
    Gloo { bind_host: Option<String> },
    /// CUDA tensors on `cuda:device` (builds with feature `nccl`).
    Nccl { device: usize },
}

/// A c10d process group (Gloo or NCCL).
pub struct ProcessGroup {
    ptr: *mut ffi::c10d_pg,
}

unsafe impl Send for ProcessGroup {}

fn ptrs(ts: &[Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

impl ProcessGroup {
    /// Joins the group of `world` processes whose keys live under `prefix` in `store` (the group keeps its
    /// own reference to the store).
    pub fn new(store: &Store, prefix: &str, backend: &Backend, rank: usize, world: usize, timeout: Duration) -> Result<ProcessGroup> {
        let p = cstring(prefix)?;
        let ptr = match backend {
            Backend::Gloo { bind_host } => {
                let h = bind_host.as_deref().map(cstring).transpose()?;
                // SAFETY: strings outlive the call.
                unsafe { ffi::c10d_pg_new_gloo(store.ptr, p.as_ptr(), rank as c_int, world as c_int, h.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()), ms(timeout)) }
            }
            // SAFETY: as above.
            Backend::Nccl { device } => unsafe { ffi::c10d_pg_new_nccl(store.ptr, p.as_ptr(), rank as c_int, world as c_int, *device as c_int, ms(timeout)) },
        };
        if ptr.is_null() {
            return Err(last_error(&format!("creating the {backend:?} process group (rank {rank} of {world})")));
        }
        Ok(ProcessGroup { ptr })
    }

    pub fn rank(&self) -> usize {
        // SAFETY: live group.
        unsafe { ffi::c10d_pg_rank(self.ptr) as usize }
    }

    pub fn size(&self) -> usize {
        // SAFETY: live group.
        unsafe { ffi::c10d_pg_size(self.ptr) as usize }
    }

    pub fn backend_name(&self) -> String {
        // SAFETY: the name lives as long as the group.
        unsafe { CStr::from_ptr(ffi::c10d_pg_backend_name(self.ptr) as *const c_char).to_string_lossy().into_owned() }
    }

    /// In-place SUM over the group, one collective per tensor.
    pub fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<()> {
        let p = ptrs(ts);
        // SAFETY: every pointer is a live at::Tensor (tch's C_tensor) for the call.
        if unsafe { ffi::c10d_pg_allreduce_sum(self.ptr, p.as_ptr(), p.len() as c_int) } != 0 {
            return Err(last_error("all-reduce"));
        }
        Ok(())
    }

    pub fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<()> {
        let p = ptrs(ts);
        // SAFETY: as all_reduce_sum.
        if unsafe { ffi::c10d_pg_broadcast(self.ptr, p.as_ptr(), p.len() as c_int, root as c_int) } != 0 {
            return Err(last_error("broadcast"));
        }
        Ok(())
    }

    /// `out` (world · n elements) ← every rank's `input` (n elements), in rank order.
    pub fn all_gather_flat(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        check_flat(out, input, self.size())?;
        // SAFETY: both are live at::Tensors for the call.
        if unsafe { ffi::c10d_pg_allgather_flat(self.ptr, out.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) } != 0 {
            return Err(last_error("all-gather"));
        }
        Ok(())
    }

    /// `out` (n elements) ← the sum over the ranks of this rank's block of `input` (world · n elements).
    pub fn reduce_scatter_flat_sum(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        check_flat(input, out, self.size())?;
        // SAFETY: as all_gather_flat.
        if unsafe { ffi::c10d_pg_reduce_scatter_flat_sum(self.ptr, out.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) } != 0 {
            return Err(last_error("reduce-scatter"));
        }
        Ok(())
    }

    /// [`ProcessGroup::all_gather_flat`], started: the buffers must stay untouched until it is waited for.
    pub fn all_gather_flat_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending> {
        check_flat(out, input, self.size())?;
        // SAFETY: both are live at::Tensors for the call; the work keeps its own references to them.
        let w = unsafe { ffi::c10d_pg_allgather_flat_start(self.ptr, out.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) };
        Pending::started(w, "all-gather")
    }

    /// [`ProcessGroup::reduce_scatter_flat_sum`], started.
    pub fn reduce_scatter_flat_sum_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending> {
        check_flat(input, out, self.size())?;
        // SAFETY: as all_gather_flat_start.
        let w = unsafe { ffi::c10d_pg_reduce_scatter_flat_sum_start(self.ptr, out.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) };
        Pending::started(w, "reduce-scatter")
    }

    pub fn barrier(&self) -> Result<()> {
        // SAFETY: live group.
        if unsafe { ffi::c10d_pg_barrier(self.ptr) } != 0 {
            return Err(last_error("barrier"));
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: ptr came from c10d_pg_new_* and is freed once (shutdown, then delete).
        unsafe { ffi::c10d_pg_free(self.ptr) }
    }
}

/// The flat buckets of `ts` (in their fixed order): runs of one dtype and device of about [`BUCKET_BYTES`]
/// (a tensor larger than that is a bucket of its own). Gradient all-reduce and sharded data parallelism use
/// the same buckets.
pub fn buckets(ts: &[Tensor]) -> Vec<std::ops::Range<usize>> {
    let mut out = vec![];
    let mut start = 0;
    while start < ts.len() {
        let (kind, dev) = (ts[start].kind(), ts[start].device());
        let size = |t: &Tensor| t.numel() as i64 * kind.elt_size_in_bytes() as i64;
        let mut end = start;
        let mut bytes = 0i64;
        while end < ts.len() && ts[end].kind() == kind && ts[end].device() == dev && (end == start || bytes + size(&ts[end]) <= BUCKET_BYTES) {
            bytes += size(&ts[end]);
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// A started collective ([`Communicator::all_gather_flat_start`]): its result is in its output buffer once
/// [`Pending::wait`] returns. Dropped unwaited, it is waited for (errors ignored), so no handle leaks.
pub struct Pending {
    work: Option<*mut ffi::c10d_work>,
    what: &'static str,
}

impl Pending {
    /// A collective that has already completed (one process).
    pub fn done() -> Pending {
        Pending { work: None, what: "" }
    }

    fn started(w: *mut ffi::c10d_work, what: &'static str) -> Result<Pending> {
        if w.is_null() {
            return Err(last_error(what));
        }
        Ok(Pending { work: Some(w), what })
    }

    pub fn wait(mut self) -> Result<()> {
        match self.work.take() {
            // SAFETY: a live handle from c10d_pg_*_start, freed by the wait.
            Some(w) if unsafe { ffi::c10d_work_wait(w) } != 0 => Err(last_error(self.what)),
            _ => Ok(()),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(w) = self.work.take() {
            // SAFETY: as wait
            unsafe { ffi::c10d_work_wait(w) };
        }
    }
}

/// A flat collective's buffers: `whole` holds `world` blocks of `block`'s size, both contiguous, one dtype.
fn check_flat(whole: &Tensor, block: &Tensor, world: usize) -> Result<()> {
    let ok = whole.is_contiguous() && block.is_contiguous() && whole.kind() == block.kind() && whole.numel() == block.numel() * world;
    if !ok {
        return Err(DistError(format!(
            "flat collective: a buffer of {} {:?} elements is not {world} blocks of {} {:?} elements (contiguous)",
            whole.numel(),
            whole.kind(),
            block.numel(),
            block.kind()
        )));
    }
    Ok(())
}

/// Gradient buckets are about this large (PyTorch DDP's default `bucket_cap_mb` is 25).
pub const BUCKET_BYTES: i64 = 25 << 20;

/// What data parallelism needs from the processes it runs in. Collectives are collective: every rank calls
/// the same ones in the same order with tensors of the same shapes.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Rank within this node (the GPU index under torchrun's convention).
    fn local_rank(&self) -> usize {
        self.rank()
    }
    /// "single", "gloo" or "nccl+gloo".
    fn backend(&self) -> String;
    /// In-place SUM of each tensor over the ranks (CPU tensors over Gloo, CUDA tensors over NCCL).
    fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<()>;
    /// Every rank's tensors become `root`'s.
    fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// `out` (world · n elements, flat) ← every rank's `input` (n elements), in rank order.
    fn all_gather_flat(&self, out: &Tensor, input: &Tensor) -> Result<()>;
    /// `out` (n elements) ← the sum over the ranks of this rank's block of `input` (world · n elements).
    fn reduce_scatter_flat_sum(&self, out: &Tensor, input: &Tensor) -> Result<()>;
    /// [`Communicator::all_gather_flat`], started (it runs while the caller computes; collectives still pair
    /// up across ranks in the order they are started).
    fn all_gather_flat_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending> {
        self.all_gather_flat(out, input)?;
        Ok(Pending::done())
    }
    /// [`Communicator::reduce_scatter_flat_sum`], started.
    fn reduce_scatter_flat_sum_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending> {
        self.reduce_scatter_flat_sum(out, input)?;
        Ok(Pending::done())
    }

    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Sums `xs` over the ranks, in place (f64 on the CPU group: for counts and logged metrics).
    fn all_reduce_f64(&self, xs: &mut [f64]) -> Result<()> {
        sum_in_place(self, xs)
    }

    /// Sums `xs` over the ranks, in place (exact).
    fn all_reduce_i64(&self, xs: &mut [i64]) -> Result<()> {
        sum_in_place(self, xs)
    }

    /// Every rank's byte string, in rank order (small objects: metrics, rewards). Two SUM all-reduces of
    /// integers (lengths, then bytes each rank writes at its own offset), so the result is exact.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (r, w) = (self.rank(), self.world());
        if w == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let mut lens = vec![0i64; w];
        lens[r] = mine.len() as i64;
        self.all_reduce_i64(&mut lens)?;
        let total: i64 = lens.iter().sum();
        let off: i64 = lens[..r].iter().sum();
        let mut buf = vec![0u8; total as usize];
        buf[off as usize..off as usize + mine.len()].copy_from_slice(mine);
        let t = Tensor::from_slice(&buf);
        self.all_reduce_sum(std::slice::from_ref(&t))?;
        t.copy_data(&mut buf, total as usize);
        let mut out = Vec::with_capacity(w);
        let mut o = 0usize;
        for l in lens {
            out.push(buf[o..o + l as usize].to_vec());
            o += l as usize;
        }
        Ok(out)
    }

    /// Sums the gradients of `params` over the ranks, in place, in flat buckets of about
    /// [`BUCKET_BYTES`] taken in the given (fixed) parameter order. A parameter without a gradient on this
    /// rank contributes zeros (and gets a zero gradient), so every rank reduces the same buckets.
    /// Summing a bucket is summing its elements, so the result is that of per-tensor all-reduces.
    fn all_reduce_grads(&self, params: &[Tensor]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| {
                let g = p.grad();
                if g.defined() {
                    g
                } else {
                    // defines p.grad as zeros
                    (p * 0.0).sum(p.kind()).backward();
                    p.grad()
                }
            })
            .collect();
        for range in buckets(&grads) {
            let group = &grads[range];
            let flat = tch::no_grad(|| Tensor::cat(&group.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0));
            self.all_reduce_sum(std::slice::from_ref(&flat))?;
            tch::no_grad(|| {
                let mut off = 0i64;
                for g in group {
                    let n = g.numel() as i64;
                    g.shallow_clone().copy_(&flat.narrow(0, off, n).view_as(g));
                    off += n;
                }
            });
        }
        Ok(())
    }

    /// Makes every rank's `params` equal to rank 0's.
    fn broadcast_params(&self, params: &[Tensor]) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let detached: Vec<Tensor> = params.iter().map(|p| p.detach()).collect();
        self.broadcast(&detached, 0)
    }
}

/// Sums a slice of host values over the ranks through a CPU tensor.
fn sum_in_place<T: tch::kind::Element + Copy, C: Communicator + ?Sized>(c: &C, xs: &mut [T]) -> Result<()> {
    if c.world() == 1 || xs.is_empty() {
        return Ok(());
    }
    let t = Tensor::from_slice(xs);
    c.all_reduce_sum(std::slice::from_ref(&t))?;
    t.copy_data(xs, xs.len());
    Ok(())
}

/// One process: world size 1, every collective the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn backend(&self) -> String {
        "single".into()
    }
    fn all_reduce_sum(&self, _: &[Tensor]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &[Tensor], _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_flat(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        check_flat(out, input, 1)?;
        tch::no_grad(|| out.shallow_clone().copy_(input));
        Ok(())
    }
    fn reduce_scatter_flat_sum(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        check_flat(input, out, 1)?;
        tch::no_grad(|| out.shallow_clone().copy_(input));
        Ok(())
    }
}

/// Data parallelism over c10d: a Gloo group for CPU tensors and, on GPUs, an NCCL group for CUDA tensors
/// (torch's "cpu:gloo,cuda:nccl"), both on one store.
pub struct C10d {
    rank: usize,
    world: usize,
    local_rank: usize,
    gloo: ProcessGroup,
    nccl: Option<ProcessGroup>,
    // declared last: dropped after the groups
    _store: Store,
}

impl C10d {
    /// Joins the job: `prefix` namespaces this attempt's keys (torchrun: `/worker/attempt_N/`); with
    /// `nccl_device` an NCCL group on that CUDA device is created too.
    pub fn new(store: Store, prefix: &str, rank: usize, world: usize, local_rank: usize, nccl_device: Option<usize>, timeout: Duration) -> Result<C10d> {
        if world == 0 || rank >= world {
            return Err(DistError(format!("rank {rank} is not below the world size {world}")));
        }
        let gloo = ProcessGroup::new(&store, &format!("{prefix}default_pg/"), &Backend::Gloo { bind_host: std::env::var("WHET_GLOO_BIND").ok() }, rank, world, timeout)?;
        let nccl = match nccl_device {
            Some(d) => Some(ProcessGroup::new(&store, &format!("{prefix}nccl_pg/"), &Backend::Nccl { device: d }, rank, world, timeout)?),
            None => None,
        };
        Ok(C10d { rank, world, local_rank, gloo, nccl, _store: store })
    }

    fn group_for(&self, ts: &[Tensor]) -> Result<&ProcessGroup> {
        let cuda = ts.iter().any(|t| t.device() != Device::Cpu);
        match (cuda, &self.nccl) {
            (false, _) => Ok(&self.gloo),
            (true, Some(n)) => Ok(n),
            (true, None) => Err(DistError("CUDA tensors need an NCCL process group (a build with feature `nccl` on a GPU device)".into())),
        }
    }
}

impl Communicator for C10d {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn backend(&self) -> String {
        match &self.nccl {
            Some(_) => "nccl+gloo".into(),
            None => self.gloo.backend_name(),
        }
    }
    fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<()> {
        if ts.is_empty() {
            return Ok(());
        }
        self.group_for(ts)?.all_reduce_sum(ts)
    }
    fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<()> {
        if ts.is_empty() {
            return Ok(());
        }
        self.group_for(ts)?.broadcast(ts, root)
    }
    fn barrier(&self) -> Result<()> {
        self.gloo.barrier()
    }
    fn all_gather_flat(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        self.group_for(std::slice::from_ref(input))?.all_gather_flat(out, input)
    }
    fn reduce_scatter_flat_sum(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        self.group_for(std::slice::from_ref(input))?.reduce_scatter_flat_sum(out, input)
    }
    fn all_gather_flat_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending> {
        self.group_for(std::slice::from_ref(input))?.all_gather_flat_start(out, input)
    }
    fn reduce_scatter_flat_sum_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending> {
        self.group_for(std::slice::from_ref(input))?.reduce_scatter_flat_sum_start(out, input)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cuda_errors_lose_c10s_hint_lines() {
        // what c10d_pg_new_nccl reports on a machine without a GPU (the NCCL build, run on the CPU machine)
        let m = "CUDA error: CUDA driver version is insufficient for CUDA runtime version\nSearch for `cudaErrorInsufficientDriver' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more information.\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nDevice-side assertions were explicitly omitted for this error check; the error probably arose while initializing the DSA handlers.\n";
        assert_eq!(super::one_line(m), "CUDA error: CUDA driver version is insufficient for CUDA runtime version");
        assert_eq!(super::one_line("NCCL error: unhandled system error\nLast error:\nsocket failed "), "NCCL error: unhandled system error; Last error:; socket failed");
        assert_eq!(super::one_line(" \n"), "unknown error");
    }
}
