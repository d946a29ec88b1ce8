//! Parity with Hugging Face transformers on the committed fixtures (scripts/fixtures/make_model_fixtures.py):
//! logits of every family within 1e-4 in fp32, KV-cached decoding equal to the full forward, packed rows
//! equal to separate forwards, and save → reload bit-exact.

use model::{AttnMask, Batch, KvCache, Model};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, IndexOp, Kind, Tensor};

const FAMILIES: &[&str] = &["llama", "llama_tied", "qwen2", "qwen3", "phi3"];

fn setup() {
    model::runtime::preload_cuda();
    tch::set_num_threads(1);
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(name).join("reference.safetensors")).unwrap().into_iter().collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn cases(r: &HashMap<String, Tensor>) -> usize {
    (0..).take_while(|i| r.contains_key(&format!("case{i}.logits"))).count()
}

#[test]
fn logits_match_transformers_for_every_family() {
    setup();
    for fam in FAMILIES {
        let m = Model::load(&fixture(fam), None, Device::Cpu).unwrap();
        let r = reference(fam);
        let mut worst: f64 = 0.0;
        for i in 0..cases(&r) {
            let ids = &r[&format!("case{i}.input_ids")];
            let mask = &r[&format!("case{i}.attention_mask")];
            let pos = &r[&format!("case{i}.position_ids")];
            let want = &r[&format!("case{i}.logits")];
            let padded = mask.min().int64_value(&[]) == 0;
            let batch = Batch {
                input_ids: ids,
                position_ids: Some(pos),
                mask: if padded { AttnMask::Padding(mask) } else { AttnMask::Causal },
                rope_long: None,
            };
            let got = tch::no_grad(|| m.net.forward(&batch));
            assert_eq!(got.size(), want.size());
            // Compare real tokens only (padding positions carry no meaning).
            let valid = mask.ne(0).unsqueeze(-1);
            let d = (got - want).abs().masked_fill(&valid.logical_not(), 0.0).max().double_value(&[]);
            worst = worst.max(d);
        }
        println!("parity {fam}: max |logits - transformers| = {worst:.3e} over {} cases", cases(&r));
        assert!(worst <= 1e-4, "{fam}: max abs diff {worst} > 1e-4");
    }
}

