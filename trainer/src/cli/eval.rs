//! `train eval`: sample k completions per problem over several seeds, score them with the math verifier and
//! report pass@1 (mean over the k samples), unbiased pass@k (Chen et al. 2021, arXiv 2107.03374) and maj@k
//! (majority vote over the extracted answers), each as mean ± standard deviation over the seeds.

use anyhow::{bail, Context, Result};
use clap::Args;
use data::{AnswerFormat, DataConfig, Record, RecordKind};
use model::Model;
use rewards::math::{verify, VerifyConfig};
use rollout::{Engine, EngineConfig, FinishReason, Request, SamplingParams, TokenDecoder};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind};

/// `train eval` options.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json; tokenizer_config.json's chat
    /// template is used when present).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory to put on `--model` (its tokenizer files, when it has them, are used).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Problems: a JSONL / JSON / Parquet file or a Hugging Face datasets directory.
    #[arg(long)]
    pub data: PathBuf,
    /// Split to read when --data is a directory.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Column with the problem text (default: the first of problem, question, prompt that the first row has).
    #[arg(long)]
    pub prompt_column: Option<String>,
    /// Column with the gold answer.
    #[arg(long, default_value = "answer")]
    pub answer_column: String,
    /// How the gold answer is read from its column: auto (gsm8k when the first row has `####`, boxed when it has
    /// `\boxed`, else plain), gsm8k, boxed or plain.
    #[arg(long, default_value = "auto")]
    pub answer_format: String,
    /// Wraps each problem; `{prompt}` is replaced by it, e.g.
    /// "{prompt}\nPlease reason step by step, and put your final answer within \boxed{}."
    #[arg(long)]
    pub prompt_template: Option<String>,
    /// System prompt put before each problem.
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Feed the prompt text without the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Samples per problem and seed (k).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Seeds (independent repetitions); metrics are reported as mean ± standard deviation over them.
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// First seed; seeds are first, first+1, ...
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.6)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = no limit.
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Most new tokens per sample.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Extra stop strings (the tokenizer's end-of-turn tokens always stop).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Evaluate only the first N problems.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Per-problem outputs (one JSON object per problem and seed).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model dtype: float32, bfloat16 or float16 (default float32 on CPU, bfloat16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Decode steps: dynamic, static (fixed shapes; CUDA graphs on a GPU) or auto (static where CUDA graphs work).
    #[arg(long, value_enum, default_value = "dynamic")]
    pub decode: crate::settings::DecodeMode,
    /// KV cache budget in tokens (rows × (prompt + max tokens)); default: batch_size × (longest prompt + max tokens).
    #[arg(long)]
    pub cache_tokens: Option<i64>,
}

struct TokDecoder(Arc<data::Tokenizer>);

impl TokenDecoder for TokDecoder {
    fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.0.decode(&ids, true).unwrap_or_default()
    }
}

/// Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k), computed as a stable product.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k == 0 || k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// Majority vote: the most frequent key (ties: the one seen first); `None` keys do not vote. Returns the
/// index of the first sample carrying the winning key.
pub fn majority(keys: &[Option<String>]) -> Option<usize> {
    let mut counts: Vec<(String, usize, usize)> = Vec::new(); // key, count, first index
    for (i, k) in keys.iter().enumerate() {
        if let Some(k) = k {
            match counts.iter_mut().find(|(x, _, _)| x == k) {
                Some(e) => e.1 += 1,
                None => counts.push((k.clone(), 1, i)),
            }
        }
    }
    let best = counts.iter().map(|e| e.1).max()?;
    counts.iter().find(|e| e.1 == best).map(|e| e.2)
}

/// Mean and sample standard deviation (0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

fn first_row(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim_start();
    if t.starts_with('[') {
        return serde_json::from_str::<Vec<serde_json::Value>>(t).ok()?.into_iter().next();
    }
    serde_json::from_str(t.lines().next()?).ok()
}

