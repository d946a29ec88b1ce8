//! A decode step of our own for the CPU (x86-64 with AVX-512, fp32): one call per step instead of some
//! twenty libtorch operators per layer.
//!
//! At the batch sizes of sampling (a few to a few dozen rows) a decode step multiplies a handful of rows by
//! every weight matrix, and the eager path pays twice for it: MKL's GEMM is tuned for large products (at 16
//! rows it reads a small model's weights at a third of one core's memory bandwidth), and each of the ~20
//! operators of a layer costs microseconds of dispatch, which for a 4M-parameter model is more than its
//! arithmetic. Here the projections are a GEMM kernel for few rows over weights packed once per `generate`
//! (32-column panels, software-prefetched, in huge pages where the kernel allows), and RMSNorm, rotary
//! embeddings, grouped-query attention over the KV cache, SwiGLU and the residuals are plain loops over the
//! same buffers, with no tensor made between them. The arithmetic is the eager path's (same formulas, fp32,
//! reductions in another order): logits agree to ~1e-6 (tested in `tests/parity.rs`).
//!
//! Used by [`crate::Transformer::forward_cached_with`] for one-token steps when the decode weights were
//! built natively ([`crate::Transformer::decode_weights`]: CPU, fp32, no autocast, AVX-512 present). With
//! several threads (libtorch's intra-op count) a step's products are shared out by panels and everything
//! row-wise (norms, rotations, attention, SwiGLU) by rows over a pool of our own ([`pool`]).
//! `WHET_NATIVE_DECODE=0` turns it off.

mod pool;
mod portable;

use crate::config::ModelConfig;
use pool::{share, Pool};
use crate::kv_cache::KvCache;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Whether this CPU and environment allow the native decode step ([`Isa::detected`]).
pub fn available() -> bool {
    Isa::detected().is_some()
}

/// The kernels a native step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Intrinsics for AVX-512F (`simd`).
    Avx512,
    /// AVX2 + FMA (`portable::avx2`: the product in intrinsics, the rest plain loops vectorised by the
    /// compiler); opt-in, see [`Isa::detected`].
    Avx2,
    /// The plain loops for the baseline target (`portable::base`): every CPU, slowly; for tests.
    Portable,
}

/// Runs one kernel of `isa`'s set with the same arguments (AVX2 exists on x86-64 only).
macro_rules! dispatch {
    ($isa:expr, $f:ident($($a:expr),*)) => {
        match $isa {
            Isa::Avx512 => simd::$f($($a),*),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => portable::avx2::$f($($a),*),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => unreachable!("AVX2 is x86-64 only"),
            Isa::Portable => portable::base::$f($($a),*),
        }
    };
}

impl Isa {
    /// The kernels native steps run: AVX-512 where present; `None` elsewhere (libtorch's operators) and under
    /// `WHET_NATIVE_DECODE=0`. `WHET_NATIVE_ISA=avx2` (where AVX2 + FMA exist) or `portable` picks those
    /// kernels instead. The AVX2 kernels are tested but opt-in: on the AVX-512 machine they were measured on
    /// they only match libtorch's MKL path, and no AVX2-only CPU was at hand to measure them where they would
    /// be the default.
    pub fn detected() -> Option<Isa> {
        static D: OnceLock<Option<Isa>> = OnceLock::new();
        *D.get_or_init(|| {
            if std::env::var("WHET_NATIVE_DECODE").is_ok_and(|v| v == "0") {
                return None;
            }
            match std::env::var("WHET_NATIVE_ISA").as_deref() {
                Ok("avx2") if Isa::Avx2.supported() => Some(Isa::Avx2),
                Ok("portable") => Some(Isa::Portable),
                _ => Isa::Avx512.supported().then_some(Isa::Avx512),
            }
        })
    }

    /// Whether this CPU can run these kernels.
    pub fn supported(self) -> bool {
        match self {
            Isa::Avx512 => simd::detected(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => false,
            Isa::Portable => true,
        }
    }

    /// Rows per call of the product kernel.
    fn rows(self) -> usize {
        match self {
            Isa::Avx512 => ROWS,
            _ => portable::ROWS,
        }
    }

    /// `y[r · ldy + c]` = (`x` [rows][k] × `panel` [k][32])[r][c] + `bias[c]` for c < `cols`.
    ///
    /// SAFETY: `y` must be valid for writes of `y_len` floats, and no other thread may access the elements
    /// written.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel_product(self, rows: usize, x: &[f32], panel: &[f32], k: usize, y: *mut f32, y_len: usize, ldy: usize, bias: Option<&[f32]>, cols: usize) {
        assert!((1..=self.rows()).contains(&rows) && (1..=PANEL).contains(&cols));
        assert!(x.len() >= rows * k && panel.len() >= PANEL * k && y_len >= (rows - 1) * ldy + cols && bias.is_none_or(|b| b.len() >= cols));
        let b = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        // SAFETY: the ISA was checked (`supported`) before these weights were packed; bounds above
        unsafe { dispatch!(self, panel_product(rows, x.as_ptr(), panel.as_ptr(), k, y, ldy, b, cols)) }
    }

