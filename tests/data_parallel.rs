//! Data parallelism end to end on CPU: `train --nproc-per-node N` over c10d Gloo on 127.0.0.1 (the launcher
//! hosts the store on port 0, so tests run in parallel; `WHET_DIST_TIMEOUT_S` bounds every collective, so
//! nothing hangs). Two ranks give weights bit-identical to one process with the same global batch (SFT,
//! DPO, GRPO); three ranks keep identical replicas within a few ulp of one process; a killed rank stops the
//! job within seconds with a one-line error, and `--max-restarts` resumes it from the latest checkpoint.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SFT: &str = r#"

[run]
seed = 3
threads = 1
log_every = 1
save_every = 3
keep_last = 10

[[stage]]
kind = "sft"
name = "sft"
synthetic = { count = 24, arithmetic = { seed = 5 } }
tokenize = { max_length = 96 }
max_steps = 6
batch_size = 2
grad_accum = 1
lr = 2e-3
warmup_steps = 2
weight_decay = 0.1
"#;

const GRPO: &str = r#"
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

[[stage]]
kind = "grpo"
name = "rl"
synthetic = { count = 40, arithmetic = { seed = 2, max_digits = 1 } }
max_steps = 4
prompts_per_step = 4
num_generations = 4
oversample_generations = 6
max_completion_length = 6
temperature = 1.2
num_iterations = 2
micro_batch_size = 8
lr = 1e-3
kl_coef = 0.05
kl_estimator = "k3"
entropy_coeff = 0.01
scale_rewards = "batch"
reward = [{ kind = "accuracy", correct = 1.0, incorrect = 0.0, no_answer = 0.0 }, { kind = "overlong", overlong_buffer_len = 2, overlong_penalty_factor = 0.5 }]
"#;

const DPO: &str = r#"

[run]
seed = 3
threads = 1

[[stage]]
kind = "dpo"
name = "dpo"
synthetic = { count = 32, arithmetic = { seed = 5, max_digits = 1, ops = ["add"] } }
tokenize = { max_length = 64 }
max_steps = 4
batch_size = 4
grad_accum = 1
lr = 1e-2
rpo_alpha = 0.2
"#;

/// `train [--nproc-per-node N] --recipe DIR/recipe.toml --output DIR/out EXTRA...` with bounded collectives.
/// A recipe directory holding `body`, after the Qwen2 model table unless `body` has its own.
fn setup(root: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let text = if body.contains("[model]") { body.to_string() } else { common::tiny_recipe(body) };
    common::setup(root, name, &text)
}

fn train(dir: &Path, nproc: Option<usize>, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    if let Some(n) = nproc {
        c.args(["--nproc-per-node", &n.to_string()]);
    }
    c.arg("--recipe").arg(dir.join("recipe.toml")).arg("--output").arg(dir.join("out")).args(extra);
    c.env("WHET_DIST_TIMEOUT_S", "20").env("OMP_NUM_THREADS", "1");
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "train failed:\n{err}");
    err
}

fn weights(dir: &Path, stage: usize) -> Vec<u8> {
    std::fs::read(dir.join(format!("out/checkpoints/s{stage:02}-final/model/model.safetensors"))).unwrap()
}

/// The logged losses (rank 0 logs the values reduced over the ranks).
fn losses(dir: &Path) -> Vec<f64> {
    common::metrics(dir).iter().filter_map(|m| m["loss"].as_f64()).collect()
}

#[test]
fn two_rank_sft_is_bitwise_one_process_with_the_same_global_batch() {
    let root = tempfile::tempdir().unwrap();
    let one = setup(root.path(), "one", SFT);
    let two = setup(root.path(), "two", SFT);
    ok(&train(&one, None, &["--set", "stage.0.grad_accum=2"], &[]));
    let log = ok(&train(&two, Some(2), &[], &[]));
    assert!(log.contains("rank 1 of 2 (local rank 1), gloo backend"), "{log}");
    assert!(log.contains("[sft] replicas identical on 2 ranks"), "{log}");
    assert_eq!(weights(&one, 0), weights(&two, 0), "2-rank SFT differs from 1 process");
    assert_eq!(losses(&one), losses(&two));
    assert_eq!(losses(&two).len(), 6);
}

