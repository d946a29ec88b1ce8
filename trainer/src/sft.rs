//! The SFT / mid-training stage: next-token loss on assistant tokens, packed or padded rows, gradient
//! accumulation with a global token-mean loss, AdamW with warmup and decay, gradient clipping, held-out
//! accuracy, and exact resume from checkpoints.

use anyhow::{bail, Context, Result};
use data::{Record, Sampler, SamplerConfig, TokenizedExample};
use model::{Batch, Model};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::recipe::SftStage;
use crate::stage::{obj, HeldOut, Progress};
use crate::run::Ctx;

/// One training row: tokens, labels and, for packed rows, per-document positions.
pub(crate) struct Row {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub pos: Option<Vec<i64>>,
}

/// The training rows, a line describing them, and the longest row's length.
fn rows(ctx: &Ctx, name: &str, s: &SftStage) -> Result<(Vec<Row>, String, usize)> {
    let (examples, stats, source): (Vec<TokenizedExample>, data::tokenize::TokenizeStats, String) = match (&s.data, &s.synthetic) {
        (Some(d), _) => {
            let cache = ctx.output.join("cache");
            let ds = data::tokenize::tokenize_dataset(d, &ctx.tok, ctx.template.as_ref(), &s.tokenize, Some(&cache))
                .with_context(|| format!("tokenizing {}", d.path.display()))?;
            (ds.examples, ds.stats, d.path.display().to_string())
        }
        (None, Some(spec)) => {
            let records = crate::stage::synthetic(spec)?.conversations(spec.start, spec.count);
            let (ex, stats) = data::tokenize::tokenize_records(&ctx.tok, ctx.template.as_ref(), &records, &s.tokenize)?;
            (ex, stats, "the synthetic conversations".into())
        }
        (None, None) => bail!("the stage has no data"),
    };
    let t = &s.tokenize;
    if stats.truncated + stats.dropped_too_long + stats.dropped_no_loss > 0 && ctx.comm.is_main() {
        eprintln!(
            "[{name}] {source}: of {} records, {} truncated to max_length = {} (truncation = {}), {} dropped as longer than max_length, {} dropped with no loss token left",
            stats.records, stats.truncated, t.max_length, json!(t.truncation), stats.dropped_too_long, stats.dropped_no_loss
        );
    }
    if examples.is_empty() {
        bail!(
            "{source}: no training examples ({} records read; {} longer than max_length = {}, {} with no loss token under loss_on = {})",
            stats.records, stats.dropped_too_long, t.max_length, stats.dropped_no_loss, json!(t.loss_on)
        );
    }
    let n_ex = examples.len();
    let longest = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let longest = if s.packing { longest.max(s.tokenize.max_length) } else { longest };
    if s.packing {
        let packed = data::pack(&examples, s.tokenize.max_length, ctx.tok.pad_id)?;
        let info = format!("{} examples packed into {} rows of {} ({:.1}% efficiency)", n_ex, packed.rows.len(), packed.seq_len, 100.0 * packed.efficiency);
        let rows = packed
            .rows
            .into_iter()
            .map(|r| {
                let mut labels = r.labels.clone();
                // A document's first token is not predicted from the previous document.
                for &b in &r.doc_boundaries {
                    if (b as usize) < labels.len() {
                        labels[b as usize] = crate::loss::IGNORE;
                    }
                }
                Row { ids: r.input_ids.iter().map(|&x| x as i64).collect(), labels, pos: Some(r.position_ids.iter().map(|&x| x as i64).collect()) }
            })
            .collect();
        Ok((rows, info, longest))
    } else {
        let rows = examples.into_iter().map(|e| Row { ids: e.input_ids.iter().map(|&x| x as i64).collect(), labels: e.labels, pos: None }).collect();
        Ok((rows, format!("{n_ex} examples, padded per micro-batch"), longest))
    }
}

