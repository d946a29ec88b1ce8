//! The native step's kernels in plain Rust, written in lanes of eight so that the compiler vectorises them:
//! compiled for AVX2 + FMA (`avx2`, x86-64 CPUs without AVX-512) and for the baseline target (`base`, used by
//! tests on any machine). Same formulas and, for the products, the same order of operations as the AVX-512
//! kernels (`super::simd`): a product's accumulators take `a · w + acc` per input feature, so both give the
//! same bits; reductions (dot products, sums) are grouped by lane and differ in the last bits.

use super::Slabs;

/// Rows per kernel call: 2 × 32 accumulators, the 4 weight vectors and a broadcast fit AVX2's 16 vector
/// registers (3 rows spill).
pub const ROWS: usize = 2;

const L: usize = 8;

/// e^x lane by lane, Cephes' method as `super::simd::exp16`, over [-87.3, 88.3] (2^n stays a normal number).
#[inline(always)]
fn exp_lanes(x: [f32; L]) -> [f32; L] {
    let mut out = [0f32; L];
    for i in 0..L {
        let v = x[i].clamp(-87.3, 88.3);
        let n = (v * std::f32::consts::LOG2_E).round_ties_even();
        let r = (-n).mul_add(0.693_359_4, v);
        let r = (-n).mul_add(-2.121_944_4e-4, r);
        let mut p = 1.987_569_1e-4f32;
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = p.mul_add(r, c);
        }
        let y = (p * r).mul_add(r, r) + 1.0;
        out[i] = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    }
    out
}

#[inline(always)]
fn load(x: &[f32], from: usize, fill: f32) -> [f32; L] {
    let mut v = [fill; L];
    let n = (x.len() - from).min(L);
    v[..n].copy_from_slice(&x[from..from + n]);
    v
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

#[inline(always)]
fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    out.copy_from_slice(x);
    exp_shifted_in_place(out, shift)
}

/// v ← e^(v − shift), exactly 0 where v = −∞ (filtered tokens, masked keys); returns Σ v.
#[inline(always)]
fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = [0f32; L];
    let mut i = 0;
    while i < x.len() {
        let v = load(x, i, f32::NEG_INFINITY);
        let mut s = [0f32; L];
        for l in 0..L {
            s[l] = v[l] - shift;
        }
        let e = exp_lanes(s);
        let n = (x.len() - i).min(L);
        for l in 0..n {
            let e = if v[l] == f32::NEG_INFINITY { 0.0 } else { e[l] };
            x[i + l] = e;
            sum[l] += e;
        }
        i += L;
    }
    sum.iter().sum()
}

#[inline(always)]
fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let mut i = 0;
    while i < gate.len() {
        let g = load(gate, i, 0.0);
        let mut neg = [0f32; L];
        for l in 0..L {
            neg[l] = -g[l];
        }
        let e = exp_lanes(neg);
        let n = (gate.len() - i).min(L);
        for l in 0..n {
            out[i + l] = g[l] / (1.0 + e[l]) * up[i + l];
        }
        i += L;
    }
}

#[inline(always)]
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let inv = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(w) {
        *o = a * inv * b;
    }
}

