//! How an optimizer update reaches weights held in bfloat16 or float16, so that small updates are not rounded
//! away (`[model] weight_update`), and the dtype of AdamW's moments (`[model] optimizer_dtype`); the keys are
//! in `settings`, the numerics here.
//!
//! Adding an update `u` straight into a bf16 weight `w` keeps it only when |u| is at least half a unit in the
//! last place of `w`: 2⁻⁹…2⁻⁸ of |w| (bf16 has 8 significant bits). AdamW moves a weight by about `lr` per
//! step, so at lr 5e-7 a weight of 0.02 never moves. The remedies, after Zamirai et al. 2020, "Revisiting
//! BFloat16 Training" (arXiv 2010.06192), and what Megatron, verl and prime-rl do:
//! - `master_fp32`: an fp32 master copy accumulates every update; the bf16 weights (used by the forward, the
//!   backward and the rollout engine) are the master rounded to nearest after each step.
//! - `kahan`: Kahan summation with a compensation buffer in the weights' dtype (Zamirai et al. §4.2): the part
//!   of each update that rounding dropped is kept and added to the next one. Resolution about 2⁻¹⁷ of |w|.
//! - `stochastic_rounding`: the new fp32 value is rounded up or down at random with the probabilities that
//!   make the rounding unbiased (Zamirai et al. §4.1; Gupta et al. 2015). The random bits are a hash of the
//!   run seed, the optimizer step, the parameter and the element, so a resumed run draws the same bits.
//! - `direct`: the update is added in fp32 and rounded to nearest (pure bf16 training; loses small updates).

use tch::{Kind, Tensor};

use crate::settings::{UpdatePrecision, WeightUpdate};

/// What one parameter needs besides its weights to take updates.
pub enum Slot {
    /// fp32 weights: updated in place.
    Full,
    /// fp32 master copy of low-precision weights.
    Master(Tensor),
    /// Kahan compensation, in the weights' dtype.
    Kahan(Tensor),
    Stochastic,
    Direct,
}

impl Slot {
    /// The slot for weights `p` under `update` (fp32 weights need none). Master weights start at the weights
    /// plus a dither `key` draws within their rounding interval (see [`dither`]), so the weights themselves are
    /// unchanged.
    #[cfg(test)]
    pub fn new(p: &Tensor, update: WeightUpdate, key: u64) -> Slot {
        Slot::new_at(p, update, key, 0)
    }

    /// [`Slot::new`] for `p`, the flat piece of a parameter starting at element `offset` (a shard of sharded
    /// data parallelism): its dither is that piece of the whole parameter's.
    pub fn new_at(p: &Tensor, update: WeightUpdate, key: u64, offset: i64) -> Slot {
        if !low_precision(p.kind()) {
            return Slot::Full;
        }
        tch::no_grad(|| match update {
            WeightUpdate::MasterFp32 => Slot::Master(p.detach().to_kind(Kind::Float) + dither_at(p, key, offset)),
            // no dither: a compensation buffer of the weights' dtype holding up to half an ulp would resolve
            // updates 2^8 times more coarsely (measured: 6% of updates lost at lr 5e-7), so Kahan's rounded
            // weights start moving only once the accumulated update passes half an ulp
            WeightUpdate::Kahan => Slot::Kahan(Tensor::zeros_like(p).detach()),
            WeightUpdate::StochasticRounding => Slot::Stochastic,
            WeightUpdate::Direct => Slot::Direct,
        })
    }

    /// The dtype of the extra state the rule keeps for weights of dtype `weights` (none for fp32 weights).
    pub fn kind_for(weights: Kind, update: WeightUpdate) -> Option<Kind> {
        if !low_precision(weights) {
            return None;
        }
        match update {
            WeightUpdate::MasterFp32 => Some(Kind::Float),
            WeightUpdate::Kahan => Some(weights),
            WeightUpdate::StochasticRounding | WeightUpdate::Direct => None,
        }
    }

    /// The state this slot checkpoints (saved as `<prefix>.<param>`), if any.
    pub fn state(&self) -> Option<(&'static str, &Tensor)> {
        match self {
            Slot::Master(t) => Some(("master", t)),
            Slot::Kahan(t) => Some(("kahan", t)),
            _ => None,
        }
    }

