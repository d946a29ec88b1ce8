//! Seeded, shardable samplers with an exact resumable state.
//!
//! - [`Sampler`]: shuffles `0..len` once per epoch (the permutation depends only on `(seed, epoch)`), shards it
//!   across data-parallel ranks like PyTorch's `DistributedSampler` (pad by wrapping, or `drop_last`), and keeps
//!   a cursor. [`Sampler::state`] / [`Sampler::restore`] round-trip exactly: a restored sampler yields the next
//!   unseen example, mid-epoch or exactly at an epoch boundary (where verl issue #7401 ran zero steps).
//! - [`MixtureSampler`]: several sources mixed by weight, each with its own sampler; resumable.
//! - [`DomainSampler`]: domain-aware dynamic sampling in the spirit of RuleReasoner (arXiv 2506.08672): domain
//!   weights recomputed from recent rewards, so domains the policy has not mastered are sampled more.
//! - [`DifficultyFilter`]: the hook the RL stage uses to skip prompts whose recent pass rate is outside a band
//!   (all-correct / all-wrong groups carry no GRPO signal).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::SplitMix64;

/// Sampler settings (`[stage.sampler]` in a recipe).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    /// Seed of the per-epoch shuffles (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Shuffle each epoch (default true); `false` walks the data in order.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Stop after this many epochs (default: never stop).
    #[serde(default)]
    pub num_epochs: Option<u64>,
    /// With several ranks, drop the tail so every rank gets `floor(len / world_size)` examples per epoch; default
    /// false pads by wrapping around so every rank gets `ceil(len / world_size)`.
    #[serde(default)]
    pub drop_last: bool,
}

fn yes() -> bool {
    true
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { seed: 0, shuffle: true, num_epochs: None, drop_last: false }
    }
}

/// Everything needed to continue a [`Sampler`] exactly; saved in checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerState {
    /// The sampler's settings.
    pub config: SamplerConfig,
    /// Dataset size the state belongs to (checked on restore).
    pub dataset_len: usize,
    /// Data-parallel world size.
    pub world_size: usize,
    /// This rank.
    pub rank: usize,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Examples of this epoch's shard already handed out.
    pub cursor: usize,
    /// Examples handed out since the start, all epochs.
    pub consumed: u64,
}

/// A seeded, sharded, resumable index sampler.
#[derive(Clone, Debug)]
pub struct Sampler {
    state: SamplerState,
    shard: Vec<usize>,
}

impl Sampler {
    /// A sampler over `0..dataset_len` for `rank` of `world_size`.
    pub fn new(dataset_len: usize, config: SamplerConfig, rank: usize, world_size: usize) -> Result<Self> {
        if dataset_len == 0 {
            return Err(DataError::Sampler("empty dataset".into()));
        }
        if world_size == 0 || rank >= world_size {
            return Err(DataError::Sampler(format!("rank {rank} is not in a world of {world_size}")));
        }
        if config.drop_last && dataset_len < world_size {
            return Err(DataError::Sampler(format!(
                "drop_last with {dataset_len} examples and {world_size} ranks leaves every rank empty"
            )));
        }
        let state = SamplerState { config, dataset_len, world_size, rank, epoch: 0, cursor: 0, consumed: 0 };
        let shard = shard_of(&state);
        Ok(Sampler { state, shard })
    }

    /// A single-rank sampler.
    pub fn single(dataset_len: usize, config: SamplerConfig) -> Result<Self> {
        Self::new(dataset_len, config, 0, 1)
    }

    /// The exact state to checkpoint.
    pub fn state(&self) -> SamplerState {
        self.state.clone()
    }

