//! LoRA end to end (issue 18): `[model] lora` trains an adapter in every stage kind with the base frozen,
//! checkpoints and outputs are PEFT adapter directories, the reference model is the base with the adapter
//! off, a SIGKILLed run resumes bit-identically, `[model] adapter` continues an adapter, and `train
//! merge-lora` writes a whole model computing what base + adapter compute.

mod common;

use common::{metrics, setup, train};
use model::{Batch, Model};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Tensor};

const MODEL: &str = r#"
[model]
config = { model_type = "llama", vocab_size = 260, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 128, tie_word_embeddings = true }
init_seed = 3
tokenizer = "builtin:bytes"
device = "cpu"
lora = { r = 4, lora_alpha = 8, target_modules = "all-linear" }
"#;

const GRPO: &str = r#"
[run]
seed = 5
threads = 1
log_every = 1
save_every = 2
keep_last = 5

[[stage]]
kind = "grpo"
name = "rl"
synthetic = { count = 40, arithmetic = { seed = 2, max_digits = 1 } }
max_steps = 4
prompts_per_step = 3
num_generations = 4
max_completion_length = 6
temperature = 1.2
num_iterations = 2
micro_batch_size = 5
lr = 2e-2
kl_coef = 0.05
kl_estimator = "k3"
entropy_coeff = 0.01
reward = [{ kind = "accuracy", correct = 1.0, incorrect = 0.0, no_answer = 0.0 }, { kind = "overlong", overlong_buffer_len = 2, overlong_penalty_factor = 0.5 }]
"#;

/// SFT, then DPO continuing the same adapter.
const SFT_DPO: &str = r#"
[run]
seed = 3
threads = 1
log_every = 1

[[stage]]
kind = "sft"
name = "sft"
synthetic = { count = 24, arithmetic = { seed = 5, max_digits = 1, ops = ["add"] } }
tokenize = { max_length = 64 }
max_steps = 4
batch_size = 4
lr = 2e-2

[[stage]]
kind = "dpo"
name = "dpo"
synthetic = { count = 16, arithmetic = { seed = 5, max_digits = 1, ops = ["add"] } }
tokenize = { max_length = 64 }
max_steps = 3
batch_size = 4
lr = 1e-2
beta = 0.1
"#;

fn ok(o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "train failed:\n{err}");
    err
}

fn final_dir(d: &Path, stage: usize) -> PathBuf {
    d.join(format!("out/checkpoints/s{stage:02}-final/model"))
}

fn tensor_names(file: &Path) -> Vec<String> {
    Tensor::read_safetensors(file).unwrap().into_iter().map(|(n, _)| n).collect()
}

/// The logits of a fixed token row.
fn logits(m: &Model) -> Tensor {
    let ids = Tensor::from_slice(&[5i64, 40, 51, 43, 52, 61, 10, 200, 7]).view([1, 9]);
    tch::no_grad(|| m.net.forward(&Batch::causal(&ids)))
}