    pub fn state_mut(&mut self) -> Option<(&'static str, &mut Tensor)> {
        match self {
            Slot::Master(t) => Some(("master", t)),
            Slot::Kahan(t) => Some(("kahan", t)),
            _ => None,
        }
    }

    /// Applies `p ← decay·p + update` (`update` in fp32, `decay` = 1 − lr·λ or 1) under this slot's rule.
    /// Returns two counts (int64 scalars): the elements whose update fp32 arithmetic keeps (the new fp32 value
    /// differs from the old), and of those, the ones the weights' storage lost (value and compensation
    /// unchanged). Nothing is lost to fp32 weights or fp32 master weights by construction, nor to stochastic
    /// rounding, which keeps every update in expectation; `direct` and `kahan` can lose updates.
    #[cfg(test)]
    pub fn apply(&mut self, p: &mut Tensor, update: &Tensor, decay: f64, key: u64) -> (Tensor, Tensor) {
        self.apply_at(p, update, decay, key, 0)
    }

    /// [`Slot::apply`] to the flat piece of a parameter starting at element `offset`: stochastic rounding
    /// draws that piece of the whole parameter's bits.
    pub fn apply_at(&mut self, p: &mut Tensor, update: &Tensor, decay: f64, key: u64, offset: i64) -> (Tensor, Tensor) {
        let scaled = |w: &Tensor| if decay != 1.0 { w * decay } else { w.copy() };
        let device = p.device();
        let none = || Tensor::zeros([], (Kind::Int64, device));
        let count = |mask: &Tensor| mask.sum(Kind::Int64);
        match self {
            Slot::Full => {
                // the same arithmetic as p.mul_(decay).add_(update), in a copy to see what changed
                let mut new = scaled(p);
                let _ = new.g_add_(update);
                let kept = count(&new.ne_tensor(p));
                p.copy_(&new);
                (none(), kept)
            }
            Slot::Master(master) => {
                let mut new = scaled(master);
                let _ = new.g_add_(update);
                let kept = count(&new.ne_tensor(master));
                master.copy_(&new);
                p.copy_(&new);
                (none(), kept)
            }
            Slot::Kahan(comp) => {
                // Kahan summation: y = change + carried compensation; t = round(w + y); c = y − (t − w).
                let w = p.to_kind(Kind::Float);
                let mut new = scaled(&w);
                let _ = new.g_add_(update);
                let kept = new.ne_tensor(&w);
                let y = (&new - &w) + comp.to_kind(Kind::Float);
                let t = (&w + &y).to_kind(p.kind());
                let c = (&y - (t.to_kind(Kind::Float) - &w)).to_kind(p.kind());
                let lost = kept.logical_and(&t.eq_tensor(p)).logical_and(&c.eq_tensor(comp));
                p.copy_(&t);
                comp.copy_(&c);
                (count(&lost), count(&kept))
            }
            Slot::Stochastic => {
                let w = p.to_kind(Kind::Float);
                let mut new = scaled(&w);
                let _ = new.g_add_(update);
                let kept = count(&new.ne_tensor(&w));
                p.copy_(&stochastic_round_bf16_at(&new, key, offset));
                (none(), kept)
            }
            Slot::Direct => {
                let w = p.to_kind(Kind::Float);
                let mut new = scaled(&w);
                let _ = new.g_add_(update);
                let kept = new.ne_tensor(&w);
                let new = new.to_kind(p.kind());
                let lost = kept.logical_and(&new.eq_tensor(p));
                p.copy_(&new);
                (count(&lost), count(&kept))
            }
        }
    }
}

/// Offsets (fp32) uniform within 98% of each low-precision weight's rounding interval: `w + offset` rounds
/// back to `w`. Master weights that start exactly on the bf16 grid sit at the centre of their interval, so a
/// bf16 copy rounded from them cannot change until the accumulated update passes half an ulp — at lr 3e-6 about
/// 20 steps for a weight of 0.03, at 5e-7 over 100 — and training looks frozen for that long. Starting the
/// master at a uniformly dithered point of the interval (subtractive dither: E[round(w + U + δ)] = w + δ for U
/// uniform over one interval; Schuchman 1964) makes the rounded copy follow the accumulated update from the
/// first step, on average, while it starts equal to the loaded weights. Deterministic in `key`.
#[cfg(test)]
pub fn dither(p: &Tensor, key: u64) -> Tensor {
    dither_at(p, key, 0)
}

