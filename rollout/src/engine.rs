//! The generation engine: batches of sequences decoded together over one KV cache, refilled as rows finish.
//!
//! * A `generate` call queues every request's group of samples in request order. A batch (a **wave**) takes
//!   from the front at most `max_batch_seqs` rows and `rows × (longest prompt + largest max_new_tokens)` cache
//!   tokens within `cache_budget_tokens` (a group that does not fit is split; each part encodes the prompt
//!   again). A single sequence that cannot fit the budget is an error.
//! * **Prefill once per group**: a batch's distinct prompts are left-padded and encoded together (in chunks of
//!   positions, so that activations of long prompts stay near 256 MiB; the output head runs on the last
//!   position only), then the cache rows are repeated `n` times for the group's samples.
//! * **Decoding**: one forward per step for all live rows, on a fused copy of the projection weights
//!   (`model::Transformer::decode_weights`; `fuse_weights`) — on an AVX-512 CPU in fp32 the native decode step
//!   (`model::native`: one call per step, our own kernels, libtorch's thread count); sampling happens with
//!   per-row parameters ([`crate::sampler`]: tensor operations on the device, on the host for CPU logits); one
//!   small host transfer per step reads the tokens and log-probabilities. The samples of one prompt share its
//!   cached slots (`KvCache::shared_prefix`), which the native step reads once for all of them.
//! * **Finished rows stop costing compute**: once `compact_fraction` of the rows have finished, they are dropped
//!   from the cache, the mask and the positions (`KvCache::select_rows`).
//! * **Slot refill** (`slot_refill`): after such a drop, queued groups join the running batch as far as
//!   `max_batch_seqs` and the budget allow. Their prompts are encoded on their own; then the running cache
//!   and theirs are right-aligned in one new cache (`KvCache::concat_right_aligned`: positions that no live
//!   row attends to any more are dropped, the positions before each row's content are masked like left
//!   padding, keys keep their rotary positions), sized for what every row may still write. A new wave
//!   starts only when a batch has emptied with work still queued.

use crate::error::{Result, RolloutError};
use crate::params::{Completion, FinishReason, Request, SamplingParams};
use crate::rng;
use crate::sampler::RowSampling;
use crate::stop::{StopMatcher, TokenDecoder};
use model::{KvCache, Transformer};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use tch::{Kind, Tensor};

mod static_wave;

/// Engine settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Most sequences decoded together (rows of one wave). Default 256.
    pub max_batch_seqs: usize,
    /// Most KV cache positions over all rows of a wave (rows × (longest prompt + largest max_new_tokens)).
    /// Memory is this times `KvCache::bytes_per_token`. Default 262144.
    pub cache_budget_tokens: i64,
    /// End-of-sequence token ids that end a sample unless the request sets `ignore_eos`.
    pub eos_token_ids: Vec<i64>,
    /// Id used to left-pad prompts (padding is masked out; any valid id works). Default 0.
    pub pad_token_id: i64,
    /// Seed for requests that set none (mixed with the request's position in the call). Default 0.
    pub seed: u64,
    /// Drop finished rows from the cache once at least this fraction of the wave's rows has finished
    /// (0 = at every finish). Default 0.125.
    pub compact_fraction: f64,
    /// LongRoPE: force the long (`true`) or short factors; default: chosen per wave from the cache capacity.
    pub rope_long: Option<bool>,
    /// Prompt positions per prefill forward; 0 (default) = automatic: as many as keep the prefill's largest
    /// activation (the MLP's gate and up outputs) near 256 MiB, at least 16. Only the last prompt position
    /// gets logits.
    pub prefill_chunk: usize,
    /// Decode with a per-call copy of the projection weights laid out for speed (q/k/v and gate/up
    /// concatenated, cast to the autocast dtype; on an AVX-512 CPU in fp32 packed for the native decode step:
    /// `model::Transformer::decode_weights`). Costs the bytes of the attention and MLP weights while `generate`
    /// runs; `false` decodes on the parameters themselves with libtorch's operators. Default true.
    pub fuse_weights: bool,
    /// Slot refill: when finished rows leave the batch (see `compact_fraction`), sequences still waiting
    /// join it, their prompts encoded on their own and their cache rows merged in, within `max_batch_seqs`
    /// and `cache_budget_tokens` (the merge briefly holds the old and the new cache). Default true; false
    /// runs waiting sequences in a later wave.
    pub slot_refill: bool,
    /// Static decoding (`engine/static_wave.rs`): every step of a wave has the same shapes and reads nothing
    /// back to the host (the key written at a slot given as a device tensor, attention over a fixed span with
    /// a mask, sampling and its uniforms on the device), and the host reads tokens every `sync_every` steps.
    /// On a CUDA device each step is then a replayed CUDA graph (`cuda_graphs`). No slot refill; finished
    /// rows leave at the reads. Same results as the dynamic path up to floating-point rounding. Default false
    /// (the dynamic path; on an AVX-512 CPU its native step is the fast one).
    pub static_decode: bool,
    /// Static decoding: decode steps between host reads (stop checks). A row that ends is noticed up to this
    /// many steps late (the extra samples are dropped). Default 16.
    pub sync_every: usize,
    /// Static decoding on a CUDA device: record each step shape (batch bucket × attention span) as a CUDA
    /// graph once and replay it (needs a binary built with the CUDA-graph shim; otherwise steps run eagerly).
    /// Default true.
    pub cuda_graphs: bool,
    /// Static decoding: pad the batch to a graph bucket and compact only into smaller buckets. `None`
    /// (default): exactly when CUDA graphs are used. For tests of that path where graphs cannot run.
    #[doc(hidden)]
    pub bucket_rows: Option<bool>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_seqs: 256,
            cache_budget_tokens: 262_144,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            seed: 0,
            compact_fraction: 0.125,
            rope_long: None,
            prefill_chunk: 0,
            fuse_weights: true,
            slot_refill: true,
            static_decode: false,
            sync_every: 16,
            cuda_graphs: true,
            bucket_rows: None,
        }
    }
}

