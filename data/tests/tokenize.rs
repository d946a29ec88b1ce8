//! Tokenization with loss labels (tiny in-memory tokenizer and, when cached, the real Qwen3 / Llama 3 /
//! SmolLM2 tokenizers), truncation and the on-disk cache.

mod common;

use data::synth::{Arithmetic, ArithmeticConfig};
use data::tokenize::{tokenize_conversation, tokenize_dataset, tokenize_preference, tokenize_prompt, tokenize_records, CacheOutcome, IGNORE_INDEX};
use data::{ChatTemplate, DataConfig, LossOn, Message, TokenizeConfig, Tokenizer, Truncation};

fn labelled_text(tok: &Tokenizer, ex: &data::TokenizedExample) -> Vec<String> {
    // Contiguous labelled runs, decoded.
    let mut runs = vec![];
    let mut cur = vec![];
    for (&id, &l) in ex.input_ids.iter().zip(&ex.labels) {
        if l == IGNORE_INDEX {
            if !cur.is_empty() {
                runs.push(tok.decode(&cur, false).unwrap());
                cur.clear();
            }
        } else {
            assert_eq!(l, id as i64);
            cur.push(id);
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).unwrap());
    }
    runs
}

fn conv() -> Vec<Message> {
    vec![
        Message::user("What is 2 + 3 ?"),
        Message::assistant("The answer is 5 ."),
        Message::user("Hi"),
        Message::assistant("hello !"),
    ]
}

#[test]
fn assistant_turns_carry_the_loss_with_their_end_token() {
    let tok = common::tiny_tokenizer();
    let t = ChatTemplate::from_str(common::CHATML, &[("eos_token", "<|im_end|>")]).unwrap();
    let cfg = TokenizeConfig::default();
    let (ex, truncated) = tokenize_conversation(&tok, &t, &conv(), &cfg).unwrap().unwrap();
    assert!(!truncated);
    assert_eq!(ex.input_ids, tok.encode(&t.render(&conv(), false).unwrap(), false).unwrap());
    assert_eq!(labelled_text(&tok, &ex), vec!["The answer is 5 . <|im_end|>", "hello ! <|im_end|>"]);

    let last = TokenizeConfig { loss_on: LossOn::LastTurn, ..cfg.clone() };
    let (ex, _) = tokenize_conversation(&tok, &t, &conv(), &last).unwrap().unwrap();
    assert_eq!(labelled_text(&tok, &ex), vec!["hello ! <|im_end|>"]);

    let all = TokenizeConfig { loss_on: LossOn::All, ..cfg.clone() };
    let (ex, _) = tokenize_conversation(&tok, &t, &conv(), &all).unwrap().unwrap();
    assert_eq!(ex.num_loss_tokens(), ex.len());

    let prompt = tokenize_prompt(&tok, Some(&t), &conv()[..1], &cfg).unwrap();
    assert_eq!(tok.decode(&prompt[prompt.len() - 2..], false).unwrap(), "<|im_start|> assistant");
}

#[test]
fn truncation_policies() {
    let tok = common::tiny_tokenizer();
    let t = ChatTemplate::from_str(common::CHATML, &[]).unwrap();
    let full = tokenize_conversation(&tok, &t, &conv(), &TokenizeConfig::default()).unwrap().unwrap().0;
    let n = 12;
    let right = TokenizeConfig { max_length: n, truncation: Truncation::Right, ..Default::default() };
    // The first 12 tokens hold no assistant content: nothing left to learn, so the example is dropped.
    assert!(tokenize_conversation(&tok, &t, &conv(), &right).unwrap().is_err());
    let right = TokenizeConfig { max_length: full.len() - 3, ..right };
    let (ex, cut) = tokenize_conversation(&tok, &t, &conv(), &right).unwrap().unwrap();
    assert!(cut);
    assert_eq!(ex.input_ids, full.input_ids[..full.len() - 3]);
    let left = TokenizeConfig { max_length: n, truncation: Truncation::Left, ..Default::default() };
    let (ex, _) = tokenize_conversation(&tok, &t, &conv(), &left).unwrap().unwrap();
    assert_eq!(ex.input_ids, full.input_ids[full.len() - n..]);
    assert_eq!(ex.labels, full.labels[full.len() - n..]);
    let drop = TokenizeConfig { max_length: n, truncation: Truncation::Drop, ..Default::default() };
    assert_eq!(tokenize_conversation(&tok, &t, &conv(), &drop).unwrap().unwrap_err(), data::tokenize::Dropped::TooLong);
}