    /// Attention of the query heads `q` [g][hd] sharing one KV head over `keys` of `kv` (see [`Slabs`]):
    /// out [g][hd] = softmax(q kᵀ · scale) v; `scores`: scratch of at least g · keys.len().
    #[allow(clippy::too_many_arguments)]
    fn attend(self, q: &[f32], kv: &Slabs, keys: &[u32], hd: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let g = q.len() / hd;
        assert!(q.len() == g * hd && out.len() == g * hd && scores.len() >= g * keys.len() && kv.split <= keys.len());
        for (part, src) in [(&keys[..kv.split], 0), (&keys[kv.split..], 1)] {
            assert!(part.iter().all(|&j| (j as usize + 1) * hd <= kv.k[src].len().min(kv.v[src].len())));
        }
        // SAFETY: as in `panel_product`
        unsafe { dispatch!(self, attend(q, kv, keys, hd, scale, scores, out)) }
    }

    /// out = e^(x − shift), exactly 0 where x = −∞; returns Σ out.
    fn exp_shifted(self, x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        assert_eq!(x.len(), out.len());
        // SAFETY: as in `panel_product`
        unsafe { dispatch!(self, exp_shifted(x, shift, out)) }
    }

    /// out = silu(gate) · up.
    fn silu_mul(self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        assert!(gate.len() == up.len() && up.len() == out.len());
        // SAFETY: as in `panel_product`
        unsafe { dispatch!(self, silu_mul(gate, up, out)) }
    }

    /// out = x / sqrt(mean(x²) + eps) · w (the normalisation first, then the weight, as ATen's `rms_norm`).
    fn rms_norm(self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        assert!(x.len() == w.len() && w.len() == out.len());
        // SAFETY: as in `panel_product`
        unsafe { dispatch!(self, rms_norm(x, w, eps, out)) }
    }
}

/// Whether a network with these weights can decode natively with `isa`.
pub(crate) fn supports(device: Device, kind: Kind, autocast: Option<Kind>, isa: Isa) -> bool {
    device == Device::Cpu && kind == Kind::Float && autocast.is_none() && isa.supported()
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
        // initialised (zero) before any slice of it exists
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
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
    let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
    let mut v = vec![0f32; t.numel()];
    t.copy_data(&mut v, t.numel());
    v
}

/// A linear layer `y = x Wᵀ + b` with `W` [n, k] packed as panels of [`PANEL`] output columns: panel p holds,
/// for each input feature, the weights of columns 32p..32p+32 (zero past n), so the kernel reads the weights
/// once, front to back. The panels live at `off` in the model's arena (one buffer for every matrix, so that
/// all of it is in huge pages).
pub(crate) struct Packed {
    off: usize,
    n: usize,
    k: usize,
    bias: Option<Vec<f32>>,
}

/// Output columns per panel: two vectors of 16, so that each broadcast input value feeds two FMAs.
const PANEL: usize = 32;
/// Rows per kernel call: 14 × 2 accumulators, two weight vectors, the rest for the compiler (32 registers).
/// On the VM this was tuned on, 14×32 beat 16×16 by 15 % at 32 rows (fewer loads per FMA).
const ROWS: usize = 14;

/// Floats the panels of these stacked matrices take.
fn panel_floats(parts: &[&Tensor]) -> usize {
    let n: usize = parts.iter().map(|t| t.size()[0] as usize).sum();
    n.div_ceil(PANEL) * PANEL * parts[0].size()[1] as usize
}

impl Packed {
    /// The rows of `parts` stacked (q, k and v into one matrix, gate and up into another), packed into
    /// `arena[off..]`.
    fn new(pool: &Pool, parts: &[&Tensor], biases: Option<Vec<&Tensor>>, arena: &mut [f32], off: usize) -> Packed {
        let k = parts[0].size()[1] as usize;
        let n: usize = parts.iter().map(|t| t.size()[0] as usize).sum();
        let out = &mut arena[off..off + panel_floats(parts)];
        let data: Vec<Tensor> = parts.iter().map(|t| t.detach().to_kind(Kind::Float).contiguous()).collect();
        // SAFETY: contiguous fp32 CPU tensors of the sizes read, alive until the end of this function
        let rows: Vec<&[f32]> = data
            .iter()
            .flat_map(|t| {
                let all = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) };
                all.chunks_exact(k)
            })
            .collect();
        debug_assert_eq!(rows.len(), n);
        // panel by panel (shared out over the threads), feature by feature: the writes are sequential, the
        // reads 32 row streams
        let (np, threads) = (n.div_ceil(PANEL), pool.threads());
        let outs = Shared::new(out);
        pool.run(&|t| {
            for p in share(np, t, threads) {
                // SAFETY: each panel is one thread's
                let panel = unsafe { outs.part(p * PANEL * k..(p + 1) * PANEL * k) };
                let cols = &rows[p * PANEL..(p * PANEL + PANEL).min(n)];
                for (kk, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = cols.get(j).map_or(0.0, |r| r[kk]);
                    }
                }
            }
        });
        let bias = biases.map(|b| b.iter().flat_map(|t| to_vec(t)).collect());
        Packed { off, n, k, bias }
    }

    fn bytes(&self) -> i64 {
        ((self.n.div_ceil(PANEL) * PANEL * self.k + self.bias.as_ref().map_or(0, |b| b.len())) * 4) as i64
    }

    /// `y` [m, n] = `x` [m, k] Wᵀ + b, the panels shared out over the pool's threads.
    fn forward(&self, isa: Isa, pool: &Pool, arena: &Aligned, x: &[f32], m: usize, y: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let np = n.div_ceil(PANEL);
        let panels = &arena.as_slice()[self.off..self.off + np * PANEL * k];
        let threads = pool.threads();
        let out = Shared::new(&mut y[..m * n]);
        pool.run(&|t| {
            for p in share(np, t, threads) {
                let cols = (n - p * PANEL).min(PANEL);
                let bias = self.bias.as_ref().map(|b| &b[p * PANEL..p * PANEL + cols]);
                // blocks of up to ROWS rows (the kernel's accumulators) against the panel, which stays in L1/L2
                // between them
                let mut s = 0;
                while s < m {
                    let rows = (m - s).min(isa.rows());
                    // SAFETY: thread t writes only the columns of its own panels: `cols` values per row, rows
                    // `n` apart, inside the buffer (checked by panel_product)
                    unsafe {
                        let off = s * n + p * PANEL;
                        let (y, len) = out.at(off);
                        isa.panel_product(rows, &x[s * k..(s + rows) * k], &panels[p * k * PANEL..(p + 1) * k * PANEL], k, y, len, n, bias, cols);
                    }
                    s += rows;
                }
            }
        });
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
    arena: Aligned,
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
    /// Rotary inverse frequencies (short; LongRoPE's long), the attention scaling, the rotated dimensions.
    inv_freq: Vec<f32>,
    inv_freq_long: Option<Vec<f32>>,
    rope_scaling: f32,
    rotary_dim: usize,
    scratch: std::sync::Mutex<Scratch>,
    /// The threads of a step (torch's intra-op thread count when the weights were packed).
    pool: Pool,
    isa: Isa,
}

