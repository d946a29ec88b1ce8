//! fp32 linear layers on MKL's packed GEMM for CPU decoding (C++ shim `csrc/mkl_linear.cpp` over the
//! `mkl::_mkl_reorder_linear_weight` / `mkl::_mkl_linear` operators that PyTorch registers for its own CPU
//! inference). A decode step multiplies a few rows by every weight matrix; a plain sgemm re-packs the weight
//! on every call, which costs about as much as the product at these shapes. A weight packed once for a fixed
//! row count skips that. PyTorch's operator falls back to a plain product when the row count differs.

use std::ffi::{c_void, CStr};
use std::os::raw::{c_char, c_int};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

extern "C" {
    fn whet_mkl_available() -> c_int;
    fn whet_mkl_last_error() -> *const c_char;
    fn whet_mkl_pack(weight: *mut c_void, rows: i64, out: *mut *mut c_void) -> c_int;
    fn whet_mkl_linear(x: *mut c_void, packed: *mut c_void, weight: *mut c_void, bias: *mut c_void, rows: i64, out: *mut *mut c_void) -> c_int;
}

fn ptr(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(whet_mkl_last_error()) }.to_string_lossy().into_owned()
}

/// Whether this libtorch has the MKL operators (PyPI's x86-64 wheels do). `WHET_MKL_PACK=0` turns packing off.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("WHET_MKL_PACK").map_or(true, |v| v != "0") && unsafe { whet_mkl_available() } == 1)
}

/// Whether packing applies to `weight`: fp32 on the CPU, 2-D, MKL present.
pub fn applies(weight: &Tensor) -> bool {
    weight.device() == Device::Cpu && weight.kind() == Kind::Float && weight.dim() == 2 && available()
}

/// `weight` [out, in] packed for products with `rows` input rows.
pub fn pack(weight: &Tensor, rows: i64) -> Result<Tensor, String> {
    let w = weight.contiguous();
    let mut out = std::ptr::null_mut();
    if unsafe { whet_mkl_pack(ptr(&w), rows, &mut out) } != 0 {
        return Err(format!("packing a {:?} weight for {rows} rows: {}", weight.size(), last_error()));
    }
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// `x @ weightᵀ + bias` with `packed = pack(weight, rows)`; `x` [..., in] must have `rows` rows in all.
pub fn linear(x: &Tensor, packed: &Tensor, weight: &Tensor, bias: Option<&Tensor>, rows: i64) -> Tensor {
    let size = x.size();
    let (k, n) = (size[size.len() - 1], weight.size()[0]);
    let x2 = x.reshape([-1, k]);
    assert_eq!(x2.size()[0], rows, "packed for {rows} rows");
    let mut out = std::ptr::null_mut();
    let b = bias.map_or(std::ptr::null_mut(), ptr);
    let rc = unsafe { whet_mkl_linear(ptr(&x2), ptr(packed), ptr(weight), b, rows, &mut out) };
    assert_eq!(rc, 0, "MKL packed linear: {}", last_error());
    let mut shape = size[..size.len() - 1].to_vec();
    shape.push(n);
    unsafe { Tensor::from_ptr(out as *mut _) }.view(shape.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_linear_equals_linear() {
        crate::runtime::preload_cuda();
        tch::set_num_threads(1);
        if !available() {
            eprintln!("MKL operators not registered in this libtorch; nothing to test");
            return;
        }
        let _g = tch::no_grad_guard();
        for (rows, k, n) in [(16, 64, 96), (5, 33, 17), (1, 128, 256)] {
            let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu));
            let b = Tensor::randn([n], (Kind::Float, Device::Cpu));
            let x = Tensor::randn([rows, 1, k], (Kind::Float, Device::Cpu));
            let p = pack(&w, rows).unwrap();
            for bias in [None, Some(&b)] {
                let want = x.linear(&w, bias);
                let got = linear(&x, &p, &w, bias, rows);
                assert_eq!(got.size(), want.size());
                let d = (&got - &want).abs().max().double_value(&[]);
                assert!(d < 1e-4, "rows {rows}: {d}");
            }
        }
    }
}
