//! Static decoding (`EngineConfig::static_decode`): a wave's decode steps keep their shapes and read nothing
//! back to the host, so that on a GPU each step can be one replayed CUDA graph instead of hundreds of kernel
//! launches (the host-bound case: rollout/README.md, "GPU").
//!
//! * The cache is allocated at the wave's capacity after the prefill, as in the dynamic path; every row writes
//!   its new key at the same slot (a device tensor) and attends over a fixed span of slots with a mask
//!   ([`model::Transformer::decode_static`]). The span grows in steps ([`span_for`]), so that attention costs
//!   about the live length, not the capacity.
//! * Sampling stays on the device: uniforms from the same counter-based generator ([`rng::uniform_tensor`],
//!   bit-equal to the host's), tokens and log-probabilities written into `[rows, sync_every]` buffers.
//! * Every `sync_every` steps the host reads the buffers once and applies the same rules as the dynamic path
//!   (stop ids, stop strings, `max_new_tokens`; [`Engine::accept`]); tokens a row sampled after it ended are
//!   ignored. Finished rows leave at such a read (`compact_fraction`).
//! * With CUDA graphs (`cuda_graphs`, a CUDA device and a binary with the shim), the batch is padded to a
//!   bucket (vLLM's sizes: 1, 2, 4, then multiples of 8) and a graph is recorded per span the first time it
//!   is needed; compaction only happens when the live rows fit a smaller bucket, and then the graphs are
//!   recorded anew (they hold the addresses of the old tensors).
//!
//! No slot refill: a wave runs until its rows end. Results equal the dynamic path's up to floating-point
//! rounding of the batched forward (same uniforms, same sampling formulas on the device).

use super::{Chunk, Ctx, Engine, Prefilled, Row};
use crate::error::{Result, RolloutError};
use crate::params::Completion;
use crate::rng;
use crate::sampler::RowSampling;
use crate::GenerateStats;
use model::cuda_graph::CudaGraph;
use model::{DecodeWeights, KvCache};
use tch::{Device, Kind, Tensor};

/// The batch size a graph is recorded for: vLLM's capture sizes (1, 2, 4, then multiples of 8).
pub(crate) fn bucket(rows: usize) -> usize {
    match rows {
        0..=2 => rows.max(1),
        3..=4 => 4,
        _ => rows.div_ceil(8) * 8,
    }
}

/// The attention span for steps that write up to slot `needed − 1`: rounded up to a multiple of a quarter of
/// its power of two (at least 128), within `capacity`. So fewer than max(128, needed / 4) attended slots are
/// masked padding, and a generation of length L needs about 4·log2(L / 128) spans (graphs).
pub(crate) fn span_for(needed: i64, capacity: i64) -> i64 {
    let pow = if needed <= 1 { 1 } else { 1i64 << (63 - (needed as u64).leading_zeros()) };
    let step = (pow / 4).max(128);
    ((needed + step - 1) / step * step).min(capacity)
}

/// Per cache row: the last logits `[B, vocab]`, the next position `[B, 1]` and which slots hold keys `[B,
/// capacity]`.
struct RowTensors {
    logits: Tensor,
    pos: Tensor,
    key_mask: Tensor,
}

impl RowTensors {
    /// Rows `idx` (int64 on the device; repeats allowed).
    fn select(&self, idx: &Tensor) -> RowTensors {
        RowTensors { logits: self.logits.index_select(0, idx), pos: self.pos.index_select(0, idx), key_mask: self.key_mask.index_select(0, idx) }
    }
}

/// The device state of a static wave: what a step reads and writes in place.
struct State {
    /// Device rows (live rows, then padding copies of the last one).
    rows: i64,
    sampling: RowSampling,
    keys: Tensor,
    t: RowTensors,
    /// Tokens sampled so far by every row (the generator's step), the slot the next forward writes, the
    /// buffer column of the next sample: int64 `[1]` each.
    step: Tensor,
    slot: Tensor,
    col: Tensor,
    out_tokens: Tensor,
    out_lp_sampled: Tensor,
    out_lp_model: Tensor,
    graphs: Vec<(i64, CudaGraph)>,
}

