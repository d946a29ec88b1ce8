//! Memory and precision end to end. Activation checkpointing: `gradient_checkpointing = true` trains to the
//! same losses and gradient norms as the full graph on a packed 2048-token row, with a lower peak resident
//! memory (the child's ru_maxrss from wait4). Mixed precision: `mixed_precision = "bf16"` on the CPU trains
//! with bfloat16 autocast (losses close to fp32's but not identical), keeps fp32 weights, and combines with
//! checkpointing.

mod common;

use std::process::Command;

const RECIPE: &str = r#"
[model]
config = { model_type = "llama", vocab_size = 260, hidden_size = 128, intermediate_size = 256, num_hidden_layers = 6, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 2048, tie_word_embeddings = true }
init_seed = 7
tokenizer = "builtin:bytes"
device = "cpu"

[run]
seed = 3
threads = 1
log_every = 1

[[stage]]
kind = "sft"
synthetic = { count = 60, arithmetic = { seed = 5 } }
tokenize = { max_length = 2048 }
packing = true
max_steps = 2
batch_size = 1
lr = 1e-4
"#;

/// Runs `train` with `--set` overrides and returns its exit status, peak RSS in KiB and stderr.
fn train_rss(dir: &std::path::Path, sets: &[String]) -> (bool, i64, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--recipe"])
        .arg(dir.join("recipe.toml"))
        .args(["--output"])
        .arg(dir.join("out"))
        .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.unwrap(), &mut stderr).unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waiting for our own child with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, usage.ru_maxrss, stderr)
}

#[test]
fn checkpointing_trains_the_same_in_less_memory() {
    let root = tempfile::tempdir().unwrap();
    let mut runs = vec![];
    for on in [false, true] {
        let d = common::setup(root.path(), &format!("gc-{on}"), RECIPE);
        let (ok, rss, stderr) = train_rss(&d, &[format!("stage.0.gradient_checkpointing={on}")]);
        assert!(ok, "{stderr}");
        runs.push((common::metrics(&d), rss));
    }
    let ((full, rss_full), (ck, rss_ck)) = (&runs[0], &runs[1]);
    assert_eq!(full.len(), ck.len());
    for (a, b) in full.iter().zip(ck) {
        for k in ["loss", "grad_norm"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{k}: {x} without checkpointing, {y} with");
        }
    }
    // measured: about 450 MB without, 280 MB with
    assert!((*rss_ck as f64) < 0.8 * *rss_full as f64, "peak RSS {rss_ck} KiB with checkpointing, {rss_full} KiB without");
}

/// The dtype of every tensor in a safetensors file (its JSON header).
fn safetensors_dtypes(path: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header.as_object().unwrap().iter().filter(|(k, _)| *k != "__metadata__").map(|(_, v)| v["dtype"].as_str().unwrap().to_string()).collect()
}

#[test]
fn bf16_autocast_trains_close_to_fp32_with_fp32_weights() {
    let root = tempfile::tempdir().unwrap();
    let small = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=3", "stage.0.tokenize.max_length=256", "stage.0.max_steps=8", "stage.0.lr=1e-3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut losses = vec![];
    for (name, extra) in [("fp32", vec![]), ("bf16", vec!["model.mixed_precision=\"bf16\""]), ("bf16-ck", vec!["model.mixed_precision=\"bf16\"", "stage.0.gradient_checkpointing=true"])] {
        let d = common::setup(root.path(), name, RECIPE);
        let (ok, _, stderr) = train_rss(&d, &small(&extra));
        assert!(ok, "{name}: {stderr}");
        assert_eq!(stderr.contains("BFloat16 autocast"), name != "fp32", "{name}: {stderr}");
        let l: Vec<f64> = common::metrics(&d).iter().filter_map(|m| m["loss"].as_f64()).collect();
        assert_eq!(l.len(), 8, "{name}");
        assert!(l.iter().all(|x| x.is_finite()), "{name}: {l:?}");
        assert!(safetensors_dtypes(&d.join("out/checkpoints/s00-final/model/model.safetensors")).iter().all(|t| t == "F32"), "{name}: master weights are not fp32");
        losses.push(l);
    }
    let (fp32, bf16, bf16_ck) = (&losses[0], &losses[1], &losses[2]);
    assert!(fp32 != bf16, "bf16 autocast gave fp32's exact losses: it did not take effect");
    for (i, (a, b)) in fp32.iter().zip(bf16).enumerate() {
        assert!((a - b).abs() <= 0.02 * a.abs(), "step {}: fp32 loss {a}, bf16 {b}", i + 1);
    }
    for (a, b) in bf16.iter().zip(bf16_ck) {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "bf16 with checkpointing {b}, without {a}");
    }
}
