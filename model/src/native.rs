//! A decode step of our own for the CPU (x86-64 with AVX-512, fp32): one call per step instead of some
//! twenty libtorch operators per layer.
//!
//! At the batch sizes of sampling (a few to a few dozen rows) a decode step multiplies a handful of rows by
//! every weight matrix, and the eager path pays twice for it: MKL's GEMM is tuned for large products (at 16
//! rows it reads a small model's weights at a third of one core's memory bandwidth), and each of the ~20
//! operators of a layer costs microseconds of dispatch, which for a 4M-parameter model is more than its
//! arithmetic. Here the projections are a GEMM kernel for few rows over weights packed once per `generate`
//! (16-column panels, software-prefetched, in huge pages where the kernel allows), and RMSNorm, rotary
//! embeddings, grouped-query attention over the KV cache, SwiGLU and the residuals are plain loops over the
//! same buffers, with no tensor made between them. The arithmetic is the eager path's (same formulas, fp32,
//! reductions in another order): logits agree to ~1e-6 (tested in `tests/parity.rs`).
//!
//! Used by [`crate::Transformer::forward_cached_with`] for one-token steps when the decode weights were
//! built natively ([`crate::Transformer::decode_weights`]: CPU, fp32, no autocast, AVX-512 present, one
//! torch thread — the kernels are single-threaded, so with more threads libtorch's parallel GEMMs are kept).
//! `WHET_NATIVE_DECODE=0` turns it off.

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Whether this CPU and environment allow the native decode step.
pub fn available() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| std::env::var("WHET_NATIVE_DECODE").map_or(true, |v| v != "0") && simd::detected())
}

/// Whether a network with these weights can decode natively (before any thread-count choice).
pub(crate) fn supports(device: Device, kind: Kind, autocast: Option<Kind>) -> bool {
    device == Device::Cpu && kind == Kind::Float && autocast.is_none() && available()
}

/// A 64-byte (2 MiB when large, advised as a transparent huge page) aligned f32 buffer.
struct Aligned {
    ptr: *mut f32,
    len: usize,
    layout: std::alloc::Layout,
}

// The buffer is written once at construction and only read afterwards.
unsafe impl Send for Aligned {}
unsafe impl Sync for Aligned {}

impl Aligned {
    fn new(len: usize) -> Aligned {
        const HUGE: usize = 2 << 20;
        let bytes = (len * 4).max(64);
        let align = if bytes >= HUGE { HUGE } else { 64 };
        let layout = std::alloc::Layout::from_size_align(bytes.div_ceil(align) * align, align).expect("buffer layout");
        // SAFETY: the layout has a non-zero size
        let ptr = unsafe { std::alloc::alloc(layout) } as *mut f32;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        #[cfg(target_os = "linux")]
        if align == HUGE {
            extern "C" {
                fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
            }
            // MADV_HUGEPAGE before the first touch: streaming the weights then crosses a page boundary (where
            // hardware prefetch stops and the TLB misses) every 2 MiB instead of every 4 KiB. Advice only.
            unsafe { madvise(ptr as *mut _, layout.size(), 14) };
        }
        Aligned { ptr, len, layout }
    }
    fn as_slice(&self) -> &[f32] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.ptr as *mut u8, self.layout) }
    }
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    let t = t.detach().to_kind(Kind::Float).contiguous().view([-1]);
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    v
}

/// A linear layer `y = x Wᵀ + b` with `W` [n, k] packed as panels of 16 output columns: panel p holds, for
/// each input feature, the 16 weights of columns 16p..16p+16 (zero past n), so the kernel reads the weights
/// once, front to back.
pub(crate) struct Packed {
    panels: Aligned,
    n: usize,
    k: usize,
    bias: Option<Vec<f32>>,
}

impl Packed {
    /// The rows of `parts` stacked (q, k and v into one matrix, gate and up into another).
    fn new(parts: &[&Tensor], biases: Option<Vec<&Tensor>>) -> Packed {
        let w: Vec<Vec<f32>> = parts.iter().map(|t| to_vec(t)).collect();
        let k = parts[0].size()[1] as usize;
        let n: usize = parts.iter().map(|t| t.size()[0] as usize).sum();
        let np = n.div_ceil(16);
        let mut panels = Aligned::new(np * k * 16);
        {
            let out = panels.as_mut_slice();
            out.fill(0.0);
            let mut col = 0usize;
            for part in &w {
                for row in part.chunks_exact(k) {
                    let (p, j) = (col / 16, col % 16);
                    for (kk, &v) in row.iter().enumerate() {
                        out[(p * k + kk) * 16 + j] = v;
                    }
                    col += 1;
                }
            }
        }
        let bias = biases.map(|b| b.iter().flat_map(|t| to_vec(t)).collect());
        Packed { panels, n, k, bias }
    }

