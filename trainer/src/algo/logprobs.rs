//! Token losses computed in chunks, so that full fp32 `[batch, sequence, vocabulary]` logits never exist.
//!
//! The hidden states of the positions that carry a loss are gathered ([N, hidden]) and detached; each chunk of
//! rows is projected to logits, its cross-entropy back-propagated (accumulating into the detached hidden
//! states' gradient and the output projection's gradient) and freed; finally the gathered gradient is pushed
//! through the network with the identity ∂(Σ h·G)/∂θ = Gᵀ ∂h/∂θ. With activation checkpointing on
//! ([`Transformer::set_gradient_checkpointing`]) that last push recomputes the network one layer at a time
//! from the layer inputs saved by a graph-free forward.

use model::{Batch, Transformer};
use tch::{Kind, Reduction, Tensor};

/// Positions whose label is this carry no loss (Hugging Face convention).
pub const IGNORE: i64 = -100;

/// One training row: tokens, labels and, for packed rows, per-document positions.
pub struct Row {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub pos: Option<Vec<i64>>,
}

/// Logits in at least fp32 (bf16/fp16 models), double kept as is.
fn upcast(x: Tensor) -> Tensor {
    if x.kind() == Kind::Double {
        x
    } else {
        x.to_kind(Kind::Float)
    }
}

/// Next-token cross-entropy of `labels` `[B, T]` (aligned with the inputs, shifted here), multiplied by
/// `scale`, back-propagated into the model's parameters. Returns (sum of token losses, number of tokens),
/// unscaled.
pub fn causal_lm_backward(net: &Transformer, batch: &Batch, labels: &Tensor, scale: f64, chunk_rows: i64) -> (f64, i64) {
    let trunk = Trunk::forward(net, batch);
    let Gathered { sel, ys: ysel, .. } = gather(&trunk.hidden, labels);
    let n = sel.size()[0];
    if n == 0 {
        return (0.0, 0);
    }
    let detached = sel.detach().set_requires_grad(true);
    let w = net.lm_head_weight();
    let mut total = 0.0;
    let chunk = chunk_rows.max(1);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = scaled_logits(net, &detached.narrow(0, start, len), &w, 1.0);
        let loss = logits.cross_entropy_loss::<Tensor>(&ysel.narrow(0, start, len), None, Reduction::Sum, IGNORE, 0.0);
        total += loss.double_value(&[]);
        (loss * scale).backward();
        start += len;
    }
    let g = detached.grad();
    (sel * g).sum(Kind::Float).backward();
    trunk.backward(net);
    (total, n)
}

/// The network's final hidden states for a loss: in the autograd graph, or (activation checkpointing) a
/// leaf whose gradient [`Trunk::backward`] pushes through the network layer by layer.
struct Trunk {
    hidden: Tensor,
    checkpoints: Option<model::Checkpoints>,
}

impl Trunk {
    fn forward(net: &Transformer, batch: &Batch) -> Trunk {
        if net.gradient_checkpointing() {
            let (hidden, ck) = net.hidden_states_checkpointed(batch);
            Trunk { hidden, checkpoints: Some(ck) }
        } else {
            Trunk { hidden: net.training_hidden_states(batch), checkpoints: None }
        }
    }

    /// After the loss's gradient reached the hidden states: the rest of the backward (checkpointing only).
    fn backward(self, net: &Transformer) {
        if let Some(ck) = self.checkpoints {
            let g = self.hidden.grad();
            if g.defined() {
                net.backward_checkpointed(ck, &g);
            }
        }
    }
}

/// Hidden states at the positions whose next token is labelled, the labels, and where they sit in the
/// `[B, T-1]` grid of next-token positions.
struct Gathered {
    /// `[n, hidden]`, in the network's graph.
    sel: Tensor,
    /// `[n]` next-token ids.
    ys: Tensor,
    /// `[n]` flat indices into `B * (T-1)`.
    idx: Tensor,
    b: i64,
    t1: i64,
}

fn gather(hidden: &Tensor, labels: &Tensor) -> Gathered {
    let (b, t, h) = hidden.size3().unwrap();
    let hs = hidden.narrow(1, 0, t - 1).reshape([b * (t - 1), h]);
    let ys = labels.narrow(1, 1, t - 1).reshape([b * (t - 1)]).to_device(hidden.device());
    let idx = ys.ne(IGNORE).nonzero().squeeze_dim(1);
    Gathered { sel: hs.index_select(0, &idx), ys: ys.index_select(0, &idx), idx, b, t1: t - 1 }
}

