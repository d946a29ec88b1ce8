//! Interop of short configs (issue 16): a config.json that leaves keys to their defaults means here what it means
//! in transformers, and the config.json whet saves states every key the forward reads, so transformers, vLLM and
//! whet compute the same model from it. Fixtures: scripts/fixtures/make_config_fixtures.py (transformers 5.24).
//!
//! With `WHET_INTEROP_OUT=DIR`, the whet-saved checkpoints and whet's logits are left in DIR for the live check
//! `make_config_fixtures.py --check DIR`, which loads them in transformers unchanged.

use model::config::{ModelConfig, RopeScaling};
use model::weights::{SaveOptions, TokenIds};
use model::{AttnMask, Batch, Model};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn minimal_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minimal")
}

fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(minimal_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| minimal_dir().join(n).join("reference.safetensors").exists())
        .collect();
    v.sort();
    v
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap().into_iter().collect()
}

/// Logits of every reference case, and the largest difference from `want` over real tokens.
fn logits(m: &Model, r: &HashMap<String, Tensor>) -> (Vec<(String, Tensor)>, f64) {
    let mut out = vec![];
    let mut worst: f64 = 0.0;
    for i in 0.. {
        let Some(ids) = r.get(&format!("case{i}.input_ids")) else { break };
        let mask = &r[&format!("case{i}.attention_mask")];
        let pos = &r[&format!("case{i}.position_ids")];
        let padded = mask.min().int64_value(&[]) == 0;
        let batch = Batch { input_ids: ids, position_ids: Some(pos), mask: if padded { AttnMask::Padding(mask) } else { AttnMask::Causal }, rope_long: None };
        let got = tch::no_grad(|| m.net.forward(&batch));
        let valid = mask.ne(0).unsqueeze(-1);
        let d = (&got - &r[&format!("case{i}.logits")]).abs().masked_fill(&valid.logical_not(), 0.0).max().double_value(&[]);
        worst = worst.max(d);
        for k in ["input_ids", "attention_mask", "position_ids"] {
            out.push((format!("case{i}.{k}"), r[&format!("case{i}.{k}")].shallow_clone()));
        }
        out.push((format!("case{i}.logits"), got));
    }
    (out, worst)
}

/// What the forward computes from a config: every field but the raw JSON.
fn meaning(c: &ModelConfig) -> String {
    let rope = match &c.rope_scaling {
        RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, attention_factor } => {
            format!("longrope {short_factor:?} {long_factor:?} {original_max_position_embeddings} {attention_factor:.15}")
        }
        other => format!("{other:?}"),
    };
    format!(
        "{:?} vocab {} hidden {} inter {} layers {} heads {}/{} head_dim {} eps {:e} theta {} rotary {} rope {rope} max_pos {} tied {} bias {}/{}/{} qk_norm {} window {:?}",
        c.family, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.head_dim, c.rms_norm_eps, c.rope_theta, c.rotary_dim, c.max_position_embeddings, c.tie_word_embeddings, c.qkv_bias, c.o_bias,
        c.mlp_bias, c.qk_norm, c.sliding_window
    )
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn short_configs_mean_what_they_mean_in_transformers() {
    model::runtime::preload_cuda();
    tch::set_num_threads(1);
    let names = cases();
    assert!(names.len() >= 7, "fixtures missing: {names:?}");
    let keep = std::env::var_os("WHET_INTEROP_OUT").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let out_root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    for name in &names {
        let dir = minimal_dir().join(name);
        let r = reference(&dir);
        // 1. whet reads the short config as transformers does: same logits from transformers' weights.
        let m = Model::load(&dir, None, Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (_, worst) = logits(&m, &r);
        println!("{name}: max |logits - transformers| = {worst:.2e} (short config.json)");
        assert!(worst <= 1e-5, "{name}: whet's defaults differ from transformers' ({worst:.2e})");

        // 2. The saved config.json states every key the forward reads, with transformers' resolved values.
        let out = out_root.join(name);
        m.save(&out, &SaveOptions::default()).unwrap();
        let saved = read_json(&out.join("config.json"));
        let family_keys: &[&str] = match saved["model_type"].as_str().unwrap() {
            "llama" => &["attention_bias", "mlp_bias"],
            "mistral" => &["sliding_window"],
            "qwen2" => &["use_sliding_window"],
            "qwen3" => &["attention_bias", "use_sliding_window"],
            "phi3" => &["original_max_position_embeddings"],
            other => panic!("{other}"),
        };
        let common = [
            "architectures", "hidden_act", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        ];
        for k in common.iter().chain(family_keys) {
            assert!(saved.get(*k).is_some(), "{name}: saved config.json lacks `{k}`: {saved}");
        }
        let theta_nested = saved.get("rope_scaling").and_then(|p| p.get("rope_theta")).is_some();
        assert!(saved.get("rope_theta").is_some() || theta_nested, "{name}: no rope_theta");
        let resolved = ModelConfig::from_json(read_json(&dir.join("resolved.json")), "resolved.json").unwrap();
        let ours = ModelConfig::from_json(saved.clone(), "saved").unwrap();
        assert_eq!(meaning(&ours), meaning(&resolved), "{name}: saved config means something else than transformers' resolution");
        // ids transformers would refuse (a padding id past the vocabulary) are written as null
        for k in ["pad_token_id", "eos_token_id", "bos_token_id"] {
            if let Some(id) = saved[k].as_i64() {
                assert!(id < ours.vocab_size, "{name}: {k} = {id} past the vocabulary");
            }
        }

        // 3. Reloading the saved checkpoint gives the same logits, bit for bit.
        let m2 = Model::load(&out, None, Device::Cpu).unwrap();
        let (ours_logits, worst2) = logits(&m2, &r);
        assert_eq!(worst2, worst, "{name}: the saved checkpoint computes something else");
        if keep.is_some() {
            let refs: Vec<(&str, &Tensor)> = ours_logits.iter().map(|(k, t)| (k.as_str(), t)).collect();
            Tensor::write_safetensors(&refs, out.join("whet_logits.safetensors")).unwrap();
        }
    }
    if let Some(k) = keep {
        println!("whet-saved checkpoints in {}: check them with scripts/fixtures/make_config_fixtures.py --check {}", k.display(), k.display());
    }
}

fn tiny(extra: Value) -> Model {
    let mut j = json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
                       "num_hidden_layers": 1, "num_attention_heads": 2});
    for (k, v) in extra.as_object().unwrap() {
        j[k] = v.clone();
    }
    Model::random(&ModelConfig::from_json(j, "test").unwrap(), Kind::Float, Device::Cpu, 0)
}