/// bf16 weights with dithered fp32 master weights, and with stochastic rounding: the dither and the rounding
/// bits depend on the seed, step and parameter only, so every rank draws the same and 2 ranks still equal one
/// process bit for bit.
#[test]
fn two_rank_bf16_sft_is_bitwise_one_process_in_master_and_stochastic_modes() {
    let root = tempfile::tempdir().unwrap();
    for mode in ["master_fp32", "stochastic_rounding"] {
        let body = format!("{}dtype = \"bfloat16\"\nweight_update = \"{mode}\"\n{SFT}", common::TINY_MODEL);
        let one = setup(root.path(), &format!("one-{mode}"), &body);
        let two = setup(root.path(), &format!("two-{mode}"), &body);
        ok(&train(&one, None, &["--set", "stage.0.grad_accum=2"], &[]));
        let log = ok(&train(&two, Some(2), &[], &[]));
        assert!(log.contains("[sft] replicas identical on 2 ranks"), "{log}");
        assert_eq!(weights(&one, 0), weights(&two, 0), "{mode}: 2-rank bf16 SFT differs from 1 process");
    }
}

#[test]
fn two_rank_grpo_is_bitwise_one_process_with_the_same_prompts_per_step() {
    let root = tempfile::tempdir().unwrap();
    let one = setup(root.path(), "one", GRPO);
    let two = setup(root.path(), "two", GRPO);
    ok(&train(&one, None, &[], &[]));
    let log = ok(&train(&two, Some(2), &[], &[]));
    assert!(log.contains("[rl] replicas identical on 2 ranks"), "{log}");
    assert_eq!(weights(&one, 0), weights(&two, 0), "2-rank GRPO differs from 1 process");
    // rewards, lengths and losses gathered from both ranks are the one-process step's
    let keys = ["reward_mean", "reward_std", "response_length_mean", "loss", "kl", "entropy", "groups", "train_tokens"];
    let pick = |d: &Path| -> Vec<Vec<f64>> { common::metrics(d).iter().map(|m| keys.iter().map(|k| m[*k].as_f64().unwrap()).collect()).collect() };
    assert_eq!(pick(&one), pick(&two));
}

/// Final weights of two runs, tensor by tensor: the largest absolute difference.
fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let read = |d: &Path| {
        let mut ts = tch::Tensor::read_safetensors(d.join("out/checkpoints/s00-final/model/model.safetensors")).unwrap();
        ts.sort_by(|a, b| a.0.cmp(&b.0));
        ts
    };
    let (a, b) = (read(a), read(b));
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|((na, ta), (nb, tb))| {
        assert_eq!(na, nb);
        (ta - tb).abs().max().double_value(&[])
    }).fold(0.0, f64::max)
}

