//! The Rollout-DPO stage (stage 3 of Phi-4-Mini-Reasoning, arXiv 2504.21233): the pairs are built first — for
//! each problem it takes the given teacher rollouts or samples `num_samples` from the current policy, verifies
//! each answer with the rewards crate, and pairs verified-correct (chosen) with incorrect (rejected) rollouts of
//! the same problem. Problems without both kinds are dropped and counted. The pairs are written to a JSONL
//! file, then the DPO loop (`super::dpo`) trains on them; a resumed stage reads the pairs file back.

use anyhow::{bail, Context, Result};
use data::{DataConfig, Message, Record};
use model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::dpo::{self, DpoTable};
use crate::observe::metrics::obj;
use crate::settings::SyntheticSpec;
use crate::training::checkpoint::Checkpoint;
use crate::training::{data_parallel, generate, Ctx};

/// How many pairs a problem gives: `"one"`, `"all"` (every correct × incorrect combination) or a number
/// (combinations up to that cap, spread evenly over the rollouts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum PairsPerProblem {
    Cap(usize),
    Named(String),
}

impl Default for PairsPerProblem {
    fn default() -> Self {
        PairsPerProblem::Named("one".into())
    }
}

impl PairsPerProblem {
    /// The cap, or an error message.
    pub fn cap(&self) -> std::result::Result<usize, String> {
        match self {
            PairsPerProblem::Cap(0) => Err("pairs_per_problem must be at least 1".into()),
            PairsPerProblem::Cap(n) => Ok(*n),
            PairsPerProblem::Named(s) if s == "one" => Ok(1),
            PairsPerProblem::Named(s) if s == "all" => Ok(usize::MAX),
            PairsPerProblem::Named(s) => Err(format!("pairs_per_problem must be \"one\", \"all\" or a number, got {s:?}")),
        }
    }
}

dpo::dpo_stage! {
    /// `kind = "rollout_dpo"`.
    pub struct RolloutDpoStage {
        /// Peak learning rate (Phi-4-mini used 5e-7).
        #[serde(default = "default_lr", alias = "learning_rate")]
        pub lr: f64,
        /// Problems from a dataset (`prompt` and `answer` columns).
        #[serde(default)]
        pub data: Option<DataConfig>,
        /// Synthetic arithmetic problems.
        #[serde(default)]
        pub synthetic: Option<SyntheticSpec>,
        /// A JSONL file of teacher rollouts, one problem a line: `{"prompt": text or messages, "answer": gold,
        /// "rollouts": [text, ...]}`; used instead of sampling (and instead of `data`/`synthetic`).
        #[serde(default)]
        pub teacher_rollouts: Option<PathBuf>,
        /// Rollouts sampled per problem from the current policy.
        #[serde(default = "default_samples", alias = "num_generations")]
        pub num_samples: usize,
        /// Sampling temperature.
        #[serde(default = "one_f")]
        pub temperature: f64,
        /// Nucleus sampling threshold.
        #[serde(default = "one_f")]
        pub top_p: f64,
        /// Most tokens per rollout.
        #[serde(default = "default_new_tokens", alias = "max_completion_length")]
        pub max_new_tokens: usize,
        /// Pairs per problem: "one", "all", or a cap on the correct × incorrect combinations.
        #[serde(default)]
        pub pairs_per_problem: PairsPerProblem,
        /// Order problems by pass rate, hardest (lowest) first; with `max_pairs` the hardest are kept.
        #[serde(default = "yes")]
        pub hardest_first: bool,
        /// Keep at most this many pairs in all (after ordering).
        #[serde(default)]
        pub max_pairs: Option<usize>,
        /// Where the pairs are written (default OUTPUT/<stage name>/pairs.jsonl).
        #[serde(default)]
        pub pairs_path: Option<PathBuf>,
    }
}