#[test]
fn far_over_long_rows_are_judged_from_a_bounded_cut() {
    let tok = common::tiny_tokenizer();
    let t = ChatTemplate::from_str(common::CHATML, &[]).unwrap();
    // 600 KB of assistant text: far past 2 × max_length × max_token_bytes bytes
    let mut c = conv();
    c[3] = Message::assistant("hello ! ".repeat(75_000));
    let n = 40;
    assert!(c[3].content.len() > 2 * n * tok.max_token_bytes * 100);
    let full = tokenize_conversation(&tok, &t, &c, &TokenizeConfig { max_length: 1 << 30, ..Default::default() }).unwrap().unwrap().0;
    for (trunc, want) in [(Truncation::Right, 0..n), (Truncation::Left, full.len() - n..full.len())] {
        let cfg = TokenizeConfig { max_length: n, truncation: trunc, loss_on: LossOn::All, ..Default::default() };
        let (ex, cut) = tokenize_conversation(&tok, &t, &c, &cfg).unwrap().unwrap();
        assert!(cut);
        assert_eq!(ex.input_ids, full.input_ids[want.clone()], "{trunc:?}");
        // labels too: the assistant spans are located in the whole render, offsets of a suffix shifted
        let cfg = TokenizeConfig { loss_on: LossOn::AllAssistant, ..cfg };
        let (ex, _) = tokenize_conversation(&tok, &t, &c, &cfg).unwrap().unwrap();
        let all = tokenize_conversation(&tok, &t, &c, &TokenizeConfig { max_length: 1 << 30, ..Default::default() }).unwrap().unwrap().0;
        assert_eq!(ex.labels, all.labels[want], "{trunc:?}");
    }
    // dropped without tokenizing: a 50 MB row is judged by its length
    c[3] = Message::assistant("hello ! ".repeat(6_500_000));
    let drop = TokenizeConfig { max_length: n, truncation: Truncation::Drop, ..Default::default() };
    assert_eq!(tokenize_conversation(&tok, &t, &c, &drop).unwrap().unwrap_err(), data::tokenize::Dropped::TooLong);
}

#[test]
fn preference_pairs_share_the_prompt() {
    let tok = common::tiny_tokenizer();
    let t = ChatTemplate::from_str(common::CHATML, &[]).unwrap();
    let pair = tokenize_preference(&tok, Some(&t), &[Message::user("What is 2 + 2 ?")], "4", "5", &TokenizeConfig::default())
        .unwrap()
        .unwrap();
    let p = pair.chosen.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
    assert_eq!(pair.chosen.input_ids[..p], pair.rejected.input_ids[..p]);
    assert_eq!(labelled_text(&tok, &pair.chosen), vec!["4 <|im_end|>"]);
    assert_eq!(labelled_text(&tok, &pair.rejected), vec!["5 <|im_end|>"]);
    // Without a template: raw concatenation, completion + eos labelled.
    let raw = tokenize_preference(&tok, None, &[Message::user("What is 2 + 2 ?")], "4", "5", &TokenizeConfig::default()).unwrap().unwrap();
    assert_eq!(labelled_text(&tok, &raw.chosen), vec!["4 <|im_end|>"]);
}

#[test]
fn dataset_cache_hits_on_the_second_run_and_misses_after_a_change() {
    let d = common::scratch("cache");
    let p = d.join("arith.jsonl");
    let g = Arithmetic::new(ArithmeticConfig { seed: 1, ..Default::default() }).unwrap();
    let write = |n: usize| {
        let lines: Vec<String> = g
            .conversations(0, n)
            .iter()
            .map(|r| {
                let data::Record::Conversation { messages } = r else { panic!() };
                serde_json::json!({ "messages": messages }).to_string()
            })
            .collect();
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    };
    write(300);
    let tok = common::tiny_tokenizer();
    let t = ChatTemplate::from_str(common::CHATML, &[]).unwrap();
    let mut dc = DataConfig::new(&p);
    dc.messages = Some("messages".into());
    let cfg = TokenizeConfig::default();
    let cache = d.join("tok-cache");
    let a = tokenize_dataset(&dc, &tok, Some(&t), &cfg, Some(&cache)).unwrap();
    assert_eq!(a.cache, CacheOutcome::Miss);
    assert_eq!(a.examples.len(), 300);
    let b = tokenize_dataset(&dc, &tok, Some(&t), &cfg, Some(&cache)).unwrap();
    assert_eq!(b.cache, CacheOutcome::Hit);
    assert_eq!(a.examples, b.examples);
    assert_eq!(a.stats, b.stats);
    // Same result as tokenizing directly.
    let recs = data::load_records(&dc).unwrap();
    assert_eq!(tokenize_records(&tok, Some(&t), &recs, &cfg).unwrap().0, a.examples);
    // Different settings or data: a new key.
    let c = tokenize_dataset(&dc, &tok, Some(&t), &TokenizeConfig { max_length: 99, ..cfg.clone() }, Some(&cache)).unwrap();
    assert_eq!(c.cache, CacheOutcome::Miss);
    write(301);
    let e = tokenize_dataset(&dc, &tok, Some(&t), &cfg, Some(&cache)).unwrap();
    assert_eq!(e.cache, CacheOutcome::Miss);
    assert_eq!(e.examples.len(), 301);
    // A corrupt cache file is a clear error, not a panic.
    std::fs::write(e.cache_path.as_ref().unwrap(), b"WHETTOK1junk").unwrap();
    let err = tokenize_dataset(&dc, &tok, Some(&t), &cfg, Some(&cache)).unwrap_err().to_string();
    assert!(err.contains("corrupt token cache"), "{err}");
}

