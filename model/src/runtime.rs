//! Process start-up: load libtorch's CUDA library before any torch call (so that one binary runs on CPU-only
//! and GPU machines), pick devices and thread counts, and describe the runtime in one log line.
//!
//! Why the preload: CUDA support is registered by static initialisers in `libtorch_cuda.so`, which the
//! linker drops because no symbol of it is referenced; once any torch call has looked for CUDA without it,
//! CUDA stays off for the life of the process (../shared/notes/libtorch-and-tch.md §3).

use std::sync::OnceLock;
use tch::Device;

static PRELOAD: OnceLock<Option<Result<String, String>>> = OnceLock::new();

/// Finds the loaded `libtorch_cpu.so` in /proc/self/maps.
fn libtorch_cpu_path() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(std::path::PathBuf::from)
}

/// Directory of the libtorch this process runs on.
pub fn libtorch_dir() -> Option<std::path::PathBuf> {
    libtorch_cpu_path().and_then(|p| p.parent().map(|d| d.to_path_buf()))
}

/// dlopens `libtorch_cuda.so` next to the loaded `libtorch_cpu.so`, once. Call it first in `main` and in
/// test set-up, before any other torch call. Returns `None` on a CPU-only libtorch, `Some(Err)` when the
/// library exists but cannot load (e.g. missing CUDA wheels), `Some(Ok(path))` when loaded.
pub fn preload_cuda() -> Option<Result<String, String>> {
    PRELOAD
        .get_or_init(|| {
            let cpu = libtorch_cpu_path()?;
            let cuda = cpu.with_file_name("libtorch_cuda.so");
            if !cuda.exists() {
                return None;
            }
            // SAFETY: loading libtorch's own CUDA library; its initialisers only register CUDA hooks.
            let lib = unsafe {
                libloading::os::unix::Library::open(
                    Some(&cuda),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            };
            Some(match lib {
                Ok(l) => {
                    std::mem::forget(l);
                    Ok(cuda.display().to_string())
                }
                Err(e) => Err(format!("CUDA disabled: {e}")),
            })
        })
        .clone()
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU when there is one).
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Ok(Device::Cuda(n)),
            None => Err(format!("unknown device \"{s}\" (expected cpu, cuda, cuda:N or auto)")),
        },
    }
}

/// Checks that `device` exists here: a one-line error for a GPU that is not there (libtorch would abort with a
/// C++ backtrace at the first tensor).
pub fn check_device(device: Device) -> Result<(), String> {
    let Device::Cuda(i) = device else { return Ok(()) };
    let why = match preload_cuda() {
        None => return Err(format!("device cuda:{i} requested, but this libtorch is CPU-only (run scripts/libtorch.sh cuda)")),
        Some(Err(e)) => format!(" ({e})"),
        Some(Ok(_)) => String::new(),
    };
    let n = tch::Cuda::device_count();
    if (i as i64) < n {
        Ok(())
    } else {
        Err(format!("device cuda:{i} requested, but this machine has {n} usable GPU(s){why}; use device = \"cpu\" or \"auto\""))
    }
}

/// One line describing libtorch, the device and threads, e.g. for the first log line of a run.
pub fn describe(device: Device) -> String {
    let dir = libtorch_dir().map(|d| d.display().to_string()).unwrap_or_else(|| "?".into());
    let cuda = match preload_cuda() {
        None => "cpu-only libtorch".to_string(),
        Some(Ok(_)) => format!("CUDA available: {} GPU(s)", tch::Cuda::device_count()),
        Some(Err(e)) => e,
    };
    let dev = match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        d => format!("{d:?}"),
    };
    format!(
        "libtorch {} at {dir} ({cuda}); device {dev}; {} intra-op thread(s)",
        TORCH_VERSION,
        tch::get_num_threads()
    )
}

/// The libtorch version tch 0.24 is built for.
pub const TORCH_VERSION: &str = "2.11.0";