/// Buffers of a step, kept between steps (fresh ones of a few hundred KB would be new pages every step).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    /// One attention score buffer per thread.
    scores: Vec<Vec<f32>>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// A buffer that the threads of one parallel region write in disjoint parts.
#[derive(Clone, Copy)]
struct Shared(*mut f32, usize);

unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn new(v: &mut [f32]) -> Shared {
        Shared(v.as_mut_ptr(), v.len())
    }
    fn len(&self) -> usize {
        self.1
    }
    /// A pointer to element `off` and the number of elements from there.
    fn at(&self, off: usize) -> (*mut f32, usize) {
        assert!(off <= self.1);
        (self.0.wrapping_add(off), self.1 - off)
    }
    /// `self[range]` to read. SAFETY: no thread writes that range during the region, and the buffer outlives
    /// it.
    unsafe fn read(&self, range: std::ops::Range<usize>) -> &[f32] {
        assert!(range.start <= range.end && range.end <= self.1);
        std::slice::from_raw_parts(self.0.add(range.start), range.end - range.start)
    }
    /// `self[range]`. SAFETY: no two threads of a region take overlapping ranges, and the buffer outlives the
    /// region.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.end - range.start)
    }
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(cfg: &ModelConfig, layers: Vec<LayerParts>, norm: &Tensor, head: &Tensor, embed: &Tensor, rope: &crate::rope::Rope, threads: usize, isa: Isa) -> NativeWeights {
        assert!(isa.supported(), "{isa:?} kernels on a CPU without them");
        let (inv_freq, inv_freq_long, rope_scaling) = rope.tables();
        let (inv_freq, inv_freq_long, rope_scaling) = (to_vec(inv_freq), inv_freq_long.map(to_vec), rope_scaling as f32);
        let pool = Pool::new(threads);
        let _g = tch::no_grad_guard();
        // every matrix in one arena, in the order a step reads them
        let per_layer = |l: &LayerParts| panel_floats(&l.qkv) + panel_floats(&[l.o.0]) + panel_floats(&l.gate_up) + panel_floats(&[l.down.0]);
        let total = layers.iter().map(per_layer).sum::<usize>() + panel_floats(&[head]);
        let mut arena = Aligned::new(total);
        let mut off = 0;
        let mut pack = |parts: &[&Tensor], biases: Option<Vec<&Tensor>>| {
            let p = Packed::new(&pool, parts, biases, arena.as_mut_slice(), off);
            off += panel_floats(parts);
            p
        };
        let layers = layers
            .into_iter()
            .map(|l| Layer {
                input_norm: to_vec(l.input_norm),
                post_norm: to_vec(l.post_norm),
                q_norm: l.q_norm.map(to_vec),
                k_norm: l.k_norm.map(to_vec),
                qkv: pack(&l.qkv, l.qkv_bias),
                o: pack(&[l.o.0], l.o.1.map(|b| vec![b])),
                gate_up: pack(&l.gate_up, l.gate_up_bias),
                down: pack(&[l.down.0], l.down.1.map(|b| vec![b])),
            })
            .collect();
        let head = pack(&[head], None);
        NativeWeights {
            layers,
            norm: to_vec(norm),
            head,
            arena,
            embed: embed.detach().contiguous(),
            eps: cfg.rms_norm_eps as f32,
            n_head: cfg.num_attention_heads as usize,
            n_kv: cfg.num_key_value_heads as usize,
            head_dim: cfg.head_dim as usize,
            hidden: cfg.hidden_size as usize,
            inter: cfg.intermediate_size as usize,
            vocab: cfg.vocab_size as usize,
            window: cfg.sliding_window,
            inv_freq,
            inv_freq_long,
            rope_scaling,
            rotary_dim: rope.rotary_dim as usize,
            scratch: Default::default(),
            pool,
            isa,
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

    /// One decode step: `ids` [B, 1] at `positions` [B, 1] (LongRoPE's long factors if `long`), attending to
    /// the cached keys where `key_mask` [B, past + 1] is nonzero (and always to itself); appends to `cache`.
    /// Returns logits [B, 1, vocab].
    pub(crate) fn step(&self, ids: &Tensor, positions: &Tensor, long: bool, key_mask: &Tensor, cache: &mut KvCache) -> Tensor {
        let b = ids.size()[0] as usize;
        let past = cache.len() as usize;
        let cap = cache.capacity() as usize;
        assert_eq!(cache.batch() as usize, b, "a cache of {} rows for a step of {b}", cache.batch());
        assert_eq!(key_mask.size(), [b as i64, past as i64 + 1], "key mask [rows, cached + 1]");
        let (nh, nkv, hd, h, inter) = (self.n_head, self.n_kv, self.head_dim, self.hidden, self.inter);
        let g = nh / nkv;
        let qkv_w = (nh + 2 * nkv) * hd;
        let host = |t: &Tensor| {
            let t = t.to_kind(Kind::Int64).contiguous().view([-1]);
            let mut v = vec![0i64; b];
            t.copy_data(&mut v, b);
            v
        };
        let (ids, positions) = (host(ids), host(positions));
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Scratch { x, xn, qkv, att, proj, gu, act, scores, cos, sin } = &mut *guard;
        // rotary angles as Rope::cos_sin makes them: cos over both halves, sin negated on the first half
        let rd = self.rotary_dim;
        let half = rd / 2;
        let inv = match &self.inv_freq_long {
            Some(l) if long => l,
            _ => &self.inv_freq,
        };
        let (cos, sin) = (sized(cos, b * rd), sized(sin, b * rd));
        for (r, &p) in positions.iter().enumerate() {
            for (i, &f) in inv.iter().enumerate() {
                let a = p as f32 * f;
                let (mut c, mut s) = (a.cos(), a.sin());
                if self.rope_scaling != 1.0 {
                    c *= self.rope_scaling;
                    s *= self.rope_scaling;
                }
                cos[r * rd + i] = c;
                cos[r * rd + half + i] = c;
                sin[r * rd + i] = -s;
                sin[r * rd + half + i] = s;
            }
        }
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
        // rows holding copies of one prompt (the n samples of a request) read its slots from the group's first
        // row: (that row, how many of the row's keys lie in the shared slots)
        let prefix: Vec<(usize, usize)> = {
            let mut first = std::collections::HashMap::new();
            (0..b)
                .map(|r| match cache.shared_prefix(r) {
                    Some((group, end)) => {
                        let rep = *first.entry(group).or_insert(r);
                        let split = keys[r].partition_point(|&j| (j as i64) < end);
                        // the same keys in the shared slots (the same prompt padding): else the row reads its own
                        if rep != r && keys[rep].partition_point(|&j| (j as i64) < end) == split && keys[rep][..split] == keys[r][..split] {
                            (rep, split)
                        } else {
                            (r, 0)
                        }
                    }
                    None => (r, 0),
                })
                .collect()
        };
        // the residual stream
        let x = sized(x, b * h);
        {
            let vocab = self.vocab;
            let embed = unsafe { std::slice::from_raw_parts(self.embed.data_ptr() as *const f32, vocab * h) };
            for (r, &id) in ids.iter().enumerate() {
                assert!(id >= 0 && (id as usize) < vocab, "token id {id} outside the vocabulary of {vocab}");
                x[r * h..(r + 1) * h].copy_from_slice(&embed[id as usize * h..(id as usize + 1) * h]);
            }
        }
        let (xn, qkv, att, proj) = (sized(xn, b * h), sized(qkv, b * qkv_w), sized(att, b * nh * hd), sized(proj, b * h));
        let (gu, act) = (sized(gu, b * 2 * inter), sized(act, b * inter));
        scores.resize_with(self.pool.threads(), Vec::new);
        for sc in scores.iter_mut() {
            sized(sc, g * total);
        }
        let scores: Vec<Shared> = scores.iter_mut().map(|v| Shared::new(v)).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        // Each layer: products shared out by panels; everything row-wise (norms, rotations, cache writes,
        // attention, SwiGLU, residuals) shared out by rows, one parallel region per stretch between products.
        let threads = self.pool.threads();
        let (eps, isa) = (self.eps, self.isa);
        let (xs, xns) = (Shared::new(x), Shared::new(xn));
        let first_norm = self.layers.first().map_or(&self.norm, |l| &l.input_norm);
        // SAFETY (every region below): thread t touches only rows share(b, t, threads) of each buffer, and a
        // row's cache slots
        self.pool.run(&|t| {
            for r in share(b, t, threads) {
                unsafe { isa.rms_norm(xs.part(r * h..(r + 1) * h), first_norm, eps, xns.part(r * h..(r + 1) * h)) };
            }
        });
        for (li, l) in self.layers.iter().enumerate() {
            l.qkv.forward(self.isa, &self.pool, &self.arena, xn, b, qkv);
            let (kc, vc) = cache.layer_mut(li);
            let kc = Shared(kc.data_ptr() as *mut f32, b * nkv * cap * hd);
            let vc = Shared(vc.data_ptr() as *mut f32, b * nkv * cap * hd);
            let (qkvs, atts, keys, cos, sin) = (Shared::new(qkv), Shared::new(att), &keys, &*cos, &*sin);
            self.pool.run(&|t| {
                let (mut rot, mut normed) = (vec![0f32; rd], vec![0f32; hd]);
                for r in share(b, t, threads) {
                    let row = unsafe { qkvs.part(r * qkv_w..(r + 1) * qkv_w) };
                    let (c, s) = (&cos[r * rd..(r + 1) * rd], &sin[r * rd..(r + 1) * rd]);
                    for head in 0..nh + nkv {
                        let v = &mut row[head * hd..(head + 1) * hd];
                        let w = if head < nh { l.q_norm.as_ref() } else { l.k_norm.as_ref() };
                        if let Some(w) = w {
                            normed.copy_from_slice(v);
                            isa.rms_norm(&normed, w, eps, v);
                        }
                        // x·cos + rotate_half(x)·sin, rotate_half as a roll by half against the signed sin
                        rot.copy_from_slice(&v[..rd]);
                        let (lo, hi) = rot.split_at(half);
                        let (v_lo, v_hi) = v[..rd].split_at_mut(half);
                        for (i, o) in v_lo.iter_mut().enumerate() {
                            *o = lo[i] * c[i] + hi[i] * s[i];
                        }
                        for (i, o) in v_hi.iter_mut().enumerate() {
                            *o = hi[i] * c[half + i] + lo[i] * s[half + i];
                        }
                    }
                    for kh in 0..nkv {
                        let slot = ((r * nkv + kh) * cap + past) * hd;
                        unsafe {
                            kc.part(slot..slot + hd).copy_from_slice(&row[(nh + kh) * hd..(nh + kh + 1) * hd]);
                            vc.part(slot..slot + hd).copy_from_slice(&row[(nh + nkv + kh) * hd..(nh + nkv + kh + 1) * hd]);
                        }
                    }
                    let (rep, split) = prefix[r];
                    // the shared slots end before any slot written in this step
                    let shared_end = if split > 0 { keys[r][split - 1] as usize + 1 } else { 0 };
                    for kh in 0..nkv {
                        let (base, rep_base) = ((r * nkv + kh) * cap * hd, (rep * nkv + kh) * cap * hd);
                        // SAFETY: own slots (this thread's row) and slots of another row below that row's
                        // write slot; no thread writes either during the reads
                        let kv = unsafe {
                            Slabs {
                                k: [kc.read(rep_base..rep_base + shared_end * hd), kc.read(base..base + total * hd)],
                                v: [vc.read(rep_base..rep_base + shared_end * hd), vc.read(base..base + total * hd)],
                                split,
                            }
                        };
                        let q = &row[kh * g * hd..(kh + 1) * g * hd];
                        let (o, sc) = unsafe { (atts.part((r * nh + kh * g) * hd..(r * nh + (kh + 1) * g) * hd), scores[t].part(0..scores[t].len())) };
                        isa.attend(q, &kv, &keys[r], hd, scale, sc, o);
                    }
                }
            });
            l.o.forward(self.isa, &self.pool, &self.arena, att, b, proj);
            let (projs, gus, acts) = (Shared::new(proj), Shared::new(gu), Shared::new(act));
            self.pool.run(&|t| {
                for r in share(b, t, threads) {
                    let (xr, pr) = unsafe { (xs.part(r * h..(r + 1) * h), projs.part(r * h..(r + 1) * h)) };
                    xr.iter_mut().zip(pr.iter()).for_each(|(a, p)| *a += p);
                    unsafe { isa.rms_norm(xr, &l.post_norm, eps, xns.part(r * h..(r + 1) * h)) };
                }
            });
            l.gate_up.forward(self.isa, &self.pool, &self.arena, xn, b, gu);
            self.pool.run(&|t| {
                for r in share(b, t, threads) {
                    let row = unsafe { gus.part(r * 2 * inter..(r + 1) * 2 * inter) };
                    unsafe { isa.silu_mul(&row[..inter], &row[inter..], acts.part(r * inter..(r + 1) * inter)) };
                }
            });
            l.down.forward(self.isa, &self.pool, &self.arena, act, b, proj);
            // the residual, then the next layer's input norm (the final norm after the last layer)
            let next_norm = self.layers.get(li + 1).map_or(&self.norm, |n| &n.input_norm);
            self.pool.run(&|t| {
                for r in share(b, t, threads) {
                    let (xr, pr) = unsafe { (xs.part(r * h..(r + 1) * h), projs.part(r * h..(r + 1) * h)) };
                    xr.iter_mut().zip(pr.iter()).for_each(|(a, p)| *a += p);
                    unsafe { isa.rms_norm(xr, next_norm, eps, xns.part(r * h..(r + 1) * h)) };
                }
            });
        }
        let logits = Tensor::empty([b as i64, 1, self.vocab as i64], (Kind::Float, Device::Cpu));
        {
            let out = unsafe { std::slice::from_raw_parts_mut(logits.data_ptr() as *mut f32, b * self.vocab) };
            self.head.forward(self.isa, &self.pool, &self.arena, xn, b, out);
        }
        cache.advance(1);
        logits
    }
}

/// `out[i] = e^(x[i] − max x)` (exactly 0 where `x[i]` is −∞); returns `(max, Σ out)`. The numerator and
/// denominator of softmax, for [`available`] CPUs only (the rollout crate's sampler on the CPU).
pub fn exp_minus_max(x: &[f32], out: &mut [f32]) -> (f32, f32) {
    let isa = Isa::detected().expect("exp_minus_max is for CPUs with native kernels (available())");
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, isa.exp_shifted(x, max, out))
}

