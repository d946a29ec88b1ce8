//! The GRPO stage end to end on a tiny random model and synthetic problems: every sampling-side method
//! switched on at once (prefilter, oversample-and-balance, dynamic sampling, temperature annealing, KL to a
//! reference, μ = 2, clip-higher, dual clip), metrics logged per step, and a run killed with SIGKILL mid-stage
//! resuming to weights bit-identical to an uninterrupted run.

mod common;

use common::{metrics, train};
use serde_json::Value;
use std::path::Path;

const RECIPE: &str = r#"
[model]
config = { model_type = "llama", vocab_size = 260, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 128, tie_word_embeddings = true }
init_seed = 3
tokenizer = "builtin:bytes"
device = "cpu"

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
oversample_generations = 6
max_completion_length = 6
temperature = 1.2
temperature_final = 0.8
temperature_anneal_steps = 2
num_iterations = 2
micro_batch_size = 5
lr = 1e-3
clip_ratio_low = 0.2
clip_ratio_high = 0.28
clip_ratio_c = 3.0
kl_coef = 0.05
kl_estimator = "k3"
entropy_coeff = 0.01
mask_truncated_completions = true
prefilter = { samples = 2, min_pass_rate = 0.0, max_pass_rate = 1.0 }
dynamic_sampling = { max_gen_batches = 2, on_cap = "train" }
reward = [{ kind = "accuracy", correct = 1.0, incorrect = 0.0, no_answer = 0.0 }, { kind = "overlong", overlong_buffer_len = 2, overlong_penalty_factor = 0.5 }]
eval = { synthetic = { count = 10, start = 1000, arithmetic = { seed = 2, max_digits = 1 } }, max_new_tokens = 4 }
"#;

fn setup(root: &Path, name: &str) -> std::path::PathBuf {
    common::setup(root, name, RECIPE)
}