fn resolve_columns(a: &EvalArgs) -> Result<(String, AnswerFormat)> {
    let row = if a.data.is_file() { first_row(&a.data) } else { None };
    let prompt = match (&a.prompt_column, &row) {
        (Some(c), _) => c.clone(),
        (None, Some(r)) => ["problem", "question", "prompt"]
            .iter()
            .find(|c| r.get(**c).is_some())
            .map(|c| c.to_string())
            .with_context(|| format!("{}: first row has none of problem, question, prompt; pass --prompt-column", a.data.display()))?,
        (None, None) => bail!("{}: cannot guess the prompt column; pass --prompt-column", a.data.display()),
    };
    let fmt = match a.answer_format.as_str() {
        "gsm8k" => AnswerFormat::Gsm8k,
        "boxed" => AnswerFormat::Boxed,
        "plain" => AnswerFormat::Plain,
        "auto" => match row.as_ref().and_then(|r| r.get(&a.answer_column)).and_then(|v| v.as_str()) {
            Some(s) if s.contains("####") => AnswerFormat::Gsm8k,
            Some(s) if s.contains("\\boxed") => AnswerFormat::Boxed,
            _ => AnswerFormat::Plain,
        },
        other => bail!("--answer-format: unknown value \"{other}\" (expected auto, gsm8k, boxed or plain)"),
    };
    Ok((prompt, fmt))
}

/// Eos ids from the model directory's generation_config.json (an id or a list).
/// A missing or unreadable file gives none.
fn generation_eos(dir: &Path) -> Vec<i64> {
    let Some(g) = model::weights::read_generation_config(dir).ok().flatten() else { return Vec::new() };
    match g.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
        _ => Vec::new(),
    }
}

struct Problem {
    id: String,
    prompt_text: String,
    gold: String,
    prompt_ids: Vec<i64>,
}

pub fn run(a: EvalArgs, device: Device) -> Result<()> {
    check_args(&a)?;
    let (records, prompt_col, answer_format) = read_records(&a)?;
    let tok_dir = a.adapter.as_ref().filter(|d| d.join("tokenizer.json").exists()).unwrap_or(&a.model);
    let (tok, template) = data::Tokenizer::from_dir(tok_dir).with_context(|| format!("tokenizer of {}", tok_dir.display()))?;
    let template = if a.no_chat_template { None } else { template };
    let tok = Arc::new(tok);
    let problems = tokenize_problems(&a, &records, &tok, template.as_ref())?;
    let kind = match &a.dtype {
        Some(s) => model::parse_kind(s).map_err(anyhow::Error::msg)?,
        None if device == Device::Cpu => Kind::Float,
        None => Kind::BFloat16,
    };
    let t0 = std::time::Instant::now();
    let mut m = Model::load(&a.model, Some(kind), device).with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(dir) = &a.adapter {
        m.load_adapter(dir).with_context(|| format!("--adapter {}", dir.display()))?;
    }
    let engine = engine(&a, &m, &tok, &problems)?;
    eprintln!(
        "eval: {} problems from {} (prompt column {prompt_col}, answer format {answer_format:?}), k={} samples x {} seeds, T={} top_p={} max_tokens={}; model loaded in {:.1} s",
        problems.len(),
        a.data.display(),
        a.samples,
        a.seeds,
        a.temperature,
        a.top_p,
        a.max_tokens,
        t0.elapsed().as_secs_f64()
    );
    let mut out = match &a.out {
        Some(p) => {
            if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            Some(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?))
        }
        None => None,
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        max_new_tokens: a.max_tokens,
        stop_strings: a.stop.clone(),
        ..Default::default()
    };
    let tg = std::time::Instant::now();
    let mut seeds = vec![];
    for s in 0..a.seeds {
        let r = eval_seed(&engine, &problems, &params, a.seed + s as u64, a.samples, out.as_mut().map(|w| w as &mut dyn Write))?;
        r.print(a.samples);
        seeds.push(r);
    }
    if let Some(mut w) = out {
        w.flush().context("writing --out")?;
    }
    report(&a, problems.len(), &seeds, tg.elapsed().as_secs_f64());
    Ok(())
}

fn check_args(a: &EvalArgs) -> Result<()> {
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    Ok(())
}

/// The problems of `--data`, with the prompt column and answer format used.
fn read_records(a: &EvalArgs) -> Result<(Vec<Record>, String, AnswerFormat)> {
    let (prompt_col, answer_format) = resolve_columns(a)?;
    let mut dc = DataConfig::new(&a.data);
    dc.split = a.split.clone();
    dc.kind = Some(RecordKind::PromptAnswer);
    dc.prompt = Some(prompt_col.clone());
    dc.answer = Some(a.answer_column.clone());
    dc.answer_format = answer_format;
    dc.limit = a.limit;
    dc.system_prompt = a.system_prompt.clone();
    dc.prompt_template = a.prompt_template.clone();
    let records = data::load_records(&dc).with_context(|| format!("reading {}", a.data.display()))?;
    if records.is_empty() {
        bail!("{}: no problems", a.data.display());
    }
    Ok((records, prompt_col, answer_format))
}

