//! End-to-end: the `train` binary starts, logs its runtime line first, and the smoke run passes.

use std::process::Command;

#[test]
fn train_smoke_runs_and_logs_runtime_first() {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--device", "cpu", "--threads", "1", "smoke", "--tokens", "8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.contains("libtorch 2.11.0") && first.contains("device cpu") && first.contains("1 intra-op thread"), "{first}");
    assert!(stdout.contains("smoke OK"), "{stdout}");
}

#[test]
fn bad_arguments_give_one_line_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(["--device", "tpu", "smoke"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown device \"tpu\""), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(["convert", "gguf", "/nonexistent.gguf", "/tmp/x"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent.gguf"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{stderr}");
}