impl State {
    /// The state for cache rows `active` (row ids) plus `pad` copies of the last one, whose cache and row
    /// tensors `t` are already in that order.
    fn new(ctx: &Ctx, rows: &[Row], active: &[usize], pad: usize, t: RowTensors, sync_every: usize) -> State {
        let device = t.logits.device();
        let vocab = t.logits.size()[1];
        let ids = with_pad(active, pad);
        let params: Vec<_> = ids.iter().map(|&i| &ctx.requests[rows[i].req].params).collect();
        let keys: Vec<i64> = ids.iter().map(|&i| rng::row_key(rows[i].seed, rows[i].sample as u64) as i64).collect();
        let n = ids.len() as i64;
        let k = sync_every as i64;
        let scalar = || Tensor::zeros([1], (Kind::Int64, device));
        State {
            rows: n,
            sampling: RowSampling::new(&params, vocab, device),
            keys: Tensor::from_slice(&keys).to_device(device),
            t,
            step: scalar(),
            slot: scalar(),
            col: scalar(),
            out_tokens: Tensor::zeros([n, k], (Kind::Int64, device)),
            out_lp_sampled: Tensor::zeros([n, k], (Kind::Float, device)),
            out_lp_model: Tensor::zeros([n, k], (Kind::Float, device)),
            graphs: Vec::new(),
        }
    }

    /// One step, all on the device: sample from the current logits, record, feed the samples.
    fn step(&mut self, m: &model::Transformer, cache: &mut KvCache, weights: Option<&DecodeWeights>, span: i64) {
        let u = rng::uniform_tensor(&self.keys, &self.step);
        let s = self.sampling.sample_on_device(&self.t.logits, &u);
        let n = self.rows;
        let _ = self.out_tokens.index_copy_(1, &self.col, &s.tokens.view([n, 1]));
        let _ = self.out_lp_sampled.index_copy_(1, &self.col, &s.logprob_sampled.view([n, 1]));
        let _ = self.out_lp_model.index_copy_(1, &self.col, &s.logprob_model.view([n, 1]));
        let next = m.decode_static(&s.tokens.view([n, 1]), &self.t.pos, &self.t.key_mask, &self.slot, span, cache, weights);
        self.t.logits.copy_(&next);
        for c in [&mut self.t.pos, &mut self.step, &mut self.slot, &mut self.col] {
            let _ = c.g_add_scalar_(1);
        }
    }
}

impl<'m> Engine<'m> {
    /// Decodes one wave with static steps (see the module documentation).
    pub(super) fn run_wave_static(&self, ctx: &Ctx, chunks: Vec<Chunk>, weights: Option<&DecodeWeights>, out: &mut Vec<Completion>, stats: &mut GenerateStats) -> Result<()> {
        let m = self.model;
        let device = m.device();
        let graphs = self.cfg.cuda_graphs && !self.graphs_failed.get() && model::cuda_graph::available(device).is_ok();
        let padded = self.cfg.bucket_rows.unwrap_or(graphs);
        let k = self.cfg.sync_every;
        let max_new = chunks.iter().map(|c| ctx.requests[c.req].params.max_new_tokens).max().unwrap_or(0);
        let mut rows: Vec<Row> = Vec::new();
        let Prefilled { mut cache, key_mask, logits, next_pos, row_ids } = self.prefill(ctx, &chunks, max_new as i64, self.cfg.rope_long, &mut rows, stats);
        let rope_long = cache.rope_long().unwrap_or(false);
        let pos = Tensor::from_slice(&next_pos).view([-1, 1]).to_device(device);
        let mut active = row_ids;
        let mut pad = if padded { bucket(active.len()) - active.len() } else { 0 };
        let mut t = RowTensors { logits, pos, key_mask };
        if pad > 0 {
            let idx = Tensor::from_slice(&with_pad(&(0..active.len() as i64).collect::<Vec<_>>(), pad)).to_device(device);
            cache.select_rows(&idx);
            t = t.select(&idx);
        }
        stats.peak_cache_tokens = stats.peak_cache_tokens.max(cache.batch() * cache.capacity());
        let mut state = State::new(ctx, &rows, &active, pad, t, k);
        let mut taken = 0usize;
        while taken < max_new {
            let n = k.min(max_new - taken);
            let span = span_for(cache.len() + n as i64, cache.capacity());
            let _ = state.step.fill_(taken as i64);
            let _ = state.slot.fill_(cache.len());
            let _ = state.col.zero_();
            for _ in 0..n {
                if graphs {
                    self.graph_step(&mut state, &mut cache, weights, span, stats)?;
                } else {
                    state.step(m, &mut cache, weights, span);
                }
                cache.advance(1);
            }
            taken += n;
            stats.decode_steps += n;
            stats.decode_row_steps += n * state.rows as usize;
            // the one host read of these n steps
            let read = |t: &Tensor| t.narrow(1, 0, n as i64).to_device(Device::Cpu).contiguous();
            let toks: Vec<i64> = Vec::try_from(read(&state.out_tokens).view([-1])).expect("host copy of sampled tokens");
            let lps: Vec<f32> = Vec::try_from(read(&state.out_lp_sampled).view([-1])).expect("host copy of log-probabilities");
            let lpm: Vec<f32> = Vec::try_from(read(&state.out_lp_model).view([-1])).expect("host copy of log-probabilities");
            stats.host_syncs += 1;
            for (r, &i) in active.iter().enumerate() {
                for j in r * n..(r + 1) * n {
                    if rows[i].finish.is_some() || self.accept(ctx, &mut rows[i], toks[j], lps[j], lpm[j]) {
                        break;
                    }
                }
            }
            let live: Vec<i64> = (0..active.len() as i64).filter(|&r| rows[active[r as usize]].finish.is_none()).collect();
            if live.is_empty() {
                break;
            }
            let finished = active.len() - live.len();
            let smaller = !padded || bucket(live.len()) < state.rows as usize;
            if finished > 0 && smaller && finished as f64 >= self.cfg.compact_fraction * active.len() as f64 {
                pad = if padded { bucket(live.len()) - live.len() } else { 0 };
                let idx = Tensor::from_slice(&with_pad(&live, pad)).to_device(device);
                cache.select_rows(&idx);
                active = live.iter().map(|&r| active[r as usize]).collect();
                state = State::new(ctx, &rows, &active, pad, state.t.select(&idx), k);
                stats.compactions += 1;
            }
        }
        for row in rows {
            let req = &ctx.requests[row.req];
            out.push(self.finish_row(row, req, rope_long, &self.decoder));
        }
        Ok(())
    }

