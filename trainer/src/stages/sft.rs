//! The SFT / mid-training stage: next-token loss on assistant tokens, packed or padded rows, gradient
//! accumulation with a global token-mean loss, AdamW with warmup and decay, gradient clipping, held-out
//! accuracy, and exact resume from checkpoints.

use anyhow::{bail, Context, Result};
use data::{DataConfig, Record, Sampler, SamplerConfig, TokenizeConfig, TokenizedExample};
use model::{Batch, Model};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Tensor};

use crate::algo::logprobs::{self, Row, IGNORE};
use crate::observe::metrics::obj;
use crate::observe::progress::Bar;
use crate::settings::SyntheticSpec;
use crate::training::checkpoint::Checkpoint;
use crate::training::{data_parallel, sharding, stage_keys, step, Ctx, Health, HeldOut, Progress, TrainingKeys};

crate::training::training_stage! {
    /// `kind = "sft"`.
    pub struct SftStage {
        /// Dataset (conversations, or prompt with completion / answer).
        #[serde(default)]
        pub data: Option<DataConfig>,
        /// Synthetic arithmetic conversations instead of a dataset.
        #[serde(default)]
        pub synthetic: Option<SyntheticSpec>,
        /// Tokenization: `max_length`, `loss_on`, `truncation`, `add_eos`, `template_kwargs` (the keys below).
        #[serde(default)]
        pub tokenize: TokenizeConfig,
        /// Pack examples into rows of `max_length` tokens (best-fit decreasing, no cross-document attention).
        #[serde(default)]
        pub packing: bool,
        /// Passes over the data (used when `max_steps` is not set).
        #[serde(default = "default_epochs", alias = "num_train_epochs")]
        pub epochs: f64,
        /// Rows per micro-batch.
        #[serde(default = "default_batch", alias = "per_device_train_batch_size")]
        pub batch_size: usize,
        /// Micro-batches per optimizer step.
        #[serde(default = "one", alias = "gradient_accumulation_steps")]
        pub grad_accum: usize,
        /// Peak learning rate.
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
    }
}

fn default_epochs() -> f64 {
    1.0
}
fn default_batch() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    1e-5
}

impl crate::stages::kind::StageKind for SftStage {
    fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut std::path::PathBuf)) {
        if let Some(d) = self.data.as_mut() {
            f(&mut d.path);
        }
    }

    fn validate(&self, at: &str, p: &mut Vec<String>) {
        match (&self.data, &self.synthetic) {
            (None, None) => p.push(format!("{at}: needs `data` or `synthetic`")),
            (Some(_), Some(_)) => p.push(format!("{at}: has both `data` and `synthetic`; give one")),
            (Some(d), None) if !d.path.exists() => p.push(format!("{at}: data path {} does not exist", d.path.display())),
            _ => {}
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            p.push(format!("{at}: batch_size and grad_accum must be at least 1"));
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs <= 0.0) {
            p.push(format!("{at}: needs max_steps ≥ 1 or epochs > 0"));
        }
        if self.tokenize.max_length < 2 {
            p.push(format!("{at}: tokenize.max_length must be at least 2"));
        }
    }

    fn memory_shape(&self, _: &crate::settings::GenerationSpec) -> crate::training::memory::StageShape {
        crate::training::memory::StageShape {
            micro_tokens: (self.batch_size * self.tokenize.max_length) as i64,
            checkpointing: self.gradient_checkpointing,
            logit_rows: self.loss_chunk as i64,
            accumulates: self.grad_accum > 1,
            ..Default::default()
        }
    }

    fn plan(&self) -> String {
        let steps = match self.max_steps {
            Some(n) => format!("{n} steps"),
            None => format!("{} epoch(s)", self.epochs),
        };
        let rows = self.synthetic.as_ref().map(|s| format!("{} synthetic conversations", s.count)).unwrap_or_else(|| self.data.as_ref().map(|d| d.path.display().to_string()).unwrap_or_default());
        format!(
            "{rows}; {steps}; {} rows × {} micro-batches per step, ≤ {} tokens per row{}; lr {:.1e} {:?}",
            self.batch_size,
            self.grad_accum,
            self.tokenize.max_length,
            if self.packing { " (packed)" } else { "" },
            self.lr,
            self.schedule
        )
    }

    fn run(&self, ctx: &Ctx, index: usize, name: &str, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
        run(ctx, index, name, self, model, resume)
    }
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
            let records = spec.generator()?.conversations(spec.start, spec.count);
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
                        labels[b as usize] = IGNORE;
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
fn collate(rows: &[&Row], pad: i64, dev: Device) -> (Tensor, Tensor, Tensor, Tensor, bool) {
    let l = rows.iter().map(|r| r.ids.len()).max().unwrap();
    let b = rows.len();
    let (mut ids, mut labels, mut pos, mut aux) = (vec![pad; b * l], vec![IGNORE; b * l], vec![0i64; b * l], vec![0i64; b * l]);
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
    rows.iter().map(|r| r.labels.iter().skip(1).filter(|&&x| x != IGNORE).count() as i64).sum()
}