    fn bytes(&self) -> i64 {
        (self.panels.len * 4 + self.bias.as_ref().map_or(0, |b| b.len() * 4)) as i64
    }

    /// `y` [m, n] = `x` [m, k] Wᵀ + b. `xt`: scratch.
    fn forward(&self, x: &[f32], m: usize, y: &mut [f32], xt: &mut Vec<f32>) {
        let (n, k) = (self.n, self.k);
        debug_assert!(x.len() >= m * k && y.len() >= m * n);
        // row blocks of 16 (the kernel's accumulators), the last one the next power of two
        let mut blocks = Vec::new();
        let mut start = 0;
        while start < m {
            let rem = m - start;
            let mr = if rem >= 16 { 16 } else { rem.next_power_of_two() };
            blocks.push((start, rem.min(mr), mr));
            start += rem.min(mr);
        }
        // each block transposed to [k][mr] (zero rows past m), so that a step of the kernel reads one line
        let total: usize = blocks.iter().map(|b| b.2 * k).sum();
        xt.clear();
        xt.resize(total, 0.0);
        let mut off = 0;
        for &(s, rows, mr) in &blocks {
            for r in 0..rows {
                for (kk, &v) in x[(s + r) * k..(s + r + 1) * k].iter().enumerate() {
                    xt[off + kk * mr + r] = v;
                }
            }
            off += mr * k;
        }
        let panels = self.panels.as_slice();
        let mut tile = [0f32; 256];
        for p in 0..n.div_ceil(16) {
            let panel = &panels[p * k * 16..(p + 1) * k * 16];
            let cols = (n - p * 16).min(16);
            let mut off = 0;
            for &(s, rows, mr) in &blocks {
                simd::panel_product(mr, &xt[off..off + mr * k], panel, k, &mut tile);
                off += mr * k;
                for r in 0..rows {
                    let dst = &mut y[(s + r) * n + p * 16..(s + r) * n + p * 16 + cols];
                    dst.copy_from_slice(&tile[r * 16..r * 16 + cols]);
                    if let Some(b) = &self.bias {
                        for (d, &bv) in dst.iter_mut().zip(&b[p * 16..p * 16 + cols]) {
                            *d += bv;
                        }
                    }
                }
            }
        }
    }
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    qkv: Packed,
    o: Packed,
    gate_up: Packed,
    down: Packed,
}

/// The weights of [`crate::Transformer`] packed for the native decode step.
pub struct NativeWeights {
    layers: Vec<Layer>,
    norm: Vec<f32>,
    head: Packed,
    /// The embedding parameter itself (rows are gathered from it), fp32 and contiguous.
    embed: Tensor,
    eps: f32,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    hidden: usize,
    inter: usize,
    vocab: usize,
    window: Option<i64>,
}

/// One layer's tensors, as [`crate::Transformer`] hands them over.
pub(crate) struct LayerParts<'a> {
    pub input_norm: &'a Tensor,
    pub post_norm: &'a Tensor,
    pub q_norm: Option<&'a Tensor>,
    pub k_norm: Option<&'a Tensor>,
    /// q, k and v (or one fused matrix), with their biases if any.
    pub qkv: Vec<&'a Tensor>,
    pub qkv_bias: Option<Vec<&'a Tensor>>,
    pub o: (&'a Tensor, Option<&'a Tensor>),
    /// gate and up (or one fused matrix), with their biases if any.
    pub gate_up: Vec<&'a Tensor>,
    pub gate_up_bias: Option<Vec<&'a Tensor>>,
    pub down: (&'a Tensor, Option<&'a Tensor>),
}

