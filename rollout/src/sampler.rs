//! Batched token sampling with per-row parameters.
//!
//! Every operation here is row-wise, so a row's result depends only on its own logits, its parameters and its
//! uniform number `u` — never on the other rows of the batch. Sampling is inverse-CDF in vocabulary order:
//! the filtered distribution's cumulative sum is searched for `u · total`, which picks the first token whose
//! cumulative probability reaches it (a filtered token, of probability 0, can never be picked).

use crate::params::SamplingParams;
use tch::{Device, Kind, Tensor};

/// The per-row parameters of a batch, as device tensors, plus which filters any row needs.
pub struct RowSampling {
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    greedy: Tensor,
    all_greedy: bool,
    any_greedy: bool,
    any_top_k: bool,
    any_top_p: bool,
    any_min_p: bool,
    all_unit_temperature: bool,
    unfiltered_unit_temperature: bool,
    /// The same parameters on the host, for [`RowSampling::sample`] on CPU logits.
    host: Vec<HostParams>,
}

/// One row's parameters as the host sampler reads them (top-k = vocab and top-p = 2 mean no limit).
#[derive(Clone, Copy)]
struct HostParams {
    greedy: bool,
    temperature: f32,
    top_k: i64,
    top_p: f32,
    min_p: f32,
}

/// Sampled tokens of one step.
pub struct Sampled {
    /// `[B]` int64 on the model's device (the next input).
    pub tokens: Tensor,
    /// The same ids on the host.
    pub ids: Vec<i64>,
    /// Log-probability under the distribution sampled from (0 for greedy rows).
    pub logprob_sampled: Vec<f32>,
    /// Log-probability under the model's unmodified distribution.
    pub logprob_model: Vec<f32>,
}

/// Sampled tokens of one step, left on the device ([`RowSampling::sample_on_device`]).
pub struct DeviceSampled {
    /// `[B]` int64.
    pub tokens: Tensor,
    /// `[B]` float32, as [`Sampled::logprob_sampled`].
    pub logprob_sampled: Tensor,
    /// `[B]` float32, as [`Sampled::logprob_model`].
    pub logprob_model: Tensor,
}

impl RowSampling {
    pub fn new(params: &[&SamplingParams], vocab: i64, device: Device) -> RowSampling {
        let greedy: Vec<bool> = params.iter().map(|p| p.is_greedy()).collect();
        let temp: Vec<f32> = params.iter().map(|p| if p.is_greedy() { 1.0 } else { p.temperature }).collect();
        let top_k: Vec<i64> = params.iter().map(|p| if p.top_k <= 0 || p.top_k >= vocab { vocab } else { p.top_k }).collect();
        // rows without a top-p limit get a threshold no cumulative sum reaches, so they are never filtered
        let top_p: Vec<f32> = params.iter().map(|p| if p.top_p >= 1.0 { 2.0 } else { p.top_p }).collect();
        let min_p: Vec<f32> = params.iter().map(|p| p.min_p).collect();
        let b = params.len() as i64;
        let sampled = |i: usize| !greedy[i];
        let any_top_k = (0..params.len()).any(|i| sampled(i) && top_k[i] < vocab);
        let any_top_p = (0..params.len()).any(|i| sampled(i) && top_p[i] < 1.0);
        let any_min_p = (0..params.len()).any(|i| sampled(i) && min_p[i] > 0.0);
        let all_unit_temperature = temp.iter().all(|&t| t == 1.0);
        RowSampling {
            temperature: Tensor::from_slice(&temp).view([b, 1]).to_device(device),
            top_k: Tensor::from_slice(&top_k).view([b, 1]).to_device(device),
            top_p: Tensor::from_slice(&top_p).view([b, 1]).to_device(device),
            min_p: Tensor::from_slice(&min_p).view([b, 1]).to_device(device),
            greedy: Tensor::from_slice(&greedy).to_device(device),
            all_greedy: greedy.iter().all(|&g| g),
            any_greedy: greedy.iter().any(|&g| g),
            any_top_k,
            any_top_p,
            any_min_p,
            all_unit_temperature,
            unfiltered_unit_temperature: all_unit_temperature && !any_top_k && !any_top_p && !any_min_p,
            host: (0..params.len())
                .map(|i| HostParams { greedy: greedy[i], temperature: temp[i], top_k: top_k[i], top_p: top_p[i], min_p: min_p[i] })
                .collect(),
        }
    }

