//! LoRA against PEFT (scripts/fixtures/make_lora_fixtures.py): whet loads adapters peft saved and computes
//! peft's logits; an adapter whet saves has PEFT's names and reloads bit-exactly (and, with WHET_LORA_OUT=DIR,
//! is written for `make_lora_fixtures.py --check DIR`, where peft loads it); only adapter parameters take
//! gradients; the base view is the base; merged weights and the decode path compute what the adapter does.

use model::lora::{LoraConfig, Targets};
use model::{AttnMask, Batch, KvCache, Model};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// (adapter fixture, base fixture)
const CASES: &[(&str, &str)] = &[("lora_llama", "llama"), ("lora_llama_tied_rslora", "llama_tied"), ("lora_phi3", "phi3")];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tensors(path: PathBuf) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn cases(r: &HashMap<String, Tensor>) -> usize {
    (0..).take_while(|i| r.contains_key(&format!("case{i}.input_ids"))).count()
}

/// The logits of every input case of `base`'s reference file.
fn logits(m: &Model, base: &str) -> Vec<Tensor> {
    let r = tensors(fixture(base).join("reference.safetensors"));
    (0..cases(&r))
        .map(|i| {
            let mask = &r[&format!("case{i}.attention_mask")];
            let padded = mask.min().int64_value(&[]) == 0;
            let batch = Batch {
                input_ids: &r[&format!("case{i}.input_ids")],
                position_ids: Some(&r[&format!("case{i}.position_ids")]),
                mask: if padded { AttnMask::Padding(mask) } else { AttnMask::Causal },
                rope_long: None,
            };
            let l = tch::no_grad(|| m.net.forward(&batch));
            l.masked_fill(&mask.eq(0).unsqueeze(-1), 0.0)
        })
        .collect()
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn with_adapter(adapter: &str, base: &str) -> Model {
    let mut m = Model::load(&fixture(base), None, Device::Cpu).unwrap();
    m.load_adapter(&fixture(adapter)).unwrap();
    m
}

#[test]
fn peft_adapters_load_and_give_peft_logits() {
    tch::set_num_threads(1);
    for (adapter, base) in CASES {
        let m = with_adapter(adapter, base);
        let r = tensors(fixture(adapter).join("reference.safetensors"));
        let want: Vec<Tensor> = logits(&m, base).iter().enumerate().map(|(i, l)| {
            let mask = tensors(fixture(base).join("reference.safetensors")).remove(&format!("case{i}.attention_mask")).unwrap();
            r[&format!("case{i}.logits")].masked_fill(&mask.eq(0).unsqueeze(-1), 0.0).to_kind(l.kind())
        }).collect();
        let got = logits(&m, base);
        let plain = logits(&Model::load(&fixture(base), None, Device::Cpu).unwrap(), base);
        let (d, effect) = (max_diff(&got, &want), max_diff(&plain, &want));
        println!("{adapter}: max |whet − peft| = {d:.3e} (the adapter moves the logits by up to {effect:.3e})");
        assert!(effect > 1e-2, "{adapter}: the fixture's adapter barely changes the logits ({effect})");
        assert!(d <= 1e-5, "{adapter}: max |whet − peft| = {d} > 1e-5");
    }
}

#[test]
fn saved_adapters_have_peft_names_and_reload_bit_exactly() {
    tch::set_num_threads(1);
    let out = std::env::var_os("WHET_LORA_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    for (i, (_, base)) in CASES.iter().enumerate() {
        let mut m = Model::load(&fixture(base), None, Device::Cpu).unwrap();
        let targets = if *base == "phi3" { vec!["qkv_proj", "gate_up_proj"] } else { vec!["q_proj", "k_proj", "down_proj"] };
        let cfg = LoraConfig {
            r: 2 + i as i64,
            lora_alpha: 5.0,
            lora_dropout: 0.0,
            target_modules: Targets::Names(targets.iter().map(|s| s.to_string()).collect()),
            use_rslora: i == 1,
            init_lora_weights: false,
        };
        tch::manual_seed(10 + i as i64);
        m.net.add_lora(&cfg).unwrap();
        let dir = out.as_ref().map_or_else(|| tmp.path().join(base), |o| o.join(format!("whet_{base}")));
        m.save_adapter(&dir, Some(base), None).unwrap();
        let names: Vec<String> = tensors(dir.join("adapter_model.safetensors")).into_keys().collect();
        assert!(names.contains(&"base_model.model.model.layers.0.mlp.gate_up_proj.lora_A.weight".to_string()) || *base != "phi3", "{names:?}");
        assert!(names.contains(&"base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight".to_string()) || *base == "phi3", "{names:?}");
        let mut back = Model::load(&fixture(base), None, Device::Cpu).unwrap();
        back.load_adapter(&dir).unwrap();
        let (a, b) = (logits(&m, base), logits(&back, base));
        assert_eq!(max_diff(&a, &b), 0.0, "{base}: reloaded adapter differs");
        if out.is_some() {
            let named: Vec<(String, Tensor)> = a.into_iter().enumerate().map(|(j, t)| (format!("case{j}.logits"), t)).collect();
            Tensor::write_safetensors(&named.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>(), dir.join("whet_logits.safetensors")).unwrap();
            std::fs::write(dir.join("base.txt"), fixture(base).canonicalize().unwrap().to_string_lossy().as_bytes()).unwrap();
        }
    }
}

#[test]
fn only_the_adapter_takes_gradients_and_the_base_view_is_the_base() {
    tch::set_num_threads(1);
    let plain = Model::load(&fixture("llama"), None, Device::Cpu).unwrap();
    let mut m = Model::load(&fixture("llama"), None, Device::Cpu).unwrap();
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.0, target_modules: Targets::AllLinear, use_rslora: false, init_lora_weights: true };
    tch::manual_seed(0);
    assert_eq!(m.net.add_lora(&cfg).unwrap(), 2 * 7);
    // the size computed from the config alone is the built adapter's
    assert_eq!(model::lora::adapter_size(&cfg, &m.net.cfg), (14, m.net.trainable().numel()));
    // a fresh adapter (B = 0) is the identity
    assert_eq!(max_diff(&logits(&m, "llama"), &logits(&plain, "llama")), 0.0);
    let mut ps: Vec<Tensor> = m.net.trainable().tensors().iter().map(|t| t.shallow_clone()).collect();
    for p in &mut ps {
        let _ = p.requires_grad_(true);
    }
    let ids = Tensor::from_slice(&[5i64, 9, 17, 33, 60, 2]).view([1, 6]);
    let loss = m.net.forward(&Batch::causal(&ids)).log_softmax(-1, Kind::Float).select(2, 7).sum(Kind::Float);
    loss.backward();
    for (n, t) in m.net.params.iter() {
        assert!(!t.grad().defined(), "base parameter {n} got a gradient");
    }
    for (n, t) in m.net.trainable().iter() {
        assert!(t.grad().defined(), "{n} got no gradient");
        // with B = 0, A's gradient is zero and B's is not
        let g = t.grad().abs().sum(Kind::Float).double_value(&[]);
        assert_eq!(g > 0.0, n.contains("lora_B"), "{n}: |grad| = {g}");
    }
    // the base view shares the base's tensors and computes the base
    let view = m.net.base_view();
    for ((_, a), (_, b)) in view.params.iter().zip(m.net.params.iter()) {
        assert_eq!(a.data_ptr(), b.data_ptr());
    }
    let view = Model { net: view, source_dir: None };
    tch::no_grad(|| {
        for t in m.net.trainable().tensors() {
            let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.1));
        }
    });
    assert!(max_diff(&logits(&m, "llama"), &logits(&plain, "llama")) > 1e-3);
    assert_eq!(max_diff(&logits(&view, "llama"), &logits(&plain, "llama")), 0.0);
}