impl NativeWeights {
    pub(crate) fn new(cfg: &ModelConfig, layers: Vec<LayerParts>, norm: &Tensor, head: &Tensor, embed: &Tensor) -> NativeWeights {
        let _g = tch::no_grad_guard();
        let layers = layers
            .into_iter()
            .map(|l| Layer {
                input_norm: to_vec(l.input_norm),
                post_norm: to_vec(l.post_norm),
                q_norm: l.q_norm.map(to_vec),
                k_norm: l.k_norm.map(to_vec),
                qkv: Packed::new(&l.qkv, l.qkv_bias),
                o: Packed::new(&[l.o.0], l.o.1.map(|b| vec![b])),
                gate_up: Packed::new(&l.gate_up, l.gate_up_bias),
                down: Packed::new(&[l.down.0], l.down.1.map(|b| vec![b])),
            })
            .collect();
        NativeWeights {
            layers,
            norm: to_vec(norm),
            head: Packed::new(&[head], None),
            embed: embed.detach().contiguous(),
            eps: cfg.rms_norm_eps as f32,
            n_head: cfg.num_attention_heads as usize,
            n_kv: cfg.num_key_value_heads as usize,
            head_dim: cfg.head_dim as usize,
            hidden: cfg.hidden_size as usize,
            inter: cfg.intermediate_size as usize,
            vocab: cfg.vocab_size as usize,
            window: cfg.sliding_window,
        }
    }

    /// Bytes of the packed copy (the embedding is shared with the parameters).
    pub fn bytes(&self) -> i64 {
        let l: i64 = self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        l + self.head.bytes()
    }

    /// Whether `cache` is laid out as the step expects (fp32, contiguous, on the CPU).
    pub(crate) fn cache_fits(&self, cache: &mut KvCache) -> bool {
        (0..self.layers.len()).all(|i| {
            let (k, v) = cache.layer_mut(i);
            [k, v].iter().all(|t| t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous())
        })
    }