/// [`dither`] of the elements `offset…` of a parameter, `p` being those elements.
pub fn dither_at(p: &Tensor, key: u64, offset: i64) -> Tensor {
    let kind = p.kind();
    by_chunks(p, offset, Kind::Float, |w, start, len| {
        let mag = w.abs();
        let bits = mag.view_dtype(Kind::Int16).to_kind(Kind::Int64);
        let at = |b: Tensor| b.to_kind(Kind::Int16).view_dtype(kind).to_kind(Kind::Float);
        let m = mag.to_kind(Kind::Float);
        let up = at(&bits + 1) - &m;
        let down = (&m - at((&bits - 1).clamp_min(0))).where_self(&bits.gt(0), &up);
        let u = ((random_bits16(start, len, key, p.device()).to_kind(Kind::Float) + 0.5) / 65536.0 - 0.5) * 0.98;
        let offset = (&u * &up).where_self(&u.gt(0.0), &(&u * &down));
        offset * w.to_kind(Kind::Float).sign()
    })
}

/// `f` over the flattened `x` in chunks of [`ROUND_CHUNK`] elements (`f` gets the chunk, its start — counted
/// from `offset`, where `x` starts in its whole parameter — and its length), the results gathered into a
/// tensor of `x`'s shape and dtype `kind`: bounds the int64 temporaries of the random bits for an embedding
/// of half a billion weights.
fn by_chunks(x: &Tensor, offset: i64, kind: Kind, f: impl Fn(&Tensor, i64, i64) -> Tensor) -> Tensor {
    let flat = x.contiguous().view([-1]);
    let n = flat.size()[0];
    let out = Tensor::empty([n], (kind, x.device()));
    let mut start = 0;
    while start < n {
        let len = ROUND_CHUNK.min(n - start);
        out.narrow(0, start, len).copy_(&f(&flat.narrow(0, start, len), offset + start, len));
        start += len;
    }
    out.view(x.size().as_slice())
}

/// A 64-bit mix for keys (the model crate's, which seeds adapter dropout too).
pub use model::mix64;

/// The dither key of parameter `index` in a run seeded `seed` (see [`dither`]).
pub fn dither_key(seed: u64, index: usize) -> u64 {
    rounding_key(seed ^ 0xD17E_D17E_D17E_D17E, -1, index)
}

/// The stochastic-rounding key of parameter `index` at optimizer step `step` of a run seeded `seed`.
pub fn rounding_key(seed: u64, step: i64, index: usize) -> u64 {
    mix64(mix64(mix64(seed) ^ step as u64) ^ index as u64)
}

/// Elements hashed per chunk (bounds the int64 temporaries to 128 MB).
const ROUND_CHUNK: i64 = 1 << 24;

/// 16 random bits per element `i` of `[start, start + len)`: a 32-bit integer hash of `i` and `key`, in int64
/// tensor arithmetic that never overflows (values below 2³², multipliers below 2³¹), so it gives the same
/// bits on every device.
fn random_bits16(start: i64, len: i64, key: u64, device: tch::Device) -> Tensor {
    const MASK: i64 = 0xFFFF_FFFF;
    let k1 = (key & 0xFFFF_FFFF) as i64;
    let k2 = (key >> 32) as i64;
    let mut h = Tensor::arange_start(start, start + len, (Kind::Int64, device)).bitwise_xor(k1);
    for (mult, shift) in [(0x7feb_352d_i64, 16), (0x2c1b_3c6d, 15), (0x297a_2d39, 16)] {
        h = (h * mult).bitwise_and(MASK);
        h = h.bitwise_xor(k2).bitwise_xor_tensor(&h.bitwise_right_shift_tensor_scalar(shift));
    }
    h.bitwise_and(0xFFFF)
}

/// Rounds fp32 `x` to bfloat16 stochastically: adds 16 random bits below bf16's last place to the fp32 bit
/// pattern and truncates, so x rounds up with probability (x − down) / (up − down) and the result is unbiased.
/// Deterministic for a given `key`.
#[cfg(test)]
pub fn stochastic_round_bf16(x: &Tensor, key: u64) -> Tensor {
    stochastic_round_bf16_at(x, key, 0)
}

