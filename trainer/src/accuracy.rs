//! Held-out accuracy by greedy decoding: prompts rendered with the chat template, answers checked by the
//! rewards crate's math verifier. (Batched, KV-cached, left-padded; the rollout engine's sampler is not
//! needed for greedy decoding.)

use anyhow::Result;
use data::{ChatTemplate, Message, Record, Tokenizer};
use model::{KvCache, Transformer};
use tch::{Device, IndexOp, Kind, Tensor};

/// Greedy continuations of `prompts` (token ids), at most `max_new` tokens each, stopping at any `stop` id.
pub fn greedy(net: &Transformer, prompts: &[Vec<i64>], max_new: usize, stop: &[i64], pad: i64, batch: usize) -> Vec<Vec<i64>> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        out.extend(greedy_batch(net, chunk, max_new, stop, pad));
    }
    out
}

fn greedy_batch(net: &Transformer, prompts: &[Vec<i64>], max_new: usize, stop: &[i64], pad: i64) -> Vec<Vec<i64>> {
    let dev = net.device();
    let b = prompts.len() as i64;
    let l = prompts.iter().map(|p| p.len()).max().unwrap_or(1).max(1) as i64;
    let mut ids = vec![pad; (b * l) as usize];
    let mut mask = vec![0i64; (b * l) as usize];
    for (r, p) in prompts.iter().enumerate() {
        let off = r * l as usize + (l as usize - p.len());
        ids[off..off + p.len()].copy_from_slice(p);
        mask[off..off + p.len()].iter_mut().for_each(|m| *m = 1);
    }
    let ids = Tensor::from_slice(&ids).view([b, l]).to(dev);
    let mut key_mask = Tensor::from_slice(&mask).view([b, l]).to(dev);
    let mut pos = (key_mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let mut cache = KvCache::new(&net.cfg, b, l + max_new as i64, net.kind(), dev);
    let mut outs: Vec<Vec<i64>> = vec![vec![]; prompts.len()];
    let mut done = vec![false; prompts.len()];
    tch::no_grad(|| {
        let mut logits = net.forward_cached(&ids, &pos, &key_mask, &mut cache).i((.., -1));
        for _ in 0..max_new {
            let next = logits.argmax(-1, false);
            let host: Vec<i64> = Vec::try_from(next.to(Device::Cpu)).unwrap();
            for (r, &t) in host.iter().enumerate() {
                if !done[r] {
                    if stop.contains(&t) {
                        done[r] = true;
                    } else {
                        outs[r].push(t);
                    }
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            let last = pos.size()[1] - 1;
            pos = pos.narrow(1, last, 1) + 1;
            key_mask = Tensor::cat(&[&key_mask, &Tensor::ones([b, 1], (Kind::Int64, dev))], 1);
            logits = net.forward_cached(&next.unsqueeze(1), &pos, &key_mask, &mut cache).i((.., -1));
        }
    });
    outs
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
    let outs = greedy(net, &prompts, max_new, &stop, tok.pad_id as i64, 64);
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