/// Dynamic sampling, domain-aware sampling and a token budget decide from every group of a generation round;
/// with two ranks each rank generates half of the groups and both take the one-process decisions from the
/// gathered summaries: the same groups kept and dropped, rounds drawn, rewards; the weights differ from one
/// process only by the order in which uneven shares of groups are summed.
#[test]
fn two_rank_grpo_sampling_side_decisions_equal_one_process() {
    let root = tempfile::tempdir().unwrap();
    let mut rows = String::new();
    for i in 0..24 {
        let (dom, q, a) = if i % 3 == 0 { ("sub", format!("What is {} - 1?", i + 5), i + 4) } else { ("add", format!("What is {i} + 2?"), i + 2) };
        rows.push_str(&serde_json::json!({"question": q, "answer": a.to_string(), "topic": dom}).to_string());
        rows.push('\n');
    }
    let data = root.path().join("problems.jsonl");
    std::fs::write(&data, rows).unwrap();
    let dynamic = GRPO.replace(
        "max_steps = 4\n",
        "max_steps = 4\ndynamic_sampling = { max_gen_batches = 8, on_cap = \"train\" }\nprefilter = { samples = 3, min_pass_rate = 0.0, max_pass_rate = 1.0, max_length_cv = 0.4 }\n",
    );
    let budget = GRPO
        .replace("synthetic = { count = 40, arithmetic = { seed = 2, max_digits = 1 } }", &format!("data = {{ path = \"{}\", prompt = \"question\", answer = \"answer\", domain = \"topic\" }}", data.display()))
        .replace("max_steps = 4\n", "max_steps = 4\ndomain_sampling = { alpha = 0.5 }\ntokens_per_step = 40\n");
    for (name, recipe) in [("dynamic", dynamic), ("budget", budget)] {
        let one = setup(root.path(), &format!("{name}-one"), &recipe);
        let two = setup(root.path(), &format!("{name}-two"), &recipe);
        let log_one = ok(&train(&one, None, &[], &[]));
        let log = ok(&train(&two, Some(2), &[], &[]));
        assert!(log.contains("[rl] replicas identical on 2 ranks"), "{name}: {log}");
        // the prefilter's pilot rollouts are split over the ranks too, and keep the same prompts
        let pilot = |l: &str| l.lines().find(|x| x.starts_with("[rl] prefilter (")).map(str::to_string);
        assert_eq!(pilot(&log_one), pilot(&log), "{name}");
        if name == "dynamic" {
            let line = pilot(&log).unwrap();
            assert!(!line.contains(" 0 with uneven lengths"), "{line}");
        }
        let keys = ["groups", "gen_rounds", "groups_dropped_zero_std", "groups_dropped_over_budget", "frac_zero_std_groups", "reward_mean", "response_length_mean"];
        let pick = |d: &Path| -> Vec<Vec<f64>> { common::metrics(d).iter().map(|m| keys.iter().map(|k| m[*k].as_f64().unwrap()).collect()).collect() };
        let (a, b) = (pick(&one), pick(&two));
        assert_eq!(a.len(), 4, "{name}");
        for (x, y) in a.iter().zip(&b) {
            for ((k, u), v) in keys.iter().zip(x).zip(y) {
                assert!((u - v).abs() <= 1e-12 * u.abs().max(1.0), "{name} {k}: one process {u}, two ranks {v}");
            }
        }
        let dropped: f64 = a.iter().map(|m| m[2] + m[3]).sum();
        assert!(dropped > 0.0, "{name}: nothing was dropped, so nothing was decided: {a:?}");
        let d = max_weight_diff(&one, &two);
        assert!(d < 1e-5, "{name}: 2 ranks differ from 1 process by {d}");
        // uneven shares under ZeRO-3 (the rank with fewer micro-batches replays the per-layer gathers and
        // reductions with zeros — 10 and 6 such rounds in these two runs): the same run within float rounding
        let zero3 = setup(root.path(), &format!("{name}-zero3"), &recipe);
        ok(&train(&zero3, Some(2), &["--set", "run.sharding=\"full\"", "--set", "stage.0.gradient_checkpointing=true"], &[]));
        let d = max_weight_diff(&one, &zero3);
        assert!(d < 1e-5, "{name}: ZeRO-3 on 2 ranks differs from 1 process by {d}");
    }
}

/// Rollout-DPO with two ranks (after a short SFT so that some rollouts are right): each samples its share of
/// the problems (23: uneven shares), both gather every rollout and reference log-prob, and the pairs, the
/// reference cache and the final weights are the one-process ones.
#[test]
fn two_rank_rollout_dpo_samples_its_share_and_matches_one_process() {
    let root = tempfile::tempdir().unwrap();
    let one = setup(root.path(), "one", common::ROLLOUT_DPO);
    let two = setup(root.path(), "two", common::ROLLOUT_DPO);
    // the global SFT batch of 16 as 2 × 8 on one process and 8 per rank on two
    let common_args = ["--set", "stage.0.batch_size=8", "--set", "stage.1.synthetic.count=23"];
    ok(&train(&one, None, &[&common_args[..], &["--set", "stage.0.grad_accum=2", "--set", "stage.1.grad_accum=2"]].concat(), &[]));
    let log = ok(&train(&two, Some(2), &common_args, &[]));
    assert!(log.contains("[rdpo] replicas identical on 2 ranks") && log.contains("[rdpo] 23 problems"), "{log}");
    let pairs = |d: &Path| std::fs::read_to_string(d.join("out/rdpo/pairs.jsonl")).unwrap();
    assert!(pairs(&one).lines().count() >= 4, "{}", pairs(&one));
    assert_eq!(pairs(&one), pairs(&two), "2-rank Rollout-DPO sampled other pairs than 1 process");
    let refs = |d: &Path| {
        let dir = d.join("out/cache");
        let f = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
        std::fs::read_to_string(f).unwrap()
    };
    assert_eq!(refs(&one), refs(&two), "2-rank reference log-probs differ from 1 process");
    assert_eq!(weights(&one, 1), weights(&two, 1), "2-rank Rollout-DPO differs from 1 process");
}