/// Logits of a padded batch through the KV cache: `prefill` positions at once, then one at a time.
fn decode_incrementally(m: &Model, ids: &Tensor, pos: &Tensor, mask: &Tensor, prefill: i64, fused: Option<&model::DecodeWeights>) -> Tensor {
    let (b, t) = ids.size2().unwrap();
    let mut cache = KvCache::new(&m.net.cfg, b, t, Kind::Float, Device::Cpu);
    let logits = tch::no_grad(|| {
        let mut out = vec![m.net.forward_cached_with(&ids.narrow(1, 0, prefill), &pos.narrow(1, 0, prefill), &mask.narrow(1, 0, prefill), &mut cache, fused)];
        for s in prefill..t {
            out.push(m.net.forward_cached_with(&ids.narrow(1, s, 1), &pos.narrow(1, s, 1), &mask.narrow(1, 0, s + 1), &mut cache, fused));
        }
        Tensor::cat(&out, 1)
    });
    assert_eq!(cache.len(), t);
    logits
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    setup();
    for fam in FAMILIES {
        let m = Model::load(&fixture(fam), None, Device::Cpu).unwrap();
        let r = reference(fam);
        // the left-padded batch: prefill 8 positions, then one token at a time
        let ids = &r["case1.input_ids"];
        let mask = &r["case1.attention_mask"];
        let pos = &r["case1.position_ids"];
        let t = ids.size()[1];
        // LongRoPE (phi3): a cache keeps one factor set, chosen from its capacity; the full forward is told
        // the same choice (which here is also transformers' choice for the whole row).
        let long = m.net.rope_long_for_len(t);
        let full = tch::no_grad(|| {
            m.net.forward(&Batch { rope_long: Some(long), ..Batch::padded(ids, pos, mask) })
        });
        let prefill = 8;
        let valid = mask.ne(0).unsqueeze(-1);
        // decoding on the parameters, then on the fused copy the rollout engine uses (q/k/v and gate/up
        // concatenated: `decode_weights`)
        let weights = m.net.decode_weights_with(None);
        assert!(!weights.is_native());
        // and on the native CPU step (model::native): this CPU's kernels on one thread and on three, and every
        // other set of kernels it can run (AVX2, the portable loops) on two
        let native = m.net.decode_weights_with(Some(1));
        let native3 = m.net.decode_weights_with(Some(3));
        assert_eq!(native.is_native(), model::native::available());
        use model::native::Isa;
        let others: Vec<_> = [Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()).map(|i| m.net.decode_weights_native(2, i)).collect();
        assert!(others.iter().all(|w| w.is_native()));
        // a prefill that asks for the last position's logits only (in two chunks) gives those of the full forward
        let mut cache = KvCache::new(&m.net.cfg, ids.size()[0], t, Kind::Float, Device::Cpu);
        let (first, last) = tch::no_grad(|| {
            let first = m.net.prefill_cached(&ids.narrow(1, 0, 3), &pos.narrow(1, 0, 3), &mask.narrow(1, 0, 3), &mut cache, false);
            (first, m.net.prefill_cached(&ids.narrow(1, 3, 5), &pos.narrow(1, 3, 5), &mask.narrow(1, 0, 8), &mut cache, true))
        });
        assert!(first.is_none());
        assert_eq!(cache.len(), 8);
        let d = (last.unwrap() - full.select(1, 7)).abs().max().double_value(&[]);
        assert!(d <= 1e-5, "{fam} prefill: {d}");
        for fused in [None, Some(&weights), Some(&native), Some(&native3)].into_iter().chain(others.iter().map(Some)) {
            let inc = decode_incrementally(&m, ids, pos, mask, prefill, fused);
            let d = (&inc - &full).abs().masked_fill(&valid.logical_not(), 0.0).max().double_value(&[]);
            let how = fused.map_or("parameters", |w| if w.is_native() { "native" } else { "fused" });
            println!("kv-cache {fam} ({how}): max |incremental - full| = {d:.3e}");
            assert!(d <= 1e-5, "{fam}: {d}");
        }
    }
}

#[test]
fn fused_decode_weights_follow_autocast_and_match_it() {
    setup();
    for fam in ["qwen2", "qwen3", "phi3"] {
        let m = Model::load(&fixture(fam), None, Device::Cpu).unwrap();
        let r = reference(fam);
        let ids = &r["case1.input_ids"];
        let mask = &r["case1.attention_mask"];
        let pos = &r["case1.position_ids"];
        m.net.set_autocast(Some(Kind::BFloat16));
        let weights = m.net.decode_weights();
        // one bf16 matrix per layer for q/k/v (and gate/up): fp32 parameters cast once, not at every step
        let n = m.net.cfg.num_hidden_layers as i64;
        assert!(weights.bytes() < m.net.params.iter().map(|(_, p)| p.numel() as i64 * 4).sum::<i64>() * 6 / 10, "{fam}: weights not bf16");
        let run = |fused: Option<&model::DecodeWeights>| decode_incrementally(&m, ids, pos, mask, 8, fused).to_kind(Kind::Float);
        let (plain, fused) = (run(None), run(Some(&weights)));
        m.net.set_autocast(None);
        let valid = mask.ne(0).unsqueeze(-1);
        let d = (&plain - &fused).abs().masked_fill(&valid.logical_not(), 0.0).max().double_value(&[]);
        let scale = plain.abs().max().double_value(&[]);
        println!("autocast bf16 {fam} ({n} layers): max |fused - plain| = {d:.3e} (logits up to {scale:.2})");
        assert!(d <= 0.02 * scale.max(1.0), "{fam}: {d}");
    }
}

