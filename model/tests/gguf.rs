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

/// A GGUF (version 3) holding tokenizer metadata only, written the way llama.cpp's converter writes a byte-level
/// BPE tokenizer: tokens by id, token types (1 normal, 3 control, 4 user-defined), merges, `tokenizer.ggml.pre`.
mod gguf_writer {
    pub enum V {
        Str(String),
        U32(u32),
        Bool(bool),
        Strs(Vec<String>),
        I32s(Vec<i32>),
    }
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    pub fn write(path: &std::path::Path, kvs: &[(&str, V)]) {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes()); // tensors
        out.extend((kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            string(&mut out, k);
            match v {
                V::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                V::U32(x) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                V::Bool(b) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(*b as u8);
                }
                V::Strs(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for s in a {
                        string(&mut out, s);
                    }
                }
                V::I32s(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        out.extend(x.to_le_bytes());
                    }
                }
            }
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        std::fs::write(path, out).unwrap();
    }
}

/// The GGUF llama.cpp's converter would write for a real tokenizer.json, with `pre` as its pre-tokenizer name.
fn gguf_of_tokenizer(tokenizer_json: &std::path::Path, pre: &str, add_bos: bool, out: &std::path::Path) {
    use gguf_writer::V;
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tokenizer_json).unwrap()).unwrap();
    let mut by_id: Vec<(i64, String, i32)> = t["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (v.as_i64().unwrap(), k.clone(), 1)).collect();
    for a in t["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_i64().unwrap();
        let ty = if a["special"].as_bool().unwrap() { 3 } else { 4 };
        by_id.retain(|(i, _, _)| *i != id);
        by_id.push((id, a["content"].as_str().unwrap().to_string(), ty));
    }
    by_id.sort();
    assert!(by_id.iter().enumerate().all(|(i, (id, _, _))| i as i64 == *id), "ids are not contiguous");
    let merges: Vec<String> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            other => panic!("{other}"),
        })
        .collect();
    let bos = by_id.iter().find(|(_, s, _)| s == "<|begin_of_text|>" || s == "<|endoftext|>").map(|(i, _, _)| *i as u32).unwrap();
    gguf_writer::write(
        out,
        &[
            ("general.architecture", V::Str("llama".into())),
            ("tokenizer.ggml.model", V::Str("gpt2".into())),
            ("tokenizer.ggml.pre", V::Str(pre.into())),
            ("tokenizer.ggml.tokens", V::Strs(by_id.iter().map(|(_, s, _)| s.clone()).collect())),
            ("tokenizer.ggml.token_type", V::I32s(by_id.iter().map(|(_, _, t)| *t).collect())),
            ("tokenizer.ggml.merges", V::Strs(merges)),
            ("tokenizer.ggml.bos_token_id", V::U32(bos)),
            ("tokenizer.ggml.add_bos_token", V::Bool(add_bos)),
        ],
    );
}

/// Strings where pre-tokenizers disagree: digit groups, contractions, whitespace runs, newlines, scripts.
const SPLIT_PROBES: &[&str] = &[
    "1234",
    "12345678 + 987654321 = 988889999",
    "x^2 + 3.14159*y - 1e-10",
    "I'm sure they'll say it's DON'T",
    "   leading and  double  spaces   ",
    "line one\n\n\nline two\r\n\ttab",
    "Café naïve résumé – “quoted”",
    "你好世界，数学题：3+4=7",
    "emoji 🤖🎉 and symbols ∑∫√",
    "def f(x):\n    return x**2  # square",
    "\\boxed{\\frac{123}{4567}}",
    "The year 2024 had 366 days; 2025 has 365.",
];

fn cache_tokenizer(name: &str) -> Option<PathBuf> {
    let p = whet_cache().join("tokenizers").join(name).join("tokenizer.json");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIP: no {name} tokenizer at {} (run scripts/fetch-tokenizers.sh)", p.display());
        None
    }
}

#[test]
fn gguf_tokenizers_split_text_like_the_real_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, pre) in [("llama3", "llama-bpe"), ("qwen3", "qwen2")] {
        let Some(real_path) = cache_tokenizer(name) else { continue };
        // The GGUF says whether the tokenizer adds BOS, as the real file's post-processor does.
        let real_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&real_path).unwrap()).unwrap();
        let add_bos = real_json["post_processor"]["type"] == "TemplateProcessing";
        let real = tokenizers::Tokenizer::from_file(&real_path).unwrap();
        let score = |pre: &str| {
            let g = tmp.path().join(format!("{name}-{pre}.gguf"));
            gguf_of_tokenizer(&real_path, pre, add_bos, &g);
            let (tok_json, _) = model::gguf::hf_tokenizer(&GgufFile::open(&g).unwrap()).unwrap().unwrap();
            let ours = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tok_json).unwrap()).unwrap();
            let mut same = 0;
            for s in SPLIT_PROBES {
                let want = real.encode(*s, true).unwrap();
                let got = ours.encode(*s, true).unwrap();
                if want.get_ids() == got.get_ids() {
                    same += 1;
                } else if pre != "gpt2" {
                    eprintln!("{name}/{pre}: {s:?}\n  real {:?}\n  ours {:?}", want.get_tokens(), got.get_tokens());
                }
                // without special tokens too
                assert_eq!(real.encode(*s, false).unwrap().get_ids() == ours.encode(*s, false).unwrap().get_ids(), want.get_ids() == got.get_ids());
            }
            same
        };
        let right = score(pre);
        let gpt2 = score("gpt2");
        println!("{name}: tokenizer.ggml.pre = {pre}: {right}/{n} strings tokenize like the real tokenizer (GPT-2's pre-tokenizer: {gpt2}/{n})", n = SPLIT_PROBES.len());
        assert_eq!(right, SPLIT_PROBES.len(), "{name}: the GGUF's pre-tokenizer {pre} is not honoured");
        assert!(gpt2 < right, "{name}: the probes do not tell pre-tokenizers apart");
        // `tokenizer.ggml.add_bos_token = true` (Meta's own Llama 3 tokenizer.json): BOS leads every encoding.
        let g = tmp.path().join(format!("{name}-bos.gguf"));
        gguf_of_tokenizer(&real_path, pre, true, &g);
        let (tok_json, _) = model::gguf::hf_tokenizer(&GgufFile::open(&g).unwrap()).unwrap().unwrap();
        let ours = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tok_json).unwrap()).unwrap();
        let plain = real.encode("1234", false).unwrap().get_ids().to_vec();
        let with = ours.encode("1234", true).unwrap().get_ids().to_vec();
        assert_eq!(with[1..], plain[..], "{name}");
        assert_eq!(ours.id_to_token(with[0]).as_deref(), Some(if name == "llama3" { "<|begin_of_text|>" } else { "<|endoftext|>" }));
        assert_eq!(ours.encode("1234", false).unwrap().get_ids(), &plain[..]);
    }
}

#[test]
fn unknown_gguf_pre_tokenizers_are_refused_in_one_line() {
    use gguf_writer::V;
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("odd.gguf");
    gguf_writer::write(
        &g,
        &[
            ("tokenizer.ggml.model", V::Str("gpt2".into())),
            ("tokenizer.ggml.pre", V::Str("chatglm-bpe".into())),
            ("tokenizer.ggml.tokens", V::Strs(vec!["a".into(), "b".into()])),
        ],
    );
    let e = model::gguf::hf_tokenizer(&GgufFile::open(&g).unwrap()).unwrap_err().to_string();
    assert!(!e.contains('\n') && e.contains("chatglm-bpe") && e.contains("llama-bpe") && e.contains("odd.gguf"), "{e}");
}
