//! The committed corpus of bad recipes (tests/recipes/bad/*.toml): each must fail `--dry-run` with the
//! messages its `# expect:` lines name, as one report, without a panic. The shipped recipes must pass.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_bad_recipe_gets_its_expected_messages() {
    let dir = root().join("tests/recipes/bad");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expects: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expects.is_empty(), "{} has no # expect: line", path.display());
        // files that do not exist are only warnings under --dry-run (a recipe may name the user's files)
        let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
        c.arg("--recipe").arg(&path).current_dir(&dir);
        if !text.contains("# real run") {
            c.arg("--dry-run");
        }
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", path.display());
        assert!(!stderr.contains("panicked"), "{}: {stderr}", path.display());
        for x in expects {
            assert!(stderr.contains(x), "{}: expected {x:?} in:\n{stderr}", path.display());
        }
        n += 1;
    }
    assert!(n >= 10, "only {n} bad recipes");
}

#[test]
fn shipped_recipes_pass_dry_run_and_overrides_apply() {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--recipe")
        .arg(root().join("recipes/demo.toml"))
        .args(["--dry-run", "--set", "stage.0.lr=0.01", "--set", "run.seed=9"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("lr = 0.01") && stdout.contains("seed = 9"), "{stdout}");
    assert!(stdout.contains("# plan") && stdout.contains("M parameters"), "{stdout}");
    // an override naming an unknown key is reported like a typo in the file
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--recipe")
        .arg(root().join("recipes/demo.toml"))
        .args(["--dry-run", "--set", "stage.0.learning_rat=0.01"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("unknown key `learning_rat`"), "{stderr}");
}

#[test]
fn every_shipped_recipe_passes_dry_run() {
    for e in std::fs::read_dir(root().join("recipes")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_train")).arg("--recipe").arg(&path).arg("--dry-run").output().unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("# plan"), "{}", path.display());
    }
}

/// The Phi-4-Mini-Reasoning recipe runs every one of its four stages for a few steps with the model swapped for
/// a tiny random Phi-3-family model and the data files for small generated ones.
#[test]
fn phi4_mini_reasoning_recipe_runs_all_four_stages_on_a_tiny_phi3() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conv = |a: i64, b: i64| serde_json::json!({"messages": [{"role": "user", "content": format!("What is {a} + {b}?")}, {"role": "assistant", "content": format!("{a} + {b} = {}. The answer is {}.", a + b, a + b)}]});
    let lines = |v: Vec<serde_json::Value>| v.iter().map(|x| x.to_string() + "\n").collect::<String>();
    std::fs::write(d.join("mid.jsonl"), lines((0..12).map(|i| conv(i, i + 3)).collect())).unwrap();
    std::fs::write(d.join("sft.jsonl"), lines((0..8).map(|i| conv(i + 1, 2 * i)).collect())).unwrap();
    let teacher: Vec<serde_json::Value> = (0..6)
        .map(|i| serde_json::json!({"prompt": format!("What is {i} + 4?"), "answer": format!("{}", i + 4), "rollouts": [format!("{}", i + 4), format!("{}", i + 5), format!("{}", i + 4), "no idea"]}))
        .collect();
    std::fs::write(d.join("teacher.jsonl"), lines(teacher)).unwrap();
    std::fs::write(d.join("rl.jsonl"), lines((0..10).map(|i| serde_json::json!({"prompt": format!("What is {i} + 1?"), "answer": format!("{}", i + 1)})).collect())).unwrap();
    let p = |f: &str| d.join(f).display().to_string();
    let sets = [
        "model.path=\"\"".to_string(),
        "model.config={ model_type = \"phi3\", vocab_size = 320, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256, partial_rotary_factor = 0.75, tie_word_embeddings = true }".into(),
        "model.tokenizer=\"builtin:bytes\"".into(),
        "model.dtype=\"float32\"".into(),
        "model.device=\"cpu\"".into(),
        "run.threads=1".into(),
        "run.save_every=0".into(),
        format!("stage.0.data.path=\"{}\"", p("mid.jsonl")),
        format!("stage.1.data.path=\"{}\"", p("sft.jsonl")),
        format!("stage.2.teacher_rollouts=\"{}\"", p("teacher.jsonl")),
        format!("stage.3.data.path=\"{}\"", p("rl.jsonl")),
        format!("stage.3.eval.data.path=\"{}\"", p("rl.jsonl")),
        "stage.3.eval.data.prompt=\"prompt\"".into(),
        "stage.3.eval.max_new_tokens=6".into(),
        "stage.0.tokenize.max_length=96".into(),
        "stage.1.tokenize.max_length=96".into(),
        "stage.2.tokenize.max_length=96".into(),
        "stage.3.max_completion_length=6".into(),
        "stage.3.prompts_per_step=2".into(),
        "stage.3.num_generations=2".into(),
        "stage.3.oversample_generations=3".into(),
        "stage.3.micro_batch_size=4".into(),
        "stage.3.prefilter.samples=2".into(),
        "stage.3.prefilter.max_pass_rate=1.0".into(),
        "stage.3.prefilter.max_length_cv=100.0".into(),
    ];
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    c.arg("--recipe").arg(root().join("recipes/phi4-mini-reasoning.toml")).arg("--output").arg(d.join("out"));
    for s in &sets {
        c.args(["--set", s]);
    }
    for i in 0..4 {
        c.args(["--set", &format!("stage.{i}.max_steps=2")]);
        if i < 3 {
            c.args(["--set", &format!("stage.{i}.batch_size=2"), "--set", &format!("stage.{i}.grad_accum=1")]);
        }
    }
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for s in ["s00-final", "s01-final", "s02-final", "s03-final"] {
        assert!(d.join("out/checkpoints").join(s).join("model/config.json").is_file(), "{s} missing:\n{stderr}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("out/checkpoints/s03-final/model/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "phi3");
    // saved resolved (issue 16): transformers builds this model from the file alone, as whet computed it
    assert_eq!(cfg["architectures"], serde_json::json!(["Phi3ForCausalLM"]));
    assert_eq!(cfg["rms_norm_eps"], serde_json::json!(1e-5));
    assert_eq!(cfg["pad_token_id"], serde_json::Value::Null, "Phi-3's default padding id 32000 is past this vocabulary");
    assert_eq!(cfg["original_max_position_embeddings"], serde_json::json!(4096));
    let gen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("out/checkpoints/s03-final/model/generation_config.json")).unwrap()).unwrap();
    assert!(gen.get("eos_token_id").is_some_and(|e| !e.is_null()), "generate() would never stop: {gen}");
}