#[test]
fn packed_rows_equal_separate_documents() {
    setup();
    for fam in FAMILIES {
        let m = Model::load(&fixture(fam), None, Device::Cpu).unwrap();
        let r = reference(fam);
        let a = r["case2.input_ids"].i((0..1, 0..11));
        let b = r["case2.input_ids"].i((1..2, 0..17));
        let packed = Tensor::cat(&[&a, &b], 1);
        let pos = Tensor::cat(&[Tensor::arange(11, (Kind::Int64, Device::Cpu)), Tensor::arange(17, (Kind::Int64, Device::Cpu))], 0).unsqueeze(0);
        let docs = Tensor::cat(&[Tensor::zeros([11], (Kind::Int64, Device::Cpu)), Tensor::ones([17], (Kind::Int64, Device::Cpu))], 0).unsqueeze(0);
        let (got, la, lb) = tch::no_grad(|| {
            // one LongRoPE factor set for all three (phi3), so that only the attention pattern differs
            let got = m.net.forward(&Batch { rope_long: Some(false), ..Batch::packed(&packed, &pos, &docs) });
            let la = m.net.forward(&Batch { rope_long: Some(false), ..Batch::causal(&a) });
            let lb = m.net.forward(&Batch { rope_long: Some(false), ..Batch::causal(&b) });
            (got, la, lb)
        });
        let d = max_abs(&got, &Tensor::cat(&[la, lb], 1));
        assert!(d <= 1e-5, "{fam}: packed vs separate {d}");
    }
}

#[test]
fn save_then_reload_is_bit_exact() {
    setup();
    let tmp = tempfile::tempdir().unwrap();
    for fam in FAMILIES {
        let m = Model::load(&fixture(fam), None, Device::Cpu).unwrap();
        let out = tmp.path().join(fam);
        m.save(&out, &Default::default()).unwrap();
        for f in ["config.json", "model.safetensors", "generation_config.json"] {
            assert!(out.join(f).exists(), "{fam}: {f} missing");
        }
        let m2 = Model::load(&out, None, Device::Cpu).unwrap();
        assert_eq!(m.net.params.names(), m2.net.params.names());
        for ((n, a), (_, b)) in m.net.params.iter().zip(m2.net.params.iter()) {
            assert!(a.equal(b), "{fam}: {n} differs after reload");
        }
        // sharded save: tiny shards force an index
        let sharded = tmp.path().join(format!("{fam}-sharded"));
        m.save(&sharded, &model::weights::SaveOptions { max_shard_bytes: 100_000, ..Default::default() }).unwrap();
        assert!(sharded.join("model.safetensors.index.json").exists());
        let m3 = Model::load(&sharded, None, Device::Cpu).unwrap();
        for ((n, a), (_, b)) in m.net.params.iter().zip(m3.net.params.iter()) {
            assert!(a.equal(b), "{fam}: {n} differs after sharded reload");
        }
    }
}

#[test]
fn bf16_forward_is_close_to_fp32() {
    setup();
    let m32 = Model::load(&fixture("qwen2"), None, Device::Cpu).unwrap();
    let m16 = Model::load(&fixture("qwen2"), Some(Kind::BFloat16), Device::Cpu).unwrap();
    let r = reference("qwen2");
    let ids = &r["case0.input_ids"];
    let (a, b) = tch::no_grad(|| {
        let batch = Batch::causal(ids);
        (m32.net.forward(&batch), m16.net.forward(&batch).to_kind(Kind::Float))
    });
    let scale = a.abs().max().double_value(&[]);
    let d = max_abs(&a, &b);
    assert!(d / scale < 0.1, "bf16 relative error {}", d / scale);
    assert_eq!(m16.net.params.kind, Kind::BFloat16);
}