fn default_lr() -> f64 {
    1e-6
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_samples() -> usize {
    8
}
fn default_new_tokens() -> usize {
    256
}

impl crate::stages::kind::StageKind for RolloutDpoStage {
    fn resolve_paths(&mut self, f: &mut dyn FnMut(&mut PathBuf)) {
        if let Some(d) = self.data.as_mut() {
            f(&mut d.path);
        }
        if let Some(p) = self.teacher_rollouts.as_mut() {
            f(p);
        }
        if let Some(p) = self.pairs_path.as_mut() {
            f(p);
        }
    }

    fn validate(&self, at: &str, p: &mut Vec<String>) {
        let n = self.data.is_some() as usize + self.synthetic.is_some() as usize + self.teacher_rollouts.is_some() as usize;
        if n != 1 {
            p.push(format!("{at}: needs exactly one of `data` (problems), `synthetic` or `teacher_rollouts`"));
        }
        dpo::validate_data(&self.data, at, p);
        if let Some(t) = &self.teacher_rollouts {
            if !t.is_file() {
                p.push(format!("{at}: teacher_rollouts {} does not exist", t.display()));
            }
        }
        if self.teacher_rollouts.is_none() && self.num_samples < 2 {
            p.push(format!("{at}: num_samples must be at least 2 (a pair needs a correct and an incorrect rollout)"));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            p.push(format!("{at}: temperature must be > 0 (greedy rollouts are all the same), got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            p.push(format!("{at}: top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            p.push(format!("{at}: max_new_tokens must be at least 1"));
        }
        if let Err(e) = self.pairs_per_problem.cap() {
            p.push(format!("{at}: {e}"));
        }
        if self.max_pairs == Some(0) {
            p.push(format!("{at}: max_pairs must be at least 1"));
        }
        if self.tokenize.max_length < 2 {
            p.push(format!("{at}: tokenize.max_length must be at least 2"));
        }
        self.args().validate(at, p);
    }

    fn memory_shape(&self, g: &crate::settings::GenerationSpec) -> crate::training::memory::StageShape {
        let mut s = self.args().memory_shape(self.tokenize.max_length, self.gradient_checkpointing);
        if self.teacher_rollouts.is_none() {
            let problems = self.synthetic.as_ref().map_or(g.max_batch_seqs, |p| p.count);
            s.sampling = Some((super::kind::kv_slots(g, problems * self.num_samples, self.tokenize.max_length), g.fuse_weights));
        }
        s
    }

    fn plan(&self) -> String {
        let src = match (&self.teacher_rollouts, &self.data, &self.synthetic) {
            (Some(t), _, _) => format!("teacher rollouts {}", t.display()),
            (None, Some(d), _) => format!("{} problems × {} samples", d.path.display(), self.num_samples),
            (None, None, Some(s)) => format!("{} synthetic problems × {} samples", s.count, self.num_samples),
            _ => String::new(),
        };
        format!("{src}, pairs per problem {:?}; then DPO: {}; lr {:.1e} {:?}", self.pairs_per_problem, self.args().plan(), self.lr, self.schedule)
    }

    fn run(&self, ctx: &Ctx, index: usize, name: &str, model: &Model, resume: Option<&Checkpoint>) -> Result<f64> {
        let path = pairs_path(ctx, self, name);
        let pairs = match resume {
            // the pairs came from the stage's starting model; reuse them as written
            Some(_) => read_pairs(&path).with_context(|| format!("[{name}] resuming needs the pairs written when the stage started"))?,
            None => build_pairs(ctx, index, name, self, model, &path)?,
        };
        if resume.is_some() {
            eprintln!("[{name}] {} pairs from {}", pairs.len(), path.display());
        }
        let records: Vec<Record> = pairs.into_iter().map(|p| Record::Preference { prompt: p.prompt, chosen: p.chosen, rejected: p.rejected }).collect();
        dpo::train(ctx, index, name, &records, self, json!({"pairs": path.display().to_string()}), model, resume)
    }
}

/// One problem with its rollouts and their verdicts.
#[derive(Debug, Clone)]
pub struct Judged {
    pub prompt: Vec<Message>,
    pub answer: String,
    pub rollouts: Vec<String>,
    pub correct: Vec<bool>,
}

/// A selected pair, as written to the pairs file (readable by `data` with `prompt`/`chosen`/`rejected`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairRecord {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    pub answer: String,
    pub problem: usize,
    pub pass_rate: f64,
}

/// What selection did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Selection {
    pub problems: usize,
    pub pairs: usize,
    /// Problems whose rollouts were all correct (too easy: nothing to prefer against).
    pub dropped_all_correct: usize,
    /// Problems without a correct rollout.
    pub dropped_none_correct: usize,
    /// Pairs cut by `max_pairs`.
    pub cut_by_max_pairs: usize,
    /// Mean pass rate over all problems.
    pub mean_pass_rate: f64,
}

/// Up to `cap` (correct, incorrect) index pairs out of `nc` × `nr`, spread evenly: each next pair is the unused
/// one whose two rollouts have been used least so far (ties: lowest indices), so that no rollout repeats while
/// another is unused.
pub fn balanced_pairs(nc: usize, nr: usize, cap: usize) -> Vec<(usize, usize)> {
    let want = cap.min(nc * nr);
    let (mut uc, mut ur) = (vec![0usize; nc], vec![0usize; nr]);
    let mut used = vec![false; nc * nr];
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let mut best: Option<(usize, usize, usize)> = None;
        for c in 0..nc {
            for r in 0..nr {
                if used[c * nr + r] {
                    continue;
                }
                let score = uc[c].max(ur[r]) * 2 + uc[c].min(ur[r]);
                if best.is_none_or(|b| score < b.0) {
                    best = Some((score, c, r));
                }
            }
        }
        let (_, c, r) = best.unwrap();
        used[c * nr + r] = true;
        uc[c] += 1;
        ur[r] += 1;
        out.push((c, r));
    }
    out
}