#[test]
fn qwen3_real_tokenizer_masks_multi_turn_reasoning() {
    let Some(dir) = common::tokenizer_dir("qwen3") else { return };
    let (tok, t) = Tokenizer::from_dir(&dir).unwrap();
    let t = t.unwrap();
    assert_eq!(tok.vocab_size(), 151_669);
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(tok.stop_token_ids().contains(&tok.token_to_id("<|im_end|>").unwrap()));
    let msgs = vec![
        Message::system("Be brief."),
        Message::user("What is 7 * 8?"),
        Message::assistant("<think>\n7 * 8 = 56.\n</think>\n\nThe answer is 56."),
        Message::user("Minus 6?"),
        Message::assistant("<think>\n56 - 6 = 50\n</think>\n\n50"),
    ];
    let (ex, _) = tokenize_conversation(&tok, &t, &msgs, &TokenizeConfig::default()).unwrap().unwrap();
    // Qwen3 drops the reasoning of earlier turns; the last turn keeps it, and each span ends with <|im_end|>.
    assert_eq!(labelled_text(&tok, &ex), vec!["The answer is 56.<|im_end|>", "<think>\n56 - 6 = 50\n</think>\n\n50<|im_end|>"]);
}

#[test]
fn llama3_real_tokenizer_masks_assistant_turns() {
    let Some(dir) = common::tokenizer_dir("llama3") else { return };
    let (tok, t) = Tokenizer::from_dir(&dir).unwrap();
    let t = t.unwrap();
    let msgs = vec![Message::user("What is 2 + 3?"), Message::assistant("  5  "), Message::user("Times 4?"), Message::assistant("20")];
    let (ex, _) = tokenize_conversation(&tok, &t, &msgs, &TokenizeConfig::default()).unwrap().unwrap();
    assert_eq!(ex.input_ids[0], tok.token_to_id("<|begin_of_text|>").unwrap());
    assert_eq!(labelled_text(&tok, &ex), vec!["5<|eot_id|>", "20<|eot_id|>"]);
}

#[test]
fn smollm2_real_tokenizer_golden_ids() {
    let Some(dir) = common::tokenizer_dir("smollm2") else { return };
    let (tok, t) = Tokenizer::from_dir(&dir).unwrap();
    let t = t.expect("SmolLM2 config has a chat template");
    // Golden ids from shared/notes/offline-assets.md §A1 (transformers).
    let ids = tok.encode("<|im_start|>user\nWhat is 23 + 14?<|im_end|>\n<|im_start|>assistant\n", false).unwrap();
    assert_eq!(ids, vec![1, 4093, 198, 1780, 314, 216, 34, 35, 1232, 216, 33, 36, 47, 2, 198, 1, 520, 9531, 198]);
    let text = t.render(&[Message::user("What is 23 + 14?")], true).unwrap();
    assert!(text.ends_with("<|im_start|>user\nWhat is 23 + 14?<|im_end|>\n<|im_start|>assistant\n"), "{text:?}");
}

#[test]
fn gsm8k_with_qwen3_labels_exactly_the_answers_and_packs_densely() {
    let Some(dir) = common::tokenizer_dir("qwen3") else { return };
    let Some(gsm) = common::shared_data("gsm8k") else { return };
    let (tok, t) = Tokenizer::from_dir(&dir).unwrap();
    let t = t.unwrap();
    let mut dc = DataConfig::new(&gsm);
    dc.split = "test".into();
    dc.prompt = Some("question".into());
    dc.completion = Some("answer".into());
    dc.limit = Some(400);
    let recs = data::load_records(&dc).unwrap();
    let (exs, stats) = tokenize_records(&tok, Some(&t), &recs, &TokenizeConfig::default()).unwrap();
    assert_eq!((stats.examples, stats.truncated, stats.dropped_no_loss), (400, 0, 0));
    for (r, ex) in recs.iter().zip(&exs) {
        let data::Record::PromptCompletion { completion, .. } = r else { panic!() };
        // Qwen3 renders a final assistant turn with an empty think block, which the model must produce too.
        assert_eq!(labelled_text(&tok, ex), vec![format!("<think>\n\n</think>\n\n{completion}<|im_end|>")]);
    }
    let packed = data::pack(&exs, 2048, tok.pad_id).unwrap();
    let (_, padded_eff) = data::pad(&exs[..8], tok.pad_id, None).unwrap();
    eprintln!("gsm8k test[:400] qwen3: {} tokens; packed into {} rows of 2048, efficiency {:.3}; padded batch of 8 efficiency {:.3}", stats.tokens, packed.rows.len(), packed.efficiency, padded_eff);
    assert!(packed.efficiency > 0.95, "{}", packed.efficiency);
}

