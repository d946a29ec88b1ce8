//! GGUF import against the reference `gguf` Python package (fixture from scripts/fixtures/make_gguf_fixture.py)
//! and, when the real SmolLM2-135M-Instruct GGUF is cached, against transformers' golden logits.

use model::gguf::{convert_to_hf, GgufFile};
use model::{Batch, Model};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, IndexOp, Kind, Tensor};

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

#[test]
fn every_ggml_type_dequantises_like_the_reference_and_unpermutes_qk() {
    model::runtime::preload_cuda();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    convert_to_hf(&fixture("gguf/tiny-llama.gguf"), &out).unwrap();
    let m = Model::load(&out, None, Device::Cpu).unwrap();
    let want: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture("gguf/expected.safetensors")).unwrap().into_iter().collect();
    assert_eq!(want.len(), m.net.params.len());
    for (name, got) in m.net.params.iter() {
        let w = &want[name];
        assert_eq!(got.size(), w.size(), "{name}");
        assert!(got.equal(w), "{name}: dequantised values differ from the gguf package's");
    }
    // the types really were mixed
    let g = GgufFile::open(&fixture("gguf/tiny-llama.gguf")).unwrap();
    let mut types: Vec<u32> = g.tensors.iter().map(|t| t.type_id).collect();
    types.sort();
    types.dedup();
    assert_eq!(types, vec![0, 1, 2, 3, 8, 30]);
    // tokenizer files were written and load
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("<|im_start|>abc", false).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert!(cfg["chat_template"].as_str().unwrap().contains("im_start"));
}

#[test]
fn bad_gguf_files_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.gguf");
    std::fs::write(&p, b"NOPE").unwrap();
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
    let full = std::fs::read(fixture("gguf/tiny-llama.gguf")).unwrap();
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("truncated") && e.contains("x.gguf"), "{e}");
}

/// Where scripts/fetch-smollm2.sh caches the real SmolLM2-135M-Instruct.
fn whet_cache() -> PathBuf {
    if let Ok(c) = std::env::var("WHET_CACHE") {
        return PathBuf::from(c);
    }
    let base = std::env::var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
    base.join("whet")
}

#[test]
fn real_smollm2_reproduces_transformers_logits_and_greedy_text() {
    model::runtime::preload_cuda();
    let gguf = whet_cache().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        let msg = format!("SKIPPED real-weights parity: {} not found (run scripts/fetch-smollm2.sh)", gguf.display());
        if std::env::var("WHET_REQUIRE_SMOLLM2").is_ok() {
            panic!("{msg}");
        }
        eprintln!("{msg}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2");
    convert_to_hf(&gguf, &dir).unwrap();
    // Golden values: ../shared/notes/offline-assets.md §A1 (transformers 5.24, f32 weights from this GGUF).
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompt = "<|im_start|>user\nWhat is 23 + 14?<|im_end|>\n<|im_start|>assistant\n";
    let ids: Vec<i64> = tok.encode(prompt, false).unwrap().get_ids().iter().map(|&x| x as i64).collect();
    assert_eq!(ids, vec![1, 4093, 198, 1780, 314, 216, 34, 35, 1232, 216, 33, 36, 47, 2, 198, 1, 520, 9531, 198]);
    let m = Model::load(&dir, Some(Kind::Float), Device::Cpu).unwrap();
    let mut seq = ids.clone();
    let mut first_logits = None;
    tch::no_grad(|| {
        for _ in 0..12 {
            let input = Tensor::from_slice(&seq).unsqueeze(0);
            let logits = m.net.forward(&Batch::causal(&input));
            let last = logits.i((0, -1));
            if first_logits.is_none() {
                first_logits = Some(last.copy());
            }
            seq.push(last.argmax(0, false).int64_value(&[]));
        }
    });
    let last = first_logits.unwrap();
    let (vals, idx) = last.topk(5, 0, true, true);
    let idx: Vec<i64> = Vec::try_from(&idx).unwrap();
    let vals: Vec<f32> = Vec::try_from(&vals).unwrap();
    assert_eq!(idx, vec![2068, 34, 504, 10345, 49]);
    let golden = [35.0642f32, 34.3448, 33.6759, 33.4772, 33.1156];
    let worst = vals.iter().zip(golden).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("smollm2 real weights: top-5 logits max |diff| vs transformers = {worst:.2e}");
    assert!(worst < 2e-3, "top-5 logits {vals:?} vs {golden:?}");
    assert_eq!(&seq[ids.len()..], &[2068, 1042, 216, 34, 35, 1232, 216, 33, 36, 28, 392, 416]);
    let text = tok.decode(&seq[ids.len()..].iter().map(|&x| x as u32).collect::<Vec<_>>(), true).unwrap();
    assert_eq!(text, "To find 23 + 14, we can");
}
