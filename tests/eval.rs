//! End-to-end: `train eval` on a tiny fixture model (the model crate's qwen2 fixture plus a byte-level
//! tokenizer written here) and a small generated GSM8K-style file; its JSONL and summary are well-formed.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// GPT-2's byte-to-character table: byte b is vocabulary entry b.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// A model directory: the qwen2 fixture (vocabulary 256) with a byte-level tokenizer and a chat template.
fn model_dir(root: &Path) -> PathBuf {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/qwen2");
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, Value> = byte_chars().iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
    let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": bl, "post_processor": null, "decoder": bl,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = json!({
        "eos_token": "~",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("whet-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn eval_writes_per_problem_jsonl_and_a_summary() {
    let root = scratch("ok");
    let model = model_dir(&root);
    let data = root.join("problems.jsonl");
    let rows: Vec<String> = (0..3)
        .map(|i| json!({"question": format!("What is {i} + {}?", i + 2), "answer": format!("{i} + {} = {}\n#### {}", i + 2, 2 * i + 2, 2 * i + 2)}).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let out = root.join("out/eval.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--device", "cpu", "--threads", "1", "eval", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--samples", "3", "--seeds", "2", "--temperature", "1.0", "--top-p", "0.9", "--max-tokens", "12", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("answer format Gsm8k") && stderr.contains("prompt column question"), "{stderr}");
    let lines: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6, "3 problems x 2 seeds");
    for (j, l) in lines.iter().enumerate() {
        assert_eq!(l["seed"], json!(j / 3));
        assert_eq!(l["index"], json!(j % 3));
        assert_eq!(l["gold"], json!((2 * (j % 3) + 2).to_string()));
        let samples = l["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 3);
        let c = samples.iter().filter(|s| s["correct"] == json!(true)).count();
        assert_eq!(l["correct"], json!(c));
        assert!((l["pass@1"].as_f64().unwrap() - c as f64 / 3.0).abs() < 1e-12);
        assert_eq!(l["pass@3"], json!(if c > 0 { 1.0 } else { 0.0 }));
        assert!(l["maj@3"].is_boolean());
        for s in samples {
            let n = s["completion_tokens"].as_u64().unwrap();
            assert!((1..=12).contains(&n));
            assert!(s["text"].is_string());
            assert!(["stop", "length"].contains(&s["finish_reason"].as_str().unwrap()));
            if s["finish_reason"] == json!("length") {
                assert_eq!(n, 12);
            }
        }
    }
    // the two seeds sample differently
    assert_ne!(lines[0]["samples"], lines[3]["samples"]);
    let summary: Value = serde_json::from_str(String::from_utf8_lossy(&run.stdout).trim()).unwrap();
    assert_eq!(summary["problems"], json!(3));
    for key in ["pass@1", "pass@3", "maj@3"] {
        let m = summary[key]["mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&m) && summary[key]["std"].as_f64().unwrap() >= 0.0);
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn eval_reports_bad_input_in_one_line() {
    let root = scratch("bad");
    let model = model_dir(&root);
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_train")).args(["--device", "cpu", "eval", "--model"]).arg(&model).args(extra).output().unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let e = run(&["--data", "/nonexistent/x.jsonl", "--prompt-column", "q"]);
    assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    let data = root.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hi\", \"answer\": \"1\"}\n").unwrap();
    let e = run(&["--data", data.to_str().unwrap()]);
    assert!(e.contains("--prompt-column"), "{e}");
    std::fs::write(&data, "{\"problem\": \"hi\", \"answer\": \"1\"}\n").unwrap();
    let e = run(&["--data", data.to_str().unwrap(), "--top-p", "0"]);
    assert!(e.contains("top_p"), "{e}");
    let e = run(&["--data", data.to_str().unwrap(), "--answer-format", "latex"]);
    assert!(e.contains("--answer-format"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}