/// What to score: rows with labels aligned to their inputs (shifted here), or rows that share prefixes,
/// laid out by [`SharedPrefix`].
pub enum Scored<'a> {
    Rows(&'a Batch<'a>, &'a Tensor),
    Shared(&'a SharedPrefix),
}

impl Scored<'_> {
    /// `f` of the network input: the rows, or the packed prefixes with their branches.
    fn run<R>(&self, f: impl FnOnce(&Batch) -> R) -> R {
        match self {
            Scored::Rows(batch, _) => f(batch),
            Scored::Shared(sp) => f(&Batch::branches(&sp.ids, &sp.pos, &sp.segs)),
        }
    }

    /// The labelled positions of the final hidden states of that input.
    fn gather(&self, hidden: &Tensor) -> Gathered {
        match self {
            Scored::Rows(_, labels) => gather(hidden, labels),
            Scored::Shared(sp) => sp.gather(hidden),
        }
    }
}

/// Whether rows that share a prompt run through the network as one prefix plus branches ([`SharedPrefix`]):
/// "auto" when that costs fewer FLOPs (short answers to long prompts), "always", or "never".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptSharing {
    #[default]
    Auto,
    Always,
    Never,
}

/// A micro-batch of rows ready for the network, in the layout `sharing` picks: `labels` `[rows, longest]`
/// always (for masks), plus either the padded batch or the shared-prefix packing.
pub struct MicroRows {
    pub labels: Tensor,
    ids: Tensor,
    pos: Tensor,
    aux: Tensor,
    shared: Option<SharedPrefix>,
}

impl MicroRows {
    /// `rows`: (ids, labels) right-padded with `pad`; `group`: rows with equal values (consecutive) share
    /// their prompt.
    pub fn new(net: &Transformer, rows: &[(&[i64], &[i64])], group: &[usize], pad: i64, sharing: PromptSharing) -> MicroRows {
        let dev = net.device();
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(1);
        let b = rows.len();
        let (mut ids, mut labels, mut pos, mut aux) = (vec![pad; b * t], vec![IGNORE; b * t], vec![0i64; b * t], vec![0i64; b * t]);
        for (i, (a, l)) in rows.iter().enumerate() {
            ids[i * t..i * t + a.len()].copy_from_slice(a);
            labels[i * t..i * t + l.len()].copy_from_slice(l);
            for j in 0..a.len() {
                pos[i * t + j] = j as i64;
                aux[i * t + j] = 1;
            }
        }
        let mk = |v: Vec<i64>| Tensor::from_slice(&v).view([b as i64, t as i64]).to(dev);
        let shared = match sharing {
            PromptSharing::Never => None,
            PromptSharing::Always => Some(SharedPrefix::new(rows, group, pad, dev)),
            PromptSharing::Auto => Some(SharedPrefix::new(rows, group, pad, dev)).filter(|sp| sp.cheaper(net)),
        };
        MicroRows { labels: mk(labels), ids: mk(ids), pos: mk(pos), aux: mk(aux), shared }
    }

    /// Tokens the network runs over (padding included).
    pub fn tokens(&self) -> usize {
        self.shared.as_ref().map(|s| s.packed_tokens).unwrap_or(self.ids.numel())
    }

    pub fn with<R>(&self, f: impl FnOnce(&Scored) -> R) -> R {
        match &self.shared {
            Some(sp) => f(&Scored::Shared(sp)),
            // right-padded: a real token only sees earlier positions, all real, so plain causal attention needs no
            // mask (pads carry no label) and SDPA can use its fused causal kernel
            None => f(&Scored::Rows(&Batch { mask: model::AttnMask::Causal, ..Batch::padded(&self.ids, &self.pos, &self.aux) }, &self.labels)),
        }
    }
}

/// Rows that share a prefix (a prompt's G completions; a DPO pair's chosen and rejected answers), each group
/// packed into one row: the common prefix once, then every row's remainder as a branch that attends to the
/// prefix and to itself ([`model::AttnMask::Branches`]), at the positions it has in its own row. Every hidden
/// state is the one the row would get alone (the same keys are visible at the same positions), so scores
/// and gradients equal those of the plain rows up to float rounding, at the cost of one prefix per group.
/// Results come back on the grid of the plain rows (`[rows, longest row - 1]`).
pub struct SharedPrefix {
    ids: Tensor,
    pos: Tensor,
    segs: Tensor,
    /// `[n]` flat index into `[groups * packed length]` of the position that predicts each labelled token.
    at: Tensor,
    ys: Tensor,
    idx: Tensor,
    b: i64,
    t1: i64,
    /// Tokens run through the network (padding included).
    pub packed_tokens: usize,
}

