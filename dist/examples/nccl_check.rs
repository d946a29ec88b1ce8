//! World-size-1 NCCL check for a GPU machine (scripts/gpu-check.sh runs it): a store on 127.0.0.1 port 0,
//! the Gloo + NCCL groups of one rank on `cuda:LOCAL_RANK` (default 0), then a SUM all-reduce and a broadcast
//! of a CUDA tensor through NCCL. Prints one line, `nccl ok: ...`, or `error: ...` and exits 1.
//!
//!     scripts/libtorch.sh cuda && cargo build --release -p dist --example nccl_check --features dist/nccl
//!
//! Without a GPU (checked on the CPU machine) it stops at the group:
//! `error: creating the Nccl { device: 0 } process group (rank 0 of 1): CUDA error: CUDA driver version is
//! insufficient for CUDA runtime version`; built without `nccl`: `... this build has no NCCL ...`.

use dist::{C10d, Communicator, Store};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let timeout = Duration::from_secs(60);
    let dev: usize = std::env::var("LOCAL_RANK").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let t0 = Instant::now();
    let store = Store::server("127.0.0.1", 0, timeout).map_err(|e| e.to_string())?;
    let c = C10d::new(store, "/nccl_check/", 0, 1, dev, Some(dev), timeout).map_err(|e| e.to_string())?;
    let init = t0.elapsed().as_secs_f64();
    let t = Tensor::from_slice(&[1f32, 2.0, 3.0]).to_device(Device::Cuda(dev));
    c.all_reduce_sum(std::slice::from_ref(&t)).map_err(|e| e.to_string())?;
    c.broadcast(std::slice::from_ref(&t), 0).map_err(|e| e.to_string())?;
    c.barrier().map_err(|e| e.to_string())?;
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu)).map_err(|e| e.to_string())?;
    if v != [1.0, 2.0, 3.0] {
        return Err(format!("a world-size-1 all-reduce + broadcast on cuda:{dev} gave {v:?}, expected [1.0, 2.0, 3.0]"));
    }
    println!("nccl ok: backend {}, world 1, cuda:{dev}, groups in {init:.2} s, all-reduce + broadcast gave {v:?}", c.backend());
    Ok(())
}