/// Counters of one `generate` call.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GenerateStats {
    /// Waves run.
    pub waves: usize,
    /// Prompt positions encoded (padding included).
    pub prefill_positions: i64,
    /// Decode forwards.
    pub decode_steps: usize,
    /// Rows summed over decode forwards (what decoding cost).
    pub decode_row_steps: usize,
    /// Times finished rows were dropped from the cache.
    pub compactions: usize,
    /// Times waiting sequences joined a running batch (slot refill).
    pub refills: usize,
    /// Largest cache allocated, in token slots (rows × capacity); at most `cache_budget_tokens`.
    pub peak_cache_tokens: i64,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Static decoding: host reads of the sampled tokens.
    pub host_syncs: usize,
    /// Static decoding with CUDA graphs: graphs recorded (each also ran its step once) and replayed.
    pub graph_captures: usize,
    pub graph_replays: usize,
}

/// Generates completions with a model in this process (the same tensors the trainer updates).
pub struct Engine<'m> {
    model: &'m Transformer,
    cfg: EngineConfig,
    decoder: Option<Arc<dyn TokenDecoder>>,
    /// A CUDA graph could not be recorded: this engine decodes without graphs from then on.
    graphs_failed: std::cell::Cell<bool>,
}

/// A part of a request's group placed in one wave: samples `first..first + count`.
struct Chunk {
    req: usize,
    first: usize,
    count: usize,
}

/// What every batch of one `generate` call shares.
struct Ctx<'a> {
    requests: &'a [Request],
    seeds: &'a [u64],
    stops: Vec<StopMatcher>,
    stop_ids: Vec<Vec<i64>>,
}

/// Prompts encoded and expanded into their samples ([`Engine::prefill`]).
struct Prefilled {
    cache: KvCache,
    key_mask: Tensor,
    logits: Tensor,
    next_pos: Vec<i64>,
    row_ids: Vec<usize>,
}

struct Row {
    req: usize,
    sample: usize,
    seed: u64,
    tokens: Vec<i64>,
    lp_sampled: Vec<f32>,
    lp_model: Vec<f32>,
    finish: Option<FinishReason>,
    stop_string: Option<String>,
    text: Option<String>,
}

const PREFILL_ACTIVATION_BYTES: i64 = 256 << 20;