    /// Continues from a checkpointed state. The dataset size, world size and rank must match.
    pub fn restore(&mut self, state: SamplerState) -> Result<()> {
        if state.dataset_len != self.state.dataset_len {
            return Err(DataError::Sampler(format!(
                "checkpoint was taken on {} examples, this dataset has {}",
                state.dataset_len, self.state.dataset_len
            )));
        }
        if state.world_size != self.state.world_size || state.rank != self.state.rank {
            return Err(DataError::Sampler(format!(
                "checkpoint is for rank {} of {}, this sampler is rank {} of {}",
                state.rank, state.world_size, self.state.rank, self.state.world_size
            )));
        }
        let same_epoch = state.epoch == self.state.epoch && state.config == self.state.config;
        self.state = state;
        if !same_epoch {
            self.shard = shard_of(&self.state);
        }
        if self.state.cursor > self.shard.len() {
            return Err(DataError::Sampler(format!(
                "checkpoint cursor {} is past the epoch's {} examples",
                self.state.cursor,
                self.shard.len()
            )));
        }
        Ok(())
    }

    /// Builds a sampler directly from a state.
    pub fn from_state(state: SamplerState) -> Result<Self> {
        let mut s = Self::new(state.dataset_len, state.config.clone(), state.rank, state.world_size)?;
        s.restore(state)?;
        Ok(s)
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Examples per epoch on this rank.
    pub fn epoch_len(&self) -> usize {
        self.shard.len()
    }

    /// The next example index, or `None` once `num_epochs` are done.
    pub fn next_index(&mut self) -> Option<usize> {
        loop {
            if let Some(max) = self.state.config.num_epochs {
                if self.state.epoch >= max {
                    return None;
                }
            }
            if self.state.cursor < self.shard.len() {
                let i = self.shard[self.state.cursor];
                self.state.cursor += 1;
                self.state.consumed += 1;
                return Some(i);
            }
            // Epoch finished (also when resumed exactly at its end): move to the next one.
            self.state.epoch += 1;
            self.state.cursor = 0;
            self.shard = shard_of(&self.state);
        }
    }

    /// Up to `n` next indices (fewer only when the last epoch ends); batches may span an epoch boundary.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        (0..n).map_while(|_| self.next_index()).collect()
    }
}

impl Iterator for Sampler {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        self.next_index()
    }
}

/// The permutation of `0..n` for an epoch.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        SplitMix64::derive(seed, epoch).shuffle(&mut v);
    }
    v
}

fn shard_of(s: &SamplerState) -> Vec<usize> {
    let n = s.dataset_len;
    let perm = epoch_permutation(n, s.config.seed, s.epoch, s.config.shuffle);
    let w = s.world_size;
    let total = if s.config.drop_last { n / w * w } else { n.div_ceil(w) * w };
    (s.rank..total).step_by(w).map(|j| perm[j % n]).collect()
}

/// Draws from a categorical distribution given non-negative weights (not all zero).
fn categorical(rng: &mut SplitMix64, weights: &[f64]) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let mut u = rng.next_f64() * total;
    let mut last = None;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last = Some(i);
            if u < w {
                return Some(i);
            }
            u -= w;
        }
    }
    last
}

/// One source of a mixture (`[[stage.mix]]` in a recipe).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// Name (for logs and checkpoints).
    pub name: String,
    /// Relative sampling weight (> 0).
    pub weight: f64,
    /// Number of examples.
    pub len: usize,
}

/// Checkpointable state of a [`MixtureSampler`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureState {
    /// Source-choice generator.
    pub rng: SplitMix64,
    /// Per-source sampler states.
    pub sources: Vec<SamplerState>,
    /// Sources whose samplers ran out (`num_epochs`).
    pub exhausted: Vec<bool>,
}

/// Mixes several sources by weight: each draw picks a source with probability proportional to its weight, then
/// takes that source's next example. Each source keeps its own epochs.
#[derive(Clone, Debug)]
pub struct MixtureSampler {
    sources: Vec<MixSource>,
    samplers: Vec<Sampler>,
    rng: SplitMix64,
    exhausted: Vec<bool>,
}