    /// Samples one token per row of `logits` `[B, V]` with uniforms `u` (one per row, in (0, 1]). CPU logits
    /// are sampled on the host row by row ([`RowSampling::sample_host`], where the CPU has the native kernels),
    /// others with tensor operations on their device ([`RowSampling::sample_tensors`]); both compute the same
    /// formulas.
    pub fn sample(&self, logits: &Tensor, u: &[f64]) -> Sampled {
        if logits.device() == Device::Cpu && model::native::available() {
            self.sample_host(logits, u)
        } else {
            self.sample_tensors(logits, u)
        }
    }

    /// [`RowSampling::sample`] in plain loops over each row: on the CPU some twenty tensor operations per step
    /// cost more than the arithmetic of a few dozen rows. Same formulas as [`RowSampling::sample_tensors`]
    /// (softmax as e^(x − max) / Σ, the stable descending sort for top-k / top-p, the inverse CDF counting
    /// the cumulative sums below u · total); exponentials and sums round differently, so a sample can differ
    /// where u falls within rounding of a boundary.
    pub fn sample_host(&self, logits: &Tensor, u: &[f64]) -> Sampled {
        let (b, v) = logits.size2().expect("logits must be [batch, vocab]");
        let (b, v) = (b as usize, v as usize);
        assert_eq!(self.host.len(), b, "sampling parameters for {} rows, logits for {b}", self.host.len());
        let lf = logits.to_kind(Kind::Float).contiguous();
        // SAFETY: a contiguous fp32 CPU tensor of b × v values, alive for this call (no host copy of it)
        let all = unsafe { std::slice::from_raw_parts(lf.data_ptr() as *const f32, b * v) };
        let (mut ids, mut lp_sampled, mut lp_model) = (Vec::with_capacity(b), Vec::with_capacity(b), Vec::with_capacity(b));
        let (mut e, mut scaled, mut probs) = (vec![0f32; v], vec![0f32; v], vec![0f32; v]);
        for (r, p) in self.host.iter().enumerate() {
            let l = &all[r * v..(r + 1) * v];
            let (max, sum) = model::native::exp_minus_max(l, &mut e);
            let (tok, lps) = if p.greedy {
                // the first maximum, as argmax
                (l.iter().position(|&x| x == max).unwrap_or(0), 0.0)
            } else {
                for (s, &x) in scaled.iter_mut().zip(l) {
                    *s = x / p.temperature;
                }
                if p.top_k < v as i64 || p.top_p < 1.0 {
                    let mut order: Vec<u32> = (0..v as u32).collect();
                    // stable: equal values keep vocabulary order
                    order.sort_by(|&a, &b| scaled[b as usize].total_cmp(&scaled[a as usize]));
                    let mut keep = (p.top_k as usize).min(v);
                    if p.top_p < 1.0 {
                        let sorted: Vec<f32> = order[..keep].iter().map(|&i| scaled[i as usize]).collect();
                        let (_, z) = model::native::exp_minus_max(&sorted, &mut probs[..keep]);
                        let inv = 1.0 / z;
                        let mut cum = 0f32;
                        for (rank, &q) in probs[..keep].iter().enumerate() {
                            let q = q * inv;
                            cum += q;
                            // drop a token once the more likely ones already reach top_p
                            if cum - q >= p.top_p {
                                keep = rank;
                                break;
                            }
                        }
                    }
                    for &i in &order[keep..] {
                        scaled[i as usize] = f32::NEG_INFINITY;
                    }
                }
                if p.min_p > 0.0 {
                    let (_, z) = model::native::exp_minus_max(&scaled, &mut probs);
                    let inv = 1.0 / z;
                    let pmax = probs.iter().fold(0f32, |a, &q| a.max(q * inv));
                    for (s, &q) in scaled.iter_mut().zip(&probs) {
                        if q * inv < pmax * p.min_p {
                            *s = f32::NEG_INFINITY;
                        }
                    }
                }
                // a row without temperature or filters has `scaled` = `l`: its exponentials are those above
                let z = if p.temperature == 1.0 && p.top_k >= v as i64 && p.top_p >= 1.0 && p.min_p <= 0.0 {
                    probs.copy_from_slice(&e);
                    sum
                } else {
                    model::native::exp_minus_max(&scaled, &mut probs).1
                };
                let inv = 1.0 / z;
                let target = u[r] as f32;
                let mut cum = 0f32;
                let mut cdf_total = 0f32;
                for q in probs.iter_mut() {
                    *q *= inv;
                    cum += *q;
                    cdf_total = cum;
                }
                let target = target * cdf_total;
                let mut cum = 0f32;
                let mut tok = v - 1;
                for (i, &q) in probs.iter().enumerate() {
                    cum += q;
                    if cum >= target {
                        tok = i;
                        break;
                    }
                }
                (tok, probs[tok].ln())
            };
            ids.push(tok as i64);
            lp_sampled.push(lps);
            // log-softmax as x − max − log Σ e^(x − max)
            lp_model.push(l[tok] - max - sum.ln());
        }
        Sampled { tokens: Tensor::from_slice(&ids), ids, logprob_sampled: lp_sampled, logprob_model: lp_model }
    }