#[test]
fn generation_config_merges_the_models_file_and_never_loses_keys() {
    model::runtime::preload_cuda();
    let tmp = tempfile::tempdir().unwrap();
    let write = |dir: &str, v: Value| {
        let d = tmp.path().join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("generation_config.json"), v.to_string()).unwrap();
        d
    };
    // The model's own file (extra EOS ids, sampling defaults) and a tokenizer folder with a file of its own.
    let model_dir = write("model", json!({"bos_token_id": 1, "eos_token_id": [2, 5], "temperature": 0.6, "top_p": 0.95, "do_sample": true}));
    let tok_dir = write("tok", json!({"eos_token_id": 3, "pad_token_id": 0, "max_new_tokens": 64}));
    let m = tiny(json!({"eos_token_id": 2}));
    let out = tmp.path().join("out");
    let ids = TokenIds { bos: Some(1), eos: vec![3], pad: Some(0) };
    m.save(&out, &SaveOptions { model_dir: Some(&model_dir), source_dir: Some(&tok_dir), token_ids: ids.clone(), ..Default::default() }).unwrap();
    let g = read_json(&out.join("generation_config.json"));
    assert_eq!(g, json!({"bos_token_id": 1, "eos_token_id": [2, 5], "temperature": 0.6, "top_p": 0.95, "do_sample": true,
                         "pad_token_id": 0, "max_new_tokens": 64}), "{g}");

    // No file anywhere and no eos in config.json: the tokenizer's stop ids, never `{}` (generate() would not stop).
    let m = tiny(json!({"eos_token_id": null, "bos_token_id": null}));
    let out = tmp.path().join("out2");
    m.save(&out, &SaveOptions { token_ids: TokenIds { bos: None, eos: vec![7, 9], pad: Some(7) }, ..Default::default() }).unwrap();
    let g = read_json(&out.join("generation_config.json"));
    assert_eq!(g, json!({"eos_token_id": [7, 9], "pad_token_id": 7}), "{g}");

    // config.json's explicit ids win over the tokenizer's when no generation_config.json names them.
    let m = tiny(json!({"eos_token_id": 4, "bos_token_id": 1}));
    let out = tmp.path().join("out3");
    m.save(&out, &SaveOptions { token_ids: ids, ..Default::default() }).unwrap();
    let g = read_json(&out.join("generation_config.json"));
    assert_eq!(g["eos_token_id"], json!(4));
    assert_eq!(g["bos_token_id"], json!(1));

    // A model saved from a loaded directory keeps that directory's file without being told.
    let again = tmp.path().join("again");
    let loaded = Model::load(&out3_with_file(&tmp, &out), None, Device::Cpu).unwrap();
    loaded.save(&again, &SaveOptions::default()).unwrap();
    assert_eq!(read_json(&again.join("generation_config.json"))["temperature"], json!(0.3));
}

/// `dir`'s checkpoint with a generation_config.json that has a sampling default.
fn out3_with_file(tmp: &tempfile::TempDir, dir: &Path) -> PathBuf {
    let d = tmp.path().join("with-file");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), d.join(f)).unwrap();
    }
    std::fs::write(d.join("generation_config.json"), json!({"eos_token_id": 4, "temperature": 0.3}).to_string()).unwrap();
    d
}