#[test]
fn merged_weights_and_decoding_compute_the_adapter() {
    tch::set_num_threads(1);
    for (adapter, base) in CASES {
        let m = with_adapter(adapter, base);
        let want = logits(&m, base);
        // decoding on the merged decode weights (native step or fused copies) equals the full forward
        let ids = Tensor::from_slice(&[5i64, 9, 17, 33, 60, 2, 8, 99]).view([1, 8]);
        let full = tch::no_grad(|| m.net.forward(&Batch::causal(&ids)));
        for native in [None, Some(1)] {
            let w = m.net.decode_weights_with(native);
            let mut cache = KvCache::new(&m.net.cfg, 1, 8, Kind::Float, Device::Cpu);
            let key_mask = Tensor::ones([1, 8], (Kind::Int64, Device::Cpu));
            let mut steps = vec![];
            for t in 0..8 {
                let pos = Tensor::from_slice(&[t]).view([1, 1]);
                let l = tch::no_grad(|| m.net.forward_cached_with(&ids.narrow(1, t, 1), &pos, &key_mask.narrow(1, 0, t + 1), &mut cache, Some(&w)));
                steps.push(l);
            }
            let d = (Tensor::cat(&steps, 1) - &full).abs().max().double_value(&[]);
            assert!(d < 1e-4, "{adapter}: decoding with merged weights (native {native:?}) differs by {d}");
        }
        // merging into the base weights
        let mut merged = with_adapter(adapter, base);
        merged.net.merge_adapters();
        assert!(merged.net.adapters().is_none());
        let d = max_diff(&logits(&merged, base), &want);
        assert!(d < 5e-5, "{adapter}: merged model differs by {d} (one more rounding per weight)");
    }
}