    /// [`RowSampling::sample`] with tensor operations on the logits' device.
    pub fn sample_tensors(&self, logits: &Tensor, u: &[f64]) -> Sampled {
        let b = u.len() as i64;
        let u = Tensor::from_slice(u).to_device(logits.device());
        let s = self.sample_on_device(logits, &u);
        // one device-to-host transfer per step (token ids are exact in f32 below 2^24)
        let host = Tensor::stack(&[s.tokens.to_kind(Kind::Float), s.logprob_sampled, s.logprob_model], 0).to_device(Device::Cpu);
        let host: Vec<f32> = Vec::try_from(host.view([-1])).expect("host copy of sampled tokens");
        let n = b as usize;
        Sampled {
            tokens: s.tokens,
            ids: host[..n].iter().map(|&x| x as i64).collect(),
            logprob_sampled: host[n..2 * n].to_vec(),
            logprob_model: host[2 * n..].to_vec(),
        }
    }

    /// [`RowSampling::sample_tensors`] with the uniforms as a float64 `[B]` tensor on the logits' device and
    /// nothing copied to the host: every operation is a device kernel whose shapes depend only on the batch
    /// and this sampling's parameters, so it can be part of a captured decode step.
    pub fn sample_on_device(&self, logits: &Tensor, u: &Tensor) -> DeviceSampled {
        let device = logits.device();
        let (b, v) = logits.size2().expect("logits must be [batch, vocab]");
        let lf = logits.to_kind(Kind::Float);
        let logp_model = lf.log_softmax(-1, Kind::Float);
        let (tokens, lp_sampled) = if self.all_greedy {
            (lf.argmax(-1, false), Tensor::zeros([b], (Kind::Float, device)))
        } else {
            // Every path computes a row's probabilities the same way (x / 1.0 is exact; filters that remove nothing
            // leave the values as they are), so a row's result never depends on which path its batch takes.
            let probs = if self.unfiltered_unit_temperature {
                lf.softmax(-1, Kind::Float)
            } else {
                let mut scaled = if self.all_unit_temperature { lf.shallow_clone() } else { &lf / &self.temperature };
                if self.any_top_k || self.any_top_p {
                    let (sorted, idx) = scaled.sort_stable(true, -1, true);
                    let mut remove = Tensor::zeros([b, v], (Kind::Bool, device));
                    if self.any_top_k {
                        let rank = Tensor::arange(v, (Kind::Int64, device)).view([1, v]);
                        remove = remove.logical_or(&rank.ge_tensor(&self.top_k));
                    }
                    if self.any_top_p {
                        let probs = sorted.masked_fill(&remove, f64::NEG_INFINITY).softmax(-1, Kind::Float);
                        let before = probs.cumsum(-1, Kind::Float) - &probs;
                        // drop a token once the more likely ones already reach top_p (ties: transformers keeps the
                        // smallest set that reaches it)
                        remove = remove.logical_or(&before.ge_tensor(&self.top_p));
                    }
                    let remove_vocab = Tensor::zeros([b, v], (Kind::Bool, device)).scatter(-1, &idx, &remove);
                    scaled = scaled.masked_fill(&remove_vocab, f64::NEG_INFINITY);
                }
                if self.any_min_p {
                    let probs = scaled.softmax(-1, Kind::Float);
                    let pmax = probs.amax([-1].as_slice(), true);
                    scaled = scaled.masked_fill(&probs.lt_tensor(&(pmax * &self.min_p)), f64::NEG_INFINITY);
                }
                scaled.softmax(-1, Kind::Float)
            };
            let cdf = probs.cumsum(-1, Kind::Float);
            let total = cdf.narrow(1, v - 1, 1);
            let target = u.to_kind(Kind::Float).view([b, 1]) * total;
            let tok = cdf.lt_tensor(&target).sum_dim_intlist(-1, false, Kind::Int64).clamp_max(v - 1);
            let lp = probs.gather(-1, &tok.unsqueeze(-1), false).squeeze_dim(-1).log();
            if self.any_greedy {
                let am = lf.argmax(-1, false);
                (am.where_self(&self.greedy, &tok), lp.masked_fill(&self.greedy, 0.0))
            } else {
                (tok, lp)
            }
        };
        let lp_model = logp_model.gather(-1, &tokens.unsqueeze(-1), false).squeeze_dim(-1);
        DeviceSampled { tokens, logprob_sampled: lp_sampled, logprob_model: lp_model }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: i64, p: f32, m: f32) -> SamplingParams {
        SamplingParams { temperature: t, top_k: k, top_p: p, min_p: m, ..Default::default() }
    }