impl MixtureSampler {
    /// A mixture; every source gets a sampler with `config` (its seed offset by the source's position).
    pub fn new(sources: Vec<MixSource>, config: SamplerConfig, rank: usize, world_size: usize) -> Result<Self> {
        if sources.is_empty() {
            return Err(DataError::Sampler("a mixture needs at least one source".into()));
        }
        let mut samplers = Vec::new();
        for (i, s) in sources.iter().enumerate() {
            if !(s.weight > 0.0 && s.weight.is_finite()) {
                return Err(DataError::Sampler(format!("source `{}`: weight must be > 0, got {}", s.name, s.weight)));
            }
            let mut c = config.clone();
            c.seed = config.seed.wrapping_add(i as u64 + 1);
            samplers.push(Sampler::new(s.len, c, rank, world_size).map_err(|e| DataError::Sampler(format!("source `{}`: {e}", s.name)))?);
        }
        let n = sources.len();
        Ok(MixtureSampler { sources, samplers, rng: SplitMix64::derive(config.seed, u64::MAX ^ rank as u64), exhausted: vec![false; n] })
    }

    /// Next `(source index, example index)`, or `None` when every source is exhausted.
    pub fn next_item(&mut self) -> Option<(usize, usize)> {
        loop {
            let weights: Vec<f64> =
                self.sources.iter().zip(&self.exhausted).map(|(s, &x)| if x { 0.0 } else { s.weight }).collect();
            let k = categorical(&mut self.rng, &weights)?;
            match self.samplers[k].next_index() {
                Some(i) => return Some((k, i)),
                None => self.exhausted[k] = true,
            }
        }
    }

    /// The source names.
    pub fn names(&self) -> Vec<&str> {
        self.sources.iter().map(|s| s.name.as_str()).collect()
    }

    /// State to checkpoint.
    pub fn state(&self) -> MixtureState {
        MixtureState { rng: self.rng.clone(), sources: self.samplers.iter().map(|s| s.state()).collect(), exhausted: self.exhausted.clone() }
    }

    /// Continues from a checkpointed state (same sources in the same order).
    pub fn restore(&mut self, state: MixtureState) -> Result<()> {
        if state.sources.len() != self.samplers.len() || state.exhausted.len() != self.samplers.len() {
            return Err(DataError::Sampler(format!(
                "checkpoint has {} sources, this mixture has {}",
                state.sources.len(),
                self.samplers.len()
            )));
        }
        for (s, st) in self.samplers.iter_mut().zip(state.sources) {
            s.restore(st)?;
        }
        self.rng = state.rng;
        self.exhausted = state.exhausted;
        Ok(())
    }
}

/// Settings of [`DomainSampler`] (`[stage.domain_sampling]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSamplingConfig {
    /// Smoothing of each domain's running mean reward: `r̄ ← (1 − α) r̄ + α · batch mean` (default 0.3).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Temperature of the softmax over `1 − r̄` (default 0.5; lower concentrates on weak domains).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Minimum probability of every domain, so none starves (default 0.05, scaled down when there are many).
    #[serde(default = "default_floor")]
    pub min_prob: f64,
    /// Reward assumed for a domain before any is seen (default 0.0: unseen domains look hard).
    #[serde(default)]
    pub initial_reward: f64,
}

fn default_alpha() -> f64 {
    0.3
}
fn default_temperature() -> f64 {
    0.5
}
fn default_floor() -> f64 {
    0.05
}

impl Default for DomainSamplingConfig {
    fn default() -> Self {
        DomainSamplingConfig { alpha: 0.3, temperature: 0.5, min_prob: 0.05, initial_reward: 0.0 }
    }
}

/// Checkpointable state of a [`DomainSampler`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainState {
    /// The mixture over domains.
    pub mixture: MixtureState,
    /// Running mean reward per domain.
    pub mean_reward: Vec<f64>,
}