#[test]
fn lora_grpo_saves_peft_adapters_keeps_the_base_as_reference_and_resumes_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let recipe = format!("{MODEL}{GRPO}");
    let reference = setup(root.path(), "reference", &recipe);
    let log = ok(&train(&reference, None));
    let out = final_dir(&reference, 0);
    // PEFT's layout: the adapter and its config, no full model
    assert!(!out.join("model.safetensors").exists() && !out.join("config.json").exists(), "{log}");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_i64(), cfg["target_modules"].as_str()), (Some("LORA"), Some(4), Some("all-linear")));
    let names = tensor_names(&out.join("adapter_model.safetensors"));
    assert_eq!(names.len(), 2 * 7 * 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("base_model.model.model.layers.") && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))), "{names:?}");
    assert!(out.join("tokenizer.json").exists());
    // the KL is to the base with the adapter off: zero before the first update, positive once it moved
    let steps: Vec<Value> = metrics(&reference).into_iter().filter(|m| m.get("kl").is_some()).collect();
    assert_eq!(steps.len(), 4);
    assert!(steps.last().unwrap()["kl"].as_f64().unwrap() > 0.0, "{steps:?}");
    // the trained adapter changes the model
    let base = Model::random(&model::ModelConfig::from_json(serde_json::json!({"model_type": "llama", "vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": true}), "test").unwrap(), tch::Kind::Float, Device::Cpu, 3);
    let mut adapted = Model::random(&base.net.cfg, tch::Kind::Float, Device::Cpu, 3);
    adapted.load_adapter(&out).unwrap();
    let moved = (logits(&adapted) - logits(&base)).abs().max().double_value(&[]);
    assert!(moved > 1e-4, "the trained adapter left the logits as they were ({moved})");
    // SIGKILL after step 3 (a checkpoint at step 2), then resume: the same adapter, bit for bit — also with
    // adapter dropout under activation checkpointing (the masks are keyed by seed, step and rank)
    let read = |d: &Path| std::fs::read(final_dir(d, 0).join("adapter_model.safetensors")).unwrap();
    let dropout = format!("{}{}", MODEL.replace("lora_alpha = 8", "lora_alpha = 8, lora_dropout = 0.2"), GRPO.replace("kl_coef = 0.05", "kl_coef = 0.05\ngradient_checkpointing = true"));
    let with_dropout = setup(root.path(), "dropout", &dropout);
    ok(&train(&with_dropout, None));
    assert!(read(&with_dropout) != read(&reference), "lora_dropout changed nothing");
    for (name, recipe, want) in [("killed", &recipe, &reference), ("killed-dropout", &dropout, &with_dropout)] {
        let killed = setup(root.path(), name, recipe);
        assert!(!train(&killed, Some("step:0:3")).status.success(), "{name}: the run should have been killed");
        ok(&train(&killed, None));
        assert!(read(want) == read(&killed), "{name}: resumed adapter differs from the uninterrupted run");
    }
}

#[test]
fn lora_sft_then_dpo_continue_one_adapter_and_merge_lora_writes_the_whole_model() {
    let root = tempfile::tempdir().unwrap();
    // a base model directory with a tokenizer: one full-fine-tuning SFT step's output
    let base_run = setup(root.path(), "base", &format!("{}{}", MODEL.replace("lora = { r = 4, lora_alpha = 8, target_modules = \"all-linear\" }", ""), SFT_DPO.split("[[stage]]\nkind = \"dpo\"").next().unwrap().replace("max_steps = 4", "max_steps = 1")));
    ok(&train(&base_run, None));
    let base = final_dir(&base_run, 0);
    let on_base = |lora: &str| format!("[model]\npath = \"{}\"\ndevice = \"cpu\"\n{lora}\n{SFT_DPO}", base.display());
    let d = setup(root.path(), "lora", &on_base("lora = { r = 4, lora_alpha = 16, target_modules = [\"q_proj\", \"v_proj\", \"down_proj\"] }"));
    let log = ok(&train(&d, None));
    // DPO's reference is the base with the adapter off, not the SFT'd adapter: the implicit rewards of the
    // first step are already nonzero (with full fine-tuning they start at exactly 0)
    let dpo: Vec<Value> = metrics(&d).into_iter().filter(|m| m["stage"] == 1 && m.get("rewards_chosen").is_some()).collect();
    assert!(dpo[0]["rewards_chosen"].as_f64().unwrap().abs() > 0.0, "{log}");
    let adapter = final_dir(&d, 1);
    let names = tensor_names(&adapter.join("adapter_model.safetensors"));
    assert_eq!(names.len(), 2 * 3 * 2, "{names:?}");
    // the adapter on the base, and merged into it
    let mut with_adapter = Model::load(&base, None, Device::Cpu).unwrap();
    with_adapter.load_adapter(&adapter).unwrap();
    let merged = root.path().join("merged");
    let o = Command::new(env!("CARGO_BIN_EXE_train")).args(["merge-lora", "--base"]).arg(&base).arg("--adapter").arg(&adapter).arg("--out").arg(&merged).output().unwrap();
    ok(&o);
    assert!(merged.join("config.json").exists() && merged.join("tokenizer.json").exists());
    let m = Model::load(&merged, None, Device::Cpu).unwrap();
    let d_merged = (logits(&m) - logits(&with_adapter)).abs().max().double_value(&[]);
    assert!(d_merged < 1e-5, "the merged model differs from base + adapter by {d_merged}");
    let plain = Model::load(&base, None, Device::Cpu).unwrap();
    assert!((logits(&plain) - logits(&with_adapter)).abs().max().double_value(&[]) > 1e-4);
    // `[model] adapter` continues the trained adapter: one more SFT step starts from it
    let cont = setup(root.path(), "continue", &on_base(&format!("adapter = \"{}\"", adapter.display())).replace("max_steps = 4", "max_steps = 1"));
    let log = ok(&train(&cont, None));
    let first_loss = |dir: &Path| metrics(dir).into_iter().find(|m| m.get("loss").is_some()).unwrap()["loss"].as_f64().unwrap();
    let fresh = metrics(&d).into_iter().find(|m| m.get("loss").is_some()).unwrap()["loss"].as_f64().unwrap();
    assert!(first_loss(&cont) < fresh, "continuing from the adapter should start from its lower loss:\n{log}");
    // a missing adapter directory is one clear line
    let bad = setup(root.path(), "bad", &on_base("adapter = \"/nonexistent/adapter\""));
    let o = train(&bad, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("[model] adapter /nonexistent/adapter: no adapter_config.json there"), "{err}");
}