/// [`stochastic_round_bf16`] of the elements `offset…` of a parameter, `x` being those elements.
pub fn stochastic_round_bf16_at(x: &Tensor, key: u64, offset: i64) -> Tensor {
    by_chunks(&x.to_kind(Kind::Float), offset, Kind::BFloat16, |chunk, start, len| {
        let bits = chunk.view_dtype(Kind::Int);
        let noise = random_bits16(start, len, key, x.device()).to_kind(Kind::Int);
        // the sign is the top bit: adding to the pattern rounds the magnitude, so negatives round alike
        (bits + noise).bitwise_and(-65536i64).view_dtype(Kind::Float)
    })
}

/// Training-state bytes per parameter: (weights, what the update rule keeps, gradients, AdamW's moments).
pub fn bytes_per_parameter(weights: Kind, p: &UpdatePrecision) -> [usize; 4] {
    let w = weights.elt_size_in_bytes();
    let extra = match Slot::kind_for(weights, p.update) {
        None => 0,
        Some(k) => k.elt_size_in_bytes(),
    };
    [w, extra, w, 2 * p.state.kind().elt_size_in_bytes()]
}

/// The line the dry run prints for a stage at learning rate `lr`: how small an update the weights keep.
pub fn describe_resolution(weights: Kind, p: &UpdatePrecision, lr: f64) -> String {
    let rel = smallest_kept_update(weights, p.update);
    // AdamW moves a weight by about lr per step (|m̂/√v̂| ≲ 1), so weights larger than lr / rel never move
    let reach = lr / rel;
    let how = match (low_precision(weights), p.update) {
        (false, _) => "float32 weights".to_string(),
        (true, WeightUpdate::MasterFp32) => format!("{weights:?} weights, fp32 master weights"),
        (true, WeightUpdate::Kahan) => format!("{weights:?} weights, Kahan compensation in {weights:?}"),
        (true, WeightUpdate::StochasticRounding) => {
            return format!(
                "{weights:?} weights, stochastic rounding: an update below {rel:.1e} of its weight moves it by a whole ulp with probability |update| / ulp (unbiased); at lr {lr:.1e} that is every weight, on average"
            )
        }
        (true, WeightUpdate::Direct) => format!("{weights:?} weights updated directly"),
    };
    let mut s = format!("{how}: the smallest update kept is {rel:.1e} of the weight; at lr {lr:.1e} (AdamW moves a weight by about lr a step) weights up to |w| ≈ {reach:.1e} move");
    if reach < 0.5 {
        s.push_str(" — most weights of a trained model are larger and will not move: set [model] weight_update = \"master_fp32\"");
    }
    s
}

/// bf16 or fp16: weights that need an update rule (fp32 and fp64 weights take updates in place).
fn low_precision(kind: Kind) -> bool {
    significant_bits(kind) < 24
}

/// Significant bits of a floating dtype (the implicit leading bit included).
pub fn significant_bits(kind: Kind) -> i32 {
    match kind {
        Kind::BFloat16 => 8,
        Kind::Half => 11,
        Kind::Double => 53,
        _ => 24,
    }
}