/// Domain-aware dynamic sampling (the idea of RuleReasoner's DADS, arXiv 2506.08672: domain sampling weights
/// are updated from historical rewards). Each domain keeps an exponential moving average `r̄_d` of the rewards
/// of its recent samples; domain probabilities are `softmax((1 − r̄_d) / τ)` mixed with a floor. The exact
/// update here (EMA, softmax, floor) is this crate's choice, not the paper's equation.
#[derive(Clone, Debug)]
pub struct DomainSampler {
    mixture: MixtureSampler,
    cfg: DomainSamplingConfig,
    mean_reward: Vec<f64>,
}

impl DomainSampler {
    /// One domain per entry of `domain_lens` (name, number of prompts).
    pub fn new(domains: Vec<(String, usize)>, cfg: DomainSamplingConfig, sampler: SamplerConfig, rank: usize, world_size: usize) -> Result<Self> {
        if cfg.temperature.is_nan() || cfg.temperature <= 0.0 || !(0.0..=1.0).contains(&cfg.alpha) || !(0.0..1.0).contains(&cfg.min_prob) {
            return Err(DataError::Sampler("domain sampling needs temperature > 0, 0 <= alpha <= 1, 0 <= min_prob < 1".into()));
        }
        let sources = domains.into_iter().map(|(name, len)| MixSource { name, weight: 1.0, len }).collect();
        let mixture = MixtureSampler::new(sources, sampler, rank, world_size)?;
        let n = mixture.sources.len();
        let mut s = DomainSampler { mixture, mean_reward: vec![cfg.initial_reward; n], cfg };
        s.reweight();
        Ok(s)
    }

    /// Current sampling probability of each domain.
    pub fn probabilities(&self) -> Vec<f64> {
        let total: f64 = self.mixture.sources.iter().map(|s| s.weight).sum();
        self.mixture.sources.iter().map(|s| s.weight / total).collect()
    }

    /// Running mean rewards.
    pub fn mean_rewards(&self) -> &[f64] {
        &self.mean_reward
    }

    fn reweight(&mut self) {
        let n = self.mean_reward.len() as f64;
        let logits: Vec<f64> = self.mean_reward.iter().map(|r| (1.0 - r) / self.cfg.temperature).collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let floor = self.cfg.min_prob.min(1.0 / n);
        for (s, x) in self.mixture.sources.iter_mut().zip(e) {
            s.weight = floor + (1.0 - floor * n) * x / z;
        }
    }

    /// Feeds back the rewards of samples from domain `d` (after a rollout) and recomputes the weights.
    pub fn update(&mut self, domain: usize, rewards: &[f64]) -> Result<()> {
        if domain >= self.mean_reward.len() {
            return Err(DataError::Sampler(format!("no domain {domain}")));
        }
        if rewards.is_empty() {
            return Ok(());
        }
        let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let a = self.cfg.alpha;
        self.mean_reward[domain] = (1.0 - a) * self.mean_reward[domain] + a * mean;
        self.reweight();
        Ok(())
    }

    /// Next `(domain, example index within the domain)`.
    pub fn next_item(&mut self) -> Option<(usize, usize)> {
        self.mixture.next_item()
    }

    /// State to checkpoint.
    pub fn state(&self) -> DomainState {
        DomainState { mixture: self.mixture.state(), mean_reward: self.mean_reward.clone() }
    }

    /// Continues from a checkpointed state.
    pub fn restore(&mut self, state: DomainState) -> Result<()> {
        if state.mean_reward.len() != self.mean_reward.len() {
            return Err(DataError::Sampler("checkpoint has a different number of domains".into()));
        }
        self.mixture.restore(state.mixture)?;
        self.mean_reward = state.mean_reward;
        self.reweight();
        Ok(())
    }
}