/// What `[model] lora` refuses, each in one line naming the key.
#[test]
fn lora_keys_are_checked_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let phi3 = MODEL.replace("model_type = \"llama\"", "model_type = \"phi3\"").replace(", target_modules = \"all-linear\"", "");
    let cases = [
        (MODEL.replace("lora_alpha = 8", "lora_alpha = 8, lora_dropout = 1.0"), "[model] lora.lora_dropout must be in [0, 1), got 1"),
        (MODEL.replace("r = 4", "r = 0"), "[model] lora.r must be a positive integer, got 0"),
        (MODEL.replace("\"all-linear\"", "[\"qq_proj\"]"), "lora target_modules [\"qq_proj\"] match no projection of this model; its projections are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        (phi3, "PEFT has no default target_modules for model_type \"phi3\""),
    ];
    for (i, (model, want)) in cases.iter().enumerate() {
        let d = setup(root.path(), &format!("c{i}"), &format!("{model}{GRPO}"));
        let o = train(&d, None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "want «{want}», got:\n{err}");
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    }
}

/// Rollout-DPO on an adapter: it samples from base + adapter (merged decode weights) and trains the adapter
/// against the base.
#[test]
fn lora_rollout_dpo_samples_from_the_adapter_and_saves_adapters() {
    let root = tempfile::tempdir().unwrap();
    let recipe = format!("{}lora = {{ r = 8, lora_alpha = 16, target_modules = \"all-linear\" }}\n{}", common::TINY_MODEL, common::ROLLOUT_DPO.replace("lr = 5e-3", "lr = 2e-2"));
    let d = setup(root.path(), "rdpo", &recipe);
    let log = ok(&train(&d, None));
    for stage in 0..2 {
        assert!(final_dir(&d, stage).join("adapter_model.safetensors").exists(), "stage {stage}:\n{log}");
        assert!(!final_dir(&d, stage).join("model.safetensors").exists());
    }
    // the SFT'd adapter answers some problems, so sampling from it gave correct and incorrect rollouts to pair
    let steps: Vec<Value> = metrics(&d).into_iter().filter(|m| m["stage"] == 1 && m.get("rewards_chosen").is_some()).collect();
    assert!(!steps.is_empty(), "no Rollout-DPO steps:\n{log}");
}