/// Pairs verified-correct (chosen) with incorrect (rejected) rollouts of each problem. Identical rollout texts
/// count once. Problems without both kinds are dropped and counted; with `hardest_first` problems are ordered
/// by pass rate, lowest first (stable), before `max_pairs` cuts.
pub fn select_pairs(problems: &[Judged], cap: usize, hardest_first: bool, max_pairs: Option<usize>) -> (Vec<PairRecord>, Selection) {
    let mut sel = Selection { problems: problems.len(), ..Default::default() };
    let mut per: Vec<(f64, usize, Vec<PairRecord>)> = vec![];
    let mut rate_sum = 0.0;
    for (i, p) in problems.iter().enumerate() {
        let n = p.rollouts.len().max(1);
        let rate = p.correct.iter().filter(|&&c| c).count() as f64 / n as f64;
        rate_sum += rate;
        let mut good: Vec<&str> = vec![];
        let mut bad: Vec<&str> = vec![];
        for (t, &ok) in p.rollouts.iter().zip(&p.correct) {
            let v = if ok { &mut good } else { &mut bad };
            if !v.contains(&t.as_str()) {
                v.push(t);
            }
        }
        if good.is_empty() {
            sel.dropped_none_correct += 1;
            continue;
        }
        if bad.is_empty() {
            sel.dropped_all_correct += 1;
            continue;
        }
        let pairs = balanced_pairs(good.len(), bad.len(), cap)
            .into_iter()
            .map(|(c, r)| PairRecord { prompt: p.prompt.clone(), chosen: good[c].to_string(), rejected: bad[r].to_string(), answer: p.answer.clone(), problem: i, pass_rate: rate })
            .collect();
        per.push((rate, i, pairs));
    }
    if hardest_first {
        per.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
    let mut out: Vec<PairRecord> = per.into_iter().flat_map(|x| x.2).collect();
    if let Some(m) = max_pairs {
        if out.len() > m {
            sel.cut_by_max_pairs = out.len() - m;
            out.truncate(m);
        }
    }
    sel.pairs = out.len();
    sel.mean_pass_rate = if problems.is_empty() { 0.0 } else { rate_sum / problems.len() as f64 };
    (out, sel)
}

/// One line of a teacher-rollouts file.
#[derive(Deserialize)]
struct TeacherLine {
    prompt: serde_json::Value,
    answer: serde_json::Value,
    rollouts: Vec<String>,
}

fn prompt_messages(v: &serde_json::Value) -> Option<Vec<Message>> {
    match v {
        serde_json::Value::String(s) => Some(vec![Message::user(s.clone())]),
        other => serde_json::from_value(other.clone()).ok(),
    }
}

fn read_teacher(path: &Path) -> Result<Vec<(Vec<Message>, String, Vec<String>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let t: TeacherLine = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}:{}: expected {{\"prompt\", \"answer\", \"rollouts\": [..]}}: {e}", path.display(), i + 1))?;
        let prompt = prompt_messages(&t.prompt).with_context(|| format!("{}:{}: `prompt` must be a string or a list of {{role, content}} messages", path.display(), i + 1))?;
        let answer = match t.answer {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        out.push((prompt, answer, t.rollouts));
    }
    Ok(out)
}

fn judge(problems: Vec<(Vec<Message>, String, Vec<String>)>) -> Vec<Judged> {
    let cfg = rewards::math::VerifyConfig::default();
    problems
        .into_iter()
        .map(|(prompt, answer, rollouts)| {
            let correct = rollouts.iter().map(|r| rewards::math::verify(&answer, r, &cfg).equivalent).collect();
            Judged { prompt, answer, rollouts, correct }
        })
        .collect()
}