/// Difficulty filter settings (`[stage.difficulty_filter]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DifficultyFilterConfig {
    /// Skip prompts whose pass rate is below this (default 0.0: keep everything).
    #[serde(default)]
    pub min_pass_rate: f64,
    /// Skip prompts whose pass rate is above this (default 1.0: keep everything; e.g. 0.9 drops solved prompts).
    #[serde(default = "one")]
    pub max_pass_rate: f64,
    /// Pass rates from fewer attempts than this do not filter (default 1).
    #[serde(default = "one_u")]
    pub min_attempts: u32,
}

fn one() -> f64 {
    1.0
}
fn one_u() -> u32 {
    1
}

impl Default for DifficultyFilterConfig {
    fn default() -> Self {
        DifficultyFilterConfig { min_pass_rate: 0.0, max_pass_rate: 1.0, min_attempts: 1 }
    }
}

/// Per-prompt pass statistics recorded by the RL stage and a keep/skip decision for the sampler. Serialisable,
/// so it checkpoints with the sampler.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DifficultyFilter {
    /// The band of pass rates to keep.
    pub config: DifficultyFilterConfig,
    /// Prompt index → (correct, attempts), latest observation only.
    pub stats: BTreeMap<usize, (u32, u32)>,
}

impl DifficultyFilter {
    /// A filter with the given band.
    pub fn new(config: DifficultyFilterConfig) -> Self {
        DifficultyFilter { config, stats: BTreeMap::new() }
    }

    /// Records the outcome of a group of rollouts for prompt `index` (replacing older outcomes: the policy moved).
    pub fn record(&mut self, index: usize, correct: u32, attempts: u32) {
        self.stats.insert(index, (correct.min(attempts), attempts));
    }

    /// The last pass rate of a prompt, if recorded.
    pub fn pass_rate(&self, index: usize) -> Option<f64> {
        self.stats.get(&index).filter(|(_, n)| *n > 0).map(|&(c, n)| c as f64 / n as f64)
    }

    /// Whether to train on prompt `index` now.
    pub fn keep(&self, index: usize) -> bool {
        match self.stats.get(&index) {
            Some(&(c, n)) if n >= self.config.min_attempts && n > 0 => {
                let p = c as f64 / n as f64;
                p >= self.config.min_pass_rate && p <= self.config.max_pass_rate
            }
            _ => true,
        }
    }