/// The problems with their prompts tokenized with the chat template (unless `--no-chat-template`).
fn tokenize_problems(a: &EvalArgs, records: &[Record], tok: &data::Tokenizer, template: Option<&data::ChatTemplate>) -> Result<Vec<Problem>> {
    let tcfg = data::TokenizeConfig::default();
    let mut problems = Vec::with_capacity(records.len());
    for r in records {
        let Record::PromptAnswer { prompt, answer, id, .. } = r else { bail!("{}: expected prompt/answer rows", a.data.display()) };
        let ids = data::tokenize::tokenize_prompt(tok, template, prompt, &tcfg).with_context(|| format!("tokenizing problem {id}"))?;
        let prompt_text = prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n");
        problems.push(Problem { id: id.clone(), prompt_text, gold: answer.clone(), prompt_ids: ids.iter().map(|&i| i as i64).collect() });
    }
    Ok(problems)
}

/// The rollout engine on `m`: stops at the tokenizer's end-of-turn ids and generation_config.json's eos ids,
/// batching `--batch-size` sequences in a cache for the longest prompt plus `--max-tokens`.
fn engine<'m>(a: &EvalArgs, m: &'m Model, tok: &Arc<data::Tokenizer>, problems: &[Problem]) -> Result<Engine<'m>> {
    let mut eos: Vec<i64> = tok.stop_token_ids().iter().map(|&i| i as i64).collect();
    eos.extend(generation_eos(&a.model));
    eos.retain(|&t| t < m.net.cfg.vocab_size);
    eos.sort_unstable();
    eos.dedup();
    let longest = problems.iter().map(|p| p.prompt_ids.len()).max().unwrap_or(0);
    let cache = a.cache_tokens.unwrap_or((a.batch_size * (longest + a.max_tokens)) as i64);
    let static_decode = a.decode.is_static(m.net.device());
    let cfg = EngineConfig {
        max_batch_seqs: a.batch_size,
        cache_budget_tokens: cache,
        eos_token_ids: eos,
        pad_token_id: tok.pad_id as i64,
        static_decode,
        ..Default::default()
    };
    let mut engine = Engine::new(&m.net, cfg)?;
    engine.set_decoder(Arc::new(TokDecoder(tok.clone())));
    Ok(engine)
}

/// One seed's means over the problems, and the tokens it generated.
struct SeedResult {
    seed: u64,
    pass1: f64,
    pass_k: f64,
    maj_k: f64,
    tokens: usize,
}

impl SeedResult {
    fn print(&self, k: usize) {
        if k > 1 {
            eprintln!("seed {}: pass@1 {:.4}  pass@{k} {:.4}  maj@{k} {:.4}", self.seed, self.pass1, self.pass_k, self.maj_k);
        } else {
            eprintln!("seed {}: pass@1 {:.4}", self.seed, self.pass1);
        }
    }
}

/// k samples of every problem with `seed`, judged; one `--out` row per problem.
fn eval_seed(engine: &Engine, problems: &[Problem], params: &SamplingParams, seed: u64, k: usize, mut out: Option<&mut dyn Write>) -> Result<SeedResult> {
    let vcfg = VerifyConfig::default();
    let reqs: Vec<Request> = problems
        .iter()
        .enumerate()
        .map(|(i, p)| Request { prompt_ids: p.prompt_ids.clone(), n: k, params: SamplingParams { seed: Some(rollout::rng::mix64(seed ^ rollout::rng::mix64(i as u64))), ..params.clone() } })
        .collect();
    let comps = engine.generate(&reqs).context("generating")?;
    let (mut sum1, mut sumk, mut summaj, mut tokens) = (0.0, 0.0, 0.0, 0usize);
    for (i, p) in problems.iter().enumerate() {
        let mine = &comps[i * k..(i + 1) * k];
        let verdicts: Vec<_> = mine.iter().map(|c| verify(&p.gold, c.text.as_deref().unwrap_or(""), &vcfg)).collect();
        let c = verdicts.iter().filter(|v| v.equivalent).count();
        let keys: Vec<Option<String>> = verdicts.iter().map(|v| v.pred_normalized.clone().or_else(|| v.pred_extracted.clone())).collect();
        let maj = majority(&keys);
        let maj_ok = maj.is_some_and(|j| verdicts[j].equivalent);
        let (p1, pk) = (c as f64 / k as f64, pass_at_k(k, c, k));
        sum1 += p1;
        sumk += pk;
        summaj += maj_ok as u8 as f64;
        tokens += mine.iter().map(|c| c.completion_tokens).sum::<usize>();
        if let Some(w) = out.as_mut() {
            let samples: Vec<serde_json::Value> = mine
                .iter()
                .zip(&verdicts)
                .map(|(c, v)| {
                    serde_json::json!({
                        "text": c.text, "answer": v.pred_extracted, "correct": v.equivalent,
                        "finish_reason": match c.finish_reason { FinishReason::Stop => "stop", FinishReason::Length => "length" },
                        "completion_tokens": c.completion_tokens,
                    })
                })
                .collect();
            let row = serde_json::json!({
                "seed": seed, "index": i, "id": p.id, "prompt": p.prompt_text, "gold": p.gold,
                "prompt_tokens": p.prompt_ids.len(), "k": k, "correct": c,
                "pass@1": p1, format!("pass@{k}"): pk, format!("maj@{k}"): maj_ok,
                "majority_answer": maj.and_then(|j| verdicts[j].pred_extracted.clone()),
                "samples": samples,
            });
            writeln!(w, "{row}").context("writing --out")?;
        }
    }
    let n = problems.len() as f64;
    Ok(SeedResult { seed, pass1: sum1 / n, pass_k: sumk / n, maj_k: summaj / n, tokens })
}

