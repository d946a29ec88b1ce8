//! Automatic mixed precision (autocast) regions, through a small C++ shim over ATen's autocast state
//! (`csrc/autocast.cpp`; tch 0.24's own `tch::autocast` only covers CUDA with fp16). Inside a region, ops on
//! autocast's lower-precision list (linear, matmul, attention, ...) compute in the region's dtype on the
//! region's device while the weights stay fp32; ops on its fp32 list (softmax, norms, losses) stay fp32.
//! Regions nest; leaving the outermost one drops autocast's cached low-precision copies of the weights, so
//! keep optimizer steps outside (a region per forward pass, as `torch.autocast` is meant to be used).

use std::os::raw::c_int;
use tch::{Device, Kind};

extern "C" {
    fn whet_autocast_enter(device: c_int, dtype: c_int, prev_enabled: *mut c_int, prev_dtype: *mut c_int) -> c_int;
    fn whet_autocast_exit(device: c_int, prev_enabled: c_int, prev_dtype: c_int) -> c_int;
    fn whet_autocast_state(device: c_int) -> c_int;
}

/// c10::ScalarType codes of the dtypes autocast can compute in.
fn scalar_type(kind: Kind) -> c_int {
    match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::BFloat16 => 15,
        k => panic!("autocast computes in bfloat16, float16 or float32, not {k:?}"),
    }
}

fn device_code(device: Device) -> c_int {
    match device {
        Device::Cuda(_) => 1,
        _ => 0,
    }
}

/// Restores the previous autocast state when dropped (also on panic).
struct Region {
    device: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: plain C calls into ATen; the shim catches C++ exceptions.
        unsafe { whet_autocast_exit(self.device, self.prev_enabled, self.prev_dtype) };
    }
}

/// Runs `f` with autocast on for `device`'s type computing in `kind` (`None`: runs `f` as is).
pub fn autocast<T>(device: Device, kind: Option<Kind>, f: impl FnOnce() -> T) -> T {
    let Some(kind) = kind else { return f() };
    let device = device_code(device);
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: the out-pointers are valid for the call.
    let rc = unsafe { whet_autocast_enter(device, scalar_type(kind), &mut prev_enabled, &mut prev_dtype) };
    assert_eq!(rc, 0, "ATen refused to enter an autocast region");
    let _region = Region { device, prev_enabled, prev_dtype };
    f()
}

/// Whether autocast is on for `device`'s type, and the dtype it computes in.
pub fn state(device: Device) -> (bool, Kind) {
    // SAFETY: a plain query.
    let s = unsafe { whet_autocast_state(device_code(device)) };
    let kind = match s % 1000 {
        5 => Kind::Half,
        15 => Kind::BFloat16,
        _ => Kind::Float,
    };
    (s >= 1000, kind)
}

static DEFAULT: std::sync::atomic::AtomicI8 = std::sync::atomic::AtomicI8::new(0);

/// The autocast dtype that networks built from now on use for their forward passes (`None`: fp32 as
/// stored). A run sets it once, before building any model.
pub fn set_default(kind: Option<Kind>) {
    let code = match kind {
        None => 0,
        Some(k) => scalar_type(k) as i8,
    };
    DEFAULT.store(code, std::sync::atomic::Ordering::Relaxed);
}

pub fn default_kind() -> Option<Kind> {
    decode(DEFAULT.load(std::sync::atomic::Ordering::Relaxed))
}

/// Kind of a stored code (0: none).
pub(crate) fn decode(code: i8) -> Option<Kind> {
    match code {
        5 => Some(Kind::Half),
        15 => Some(Kind::BFloat16),
        6 => Some(Kind::Float),
        _ => None,
    }
}

pub(crate) fn encode(kind: Option<Kind>) -> i8 {
    kind.map(|k| scalar_type(k) as i8).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn cpu_regions_compute_matmuls_in_bfloat16_and_nest() {
        crate::runtime::preload_cuda();
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        assert!(!state(Device::Cpu).0);
        let inner = autocast(Device::Cpu, Some(Kind::BFloat16), || {
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
            assert_eq!(state(Device::Cpu), (true, Kind::BFloat16));
            // a nested region keeps autocast on and, on leaving, restores the outer one
            autocast(Device::Cpu, Some(Kind::BFloat16), || assert_eq!(a.matmul(&a).kind(), Kind::BFloat16));
            assert_eq!(state(Device::Cpu), (true, Kind::BFloat16));
            // `None` leaves the current state alone
            autocast(Device::Cpu, None, || a.matmul(&a).kind())
        });
        assert_eq!(inner, Kind::BFloat16);
        // off again, and the dtype restored
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        assert!(!state(Device::Cpu).0);
        // ops off autocast's lists keep their inputs' dtype inside a region
        let sum = autocast(Device::Cpu, Some(Kind::BFloat16), || (&a + &a).kind());
        assert_eq!(sum, Kind::Float);
        // a panic inside a region restores the state
        let r = std::panic::catch_unwind(|| autocast(Device::Cpu, Some(Kind::BFloat16), || panic!("inside")));
        assert!(r.is_err());
        assert!(!state(Device::Cpu).0);
    }
}