    /// One step through a CUDA graph for this span: replayed if recorded, else recorded (which runs the step
    /// once). Graphs of one state share a memory pool and are replayed in the order recorded (spans grow).
    fn graph_step(&self, state: &mut State, cache: &mut KvCache, weights: Option<&DecodeWeights>, span: i64, stats: &mut GenerateStats) -> Result<()> {
        if let Some((_, g)) = state.graphs.iter().find(|(s, _)| *s == span) {
            stats.graph_replays += 1;
            return g.replay().map_err(|e| RolloutError::Config(format!("{e}; set cuda_graphs = false to decode without graphs")));
        }
        let m = self.model;
        let pool = std::mem::take(&mut state.graphs);
        let g = {
            let st = &mut *state;
            CudaGraph::record(m.device(), pool.first().map(|(_, g)| g), || st.step(m, cache, weights, span)).map_err(RolloutError::CudaGraph)?
        };
        state.graphs = pool;
        state.graphs.push((span, g));
        stats.graph_captures += 1;
        Ok(())
    }
}

/// `items` followed by `pad` copies of the last (a batch padded to its bucket with copies of its last row).
fn with_pad<T: Copy>(items: &[T], pad: usize) -> Vec<T> {
    let last = *items.last().expect("a wave has rows");
    items.iter().copied().chain(std::iter::repeat_n(last, pad)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_vllms_capture_sizes() {
        let b: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 64, 65, 250, 256].iter().map(|&r| bucket(r)).collect();
        assert_eq!(b, [1, 2, 4, 4, 8, 8, 16, 64, 72, 256, 256]);
    }

    #[test]
    fn spans_cover_the_slots_with_little_padding() {
        assert_eq!(span_for(1, 1000), 128);
        assert_eq!(span_for(128, 1000), 128);
        assert_eq!(span_for(129, 1000), 256);
        assert_eq!(span_for(513, 4000), 640);
        assert_eq!(span_for(2049, 4000), 2560);
        assert_eq!(span_for(900, 700), 700);
        for needed in 1..5000 {
            let s = span_for(needed, i64::MAX);
            assert!(s >= needed && s - needed < 128.max(needed / 4), "needed {needed} span {s}");
        }
        // spans of a 4096-token generation: few graphs
        let spans: std::collections::BTreeSet<i64> = (1..=4096).map(|n| span_for(n, 4096)).collect();
        assert!(spans.len() <= 16, "{spans:?}");
    }
}