/// `num_samples` rollouts per problem from the policy.
fn sample(ctx: &Ctx, index: usize, s: &RolloutDpoStage, model: &Model, problems: &[(Vec<Message>, String)]) -> Result<Vec<Vec<String>>> {
    let params = rollout::SamplingParams { temperature: s.temperature as f32, top_p: s.top_p as f32, max_new_tokens: s.max_new_tokens, ..Default::default() };
    let prompts = problems.iter().map(|(p, _)| generate::prompt_ids(&ctx.tok, ctx.template.as_ref(), p)).collect::<Result<Vec<_>>>()?;
    // data parallel: each rank samples its share of the problems (seeded as in the whole call), all gather
    let share = data_parallel::share_range(ctx, prompts.len());
    let seed = ctx.run.seed.wrapping_add(1000 + index as u64);
    let done = generate::generate_at(ctx, &model.net, &prompts[share.clone()], s.num_samples, &params, seed, share.start)?;
    let stop = generate::stop_ids(&ctx.tok);
    let mut out = vec![vec![]; share.len()];
    for c in done {
        out[c.request_index].push(generate::completion_text(&ctx.tok, &c.token_ids, &stop)?);
    }
    data_parallel::gather_concat(ctx, out)
}

fn pairs_path(ctx: &Ctx, s: &RolloutDpoStage, name: &str) -> PathBuf {
    s.pairs_path.clone().unwrap_or_else(|| ctx.output.join(name).join("pairs.jsonl"))
}

fn read_pairs(path: &Path) -> Result<Vec<PairRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{}:{}: not a pair record: {e}", path.display(), i + 1)))
        .collect()
}

/// Judged rollouts of every problem (the teacher's, or sampled from `model`), paired and written to `path`.
fn build_pairs(ctx: &Ctx, index: usize, name: &str, s: &RolloutDpoStage, model: &Model, path: &Path) -> Result<Vec<PairRecord>> {
    let t0 = Instant::now();
    let judged = match &s.teacher_rollouts {
        Some(t) => judge(read_teacher(t)?),
        None => {
            let problems = problems(name, s)?;
            let rollouts = sample(ctx, index, s, model, &problems)?;
            judge(problems.into_iter().zip(rollouts).map(|((p, a), r)| (p, a, r)).collect())
        }
    };
    let cap = s.pairs_per_problem.cap().map_err(|e| anyhow::anyhow!("[{name}] {e}"))?;
    let (pairs, sel) = select_pairs(&judged, cap, s.hardest_first, s.max_pairs);
    let mut text = String::new();
    for p in &pairs {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).with_context(|| format!("creating the directory of {}", path.display()))?;
    model::weights::write_atomic(path, text.as_bytes())?;
    eprintln!(
        "[{name}] {} problems (mean pass rate {:.1}%): {} pairs written to {}; dropped {} with every rollout correct and {} with none correct{} ({:.1} s)",
        sel.problems,
        100.0 * sel.mean_pass_rate,
        sel.pairs,
        path.display(),
        sel.dropped_all_correct,
        sel.dropped_none_correct,
        if sel.cut_by_max_pairs > 0 { format!(", {} pairs cut by max_pairs", sel.cut_by_max_pairs) } else { String::new() },
        t0.elapsed().as_secs_f64()
    );
    let mut rec = obj(json!({"stage": index, "stage_name": name, "step": 0, "pairs_file": path.display().to_string()}));
    if let serde_json::Value::Object(m) = serde_json::to_value(&sel)? {
        rec.extend(m);
    }
    ctx.metrics.log(rec)?;
    if pairs.is_empty() {
        bail!(
            "[{name}] no pairs: of {} problems, {} had every rollout correct and {} none correct; raise num_samples or temperature, or use other problems",
            sel.problems,
            sel.dropped_all_correct,
            sel.dropped_none_correct
        );
    }
    Ok(pairs)
}

