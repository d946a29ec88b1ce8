//! `tokenizer = "builtin:bytes"`: a byte-level tokenizer (the 256 byte symbols of GPT-2's byte-to-unicode
//! map, no merges) with ChatML special tokens and chat template, for random-initialised demo models. It is
//! written as ordinary `tokenizer.json` / `tokenizer_config.json` files, so saved models load in transformers.

use anyhow::{Context, Result};
use serde_json::{json, Map};
use std::path::Path;

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, as Qwen2.5 without a default system prompt.
pub const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// GPT-2's reversible byte → printable-character map (bytes that are printable map to themselves, the rest to
/// U+0100 onwards in order).
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// Writes tokenizer.json and tokenizer_config.json into `dir`. Ids: specials 0..3, then bytes 3..259.
pub fn write(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut vocab = Map::new();
    let mut added = vec![];
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
        added.push(json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    for (i, c) in byte_symbols().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIALS.len() + i));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    let cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": null,
        "chat_template": CHATML, "clean_up_tokenization_spaces": false
    });
    model::weights::write_atomic(&dir.join("tokenizer.json"), serde_json::to_string(&tok)?.as_bytes())?;
    model::weights::write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?.as_bytes())?;
    Ok(())
}


#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_text_and_specials() {
        let d = tempfile::tempdir().unwrap();
        super::write(d.path()).unwrap();
        let (tok, tmpl) = data::Tokenizer::from_dir(d.path()).unwrap();
        let tmpl = tmpl.expect("chat template");
        let text = tmpl.render(&[data::Message::user("What is 12 + 7?"), data::Message::assistant("19")], false).unwrap();
        assert_eq!(text, "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n");
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.eos_id, Some(2));
        assert_eq!(tok.vocab_size(), super::SPECIALS.len() + 256);
    }
}
