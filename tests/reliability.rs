//! Reliability under bad numerics and moved outputs (issue 15): a non-finite gradient never reaches the
//! weights and no checkpoint holds a non-finite weight; `[run] nonfinite = "stop"` ends the run in one line;
//! a moved output directory still resumes.

mod common;

use std::path::Path;
use tch::Tensor;

const NAN_RECIPE: &str = r#"
[model]
config = { model_type = "llama", vocab_size = 260, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, max_position_embeddings = 256 }
tokenizer = "builtin:bytes"
device = "cpu"

[run]
seed = 1
threads = 1
log_every = 1
save_every = 2

[[stage]]
kind = "sft"
synthetic = { count = 100 }
tokenize = { max_length = 64 }
max_steps = 8
batch_size = 8
lr = 1e30
"#;

/// Every checkpoint's weights are finite.
fn assert_checkpoints_finite(out: &Path) {
    let mut n = 0;
    for e in std::fs::read_dir(out.join("checkpoints")).unwrap().flatten() {
        let f = e.path().join("model/model.safetensors");
        if !f.exists() {
            continue;
        }
        for (name, t) in Tensor::read_safetensors(&f).unwrap() {
            let bad = t.isfinite().logical_not().sum(tch::Kind::Int64).int64_value(&[]);
            assert_eq!(bad, 0, "{}: {bad} non-finite values in {name}", f.display());
        }
        n += 1;
    }
    assert!(n > 0, "no checkpoint written in {}", out.display());
}

#[test]
fn a_non_finite_gradient_never_reaches_the_weights() {
    let root = tempfile::tempdir().unwrap();
    let d = common::setup(root.path(), "skip", NAN_RECIPE);
    let out = common::train(&d, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // lr 1e30 blows the weights up at step 1; from then on the gradients are NaN and every step is skipped
    assert!(stderr.contains("step skipped, weights unchanged (1 skipped so far)"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_checkpoints_finite(&d.join("out"));
    // and a resume from those checkpoints works
    let out = common::train(&d, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // "stop": one line, exit status 1, the checkpoints written so far are intact
    let d = common::setup(root.path(), "stop", &NAN_RECIPE.replace("save_every = 2", "save_every = 1\nnonfinite = \"stop\""));
    let out = common::train(&d, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("error: [sft0] the gradient norm is NaN at step 2: stopped ([run] nonfinite = \"stop\")"), "{stderr}");
    assert_checkpoints_finite(&d.join("out"));
}

#[test]
fn a_moved_output_directory_resumes() {
    let root = tempfile::tempdir().unwrap();
    let recipe = NAN_RECIPE.replace("lr = 1e30", "lr = 1e-3");
    let d = common::setup(root.path(), "first", &recipe);
    let out = common::train(&d, Some("after-ckpt:0:4"));
    assert!(!out.status.success());
    // the whole directory moves (recipe and outputs); --output names the new place
    let moved = root.path().join("moved");
    std::fs::rename(&d, &moved).unwrap();
    let out = common::train(&moved, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("resumed at step 4/8"), "{stderr}");
}

#[test]
fn starting_over_keeps_the_previous_runs_metrics() {
    let root = tempfile::tempdir().unwrap();
    let recipe = NAN_RECIPE.replace("lr = 1e30", "lr = 1e-3").replace("max_steps = 8", "max_steps = 2");
    let d = common::setup(root.path(), "again", &recipe);
    assert!(common::train(&d, None).status.success());
    let first = std::fs::read_to_string(d.join("out/metrics.jsonl")).unwrap();
    // a fresh start that then fails on its data: nothing of the first run is lost
    std::fs::write(d.join("empty.jsonl"), "").unwrap();
    std::fs::write(d.join("recipe.toml"), recipe.replace("synthetic = { count = 100 }", "data = { path = \"empty.jsonl\", messages = \"messages\" }")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--recipe")
        .arg(d.join("recipe.toml"))
        .arg("--output")
        .arg(d.join("out"))
        .args(["--resume", "never"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.lines().last().unwrap().contains("the file is empty"), "{stderr}");
    assert_eq!(std::fs::read_to_string(d.join("out/metrics.jsonl.1")).unwrap(), first);
    assert!(d.join("out/checkpoints/s00-final/model/model.safetensors").exists());
}

/// `[model] path = "x.gguf"` on a fresh output directory: converted before its tokenizer is read; a truncated
/// file is reported as a GGUF problem, not as a missing tokenizer.
#[test]
fn a_gguf_model_path_works_from_a_fresh_directory() {
    let root = tempfile::tempdir().unwrap();
    let gguf = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/gguf/tiny-llama.gguf");
    let recipe = |p: &Path| {
        format!(
            "[model]\npath = \"{}\"\ndevice = \"cpu\"\n\n[run]\nthreads = 1\n\n[[stage]]\nkind = \"sft\"\nsynthetic = {{ count = 20 }}\ntokenize = {{ max_length = 64 }}\nmax_steps = 1\nbatch_size = 2\n",
            p.display()
        )
    };
    let d = common::setup(root.path(), "gguf", &recipe(&gguf));
    let out = common::train(&d, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.join("out/checkpoints/s00-final/model/tokenizer.json").exists());

    let bytes = std::fs::read(&gguf).unwrap();
    let cut = root.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let d = common::setup(root.path(), "cut", &recipe(&cut));
    let out = common::train(&d, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(!out.status.success() && last.contains("converting the GGUF file") && last.contains("truncated"), "{stderr}");
}

/// Rows over `max_length` are counted and reported, not dropped or cut silently.
#[test]
fn over_long_rows_are_counted_and_reported() {
    let root = tempfile::tempdir().unwrap();
    let recipe = NAN_RECIPE.replace("lr = 1e30", "lr = 1e-3").replace("max_steps = 8", "max_steps = 1").replace("max_length = 64", "max_length = 40");
    let run = |trunc: &str| {
        let d = common::setup(root.path(), trunc, &recipe.replace("tokenize = {", &format!("tokenize = {{ truncation = \"{trunc}\",")));
        let out = common::train(&d, None);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    // every synthetic conversation is longer than 40 byte tokens: "left" keeps each one's end (the answer)
    let (ok, stderr) = run("left");
    let line = stderr.lines().find(|l| l.contains("the synthetic conversations: of 100 records")).unwrap_or_else(|| panic!("no report:\n{stderr}"));
    assert!(ok && line.contains("100 truncated to max_length = 40 (truncation = \"left\"), 0 dropped"), "{stderr}");
    // "drop" leaves nothing: one line says why
    let (ok, stderr) = run("drop");
    let last = stderr.lines().last().unwrap();
    assert!(!ok && last.contains("no training examples (100 records read; 100 longer than max_length = 40"), "{stderr}");
}
