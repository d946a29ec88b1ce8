//! Sampling from the model being trained, through the in-process rollout engine batching as `[generation]`
//! says (GRPO's rollouts, Rollout-DPO's samples, the prefilter's pilots), and held-out accuracy: prompts
//! rendered with the chat template, answers checked by the rewards crate's math verifier.

use anyhow::Result;
use data::{ChatTemplate, Message, Record, Tokenizer};
use model::Transformer;
use rollout::{Completion, Engine, EngineConfig, Request, SamplingParams};

use super::Ctx;

/// `n` completions of every prompt, drawn with `params` by the rollout engine batching as the recipe's
/// `[generation]` says (the tokenizer's stop ids end a sequence; `seed` seeds requests that set none), sorted
/// by prompt, then sample.
pub fn generate(ctx: &Ctx, net: &Transformer, prompts: &[Vec<i64>], n: usize, params: &SamplingParams, seed: u64) -> Result<Vec<Completion>> {
    generate_at(ctx, net, prompts, n, params, seed, 0)
}

/// [`generate`] for `prompts` that sit at index `first` of a larger call (a data-parallel rank's share):
/// each request is seeded as it would be in the whole call, so its samples do not depend on the sharding.
pub fn generate_at(ctx: &Ctx, net: &Transformer, prompts: &[Vec<i64>], n: usize, params: &SamplingParams, seed: u64, first: usize) -> Result<Vec<Completion>> {
    // ZeRO-3: the engine decodes on whole weights (gathered once for the round)
    super::sharding::ensure_whole(ctx)?;
    let tok = &ctx.tok;
    let cfg = EngineConfig { eos_token_ids: stop_ids(tok), pad_token_id: tok.pad_id as i64, seed, ..ctx.generation.engine(net.device()) };
    let engine = Engine::new(net, cfg)?;
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut params = params.clone();
            params.seed = params.seed.or(Some(rollout::rng::default_request_seed(seed, first + i)));
            Request { prompt_ids: p.clone(), n, params }
        })
        .collect();
    let mut done = engine.generate(&requests).map_err(|e| match e {
        rollout::RolloutError::CacheBudget { .. } => anyhow::anyhow!("{e} (the recipe's [generation] cache_budget_tokens)"),
        e => e.into(),
    })?;
    done.sort_by_key(|c| (c.request_index, c.sample_index));
    Ok(done)
}

/// The tokenizer's end-of-sequence and end-of-turn ids.
pub fn stop_ids(tok: &Tokenizer) -> Vec<i64> {
    tok.stop_token_ids().into_iter().map(|x| x as i64).collect()
}

/// The text of completion tokens before the first stop id.
pub fn completion_text(tok: &Tokenizer, ids: &[i64], stop: &[i64]) -> Result<String> {
    let ids: Vec<u32> = ids.iter().take_while(|t| !stop.contains(t)).map(|&t| t as u32).collect();
    Ok(tok.decode(&ids, true)?)
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
pub fn accuracy(ctx: &Ctx, net: &Transformer, records: &[Record], spec: &crate::settings::EvalSpec) -> Result<(f64, Vec<(String, String, bool)>)> {
    let (tok, template) = (&ctx.tok, ctx.template.as_ref());
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
    let stop = stop_ids(tok);
    let n = if spec.temperature == 0.0 { 1 } else { spec.samples.max(1) };
    let params = SamplingParams { temperature: spec.temperature as f32, max_new_tokens: spec.max_new_tokens, ..Default::default() };
    let outs = generate(ctx, net, &prompts, n, &params, spec.seed)?;
    let cfg = rewards::math::VerifyConfig::default();
    let mut correct = 0;
    let mut samples = vec![];
    for c in outs {
        let (q, gold) = &golds[c.request_index];
        let text = completion_text(tok, &c.token_ids, &stop)?;
        let ok = rewards::math::verify(gold, &text, &cfg).equivalent;
        correct += ok as usize;
        if samples.len() < 3 && c.sample_index == 0 {
            samples.push((q.clone(), text, ok));
        }
    }
    Ok((correct as f64 / (golds.len() * n) as f64, samples))
}