    fn logits() -> Tensor {
        // probabilities 0.5, 0.25, 0.125, 0.125 (log-space), row-repeated
        Tensor::from_slice(&[0.5f32, 0.25, 0.125, 0.125]).log().view([1, 4])
    }

    fn freq(p: &SamplingParams, n: usize) -> Vec<f64> {
        let rs = RowSampling::new(&[p], 4, Device::Cpu);
        let mut c = vec![0.0; 4];
        for i in 0..n {
            let u = crate::rng::uniform(11, 0, i as u64);
            let s = rs.sample(&logits(), &[u]);
            c[s.ids[0] as usize] += 1.0 / n as f64;
        }
        c
    }

    #[test]
    fn host_and_tensor_sampling_agree() {
        if !model::native::available() {
            eprintln!("skipped: the host sampler needs the native kernels (AVX-512)");
            return;
        }
        tch::manual_seed(3);
        let all = [
            params(1.0, 0, 1.0, 0.0),
            params(0.0, 0, 1.0, 0.0),
            params(0.7, 0, 1.0, 0.0),
            params(1.0, 5, 1.0, 0.0),
            params(0.8, 0, 0.9, 0.0),
            params(1.2, 40, 0.95, 0.0),
            params(1.0, 0, 1.0, 0.05),
            params(0.6, 20, 0.8, 0.02),
        ];
        let refs: Vec<&SamplingParams> = all.iter().collect();
        let rs = RowSampling::new(&refs, 300, Device::Cpu);
        let (mut same, mut total) = (0, 0);
        for step in 0..60u64 {
            // peaked and flat rows, with ties (rounded logits)
            let logits = (Tensor::randn([all.len() as i64, 300], (Kind::Float, Device::Cpu)) * (1 + step % 4) as f64).round_decimals(1);
            let u: Vec<f64> = (0..all.len()).map(|r| crate::rng::uniform(5, r as u64, step)).collect();
            let (h, t) = (rs.sample_host(&logits, &u), rs.sample_tensors(&logits, &u));
            for r in 0..all.len() {
                total += 1;
                if h.ids[r] != t.ids[r] {
                    continue;
                }
                same += 1;
                assert!((h.logprob_model[r] - t.logprob_model[r]).abs() < 1e-5, "row {r} step {step}: model log-prob");
                assert!((h.logprob_sampled[r] - t.logprob_sampled[r]).abs() < 1e-5, "row {r} step {step}: sampled log-prob");
            }
        }
        // the two differ only by rounding, so only a u within rounding of a boundary may pick another token
        assert!(same + 1 >= total, "{same} of {total} samples agree");
    }

