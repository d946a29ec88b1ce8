//! The decoder-only transformer shared by Llama, Qwen2, Qwen3 and Phi-3: pre-norm blocks of grouped-query
//! attention (through libtorch's `scaled_dot_product_attention`, so GPUs use fused kernels) and a SwiGLU MLP.
//! Parameter names are exactly Hugging Face's.

use crate::config::{Family, ModelConfig};
use crate::kv_cache::KvCache;
use crate::mix64;
use crate::lora::{Adapters, LoraConfig, LoraLayer};
use crate::params::{Fill, ParamStore};
use crate::rope::Rope;
use tch::{Device, Kind, Tensor};

struct Linear {
    /// The module's name (`model.layers.0.self_attn.q_proj`); empty for decode copies.
    name: String,
    w: Tensor,
    b: Option<Tensor>,
    /// Decoding copies on the CPU in fp32: `w` packed for MKL for products with this many rows.
    packed: Option<(Tensor, i64)>,
    /// A LoRA adapter on this projection ([`Transformer::add_lora`]).
    lora: Option<LoraLayer>,
}

impl Linear {
    fn new(ps: &mut ParamStore, name: &str, inp: i64, out: i64, bias: bool, init: Fill) -> Linear {
        let w = ps.get_or_create(&format!("{name}.weight"), &[out, inp], init);
        let b = bias.then(|| {
            let bf = if matches!(init, Fill::Empty) { Fill::Empty } else { Fill::Zeros };
            ps.get_or_create(&format!("{name}.bias"), &[out], bf)
        });
        Linear { name: name.to_string(), w, b, packed: None, lora: None }
    }
    /// A decode copy: weights only.
    fn copy(w: Tensor, b: Option<Tensor>) -> Linear {
        Linear { name: String::new(), w, b, packed: None, lora: None }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        if let Some((p, rows)) = &self.packed {
            if x.numel() as i64 == rows * self.w.size()[1] {
                return crate::mkl::linear(x, p, &self.w, self.b.as_ref(), *rows);
            }
        }
        let y = x.linear(&self.w, self.b.as_ref());
        match &self.lora {
            Some(l) => l.add_to(y, x),
            None => y,
        }
    }
    /// Packs the weight for MKL products with `rows` rows where that applies (fp32, CPU), else drops
    /// any packing.
    fn pack_for_rows(&mut self, rows: i64) {
        if self.packed.as_ref().is_some_and(|(_, r)| *r == rows) {
            return;
        }
        self.packed = if crate::mkl::applies(&self.w) { crate::mkl::pack(&self.w, rows).ok().map(|p| (p, rows)) } else { None };
    }
}

/// RMSNorm (Zhang & Sennrich 2019) computed in fp32 and cast back, as transformers' LlamaRMSNorm does.
struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(ps: &mut ParamStore, name: &str, dim: i64, eps: f64, init: Fill) -> RmsNorm {
        let f = if matches!(init, Fill::Empty) { Fill::Empty } else { Fill::Ones };
        RmsNorm { w: ps.get_or_create(&format!("{name}.weight"), &[dim], f), eps }
    }
    /// ATen's `rms_norm`: normalises in fp32 and casts back before the weight, as transformers does (its
    /// CPU path is that composite; on CUDA one fused kernel instead of eight).
    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = x.size().last().copied().unwrap_or(0);
        x.rms_norm([dim], Some(&self.w), self.eps)
    }
}

enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

struct Attention {
    qkv: Qkv,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_head: i64,
    n_kv: i64,
    head_dim: i64,
}

enum Mlp {
    Split { gate: Linear, up: Linear, down: Linear },
    Fused { gate_up: Linear, down: Linear },
}

struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

