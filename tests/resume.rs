//! Exact resume: runs killed with SIGKILL at many points — just after a checkpoint, in the middle of
//! writing one, exactly at an epoch boundary, between checkpoints, at a stage boundary, in a later stage —
//! and resumed with `--resume auto` end with weights bit-identical to an uninterrupted run (CPU).

mod common;

use common::train;
use std::path::{Path, PathBuf};

/// The `[run]` and `[[stage]]` tables after [`common::TINY_MODEL`].
const REST: &str = r#"

[run]
seed = 3
threads = 1
log_every = 1
save_every = 3
keep_last = 10

# 24 conversations, 4 per step: an epoch every 6 steps, so the step-6 checkpoint sits on the boundary.
[[stage]]
kind = "sft"
name = "first"
synthetic = { count = 24, arithmetic = { seed = 5 } }
tokenize = { max_length = 96 }
max_steps = 12
batch_size = 2
grad_accum = 2
lr = 2e-3
warmup_steps = 2
weight_decay = 0.1

[[stage]]
kind = "sft"
name = "second"
synthetic = { count = 30, start = 100, arithmetic = { seed = 5 } }
tokenize = { max_length = 200 }
packing = true
max_steps = 6
batch_size = 2
lr = 1e-3
"#;

fn recipe() -> String {
    common::tiny_recipe(REST)
}

fn final_weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("out/checkpoints/s01-final/model/model.safetensors")).unwrap()
}

fn setup(root: &Path, name: &str) -> PathBuf {
    common::setup(root, name, &recipe())
}