/// `[model] tokenizer` in another folder than `[model] path`: the checkpoint keeps the model's own
/// generation_config.json (its extra EOS ids and sampling defaults), merged with the tokenizer's ids (issue 16).
#[test]
fn checkpoints_keep_the_models_generation_config_when_the_tokenizer_lives_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let recipe = |model: &str| {
        format!(
            "[model]\n{model}\ndevice = \"cpu\"\n\n[run]\nthreads = 1\nsave_every = 0\n\n[[stage]]\nkind = \"sft\"\nsynthetic = {{ count = 40 }}\ntokenize = {{ max_length = 128 }}\nmax_steps = 2\nbatch_size = 4\nlr = 1e-3\n"
        )
    };
    let run = |dir: &std::path::Path, text: String| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("recipe.toml"), text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_train")).arg("--recipe").arg(dir.join("recipe.toml")).arg("--output").arg(dir.join("out")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir.join("out/checkpoints/s00-final/model")
    };
    // A base model: a tiny run's output, given a generation_config.json of its own.
    let first = run(&d.join("a"), recipe("config = { model_type = \"llama\", vocab_size = 260, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 1, num_attention_heads = 4 }\ntokenizer = \"builtin:bytes\""));
    let gen_of = |dir: &std::path::Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap()).unwrap() };
    assert!(gen_of(&first).get("eos_token_id").is_some_and(|e| !e.is_null()), "{}", gen_of(&first));
    let base = d.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(first.join(f), base.join(f)).unwrap();
    }
    std::fs::write(base.join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": [2, 257], "temperature": 0.6, "top_p": 0.95, "do_sample": true}"#).unwrap();
    let tok = d.join("a/out/tokenizer");
    assert!(tok.join("tokenizer.json").is_file() && !tok.join("generation_config.json").exists());
    let model = format!("path = \"{}\"\ntokenizer = \"{}\"", base.display(), tok.display());
    let second = run(&d.join("b"), recipe(&model));
    let g = gen_of(&second);
    for (k, v) in [("eos_token_id", serde_json::json!([2, 257])), ("temperature", serde_json::json!(0.6)), ("top_p", serde_json::json!(0.95)), ("do_sample", serde_json::json!(true))] {
        assert_eq!(g[k], v, "{k} lost: {g}");
    }
    assert!(g.get("pad_token_id").is_some(), "{g}");
}

/// The per-rank memory plan (issue 20): the Phi-4-mini recipe on 8 ranks × 80 GB, the model's shape read from a
/// config.json alone. The dry run does not launch workers; every stage fits with the training state sharded;
/// GRPO (sampling, KV cache) does not fit unsharded.
#[test]
fn dry_run_plans_memory_per_rank_for_the_phi4_recipe_on_8_ranks() {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--recipe")
        .arg(root().join("recipes/phi4-mini-reasoning.toml"))
        .args(["--dry-run", "--nproc-per-node", "8", "--gpu-memory", "80GB", "--model-config"])
        .arg(root().join("recipes/configs/phi4-mini-instruct-shape.json"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("# memory per rank\n8 rank(s), GB per rank"), "{text}");
    let rows = |mode: &str| -> Vec<String> { text.lines().filter(|l| l.starts_with(&format!("| {mode} "))).map(str::to_string).collect() };
    assert_eq!(rows("full").len(), 4, "{text}");
    for mode in ["optimizer", "gradients", "full"] {
        assert!(rows(mode).iter().all(|l| l.contains("| yes (")), "{mode}: {text}");
    }
    // the recipe's mode is ZeRO-2, marked, and fits every stage
    assert!(rows("gradients").iter().all(|l| l.starts_with("| gradients ← |")), "{text}");
    // unsharded, 16 B a parameter: 7.7 GB bf16 weights, 15.3 GB fp32 masters, 30.7 GB moments, and 128
    // accumulated micro-batches keep two bf16 gradients (the sum and the running one)
    assert!(rows("none")[0].starts_with("| none | 7.7 | 15.3 | 15.3 | 30.7 |"), "{text}");
    assert!(rows("none")[3].contains("| no ("), "{text}");
    // ZeRO-2 under activation checkpointing: a 1/8 shard of the gradient plus one layer's and the embedding's,
    // two layers' reduce-scatter buffers in flight and the reduction's buffer of the embedding's bucket
    assert!(rows("gradients")[0].starts_with("| gradients ← | 7.7 | 1.9 | 4.0 | 3.8 |"), "{text}");
    // ZeRO-3: 1/8 of the weights, two gathered layers (one prefetched) and the embedding group
    assert!(rows("full")[0].starts_with("| full | 2.6 | 1.9 | 4.0 | 3.8 |"), "{text}");
}