/// What each query may attend to, besides causality.
pub enum AttnMask<'a> {
    /// Plain causal attention over the whole row.
    Causal,
    /// `[B, T_keys]`, nonzero where the key is a real token (left- or right-padded batches).
    Padding(&'a Tensor),
    /// `[B, T]` document index per token: packed rows, no attention across documents.
    Documents(&'a Tensor),
    /// `[B, T]` segment per token for a shared prefix followed by branches: 0 = the prefix (seen by every
    /// later token), k ≥ 1 = branch k (sees the prefix and, causally, its own branch), -1 = padding. A group
    /// of G completions of one prompt then costs one prompt plus G completions instead of G prompts.
    Branches(&'a Tensor),
}

/// Inputs of one forward pass.
pub struct Batch<'a> {
    /// `[B, T]` token ids (int64).
    pub input_ids: &'a Tensor,
    /// `[B, T]` position ids; `None` means 0..T for every row.
    pub position_ids: Option<&'a Tensor>,
    pub mask: AttnMask<'a>,
    /// LongRoPE only: force the long (`Some(true)`) or short factors. `None` follows transformers: long
    /// when the largest position id in the batch reaches past `original_max_position_embeddings`.
    /// Training on sequences that were sampled with a KV cache should pass the cache's choice
    /// ([`KvCache::rope_long`]) so that log-probabilities agree.
    pub rope_long: Option<bool>,
}

impl<'a> Batch<'a> {
    /// Plain causal attention, positions 0..T.
    pub fn causal(input_ids: &'a Tensor) -> Batch<'a> {
        Batch { input_ids, position_ids: None, mask: AttnMask::Causal, rope_long: None }
    }
    /// A padded batch: `attention_mask` [B, T] nonzero on real tokens.
    pub fn padded(input_ids: &'a Tensor, position_ids: &'a Tensor, attention_mask: &'a Tensor) -> Batch<'a> {
        Batch { input_ids, position_ids: Some(position_ids), mask: AttnMask::Padding(attention_mask), rope_long: None }
    }
    /// Packed rows: `doc_ids` [B, T] names each token's document; no attention across documents.
    pub fn packed(input_ids: &'a Tensor, position_ids: &'a Tensor, doc_ids: &'a Tensor) -> Batch<'a> {
        Batch { input_ids, position_ids: Some(position_ids), mask: AttnMask::Documents(doc_ids), rope_long: None }
    }
    /// A shared prefix and its branches in one row (see [`AttnMask::Branches`]); positions of each branch
    /// continue from the prefix's end.
    pub fn branches(input_ids: &'a Tensor, position_ids: &'a Tensor, segments: &'a Tensor) -> Batch<'a> {
        Batch { input_ids, position_ids: Some(position_ids), mask: AttnMask::Branches(segments), rope_long: None }
    }
}

pub struct Transformer {
    pub cfg: ModelConfig,
    pub params: ParamStore,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    /// Activation checkpointing in [`Transformer::hidden_states_checkpointed`] users (the trainer's losses).
    checkpointing: std::sync::atomic::AtomicBool,
    /// The autocast dtype of forward passes ([`crate::autocast`]), encoded; 0: none.
    autocast: std::sync::atomic::AtomicI8,
    /// LoRA adapters on some projections ([`Transformer::add_lora`]).
    adapters: Option<Adapters>,
    /// Adapter dropout in training forwards: the seed of the running optimizer step and the forwards taken in
    /// it ([`Transformer::set_dropout_seed`]).
    dropout_seed: std::sync::Mutex<Option<(u64, u64)>>,
}

/// What [`Transformer::hidden_states_checkpointed`] keeps for the backward: each decoder layer's input,
/// the last layer's output, and the attention inputs shared by all layers.
pub struct Checkpoints {
    input_ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    /// `num_hidden_layers + 1` tensors `[B, T, hidden]`: the embeddings, each layer's output.
    saved: Vec<Tensor>,
    /// The forward's adapter-dropout key: the recompute draws each layer's masks again from it.
    dropout: Option<u64>,
}

/// What the checkpointed training passes tell the layer hook ([`set_layer_hook`]) about decoder layer `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerEvent {
    /// Layer `i`'s weights are about to be used by its forward (layers in order).
    Enter(usize),
    /// Layer `i`'s weights are about to be used by its recompute and backward (last layer first).
    Reenter(usize),
    /// Layer `i`'s backward is done: its parameter gradients are final for this backward.
    BackwardDone(usize),
    /// Layer `i`'s weights are not needed again in this pass.
    Leave(usize),
}

thread_local! {
    static LAYER_HOOK: std::cell::RefCell<Option<std::rc::Rc<dyn Fn(LayerEvent)>>> = const { std::cell::RefCell::new(None) };
}

/// Installs (or, with `None`, removes) the function the checkpointed passes call on this thread around each
/// decoder layer: [`Transformer::hidden_states_checkpointed`] with `Enter(i)` and `Leave(i)` around layer i's
/// forward, [`Transformer::backward_checkpointed`] (last layer first) with `Reenter(i)` before the recompute,
/// `BackwardDone(i)` after the layer's backward and `Leave(i)`. Sharded data parallelism gathers a layer's
/// weights on `Enter` and `Reenter`, reduces and frees its gradients on `BackwardDone` and frees the weights on `Leave`.
pub fn set_layer_hook(hook: Option<std::rc::Rc<dyn Fn(LayerEvent)>>) {
    LAYER_HOOK.with(|h| *h.borrow_mut() = hook);
}

fn layer_event(e: LayerEvent) {
    let hook = LAYER_HOOK.with(|h| h.borrow().clone());
    if let Some(h) = hook {
        h(e)
    }
}

/// `Σ out ⊙ grad` back-propagated: accumulates `gradᵀ ∂out/∂θ` into the parameters (and leaves) that `out`
/// depends on. The derivative of the sum with respect to `out` is `grad` exactly.
fn backward_with(out: &Tensor, grad: &Tensor) {
    if !out.requires_grad() {
        return; // nothing below takes gradients (a frozen base's embedding under LoRA)
    }
    let acc = if out.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    (out * grad).sum(acc).backward();
}

impl Transformer {
    /// Builds the module tree with parameters filled by `init` (use [`Fill::Empty`] before loading weights).
    pub fn build(cfg: &ModelConfig, kind: Kind, device: Device, init: Fill) -> Transformer {
        Transformer::build_in(cfg, ParamStore::new(kind, device), init)
    }

    /// [`Transformer::build`] in `ps`: parameters already there are used as they are (views sharing
    /// another network's tensors), the others are created with `init`.
    fn build_in(cfg: &ModelConfig, mut ps: ParamStore, init: Fill) -> Transformer {
        let device = ps.device;
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let embed = ps.get_or_create("model.embed_tokens.weight", &[cfg.vocab_size, h], init);
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers as usize);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_norm = RmsNorm::new(&mut ps, &format!("{p}.input_layernorm"), h, cfg.rms_norm_eps, init);
            let a = format!("{p}.self_attn");
            let qkv = match cfg.family {
                Family::Phi3 => Qkv::Fused(Linear::new(&mut ps, &format!("{a}.qkv_proj"), h, (nh + 2 * nkv) * hd, cfg.qkv_bias, init)),
                _ => Qkv::Split {
                    q: Linear::new(&mut ps, &format!("{a}.q_proj"), h, nh * hd, cfg.qkv_bias, init),
                    k: Linear::new(&mut ps, &format!("{a}.k_proj"), h, nkv * hd, cfg.qkv_bias, init),
                    v: Linear::new(&mut ps, &format!("{a}.v_proj"), h, nkv * hd, cfg.qkv_bias, init),
                },
            };
            let o = Linear::new(&mut ps, &format!("{a}.o_proj"), nh * hd, h, cfg.o_bias, init);
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(RmsNorm::new(&mut ps, &format!("{a}.q_norm"), hd, cfg.rms_norm_eps, init)),
                    Some(RmsNorm::new(&mut ps, &format!("{a}.k_norm"), hd, cfg.rms_norm_eps, init)),
                )
            } else {
                (None, None)
            };
            let post_norm = RmsNorm::new(&mut ps, &format!("{p}.post_attention_layernorm"), h, cfg.rms_norm_eps, init);
            let m = format!("{p}.mlp");
            let inter = cfg.intermediate_size;
            let mlp = match cfg.family {
                Family::Phi3 => Mlp::Fused {
                    gate_up: Linear::new(&mut ps, &format!("{m}.gate_up_proj"), h, 2 * inter, cfg.mlp_bias, init),
                    down: Linear::new(&mut ps, &format!("{m}.down_proj"), inter, h, cfg.mlp_bias, init),
                },
                _ => Mlp::Split {
                    gate: Linear::new(&mut ps, &format!("{m}.gate_proj"), h, inter, cfg.mlp_bias, init),
                    up: Linear::new(&mut ps, &format!("{m}.up_proj"), h, inter, cfg.mlp_bias, init),
                    down: Linear::new(&mut ps, &format!("{m}.down_proj"), inter, h, cfg.mlp_bias, init),
                },
            };
            blocks.push(Block {
                input_norm,
                attn: Attention { qkv, o, q_norm, k_norm, n_head: nh, n_kv: nkv, head_dim: hd },
                post_norm,
                mlp,
            });
        }
        let norm = RmsNorm::new(&mut ps, "model.norm", h, cfg.rms_norm_eps, init);
        let lm_head = if cfg.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            ps.get_or_create("lm_head.weight", &[cfg.vocab_size, h], init)
        };
        let rope = Rope::new(cfg, device);
        let checkpointing = Default::default();
        let autocast = crate::autocast::encode(crate::autocast::default_kind()).into();
        Transformer { cfg: cfg.clone(), params: ps, embed, blocks, norm, lm_head, rope, checkpointing, autocast, adapters: None, dropout_seed: Default::default() }
    }

    /// Every projection of the decoder, in parameter order (not the output head).
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![];
        for blk in &mut self.blocks {
            match &mut blk.attn.qkv {
                Qkv::Split { q, k, v } => out.extend([q, k, v]),
                Qkv::Fused(l) => out.push(l),
            }
            out.push(&mut blk.attn.o);
            match &mut blk.mlp {
                Mlp::Split { gate, up, down } => out.extend([gate, up, down]),
                Mlp::Fused { gate_up, down } => out.extend([gate_up, down]),
            }
        }
        out
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out = vec![];
        for blk in &self.blocks {
            match &blk.attn.qkv {
                Qkv::Split { q, k, v } => out.extend([q, k, v]),
                Qkv::Fused(l) => out.push(l),
            }
            out.push(&blk.attn.o);
            match &blk.mlp {
                Mlp::Split { gate, up, down } => out.extend([gate, up, down]),
                Mlp::Fused { gate_up, down } => out.extend([gate_up, down]),
            }
        }
        out
    }

    /// Every projection `build` makes for `cfg`: (module name, in features, out features), in parameter
    /// order — what an adapter's size is computed from without building the network.
    pub fn projection_shapes(cfg: &ModelConfig) -> Vec<(String, i64, i64)> {
        let h = cfg.hidden_size;
        let (nh, nkv, hd, inter) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let mut out = vec![];
        for i in 0..cfg.num_hidden_layers {
            let (a, m) = (format!("model.layers.{i}.self_attn"), format!("model.layers.{i}.mlp"));
            let attn: Vec<(&str, i64, i64)> = match cfg.family {
                Family::Phi3 => vec![("qkv_proj", h, (nh + 2 * nkv) * hd)],
                _ => vec![("q_proj", h, nh * hd), ("k_proj", h, nkv * hd), ("v_proj", h, nkv * hd)],
            };
            let mlp: Vec<(&str, i64, i64)> = match cfg.family {
                Family::Phi3 => vec![("gate_up_proj", h, 2 * inter), ("down_proj", inter, h)],
                _ => vec![("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)],
            };
            out.extend(attn.into_iter().map(|(n, i, o)| (format!("{a}.{n}"), i, o)));
            out.push((format!("{a}.o_proj"), nh * hd, h));
            out.extend(mlp.into_iter().map(|(n, i, o)| (format!("{m}.{n}"), i, o)));
        }
        out
    }

    /// Puts a new LoRA adapter ([`crate::lora`]) on every projection `cfg.target_modules` names; the base's
    /// parameters are left as they are (the caller freezes them). Returns how many projections got one.
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> crate::Result<usize> {
        if self.adapters.is_some() {
            return Err(crate::ModelError::Other("this network already has an adapter".into()));
        }
        if cfg.r < 1 {
            return Err(crate::ModelError::Other(format!("lora r must be a positive integer, got {}", cfg.r)));
        }
        if !(0.0..1.0).contains(&cfg.lora_dropout) {
            return Err(crate::ModelError::Other(format!("lora_dropout must be in [0, 1), got {}", cfg.lora_dropout)));
        }
        let mut ps = ParamStore::new(Kind::Float, self.device());
        let dropping = crate::lora::DropoutKey::default();
        let mut n = 0;
        for l in self.linears_mut() {
            if cfg.target_modules.matches(&l.name) {
                let (out, inp) = l.w.size2().expect("a projection is a matrix");
                l.lora = Some(LoraLayer::create(&mut ps, &l.name, inp, out, cfg, &dropping, n as u64));
                n += 1;
            }
        }
        if n == 0 {
            let mut kinds: Vec<String> = self.linears().iter().filter_map(|l| l.name.rsplit('.').next().map(str::to_string)).collect();
            kinds.dedup();
            kinds.sort();
            kinds.dedup();
            return Err(crate::ModelError::Other(format!(
                "lora target_modules {} match no projection of this model; its projections are {}",
                cfg.target_modules.to_json(),
                kinds.join(", ")
            )));
        }
        self.adapters = Some(Adapters { cfg: cfg.clone(), params: ps, dropping });
        Ok(n)
    }

    /// Adapter dropout (`lora_dropout` > 0) in the training forwards of one optimizer step: `seed` (distinct
    /// per step and rank) keys the step's forwards, the k-th forward [`Transformer::training_hidden_states`]
    /// takes after this call getting masks drawn from (seed, k, layer). So a resumed run redraws the masks of an
    /// uninterrupted one, and activation checkpointing's recompute redraws the forward's own. `None`: no
    /// dropout (evaluation, sampling).
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        *self.dropout_seed.lock().expect("dropout seed") = seed.map(|s| (s, 0));
    }

    /// The key of a new training forward's dropout masks, when it has any.
    fn next_dropout_key(&self) -> Option<u64> {
        if !self.adapters.as_ref().is_some_and(|a| a.cfg.lora_dropout > 0.0) {
            return None;
        }
        let mut g = self.dropout_seed.lock().expect("dropout seed");
        let (seed, k) = g.as_mut()?;
        *k += 1;
        Some(mix64(*seed ^ mix64(*k)))
    }

    /// Runs `f` (one decoder layer) with adapter dropout drawn from (`key`, `layer`), or without dropout.
    fn with_dropout<T>(&self, key: Option<u64>, layer: usize, f: impl FnOnce() -> T) -> T {
        let (Some(key), Some(a)) = (key, &self.adapters) else { return f() };
        // 0 means "no dropout"
        a.dropping.store(mix64(key ^ layer as u64).max(1), std::sync::atomic::Ordering::Relaxed);
        let out = f();
        a.dropping.store(0, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// The adapters, when the network has them.
    pub fn adapters(&self) -> Option<&Adapters> {
        self.adapters.as_ref()
    }

    /// The parameters training updates: the adapters' when there are adapters, else all of them.
    pub fn trainable(&self) -> &ParamStore {
        self.adapters.as_ref().map_or(&self.params, |a| &a.params)
    }

    /// The same network without its adapters, sharing every base tensor (no copy): the reference model of
    /// LoRA training is the base with the adapter switched off.
    pub fn base_view(&self) -> Transformer {
        self.rebuild(|_, t| t.shallow_clone())
    }

    /// Adds each adapter's `s · B A` into its projection's weight (in the weight's dtype) and drops the
    /// adapters: the network then computes what base + adapter did, up to that rounding.
    pub fn merge_adapters(&mut self) {
        for l in self.linears_mut() {
            if let Some(a) = l.lora.take() {
                let merged = a.merged(&l.w);
                tch::no_grad(|| l.w.copy_(&merged));
            }
        }
        self.adapters = None;
    }

    /// A network over `weight(name, tensor)` of each parameter, with this one's settings and no adapters.
    fn rebuild(&self, weight: impl Fn(&str, &Tensor) -> Tensor) -> Transformer {
        let mut ps = ParamStore::new(self.kind(), self.device());
        for (n, t) in self.params.iter() {
            ps.insert(n, weight(n, t));
        }
        let net = Transformer::build_in(&self.cfg, ps, Fill::Empty);
        net.set_autocast(self.autocast_kind());
        net.set_gradient_checkpointing(self.gradient_checkpointing());
        net
    }

    /// The network with each adapter merged into copies of its projections (the other tensors shared):
    /// what decode weights are built from.
    fn merged_view(&self) -> Transformer {
        let merged: std::collections::HashMap<String, Tensor> =
            self.linears().into_iter().filter_map(|l| l.lora.as_ref().map(|a| (format!("{}.weight", l.name), a.merged(&l.w)))).collect();
        self.rebuild(|n, t| merged.get(n).map_or_else(|| t.shallow_clone(), |m| m.shallow_clone()))
    }

    /// Mixed precision: forward passes run in an autocast region computing in `kind` (e.g. bfloat16 over
    /// fp32 weights); `None` computes in the weights' dtype. New networks take [`crate::autocast::default_kind`].
    pub fn set_autocast(&self, kind: Option<Kind>) {
        self.autocast.store(crate::autocast::encode(kind), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn autocast_kind(&self) -> Option<Kind> {
        crate::autocast::decode(self.autocast.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Runs `f` (a forward computation with this network's weights) under the network's autocast setting.
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        crate::autocast::autocast(self.device(), self.autocast_kind(), f)
    }

    /// Switches activation checkpointing on or off for the training losses that ask
    /// [`Transformer::gradient_checkpointing`].
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn device(&self) -> Device {
        self.params.device
    }

    pub fn kind(&self) -> Kind {
        self.params.kind
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    /// Final hidden states `[B, T, hidden]` (after the last norm).
    pub fn hidden_states(&self, batch: &Batch) -> Tensor {
        self.hidden_states_with(batch, None)
    }

    /// [`Transformer::hidden_states`] of a training loss: with adapter dropout when it is on
    /// ([`Transformer::set_dropout_seed`]).
    pub fn training_hidden_states(&self, batch: &Batch) -> Tensor {
        self.hidden_states_with(batch, self.next_dropout_key())
    }

    fn hidden_states_with(&self, batch: &Batch, dropout: Option<u64>) -> Tensor {
        let (cos, sin, mask) = self.attention_inputs(batch);
        self.autocast(|| {
            let mut x = self.embed.embedding_fwd(batch.input_ids);
            for (i, blk) in self.blocks.iter().enumerate() {
                x = self.with_dropout(dropout, i, || blk.forward(&x, &cos, &sin, &self.rope, mask.as_ref(), None, None));
            }
            self.norm.forward(&x)
        })
    }

    /// Activation checkpointing, forward half: the final hidden states computed without an autograd graph,
    /// keeping only each decoder layer's input. Returns them as a leaf that requires grad (compute the
    /// head and loss on it and back-propagate), and what [`Transformer::backward_checkpointed`] needs to
    /// push that leaf's gradient through the network, recomputing one layer at a time. Peak activation
    /// memory drops from every layer's intermediates to one `[B, T, hidden]` tensor per layer plus one
    /// layer's intermediates.
    /// It is a training forward: adapter dropout applies when it is on ([`Transformer::set_dropout_seed`]), and
    /// the recompute draws the same masks.
    pub fn hidden_states_checkpointed(&self, batch: &Batch) -> (Tensor, Checkpoints) {
        let (cos, sin, mask) = self.attention_inputs(batch);
        let dropout = self.next_dropout_key();
        let (hidden, saved) = self.autocast(|| tch::no_grad(|| {
            let mut saved = Vec::with_capacity(self.blocks.len() + 1);
            let mut x = self.embed.embedding_fwd(batch.input_ids);
            for (i, blk) in self.blocks.iter().enumerate() {
                layer_event(LayerEvent::Enter(i));
                let next = self.with_dropout(dropout, i, || blk.forward(&x, &cos, &sin, &self.rope, mask.as_ref(), None, None));
                layer_event(LayerEvent::Leave(i));
                saved.push(x);
                x = next;
            }
            let hidden = self.norm.forward(&x);
            saved.push(x);
            (hidden, saved)
        }));
        let ck = Checkpoints { input_ids: batch.input_ids.shallow_clone(), cos, sin, mask, saved, dropout };
        (hidden.set_requires_grad(true), ck)
    }

    /// Activation checkpointing, backward half: `grad` is the loss's gradient with respect to the hidden
    /// states [`Transformer::hidden_states_checkpointed`] returned. The final norm and then each layer, last
    /// first, are recomputed from a leaf copy of their saved input and back-propagated with
    /// `Σ out ⊙ grad_out`, which accumulates the parameters' gradients and yields the input's gradient for
    /// the layer below; the embedding gets the last one.
    /// Around each layer the hook [`set_layer_hook`] installed on this thread (if any) is told what happens.
    pub fn backward_checkpointed(&self, ck: Checkpoints, grad: &Tensor) {
        let Checkpoints { input_ids, cos, sin, mask, mut saved, dropout } = ck;
        let leaf = |t: Tensor| t.detach().set_requires_grad(true);
        // recomputed under the same autocast setting as the forward; back-propagated outside it
        let x = leaf(saved.pop().expect("checkpoints"));
        backward_with(&self.autocast(|| self.norm.forward(&x)), grad);
        let mut g = x.grad();
        for (i, blk) in self.blocks.iter().enumerate().rev() {
            let x = leaf(saved.pop().expect("one checkpoint per layer"));
            layer_event(LayerEvent::Reenter(i));
            let out = self.with_dropout(dropout, i, || self.autocast(|| blk.forward(&x, &cos, &sin, &self.rope, mask.as_ref(), None, None)));
            backward_with(&out, &g);
            g = x.grad();
            drop(out);
            layer_event(LayerEvent::BackwardDone(i));
            layer_event(LayerEvent::Leave(i));
        }
        backward_with(&self.autocast(|| self.embed.embedding_fwd(&input_ids)), &g);
    }

    /// RoPE tables and the attention mask of a batch (none for plain causal attention).
    fn attention_inputs(&self, batch: &Batch) -> (Tensor, Tensor, Option<Tensor>) {
        let (b, t) = batch.input_ids.size2().expect("input_ids must be [batch, seq]");
        let device = self.device();
        let default_pos;
        let pos = match batch.position_ids {
            Some(p) => p,
            None => {
                default_pos = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false);
                &default_pos
            }
        };
        let long = match batch.rope_long {
            Some(l) => l,
            None if self.rope.has_long() => {
                let max_pos = if batch.position_ids.is_some() { pos.max().int64_value(&[]) } else { t - 1 };
                self.rope.long_for(max_pos)
            }
            None => false,
        };
        let (cos, sin) = self.rope.cos_sin(pos, long, self.kind());
        let mask = build_mask(&batch.mask, b, t, 0, self.cfg.sliding_window, device);
        (cos, sin, mask)
    }

    /// Logits `[B, T, vocab]` in the model's dtype.
    pub fn forward(&self, batch: &Batch) -> Tensor {
        self.autocast(|| self.hidden_states(batch).linear(&self.lm_head, None::<Tensor>))
    }

    /// Whether a context of `len` positions uses LongRoPE's long factors (false for other scalings).
    pub fn rope_long_for_len(&self, len: i64) -> bool {
        self.rope.long_for(len - 1)
    }

    /// Incremental decoding: runs `input_ids` `[B, T]` at `position_ids` after the `cache.len()` cached
    /// positions, appends their keys and values to `cache`, and returns logits `[B, T, vocab]`.
    /// `key_mask` `[B, cache.len() + T]` is nonzero for real (non-padding) keys.
    ///
    /// LongRoPE: one cache uses one set of factors for all its positions (mixing them would make cached
    /// keys inconsistent), chosen from the cache's capacity unless set with [`KvCache::set_rope_long`].
    pub fn forward_cached(&self, input_ids: &Tensor, position_ids: &Tensor, key_mask: &Tensor, cache: &mut KvCache) -> Tensor {
        self.forward_cached_with(input_ids, position_ids, key_mask, cache, None)
    }

    /// [`Transformer::forward_cached`] with the projections of `weights` (from
    /// [`Transformer::decode_weights`] of these parameters): one matmul for q, k and v and one for gate and
    /// up instead of five, weights already in the autocast dtype. Same results up to floating-point
    /// rounding of the matmuls.
    pub fn forward_cached_with(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
        weights: Option<&DecodeWeights>,
    ) -> Tensor {
        self.cached(input_ids, position_ids, key_mask, cache, weights, Head::All).expect("logits of every position")
    }

    /// Prefill: [`Transformer::forward_cached`] for prompt positions that need no logits but (with `last`) the
    /// last position's, `[B, vocab]`. The output projection then runs on one position per row instead of all
    /// `T` (for a 150k vocabulary it is a quarter of a small model's weights), and no `[B, T, vocab]` tensor
    /// is made. `None` without `last`.
    pub fn prefill_cached(&self, input_ids: &Tensor, position_ids: &Tensor, key_mask: &Tensor, cache: &mut KvCache, last: bool) -> Option<Tensor> {
        self.cached(input_ids, position_ids, key_mask, cache, None, if last { Head::Last } else { Head::None })
    }

    fn cached(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_mask: &Tensor,
        cache: &mut KvCache,
        weights: Option<&DecodeWeights>,
        head: Head,
    ) -> Option<Tensor> {
        let (b, t) = input_ids.size2().expect("input_ids must be [batch, seq]");
        let past = cache.len();
        assert!(past + t <= cache.capacity(), "KV cache overflow: {} + {} > {}", past, t, cache.capacity());
        // the native step takes one-token steps with logits; anything else runs on the parameters
        let (native, weights) = match weights.map(|w| &w.inner) {
            Some(DecodeInner::Native(n)) => (Some(n), None),
            Some(DecodeInner::Torch { layers, lm_head }) => {
                assert_eq!(layers.len(), self.blocks.len(), "decode weights of another model");
                (None, Some((layers, lm_head)))
            }
            None => (None, None),
        };
        let long = match cache.rope_long() {
            Some(l) => l,
            None => {
                let l = self.rope.long_for(cache.capacity() - 1);
                cache.set_rope_long(l);
                l
            }
        };
        if let Some(n) = native.filter(|_| t == 1 && matches!(head, Head::All) && self.autocast_kind().is_none()) {
            if n.cache_fits(cache) {
                return Some(n.step(input_ids, position_ids, long, key_mask, cache));
            }
        }
        let (cos, sin) = self.rope.cos_sin(position_ids, long, self.kind());
        let mut mask = build_mask(&AttnMask::Padding(key_mask), b, t, past, self.cfg.sliding_window, self.device());
        if t == 1 {
            // decoding: the additive form once per step, instead of a conversion inside every layer's attention
            let kind = self.autocast_kind().unwrap_or(self.kind());
            mask = mask.map(|m| Tensor::zeros(m.size(), (kind, m.device())).masked_fill(&m.logical_not(), f64::NEG_INFINITY));
        }
        let logits = self.autocast(|| {
            let mut x = self.embed.embedding_fwd(input_ids);
            for (i, blk) in self.blocks.iter().enumerate() {
                let (k, v) = cache.layer_mut(i);
                let fused = weights.map(|(layers, _)| &layers[i]);
                x = blk.forward(&x, &cos, &sin, &self.rope, mask.as_ref(), Some((k, v, CacheWrite::At(past))), fused);
            }
            let x = match head {
                Head::All => x,
                Head::Last => x.select(1, t - 1),
                Head::None => return None,
            };
            let x = self.norm.forward(&x);
            Some(match weights {
                Some((_, lm_head)) => lm_head.forward(&x),
                None => x.linear(&self.lm_head, None::<Tensor>),
            })
        });
        cache.advance(t);
        logits
    }

    /// One decode step whose shapes and host arguments stay the same from step to step, so that it can be
    /// captured once and replayed (a CUDA graph): every row feeds one token (`input_ids` `[B, 1]` at
    /// `position_ids` `[B, 1]`), writes its key and value into cache slot `slot` (an int64 `[1]` tensor on the
    /// model's device, the same slot for every row, as [`Transformer::forward_cached`] writes at
    /// `cache.len()`) and attends over the first `span` slots: those where `key_mask` `[B, ≥ span]` is true
    /// and that are not after `slot`. Returns logits `[B, vocab]`. Neither the cache's length nor anything
    /// else on the host changes: the caller advances the cache ([`KvCache::advance`]) and the slot.
    ///
    /// Same arithmetic as [`Transformer::forward_cached_with`] except that attention runs over `span` keys
    /// (the extra ones masked) instead of `cache.len() + 1`. The cache's LongRoPE choice must be set (a
    /// prefill sets it).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_static(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_mask: &Tensor,
        slot: &Tensor,
        span: i64,
        cache: &mut KvCache,
        weights: Option<&DecodeWeights>,
    ) -> Tensor {
        let (b, t) = input_ids.size2().expect("input_ids must be [batch, 1]");
        assert!(t == 1 && span <= cache.capacity(), "a static step feeds one token per row over at most the capacity");
        let weights = match weights.map(|w| &w.inner) {
            Some(DecodeInner::Torch { layers, lm_head }) => Some((layers, lm_head)),
            Some(DecodeInner::Native(_)) => panic!("a static decode step runs on libtorch's decode weights, not the native ones"),
            None => None,
        };
        let long = cache.rope_long().expect("a static decode step follows a prefill, which fixes the LongRoPE choice");
        let device = self.device();
        let (cos, sin) = self.rope.cos_sin(position_ids, long, self.kind());
        let k_idx = Tensor::arange(span, (Kind::Int64, device));
        let mut upto = k_idx.le_tensor(slot);
        if let Some(w) = self.cfg.sliding_window {
            upto = upto.logical_and(&(slot - &k_idx).lt(w));
        }
        let upto = upto.view([1, span]);
        let visible = key_mask.narrow(1, 0, span).logical_and(&upto).view([b, 1, 1, span]);
        let kind = self.autocast_kind().unwrap_or(self.kind());
        let mask = Tensor::zeros([b, 1, 1, span], (kind, device)).masked_fill(&visible.logical_not(), f64::NEG_INFINITY);
        self.autocast(|| {
            let mut x = self.embed.embedding_fwd(input_ids);
            for (i, blk) in self.blocks.iter().enumerate() {
                let (k, v) = cache.layer_mut(i);
                let fused = weights.map(|(layers, _)| &layers[i]);
                x = blk.forward(&x, &cos, &sin, &self.rope, Some(&mask), Some((k, v, CacheWrite::Slot(slot, span))), fused);
            }
            let x = self.norm.forward(&x.select(1, 0));
            match weights {
                Some((_, lm_head)) => lm_head.forward(&x),
                None => x.linear(&self.lm_head, None::<Tensor>),
            }
        })
    }

    /// The projection weights laid out for [`Transformer::forward_cached_with`]: per layer q/k/v
    /// concatenated into one matrix and gate/up into another, all linear weights (and the output head) cast
    /// to the autocast dtype when mixed precision is on. A copy: valid until the parameters change (the
    /// rollout engine builds one per `generate` call); it takes the bytes of the attention and MLP weights.
    ///
    /// On the CPU in fp32 (with AVX-512) the copy is instead packed for the native decode step
    /// ([`crate::native`]), which runs on as many threads as libtorch's intra-op pool has; see
    /// [`Transformer::decode_weights_with`].
    pub fn decode_weights(&self) -> DecodeWeights {
        self.decode_weights_with(Some(tch::get_num_threads().max(1) as usize))
    }

    /// [`Transformer::decode_weights`], packed for the native decode step on `native` threads when that is
    /// asked for and this network and CPU support it ([`crate::native`]: CPU, fp32, no autocast, AVX-512);
    /// `None`: the libtorch copy.
    pub fn decode_weights_with(&self, native: Option<usize>) -> DecodeWeights {
        if self.adapters.is_some() {
            return self.merged_view().decode_weights_with(native);
        }
        match (native, crate::native::Isa::detected()) {
            (Some(threads), Some(isa)) => self.decode_weights_native(threads, isa),
            _ => self.fused_decode_weights(),
        }
    }

    /// Whether [`Transformer::decode_weights`] packs for the native step (this CPU's kernels, this network).
    pub fn decodes_natively(&self) -> bool {
        crate::native::Isa::detected().is_some_and(|isa| crate::native::supports(self.device(), self.kind(), self.autocast_kind(), isa))
    }

    /// [`Transformer::decode_weights`] packed for the native step's `isa` kernels on `threads` threads, where
    /// this network and CPU support them; else the libtorch copy. For tests and measurements of one set of
    /// kernels.
    pub fn decode_weights_native(&self, threads: usize, isa: crate::native::Isa) -> DecodeWeights {
        if self.adapters.is_some() {
            return self.merged_view().decode_weights_native(threads, isa);
        }
        if threads > 0 && crate::native::supports(self.device(), self.kind(), self.autocast_kind(), isa) {
            let _g = tch::no_grad_guard();
            return DecodeWeights { inner: DecodeInner::Native(Box::new(self.native_weights(threads, isa))) };
        }
        self.fused_decode_weights()
    }

    /// The libtorch copy of [`Transformer::decode_weights`].
    fn fused_decode_weights(&self) -> DecodeWeights {
        let _g = tch::no_grad_guard();
        let cast = |t: &Tensor| match self.autocast_kind() {
            Some(k) if t.kind() != k => t.detach().to_kind(k),
            _ => t.detach(),
        };
        let lin = |l: &Linear| Linear::copy(cast(&l.w), l.b.as_ref().map(cast));
        let cat = |parts: &[&Linear]| {
            let w = Tensor::cat(&parts.iter().map(|l| cast(&l.w)).collect::<Vec<_>>(), 0);
            let b = parts[0].b.is_some().then(|| Tensor::cat(&parts.iter().map(|l| cast(l.b.as_ref().expect("all or no biases"))).collect::<Vec<_>>(), 0));
            Linear::copy(w, b)
        };
        let layers = self
            .blocks
            .iter()
            .map(|blk| DecodeLayer {
                qkv: match &blk.attn.qkv {
                    Qkv::Split { q, k, v } => cat(&[q, k, v]),
                    Qkv::Fused(l) => lin(l),
                },
                o: lin(&blk.attn.o),
                gate_up: match &blk.mlp {
                    Mlp::Split { gate, up, .. } => cat(&[gate, up]),
                    Mlp::Fused { gate_up, .. } => lin(gate_up),
                },
                down: match &blk.mlp {
                    Mlp::Split { down, .. } | Mlp::Fused { down, .. } => lin(down),
                },
            })
            .collect();
        DecodeWeights { inner: DecodeInner::Torch { layers, lm_head: Linear::copy(cast(&self.lm_head), None) } }
    }

    fn native_weights(&self, threads: usize, isa: crate::native::Isa) -> crate::native::NativeWeights {
        fn split<'a>(ls: &[&'a Linear]) -> (Vec<&'a Tensor>, Option<Vec<&'a Tensor>>) {
            let b = ls[0].b.is_some().then(|| ls.iter().map(|l| l.b.as_ref().expect("all or no biases")).collect());
            (ls.iter().map(|l| &l.w).collect(), b)
        }
        let parts = self
            .blocks
            .iter()
            .map(|blk| {
                let (qkv, qkv_bias) = match &blk.attn.qkv {
                    Qkv::Split { q, k, v } => split(&[q, k, v]),
                    Qkv::Fused(l) => split(&[l]),
                };
                let ((gate_up, gate_up_bias), down) = match &blk.mlp {
                    Mlp::Split { gate, up, down } => (split(&[gate, up]), down),
                    Mlp::Fused { gate_up, down } => (split(&[gate_up]), down),
                };
                crate::native::LayerParts {
                    input_norm: &blk.input_norm.w,
                    post_norm: &blk.post_norm.w,
                    q_norm: blk.attn.q_norm.as_ref().map(|n| &n.w),
                    k_norm: blk.attn.k_norm.as_ref().map(|n| &n.w),
                    qkv,
                    qkv_bias,
                    o: (&blk.attn.o.w, blk.attn.o.b.as_ref()),
                    gate_up,
                    gate_up_bias,
                    down: (&down.w, down.b.as_ref()),
                }
            })
            .collect();
        crate::native::NativeWeights::new(&self.cfg, parts, &self.norm.w, &self.lm_head, &self.embed, &self.rope, threads, isa)
    }
}

/// Where a cached forward writes its keys and values: at a host position (all rows at `cache.len()`), or at
/// a slot given as a device tensor with attention over a fixed span ([`Transformer::decode_static`]).
#[derive(Clone, Copy)]
enum CacheWrite<'a> {
    At(i64),
    Slot(&'a Tensor, i64),
}

/// Which positions of a cached forward get logits.
#[derive(Clone, Copy)]
enum Head {
    All,
    Last,
    None,
}

/// Projection weights for decoding ([`Transformer::decode_weights`]).
pub struct DecodeWeights {
    inner: DecodeInner,
}

enum DecodeInner {
    /// libtorch operators on fused (and possibly MKL-packed) copies.
    Torch { layers: Vec<DecodeLayer>, lm_head: Linear },
    /// The native CPU step.
    Native(Box<crate::native::NativeWeights>),
}

struct DecodeLayer {
    qkv: Linear,
    o: Linear,
    gate_up: Linear,
    down: Linear,
}

impl DecodeWeights {
    /// Bytes the copy takes.
    pub fn bytes(&self) -> i64 {
        let t = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let l = |l: &Linear| t(&l.w) + l.b.as_ref().map_or(0, t);
        match &self.inner {
            DecodeInner::Torch { layers, lm_head } => layers.iter().map(|d| l(&d.qkv) + l(&d.o) + l(&d.gate_up) + l(&d.down)).sum::<i64>() + l(lm_head),
            DecodeInner::Native(n) => n.bytes(),
        }
    }

    /// Whether decode steps run natively ([`crate::native`]).
    pub fn is_native(&self) -> bool {
        matches!(self.inner, DecodeInner::Native(_))
    }

    /// Prepares the weights for decode steps of `rows` rows: on the CPU in fp32 each matrix is packed for
    /// MKL's GEMM at that row count ([`crate::mkl`]; about the bytes of the weights again, repacked when the
    /// count changes); elsewhere nothing. Steps with another row count still work, unpacked.
    pub fn prepare_rows(&mut self, rows: i64) {
        let _g = tch::no_grad_guard();
        // the native panels serve any row count
        if let DecodeInner::Torch { layers, lm_head } = &mut self.inner {
            for d in layers {
                for l in [&mut d.qkv, &mut d.o, &mut d.gate_up, &mut d.down] {
                    l.pack_for_rows(rows);
                }
            }
            lm_head.pack_for_rows(rows);
        }
    }
}

trait EmbeddingFwd {
    fn embedding_fwd(&self, ids: &Tensor) -> Tensor;
}

impl EmbeddingFwd for Tensor {
    fn embedding_fwd(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(self, ids, -1, false, false)
    }
}

/// Boolean attention mask `[B, 1, T, past + T]` (true = may attend), or `None` for plain causal attention
/// without a cache (then SDPA runs with `is_causal`, which lets fused kernels skip the mask).
fn build_mask(mask: &AttnMask, b: i64, t: i64, past: i64, window: Option<i64>, device: Device) -> Option<Tensor> {
    let total = past + t;
    let need_window = window.is_some_and(|w| total > w);
    if matches!(mask, AttnMask::Causal) && past == 0 && !need_window {
        return None;
    }
    let q_idx = Tensor::arange_start(past, total, (Kind::Int64, device)).view([t, 1]);
    let k_idx = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
    let mut allowed = k_idx.le_tensor(&q_idx); // [T, total]
    if let Some(w) = window.filter(|_| need_window) {
        allowed = allowed.logical_and(&(&q_idx - &k_idx).lt(w));
    }
    let mut allowed = allowed.view([1, 1, t, total]).expand([b, 1, t, total], false);
    match mask {
        AttnMask::Causal => {}
        AttnMask::Padding(keys) => {
            let keys = keys.to_device(device).ne(0).view([b, 1, 1, total]);
            allowed = allowed.logical_and(&keys);
        }
        AttnMask::Documents(docs) => {
            let d = docs.to_device(device);
            let same = d.view([b, 1, t, 1]).eq_tensor(&d.view([b, 1, 1, t]));
            allowed = allowed.logical_and(&same);
        }
        AttnMask::Branches(segs) => {
            let s = segs.to_device(device);
            let (sq, sk) = (s.view([b, 1, t, 1]), s.view([b, 1, 1, t]));
            let visible = sk.eq(0).logical_or(&sq.eq_tensor(&sk)).logical_and(&sk.ge(0));
            allowed = allowed.logical_and(&visible);
        }
    }
    // A query with nothing to attend to (a padding position) would give NaN through softmax; let it see
    // itself. Its output is never used.
    let diag = q_idx.eq_tensor(&k_idx).view([1, 1, t, total]);
    Some(allowed.logical_or(&diag))
}

impl Block {
    /// One decoder layer; `fused`: the layer's decode weights ([`Transformer::decode_weights`]) instead of
    /// its parameters' projections.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<(&mut Tensor, &mut Tensor, CacheWrite)>,
        fused: Option<&DecodeLayer>,
    ) -> Tensor {
        let h = self.attn.forward(&self.input_norm.forward(x), cos, sin, rope, mask, cache, fused);
        let x = x + h;
        let x2 = self.post_norm.forward(&x);
        let m = match fused {
            Some(d) => Mlp::swiglu(&d.gate_up, &d.down, &x2),
            None => self.mlp.forward(&x2),
        };
        x + m
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Split { gate, up, down } => down.forward(&(gate.forward(x).silu() * up.forward(x))),
            Mlp::Fused { gate_up, down } => Mlp::swiglu(gate_up, down, x),
        }
    }

    fn swiglu(gate_up: &Linear, down: &Linear, x: &Tensor) -> Tensor {
        let gu = gate_up.forward(x);
        let inter = gu.size().last().copied().unwrap_or(0) / 2;
        down.forward(&(gu.narrow(-1, 0, inter).silu() * gu.narrow(-1, inter, inter)))
    }
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        cache: Option<(&mut Tensor, &mut Tensor, CacheWrite)>,
        fused: Option<&DecodeLayer>,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let (nh, nkv, hd) = (self.n_head, self.n_kv, self.head_dim);
        // one [B, T, (heads + 2 KV heads) · head_dim] projection when the weights are fused
        let joint = match (fused, &self.qkv) {
            (Some(d), _) => Some(d.qkv.forward(x)),
            (None, Qkv::Fused(l)) => Some(l.forward(x)),
            (None, Qkv::Split { .. }) => None,
        };
        let (q, k, v) = match (&joint, &self.qkv) {
            (Some(qkv), _) => (qkv.narrow(-1, 0, nh * hd), qkv.narrow(-1, nh * hd, nkv * hd), qkv.narrow(-1, (nh + nkv) * hd, nkv * hd)),
            (None, Qkv::Split { q, k, v }) => (q.forward(x), k.forward(x), v.forward(x)),
            (None, Qkv::Fused(_)) => unreachable!("a fused projection is computed above"),
        };
        let o = fused.map_or(&self.o, |d| &d.o);
        let mut q = q.view([b, t, nh, hd]);
        let mut k = k.view([b, t, nkv, hd]);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q);
            k = kn.forward(&k);
        }
        let cache = match (t, cache) {
            (1, Some((kc, vc, write))) => {
                // One new token per row: the query heads that share a KV head become rows of one attention
                // over that head ([B, KV heads, group, head_dim] against [B, KV heads, keys, head_dim]), so
                // grouped-query attention needs no repeated copy of the cache; the mask [B, 1, 1, keys]
                // broadcasts over the group.
                let g = nh / nkv;
                let (q, k) = match (&joint, &self.q_norm) {
                    // q and k heads are adjacent in the fused projection: one rotation for both
                    (Some(qkv), None) => {
                        let qk = rope.apply(&qkv.view([b, nh + 2 * nkv, 1, hd]).narrow(1, 0, nh + nkv), cos, sin);
                        (qk.narrow(1, 0, nh).view([b, nkv, g, hd]), qk.narrow(1, nh, nkv))
                    }
                    _ => (rope.apply(&q.view([b, nkv, g, hd]), cos, sin), rope.apply(&k.view([b, nkv, 1, hd]), cos, sin)),
                };
                let v = v.view([b, nkv, 1, hd]);
                let keys = match write {
                    CacheWrite::At(past) => {
                        kc.narrow(2, past, 1).copy_(&k);
                        vc.narrow(2, past, 1).copy_(&v);
                        past + 1
                    }
                    CacheWrite::Slot(slot, span) => {
                        let _ = kc.index_copy_(2, slot, &k);
                        let _ = vc.index_copy_(2, slot, &v);
                        span
                    }
                };
                let (k, v) = (kc.narrow(2, 0, keys), vc.narrow(2, 0, keys));
                let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
                return o.forward(&y.reshape([b, 1, nh * hd]));
            }
            (_, c) => c,
        };
        let q = rope.apply(&q.transpose(1, 2), cos, sin);
        let k = rope.apply(&k.transpose(1, 2), cos, sin);
        let v = v.view([b, t, nkv, hd]).transpose(1, 2);
        let (k, v) = match cache {
            Some((_, _, CacheWrite::Slot(..))) => unreachable!("a static decode step feeds one token per row"),
            Some((kc, vc, CacheWrite::At(past))) => {
                kc.narrow(2, past, t).copy_(&k);
                vc.narrow(2, past, t).copy_(&v);
                (kc.narrow(2, 0, past + t), vc.narrow(2, 0, past + t))
            }
            None => (k, v),
        };
        let gqa = nh != nkv;
        let y = match mask {
            Some(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa),
            None => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, gqa),
        };
        o.forward(&y.transpose(1, 2).reshape([b, t, nh * hd]))
    }
}