/// Stacks rows into tensors: (ids, labels, position ids, mask) with right padding (padded rows) or the
/// packed positions (packed rows, where documents are told apart by positions restarting at 0).
pub(crate) fn collate(rows: &[&Row], pad: i64, dev: Device) -> (Tensor, Tensor, Tensor, Tensor, bool) {
    let l = rows.iter().map(|r| r.ids.len()).max().unwrap();
    let b = rows.len();
    let (mut ids, mut labels, mut pos, mut aux) = (vec![pad; b * l], vec![crate::loss::IGNORE; b * l], vec![0i64; b * l], vec![0i64; b * l]);
    let packed = rows[0].pos.is_some();
    for (i, r) in rows.iter().enumerate() {
        let o = i * l;
        ids[o..o + r.ids.len()].copy_from_slice(&r.ids);
        labels[o..o + r.labels.len()].copy_from_slice(&r.labels);
        match &r.pos {
            Some(p) => {
                pos[o..o + p.len()].copy_from_slice(p);
                // document index: increments where positions restart
                let mut d = 0;
                for (j, &x) in p.iter().enumerate() {
                    if j > 0 && x == 0 {
                        d += 1;
                    }
                    aux[o + j] = d;
                }
            }
            None => {
                for j in 0..r.ids.len() {
                    pos[o + j] = j as i64;
                    aux[o + j] = 1;
                }
            }
        }
    }
    let t = |v: Vec<i64>| Tensor::from_slice(&v).view([b as i64, l as i64]).to(dev);
    (t(ids), t(labels), t(pos), t(aux), packed)
}

fn loss_tokens(rows: &[&Row]) -> i64 {
    rows.iter().map(|r| r.labels.iter().skip(1).filter(|&&x| x != crate::loss::IGNORE).count() as i64).sum()
}

/// Held-out loss (mean next-token loss over the labelled tokens) of tokenized examples, without gradients.
fn heldout_loss(ctx: &Ctx, model: &Model, examples: &[Row], chunk: i64) -> f64 {
    let (mut nll, mut n) = (0.0, 0i64);
    for batch in examples.chunks(64) {
        let refs: Vec<&Row> = batch.iter().collect();
        let (ids, labels, pos, aux, _) = collate(&refs, ctx.tok.pad_id as i64, model.net.device());
        let (lp, cnt) = crate::loss::sequence_logprobs(&model.net, &Batch::padded(&ids, &pos, &aux), &labels, chunk);
        nll -= lp.sum(tch::Kind::Double).double_value(&[]);
        n += cnt.sum(tch::Kind::Int64).int64_value(&[]);
    }
    nll / n.max(1) as f64
}

/// The held-out problems as conversations (prompt, gold answer as the reply), for held-out loss.
fn eval_rows(ctx: &Ctx, s: &SftStage, records: &[Record]) -> Result<Vec<Row>> {
    let convs: Vec<Record> = records
        .iter()
        .filter_map(|r| match r {
            Record::PromptAnswer { prompt, answer, .. } => {
                let mut m = prompt.clone();
                m.push(data::Message::assistant(answer.clone()));
                Some(Record::Conversation { messages: m })
            }
            _ => None,
        })
        .collect();
    let (ex, _) = data::tokenize::tokenize_records(&ctx.tok, ctx.template.as_ref(), &convs, &s.tokenize)?;
    Ok(ex.into_iter().map(|e| Row { ids: e.input_ids.iter().map(|&x| x as i64).collect(), labels: e.labels, pos: None }).collect())
}

