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

    // a GPU that is not there (cuda:7 on any machine this runs on): one line, not libtorch's C++ backtrace
    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(["--device", "cuda:7", "smoke"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("device cuda:7 requested, but this"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(["convert", "gguf", "/nonexistent.gguf", "/tmp/x"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent.gguf"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{stderr}");
}

#[test]
fn train_verify_judges_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cases.jsonl");
    std::fs::write(&input, "{\"gold\": \"#### 1,080\", \"pred\": \"so the total is \\\\boxed{1080}\"}\n{\"gold\": \"\\\\frac{1}{3}\", \"pred\": \"0.333\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_train")).args(["verify", "--input"]).arg(&input).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["equivalent"], true, "{:?}", lines[0]);
    assert_eq!(lines[1]["equivalent"], false, "{:?}", lines[1]);
}