#[test]
fn grpo_runs_logs_its_metrics_and_resumes_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let reference = setup(root.path(), "reference");
    let out = train(&reference, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("prefilter (2 pilot samples each): kept"), "{stderr}");
    assert!(stderr.contains("held-out accuracy: "), "{stderr}");

    let metrics: Vec<Value> = metrics(&reference);
    let steps: Vec<&Value> = metrics.iter().filter(|m| m.get("reward_mean").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for key in [
        "loss", "reward_std", "accuracy", "frac_zero_std_groups", "kl", "clip_frac", "entropy", "response_length_mean",
        "response_length_max", "truncated_frac", "grad_norm", "time_generate_s", "time_score_s", "time_train_s", "tokens_per_s",
    ] {
        assert!(steps.iter().all(|m| m[key].as_f64().is_some_and(f64::is_finite)), "{key} missing: {:?}", steps[0]);
    }
    // temperature annealing 1.2 -> 0.8 over two steps, then held
    let temps: Vec<f64> = steps.iter().map(|m| m["temperature"].as_f64().unwrap()).collect();
    let want = [1.2, 1.0, 0.8, 0.8];
    for (t, w) in temps.iter().zip(want) {
        assert!((t - w).abs() < 1e-9, "{temps:?}");
    }
    // a KL term against the reference: zero at the first update is fine, not after the policy moved
    assert!(steps[1..].iter().any(|m| m["kl"].as_f64().unwrap() > 0.0), "{steps:?}");
    // groups are G = 4 after balancing; never more than the prompts asked for
    assert!(steps.iter().all(|m| m["groups"].as_u64().unwrap() <= 3));
    let want_weights = std::fs::read(reference.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap();

    // killed just after the step-2 checkpoint, and between checkpoints at step 3
    for kill in ["after-ckpt:0:2", "step:0:3"] {
        let d = setup(root.path(), &kill.replace(':', "_"));
        let out = train(&d, Some(kill));
        assert!(!out.status.success(), "the run should have been killed at {kill}");
        let out = train(&d, None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = std::fs::read(d.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap();
        assert!(got == want_weights, "resumed after {kill}: final weights differ from the uninterrupted run");
    }
}

#[test]
fn dynamic_sampling_cap_with_on_cap_error_stops_with_a_clear_message() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("cap");
    std::fs::create_dir_all(&d).unwrap();
    // a random model never answers correctly: every group has equal (zero) rewards
    let recipe = RECIPE
        .replace("dynamic_sampling = { max_gen_batches = 2, on_cap = \"train\" }", "dynamic_sampling = { max_gen_batches = 2, on_cap = \"error\" }")
        .replace("prefilter = { samples = 2, min_pass_rate = 0.0, max_pass_rate = 1.0 }\n", "")
        .replace("reward = [{ kind = \"accuracy\", correct = 1.0, incorrect = 0.0, no_answer = 0.0 }, { kind = \"overlong\", overlong_buffer_len = 2, overlong_penalty_factor = 0.5 }]", "reward = [{ kind = \"accuracy\", correct = 1.0, incorrect = 0.0, no_answer = 0.0 }]");
    std::fs::write(d.join("recipe.toml"), recipe).unwrap();
    let out = train(&d, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("dynamic sampling kept 0 of 3 groups after max_gen_batches = 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn grpo_from_a_dataset_with_domains_a_token_budget_and_the_other_switches() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path();
    let mut rows = String::new();
    for i in 0..24 {
        let (dom, q, a) = if i % 3 == 0 { ("sub", format!("What is {} - 1?", i + 5), i + 4) } else { ("add", format!("What is {i} + 2?"), i + 2) };
        rows.push_str(&serde_json::json!({"question": q, "answer": a.to_string(), "topic": dom}).to_string());
        rows.push('\n');
    }
    std::fs::write(d.join("problems.jsonl"), rows).unwrap();
    let recipe = RECIPE
        .replace(
            "synthetic = { count = 40, arithmetic = { seed = 2, max_digits = 1 } }",
            &format!("data = {{ path = \"{}\", prompt = \"question\", answer = \"answer\", domain = \"topic\" }}", d.join("problems.jsonl").display()),
        )
        .replace("prefilter = { samples = 2, min_pass_rate = 0.0, max_pass_rate = 1.0 }\n", "domain_sampling = { alpha = 0.5 }\ntokens_per_step = 40\nadv_estimator = \"rloo\"\nscale_rewards = \"batch\"\nimportance_sampling_level = \"sequence\"\nloss_agg_mode = \"seq-mean-token-sum-norm\"\nkl_in_reward = true\n")
        .replace("kl_estimator = \"k3\"", "kl_estimator = \"k1\"")
        .replace("dynamic_sampling = { max_gen_batches = 2, on_cap = \"train\" }\n", "")
        .replace("oversample_generations = 6\n", "")
        .replace("mask_truncated_completions = true", "mask_truncated_completions = false");
    let dir = d.join("run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("recipe.toml"), recipe).unwrap();
    let out = train(&dir, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("domain-aware sampling over 2 domains: add, sub"), "{stderr}");
    let metrics: Vec<Value> = metrics(&dir);
    let steps: Vec<&Value> = metrics.iter().filter(|m| m.get("reward_mean").is_some()).collect();
    assert_eq!(steps.len(), 4);
    // the budget is reached by whole groups: generation stops once 40 completion tokens are in
    for m in &steps {
        let rounds = m["gen_rounds"].as_u64().unwrap();
        assert!((1..=3).contains(&rounds), "{m}");
    }
    // the KL went into the reward (after the first update the policy differs from the reference)
    assert!(steps[1..].iter().any(|m| m["kl_in_reward"].as_f64().unwrap() != 0.0), "{steps:?}");
}

/// `[generation]` reaches the rollout engine of every sampling pass: smaller batches without refill or fused
/// weights sample the same completions; a budget too small for one sequence is the engine's one-line error.
#[test]
fn generation_table_sets_the_engine_batching() {
    let root = tempfile::tempdir().unwrap();
    let run = |name: &str, generation: &str| {
        let d = common::setup(root.path(), name, &format!("{RECIPE}\n[generation]\n{generation}\n"));
        (train(&d, None), d)
    };
    let (a, da) = run("default", "");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let (b, db) = run("small", "max_batch_seqs = 3\ncache_budget_tokens = 400\nslot_refill = false\nfuse_weights = false");
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let rewards = |d: &Path| -> Vec<f64> { metrics(d).iter().filter_map(|m| m.get("reward_mean").and_then(Value::as_f64)).collect() };
    assert_eq!(rewards(&da).len(), 4);
    assert_eq!(rewards(&da), rewards(&db));
    // static decode steps (the path CUDA graphs replay) sample the same completions on the CPU
    let (s, ds) = run("static", "decode = \"static\"\nsync_every = 3");
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert_eq!(rewards(&da), rewards(&ds));
    let (c, _) = run("tight", "cache_budget_tokens = 8");
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(!c.status.success() && err.contains("but cache_budget_tokens is 8"), "{err}");
    let (d, _) = run("zero", "max_batch_seqs = 0");
    let err = String::from_utf8_lossy(&d.stderr);
    assert!(!d.status.success() && err.contains("[generation] max_batch_seqs must be at least 1"), "{err}");
    let (e, _) = run("sync", "decode = \"static\"\nsync_every = 0");
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("[generation] sync_every must be at least 1"), "{err}");
}

/// Each policy loss with a rollout correction, DeepSeek-V3.2's off-policy masking and its unbiased KL switched on
/// (issue 19): the mismatch metrics are logged every step, and a run killed with SIGKILL resumes to weights
/// bit-identical to an uninterrupted one.
#[test]
fn every_policy_loss_and_rollout_correction_logs_the_mismatch_and_resumes_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let cases = [
        ("cispo", r#"{ mode = "tis", level = "token", cap = 2.0 }"#),
        ("sapo", r#"{ mode = "mis", level = "sequence", band = [0.5, 5.0] }"#),
        ("gmpo", r#"{ mode = "mis", level = "token" }"#),
        ("vanilla", r#"{ mode = "none" }"#),
    ];
    for (loss, correction) in cases {
        let switches = format!(
            "mask_truncated_completions = true\npolicy_loss = \"{loss}\"\nrollout_correction = {correction}\noff_policy_mask_threshold = 0.5\nuse_bias_correction_kl = true"
        );
        let recipe = RECIPE.replace("mask_truncated_completions = true", &switches);
        let run = |name: &str, kill: Option<&str>| {
            let d = root.path().join(format!("{loss}-{name}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("recipe.toml"), &recipe).unwrap();
            let out = train(&d, kill);
            (d, out)
        };
        let (reference, out) = run("reference", None);
        assert!(out.status.success(), "{loss}: {}", String::from_utf8_lossy(&out.stderr));
        let steps: Vec<Value> = metrics(&reference).into_iter().filter(|m| m.get("reward_mean").is_some()).collect();
        assert_eq!(steps.len(), 4, "{loss}");
        for key in ["mismatch_logp_abs", "mismatch_kl_k3", "mismatch_ratio_max", "rollout_corrected_frac", "off_policy_masked_frac"] {
            assert!(steps.iter().all(|m| m[key].as_f64().is_some_and(f64::is_finite)), "{loss}: {key} missing: {:?}", steps[0]);
        }
        // fp32 sampling on the trained tensors: the sampler and the trainer agree closely but not bit for bit
        assert!(steps.iter().all(|m| m["mismatch_logp_abs"].as_f64().unwrap() < 1e-3), "{loss}: {steps:?}");
        let want = std::fs::read(reference.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap();
        let (killed, out) = run("killed", Some("step:0:3"));
        assert!(!out.status.success(), "{loss}: the run should have been killed");
        let out = train(&killed, None);
        assert!(out.status.success(), "{loss}: {}", String::from_utf8_lossy(&out.stderr));
        let got = std::fs::read(killed.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap();
        assert!(got == want, "{loss}: resumed weights differ from the uninterrupted run");
    }
}