#[test]
fn killed_runs_resume_bit_identically() {
    let root = tempfile::tempdir().unwrap();
    let reference = setup(root.path(), "reference");
    let out = train(&reference, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = final_weights(&reference);

    // Each scenario: kill points in order (each run dies at its point), then a final run that completes.
    let scenarios: &[&[&str]] = &[
        &["after-ckpt:0:3"],           // just after a checkpoint
        &["ckpt-write:0:6"],           // in the middle of writing the epoch-boundary checkpoint
        &["after-ckpt:0:6"],           // exactly at the epoch boundary
        &["step:0:8"],                 // between checkpoints (steps 7-8 are redone)
        &["after-final:0"],            // at the stage boundary
        &["step:1:4"],                 // in the second (packed) stage
        &["after-ckpt:0:3", "ckpt-write:0:9", "step:1:2"], // several crashes in one job
    ];
    for (i, kills) in scenarios.iter().enumerate() {
        let d = setup(root.path(), &format!("s{i}"));
        for k in kills.iter() {
            let out = train(&d, Some(k));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{k}: the run was not killed\n{stderr}");
            assert!(stderr.contains(&format!("killing at {k}")), "{k}: never reached the kill point\n{stderr}");
        }
        let out = train(&d, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kills:?}: resume failed\n{stderr}");
        // it continued from a checkpoint: mid-stage, or past the finished first stage
        assert!(stderr.contains("resumed at step") || !stderr.contains("[first]"), "{kills:?}: started over\n{stderr}");
        assert!(final_weights(&d) == want, "{kills:?}: final weights differ from the uninterrupted run");
        // no temporary checkpoint directory is left behind
        let leftovers: Vec<_> = std::fs::read_dir(d.join("out/checkpoints")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-")).collect();
        assert!(leftovers.is_empty());
    }
}

#[test]
fn resuming_a_changed_recipe_is_refused_unless_forced() {
    let root = tempfile::tempdir().unwrap();
    let d = setup(root.path(), "changed");
    let out = train(&d, Some("after-ckpt:0:3"));
    assert!(!out.status.success());
    // a harmless change (logging) is fine; a learning-rate change is not
    std::fs::write(d.join("recipe.toml"), recipe().replace("lr = 2e-3", "lr = 5e-3")).unwrap();
    let out = train(&d, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("different recipe") && stderr.contains("stage.0.lr"), "{stderr}");
    std::fs::write(d.join("recipe.toml"), recipe().replace("log_every = 1", "log_every = 5")).unwrap();
    let out = train(&d, Some("step:0:5"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resumed at step 3") && stderr.contains("killing at step:0:5"), "{stderr}");
}

/// Every precision mode resumes bit-identically: bf16 weights with fp32 master weights (its master copy is
/// checkpointed), Kahan compensation (its buffer is checkpointed), stochastic rounding (its random bits are a
/// function of the seed, step and parameter) and direct rounding, and bf16 AdamW moments.
#[test]
fn killed_bf16_runs_resume_bit_identically_in_every_precision_mode() {
    let root = tempfile::tempdir().unwrap();
    let modes = [
        "dtype = \"bfloat16\"\n",
        "dtype = \"bfloat16\"\nweight_update = \"kahan\"\n",
        "dtype = \"bfloat16\"\nweight_update = \"stochastic_rounding\"\noptimizer_dtype = \"bfloat16\"\n",
        "dtype = \"bfloat16\"\nweight_update = \"direct\"\n",
    ];
    for (m, extra) in modes.iter().enumerate() {
        let recipe = format!("{}{extra}{REST}", common::TINY_MODEL);
        let reference = common::setup(root.path(), &format!("ref{m}"), &recipe);
        let out = train(&reference, None);
        assert!(out.status.success(), "{extra}: {}", String::from_utf8_lossy(&out.stderr));
        let want = final_weights(&reference);
        for (i, kills) in [&["step:0:8"][..], &["ckpt-write:0:6", "step:1:4"][..]].iter().enumerate() {
            let d = common::setup(root.path(), &format!("m{m}-s{i}"), &recipe);
            for k in kills.iter() {
                let out = train(&d, Some(k));
                assert!(!out.status.success(), "{extra}{k}: the run was not killed");
            }
            let out = train(&d, None);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && stderr.contains("resumed at step"), "{extra}{kills:?}: resume failed\n{stderr}");
            assert!(!stderr.contains("starting it from the weights"), "{extra}{kills:?}: precision state not restored\n{stderr}");
            assert!(final_weights(&d) == want, "{extra}{kills:?}: final weights differ from the uninterrupted run");
        }
    }
}

/// `--resume auto` passes over a damaged newest checkpoint (optimizer state deleted, model file truncated,
/// state.json corrupt) with a warning naming it, resumes from the newest intact one, and still ends
/// bit-identical to the uninterrupted run.
#[test]
fn resume_falls_back_past_a_damaged_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let reference = setup(root.path(), "reference");
    assert!(train(&reference, None).status.success());
    let want = final_weights(&reference);
    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 3] = [
        ("optimizer.safetensors", |c| std::fs::remove_file(c.join("optimizer.safetensors")).unwrap()),
        ("model/model.safetensors", |c| {
            let f = c.join("model/model.safetensors");
            let len = std::fs::metadata(&f).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
        }),
        ("state.json", |c| std::fs::write(c.join("state.json"), "{\"stage\": 0, \"ste").unwrap()),
    ];
    for (i, (what, damage)) in damages.iter().enumerate() {
        let d = setup(root.path(), &format!("damaged{i}"));
        assert!(!train(&d, Some("step:0:8")).status.success());
        let newest = d.join("out/checkpoints/s00-step0000006");
        damage(&newest);
        let out = train(&d, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        let warning = stderr.lines().find(|l| l.starts_with("warning: checkpoint") && l.contains("s00-step0000006 is damaged")).unwrap_or_else(|| panic!("{what}: no warning\n{stderr}"));
        assert!(warning.contains(what.split('/').next_back().unwrap()), "{what}: {warning}");
        assert!(stderr.contains("resumed at step 3/12"), "{what}: {stderr}");
        assert!(final_weights(&d) == want, "{what}: final weights differ from the uninterrupted run");
    }
}