/// The smallest update, relative to the weight, that the rule keeps (round to nearest keeps an update of at
/// least half an ulp: 2^-bits to 2^-(bits-1) of |w|; this returns the lower end). Kahan's compensation has the
/// weights' dtype, so it resolves about 2^-bits of the weights' half ulp.
pub fn smallest_kept_update(weights: Kind, update: WeightUpdate) -> f64 {
    let bits = match (low_precision(weights), update) {
        (false, _) | (true, WeightUpdate::MasterFp32) => 24,
        (true, WeightUpdate::Kahan) => 2 * significant_bits(weights),
        (true, WeightUpdate::Direct | WeightUpdate::StochasticRounding) => significant_bits(weights),
    };
    2f64.powi(-bits - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn stochastic_rounding_picks_a_neighbour_and_is_unbiased() {
        // 1 + 0.3 ulp (bf16 ulp at 1 is 2^-7): rounds to 1 or 1 + 2^-7, up about 30% of the time
        let ulp = 2f32.powi(-7);
        let x = Tensor::full([200_000], (1.0 + 0.3 * ulp) as f64, (Kind::Float, Device::Cpu));
        let r = stochastic_round_bf16(&x, 42).to_kind(Kind::Float);
        let v: Vec<f32> = Vec::try_from(&r).unwrap();
        assert!(v.iter().all(|&y| y == 1.0 || y == 1.0 + ulp));
        let up = v.iter().filter(|&&y| y > 1.0).count() as f64 / v.len() as f64;
        assert!((up - 0.3).abs() < 0.005, "rounded up {up}");
        // negative values round their magnitude alike
        let r = stochastic_round_bf16(&(-&x), 42).to_kind(Kind::Float);
        let mean = r.mean(Kind::Double).double_value(&[]);
        assert!((mean + 1.0 + 0.3 * ulp as f64).abs() < 0.01 * ulp as f64, "mean {mean}");
        // representable values stay as they are
        let exact = Tensor::from_slice(&[0.5f32, -2.0, 3.0, 0.0]);
        assert_eq!(Vec::<f32>::try_from(&stochastic_round_bf16(&exact, 7).to_kind(Kind::Float)).unwrap(), vec![0.5, -2.0, 3.0, 0.0]);
    }

    #[test]
    fn stochastic_rounding_is_a_function_of_the_key() {
        let x = Tensor::randn([1000], (Kind::Float, Device::Cpu));
        let a = stochastic_round_bf16(&x, 1);
        assert!(a.equal(&stochastic_round_bf16(&x, 1)));
        assert!(!a.equal(&stochastic_round_bf16(&x, 2)));
        assert_ne!(rounding_key(0, 1, 0), rounding_key(0, 2, 0));
        assert_ne!(rounding_key(0, 1, 0), rounding_key(0, 1, 1));
        assert_ne!(rounding_key(0, 1, 0), rounding_key(1, 1, 0));
    }

    /// 200 updates of −lr·(1 ± 10%) into bf16 weights at 1.0, where half an ulp is 2^-8 ≈ 0.0039 ≫ lr.
    /// Returns the mean absolute and the mean signed error of the carried values against the exact sum
    /// (relative to the total change), and the fraction of updates lost.
    fn accumulate(update: WeightUpdate) -> (f64, f64, f64) {
        let lr = 1e-4;
        let mut p = Tensor::ones([4096], (Kind::BFloat16, Device::Cpu));
        let mut slot = Slot::new(&p, update, 3);
        let mut lost = 0i64;
        // the exact sum starts where the rule's carried value starts (the dithered master)
        let mut want = match &slot {
            Slot::Master(m) => m.to_kind(Kind::Double),
            Slot::Kahan(c) => p.to_kind(Kind::Double) + c.to_kind(Kind::Double),
            _ => p.to_kind(Kind::Double),
        };
        for step in 0..200 {
            let u = (Tensor::rand([4096], (Kind::Float, Device::Cpu)) * 0.2 + 0.9) * -lr;
            want += u.to_kind(Kind::Double);
            lost += slot.apply(&mut p, &u, 1.0, rounding_key(9, step, 0)).0.int64_value(&[]);
        }
        let carried = match &slot {
            Slot::Master(m) => m.to_kind(Kind::Double),
            Slot::Kahan(c) => p.to_kind(Kind::Double) + c.to_kind(Kind::Double),
            _ => p.to_kind(Kind::Double),
        };
        let diff = carried - &want;
        let total = 200.0 * lr;
        let abs = diff.abs().mean(Kind::Double).double_value(&[]) / total;
        let bias = diff.mean(Kind::Double).double_value(&[]).abs() / total;
        (abs, bias, lost as f64 / (200.0 * 4096.0))
    }

    #[test]
    fn small_updates_survive_every_rule_but_direct() {
        let (err, bias, lost) = accumulate(WeightUpdate::Direct);
        assert!(err > 0.99 && bias > 0.99 && lost == 1.0, "direct: relative error {err}, lost {lost}");
        let (err, _, lost) = accumulate(WeightUpdate::MasterFp32);
        assert!(err < 1e-3 && lost == 0.0, "master: relative error {err}, lost {lost}");
        let (err, _, lost) = accumulate(WeightUpdate::Kahan);
        assert!(err < 0.02 && lost < 0.01, "kahan: relative error {err}, lost {lost}");
        // unbiased: each weight is noisy (a few ulp of random walk), but the errors average out
        let (err, bias, lost) = accumulate(WeightUpdate::StochasticRounding);
        assert!(bias < 0.05 && err < 1.0 && lost == 0.0, "stochastic: relative error {err}, bias {bias}, lost {lost}");
    }

    #[test]
    fn fp32_weights_take_updates_as_plain_arithmetic() {
        let u = Tensor::from_slice(&[0.5f32, 0.0, 1e-9]);
        let mut p = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let want = &p * 0.9 + &u;
        let mut slot = Slot::new(&p, WeightUpdate::Direct, 0);
        let _ = slot.apply(&mut p, &u, 0.9, 0);
        assert!(p.equal(&want));
        // without decay fp32 keeps one update (1e-9 is below its resolution at 3, 0 is no update) and loses none
        let mut p = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let (lost, kept) = slot.apply(&mut p, &u, 1.0, 0);
        assert_eq!((lost.int64_value(&[]), kept.int64_value(&[])), (0, 1));
    }

    #[test]
    fn dithered_masters_round_back_to_the_weights_and_spread_over_the_interval() {
        for kind in [Kind::BFloat16, Kind::Half] {
            let p = (Tensor::randn([100_000], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kind);
            p.narrow(0, 0, 3).copy_(&Tensor::from_slice(&[0.0f32, 1.0, -0.5]).to_kind(kind)); // zero and powers of two
            let off = dither(&p, 5);
            let master = p.to_kind(Kind::Float) + &off;
            assert!(master.to_kind(kind).equal(&p), "{kind:?}: a dithered master rounds to another value");
            // spread: offsets of both signs, reaching near the interval's edges
            let ulp = ((p.abs().view_dtype(Kind::Int16) + 1).view_dtype(kind).to_kind(Kind::Float) - p.abs().to_kind(Kind::Float)).clamp_min(1e-30);
            let rel = (&off / &ulp).abs().max().double_value(&[]);
            let pos = off.gt(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
            assert!(rel > 0.45 && rel < 0.5 && (pos - 0.5).abs() < 0.01, "{kind:?}: max |offset| / ulp {rel}, positive {pos}");
            assert!(dither(&p, 5).equal(&off) && !dither(&p, 6).equal(&off));
        }
    }

    #[test]
    fn a_dithered_master_moves_the_rounded_weights_from_the_first_step() {
        // 10 updates of −1e-5 at w = 0.03 (half an ulp is 6.1e-5): without dither no weight could flip;
        // with it about (1e-4 / 1.2e-4) of them flip down by one ulp, so the mean follows the update
        let mut p = Tensor::full([50_000], 0.03, (Kind::BFloat16, Device::Cpu));
        let start = p.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let mut slot = Slot::new(&p, WeightUpdate::MasterFp32, 11);
        let u = Tensor::full([50_000], -1e-5, (Kind::Float, Device::Cpu));
        for _ in 0..10 {
            let _ = slot.apply(&mut p, &u, 1.0, 0);
        }
        let moved = p.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]) - start;
        assert!((moved + 1e-4).abs() < 1e-5, "the rounded weights moved by {moved} on average, not -1e-4");
    }

    #[test]
    fn direct_rounding_counts_what_bf16_loses() {
        // bf16 ulp at 1 is 2^-7: an update of 1e-3 is kept by fp32 and lost by bf16; 0.01 survives
        let mut p = Tensor::from_slice(&[1.0f32, 1.0, 1.0]).to_kind(Kind::BFloat16);
        let u = Tensor::from_slice(&[1e-3f32, 0.01, 0.0]);
        let mut slot = Slot::new(&p, WeightUpdate::Direct, 0);
        let (lost, kept) = slot.apply(&mut p, &u, 1.0, 0);
        assert_eq!((lost.int64_value(&[]), kept.int64_value(&[])), (1, 2));
    }

    #[test]
    fn smallest_kept_updates_follow_the_mantissa() {
        assert_eq!(smallest_kept_update(Kind::BFloat16, WeightUpdate::Direct), 2f64.powi(-9));
        assert_eq!(smallest_kept_update(Kind::BFloat16, WeightUpdate::MasterFp32), 2f64.powi(-25));
        assert_eq!(smallest_kept_update(Kind::BFloat16, WeightUpdate::Kahan), 2f64.powi(-17));
        assert_eq!(smallest_kept_update(Kind::Float, WeightUpdate::Direct), 2f64.powi(-25));
        assert_eq!(smallest_kept_update(Kind::Half, WeightUpdate::Direct), 2f64.powi(-12));
    }
}