/// Held-out loss (mean next-token loss over the labelled tokens) of tokenized examples, without gradients.
fn heldout_loss(ctx: &Ctx, model: &Model, examples: &[Row], chunk: i64) -> f64 {
    let (mut nll, mut n) = (0.0, 0i64);
    for batch in examples.chunks(64) {
        let refs: Vec<&Row> = batch.iter().collect();
        let (ids, labels, pos, aux, _) = collate(&refs, ctx.tok.pad_id as i64, model.net.device());
        let (lp, cnt) = logprobs::sequence_logprobs(&model.net, &Batch::padded(&ids, &pos, &aux), &labels, chunk);
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

fn run(ctx: &Ctx, index: usize, name: &str, s: &SftStage, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
    let (rows, info, longest) = rows(ctx, name, s)?;
    stage_keys::check_positions(model, name, longest, if s.packing { "a packed row (tokenize.max_length)" } else { "the longest training row" })?;
    // data parallel: each step draws world × accum micro-batches; this rank trains on its `accum` of them
    let accum = data_parallel::local_accum(ctx, name, s.grad_accum, resume)?;
    let world_micro = accum * ctx.comm.world();
    let per_step = s.batch_size * world_micro;
    let total = s.max_steps.unwrap_or_else(|| ((s.epochs * rows.len() as f64) / per_step as f64).ceil().max(1.0) as usize);
    eprintln!("[{name}] {info}; {total} optimizer steps of {} × {} rows", world_micro, s.batch_size);
    let progress = |sampler: &Sampler, tokens: u64| Progress { index, name: name.to_string(), total, sampler: Some(sampler.state()), tokens, extra: serde_json::Value::Null };

    let mut sampler = Sampler::single(rows.len(), SamplerConfig { seed: ctx.run.seed.wrapping_add(index as u64), shuffle: true, num_epochs: None, drop_last: false })?;
    let optim = s.optim();
    let mut opt = optim.optimizer(ctx, model)?;
    let (start, mut tokens) = step::restore(resume, &mut opt, &mut sampler, name, total)?;

    let held = HeldOut::new(s.eval.as_ref())?;
    let erows = match &held {
        Some(h) => eval_rows(ctx, s, &h.records)?,
        None => vec![],
    };
    let chunk = s.loss_chunk as i64;
    let eval_loss = || obj(json!({"eval_loss": heldout_loss(ctx, model, &erows, chunk)}));
    let mut before = f64::NAN;
    if let (Some(h), 0) = (&held, start) {
        // every rank computes the held-out loss (ZeRO-3: on whole weights)
        sharding::ensure_whole(ctx)?;
        before = h.at_start(ctx, model, index, name, eval_loss())?;
    }

    let t_stage = Instant::now();
    let bar = Bar::new(name, start, total);
    let mut health = Health::default();
    for step in start..total {
        let t0 = Instant::now();
        step::key_dropout(ctx, model, step);
        let micro: Vec<Vec<&Row>> = (0..world_micro).map(|_| sampler.next_batch(s.batch_size).into_iter().map(|i| &rows[i]).collect()).collect();
        let pass = forward_backward(ctx, model, &opt, data_parallel::shard(ctx, micro), chunk)?;
        tokens += pass.row_tokens as u64;
        let lr = optim.lr_at(step, total);
        let (grad_norm, stepped) = step::optimizer_step(ctx, name, &mut opt, &optim, lr, step + 1, &bar)?;
        let loss = pass.loss_sum / pass.loss_tokens as f64;
        health.observe(ctx, name, step + 1, grad_norm, Some((loss, model.net.cfg.vocab_size)), &bar);
        if !loss.is_finite() && stepped {
            bail!("[{name}] loss became {loss} at step {}: lower the learning rate", step + 1);
        }
        let dt = t0.elapsed().as_secs_f64();
        let done = step + 1;
        if done % ctx.run.log_every.max(1) == 0 || done == total {
            ctx.metrics.log(obj(json!({"stage": index, "stage_name": name, "step": done, "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "loss_tokens": pass.loss_tokens, "step_s": dt, "epoch": sampler.epoch(),
                "tokens_per_s": pass.row_tokens / dt, "update_lost_frac": opt.lost_fraction()})))?;
            bar.println(&format!("[{name}] step {done}/{total} loss {loss:.4} lr {lr:.2e} grad_norm {grad_norm:.3} ({:.2} s/step)", dt));
        }
        bar.step(done, loss, pass.row_tokens / dt);
        if let Some(h) = &held {
            h.periodic(ctx, model, index, name, done, total, eval_loss)?;
        }
        progress(&sampler, tokens).after_step(ctx, done, model, &opt)?;
    }
    bar.finish();
    let after = match &held {
        Some(h) => {
            sharding::ensure_whole(ctx)?;
            h.at_end(ctx, model, index, name, total, before, eval_loss())?
        }
        None => f64::NAN,
    };
    progress(&sampler, tokens).finish(ctx, model, t_stage, "")?;
    Ok(after)
}

/// What one step's forward and backward passes saw, summed over the ranks.
struct Pass {
    /// The summed next-token loss (before dividing by `loss_tokens`).
    loss_sum: f64,
    /// Tokens carrying the loss (at least 1).
    loss_tokens: i64,
    /// Tokens in the step's rows, padding excluded.
    row_tokens: f64,
}

/// Forward and backward of this rank's micro-batches of a step (gradients summed over them and over the
/// ranks, ready for the optimizer step); the loss is a token mean over the whole step's labelled tokens.
fn forward_backward(ctx: &Ctx, model: &Model, opt: &crate::training::optim::AdamW, micro: Vec<Vec<&Row>>, chunk: i64) -> Result<Pass> {
    // the global token count: this rank's, summed over the ranks
    let mut counts = [micro.iter().map(|m| loss_tokens(m)).sum::<i64>() as f64, micro.iter().flatten().map(|r| r.ids.len()).sum::<usize>() as f64];
    data_parallel::sum(ctx, &mut counts)?;
    let (n_tok, row_tokens) = ((counts[0] as i64).max(1), counts[1]);
    let (dev, pad) = (model.net.device(), ctx.tok.pad_id as i64);
    let mut loss_sum = 0.0;
    let mut acc = data_parallel::Accum::new(ctx, opt, micro.iter().filter(|m| !m.is_empty()).count())?;
    for m in micro.iter().filter(|m| !m.is_empty()) {
        acc.next()?;
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
        let (l, _) = logprobs::causal_lm_backward(&model.net, &batch, &labels, 1.0 / n_tok as f64, chunk);
        loss_sum += l;
    }
    acc.finish()?;
    let mut loss_sum = [loss_sum];
    data_parallel::sum(ctx, &mut loss_sum)?;
    Ok(Pass { loss_sum: loss_sum[0], loss_tokens: n_tok, row_tokens })
}