/// Keys and values [slots][hd] of one KV head: `keys[..split]` (slot indices) are read from the first pair of
/// slabs, the rest from the second. Rows that hold copies of one prompt read its slots from one row's slabs,
/// which then stay in cache for the others (see [`crate::KvCache::shared_prefix`]).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Slabs<'a> {
    pub k: [&'a [f32]; 2],
    pub v: [&'a [f32]; 2],
    pub split: usize,
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::Slabs;
    use std::arch::x86_64::*;

    pub fn detected() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// How far ahead (floats) the GEMM kernel prefetches its weight stream: 12 KiB, which on the VM this was
    /// tuned on (Xeon, L3-resident weights) took a 16-row product over a 26M-parameter model from 14 to 7 ms.
    const PREFETCH: usize = 3072;

    /// `y[r · ldy + c]` = (`x` [rows][k] × `panel` [k][32])[r][c] + `bias[c]` (null: none) for c < `cols`.
    /// SAFETY: AVX-512F present; the pointers valid for what is read and written (`Isa::panel_product`
    /// checks the bounds).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel_product(rows: usize, x: *const f32, p: *const f32, k: usize, y: *mut f32, ldy: usize, b: *const f32, cols: usize) {
        unsafe {
            // one instance of the kernel per row count, so that its accumulators are registers
            const _: () = assert!(super::ROWS == 14, "by_rows lists 1 to ROWS");
            macro_rules! by_rows {
                ($($n:literal)+) => {
                    match rows {
                        $($n => kernel::<$n>(x, p, k, y, ldy, b, cols),)+
                        _ => unreachable!("1 to ROWS rows"),
                    }
                };
            }
            by_rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14)
        }
    }

    /// MR rows of `x` (row-major, `k` columns) times a 32-column panel: 2·MR accumulators, two weight vectors
    /// loaded per input feature, each row's value broadcast once for both.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const MR: usize>(x: *const f32, p: *const f32, k: usize, y: *mut f32, ldy: usize, bias: *const f32, cols: usize) {
        let mut lo = [_mm512_setzero_ps(); MR];
        let mut hi = [_mm512_setzero_ps(); MR];
        for kk in 0..k {
            // hints: an address past the buffer's end is never dereferenced
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(kk * 32 + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(kk * 32 + 16 + PREFETCH) as *const i8);
            let w0 = _mm512_loadu_ps(p.add(kk * 32));
            let w1 = _mm512_loadu_ps(p.add(kk * 32 + 16));
            for m in 0..MR {
                let a = _mm512_set1_ps(*x.add(m * k + kk));
                lo[m] = _mm512_fmadd_ps(a, w0, lo[m]);
                hi[m] = _mm512_fmadd_ps(a, w1, hi[m]);
            }
        }
        let (m0, m1) = (tail_mask(cols.min(16)), tail_mask(cols.saturating_sub(16)));
        let (b0, b1) = if bias.is_null() {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        } else {
            (_mm512_maskz_loadu_ps(m0, bias), _mm512_maskz_loadu_ps(m1, bias.wrapping_add(16)))
        };
        for m in 0..MR {
            let (v0, v1) = if bias.is_null() { (lo[m], hi[m]) } else { (_mm512_add_ps(lo[m], b0), _mm512_add_ps(hi[m], b1)) };
            _mm512_mask_storeu_ps(y.add(m * ldy), m0, v0);
            _mm512_mask_storeu_ps(y.wrapping_add(m * ldy + 16), m1, v1);
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

    /// e^x for 16 lanes: Cephes' single-precision method (x = n·ln 2 + r, |r| ≤ ln 2 / 2, a degree-6
    /// polynomial for e^r, scaled by 2^n), within ~2 ulp over the clamped range [-87.3, 88.7].
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.7));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(y, n)
    }

    /// Attention of the `g` query heads `q` [g][hd] that share one KV head, over the keys `keys` of `kv`:
    /// out [g][hd] = softmax(q kᵀ · scale) v. `scores`: scratch of at least g · keys.len().
    #[allow(clippy::too_many_arguments)]
    pub fn attend(q: &[f32], kv: &Slabs, keys: &[u32], hd: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
        let g = q.len() / hd;
        let n = keys.len();
        assert!(q.len() == g * hd && out.len() == g * hd && scores.len() >= g * n && kv.split <= n);
        for (part, src) in [(&keys[..kv.split], 0), (&keys[kv.split..], 1)] {
            assert!(part.iter().all(|&j| (j as usize + 1) * hd <= kv.k[src].len().min(kv.v[src].len())));
        }
        // SAFETY: AVX-512F detected before native weights exist; every index was bounds-checked above
        unsafe {
            let (q, sc, o) = (q.as_ptr(), scores.as_mut_ptr(), out.as_mut_ptr());
            let (k, v) = ([kv.k[0].as_ptr(), kv.k[1].as_ptr()], [kv.v[0].as_ptr(), kv.v[1].as_ptr()]);
            let split = kv.split;
            match hd {
                32 => attend_heads::<2>(q, k, v, keys, split, g, scale, sc, o),
                48 => attend_heads::<3>(q, k, v, keys, split, g, scale, sc, o),
                64 => attend_heads::<4>(q, k, v, keys, split, g, scale, sc, o),
                80 => attend_heads::<5>(q, k, v, keys, split, g, scale, sc, o),
                96 => attend_heads::<6>(q, k, v, keys, split, g, scale, sc, o),
                128 => attend_heads::<8>(q, k, v, keys, split, g, scale, sc, o),
                _ => attend_any(q, k, v, keys, split, hd, g, scale, sc, o),
            }
        }
    }

    /// Lane t = the sum of the lanes of `r[t]`: a transposing reduction of 16 vectors (4 rounds of shuffles
    /// and adds, about 3 instructions per vector instead of 10 for one horizontal sum each).
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_each(r: &[__m512; 16]) -> __m512 {
        let mut s1 = [_mm512_setzero_ps(); 8];
        for i in 0..8 {
            let (a, b) = (r[i], r[i + 8]);
            s1[i] = _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b));
        }
        let mut s2 = [_mm512_setzero_ps(); 4];
        for i in 0..4 {
            let (a, b) = (s1[i], s1[i + 4]);
            s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b));
        }
        let mut s3 = [_mm512_setzero_ps(); 2];
        for i in 0..2 {
            let (a, b) = (s2[i], s2[i + 2]);
            s3[i] = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(a, b), _mm512_shuffle_ps::<0b11_01_11_01>(a, b));
        }
        let (a, b) = (s3[0], s3[1]);
        let s4 = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(a, b), _mm512_shuffle_ps::<0b11_01_11_01>(a, b));
        // s4 holds the sums in the order 0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15 (a permutation that is its own
        // inverse)
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), s4)
    }

    /// [`attend`] for head_dim = 16·C: a query head's C vectors stay in registers, 16 keys' scores are
    /// reduced together ([`sum_each`]), and the weighted sum of values accumulates in registers.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_heads<const C: usize>(q: *const f32, k: [*const f32; 2], v: [*const f32; 2], keys: &[u32], split: usize, g: usize, scale: f32, scores: *mut f32, out: *mut f32) {
        let hd = C * 16;
        let n = keys.len();
        let scale_v = _mm512_set1_ps(scale);
        for qi in 0..g {
            let mut qv = [_mm512_setzero_ps(); C];
            for (c, x) in qv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(q.add(qi * hd + c * 16));
            }
            let row = scores.add(qi * n);
            let mut part = [_mm512_setzero_ps(); 16];
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut jn = 0;
            while jn < n {
                let cnt = (n - jn).min(16);
                for (t, p) in part.iter_mut().enumerate() {
                    *p = if t < cnt {
                        let kj = k[usize::from(jn + t >= split)].add(*keys.get_unchecked(jn + t) as usize * hd);
                        let mut acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
                        for (c, x) in qv.iter().enumerate().skip(1) {
                            acc = _mm512_fmadd_ps(*x, _mm512_loadu_ps(kj.add(c * 16)), acc);
                        }
                        acc
                    } else {
                        _mm512_setzero_ps()
                    };
                }
                let m = if cnt == 16 { 0xffff } else { tail_mask(cnt) };
                let s = _mm512_mul_ps(sum_each(&part), scale_v);
                _mm512_mask_storeu_ps(row.add(jn), m, s);
                max = _mm512_mask_max_ps(max, m, max, s);
                jn += 16;
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < n {
                let m = if i + 16 <= n { 0xffff } else { tail_mask(n - i) };
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row.add(i)), max));
                _mm512_mask_storeu_ps(row.add(i), m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
                i += 16;
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            let mut acc = [_mm512_setzero_ps(); C];
            for (jn, &j) in keys.iter().enumerate() {
                // the normalised weight, as softmax-then-matmul computes it
                let p = _mm512_mul_ps(_mm512_set1_ps(*row.add(jn)), inv);
                let vj = v[usize::from(jn >= split)].add(j as usize * hd);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj.add(c * 16)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(qi * hd + c * 16), *a);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_any(qp: *const f32, kp: [*const f32; 2], vp: [*const f32; 2], keys: &[u32], split: usize, hd: usize, g: usize, scale: f32, sp: *mut f32, op: *mut f32) {
        let n = keys.len();
        let full = hd / 16;
        let tail = tail_mask(hd % 16);
        // scores: each key row read once for all g heads
        for (jn, &j) in keys.iter().enumerate() {
            let kj = kp[usize::from(jn >= split)].add(j as usize * hd);
            for qi in 0..g {
                let qh = qp.add(qi * hd);
                let mut acc = _mm512_setzero_ps();
                for c in 0..full {
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh.add(c * 16)), _mm512_loadu_ps(kj.add(c * 16)), acc);
                }
                if !hd.is_multiple_of(16) {
                    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, qh.add(full * 16)), _mm512_maskz_loadu_ps(tail, kj.add(full * 16)), acc);
                }
                *sp.add(qi * n + jn) = _mm512_reduce_add_ps(acc) * scale;
            }
        }
        // softmax weights
        for qi in 0..g {
            let row = std::slice::from_raw_parts_mut(sp.add(qi * n), n);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s = _mm512_set1_ps(max);
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i < n {
                let m = if i + 16 <= n { 0xffff } else { tail_mask(n - i) };
                let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row.as_ptr().add(i)), s));
                _mm512_mask_storeu_ps(row.as_mut_ptr().add(i), m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
                i += 16;
            }
            let inv = 1.0 / _mm512_reduce_add_ps(sum);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
        // Σ p v, each value row read once for all g heads
        for x in std::slice::from_raw_parts_mut(op, g * hd) {
            *x = 0.0;
        }
        for (jn, &j) in keys.iter().enumerate() {
            let vj = vp[usize::from(jn >= split)].add(j as usize * hd);
            for qi in 0..g {
                let p = _mm512_set1_ps(*sp.add(qi * n + jn));
                let o = op.add(qi * hd);
                for c in 0..full {
                    _mm512_storeu_ps(o.add(c * 16), _mm512_fmadd_ps(p, _mm512_loadu_ps(vj.add(c * 16)), _mm512_loadu_ps(o.add(c * 16))));
                }
                if !hd.is_multiple_of(16) {
                    let (oc, vc) = (o.add(full * 16), vj.add(full * 16));
                    _mm512_mask_storeu_ps(oc, tail, _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(tail, vc), _mm512_maskz_loadu_ps(tail, oc)));
                }
            }
        }
    }

    /// out = e^(x − shift), exactly 0 where x = −∞; returns Σ out.
    pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        assert_eq!(x.len(), out.len());
        // SAFETY: AVX-512F detected (callers check `available`); lengths checked above
        unsafe { exp_shifted_avx512(x, shift, out) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn exp_shifted_avx512(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        let n = x.len();
        let s = _mm512_set1_ps(shift);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = if i + 16 <= n { 0xffff } else { tail_mask(n - i) };
            let v = _mm512_mask_loadu_ps(ninf, m, x.as_ptr().add(i));
            let live = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(v, ninf);
            let e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(v, s)));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, e);
            acc = _mm512_add_ps(acc, e);
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
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel_product(_: usize, _: *const f32, _: *const f32, _: usize, _: *mut f32, _: usize, _: *const f32, _: usize) {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn exp_shifted(_: &[f32], _: f32, _: &mut [f32]) -> f32 {
        unreachable!("native decoding is x86-64 only")
    }
    use super::Slabs;
    #[allow(clippy::too_many_arguments)]
    pub fn attend(_: &[f32], _: &Slabs, _: &[u32], _: usize, _: f32, _: &mut [f32], _: &mut [f32]) {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn silu_mul(_: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("native decoding is x86-64 only")
    }
    pub fn rms_norm(_: &[f32], _: &[f32], _: f32, _: &mut [f32]) {
        unreachable!("native decoding is x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every set of kernels this CPU can run (the portable one always).
    fn isas() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()).collect()
    }

    #[test]
    fn packed_product_equals_the_plain_one() {
        // column counts that are not multiples of 16, row counts across every block size, a bias
        for &(n, k) in &[(40usize, 24usize), (16, 7), (33, 130)] {
            let w = Tensor::from_slice(&values(n * k, n as u64)).view([n as i64, k as i64]);
            let b = Tensor::from_slice(&values(n, 3));
            let split = (n / 3) as i64;
            let parts = [w.narrow(0, 0, split), w.narrow(0, split, n as i64 - split)];
            let biases = [b.narrow(0, 0, split), b.narrow(0, split, n as i64 - split)];
            let mut arena = Aligned::new(panel_floats(&[&w]) + 5);
            let p = Packed::new(&Pool::new(2), &[&parts[0], &parts[1]], Some(vec![&biases[0], &biases[1]]), arena.as_mut_slice(), 5);
            let pools = [Pool::new(1), Pool::new(3)];
            for (m, pool) in [1usize, 2, 3, 5, 8, 15, 16, 17, 31, 35].into_iter().flat_map(|m| pools.iter().map(move |p| (m, p))) {
                let x = values(m * k, m as u64 + 7);
                let mut y = vec![0f32; m * n];
                let want = Tensor::from_slice(&x).view([m as i64, k as i64]).linear(&w, Some(&b));
                let mut first: Option<Vec<f32>> = None;
                for isa in isas() {
                    p.forward(isa, pool, &arena, &x, m, &mut y);
                    let got = Tensor::from_slice(&y).view([m as i64, n as i64]);
                    let d = (got - &want).abs().max().double_value(&[]);
                    assert!(d < 1e-5, "{isa:?} n {n} k {k} m {m} threads {}: {d}", pool.threads());
                    // every kernel adds the same products in the same order
                    assert_eq!(first.get_or_insert_with(|| y.clone()), &y, "{isa:?} n {n} k {k} m {m}");
                }
            }
        }
    }

    #[test]
    fn attention_equals_softmax_of_scores_times_values() {
        for isa in isas() {
            attention_case(isa);
        }
    }

    fn attention_case(isa: Isa) {
        // head sizes with register kernels (64, 96, 128) and without (40), 1–4 query heads per KV head,
        // key lists with holes and of lengths around the 16-key blocks
        for &hd in &[64usize, 96, 128, 40] {
            for &g in &[1usize, 2, 4] {
                for &len in &[1usize, 15, 16, 17, 40] {
                    let slots = len + 9;
                    let q = values(g * hd, (hd * g + len) as u64);
                    let k = values(slots * hd, 11);
                    let v = values(slots * hd, 12);
                    let keys: Vec<u32> = (0..slots as u32).filter(|j| j % 5 != 3).take(len).collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    let mut scores = vec![0f32; g * keys.len()];
                    let mut out = vec![0f32; g * hd];
                    // the first keys from one pair of slabs, the rest from another: each holds NaN where the
                    // other's keys are, so reading a key from the wrong one shows
                    let split = keys.len() / 3;
                    let poison = |x: &[f32], js: &[u32]| {
                        let mut x = x.to_vec();
                        for &j in js {
                            x[j as usize * hd..(j as usize + 1) * hd].fill(f32::NAN);
                        }
                        x
                    };
                    let (k0, v0) = (poison(&k, &keys[split..]), poison(&v, &keys[split..]));
                    let (k1, v1) = (poison(&k, &keys[..split]), poison(&v, &keys[..split]));
                    let kv = Slabs { k: [&k0, &k1], v: [&v0, &v1], split };
                    isa.attend(&q, &kv, &keys, hd, scale, &mut scores, &mut out);
                    for qi in 0..g {
                        let s: Vec<f64> = keys
                            .iter()
                            .map(|&j| (0..hd).map(|d| q[qi * hd + d] as f64 * k[j as usize * hd + d] as f64).sum::<f64>() * scale as f64)
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for d in 0..hd {
                            let want: f64 = keys.iter().zip(&e).map(|(&j, p)| p / z * v[j as usize * hd + d] as f64).sum();
                            let got = out[qi * hd + d] as f64;
                            assert!((got - want).abs() < 1e-5, "{isa:?} hd {hd} g {g} len {len} head {qi} dim {d}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