impl SharedPrefix {
    /// `rows`: (ids, labels aligned with ids) per row; `group`: the group of each row (rows of a group are
    /// consecutive). The shared prefix of a group is its rows' longest common prefix, less the last token of
    /// the shortest row so that every branch keeps at least one token.
    pub fn new(rows: &[(&[i64], &[i64])], group: &[usize], pad: i64, device: tch::Device) -> SharedPrefix {
        assert_eq!(rows.len(), group.len());
        let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let t1 = t as i64 - 1;
        let mut packed: Vec<(Vec<i64>, Vec<i64>, Vec<i64>)> = vec![];
        let (mut at, mut ys, mut idx) = (vec![], vec![], vec![]);
        let mut r0 = 0;
        while r0 < rows.len() {
            let mut r1 = r0 + 1;
            while r1 < rows.len() && group[r1] == group[r0] {
                r1 += 1;
            }
            let members = &rows[r0..r1];
            let shortest = members.iter().map(|r| r.0.len()).min().unwrap();
            let mut p = 0;
            while p + 1 < shortest && members.iter().all(|r| r.0[p] == members[0].0[p]) {
                p += 1;
            }
            let row_no = packed.len();
            let (mut ids, mut pos, mut seg) = (members[0].0[..p].to_vec(), (0..p as i64).collect::<Vec<_>>(), vec![0i64; p]);
            for (k, (rids, rlabels)) in members.iter().enumerate() {
                let start = ids.len();
                ids.extend_from_slice(&rids[p..]);
                pos.extend(p as i64..rids.len() as i64);
                seg.extend(std::iter::repeat_n(k as i64 + 1, rids.len() - p));
                // label j+1 is predicted at position j: in the prefix (j < p) or in this branch
                for j in 0..rids.len().saturating_sub(1) {
                    let y = rlabels[j + 1];
                    if y == IGNORE {
                        continue;
                    }
                    let local = if j < p { j } else { start + (j - p) };
                    at.push((row_no, local));
                    ys.push(y);
                    idx.push(((r0 + k) * t1 as usize + j) as i64);
                }
            }
            packed.push((ids, pos, seg));
            r0 = r1;
        }
        let l = packed.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let g = packed.len();
        let (mut fids, mut fpos, mut fseg) = (vec![pad; g * l], vec![0i64; g * l], vec![-1i64; g * l]);
        for (i, (a, b, c)) in packed.iter().enumerate() {
            fids[i * l..i * l + a.len()].copy_from_slice(a);
            fpos[i * l..i * l + b.len()].copy_from_slice(b);
            fseg[i * l..i * l + c.len()].copy_from_slice(c);
        }
        let at: Vec<i64> = at.into_iter().map(|(r, j)| (r * l + j) as i64).collect();
        let mk = |v: &[i64], shape: &[i64]| Tensor::from_slice(v).view(shape).to(device);
        SharedPrefix {
            ids: mk(&fids, &[g as i64, l as i64]),
            pos: mk(&fpos, &[g as i64, l as i64]),
            segs: mk(&fseg, &[g as i64, l as i64]),
            at: mk(&at, &[at.len() as i64]),
            ys: mk(&ys, &[ys.len() as i64]),
            idx: mk(&idx, &[idx.len() as i64]),
            b: rows.len() as i64,
            t1,
            packed_tokens: g * l,
        }
    }

    /// Whether the packed layout costs fewer FLOPs than plain padded rows for this network: per token the
    /// linear layers (≈ 2 × parameters per layer), per query-key pair the attention (≈ 4 × hidden size, masked
    /// pairs included, as the CPU kernels compute them).
    pub fn cheaper(&self, net: &Transformer) -> bool {
        let c = &net.cfg;
        let h = c.hidden_size as f64;
        let q = (c.num_attention_heads * c.head_dim) as f64;
        let kv = (c.num_key_value_heads * c.head_dim) as f64;
        let per_token = 2.0 * (h * (q + 2.0 * kv) + q * h + 3.0 * h * c.intermediate_size as f64);
        let per_pair = 4.0 * q;
        let cost = |rows: f64, len: f64| rows * len * per_token + rows * len * len * per_pair;
        let (g, l) = self.ids.size2().unwrap();
        if c.sliding_window.is_some_and(|w| l > w) {
            return false; // the window is measured along the packed row, not along positions
        }
        cost(g as f64, l as f64) < cost(self.b as f64, self.t1 as f64 + 1.0)
    }

