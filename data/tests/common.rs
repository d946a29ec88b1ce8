//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared/data/<rel>` relative to the repository, or `None` (with a visible message) when absent.
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data")).join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} not found (../shared/data is absent)", p.display());
        None
    }
}

/// The whet cache directory (`$WHET_CACHE`, else `$XDG_CACHE_HOME/whet`, else `~/.cache/whet`).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("WHET_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    base.join("whet")
}

/// A real tokenizer directory (`qwen3`, `llama3` under tokenizers/, or `smollm2`), or `None` with a message.
pub fn tokenizer_dir(name: &str) -> Option<PathBuf> {
    let d = if name == "smollm2" { cache_dir().join("smollm2-135m-instruct") } else { cache_dir().join("tokenizers").join(name) };
    if d.join("tokenizer.json").is_file() {
        Some(d)
    } else {
        eprintln!("SKIP: no {name} tokenizer at {} (run scripts/fetch-tokenizers.sh)", d.display());
        None
    }
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("whet-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// SmolLM2's ChatML template (as in its tokenizer_config.json).
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A tiny word-level tokenizer (whitespace/punctuation split, ChatML special tokens), built in memory so
/// tokenization tests run without downloaded files. Unknown words map to `[UNK]` (id 3).
pub fn tiny_tokenizer() -> data::Tokenizer {
    let cfg = serde_json::json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"});
    data::Tokenizer::from_bytes(tiny_tokenizer_json().as_bytes(), Some(&cfg)).unwrap()
}

/// The `tokenizer.json` text of [`tiny_tokenizer`].
pub fn tiny_tokenizer_json() -> String {
    let specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "[UNK]"];
    let mut vocab = serde_json::Map::new();
    let mut added = vec![];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), (i as u64).into());
        added.push(serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    let words = "system user assistant You are a helpful AI named SmolLM trained by Hugging Face What is Answer with just the number ? + - * / = . , ! Hi hello The answer"
        .split(' ')
        .map(str::to_string)
        .chain((0..200).map(|i| i.to_string()));
    for w in words {
        let n = vocab.len() as u64;
        vocab.entry(w).or_insert(n.into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    json.to_string()
}