pub fn run(ctx: &Ctx, index: usize, s: &SftStage, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let name = ctx.recipe.stage[index].name(index);
    let (rows, info, longest) = rows(ctx, &name, s)?;
    crate::stage::check_positions(model, &name, longest, if s.packing { "a packed row (tokenize.max_length)" } else { "the longest training row" })?;
    // data parallel: each step draws world × accum micro-batches; this rank trains on its `accum` of them
    let accum = crate::data_parallel::local_accum(ctx, &name, s.grad_accum, resume)?;
    let world_micro = accum * ctx.comm.world();
    let per_step = s.batch_size * world_micro;
    let total = s.max_steps.unwrap_or_else(|| ((s.epochs * rows.len() as f64) / per_step as f64).ceil().max(1.0) as usize);
    eprintln!("[{name}] {info}; {total} optimizer steps of {} × {} rows", world_micro, s.batch_size);
    let progress = |name: &'_ str, sampler: &Sampler, tokens: u64| Progress { index, name: name.to_string(), total, sampler: Some(sampler.state()), tokens, extra: serde_json::Value::Null };

    let mut sampler = Sampler::single(rows.len(), SamplerConfig { seed: ctx.recipe.run.seed.wrapping_add(index as u64), shuffle: true, num_epochs: None, drop_last: false })?;
    let optim = s.optim();
    let mut opt = optim.optimizer(ctx, model);
    let (start, mut tokens) = crate::stage::restore(resume, &mut opt, &mut sampler, &name, total)?;

    let held = HeldOut::new(&s.eval)?;
    let erows = match &held {
        Some(h) => eval_rows(ctx, s, &h.records)?,
        None => vec![],
    };
    let chunk = s.loss_chunk as i64;
    let eval_loss = || obj(json!({"eval_loss": heldout_loss(ctx, model, &erows, chunk)}));
    let mut before = f64::NAN;
    if let (Some(h), 0) = (&held, start) {
        before = h.at_start(ctx, model, index, &name, eval_loss())?;
    }

    let dev = model.net.device();
    let pad = ctx.tok.pad_id as i64;
    let t_stage = Instant::now();
    let bar = crate::progress::Bar::new(&name, start, total);
    let mut health = crate::stage::Health::default();
    for step in start..total {
        let t0 = Instant::now();
        let micro: Vec<Vec<&Row>> = (0..world_micro).map(|_| sampler.next_batch(s.batch_size).into_iter().map(|i| &rows[i]).collect()).collect();
        let micro = crate::data_parallel::shard(ctx, micro);
        // the global token count: this rank's, summed over the ranks
        let mut counts = [micro.iter().map(|m| loss_tokens(m)).sum::<i64>() as f64, micro.iter().flatten().map(|r| r.ids.len()).sum::<usize>() as f64];
        crate::data_parallel::sum(ctx, &mut counts)?;
        let (n_tok, step_rows_tokens) = ((counts[0] as i64).max(1), counts[1]);
        let mut loss_sum = 0.0;
        let mut acc = crate::data_parallel::Accum::new(model);
        for m in micro.iter().filter(|m| !m.is_empty()) {
            acc.next();
            let (ids, labels, pos, aux, packed) = collate(m, pad, dev);
            let full = !packed && m.iter().all(|r| r.ids.len() == m[0].ids.len());
            let batch = if packed {
                Batch::packed(&ids, &pos, &aux)
            } else if full {
                // no padding: plain causal attention lets SDPA use its fused causal kernel without a mask
                Batch { mask: model::AttnMask::Causal, ..Batch::padded(&ids, &pos, &aux) }
            } else {
                Batch::padded(&ids, &pos, &aux)
            };
            let (l, _) = crate::loss::causal_lm_backward(&model.net, &batch, &labels, 1.0 / n_tok as f64, chunk);
            loss_sum += l;
        }
        acc.finish();
        tokens += step_rows_tokens as u64;
        crate::data_parallel::sync_grads(ctx, model)?;
        let lr = optim.lr_at(step, total);
        let (grad_norm, stepped) = crate::stage::optimizer_step(ctx, &name, &mut opt, &optim, lr, step + 1, &bar)?;
        let mut loss_sum = [loss_sum];
        crate::data_parallel::sum(ctx, &mut loss_sum)?;
        let loss = loss_sum[0] / n_tok as f64;
        health.observe(ctx, &name, step + 1, grad_norm, Some((loss, model.net.cfg.vocab_size)), &bar);
        if !loss.is_finite() && stepped {
            bail!("[{name}] loss became {loss} at step {}: lower the learning rate", step + 1);
        }
        let dt = t0.elapsed().as_secs_f64();
        let done = step + 1;
        if done % ctx.recipe.run.log_every.max(1) == 0 || done == total {
            ctx.metrics.log(obj(json!({"stage": index, "stage_name": name, "step": done, "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "loss_tokens": n_tok, "step_s": dt, "epoch": sampler.epoch(),
                "tokens_per_s": step_rows_tokens / dt, "update_lost_frac": opt.lost_fraction()})))?;
            bar.println(&format!("[{name}] step {done}/{total} loss {loss:.4} lr {lr:.2e} grad_norm {grad_norm:.3} ({:.2} s/step)", dt));
        }
        bar.step(done, loss, step_rows_tokens / dt);
        if let Some(h) = &held {
            h.periodic(ctx, model, index, &name, done, total, eval_loss)?;
        }
        progress(&name, &sampler, tokens).after_step(ctx, done, model, &opt)?;
    }
    bar.finish();
    let after = match &held {
        Some(h) => h.at_end(ctx, model, index, &name, total, before, eval_loss())?,
        None => f64::NAN,
    };
    progress(&name, &sampler, tokens).finish(ctx, model, t_stage, "")?;
    Ok(after)
}