    /// Draws up to `n` indices from `sampler` that the filter keeps, looking at no more than `max_draws` (so a
    /// fully filtered dataset cannot loop forever). Skipped prompts are consumed.
    pub fn next_batch(&self, sampler: &mut Sampler, n: usize, max_draws: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        let mut draws = 0;
        while out.len() < n && draws < max_draws {
            let Some(i) = sampler.next_index() else { break };
            draws += 1;
            if self.keep(i) {
                out.push(i);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64) -> SamplerConfig {
        SamplerConfig { seed, ..Default::default() }
    }

    #[test]
    fn each_epoch_is_a_fresh_permutation() {
        let mut s = Sampler::single(10, cfg(1)).unwrap();
        let e0 = s.next_batch(10);
        let e1 = s.next_batch(10);
        let mut a = e0.clone();
        a.sort();
        assert_eq!(a, (0..10).collect::<Vec<_>>());
        let mut b = e1.clone();
        b.sort();
        assert_eq!(b, (0..10).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        assert_eq!(s.epoch(), 1);
        assert_eq!(e0, epoch_permutation(10, 1, 0, true));
    }

    #[test]
    fn resume_mid_epoch_continues_with_the_next_unseen_example() {
        let mut reference = Sampler::single(17, cfg(5)).unwrap();
        let all: Vec<usize> = reference.next_batch(60);
        for cut in [1, 5, 16, 20, 33, 50] {
            let mut a = Sampler::single(17, cfg(5)).unwrap();
            let first = a.next_batch(cut);
            let json = serde_json::to_string(&a.state()).unwrap();
            let mut b = Sampler::single(17, cfg(5)).unwrap();
            b.restore(serde_json::from_str(&json).unwrap()).unwrap();
            let rest = b.next_batch(60 - cut);
            assert_eq!([first, rest].concat(), all, "cut at {cut}");
        }
    }

    #[test]
    fn resume_exactly_at_an_epoch_boundary_runs_the_next_epoch() {
        // verl #7401: resuming with the cursor at the end of an epoch ran zero steps. Here the next epoch starts.
        let n = 12;
        let mut a = Sampler::single(n, cfg(9)).unwrap();
        let epoch0 = a.next_batch(n);
        let st = a.state();
        assert_eq!((st.epoch, st.cursor), (0, n));
        let mut b = Sampler::from_state(serde_json::from_value(serde_json::to_value(&st).unwrap()).unwrap()).unwrap();
        let next = b.next_batch(n);
        assert_eq!(next.len(), n, "a resumed sampler must not run zero steps");
        assert_eq!(next, epoch_permutation(n, 9, 1, true));
        assert_eq!(b.epoch(), 1);
        let mut uninterrupted = Sampler::single(n, cfg(9)).unwrap();
        assert_eq!(uninterrupted.next_batch(2 * n), [epoch0, next].concat());
    }

    #[test]
    fn num_epochs_limit_survives_resume_at_the_boundary() {
        let c = SamplerConfig { num_epochs: Some(2), ..cfg(3) };
        let mut a = Sampler::single(5, c.clone()).unwrap();
        assert_eq!(a.next_batch(5).len(), 5);
        let mut b = Sampler::from_state(a.state()).unwrap();
        assert_eq!(b.next_batch(100).len(), 5, "exactly one more epoch");
        let mut c2 = Sampler::from_state(b.state()).unwrap();
        assert_eq!(c2.next_index(), None);
    }

    #[test]
    fn ranks_partition_each_epoch() {
        for drop_last in [false, true] {
            let c = SamplerConfig { drop_last, ..cfg(4) };
            let shards: Vec<Vec<usize>> =
                (0..3).map(|r| Sampler::new(10, c.clone(), r, 3).unwrap().next_batch(if drop_last { 3 } else { 4 })).collect();
            let mut all: Vec<usize> = shards.concat();
            let perm = epoch_permutation(10, 4, 0, true);
            if drop_last {
                all.sort();
                let mut expect = perm[..9].to_vec();
                expect.sort();
                assert_eq!(all, expect);
            } else {
                // 12 slots: the 10 examples plus the first two of the permutation again (wrap-around padding).
                all.sort();
                let mut expect = perm.clone();
                expect.extend(&perm[..2]);
                expect.sort();
                assert_eq!(all, expect);
            }
            assert!(shards.iter().all(|s| s.len() == shards[0].len()));
        }
        assert!(Sampler::new(10, cfg(0), 3, 3).is_err());
        let s = Sampler::new(10, cfg(0), 0, 2).unwrap();
        let mut other = Sampler::new(10, cfg(0), 1, 2).unwrap();
        assert!(other.restore(s.state()).is_err());
    }

    #[test]
    fn restore_rejects_a_different_dataset() {
        let a = Sampler::single(10, cfg(0)).unwrap();
        let mut b = Sampler::single(11, cfg(0)).unwrap();
        assert!(b.restore(a.state()).unwrap_err().to_string().contains("10 examples"));
    }

    #[test]
    fn mixture_follows_weights_and_resumes_exactly() {
        let sources = vec![
            MixSource { name: "a".into(), weight: 3.0, len: 7 },
            MixSource { name: "b".into(), weight: 1.0, len: 100 },
        ];
        let mut m = MixtureSampler::new(sources.clone(), cfg(2), 0, 1).unwrap();
        let draws: Vec<(usize, usize)> = (0..4000).map(|_| m.next_item().unwrap()).collect();
        let frac_a = draws.iter().filter(|d| d.0 == 0).count() as f64 / 4000.0;
        assert!((frac_a - 0.75).abs() < 0.03, "{frac_a}");

        let mut x = MixtureSampler::new(sources.clone(), cfg(2), 0, 1).unwrap();
        let head: Vec<_> = (0..123).map(|_| x.next_item().unwrap()).collect();
        let st = serde_json::to_string(&x.state()).unwrap();
        let mut y = MixtureSampler::new(sources, cfg(2), 0, 1).unwrap();
        y.restore(serde_json::from_str(&st).unwrap()).unwrap();
        let tail: Vec<_> = (0..200).map(|_| y.next_item().unwrap()).collect();
        assert_eq!([head, tail].concat(), draws[..323].to_vec());
    }

    #[test]
    fn mixture_stops_when_all_sources_are_exhausted() {
        let c = SamplerConfig { num_epochs: Some(1), ..cfg(0) };
        let sources = vec![MixSource { name: "a".into(), weight: 1.0, len: 3 }, MixSource { name: "b".into(), weight: 5.0, len: 2 }];
        let mut m = MixtureSampler::new(sources, c, 0, 1).unwrap();
        let mut got: Vec<_> = std::iter::from_fn(|| m.next_item()).collect();
        got.sort();
        assert_eq!(got, vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
    }

    #[test]
    fn domain_sampler_shifts_weight_to_low_reward_domains() {
        let doms = vec![("easy".to_string(), 50), ("hard".to_string(), 50)];
        let mut d = DomainSampler::new(doms.clone(), DomainSamplingConfig::default(), cfg(1), 0, 1).unwrap();
        let p0 = d.probabilities();
        assert!((p0[0] - 0.5).abs() < 1e-12);
        for _ in 0..10 {
            d.update(0, &[1.0, 1.0, 1.0, 0.0]).unwrap();
            d.update(1, &[0.0, 0.0, 0.0, 0.0]).unwrap();
        }
        let p = d.probabilities();
        assert!(p[1] > 0.75 && p[0] >= 0.05, "{p:?}");
        assert!((p[0] + p[1] - 1.0).abs() < 1e-12);
        let draws: Vec<_> = (0..2000).map(|_| d.next_item().unwrap()).collect();
        let hard = draws.iter().filter(|x| x.0 == 1).count() as f64 / 2000.0;
        assert!((hard - p[1]).abs() < 0.04, "{hard} vs {}", p[1]);
        // Exact resume, weights included.
        let st = d.state();
        let mut e = DomainSampler::new(doms, DomainSamplingConfig::default(), cfg(1), 0, 1).unwrap();
        e.restore(serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap()).unwrap();
        assert_eq!(e.probabilities(), d.probabilities());
        let a: Vec<_> = (0..50).map(|_| d.next_item().unwrap()).collect();
        let b: Vec<_> = (0..50).map(|_| e.next_item().unwrap()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn difficulty_filter_skips_solved_and_hopeless_prompts() {
        let mut f = DifficultyFilter::new(DifficultyFilterConfig { min_pass_rate: 0.1, max_pass_rate: 0.9, min_attempts: 4 });
        f.record(0, 8, 8); // solved
        f.record(1, 0, 8); // hopeless
        f.record(2, 4, 8); // informative
        f.record(3, 2, 2); // too few attempts to judge
        assert!(!f.keep(0) && !f.keep(1) && f.keep(2) && f.keep(3) && f.keep(4));
        assert_eq!(f.pass_rate(2), Some(0.5));
        let mut s = Sampler::single(5, SamplerConfig { shuffle: false, ..cfg(0) }).unwrap();
        assert_eq!(f.next_batch(&mut s, 3, 100), vec![2, 3, 4]);
        let mut t = Sampler::single(2, SamplerConfig { shuffle: false, ..cfg(0) }).unwrap();
        assert_eq!(f.next_batch(&mut t, 3, 10), Vec::<usize>::new(), "bounded when everything is filtered");
    }
}
