//! Held-out accuracy by greedy decoding (the rollout engine at temperature 0): prompts rendered with the chat
//! template, answers checked by the rewards crate's math verifier.

use anyhow::Result;
use data::{ChatTemplate, Message, Record, Tokenizer};
use model::Transformer;
use rollout::{Engine, EngineConfig, Request, SamplingParams};

/// Greedy continuations of `prompts` (token ids) with the rollout engine, at most `max_new` tokens each,
/// ending before the first `stop` id.
pub fn greedy(net: &Transformer, prompts: &[Vec<i64>], max_new: usize, stop: &[i64], pad: i64) -> Result<Vec<Vec<i64>>> {
    let cfg = EngineConfig { eos_token_ids: stop.to_vec(), pad_token_id: pad, ..Default::default() };
    let engine = Engine::new(net, cfg)?;
    let params = SamplingParams { temperature: 0.0, max_new_tokens: max_new, ..Default::default() };
    let requests: Vec<Request> = prompts.iter().map(|p| Request { prompt_ids: p.clone(), n: 1, params: params.clone() }).collect();
    let mut done = engine.generate(&requests)?;
    done.sort_by_key(|c| c.request_index);
    Ok(done
        .into_iter()
        .map(|c| c.token_ids.into_iter().take_while(|t| !stop.contains(t)).collect())
        .collect())
}

/// Prompt ids for a prompt-with-answer record (chat template with the generation prompt when there is one).
pub fn prompt_ids(tok: &Tokenizer, template: Option<&ChatTemplate>, prompt: &[Message]) -> Result<Vec<i64>> {
    let text = match template {
        Some(t) => t.render(prompt, true)?,
        None => prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
    };
    Ok(tok.encode(&text, false)?.into_iter().map(|x| x as i64).collect())
}

/// Greedy accuracy on prompt-with-answer records; returns (accuracy, a few sample completions).
pub fn evaluate(
    net: &Transformer,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    records: &[Record],
    max_new: usize,
) -> Result<(f64, Vec<(String, String, bool)>)> {
    let mut prompts = vec![];
    let mut golds = vec![];
    for r in records {
        if let Record::PromptAnswer { prompt, answer, .. } = r {
            prompts.push(prompt_ids(tok, template, prompt)?);
            golds.push((prompt.last().map(|m| m.content.clone()).unwrap_or_default(), answer.clone()));
        }
    }
    if prompts.is_empty() {
        anyhow::bail!("held-out evaluation needs prompt-with-answer records");
    }
    let stop: Vec<i64> = tok.stop_token_ids().into_iter().map(|x| x as i64).collect();
    let outs = greedy(net, &prompts, max_new, &stop, tok.pad_id as i64)?;
    let cfg = rewards::math::VerifyConfig::default();
    let mut correct = 0;
    let mut samples = vec![];
    for ((q, gold), ids) in golds.iter().zip(outs) {
        let text = tok.decode(&ids.iter().map(|&x| x as u32).collect::<Vec<_>>(), true)?;
        let ok = rewards::math::verify(gold, &text, &cfg).equivalent;
        correct += ok as usize;
        if samples.len() < 3 {
            samples.push((q.clone(), text, ok));
        }
    }
    Ok((correct as f64 / golds.len() as f64, samples))
}