impl<'m> Engine<'m> {
    pub fn new(model: &'m Transformer, cfg: EngineConfig) -> Result<Engine<'m>> {
        if cfg.max_batch_seqs == 0 {
            return Err(RolloutError::Config("max_batch_seqs must be at least 1".into()));
        }
        if cfg.cache_budget_tokens < 2 {
            return Err(RolloutError::Config(format!("cache_budget_tokens must be at least 2, got {}", cfg.cache_budget_tokens)));
        }
        if cfg.static_decode && cfg.sync_every == 0 {
            return Err(RolloutError::Config("sync_every must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&cfg.compact_fraction) {
            return Err(RolloutError::Config(format!("compact_fraction must be in [0, 1], got {}", cfg.compact_fraction)));
        }
        let v = model.cfg.vocab_size;
        if let Some(&t) = cfg.eos_token_ids.iter().chain([&cfg.pad_token_id]).find(|&&t| t < 0 || t >= v) {
            return Err(RolloutError::Config(format!("token id {t} (eos or pad) is outside the vocabulary (0..{v})")));
        }
        Ok(Engine { model, cfg, decoder: None, graphs_failed: std::cell::Cell::new(false) })
    }

    /// Gives the engine a decoder: completions then carry text, and stop strings work.
    pub fn set_decoder(&mut self, decoder: Arc<dyn TokenDecoder>) {
        self.decoder = Some(decoder);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Samples `n` completions for every request; returned in (request, sample) order.
    ///
    /// Determinism: sample `j` of a request draws its token at step `t` from a uniform that depends only on
    /// (request seed, `j`, `t`), and all sampling arithmetic is row-wise. The same requests with the same engine
    /// config, model weights, dtype, device and thread count therefore give identical completions. Across
    /// different co-batched requests (which change the wave plan, the padding and the batch shapes of the
    /// matmuls) the logits agree only up to floating-point rounding, so a sample is the same unless a uniform
    /// falls within that rounding of a CDF boundary (in fp32 on CPU the tests see identical tokens and
    /// log-probabilities within 1e-5). With slot refill, which rows share a batch also depends on when others
    /// finish; the same holds. LongRoPE models: a batch keeps one factor set, chosen from its first cache's
    /// capacity, and sequences that join it inherit it (`Completion::rope_long` records the choice).
    pub fn generate(&self, requests: &[Request]) -> Result<Vec<Completion>> {
        self.generate_with_stats(requests).map(|(c, _)| c)
    }

    /// [`Engine::generate`], also returning what it cost.
    pub fn generate_with_stats(&self, requests: &[Request]) -> Result<(Vec<Completion>, GenerateStats)> {
        match self.generate_once(requests) {
            // graphs replay the same kernels as eager static steps: the call is redone without them, same results
            Err(RolloutError::CudaGraph(e)) => {
                eprintln!("whet: warning: recording a CUDA graph failed ({e}); decoding without CUDA graphs from now on");
                self.graphs_failed.set(true);
                self.generate_once(requests)
            }
            r => r,
        }
    }

    fn generate_once(&self, requests: &[Request]) -> Result<(Vec<Completion>, GenerateStats)> {
        let _guard = tch::no_grad_guard();
        self.validate(requests)?;
        let seeds: Vec<u64> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| r.params.seed.unwrap_or_else(|| rng::default_request_seed(self.cfg.seed, i)))
            .collect();
        let mut stats = GenerateStats::default();
        let mut out = Vec::with_capacity(requests.iter().map(|r| r.n).sum());
        // samples with max_new_tokens = 0 need no compute
        for (i, r) in requests.iter().enumerate().filter(|(_, r)| r.params.max_new_tokens == 0) {
            for j in 0..r.n {
                let row = Row::new(i, j, seeds[i]);
                out.push(self.finish_row(row, r, false, &self.decoder));
            }
        }
        // every group with work to do, in request order; batches take from the front
        let mut queue: VecDeque<Chunk> =
            requests.iter().enumerate().filter(|(_, r)| r.params.max_new_tokens > 0).map(|(i, r)| Chunk { req: i, first: 0, count: r.n }).collect();
        let ctx = Ctx {
            requests,
            seeds: &seeds,
            stops: requests.iter().map(|r| StopMatcher::new(&r.params.stop_strings)).collect(),
            stop_ids: requests
                .iter()
                .map(|r| {
                    let mut v = r.params.stop_token_ids.clone();
                    if !r.params.ignore_eos {
                        v.extend(&self.cfg.eos_token_ids);
                    }
                    v
                })
                .collect(),
        };
        // static steps run on libtorch's operators (the native CPU step is host-driven)
        let native = (!self.cfg.static_decode).then(|| tch::get_num_threads().max(1) as usize);
        let mut fused = (self.cfg.fuse_weights && !queue.is_empty()).then(|| self.model.decode_weights_with(native));
        while !queue.is_empty() {
            let chunks = self.take_chunks(&mut queue, requests, 0, |p, n| (p + n) as i64);
            if chunks.is_empty() {
                // validate() checked that every sequence fits an empty batch alone
                return Err(RolloutError::Config("internal: a queued sequence fits no batch".into()));
            }
            stats.waves += 1;
            if self.cfg.static_decode {
                self.run_wave_static(&ctx, chunks, fused.as_ref(), &mut out, &mut stats)?;
            } else {
                self.run_wave(&ctx, chunks, &mut queue, fused.as_mut(), &mut out, &mut stats)?;
            }
        }
        out.sort_by_key(|c| (c.request_index, c.sample_index));
        stats.generated_tokens = out.iter().map(|c| c.completion_tokens).sum();
        Ok((out, stats))
    }

    fn validate(&self, requests: &[Request]) -> Result<()> {
        let v = self.model.cfg.vocab_size;
        for (index, r) in requests.iter().enumerate() {
            let bad = |msg: String| RolloutError::InvalidRequest { index, msg };
            if r.n == 0 {
                return Err(bad("n must be at least 1".into()));
            }
            if r.prompt_ids.is_empty() {
                return Err(bad("empty prompt".into()));
            }
            if let Some(&t) = r.prompt_ids.iter().find(|&&t| t < 0 || t >= v) {
                return Err(bad(format!("prompt token id {t} is outside the vocabulary (0..{v})")));
            }
            r.params.validate(v).map_err(bad)?;
            if !r.params.stop_strings.is_empty() && self.decoder.is_none() {
                return Err(bad("stop_strings need a decoder (Engine::set_decoder)".into()));
            }
            let needed = (r.prompt_ids.len() + r.params.max_new_tokens) as i64;
            if needed > self.cfg.cache_budget_tokens {
                return Err(RolloutError::CacheBudget {
                    index,
                    needed,
                    prompt: r.prompt_ids.len(),
                    max_new: r.params.max_new_tokens,
                    budget: self.cfg.cache_budget_tokens,
                });
            }
        }
        Ok(())
    }

    /// Takes chunks from the front of `queue` (in request order, splitting a group where it stops fitting)
    /// for a batch that already holds `rows` rows: the batch may grow to `max_batch_seqs` rows and to
    /// `rows × capacity(longest new prompt, largest new max_new_tokens) ≤ cache_budget_tokens`.
    fn take_chunks(&self, queue: &mut VecDeque<Chunk>, requests: &[Request], rows: usize, capacity: impl Fn(usize, usize) -> i64) -> Vec<Chunk> {
        let mut taken = Vec::new();
        let (mut total, mut mp, mut mn) = (rows, 0usize, 0usize);
        while let Some(c) = queue.front_mut() {
            let r = &requests[c.req];
            let (p, n) = (mp.max(r.prompt_ids.len()), mn.max(r.params.max_new_tokens));
            let by_budget = (self.cfg.cache_budget_tokens / capacity(p, n).max(1)) as usize;
            let fit = self.cfg.max_batch_seqs.min(by_budget).saturating_sub(total).min(c.count);
            if fit == 0 {
                break;
            }
            taken.push(Chunk { req: c.req, first: c.first, count: fit });
            (total, mp, mn) = (total + fit, p, n);
            if fit == c.count {
                queue.pop_front();
            } else {
                c.first += fit;
                c.count -= fit;
                break;
            }
        }
        taken
    }

    /// Encodes the distinct prompts of `chunks` (left-padded, in chunks of positions) into a new cache of
    /// the longest prompt plus `room` positions and expands each into its samples: new `rows`, the cache
    /// (its length is the longest prompt), key mask and last logits per sample, and each sample's next
    /// position.
    fn prefill(&self, ctx: &Ctx, chunks: &[Chunk], room: i64, rope_long: Option<bool>, rows: &mut Vec<Row>, stats: &mut GenerateStats) -> Prefilled {
        let m = self.model;
        let device = m.device();
        let p = chunks.len() as i64;
        let max_prompt = chunks.iter().map(|c| ctx.requests[c.req].prompt_ids.len()).max().unwrap_or(0);
        let lmax = max_prompt as i64;
        let capacity = lmax + room;
        // left-padded prompts, their positions and the key mask over the whole capacity
        let mut ids = vec![self.cfg.pad_token_id; (p * lmax) as usize];
        let mut pos = vec![0i64; (p * lmax) as usize];
        let mut keys = vec![true; (p * capacity) as usize];
        for (c, ch) in chunks.iter().enumerate() {
            let prompt = &ctx.requests[ch.req].prompt_ids;
            let pad = max_prompt - prompt.len();
            for j in pad..max_prompt {
                let k = c * max_prompt + j;
                ids[k] = prompt[j - pad];
                pos[k] = (j - pad) as i64;
            }
            for j in 0..pad {
                keys[c * capacity as usize + j] = false;
            }
        }
        let ids = Tensor::from_slice(&ids).view([p, lmax]).to_device(device);
        let pos = Tensor::from_slice(&pos).view([p, lmax]).to_device(device);
        let mut key_mask = Tensor::from_slice(&keys).view([p, capacity]).to_device(device);
        let mut cache = KvCache::new(&m.cfg, p, capacity, m.kind(), device);
        if let Some(l) = rope_long {
            cache.set_rope_long(l);
        }
        // only the last position gets logits; chunks of positions bound the largest activation (the MLP's
        // gate and up outputs); at least 16 positions per chunk keep large batches efficient
        let elt = m.kind().elt_size_in_bytes() as i64;
        let chunk_t = match self.cfg.prefill_chunk {
            0 => (PREFILL_ACTIVATION_BYTES / (p * 2 * m.cfg.intermediate_size * elt).max(1)).max(16),
            c => c as i64,
        };
        let mut logits = None;
        let mut start = 0;
        while start < lmax {
            let t = chunk_t.min(lmax - start);
            let last = start + t == lmax;
            logits = m.prefill_cached(&ids.narrow(1, start, t), &pos.narrow(1, start, t), &key_mask.narrow(1, 0, start + t), &mut cache, last);
            start += t;
        }
        stats.prefill_positions += p * lmax;
        let mut logits = logits.expect("a prefill has a non-empty prompt");
        // expand each prompt into its group of samples
        let mut expand = Vec::new();
        let mut next_pos = Vec::new();
        let mut row_ids = Vec::new();
        for (c, ch) in chunks.iter().enumerate() {
            for j in ch.first..ch.first + ch.count {
                row_ids.push(rows.len());
                rows.push(Row::new(ch.req, j, ctx.seeds[ch.req]));
                expand.push(c as i64);
                next_pos.push(ctx.requests[ch.req].prompt_ids.len() as i64);
            }
        }
        if chunks.iter().any(|ch| ch.count != 1) {
            let idx = Tensor::from_slice(&expand).to_device(device);
            cache.select_rows(&idx);
            key_mask = key_mask.index_select(0, &idx);
            logits = logits.index_select(0, &idx);
        }
        Prefilled { cache, key_mask, logits, next_pos, row_ids }
    }

    /// Decodes one batch: `chunks` start it; with `slot_refill`, chunks from `queue` join it whenever
    /// finished rows have been dropped and the freed rows and the cache budget allow.
    fn run_wave(
        &self,
        ctx: &Ctx,
        chunks: Vec<Chunk>,
        queue: &mut VecDeque<Chunk>,
        mut fused: Option<&mut model::DecodeWeights>,
        out: &mut Vec<Completion>,
        stats: &mut GenerateStats,
    ) -> Result<()> {
        let m = self.model;
        let device = m.device();
        let vocab = m.cfg.vocab_size;
        let requests = ctx.requests;
        let max_new = chunks.iter().map(|c| requests[c.req].params.max_new_tokens).max().unwrap_or(0);
        let mut rows: Vec<Row> = Vec::new();
        let first = self.prefill(ctx, &chunks, max_new as i64, self.cfg.rope_long, &mut rows, stats);
        let Prefilled { mut cache, mut key_mask, mut logits, next_pos, row_ids } = first;
        let rope_long = cache.rope_long().unwrap_or(false);
        let mut pos = Tensor::from_slice(&next_pos).view([-1, 1]).to_device(device);
        stats.peak_cache_tokens = stats.peak_cache_tokens.max(cache.batch() * cache.capacity());

        // active[i] = index into rows of cache row i
        let mut active: Vec<usize> = row_ids;
        let params_of = |active: &[usize], rows: &[Row]| -> Vec<&SamplingParams> { active.iter().map(|&i| &requests[rows[i].req].params).collect() };
        let mut sampling = RowSampling::new(&params_of(&active, &rows), vocab, device);
        if let Some(w) = fused.as_deref_mut() {
            w.prepare_rows(active.len() as i64);
        }
        let mut finished_in_cache = 0usize;
        loop {
            let u: Vec<f64> = active.iter().map(|&i| rng::uniform(rows[i].seed, rows[i].sample as u64, rows[i].tokens.len() as u64)).collect();
            let s = sampling.sample(&logits, &u);
            for (k, &i) in active.iter().enumerate() {
                if rows[i].finish.is_none() && self.accept(ctx, &mut rows[i], s.ids[k], s.logprob_sampled[k], s.logprob_model[k]) {
                    finished_in_cache += 1;
                }
            }
            if finished_in_cache == active.len() {
                break;
            }
            let mut tokens = s.tokens;
            let mut compacted = false;
            if finished_in_cache > 0 && finished_in_cache as f64 >= self.cfg.compact_fraction * active.len() as f64 {
                let keep: Vec<i64> = (0..active.len() as i64).filter(|&k| rows[active[k as usize]].finish.is_none()).collect();
                let idx = Tensor::from_slice(&keep).to_device(device);
                cache.select_rows(&idx);
                key_mask = key_mask.index_select(0, &idx);
                pos = pos.index_select(0, &idx);
                tokens = tokens.index_select(0, &idx);
                active = keep.iter().map(|&k| active[k as usize]).collect();
                finished_in_cache = 0;
                stats.compactions += 1;
                compacted = true;
            }
            let len = cache.len();
            logits = m.forward_cached_with(&tokens.view([-1, 1]), &pos, &key_mask.narrow(1, 0, len + 1), &mut cache, fused.as_deref()).squeeze_dim(1);
            pos += 1;
            stats.decode_steps += 1;
            stats.decode_row_steps += active.len();
            if compacted && self.cfg.slot_refill && !queue.is_empty() {
                // new sequences join the batch: their prompts are encoded on their own, then both caches are
                // right-aligned at a common length in a new cache (see `KvCache::concat_right_aligned`)
                let len = cache.len();
                // a running row holds its prompt and fed tokens at the end of the cache and may write
                // max_new_tokens − generated more; positions before the longest such content are dropped
                let live = |f: &dyn Fn(&Row) -> i64| active.iter().map(|&i| f(&rows[i])).max().unwrap_or(0);
                let keep = live(&|r| (requests[r.req].prompt_ids.len() + r.tokens.len()) as i64).min(len);
                let room = live(&|r| (requests[r.req].params.max_new_tokens - r.tokens.len()) as i64);
                let new = self.take_chunks(queue, requests, active.len(), |p, n| keep.max(p as i64) + room.max(n as i64));
                if !new.is_empty() {
                    let new_max = new.iter().map(|c| requests[c.req].params.max_new_tokens).max().unwrap_or(0) as i64;
                    let joined = self.prefill(ctx, &new, 0, Some(rope_long), &mut rows, stats);
                    let lp = joined.cache.len();
                    let merged_len = keep.max(lp);
                    let capacity = merged_len + room.max(new_max);
                    let realign = |mask: &Tensor, filled: i64, keep: i64| {
                        let b = mask.size()[0];
                        Tensor::cat(
                            &[
                                Tensor::zeros([b, merged_len - keep], (Kind::Bool, device)),
                                mask.narrow(1, filled - keep, keep),
                                Tensor::ones([b, capacity - merged_len], (Kind::Bool, device)),
                            ],
                            1,
                        )
                    };
                    key_mask = Tensor::cat(&[realign(&key_mask, len, keep), realign(&joined.key_mask, lp, lp)], 0);
                    cache = cache.concat_right_aligned(keep, &joined.cache, lp, capacity);
                    pos = Tensor::cat(&[pos, Tensor::from_slice(&joined.next_pos).view([-1, 1]).to_device(device)], 0);
                    let kind = logits.kind();
                    logits = Tensor::cat(&[logits, joined.logits.to_kind(kind)], 0);
                    active.extend(joined.row_ids);
                    stats.refills += 1;
                    stats.peak_cache_tokens = stats.peak_cache_tokens.max(cache.batch() * cache.capacity());
                }
            }
            if compacted {
                sampling = RowSampling::new(&params_of(&active, &rows), vocab, device);
                if let Some(w) = fused.as_deref_mut() {
                    w.prepare_rows(active.len() as i64);
                }
            }
        }
        for row in rows {
            let req = &requests[row.req];
            out.push(self.finish_row(row, req, rope_long, &self.decoder));
        }
        Ok(())
    }

    /// Appends a sampled token to a live row and decides whether the row ends there (a stop token id, a
    /// stop string, `max_new_tokens`); returns whether it did.
    fn accept(&self, ctx: &Ctx, row: &mut Row, tok: i64, lp_sampled: f32, lp_model: f32) -> bool {
        row.tokens.push(tok);
        row.lp_sampled.push(lp_sampled);
        row.lp_model.push(lp_model);
        if ctx.stop_ids[row.req].contains(&tok) {
            row.finish = Some(FinishReason::Stop);
        } else if let (false, Some(dec)) = (ctx.stops[row.req].is_empty(), &self.decoder) {
            if let Some((stop, at, full)) = ctx.stops[row.req].check(dec.as_ref(), &row.tokens) {
                row.finish = Some(FinishReason::Stop);
                row.text = Some(full[..at].to_string());
                row.stop_string = Some(stop);
            }
        }
        if row.finish.is_none() && row.tokens.len() >= ctx.requests[row.req].params.max_new_tokens {
            row.finish = Some(FinishReason::Length);
        }
        row.finish.is_some()
    }

    fn finish_row(&self, mut row: Row, req: &Request, rope_long: bool, decoder: &Option<Arc<dyn TokenDecoder>>) -> Completion {
        if row.text.is_none() {
            row.text = decoder.as_ref().map(|d| d.decode(&row.tokens));
        }
        let n = row.tokens.len();
        Completion {
            request_index: row.req,
            sample_index: row.sample,
            token_ids: row.tokens,
            text: row.text,
            logprobs_sampled: row.lp_sampled,
            logprobs_model: row.lp_model,
            finish_reason: row.finish.unwrap_or(FinishReason::Length),
            stop_string: row.stop_string,
            prompt_tokens: req.prompt_ids.len(),
            completion_tokens: n,
            rope_long,
        }
    }
}

impl Row {
    fn new(req: usize, sample: usize, seed: u64) -> Row {
        Row {
            req,
            sample,
            seed,
            tokens: Vec::new(),
            lp_sampled: Vec::new(),
            lp_model: Vec::new(),
            finish: None,
            stop_string: None,
            text: None,
        }
    }
}

/// A decoder from a closure.
pub struct FnDecoder<F: Fn(&[i64]) -> String + Send + Sync>(pub F);

impl<F: Fn(&[i64]) -> String + Send + Sync> TokenDecoder for FnDecoder<F> {
    fn decode(&self, ids: &[i64]) -> String {
        (self.0)(ids)
    }
}

/// Cache tokens a set of requests needs if every sample ran in one wave (rows × (longest prompt + largest
/// max_new_tokens)): a quick sizing aid for `cache_budget_tokens`.
pub fn cache_tokens_for(requests: &[Request]) -> i64 {
    let rows: usize = requests.iter().map(|r| r.n).sum();
    let mp = requests.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0);
    let mn = requests.iter().map(|r| r.params.max_new_tokens).max().unwrap_or(0);
    (rows * (mp + mn)) as i64
}
