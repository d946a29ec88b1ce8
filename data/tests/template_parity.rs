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
    assert!(checked >= 72);
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

/// A conversation as a dataset row gives it, through the data path (JSONL → record → SFT example): every message
/// field the template reads reaches it. Long-CoT traces in Qwen3's format keep their reasoning (issue 16: the
/// think block used to be empty), tool calls keep their arguments and key order.
#[test]
fn dataset_rows_keep_every_field_the_template_reads() {
    use data::tokenize::{tokenize_record, IGNORE_INDEX};
    use data::{load_records, DataConfig, Record, TokenizeConfig};
    let fx = fixtures();
    let Some(dir) = common::tokenizer_dir("qwen3") else { return };
    let (tok, template) = Tokenizer::from_dir(&dir).unwrap();
    let template = template.unwrap();
    let qwen3 = fx["templates"].as_array().unwrap().iter().find(|t| t["name"] == "qwen3").unwrap();
    let d = common::scratch("fields");
    for case in ["reasoning_content_field", "tool_call_openai_order", "tool_call_roundtrip"] {
        let c = qwen3["cases"].as_array().unwrap().iter().find(|c| c["name"] == case).unwrap();
        assert!(c["tools"].is_null() || case.starts_with("tool"), "{case}");
        let p = d.join(format!("{case}.jsonl"));
        std::fs::write(&p, format!("{}\n", serde_json::json!({"messages": c["messages"]}))).unwrap();
        let mut cfg = DataConfig::new(&p);
        cfg.messages = Some("messages".into());
        let recs = load_records(&cfg).unwrap();
        let Record::Conversation { messages } = &recs[0] else { panic!("{case}: not a conversation") };
        // The rendered record equals transformers' rendering of the same messages (tools aside: they come from
        // the recipe, not the row, so they are left out of both renders here).
        let want = if c["tools"].is_null() {
            c["expected"].as_str().unwrap().to_string()
        } else {
            let opts = RenderOptions { add_generation_prompt: false, tools: None, extra: Default::default() };
            template.render_json(c["messages"].as_array().unwrap(), &opts).unwrap()
        };
        assert_eq!(template.render(messages, false).unwrap(), want, "{case}: the record lost a field the template reads");
        let (ex, _) = tokenize_record(&tok, Some(&template), &recs[0], &TokenizeConfig::default()).unwrap().unwrap();
        assert_eq!(ex.input_ids, tok.encode(&want, false).unwrap(), "{case}");
        let trained: Vec<u32> = ex.labels.iter().filter(|&&l| l != IGNORE_INDEX).map(|&l| l as u32).collect();
        let text = tok.decode(&trained, false).unwrap();
        if case == "reasoning_content_field" {
            assert!(text.contains("<think>\n7 * 8 = 56, and 56 - 6 = 50.\n</think>"), "{case}: the reasoning is not trained on: {text:?}");
            eprintln!("{case}: {} of {} tokens carry the loss, the think block included", trained.len(), ex.input_ids.len());
        }
        if case == "tool_call_openai_order" {
            assert!(text.contains(r#"{"name": "calculator", "arguments": {"expression": "123 * 456"}}"#), "{case}: {text:?}");
        }
    }
}