    #[test]
    fn inverse_cdf_matches_the_distribution() {
        let f = freq(&params(1.0, 0, 1.0, 0.0), 4000);
        for (got, want) in f.iter().zip([0.5, 0.25, 0.125, 0.125]) {
            assert!((got - want).abs() < 0.03, "{f:?}");
        }
    }

    #[test]
    fn filters_remove_what_they_should() {
        // top-k 2: only tokens 0 and 1, renormalised 2/3, 1/3
        let f = freq(&params(1.0, 2, 1.0, 0.0), 3000);
        assert_eq!(f[2] + f[3], 0.0);
        assert!((f[0] - 2.0 / 3.0).abs() < 0.04, "{f:?}");
        // top-p 0.6: 0.5 alone is below 0.6, so tokens 0 and 1 are kept
        let f = freq(&params(1.0, 0, 0.6, 0.0), 2000);
        assert_eq!(f[2] + f[3], 0.0);
        assert!(f[1] > 0.2);
        // top-p 0.5: token 0 alone reaches it
        let f = freq(&params(1.0, 0, 0.5, 0.0), 500);
        assert!((f[0] - 1.0).abs() < 1e-9, "{f:?}");
        // min-p 0.3: tokens below 0.15 go
        let f = freq(&params(1.0, 0, 1.0, 0.3), 2000);
        assert_eq!(f[2] + f[3], 0.0);
    }

    #[test]
    fn logprobs_are_of_the_sampled_and_the_model_distribution() {
        let p = params(1.0, 2, 1.0, 0.0);
        let rs = RowSampling::new(&[&p], 4, Device::Cpu);
        let s = rs.sample(&logits(), &[1.0]); // u = 1 picks the last kept token (1)
        assert_eq!(s.ids, vec![1]);
        assert!((s.logprob_sampled[0] - (1.0f32 / 3.0).ln()).abs() < 1e-6);
        assert!((s.logprob_model[0] - 0.25f32.ln()).abs() < 1e-6);
        // greedy rows mixed with sampled rows: argmax and logprob 0
        let g = params(0.0, 0, 1.0, 0.0);
        let rs = RowSampling::new(&[&g, &p], 4, Device::Cpu);
        let s = rs.sample(&Tensor::cat(&[logits(), logits()], 0), &[1.0, 1.0]);
        assert_eq!(s.ids, vec![0, 1]);
        assert_eq!(s.logprob_sampled[0], 0.0);
        // a row's result does not depend on the rows next to it
        let alone = RowSampling::new(&[&p], 4, Device::Cpu).sample(&logits(), &[0.3]);
        let other = params(0.7, 0, 0.9, 0.05);
        let mixed = RowSampling::new(&[&other, &p], 4, Device::Cpu).sample(&Tensor::cat(&[logits(), logits()], 0), &[0.9, 0.3]);
        assert_eq!(alone.ids[0], mixed.ids[1]);
        assert_eq!(alone.logprob_sampled[0], mixed.logprob_sampled[1]);
        // an unfiltered temperature-1 row: the fast path alone, the general path next to a filtered row
        let plain = params(1.0, 0, 1.0, 0.0);
        for u in [0.05, 0.4, 0.77, 1.0] {
            let alone = RowSampling::new(&[&plain], 4, Device::Cpu).sample(&logits(), &[u]);
            let mixed = RowSampling::new(&[&p, &plain], 4, Device::Cpu).sample(&Tensor::cat(&[logits(), logits()], 0), &[0.5, u]);
            assert_eq!(alone.ids[0], mixed.ids[1]);
            assert_eq!(alone.logprob_sampled[0], mixed.logprob_sampled[1]);
            assert_eq!(alone.logprob_model[0], mixed.logprob_model[1]);
        }
    }
}