/// The summary: one JSON line on stdout, one human line on stderr (mean ± std over the seeds).
fn report(a: &EvalArgs, problems: usize, seeds: &[SeedResult], secs: f64) {
    let k = a.samples;
    let of = |f: fn(&SeedResult) -> f64| mean_std(&seeds.iter().map(f).collect::<Vec<_>>());
    let ((m1, s1), (mk, sk), (mm, sm)) = (of(|r| r.pass1), of(|r| r.pass_k), of(|r| r.maj_k));
    let tokens_total: usize = seeds.iter().map(|r| r.tokens).sum();
    println!(
        "{}",
        serde_json::json!({
            "data": a.data, "problems": problems, "k": k, "seeds": a.seeds, "temperature": a.temperature,
            "pass@1": {"mean": m1, "std": s1}, format!("pass@{k}"): {"mean": mk, "std": sk}, format!("maj@{k}"): {"mean": mm, "std": sm},
            "generated_tokens": tokens_total, "generate_seconds": secs,
        })
    );
    let at_k = if k > 1 { format!("  pass@{k} {:.2} ± {:.2}  maj@{k} {:.2} ± {:.2}", 100.0 * mk, 100.0 * sk, 100.0 * mm, 100.0 * sm) } else { String::new() };
    eprintln!(
        "pass@1 {:.2} ± {:.2}{at_k}  (%, over {} seeds; {} tokens in {:.1} s, {:.0} tok/s)",
        100.0 * m1,
        100.0 * s1,
        a.seeds,
        tokens_total,
        secs,
        tokens_total as f64 / secs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_hand_computed_values() {
        // n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        // k = 1 is the fraction correct
        assert!((pass_at_k(8, 3, 1) - 3.0 / 8.0).abs() < 1e-12);
        // n = 10, c = 1, k = 5: 1 - C(9,5)/C(10,5) = 1 - 126/252
        assert!((pass_at_k(10, 1, 5) - 0.5).abs() < 1e-12);
        assert_eq!(pass_at_k(4, 0, 4), 0.0);
        assert_eq!(pass_at_k(4, 1, 4), 1.0);
        assert_eq!(pass_at_k(6, 4, 3), 1.0); // n - c < k
        assert!(pass_at_k(2, 1, 3).is_nan());
    }

    #[test]
    fn majority_vote_counts_and_breaks_ties_by_first_seen() {
        let k = |s: &[Option<&str>]| s.iter().map(|x| x.map(str::to_string)).collect::<Vec<_>>();
        assert_eq!(majority(&k(&[Some("3"), Some("4"), Some("4"), None])), Some(1));
        assert_eq!(majority(&k(&[Some("3"), Some("4"), Some("4"), Some("3")])), Some(0));
        assert_eq!(majority(&k(&[None, None])), None);
        assert_eq!(majority(&k(&[None, Some("7")])), Some(1));
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[0.5, 0.7, 0.6]);
        assert!((m - 0.6).abs() < 1e-12);
        assert!((s - 0.1).abs() < 1e-12);
        assert_eq!(mean_std(&[0.25]), (0.25, 0.0));
    }
}
