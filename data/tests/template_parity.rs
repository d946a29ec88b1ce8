//! Byte-for-byte parity of chat-template rendering with transformers' apply_chat_template, on fixtures made by
//! data/scripts/gen_template_fixtures.py; plus token-id parity where the real tokenizer is cached.

mod common;

use data::template::{ChatTemplate, RenderOptions};
use data::Tokenizer;
use serde_json::Value;

fn fixtures() -> Value {
    let text = include_str!("fixtures/chat_templates.json");
    serde_json::from_str(text).unwrap()
}

#[test]
fn templates_render_like_transformers() {
    let fx = fixtures();
    let mut checked = 0;
    let mut names = vec![];
    for t in fx["templates"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        names.push(name.to_string());
        let special: Vec<(String, String)> = t["special_tokens"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let sp: Vec<(&str, &str)> = special.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let tmpl = ChatTemplate::from_str(t["template"].as_str().unwrap(), &sp).unwrap_or_else(|e| panic!("{name}: {e}"));
        for c in t["cases"].as_array().unwrap() {
            let case = c["name"].as_str().unwrap();
            let opts = RenderOptions {
                add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
                tools: c["tools"].as_array().cloned(),
                extra: c["kwargs"].as_object().cloned().unwrap_or_default(),
            };
            let got = tmpl.render_json(c["messages"].as_array().unwrap(), &opts);
            match c.get("expected").and_then(|e| e.as_str()) {
                Some(exp) => {
                    let got = got.unwrap_or_else(|e| panic!("{name}/{case}: {e}"));
                    assert_eq!(got, exp, "{name}/{case}: rendering differs from transformers");
                }
                None => assert!(got.is_err(), "{name}/{case}: transformers raised {:?}, we rendered", c["expected_error"]),
            }
            checked += 1;
        }
    }
    for want in ["qwen3", "qwen2.5", "llama3", "llama3.2", "phi4-mini", "smollm2"] {
        assert!(names.iter().any(|n| n == want), "fixture lacks {want}");
    }
    eprintln!("template parity: {checked} renders identical across {} templates", names.len());
    assert!(checked >= 54);
}

#[test]
fn real_tokenizers_give_transformers_ids() {
    let fx = fixtures();
    for t in fx["templates"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let Some(dir) = (match name {
            "qwen3" | "llama3" => common::tokenizer_dir(name),
            _ => continue,
        }) else {
            continue;
        };
        let (tok, template) = Tokenizer::from_dir(&dir).unwrap();
        let template = template.expect("real config has a chat template");
        assert_eq!(template.source(), t["template"].as_str().unwrap(), "{name}: cached config differs from the fixture's");
        for c in t["cases"].as_array().unwrap() {
            let (Some(text), Some(ids)) = (c["expected"].as_str(), c["expected_ids"].as_array()) else { continue };
            let want: Vec<u32> = ids.iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode(text, false).unwrap(), want, "{name}/{}", c["name"]);
        }
    }
}