    /// One decode step: `ids` [B, 1] at the rotary angles `cos`/`sin` ([B, 1, 1, rotary_dim], signed sin as
    /// [`crate::rope::Rope::cos_sin`] makes them), attending to the cached keys where `key_mask` [B, past + 1]
    /// is nonzero (and always to itself); appends to `cache`. Returns logits [B, 1, vocab].
    pub(crate) fn step(&self, ids: &Tensor, cos: &Tensor, sin: &Tensor, key_mask: &Tensor, cache: &mut KvCache) -> Tensor {
        let b = ids.size()[0] as usize;
        let past = cache.len() as usize;
        let cap = cache.capacity() as usize;
        let (nh, nkv, hd, h, inter) = (self.n_head, self.n_kv, self.head_dim, self.hidden, self.inter);
        let g = nh / nkv;
        let qkv_w = (nh + 2 * nkv) * hd;
        let ids: Vec<i64> = {
            let t = ids.to_kind(Kind::Int64).contiguous().view([-1]);
            let mut v = vec![0i64; b];
            t.copy_data(&mut v, b);
            v
        };
        let (cos, sin) = (to_vec(cos), to_vec(sin));
        let rd = cos.len() / b;
        // the keys each row attends to: real keys (and itself), within the sliding window if one applies
        let total = past + 1;
        let keys: Vec<Vec<u32>> = {
            let m = key_mask.to_kind(Kind::Uint8).contiguous().view([-1]);
            let mut v = vec![0u8; b * total];
            m.copy_data(&mut v, b * total);
            let window = self.window.filter(|&w| total as i64 > w);
            (0..b)
                .map(|r| {
                    (0..total)
                        .filter(|&j| (v[r * total + j] != 0 || j == past) && window.is_none_or(|w| ((past - j) as i64) < w))
                        .map(|j| j as u32)
                        .collect()
                })
                .collect()
        };
        // the residual stream
        let mut x = vec![0f32; b * h];
        {
            let vocab = self.vocab;
            let embed = unsafe { std::slice::from_raw_parts(self.embed.data_ptr() as *const f32, vocab * h) };
            for (r, &id) in ids.iter().enumerate() {
                assert!(id >= 0 && (id as usize) < vocab, "token id {id} outside the vocabulary of {vocab}");
                x[r * h..(r + 1) * h].copy_from_slice(&embed[id as usize * h..(id as usize + 1) * h]);
            }
        }
        let mut xn = vec![0f32; b * h];
        let mut qkv = vec![0f32; b * qkv_w];
        let mut att = vec![0f32; b * nh * hd];
        let mut proj = vec![0f32; b * h];
        let mut gu = vec![0f32; b * 2 * inter];
        let mut act = vec![0f32; b * inter];
        let mut xt = Vec::new();
        let mut scores = vec![0f32; total];
        let mut rot = vec![0f32; rd];
        let mut normed = vec![0f32; hd];
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, l) in self.layers.iter().enumerate() {
            for r in 0..b {
                simd::rms_norm(&x[r * h..(r + 1) * h], &l.input_norm, self.eps, &mut xn[r * h..(r + 1) * h]);
            }
            l.qkv.forward(&xn, b, &mut qkv, &mut xt);
            let (kc, vc) = cache.layer_mut(li);
            let kc = unsafe { std::slice::from_raw_parts_mut(kc.data_ptr() as *mut f32, b * nkv * cap * hd) };
            let vc = unsafe { std::slice::from_raw_parts_mut(vc.data_ptr() as *mut f32, b * nkv * cap * hd) };
            for r in 0..b {
                let row = &mut qkv[r * qkv_w..(r + 1) * qkv_w];
                let (c, s) = (&cos[r * rd..(r + 1) * rd], &sin[r * rd..(r + 1) * rd]);
                for head in 0..nh + nkv {
                    let v = &mut row[head * hd..(head + 1) * hd];
                    let w = if head < nh { l.q_norm.as_ref() } else { l.k_norm.as_ref() };
                    if let Some(w) = w {
                        normed.copy_from_slice(v);
                        simd::rms_norm(&normed, w, self.eps, v);
                    }
                    // x·cos + rotate_half(x)·sin, rotate_half as a roll by half against the signed sin
                    rot.copy_from_slice(&v[..rd]);
                    let half = rd / 2;
                    for i in 0..rd {
                        v[i] = rot[i] * c[i] + rot[(i + half) % rd] * s[i];
                    }
                }
                for kh in 0..nkv {
                    let slot = ((r * nkv + kh) * cap + past) * hd;
                    kc[slot..slot + hd].copy_from_slice(&row[(nh + kh) * hd..(nh + kh + 1) * hd]);
                    vc[slot..slot + hd].copy_from_slice(&row[(nh + nkv + kh) * hd..(nh + nkv + kh + 1) * hd]);
                }
                let keys = &keys[r];
                for kh in 0..nkv {
                    let base = (r * nkv + kh) * cap * hd;
                    for qi in 0..g {
                        let qh = kh * g + qi;
                        let q = &row[qh * hd..(qh + 1) * hd];
                        let sc = &mut scores[..keys.len()];
                        for (s, &j) in sc.iter_mut().zip(keys) {
                            let j = j as usize;
                            *s = simd::dot(q, &kc[base + j * hd..base + (j + 1) * hd]) * scale;
                        }
                        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let sum = simd::exp_shifted(sc, max);
                        let out = &mut att[(r * nh + qh) * hd..(r * nh + qh + 1) * hd];
                        out.fill(0.0);
                        for (&p, &j) in sc.iter().zip(keys) {
                            let j = j as usize;
                            simd::axpy(out, p, &vc[base + j * hd..base + (j + 1) * hd]);
                        }
                        let inv = 1.0 / sum;
                        out.iter_mut().for_each(|o| *o *= inv);
                    }
                }
            }
            l.o.forward(&att, b, &mut proj, &mut xt);
            x.iter_mut().zip(&proj).for_each(|(a, p)| *a += p);
            for r in 0..b {
                simd::rms_norm(&x[r * h..(r + 1) * h], &l.post_norm, self.eps, &mut xn[r * h..(r + 1) * h]);
            }
            l.gate_up.forward(&xn, b, &mut gu, &mut xt);
            for r in 0..b {
                let row = &gu[r * 2 * inter..(r + 1) * 2 * inter];
                simd::silu_mul(&row[..inter], &row[inter..], &mut act[r * inter..(r + 1) * inter]);
            }
            l.down.forward(&act, b, &mut proj, &mut xt);
            x.iter_mut().zip(&proj).for_each(|(a, p)| *a += p);
        }
        for r in 0..b {
            simd::rms_norm(&x[r * h..(r + 1) * h], &self.norm, self.eps, &mut xn[r * h..(r + 1) * h]);
        }
        let logits = Tensor::empty([b as i64, 1, self.vocab as i64], (Kind::Float, Device::Cpu));
        {
            let out = unsafe { std::slice::from_raw_parts_mut(logits.data_ptr() as *mut f32, b * self.vocab) };
            self.head.forward(&xn, b, out, &mut xt);
        }
        cache.advance(1);
        logits
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub fn detected() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// How far ahead (floats) the GEMM kernel prefetches its weight stream: ~6 KiB, which on the VM this was
    /// tuned on (Xeon, L3-resident weights) took a 16-row product over a 26M-parameter model from 14 to 7 ms.
    const PREFETCH: usize = 1536;

