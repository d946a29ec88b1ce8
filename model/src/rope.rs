//! Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) with the scalings small models use:
//! linear interpolation, Llama 3.1's frequency-dependent scaling and Phi-3's LongRoPE (arXiv 2402.13753).

use crate::config::{ModelConfig, RopeScaling};
use tch::{Device, Kind, Tensor};

pub struct Rope {
    /// Inverse frequencies for positions up to the original context (or all positions).
    inv_freq: Tensor,
    /// LongRoPE: inverse frequencies used when the batch reaches past `original_max_position_embeddings`.
    inv_freq_long: Option<(Tensor, i64)>,
    /// Multiplies cos and sin (LongRoPE's attention factor; 1 otherwise).
    attention_scaling: f64,
    pub rotary_dim: i64,
}

fn base_inv_freq(theta: f64, dim: i64) -> Vec<f64> {
    (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect()
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: Device) -> Rope {
        let dim = cfg.rotary_dim;
        let base = base_inv_freq(cfg.rope_theta, dim);
        let to_t = |v: Vec<f64>| Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<f32>>()).to(device);
        match &cfg.rope_scaling {
            RopeScaling::Default => {
                Rope { inv_freq: to_t(base), inv_freq_long: None, attention_scaling: 1.0, rotary_dim: dim }
            }
            RopeScaling::Linear { factor } => Rope {
                inv_freq: to_t(base.iter().map(|f| f / factor).collect()),
                inv_freq_long: None,
                attention_scaling: 1.0,
                rotary_dim: dim,
            },
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // Llama 3.1 scaling (Meta's reference implementation, also transformers'
                // _compute_llama3_parameters): long wavelengths are divided by `factor`, short ones kept,
                // and the band between is interpolated smoothly.
                let old = *original_max_position_embeddings;
                let low_wl = old / low_freq_factor;
                let high_wl = old / high_freq_factor;
                let v = base
                    .iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                Rope { inv_freq: to_t(v), inv_freq_long: None, attention_scaling: 1.0, rotary_dim: dim }
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, attention_factor } => {
                // inv_freq = 1 / (ext_factor_i * theta^(2i/d)), with the short factors up to the original
                // context and the long ones past it.
                let s = base.iter().zip(short_factor).map(|(f, e)| f / e).collect();
                let l = base.iter().zip(long_factor).map(|(f, e)| f / e).collect();
                Rope {
                    inv_freq: to_t(s),
                    inv_freq_long: Some((to_t(l), *original_max_position_embeddings)),
                    attention_scaling: *attention_factor,
                    rotary_dim: dim,
                }
            }
        }
    }

    /// The inverse frequencies (short, and LongRoPE's long ones) and the attention scaling (for
    /// [`crate::native`], which computes the same angles per row: fp32 position × fp32 inverse frequency).
    pub(crate) fn tables(&self) -> (&Tensor, Option<&Tensor>, f64) {
        (&self.inv_freq, self.inv_freq_long.as_ref().map(|(t, _)| t), self.attention_scaling)
    }

    pub fn has_long(&self) -> bool {
        self.inv_freq_long.is_some()
    }

    /// Whether LongRoPE's long factors apply to a context reaching `max_position` (transformers' rule:
    /// long when max position + 1 exceeds `original_max_position_embeddings`). Always false without LongRoPE.
    pub fn long_for(&self, max_position: i64) -> bool {
        matches!(&self.inv_freq_long, Some((_, orig)) if max_position + 1 > *orig)
    }

    /// cos and *signed* sin for `position_ids` [B, T], each [B, 1, T, rotary_dim] in `kind`: the sin table's
    /// first half is negated, so that [`Rope::apply`] needs one `roll` instead of splitting, negating and
    /// concatenating halves (`-x2 · sin` and `x2 · (-sin)` are the same floating-point number). `long`
    /// selects LongRoPE's long factors (ignored for other scalings).
    pub fn cos_sin(&self, position_ids: &Tensor, long: bool, kind: Kind) -> (Tensor, Tensor) {
        let inv = match &self.inv_freq_long {
            Some((l, _)) if long => l,
            _ => &self.inv_freq,
        };
        let pos = position_ids.to_kind(Kind::Float).unsqueeze(-1); // [B, T, 1]
        let freqs = pos * inv.view([1, 1, -1]); // [B, T, d/2]
        let (c, s) = (freqs.cos(), freqs.sin());
        let (mut cos, mut sin) = (Tensor::cat(&[&c, &c], -1), Tensor::cat(&[&(-&s), &s], -1));
        if self.attention_scaling != 1.0 {
            cos = cos * self.attention_scaling;
            sin = sin * self.attention_scaling;
        }
        (cos.unsqueeze(1).to_kind(kind), sin.unsqueeze(1).to_kind(kind))
    }

    /// Rotates the first `rotary_dim` features of `x` [B, H, T, head_dim] (any leading shape that `cos` and
    /// `sin` from [`Rope::cos_sin`] broadcast to): `x · cos + rotate_half(x) · sin` with
    /// rotate_half(x) = (−x2, x1), computed as roll(x, half) · signed sin.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let hd = x.size()[3];
        let rd = self.rotary_dim;
        let (rot, pass) = if rd < hd { (x.narrow(3, 0, rd), Some(x.narrow(3, rd, hd - rd))) } else { (x.shallow_clone(), None) };
        let out = &rot * cos + rot.roll([rd / 2], [3]) * sin;
        match pass {
            Some(p) => Tensor::cat(&[out, p], 3),
            None => out,
        }
    }
}