#[test]
fn tokenizer_dir_reads_config_and_reports_broken_templates() {
    let d = common::scratch("tokdir");
    std::fs::write(d.join("tokenizer.json"), common::tiny_tokenizer_json()).unwrap();
    // No config: no template, pad falls back to id 0.
    let (tok, t) = Tokenizer::from_dir(&d).unwrap();
    assert!(t.is_none() && tok.eos_id.is_none());
    // transformers >= 4.47 writes the template next to the config.
    std::fs::write(d.join("tokenizer_config.json"), r#"{"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}"#).unwrap();
    std::fs::write(d.join("chat_template.jinja"), common::CHATML).unwrap();
    let (tok, t) = Tokenizer::from_dir(&d).unwrap();
    assert_eq!((tok.eos_id, tok.pad_id), (Some(1), 2));
    assert!(t.unwrap().render(&[Message::user("Hi")], true).unwrap().ends_with("<|im_start|>assistant\n"));
    std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
    std::fs::write(d.join("tokenizer_config.json"), r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#).unwrap();
    let e = Tokenizer::from_dir(&d).unwrap_err().to_string();
    assert!(e.contains("chat template"), "{e}");
    std::fs::write(d.join("tokenizer.json"), "{}").unwrap();
    assert!(Tokenizer::from_dir(&d).unwrap_err().to_string().contains("tokenizer.json"));
}

#[test]
fn prompts_and_preferences_in_bulk() {
    let tok = common::tiny_tokenizer();
    let t = ChatTemplate::from_str(common::CHATML, &[]).unwrap();
    let g = Arithmetic::new(ArithmeticConfig::default()).unwrap();
    let cfg = TokenizeConfig::default();
    let prompts = data::tokenize::tokenize_prompts(&tok, Some(&t), &g.prompt_answer(0, 50), &cfg).unwrap();
    assert_eq!(prompts.len(), 50);
    assert_eq!(prompts[7], tokenize_prompt(&tok, Some(&t), g.prompt_answer(7, 1)[0].prompt(), &cfg).unwrap());
    let (pairs, dropped) = data::tokenize::tokenize_preferences(&tok, Some(&t), &g.preferences(0, 30), &cfg).unwrap();
    assert_eq!((pairs.len(), dropped), (30, 0));
    let tight = TokenizeConfig { max_length: 20, truncation: Truncation::Drop, ..cfg.clone() };
    let (pairs, dropped) = data::tokenize::tokenize_preferences(&tok, Some(&t), &g.preferences(0, 30), &tight).unwrap();
    assert_eq!((pairs.len(), dropped), (0, 30));
    let e = data::tokenize::tokenize_preferences(&tok, Some(&t), &g.conversations(0, 3), &cfg).unwrap_err().to_string();
    assert!(e.contains("record 1") && e.contains("preference"), "{e}");
}

#[test]
fn template_text_inside_a_turn_is_labelled_even_when_it_repeats_the_content() {
    // The template inserts "The answer is" before the reply; the reply is "answer". The span must run from the
    // generation prompt to <|im_end|>, not stop at the first "answer" it sees.
    let src = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}{{ 'The answer is ' }}{% endif %}{{ m.content + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let t = ChatTemplate::from_str(src, &[]).unwrap();
    let tok = common::tiny_tokenizer();
    let msgs = vec![Message::user("Hi"), Message::assistant("answer")];
    let (ex, _) = tokenize_conversation(&tok, &t, &msgs, &TokenizeConfig::default()).unwrap().unwrap();
    assert_eq!(labelled_text(&tok, &ex), vec!["The answer is answer <|im_end|>"]);
    // A template that drops the reply entirely is an error that says what to do.
    let drop = ChatTemplate::from_str("{% for m in messages %}{{ m.role + ':' }}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}", &[]).unwrap();
    let e = tokenize_conversation(&tok, &drop, &msgs, &TokenizeConfig::default()).unwrap_err().to_string();
    assert!(e.contains("last_turn"), "{e}");
}