    fn gather(&self, hidden: &Tensor) -> Gathered {
        let (g, l, h) = hidden.size3().unwrap();
        let flat = hidden.reshape([g * l, h]);
        Gathered { sel: flat.index_select(0, &self.at), ys: self.ys.shallow_clone(), idx: self.idx.shallow_clone(), b: self.b, t1: self.t1 }
    }
}

/// Log-probabilities of `ys` under `h @ wᵀ` in row chunks (and the entropies of the distributions when
/// asked): `[n]` each.
fn chunked_logprobs(net: &Transformer, h: &Tensor, w: &Tensor, ys: &Tensor, chunk: i64, temperature: f64, entropy: bool) -> (Tensor, Option<Tensor>) {
    let n = h.size()[0];
    let (mut lps, mut ents) = (vec![], vec![]);
    let mut start = 0;
    while start < n {
        let len = chunk.max(1).min(n - start);
        let logits = scaled_logits(net, &h.narrow(0, start, len), w, temperature);
        let logp = logits.log_softmax(-1, logits.kind());
        lps.push(logp.gather(1, &ys.narrow(0, start, len).unsqueeze(1), false).squeeze_dim(1));
        if entropy {
            ents.push(-(logp.exp() * &logp).sum_dim_intlist(1, false, logp.kind()));
        }
        start += len;
    }
    let cat = |v: Vec<Tensor>| if v.is_empty() { Tensor::zeros([0], (Kind::Float, h.device())) } else { Tensor::cat(&v, 0) };
    (cat(lps), entropy.then(|| cat(ents)))
}

/// `h @ wᵀ / temperature` in at least fp32 (the projection itself under the network's autocast setting).
fn scaled_logits(net: &Transformer, h: &Tensor, w: &Tensor, temperature: f64) -> Tensor {
    let logits = upcast(net.autocast(|| h.linear(w, None::<Tensor>)));
    if temperature == 1.0 {
        logits
    } else {
        logits / temperature
    }
}

/// Scatters `[n]` values at `idx` into a zero `[b, t1]` grid.
fn grid(v: &Tensor, idx: &Tensor, b: i64, t1: i64) -> Tensor {
    Tensor::zeros([b * t1], (v.kind(), v.device())).index_put_(&[Some(idx.shallow_clone())], v, false).view([b, t1])
}

/// Per-token next-token log-probabilities, without gradients: `[B, T-1]` (position j holds log p(label[j+1])),
/// 0 where the label is IGNORE, plus the mask of labelled positions and, when asked, per-token entropies.
/// The distribution is softmax(logits / `temperature`), as the sampler's (TRL and verl score rollouts so).
pub fn token_logprobs(net: &Transformer, batch: &Batch, labels: &Tensor, chunk_rows: i64, temperature: f64, entropy: bool) -> (Tensor, Tensor, Option<Tensor>) {
    token_logprobs_of(net, &Scored::Rows(batch, labels), chunk_rows, temperature, entropy)
}

/// [`token_logprobs`] of rows given either way.
pub fn token_logprobs_of(net: &Transformer, rows: &Scored, chunk_rows: i64, temperature: f64, entropy: bool) -> (Tensor, Tensor, Option<Tensor>) {
    tch::no_grad(|| {
        let g = rows.gather(&rows.run(|b| net.hidden_states(b)));
        let (lp, ent) = chunked_logprobs(net, &g.sel, &net.lm_head_weight(), &g.ys, chunk_rows, temperature, entropy);
        let mask = grid(&Tensor::ones_like(&lp), &g.idx, g.b, g.t1).gt(0.5);
        (grid(&lp, &g.idx, g.b, g.t1), mask, ent.map(|e| grid(&e, &g.idx, g.b, g.t1)))
    })
}

/// Sum of next-token log-probabilities of the labelled tokens per row, without gradients: `[B]`, plus the
/// token count per row. Used for held-out loss and reference log-probabilities.
pub fn sequence_logprobs(net: &Transformer, batch: &Batch, labels: &Tensor, chunk_rows: i64) -> (Tensor, Tensor) {
    let (lp, mask, _) = token_logprobs(net, batch, labels, chunk_rows, 1.0, false);
    (lp.sum_dim_intlist(1, false, lp.kind()), mask.sum_dim_intlist(1, false, Kind::Int64))
}