/// `MR` rows of `x` times a 32-column panel, as `super::simd::kernel`.
#[inline(always)]
unsafe fn kernel<const MR: usize>(x: *const f32, p: *const f32, k: usize, y: *mut f32, ldy: usize, bias: *const f32, cols: usize) {
    let mut acc = [[0f32; 32]; MR];
    for kk in 0..k {
        let w = &*(p.add(kk * 32) as *const [f32; 32]);
        for (m, acc) in acc.iter_mut().enumerate() {
            let a = *x.add(m * k + kk);
            for j in 0..32 {
                acc[j] = a.mul_add(w[j], acc[j]);
            }
        }
    }
    for (m, acc) in acc.iter().enumerate() {
        for (j, &v) in acc.iter().enumerate().take(cols) {
            *y.add(m * ldy + j) = if bias.is_null() { v } else { v + *bias.add(j) };
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(rows: usize, x: *const f32, p: *const f32, k: usize, y: *mut f32, ldy: usize, bias: *const f32, cols: usize) {
    match rows {
        1 => kernel::<1>(x, p, k, y, ldy, bias, cols),
        _ => kernel::<2>(x, p, k, y, ldy, bias, cols),
    }
}

#[inline(always)]
fn attend(q: &[f32], kv: &Slabs, keys: &[u32], hd: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let g = q.len() / hd;
    let n = keys.len();
    let slab = |jn: usize| usize::from(jn >= kv.split);
    for qi in 0..g {
        let qh = &q[qi * hd..(qi + 1) * hd];
        let row = &mut scores[qi * n..(qi + 1) * n];
        for (jn, &j) in keys.iter().enumerate() {
            let j = j as usize;
            row[jn] = dot(qh, &kv.k[slab(jn)][j * hd..(j + 1) * hd]) * scale;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv = 1.0 / exp_shifted_in_place(row, max);
        let o = &mut out[qi * hd..(qi + 1) * hd];
        o.fill(0.0);
        for (jn, &j) in keys.iter().enumerate() {
            let (p, j) = (row[jn] * inv, j as usize);
            for (o, &v) in o.iter_mut().zip(&kv.v[slab(jn)][j * hd..(j + 1) * hd]) {
                *o = p.mul_add(v, *o);
            }
        }
    }
}

/// One compiled copy of the kernels; `$feature`: the target features it is compiled for.
macro_rules! variant {
    ($name:ident, $product:path $(, $feature:literal)?) => {
        pub mod $name {
            use super::Slabs;

            $(#[target_feature(enable = $feature)])?
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn panel_product(rows: usize, x: *const f32, p: *const f32, k: usize, y: *mut f32, ldy: usize, bias: *const f32, cols: usize) {
                unsafe { $product(rows, x, p, k, y, ldy, bias, cols) }
            }
            $(#[target_feature(enable = $feature)])?
            pub unsafe fn attend(q: &[f32], kv: &Slabs, keys: &[u32], hd: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
                super::attend(q, kv, keys, hd, scale, scores, out)
            }
            $(#[target_feature(enable = $feature)])?
            pub unsafe fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
                super::exp_shifted(x, shift, out)
            }
            $(#[target_feature(enable = $feature)])?
            pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
                super::silu_mul(gate, up, out)
            }
            $(#[target_feature(enable = $feature)])?
            pub unsafe fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
                super::rms_norm(x, w, eps, out)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
variant!(avx2, super::avx2_product::panel_product, "avx2,fma");
variant!(base, super::panel_product);

/// The product for AVX2 in intrinsics: the compiler's vectorisation of the plain kernel spills its
/// accumulators. Same arithmetic as `kernel` (and the AVX-512 kernel): `a · w + acc` per input feature.
#[cfg(target_arch = "x86_64")]
mod avx2_product {
    use std::arch::x86_64::*;

    /// How far ahead (floats) the weight stream is prefetched, as the AVX-512 kernel.
    const PREFETCH: usize = 3072;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const MR: usize>(x: *const f32, p: *const f32, k: usize, y: *mut f32, ldy: usize, bias: *const f32, cols: usize) {
        let mut acc = [[_mm256_setzero_ps(); 4]; MR];
        for kk in 0..k {
            let w = p.add(kk * 32);
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(PREFETCH + 16) as *const i8);
            let wv = [_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8)), _mm256_loadu_ps(w.add(16)), _mm256_loadu_ps(w.add(24))];
            for (m, acc) in acc.iter_mut().enumerate() {
                let a = _mm256_broadcast_ss(&*x.add(m * k + kk));
                for (acc, w) in acc.iter_mut().zip(&wv) {
                    *acc = _mm256_fmadd_ps(a, *w, *acc);
                }
            }
        }
        for (m, acc) in acc.iter().enumerate() {
            let mut t = [0f32; 32];
            for (v, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(t.as_mut_ptr().add(v * 8), *acc);
            }
            for (j, &v) in t.iter().enumerate().take(cols) {
                *y.add(m * ldy + j) = if bias.is_null() { v } else { v + *bias.add(j) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel_product(rows: usize, x: *const f32, p: *const f32, k: usize, y: *mut f32, ldy: usize, bias: *const f32, cols: usize) {
        match rows {
            1 => kernel::<1>(x, p, k, y, ldy, bias, cols),
            _ => kernel::<2>(x, p, k, y, ldy, bias, cols),
        }
    }
}
