//! End-to-end DPO and Rollout-DPO through the `train` binary on tiny random models (CPU):
//! - DPO on synthetic preference pairs widens the chosen-over-rejected margin, reuses its cached reference
//!   log-probabilities, and a run killed mid-stage resumes to bit-identical weights;
//! - SFT then Rollout-DPO sampling from the policy writes a pairs file whose chosen replies verify correct and
//!   rejected ones incorrect, and reports the dropped problems.

mod common;

use common::{metrics, train};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const DPO: &str = r#"
[run]
seed = 3
threads = 1
log_every = 1
save_every = 3
keep_last = 10

[[stage]]
kind = "dpo"
name = "dpo"
synthetic = { count = 32, arithmetic = { seed = 5, max_digits = 1, ops = ["add"] } }
tokenize = { max_length = 64 }
max_steps = 16
batch_size = 4
grad_accum = 2
lr = 1e-2
beta = 0.1
rpo_alpha = 0.2
"#;

fn setup(root: &Path, name: &str, recipe: &str) -> PathBuf {
    common::setup(root, name, &common::tiny_recipe(recipe))
}

#[test]
fn dpo_widens_the_margin_caches_the_reference_and_resumes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let a = setup(root.path(), "a", DPO);
    let out = train(&a, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("reference log-probs of 32 pairs computed"), "{stderr}");
    let m: Vec<Value> = metrics(&a).into_iter().filter(|r| r.get("rewards_margin").is_some()).collect();
    assert_eq!(m.len(), 16);
    let (first, last) = (&m[0], &m[m.len() - 1]);
    for k in ["loss", "rewards_chosen", "rewards_rejected", "rewards_accuracy", "nll"] {
        assert!(last[k].as_f64().unwrap().is_finite(), "{k}: {last}");
    }
    let (m0, m1) = (first["rewards_margin"].as_f64().unwrap(), last["rewards_margin"].as_f64().unwrap());
    // before the first update the policy is the reference: no margin
    assert!(m0.abs() < 1e-5, "{first}");
    assert!(m1 > m0 + 0.05, "margin did not widen: {m0} -> {m1}");
    assert!(last["rewards_accuracy"].as_f64().unwrap() > 0.5, "{last}");
    assert!(last["loss"].as_f64().unwrap() < first["loss"].as_f64().unwrap());
    let want = std::fs::read(a.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap();

    // killed between checkpoints, resumed: bit-identical, with the cached reference log-probs
    let b = setup(root.path(), "b", DPO);
    let out = train(&b, Some("step:0:5"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("killing at step:0:5"));
    let out = train(&b, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed at step 3") && stderr.contains("reference log-probs from"), "{stderr}");
    assert!(std::fs::read(b.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap() == want, "resumed weights differ");

    // a changed data set gets a new cache entry rather than the old one
    let c = setup(root.path(), "c", &DPO.replace("count = 32", "count = 24"));
    std::fs::create_dir_all(c.join("out/cache")).unwrap();
    for e in std::fs::read_dir(a.join("out/cache")).unwrap().flatten() {
        std::fs::copy(e.path(), c.join("out/cache").join(e.file_name())).unwrap();
    }
    let out = train(&c, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("reference log-probs of 24 pairs computed"), "{stderr}");
}


#[test]
fn rollout_dpo_pairs_verified_rollouts_and_trains_on_them() {
    let root = tempfile::tempdir().unwrap();
    let d = setup(root.path(), "r", common::ROLLOUT_DPO);
    let out = train(&d, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let path = d.join("out/rdpo/pairs.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let pairs: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!pairs.is_empty());
    let cfg = rewards::math::VerifyConfig::default();
    let mut per_problem = std::collections::HashMap::new();
    for p in &pairs {
        let gold = p["answer"].as_str().unwrap();
        assert!(p["prompt"][0]["content"].as_str().unwrap().contains('+'), "{p}");
        assert!(rewards::math::verify(gold, p["chosen"].as_str().unwrap(), &cfg).equivalent, "{p}");
        assert!(!rewards::math::verify(gold, p["rejected"].as_str().unwrap(), &cfg).equivalent, "{p}");
        *per_problem.entry(p["problem"].as_u64().unwrap()).or_insert(0) += 1;
    }
    assert!(per_problem.values().all(|&n| n <= 2), "{per_problem:?}");
    // pass rates never decrease down the file (hardest first)
    let rates: Vec<f64> = pairs.iter().map(|p| p["pass_rate"].as_f64().unwrap()).collect();
    assert!(rates.windows(2).all(|w| w[0] <= w[1]), "{rates:?}");
    // the selection summary is in the metrics and on stderr, with the drops counted
    let summary = metrics(&d).into_iter().find(|r| r.get("dropped_all_correct").is_some()).expect("selection summary");
    assert_eq!(summary["problems"], 24);
    let (pairs_n, all, none) = (summary["pairs"].as_u64().unwrap(), summary["dropped_all_correct"].as_u64().unwrap(), summary["dropped_none_correct"].as_u64().unwrap());
    assert_eq!(pairs_n as usize, pairs.len());
    assert_eq!(per_problem.len() as u64 + all + none, 24);
    assert!(stderr.contains("with every rollout correct"), "{stderr}");
    // DPO trained on them
    assert!(metrics(&d).iter().any(|r| r["stage_name"] == "rdpo" && r.get("rewards_margin").is_some()));
    assert!(d.join("out/checkpoints/s01-final/model/model.safetensors").exists());
}

#[test]
fn rollout_dpo_takes_teacher_rollouts() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("t");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("teacher.jsonl"),
        "{\"prompt\": \"What is 2 + 3?\", \"answer\": \"5\", \"rollouts\": [\"5\", \"6\", \"2 + 3 = 5\", \"4\"]}\n\
         {\"prompt\": [{\"role\": \"user\", \"content\": \"What is 1 + 1?\"}], \"answer\": 2, \"rollouts\": [\"2\", \"2\"]}\n\
         {\"prompt\": \"What is 4 + 4?\", \"answer\": \"8\", \"rollouts\": [\"7\", \"9\"]}\n",
    )
    .unwrap();
    let recipe = r#"
[run]
threads = 1
log_every = 1
[[stage]]
kind = "rollout_dpo"
teacher_rollouts = "teacher.jsonl"
pairs_per_problem = "all"
pairs_path = "pairs/out.jsonl"
max_steps = 2
batch_size = 2
"#;
    std::fs::write(d.join("recipe.toml"), common::tiny_recipe(recipe)).unwrap();
    let out = train(&d, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = std::fs::read_to_string(d.join("pairs/out.jsonl")).unwrap();
    let pairs: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(pairs.len(), 4, "{text}");
    assert!(stderr.contains("dropped 1 with every rollout correct and 1 with none correct"), "{stderr}");
    let want = std::fs::read(d.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap();

    // killed after the step-1 checkpoint: the resumed run reads the pairs file and the cached reference back
    let k = root.path().join("k");
    std::fs::create_dir_all(&k).unwrap();
    std::fs::copy(d.join("teacher.jsonl"), k.join("teacher.jsonl")).unwrap();
    std::fs::write(k.join("recipe.toml"), common::tiny_recipe(&recipe.replace("log_every = 1", "log_every = 1\nsave_every = 1"))).unwrap();
    let out = train(&k, Some("step:0:2"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("killing at step:0:2"));
    let out = train(&k, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed at step 1") && stderr.contains("4 pairs from") && stderr.contains("reference log-probs from"), "{stderr}");
    assert!(std::fs::read(k.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap() == want, "resumed weights differ");
}

#[test]
fn example_recipe_passes_dry_run() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../recipes/examples/dpo-demo.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_train")).arg("--recipe").arg(&path).arg("--dry-run").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("(rollout_dpo): 2000 synthetic problems × 8 samples"), "{stdout}");
}