/// Adapter dropout: the masks come from (step seed, forward, layer), so activation checkpointing's recompute
/// redraws the forward's own masks (the same gradients as without checkpointing), a new step draws others, and
/// forwards outside training (no seed) drop nothing.
#[test]
fn adapter_dropout_is_redrawn_identically_by_the_checkpointed_recompute() {
    tch::set_num_threads(1);
    let mut m = Model::load(&fixture("llama"), None, Device::Cpu).unwrap();
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.3, target_modules: Targets::AllLinear, use_rslora: false, init_lora_weights: false };
    tch::manual_seed(1);
    m.net.add_lora(&cfg).unwrap();
    for t in m.net.trainable().tensors() {
        let _ = t.shallow_clone().requires_grad_(true);
    }
    let ids = Tensor::from_slice(&[5i64, 9, 17, 33, 60, 2, 8, 99]).view([1, 8]);
    // the adapters' gradients of one training forward + backward with step seed `seed`
    let grads = |seed: Option<u64>, checkpointed: bool| -> Vec<Tensor> {
        m.net.set_dropout_seed(seed);
        for t in m.net.trainable().tensors() {
            t.shallow_clone().zero_grad();
        }
        let head = |h: &Tensor| h.linear(m.net.lm_head_weight(), None::<Tensor>).log_softmax(-1, Kind::Float).select(2, 7).sum(Kind::Float);
        if checkpointed {
            let (h, ck) = m.net.hidden_states_checkpointed(&Batch::causal(&ids));
            head(&h).backward();
            m.net.backward_checkpointed(ck, &h.grad());
        } else {
            head(&m.net.training_hidden_states(&Batch::causal(&ids))).backward();
        }
        m.net.trainable().tensors().iter().map(|t| t.grad().copy()).collect()
    };
    let diff = |a: &[Tensor], b: &[Tensor]| a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max);
    let plain = grads(Some(7), false);
    let recomputed = grads(Some(7), true);
    assert!(diff(&plain, &recomputed) < 1e-6, "checkpointed recompute drew other masks: {}", diff(&plain, &recomputed));
    let other_step = grads(Some(8), false);
    let none = grads(None, false);
    assert!(diff(&plain, &other_step) > 1e-4 && diff(&plain, &none) > 1e-4);
    // no seed: the training forward is the plain forward
    let none_ck = grads(None, true);
    assert!(diff(&none, &none_ck) < 1e-6);
}
