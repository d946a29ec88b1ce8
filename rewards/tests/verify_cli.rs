//! The `verify` command line (library entry point and binary).

use rewards::run_verify_cli;

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("whet-verify-{}-{name}", std::process::id()))
}

#[test]
fn writes_one_verdict_per_line() {
    let input = tmp("in.jsonl");
    let output = tmp("out.jsonl");
    std::fs::write(&input, "{\"id\": \"a\", \"gold\": \"#### 1,080\", \"pred\": \"so \\\\boxed{1080}\", \"expected\": true}\n\n{\"gold\": \"\\\\frac{1}{3}\", \"pred\": \"0.333\"}\n{\"gold\": 18, \"pred\": \"The answer is 18.\"}\n").unwrap();
    run_verify_cli(["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--summary"].map(String::from)).unwrap();
    let out = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["id"], "a");
    assert_eq!(lines[0]["equivalent"], true);
    assert_eq!(lines[0]["agrees"], true);
    assert_eq!(lines[0]["gold_extracted"], "1,080");
    assert_eq!(lines[0]["pred_normalized"], "1080");
    assert_eq!(lines[1]["line"], 3);
    assert_eq!(lines[1]["equivalent"], false);
    assert_eq!(lines[2]["equivalent"], true);
    // With rounding to 3 decimals, 0.333 is accepted for 1/3.
    run_verify_cli(["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--float-rounding", "3"].map(String::from)).unwrap();
    let out = std::fs::read_to_string(&output).unwrap();
    let second: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
    assert_eq!(second["equivalent"], true);
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
}

#[test]
fn errors_name_file_line_and_key() {
    let input = tmp("bad.jsonl");
    std::fs::write(&input, "{\"gold\": \"1\", \"pred\": \"1\"}\n{\"gold\": \"1\", \"prediction\": \"1\"}\n").unwrap();
    let e = format!("{:#}", run_verify_cli(["--input", input.to_str().unwrap()].map(String::from)).unwrap_err());
    assert!(e.contains("bad.jsonl:2") && e.contains("\"pred\""), "{e}");
    std::fs::write(&input, "{\"gold\": \"1\", \"pred\": \"1\"}\nnot json\n").unwrap();
    let e = format!("{:#}", run_verify_cli(["--input", input.to_str().unwrap()].map(String::from)).unwrap_err());
    assert!(e.contains("bad.jsonl:2") && e.contains("not valid JSON"), "{e}");
    let e = format!("{:#}", run_verify_cli(["--input", "/nonexistent/x.jsonl"].map(String::from)).unwrap_err());
    assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    let e = format!("{:#}", run_verify_cli(["--bogus"].map(String::from)).unwrap_err());
    assert!(e.contains("--bogus"), "{e}");
    let _ = std::fs::remove_file(&input);
}

#[test]
fn binary_runs_on_peer_cases() {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/peers/math-verify/cases.jsonl");
    if !std::path::Path::new(cases).exists() {
        eprintln!("SKIP: {cases} not found (../shared absent)");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verify")).args(["--input", cases, "--summary"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 286);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("286 rows"), "{err}");
}