/// The stage's problems (prompt messages and gold answer), from its dataset or the synthetic generator.
fn problems(name: &str, s: &RolloutDpoStage) -> Result<Vec<(Vec<Message>, String)>> {
    let records = match (&s.data, &s.synthetic) {
        (Some(d), _) => data::load_records(d).with_context(|| format!("[{name}] reading {}", d.path.display()))?,
        (None, Some(spec)) => spec.generator()?.prompt_answer(spec.start, spec.count),
        _ => bail!("[{name}] the stage has no problems"),
    };
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            Record::PromptAnswer { prompt, answer, .. } => Ok((prompt, answer)),
            _ => bail!("[{name}] problem {} is not a prompt with an answer (name the `prompt` and `answer` columns)", i + 1),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;


    fn judged(rollouts: &[(&str, bool)]) -> Judged {
        Judged {
            prompt: vec![Message::user("q")],
            answer: "1".into(),
            rollouts: rollouts.iter().map(|r| r.0.to_string()).collect(),
            correct: rollouts.iter().map(|r| r.1).collect(),
        }
    }

    #[test]
    fn one_pair_per_problem_drops_and_counts_unpairable_problems() {
        let probs = vec![
            judged(&[("a", true), ("b", false), ("c", false)]),
            judged(&[("a", true), ("a2", true)]),
            judged(&[("x", false), ("y", false)]),
            judged(&[("a", true), ("a3", true), ("z", false), ("a4", true)]),
        ];
        let (pairs, sel) = select_pairs(&probs, 1, false, None);
        assert_eq!(sel.problems, 4);
        assert_eq!(sel.dropped_all_correct, 1);
        assert_eq!(sel.dropped_none_correct, 1);
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[0].chosen.as_str(), pairs[0].rejected.as_str(), pairs[0].problem), ("a", "b", 0));
        assert_eq!((pairs[1].chosen.as_str(), pairs[1].rejected.as_str(), pairs[1].problem), ("a", "z", 3));
        assert!((sel.mean_pass_rate - (1.0 / 3.0 + 1.0 + 0.0 + 0.75) / 4.0).abs() < 1e-12);
    }

    #[test]
    fn all_combinations_are_capped_and_balanced() {
        let p = judged(&[("c0", true), ("r0", false), ("c1", true), ("r1", false), ("r2", false), ("r2", false)]);
        // 2 distinct correct × 3 distinct incorrect (the repeated "r2" counts once)
        let (all, _) = select_pairs(std::slice::from_ref(&p), usize::MAX, false, None);
        assert_eq!(all.len(), 6);
        let mut seen: Vec<(String, String)> = all.iter().map(|x| (x.chosen.clone(), x.rejected.clone())).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 6);
        let (three, _) = select_pairs(std::slice::from_ref(&p), 3, false, None);
        assert_eq!(three.len(), 3);
        // balanced: all three incorrect rollouts used once, the correct ones used 2 and 1 times
        let mut rej: Vec<&str> = three.iter().map(|x| x.rejected.as_str()).collect();
        rej.sort();
        assert_eq!(rej, vec!["r0", "r1", "r2"]);
        assert!(three.iter().any(|x| x.chosen == "c0") && three.iter().any(|x| x.chosen == "c1"));
        assert_eq!(balanced_pairs(2, 2, 2), vec![(0, 0), (1, 1)]);
    }

    #[test]
    fn harder_problems_come_first_and_max_pairs_keeps_them() {
        let probs = vec![
            judged(&[("a", true), ("a1", true), ("a2", true), ("b", false)]), // 75%
            judged(&[("a", true), ("b", false), ("c", false), ("d", false)]), // 25%
            judged(&[("a", true), ("b", false)]),                             // 50%
        ];
        let (pairs, sel) = select_pairs(&probs, 1, true, Some(2));
        assert_eq!(pairs.iter().map(|p| p.problem).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(sel.cut_by_max_pairs, 1);
        assert_eq!(sel.pairs, 2);
        let (pairs, _) = select_pairs(&probs, 1, false, None);
        assert_eq!(pairs.iter().map(|p| p.problem).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn pairs_per_problem_parses() {
        assert_eq!(PairsPerProblem::Named("one".into()).cap(), Ok(1));
        assert_eq!(PairsPerProblem::Named("all".into()).cap(), Ok(usize::MAX));
        assert_eq!(PairsPerProblem::Cap(4).cap(), Ok(4));
        assert!(PairsPerProblem::Cap(0).cap().is_err());
        assert!(PairsPerProblem::Named("two".into()).cap().is_err());
    }


    #[test]
    fn teacher_lines_parse_and_bad_lines_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.jsonl");
        std::fs::write(&p, "{\"prompt\": \"What is 1+1?\", \"answer\": 2, \"rollouts\": [\"2\", \"3\"]}\n").unwrap();
        let v = read_teacher(&p).unwrap();
        assert_eq!(v[0].1, "2");
        let j = judge(v);
        assert_eq!(j[0].correct, vec![true, false]);
        std::fs::write(&p, "{\"prompt\": \"x\"}\n").unwrap();
        let e = read_teacher(&p).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1"), "{e}");
    }
}