/// Back-propagates any loss written in terms of per-token log-probabilities (DPO, policy gradients), without
/// ever holding full `[B, T, vocabulary]` logits in the graph:
///
/// 1. the labelled positions' hidden states are computed once and detached; their log-probabilities (and
///    entropies when asked) are computed chunk by chunk without a graph;
/// 2. `loss_fn(logp, entropy)` gets them as `[B, T-1]` leaves (0 at unlabelled positions) and returns the
///    scalar loss, which is back-propagated to those leaves only;
/// 3. each chunk's logits are recomputed with a graph and back-propagated with the leaves' gradients as
///    weights (exact chain rule), accumulating into the output projection and the detached hidden states;
/// 4. the hidden states' gradient is pushed through the network.
///
/// Log-probabilities are under softmax(logits / `temperature`). Returns the loss value and the (detached)
/// log-probabilities and entropies given to `loss_fn`.
pub fn logprob_backward<F>(net: &Transformer, rows: &Scored, chunk_rows: i64, temperature: f64, entropy: bool, loss_fn: F) -> (f64, Tensor, Option<Tensor>)
where
    F: FnOnce(&Tensor, Option<&Tensor>) -> Tensor,
{
    let trunk = rows.run(|b| Trunk::forward(net, b));
    let g = rows.gather(&trunk.hidden);
    let w = net.lm_head_weight();
    let detached = g.sel.detach().set_requires_grad(true);
    let (lp, ent) = tch::no_grad(|| chunked_logprobs(net, &detached, &w, &g.ys, chunk_rows, temperature, entropy));
    let lp_leaf = grid(&lp, &g.idx, g.b, g.t1).set_requires_grad(true);
    let ent_leaf = ent.map(|e| grid(&e, &g.idx, g.b, g.t1).set_requires_grad(true));
    let loss = loss_fn(&lp_leaf, ent_leaf.as_ref());
    let value = loss.double_value(&[]);
    if !loss.requires_grad() {
        return (value, lp_leaf.detach(), ent_leaf.map(|e| e.detach()));
    }
    // gradients w.r.t. the leaves only
    let mut inputs = vec![&lp_leaf];
    if let Some(e) = &ent_leaf {
        inputs.push(e);
    }
    let grads = Tensor::run_backward(&[&loss], &inputs, false, false);
    // an input the loss does not use (e.g. entropies only logged) has an undefined gradient; a row-sum loss
    // gives an expanded, non-contiguous one (hence reshape, not view)
    let pick = |t: &Tensor| t.defined().then(|| t.reshape([g.b * g.t1]).index_select(0, &g.idx));
    let g_lp = pick(&grads[0]).unwrap_or_else(|| Tensor::zeros([g.sel.size()[0]], (lp.kind(), lp.device())));
    let g_ent = grads.get(1).and_then(pick);
    let n = g.sel.size()[0];
    let mut start = 0;
    while start < n {
        let len = chunk_rows.max(1).min(n - start);
        let logits = scaled_logits(net, &detached.narrow(0, start, len), &w, temperature);
        let logp = logits.log_softmax(-1, logits.kind());
        let tok = logp.gather(1, &g.ys.narrow(0, start, len).unsqueeze(1), false).squeeze_dim(1);
        let mut surrogate = (tok * g_lp.narrow(0, start, len)).sum(logp.kind());
        if let Some(ge) = &g_ent {
            let h = -(logp.exp() * &logp).sum_dim_intlist(1, false, logp.kind());
            surrogate = surrogate + (h * ge.narrow(0, start, len)).sum(logp.kind());
        }
        surrogate.backward();
        start += len;
    }
    if n > 0 {
        let gh = detached.grad();
        (g.sel * gh).sum(Kind::Float).backward();
        trunk.backward(net);
    }
    (value, lp_leaf.detach(), ent_leaf.map(|e| e.detach()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Fill, ModelConfig};
    use tch::Device;

    fn tiny() -> Transformer {
        model::runtime::preload_cuda();
        let cfg = ModelConfig::from_json(
            serde_json::json!({"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true}),
            "test",
        )
        .unwrap();
        tch::manual_seed(3);
        let mut net = Transformer::build(&cfg, Kind::Double, Device::Cpu, Fill::Normal(0.3));
        net.params.set_requires_grad(true);
        net
    }

    #[test]
    fn chunked_loss_and_gradients_equal_the_plain_formula() {
        let net = tiny();
        let ids = Tensor::from_slice(&[5i64, 7, 9, 11, 3, 4, 8, 2, 6, 1, 10, 12]).view([2, 6]);
        let labels = Tensor::from_slice(&[-100i64, -100, 9, 11, 3, -100, -100, 8, 2, 6, 1, 10]).view([2, 6]);
        let batch = Batch::causal(&ids);
        // chunked, scaled by 1/n
        let (sum, n) = causal_lm_backward(&net, &batch, &labels, 1.0 / 8.0, 3);
        assert_eq!(n, 8);
        let g1: Vec<Tensor> = net.params.tensors().iter().map(|p| p.grad().copy()).collect();
        for p in net.params.tensors() {
            let _ = p.grad().zero_();
        }
        // reference: full logits, mean cross-entropy over labelled next tokens
        let logits = net.forward(&batch);
        let lg = logits.narrow(1, 0, 5).reshape([10, 50]);
        let y = labels.narrow(1, 1, 5).reshape([10]);
        let loss = lg.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, IGNORE, 0.0);
        assert!((loss.double_value(&[]) - sum / 8.0).abs() < 1e-10);
        loss.backward();
        for (a, p) in g1.iter().zip(net.params.tensors()) {
            let d = (a - p.grad()).abs().max().double_value(&[]);
            assert!(d < 1e-10, "gradient differs by {d}");
        }
        // sequence log-probs agree with the loss
        let (lp, cnt) = sequence_logprobs(&net, &batch, &labels, 4);
        assert!((lp.sum(Kind::Double).double_value(&[]) + sum).abs() < 1e-9);
        assert_eq!(Vec::<i64>::try_from(cnt).unwrap(), vec![3, 5]);
    }

    /// Gradients of every parameter, zeroed after reading.
    fn take_grads(net: &Transformer) -> Vec<Tensor> {
        net.params
            .tensors()
            .iter()
            .map(|p| {
                let g = p.grad().copy();
                let _ = p.grad().zero_();
                g
            })
            .collect()
    }

    fn checkpointing_net(model_type: &str, kind: Kind) -> Transformer {
        model::runtime::preload_cuda();
        let mut j = serde_json::json!({"model_type": model_type, "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": model_type != "phi3",
            "max_position_embeddings": 64});
        if model_type == "qwen3" {
            j["head_dim"] = serde_json::json!(8);
        }
        let cfg = ModelConfig::from_json(j, "test").unwrap();
        tch::manual_seed(11);
        let mut net = Transformer::build(&cfg, kind, Device::Cpu, Fill::Normal(0.3));
        net.params.set_requires_grad(true);
        net
    }

    #[test]
    fn activation_checkpointing_gives_the_gradients_of_the_full_graph() {
        // causal rows, a right-padded batch, and packed rows (positions restart, no cross-document attention)
        let ids = Tensor::from_slice(&[5i64, 7, 9, 11, 3, 4, 8, 2, 6, 1, 10, 12, 13, 14]).view([2, 7]);
        let labels = Tensor::from_slice(&[-100i64, -100, 9, 11, 3, 4, 8, -100, 6, 1, 10, 12, 13, 14]).view([2, 7]);
        let pad_labels = Tensor::from_slice(&[-100i64, -100, 9, 11, 3, 4, 8, -100, 6, 1, 10, -100, -100, -100]).view([2, 7]);
        let pos_pad = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0, 0, 0]).view([2, 7]);
        let keys = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]).view([2, 7]);
        let pos_packed = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]).view([2, 7]);
        let docs = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]).view([2, 7]);
        let batches = [(Batch::causal(&ids), &labels), (Batch::padded(&ids, &pos_pad, &keys), &pad_labels), (Batch::packed(&ids, &pos_packed, &docs), &labels)];
        let w = Tensor::from_slice(&[0.3f64, -1.2, 0.7, 2.0, -0.4, 1.1, 0.9, -0.8, 0.5, 1.5, 0.2, -0.3]).view([2, 6]);
        for model_type in ["qwen2", "qwen3", "phi3", "llama"] {
            for (kind, tol) in [(Kind::Double, 1e-12), (Kind::Float, 2e-6)] {
                let net = checkpointing_net(model_type, kind);
                let weights = w.to_kind(kind);
                let dpo_like = |lp: &Tensor, ent: Option<&Tensor>| {
                    let seq = (lp * &weights).sum_dim_intlist(1, false, kind);
                    -(seq.get(0) - seq.get(1)).sigmoid().log() - ent.unwrap().sum(kind) * 0.1
                };
                for (bi, (batch, labels)) in batches.iter().enumerate() {
                    let run = |on: bool| {
                        net.set_gradient_checkpointing(on);
                        let (l1, _) = causal_lm_backward(&net, batch, labels, 0.1, 3);
                        let g1 = take_grads(&net);
                        let (l2, lp, _) = logprob_backward(&net, &Scored::Rows(batch, labels), 4, 0.8, true, dpo_like);
                        (l1, l2, lp, g1, take_grads(&net))
                    };
                    let (a1, a2, alp, ag1, ag2) = run(false);
                    let (b1, b2, blp, bg1, bg2) = run(true);
                    let at = format!("{model_type} {kind:?} batch {bi}");
                    assert!((a1 - b1).abs() <= tol * a1.abs() && (a2 - b2).abs() <= tol * a2.abs().max(1.0), "{at}: losses differ");
                    assert!((&alp - &blp).abs().max().double_value(&[]) <= tol * 10.0, "{at}: log-probs differ");
                    for (x, y) in ag1.iter().zip(&bg1).chain(ag2.iter().zip(&bg2)) {
                        let scale = x.abs().max().double_value(&[]).max(1e-30);
                        let d = (x - y).abs().max().double_value(&[]);
                        assert!(d <= tol * scale, "{at}: a gradient differs by {d} (scale {scale})");
                    }
                    assert!(bg1.iter().any(|g| g.abs().max().double_value(&[]) > 0.0), "{at}: no gradient at all");
                }
            }
        }
    }

    #[test]
    fn logprob_backward_matches_autograd_through_full_logits() {
        let net = tiny();
        let ids = Tensor::from_slice(&[5i64, 7, 9, 11, 3, 4, 8, 2, 6, 1, 10, 12]).view([2, 6]);
        let labels = Tensor::from_slice(&[-100i64, -100, 9, 11, 3, -100, -100, 8, 2, 6, 1, 10]).view([2, 6]);
        let batch = Batch::causal(&ids);
        let weights = Tensor::from_slice(&[0.3f64, -1.2, 0.7, 2.0, -0.4, 1.1, 0.9, -0.8, 0.5, 1.5]).view([2, 5]);
        // a non-linear loss of per-row sums plus an entropy bonus
        let f = |lp: &Tensor, ent: Option<&Tensor>| {
            let seq = (lp * &weights).sum_dim_intlist(1, false, Kind::Double);
            let l = -(seq.get(0) - seq.get(1)).sigmoid().log();
            l - ent.unwrap().sum(Kind::Double) * 0.1
        };
        let (v, lp, ent) = logprob_backward(&net, &Scored::Rows(&batch, &labels), 3, 0.7, true, f);
        let g1: Vec<Tensor> = net.params.tensors().iter().map(|p| p.grad().copy()).collect();
        for p in net.params.tensors() {
            let _ = p.grad().zero_();
        }
        let logits = net.forward(&batch).narrow(1, 0, 5) / 0.7;
        let logp = logits.log_softmax(-1, Kind::Double);
        let y = labels.narrow(1, 1, 5);
        let mask = y.ne(IGNORE).to_kind(Kind::Double);
        let tok = logp.gather(2, &y.clamp_min(0).unsqueeze(2), false).squeeze_dim(2) * &mask;
        let h = -(logp.exp() * &logp).sum_dim_intlist(2, false, Kind::Double) * &mask;
        assert!((&tok - &lp).abs().max().double_value(&[]) < 1e-10);
        assert!((&h - ent.unwrap()).abs().max().double_value(&[]) < 1e-10);
        let reference = f(&tok, Some(&h));
        assert!((reference.double_value(&[]) - v).abs() < 1e-10);
        reference.backward();
        for (a, p) in g1.iter().zip(net.params.tensors()) {
            let d = (a - p.grad()).abs().max().double_value(&[]);
            assert!(d < 1e-10, "gradient differs by {d}");
        }
    }

    #[test]
    fn shared_prefix_layout_scores_and_differentiates_like_plain_rows() {
        let net = tiny();
        // two groups: three rows sharing [5, 7, 9] (one also shares its next token), two sharing [4, 8]
        let rows: Vec<(Vec<i64>, Vec<i64>)> = vec![
            (vec![5, 7, 9, 11, 3], vec![-100, -100, -100, 11, 3]),
            (vec![5, 7, 9, 11, 6, 2], vec![-100, -100, -100, 11, 6, 2]),
            (vec![5, 7, 9, 1], vec![-100, -100, -100, 1]),
            (vec![4, 8, 2, 6, 1, 10, 12], vec![-100, -100, 2, 6, 1, 10, 12]),
            (vec![4, 8, 13], vec![-100, 8, 13]),
        ];
        let group = [0, 0, 0, 1, 1];
        let refs: Vec<(&[i64], &[i64])> = rows.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
        let sp = SharedPrefix::new(&refs, &group, 0, tch::Device::Cpu);
        assert_eq!(sp.packed_tokens, 2 * 9, "prefixes [5,7,9,11] and [4] packed once per group");
        // the plain padded batch
        let t = 7;
        let (mut ids, mut labels, mut pos, mut mask) = (vec![0i64; 5 * t], vec![IGNORE; 5 * t], vec![0i64; 5 * t], vec![0i64; 5 * t]);
        for (i, (a, b)) in rows.iter().enumerate() {
            for j in 0..a.len() {
                ids[i * t + j] = a[j];
                labels[i * t + j] = b[j];
                pos[i * t + j] = j as i64;
                mask[i * t + j] = 1;
            }
        }
        let v = |x: Vec<i64>| Tensor::from_slice(&x).view([5, t as i64]);
        let (ids, labels, pos, mask) = (v(ids), v(labels), v(pos), v(mask));
        let batch = Batch::padded(&ids, &pos, &mask);
        let (lp_a, m_a, e_a) = token_logprobs_of(&net, &Scored::Rows(&batch, &labels), 4, 0.8, true);
        let (lp_b, m_b, e_b) = token_logprobs_of(&net, &Scored::Shared(&sp), 4, 0.8, true);
        assert!(m_a.equal(&m_b));
        assert!((&lp_a - &lp_b).abs().max().double_value(&[]) < 1e-12);
        assert!((e_a.unwrap() - e_b.unwrap()).abs().max().double_value(&[]) < 1e-12);
        let weights = Tensor::randn([5, t as i64 - 1], (Kind::Double, tch::Device::Cpu));
        let f = |lp: &Tensor, _: Option<&Tensor>| (lp * &weights).sum(Kind::Double).exp();
        let grads = |rows: &Scored| {
            for p in net.params.tensors() {
                if p.grad().defined() {
                    let _ = p.grad().zero_();
                }
            }
            let (v, _, _) = logprob_backward(&net, rows, 3, 0.8, false, f);
            (v, net.params.tensors().iter().map(|p| p.grad().copy()).collect::<Vec<_>>())
        };
        let (va, ga) = grads(&Scored::Rows(&batch, &labels));
        let (vb, gb) = grads(&Scored::Shared(&sp));
        assert!((va - vb).abs() < 1e-10 * va.abs().max(1.0));
        for (a, b) in ga.iter().zip(&gb) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-10, "gradient differs by {d}");
        }
    }

    #[test]
    fn right_padded_micro_rows_need_no_mask() {
        let net = tiny();
        let rows: Vec<(Vec<i64>, Vec<i64>)> = vec![(vec![3, 4, 5, 6, 7, 8], vec![-100, -100, 5, 6, 7, 8]), (vec![9, 10, 11], vec![-100, 10, 11])];
        let refs: Vec<(&[i64], &[i64])> = rows.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
        let mr = MicroRows::new(&net, &refs, &[0, 1], 0, PromptSharing::Never);
        let (x, _, _) = mr.with(|r| token_logprobs_of(&net, r, 4, 1.0, false));
        // with an explicit padding mask
        let (y, _, _) = token_logprobs(&net, &Batch::padded(&mr.ids, &mr.pos, &mr.aux), &mr.labels, 4, 1.0, false);
        assert!((&x - &y).abs().max().double_value(&[]) < 1e-10);
        // the short row alone
        let ids = Tensor::from_slice(&rows[1].0).view([1, 3]);
        let labels = Tensor::from_slice(&rows[1].1).view([1, 3]);
        let (z, _, _) = token_logprobs(&net, &Batch::causal(&ids), &labels, 4, 1.0, false);
        assert!((x.get(1).narrow(0, 0, 2) - z.get(0)).abs().max().double_value(&[]) < 1e-10);
    }
}