    /// `tile` [mr][16] = `a` ([k][mr], a transposed row block) × `panel` ([k][16]).
    pub fn panel_product(mr: usize, a: &[f32], panel: &[f32], k: usize, tile: &mut [f32; 256]) {
        assert!(a.len() >= mr * k && panel.len() >= 16 * k && mr <= 16);
        // SAFETY: AVX-512F was detected (`detected`, checked before any native weights exist); the bounds
        // were checked above.
        unsafe {
            match mr {
                16 => kernel::<16>(a.as_ptr(), panel.as_ptr(), k, tile.as_mut_ptr()),
                8 => kernel::<8>(a.as_ptr(), panel.as_ptr(), k, tile.as_mut_ptr()),
                4 => kernel::<4>(a.as_ptr(), panel.as_ptr(), k, tile.as_mut_ptr()),
                2 => kernel::<2>(a.as_ptr(), panel.as_ptr(), k, tile.as_mut_ptr()),
                1 => kernel::<1>(a.as_ptr(), panel.as_ptr(), k, tile.as_mut_ptr()),
                _ => unreachable!("row blocks are powers of two up to 16"),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const MR: usize>(a: *const f32, p: *const f32, k: usize, out: *mut f32) {
        let mut acc = [_mm512_setzero_ps(); MR];
        for kk in 0..k {
            // a hint: an address past the buffer's end is never dereferenced
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(kk * 16 + PREFETCH) as *const i8);
            let w = _mm512_loadu_ps(p.add(kk * 16));
            for (m, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(kk * MR + m)), w, *acc);
            }
        }
        for (m, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(m * 16), *acc);
        }
    }

    #[inline]
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Σ a·b.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        unsafe { dot_avx512(a, b) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)), acc);
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)), acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// y += alpha · x.
    pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        assert_eq!(y.len(), x.len());
        unsafe { axpy_avx512(y, alpha, x) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn axpy_avx512(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len();
        let a = _mm512_set1_ps(alpha);
        let mut i = 0;
        while i + 16 <= n {
            let p = y.as_mut_ptr().add(i);
            _mm512_storeu_ps(p, _mm512_fmadd_ps(a, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(p)));
            i += 16;
        }
        if i < n {
            let m = tail_mask(n - i);
            let p = y.as_mut_ptr().add(i);
            _mm512_mask_storeu_ps(p, m, _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, p)));
        }
    }

    /// e^x for 16 lanes: Cephes' single-precision method (x = n·ln 2 + r, |r| ≤ ln 2 / 2, a degree-6
    /// polynomial for e^r, scaled by 2^n), within ~2 ulp over the clamped range [-87.3, 88.7].
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.7));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }

    /// v ← e^(v − shift) in place; returns the sum.
    pub fn exp_shifted(v: &mut [f32], shift: f32) -> f32 {
        unsafe { exp_shifted_avx512(v, shift) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn exp_shifted_avx512(v: &mut [f32], shift: f32) -> f32 {
        let n = v.len();
        let s = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = if i + 16 <= n { 0xffff } else { tail_mask(n - i) };
            let p = v.as_mut_ptr().add(i);
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p), s));
            _mm512_mask_storeu_ps(p, m, e);
            acc = _mm512_mask_add_ps(acc, m, acc, e);
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    /// out = silu(gate) · up, silu(g) = g / (1 + e^−g).
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        assert!(gate.len() == up.len() && up.len() == out.len());
        unsafe { silu_mul_avx512(gate, up, out) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = gate.len();
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = if i + 16 <= n { 0xffff } else { tail_mask(n - i) };
            let g = _mm512_maskz_loadu_ps(m, gate.as_ptr().add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, up.as_ptr().add(i))));
            i += 16;
        }
    }

    /// out = x / sqrt(mean(x²) + eps) · w (the normalisation first, then the weight, as ATen's `rms_norm`).
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        assert!(x.len() == w.len() && w.len() == out.len());
        let ss = dot(x, x);
        let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((o, &a), &b) in out.iter_mut().zip(x).zip(w) {
            *o = a * inv * b;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    //! No native kernels on this architecture: `detected` is false, so nothing below is ever called.
    pub fn detected() -> bool {
        false
    }
    pub fn panel_product(_: usize, _: &[f32], _: &[f32], _: usize, _: &mut [f32; 256]) {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn dot(_: &[f32], _: &[f32]) -> f32 {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn axpy(_: &mut [f32], _: f32, _: &[f32]) {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn exp_shifted(_: &mut [f32], _: f32) -> f32 {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn silu_mul(_: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn rms_norm(_: &[f32], _: &[f32], _: f32, _: &mut [f32]) {
        unreachable!("native decoding is x86-64 only")
    }
}
