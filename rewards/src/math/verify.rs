//! `verify(gold, pred)`: extraction, parsing and equivalence with a bounded cost.

use super::ast::Expr;
use super::budget::Budget;
use super::equiv::{prepare, Checker, EquivConfig};
use super::extract::{extract_candidates, Candidate, ExtractConfig, Source};
use super::parse::parse;
use super::MathError;
use serde::{Deserialize, Serialize};

/// Settings for [`verify`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// How answers are found in the gold text.
    pub gold_extract: ExtractConfig,
    /// How answers are found in the prediction.
    pub pred_extract: ExtractConfig,
    /// Compare numbers after rounding to this many decimals when either side contains a decimal
    /// literal (e.g. 2 accepts 0.33 for 1/3). None (default): exact.
    pub float_rounding: Option<u32>,
    /// Variables must match by name (default true).
    pub strict: bool,
    /// Also accept an inequality in the prediction for an interval in the gold answer.
    pub allow_set_relation_comp: bool,
    /// Operation budget per call (parse steps, arithmetic, evaluation points).
    pub max_ops: u64,
    /// Largest exact intermediate number, in decimal digits.
    pub max_digits: u64,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            gold_extract: ExtractConfig::default(),
            pred_extract: ExtractConfig::default(),
            float_rounding: None,
            strict: true,
            allow_set_relation_comp: false,
            max_ops: 300_000,
            max_digits: 3000,
        }
    }
}

/// The outcome of one comparison.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    /// Whether the prediction matches the gold answer.
    pub equivalent: bool,
    /// The answer string found in the gold text.
    pub gold_extracted: Option<String>,
    /// The answer string found in the prediction.
    pub pred_extracted: Option<String>,
    /// Normal form of the gold answer.
    pub gold_normalized: Option<String>,
    /// Normal form of the predicted answer.
    pub pred_normalized: Option<String>,
    /// Where the prediction's answer was found (`boxed`, `phrase`, `latex`, ...).
    pub pred_source: Option<Source>,
    /// Why the verdict was reached when it was not a plain comparison.
    pub note: Option<String>,
}

fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect::<String>().trim_matches('$').to_string()
}

/// `C`, `(C)`, `\text{(C)}`, `\textbf{C}` → 'C' (A–E).
fn choice_of(s: &str) -> Option<char> {
    let mut t = s.trim();
    for p in ["\\textbf{", "\\text{", "\\mathrm{", "\\mathbf{"] {
        if let Some(r) = t.strip_prefix(p) {
            t = r.strip_suffix('}')?;
        }
    }
    let t = t.trim().trim_start_matches('(').trim_end_matches(')').trim();
    let mut it = t.chars();
    match (it.next(), it.next()) {
        (Some(c @ 'A'..='E'), None) => Some(c),
        _ => None,
    }
}

/// Parse the first candidate that parses.
fn first_parsed(cands: &[Candidate], budget: &mut Budget) -> (Option<(usize, Expr)>, Option<MathError>) {
    let mut last_err = None;
    for (i, c) in cands.iter().enumerate() {
        match parse(&c.text, budget) {
            Ok(e) => return (Some((i, e)), None),
            Err(MathError::Budget) => return (None, Some(MathError::Budget)),
            Err(e) => last_err = Some(e),
        }
    }
    (None, last_err)
}

/// Decide whether `pred` (a response or a bare answer) gives the answer in `gold`.
///
/// Never panics and always returns within `cfg.max_ops` operations.
pub fn verify(gold: &str, pred: &str, cfg: &VerifyConfig) -> Verdict {
    let mut budget = Budget::new(cfg.max_ops, cfg.max_digits);
    let gc = extract_candidates(gold, &cfg.gold_extract);
    // A gold answer that is a choice letter (`C`, `(C)`, `\text{(C)}`) turns on letter extraction.
    let pc = match (&cfg.pred_extract.choices, gc.first().and_then(|c| choice_of(&c.text))) {
        (None, Some(_)) => extract_candidates(pred, &ExtractConfig { choices: Some("ABCDE".into()), ..cfg.pred_extract.clone() }),
        _ => extract_candidates(pred, &cfg.pred_extract),
    };
    let mut v = Verdict {
        equivalent: false,
        gold_extracted: gc.first().map(|c| c.text.clone()),
        pred_extracted: pc.first().map(|c| c.text.clone()),
        gold_normalized: None,
        pred_normalized: None,
        pred_source: pc.first().map(|c| c.source),
        note: None,
    };
    if gc.is_empty() {
        v.note = Some("no answer found in gold".into());
        return v;
    }
    if pc.is_empty() {
        v.note = Some("no answer found in prediction".into());
        return v;
    }
    let (g, gerr) = first_parsed(&gc, &mut budget);
    let (p, perr) = first_parsed(&pc, &mut budget);
    if let Some((i, _)) = &g {
        v.gold_extracted = Some(gc[*i].text.clone());
    }
    if let Some((i, _)) = &p {
        v.pred_extracted = Some(pc[*i].text.clone());
        v.pred_source = Some(pc[*i].source);
    }
    let same_text = |v: &Verdict| match (&v.gold_extracted, &v.pred_extracted) {
        (Some(a), Some(b)) => squash(a) == squash(b),
        _ => false,
    };
    let (Some((_, g)), Some((_, p))) = (g, p) else {
        // Unparseable: identical answer strings still match.
        v.equivalent = same_text(&v);
        v.note = Some(match (gerr, perr) {
            (Some(e), _) => format!("gold: {e}"),
            (_, Some(e)) => format!("prediction: {e}"),
            _ => "unparseable".into(),
        });
        return v;
    };
    let g = prepare(g);
    let p = prepare(p);
    v.gold_normalized = Some(g.to_string());
    v.pred_normalized = Some(p.to_string());
    let ecfg = EquivConfig { float_rounding: cfg.float_rounding, strict: cfg.strict, allow_set_relation_comp: cfg.allow_set_relation_comp };
    let mut ck = Checker { cfg: &ecfg, budget: &mut budget };
    match ck.equiv(&g, &p) {
        Ok(eq) => v.equivalent = eq || same_text(&v),
        Err(e) => {
            v.equivalent = same_text(&v);
            v.note = Some(e.to_string());
        }
    }
    v
}

/// Verify many (gold, prediction) pairs in parallel (rayon), in order.
pub fn verify_batch<G: AsRef<str> + Sync, P: AsRef<str> + Sync>(pairs: &[(G, P)], cfg: &VerifyConfig) -> Vec<Verdict> {
    use rayon::prelude::*;
    pairs.par_iter().map(|(g, p)| verify(g.as_ref(), p.as_ref(), cfg)).collect()
}