#[test]
fn two_rank_dpo_is_bitwise_one_process_with_the_same_global_batch() {
    let root = tempfile::tempdir().unwrap();
    let one = setup(root.path(), "one", DPO);
    let two = setup(root.path(), "two", DPO);
    ok(&train(&one, None, &["--set", "stage.0.grad_accum=2"], &[]));
    ok(&train(&two, Some(2), &[], &[]));
    assert_eq!(weights(&one, 0), weights(&two, 0), "2-rank DPO differs from 1 process");
}

/// Three ranks: the ring sums in another order than one process does, so the weights may differ from it
/// by a few ulp, but every replica is the same (checked by the run itself) and reruns are reproducible.
#[test]
fn three_ranks_keep_identical_replicas_close_to_one_process() {
    let root = tempfile::tempdir().unwrap();
    let one = setup(root.path(), "one", SFT);
    let three = setup(root.path(), "three", SFT);
    ok(&train(&one, None, &["--set", "stage.0.grad_accum=3"], &[]));
    let log = ok(&train(&three, Some(3), &[], &[]));
    assert!(log.contains("[sft] replicas identical on 3 ranks"), "{log}");
    let d = max_weight_diff(&one, &three);
    assert!(d < 1e-5, "3 ranks differ from 1 process by {d}");
    // a 3-rank run killed after its step-3 checkpoint resumes to the same bits
    let again = setup(root.path(), "again", SFT);
    let o = train(&again, Some(3), &[], &[("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "2")]);
    assert!(!o.status.success());
    let log = ok(&train(&again, Some(3), &[], &[]));
    assert!(log.contains("resumed at step 3/6"), "{log}");
    assert_eq!(weights(&three, 0), weights(&again, 0), "3-rank resume is not bit-identical");
}

#[test]
fn a_killed_rank_stops_the_job_within_seconds_and_max_restarts_resumes_it() {
    let root = tempfile::tempdir().unwrap();
    let reference = setup(root.path(), "reference", SFT);
    ok(&train(&reference, Some(2), &[], &[]));

    // rank 1 dies (SIGKILL) at step 4, after the step-3 checkpoint: the job stops, naming it
    let killed = setup(root.path(), "killed", SFT);
    let t0 = Instant::now();
    let o = train(&killed, Some(2), &[], &[("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "1")]);
    let dt = t0.elapsed();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("error: rank 1 (pid ") && last.contains("was killed by signal 9 (SIGKILL); stopped the other 1 rank(s)"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    assert!(dt < Duration::from_secs(30), "the job took {dt:?} to stop");

    // resuming that job (same world size) continues bit-identically
    ok(&train(&killed, Some(2), &[], &[]));
    assert_eq!(weights(&reference, 0), weights(&killed, 0), "resumed 2-rank run differs from the uninterrupted one");

    // --max-restarts: the launcher restarts both ranks from the latest checkpoint by itself
    let restarted = setup(root.path(), "restarted", SFT);
    let o = train(&restarted, Some(2), &["--max-restarts", "1"], &[("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "1")]);
    let err = ok(&o);
    assert!(err.contains("restarting from the latest checkpoint (restart 1 of 1)"), "{err}");
    assert!(err.contains("resumed at step 3/6"), "{err}");
    assert_eq!(weights(&reference, 0), weights(&restarted, 0), "restarted run differs from the uninterrupted one");
}

/// A stage started on two ranks resumes on one process, keeping the global batch, with a warning.
#[test]
fn resuming_on_another_world_size_keeps_the_global_batch() {
    let root = tempfile::tempdir().unwrap();
    let d = setup(root.path(), "d", SFT);
    let o = train(&d, Some(2), &[], &[("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "0")]);
    assert!(!o.status.success());
    let err = ok(&train(&d, None, &[], &[]));
    assert!(err.contains("warning: resuming on 1 rank(s) a stage started on 2: keeping its global batch of 2 micro-batches"), "{err}");
    assert_eq!(losses(&d).len(), 6);
    // a world size that cannot share the global batch is refused in one line
    let e = setup(root.path(), "e", SFT);
    let o = train(&e, Some(2), &[], &[("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "0")]);
    assert!(!o.status.success());
    let o = train(&e, Some(3), &[], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cannot share evenly"), "{err}");
}

/// Workers started by someone else (torchrun --no-python, a SLURM wrapper): RANK, WORLD_SIZE, MASTER_ADDR
/// and MASTER_PORT set and no agent store, so rank 0 hosts the store.
#[test]
fn workers_started_with_torchrun_variables_join_the_job() {
    let root = tempfile::tempdir().unwrap();
    let one = setup(root.path(), "one", SFT);
    ok(&train(&one, None, &["--set", "stage.0.grad_accum=2"], &[]));
    let two = setup(root.path(), "two", SFT);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let (two, port) = (two.clone(), port.clone());
            std::thread::spawn(move || {
                let r = r.to_string();
                train(&two, None, &[], &[("RANK", &r), ("LOCAL_RANK", &r), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
            })
        })
        .collect();
    for h in ranks {
        ok(&h.join().unwrap());
    }
    assert_eq!(weights(&one, 0), weights(&two, 0));
}

#[test]
fn launcher_flags_are_checked_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let d = setup(root.path(), "d", SFT);
    for (args, want) in [
        (vec!["--nproc-per-node", "0"], "--nproc-per-node and --nnodes must be at least 1"),
        (vec!["--nproc-per-node", "2", "--nnodes", "2"], "every node needs --master-addr and --master-port"),
        (vec!["--nproc-per-node", "2", "--node-rank", "1"], "--node-rank 1 must be below --nnodes 1"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
        c.args(&args).arg("--recipe").arg(d.join("recipe.toml"));
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.trim().lines().count() == 1 && err.contains(want), "{args:?}: {err}");
    }
    // a GRPO step's prompts must split evenly into whole groups
    let g = setup(root.path(), "g", GRPO);
    let o = train(&g, Some(3), &[], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("prompts_per_step = 4 cannot be shared evenly by 3 ranks"), "{err}");
}

/// LoRA (issue 18): the adapter is replicated and only its gradients are all-reduced; 2 ranks end with the
/// adapter one process trains, bit for bit, and the base stays untouched on both.
#[test]
fn two_rank_lora_grpo_is_bitwise_one_process() {
    let root = tempfile::tempdir().unwrap();
    let body = GRPO.replace("device = \"cpu\"\n", "device = \"cpu\"\nlora = { r = 4, lora_alpha = 8, target_modules = [\"q_proj\", \"v_proj\", \"gate_proj\"] }\n");
    let one = setup(root.path(), "one", &body);
    let two = setup(root.path(), "two", &body);
    ok(&train(&one, None, &[], &[]));
    let log = ok(&train(&two, Some(2), &[], &[]));
    assert!(log.contains("[rl] replicas identical on 2 ranks"), "{log}");
    let adapter = |d: &Path| std::fs::read(d.join("out/checkpoints/s00-final/model/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&one), adapter(&two), "2-rank LoRA GRPO differs from 1 process");
    // the adapter's optimizer state sharded too (ZeRO-1): the same adapter, bit for bit
    let zero1 = setup(root.path(), "zero1", &body);
    let log = ok(&train(&zero1, Some(2), &["--set", "run.sharding=\"optimizer\""], &[]));
    assert!(log.contains("sharding \"optimizer\" over 2 rank(s)"), "{log}");
    assert_eq!(adapter(&one), adapter(&zero1), "2-rank LoRA GRPO with ZeRO-1 differs from 1 process");
    // the adapter sharded whole (ZeRO-3, gathered per layer over the whole frozen base) trains ZeRO-2's adapter
    let (zero2, zero3) = (setup(root.path(), "zero2", &body), setup(root.path(), "zero3", &body));
    for (d, m) in [(&zero2, "gradients"), (&zero3, "full")] {
        ok(&train(d, Some(2), &["--set", &format!("run.sharding=\"{m}\""), "--set", "stage.0.gradient_checkpointing=true"], &[]));
    }
    assert_eq!(adapter(&zero2), adapter(&zero3), "2-rank LoRA GRPO with ZeRO-3 differs from ZeRO-2");
}

/// `[run] sharding = "optimizer"` (ZeRO-1): each rank keeps AdamW's state for its block of every flat bucket,
/// updates those elements and all-gathers the weights. AdamW is elementwise and the precision modes' random
/// bits are keyed by the element's place in its whole parameter, so 2 ranks end with "none"'s weights bit for
/// bit — fp32, and bf16 with fp32 master weights (sharded too) or stochastic rounding — and a checkpoint's
/// optimizer file is the very file "none" writes: a sharded run resumes unsharded on another world size, and
/// the reverse, to the same final weights.
#[test]
fn two_rank_optimizer_sharding_is_bitwise_unsharded_and_its_checkpoints_resume_in_any_mode() {
    let root = tempfile::tempdir().unwrap();
    let kill = [("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "1")];
    let sharding = |m: &str| format!("run.sharding=\"{m}\"");
    let opt = |d: &Path| std::fs::read(d.join("out/checkpoints/s00-step0000003/optimizer.safetensors")).unwrap();
    for (mode, dtype) in [("fp32", ""), ("master_fp32", "dtype = \"bfloat16\"\nweight_update = \"master_fp32\"\n"), ("stochastic_rounding", "dtype = \"bfloat16\"\nweight_update = \"stochastic_rounding\"\n")] {
        let body = format!("{}{dtype}{SFT}", common::TINY_MODEL);
        let none = setup(root.path(), &format!("none-{mode}"), &body);
        let zero1 = setup(root.path(), &format!("zero1-{mode}"), &body);
        ok(&train(&none, Some(2), &[], &[]));
        let log = ok(&train(&zero1, Some(2), &["--set", &sharding("optimizer")], &[]));
        assert!(log.contains("[sft] replicas identical on 2 ranks"), "{log}");
        assert!(log.contains("sharding \"optimizer\" over 2 rank(s)"), "{log}");
        assert_eq!(weights(&none, 0), weights(&zero1, 0), "{mode}: ZeRO-1 differs from unsharded");
        // the same runs killed after their step-3 checkpoints: the same optimizer file
        let (a, b) = (setup(root.path(), &format!("a-{mode}"), &body), setup(root.path(), &format!("b-{mode}"), &body));
        assert!(!train(&a, Some(2), &[], &kill).status.success());
        assert!(!train(&b, Some(2), &["--set", &sharding("optimizer")], &kill).status.success());
        assert_eq!(opt(&a), opt(&b), "{mode}: the sharded optimizer's checkpoint differs from the unsharded one");
        // resumed across modes and world sizes: ZeRO-1 on 2 ranks → none on 1 process, none → ZeRO-1
        let log = ok(&train(&b, None, &[], &[]));
        assert!(log.contains("resumed at step 3/6"), "{log}");
        ok(&train(&a, Some(2), &["--set", &sharding("optimizer")], &[]));
        assert_eq!(weights(&none, 0), weights(&b, 0), "{mode}: ZeRO-1 resumed unsharded differs");
        assert_eq!(weights(&none, 0), weights(&a, 0), "{mode}: unsharded resumed with ZeRO-1 differs");
    }
}

/// ZeRO-1 on 4 ranks for SFT, and on 2 ranks for DPO and GRPO (with its KL reference and μ = 2 updates per
/// step): the weights are the unsharded run's bit for bit (the gradients are all-reduced as without
/// sharding; only the update is split).
#[test]
fn optimizer_sharding_equals_unsharded_for_sft_on_4_ranks_and_dpo_and_grpo_on_2() {
    let root = tempfile::tempdir().unwrap();
    for (name, body, n) in [("sft", SFT, 4), ("dpo", DPO, 2), ("grpo", GRPO, 2)] {
        let none = setup(root.path(), &format!("none-{name}"), body);
        let zero1 = setup(root.path(), &format!("zero1-{name}"), body);
        ok(&train(&none, Some(n), &[], &[]));
        let log = ok(&train(&zero1, Some(n), &["--set", "run.sharding=\"optimizer\""], &[]));
        assert!(log.contains(&format!("sharding \"optimizer\" over {n} rank(s): each rank keeps the optimizer state of at most")), "{log}");
        assert_eq!(weights(&none, 0), weights(&zero1, 0), "{name}: ZeRO-1 on {n} ranks differs from unsharded");
    }
}

/// `[run] sharding = "gradients"` (ZeRO-2): each micro-batch's gradients are reduce-scattered into the ranks'
/// shards and released. The summed gradient is "none"'s (bitwise with one micro-batch per rank on 2 ranks), but
/// the clipping norm comes from the shards' sums of squares, so the weights agree within a few float32 ulp —
/// stated bound 1e-6 (the weights are of order 1) — for SFT with 1 and 2 micro-batches per rank, DPO and GRPO
/// (whose ranks can run different numbers of micro-batches: the short one reduces zeros). Killed and resumed,
/// a ZeRO-2 run ends bit-identical to its uninterrupted self; resumed unsharded it stays within the bound.
#[test]
fn gradient_sharding_matches_unsharded_within_float_rounding_and_resumes_bitwise() {
    let root = tempfile::tempdir().unwrap();
    let grads = ["--set", "run.sharding=\"gradients\""];
    // with activation checkpointing each layer's gradients are reduced during the backward (the model's hook)
    let ck = Some("stage.0.gradient_checkpointing=true");
    for (name, body, extra) in [
        ("sft", SFT, None),
        ("sft-accum2", SFT, Some("stage.0.grad_accum=2")),
        ("sft-checkpointing", SFT, ck),
        ("dpo", DPO, None),
        ("dpo-checkpointing", DPO, ck),
        ("grpo", GRPO, None),
        ("grpo-checkpointing", GRPO, ck),
    ] {
        let none = setup(root.path(), &format!("none-{name}"), body);
        let zero2 = setup(root.path(), &format!("zero2-{name}"), body);
        let mut args: Vec<&str> = vec![];
        if let Some(e) = extra {
            args.extend(["--set", e]);
        }
        ok(&train(&none, Some(2), &args, &[]));
        args.extend(grads);
        let log = ok(&train(&zero2, Some(2), &args, &[]));
        assert!(log.contains("sharding \"gradients\" over 2 rank(s)"), "{log}");
        let d = max_weight_diff(&none, &zero2);
        assert!(d < 1e-6, "{name}: ZeRO-2 differs from unsharded by {d}");
        // the logged gradient norms (the shards' on ZeRO-2) agree to float rounding
        let norms = |d: &Path| -> Vec<f64> { common::metrics(d).iter().filter_map(|m| m["grad_norm"].as_f64()).collect() };
        let (a, b) = (norms(&none), norms(&zero2));
        assert!(!a.is_empty() && a.len() == b.len(), "{name}: {a:?} vs {b:?}");
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * x.abs()), "{name}: grad norms {a:?} vs {b:?}");
    }
    let kill = [("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "0")];
    let zero2 = root.path().join("zero2-sft");
    for (name, then) in [("again", &grads[..]), ("unsharded", &[][..])] {
        let d = setup(root.path(), name, SFT);
        assert!(!train(&d, Some(2), &grads, &kill).status.success());
        let log = ok(&train(&d, Some(2), then, &[]));
        assert!(log.contains("resumed at step 3/6"), "{log}");
        let diff = max_weight_diff(&zero2, &d);
        if name == "again" {
            assert_eq!(weights(&zero2, 0), weights(&d, 0), "a resumed ZeRO-2 run differs from the uninterrupted one");
        } else {
            assert!(diff < 1e-6, "ZeRO-2 resumed unsharded differs by {diff}");
        }
    }
}

/// `[run] sharding = "full"` (ZeRO-3): the trained weights live in each rank's blocks; a decoder layer is
/// gathered around its forward and its backward (the model's layer hook, under activation checkpointing), the
/// embedding and head for the step's training passes, everything for sampling, log-probabilities without
/// gradients and checkpoints. The arithmetic is ZeRO-2's, so the weights are ZeRO-2's bit for bit — for SFT on
/// 2 and 4 ranks, DPO (its reference pass on gathered weights) and GRPO (sampling, the KL reference's copy, μ =
/// 2) — and a killed ZeRO-3 run resumes to its uninterrupted self, or unsharded within float rounding.
#[test]
fn full_sharding_equals_gradient_sharding_bitwise_and_resumes() {
    let root = tempfile::tempdir().unwrap();
    let ck = ["--set", "stage.0.gradient_checkpointing=true"];
    let mode = |m: &str| format!("run.sharding=\"{m}\"");
    for (name, body, n) in [("sft", SFT, 2), ("sft4", SFT, 4), ("dpo", DPO, 2), ("grpo", GRPO, 2)] {
        let (zero2, zero3) = (setup(root.path(), &format!("zero2-{name}"), body), setup(root.path(), &format!("zero3-{name}"), body));
        let (m2, m3) = (mode("gradients"), mode("full"));
        ok(&train(&zero2, Some(n), &[&ck[..], &["--set", &m2]].concat(), &[]));
        let log = ok(&train(&zero3, Some(n), &[&ck[..], &["--set", &m3]].concat(), &[]));
        assert!(log.contains(&format!("sharding \"full\" over {n} rank(s)")), "{log}");
        assert!(log.contains(&format!("replicas identical on {n} ranks")), "{log}");
        assert_eq!(weights(&zero2, 0), weights(&zero3, 0), "{name}: ZeRO-3 differs from ZeRO-2");
        if name == "sft4" {
            // and on 4 ranks both stay within float rounding of unsharded
            let none = setup(root.path(), "none-sft4", body);
            ok(&train(&none, Some(n), &ck, &[]));
            let d = max_weight_diff(&none, &zero3);
            assert!(d < 1e-6, "ZeRO-3 on 4 ranks differs from unsharded by {d}");
        }
    }
    // two stages (SFT, then DPO on the SFT weights): the second lays out weights the first left sharded
    let two_stages = format!("{SFT}\n{}", &DPO[DPO.find("[[stage]]").unwrap()..]);
    let (a, b) = (setup(root.path(), "two-zero2", &two_stages), setup(root.path(), "two-zero3", &two_stages));
    let both_ck = ["--set", "stage.0.gradient_checkpointing=true", "--set", "stage.1.gradient_checkpointing=true"];
    ok(&train(&a, Some(2), &[&both_ck[..], &["--set", &mode("gradients")]].concat(), &[]));
    ok(&train(&b, Some(2), &[&both_ck[..], &["--set", &mode("full")]].concat(), &[]));
    assert_eq!(weights(&a, 1), weights(&b, 1), "SFT → DPO: ZeRO-3 differs from ZeRO-2");
    let m3 = mode("full");
    let args = [&ck[..], &["--set", &m3]].concat();
    let kill = [("WHET_TEST_KILL", "step:0:4"), ("WHET_TEST_KILL_RANK", "1")];
    let d = setup(root.path(), "resumed", SFT);
    assert!(!train(&d, Some(2), &args, &kill).status.success());
    let log = ok(&train(&d, Some(2), &args, &[]));
    assert!(log.contains("resumed at step 3/6"), "{log}");
    assert_eq!(weights(&root.path().join("zero3-sft"), 0), weights(&d, 0), "a resumed ZeRO-3 run differs from the uninterrupted one");
    let e = setup(root.path(), "unsharded", SFT);
    assert!(!train(&e, Some(2), &args, &kill).status.success());
    ok(&train(&e, None, &ck, &[]));
    let diff = max_weight_diff(&root.path().join("zero3-sft"), &e);
    assert!(diff < 1e-6, "ZeRO-3 resumed unsharded differs by {diff}");
    // without activation checkpointing there is no layer boundary to gather at: refused in one line
    let f = setup(root.path(), "no-ck", SFT);
    let o = train(&f, Some(2), &["--set", &m3], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("[run] sharding = \"full\" gathers one decoder layer at a time") && err.contains("gradient_checkpointing = true"), "{err}");
}
