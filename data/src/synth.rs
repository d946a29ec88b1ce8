//! A seeded synthetic arithmetic generator with exact answers, in prompt-with-answer, conversation and
//! preference forms, for tests and the CPU demo (1–2-digit addition and subtraction are the sweet spot for
//! SmolLM2-135M, see shared/notes/offline-assets.md).

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::record::{Message, Record};
use crate::rng::SplitMix64;

/// An operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `a + b`
    Add,
    /// `a - b` (may be negative unless `non_negative`)
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`, generated so the quotient is an exact integer.
    Div,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Add => "+",
            Op::Sub => "-",
            Op::Mul => "*",
            Op::Div => "/",
        }
    }
}

/// Generator settings (`[stage.data.synthetic]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArithmeticConfig {
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Fewest digits per operand (default 1).
    #[serde(default = "one")]
    pub min_digits: u32,
    /// Most digits per operand (default 2).
    #[serde(default = "two")]
    pub max_digits: u32,
    /// Operations to draw from (default add and sub).
    #[serde(default = "default_ops")]
    pub ops: Vec<Op>,
    /// Reorder subtraction operands so results are never negative (default true).
    #[serde(default = "yes")]
    pub non_negative: bool,
    /// Prompt text; `{a}`, `{op}`, `{b}` are replaced (default "What is {a} {op} {b}? Answer with just the number.").
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// An imperfect teacher: the assistant replies of `conversations` (the distillation data) are wrong by
    /// `offset` on a fraction `rate` of the problems of the listed `ops`. Gold answers (`prompt_answer`) stay
    /// exact, so a verifier-driven stage can correct what was distilled.
    #[serde(default)]
    pub teacher_error: Option<TeacherError>,
}

/// A systematic error of the teacher whose replies are distilled (see [`ArithmeticConfig::teacher_error`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TeacherError {
    /// Fraction of the affected problems whose reply is wrong (0..=1).
    pub rate: f64,
    /// Operations affected (default: all).
    #[serde(default)]
    pub ops: Vec<Op>,
    /// What the wrong reply adds to the true answer (default 1).
    #[serde(default = "one_i")]
    pub offset: i64,
}

fn one_i() -> i64 {
    1
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn yes() -> bool {
    true
}
fn default_ops() -> Vec<Op> {
    vec![Op::Add, Op::Sub]
}
fn default_prompt() -> String {
    "What is {a} {op} {b}? Answer with just the number.".into()
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        ArithmeticConfig { seed: 0, min_digits: 1, max_digits: 2, ops: default_ops(), non_negative: true, prompt: default_prompt(), teacher_error: None }
    }
}

/// One generated problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Left operand.
    pub a: i64,
    /// Operation.
    pub op: Op,
    /// Right operand.
    pub b: i64,
    /// The exact result.
    pub answer: i64,
    /// The prompt text.
    pub prompt: String,
}

/// A seeded arithmetic generator; the `i`-th problem depends only on `(seed, i)`, so any slice can be
/// regenerated without the ones before it.
#[derive(Clone, Debug)]
pub struct Arithmetic {
    cfg: ArithmeticConfig,
}

impl Arithmetic {
    /// Checks the settings.
    pub fn new(cfg: ArithmeticConfig) -> Result<Self> {
        if cfg.min_digits == 0 || cfg.min_digits > cfg.max_digits || cfg.max_digits > 9 {
            return Err(DataError::Config(format!(
                "synthetic arithmetic: need 1 <= min_digits <= max_digits <= 9, got {}..{}",
                cfg.min_digits, cfg.max_digits
            )));
        }
        if cfg.ops.is_empty() {
            return Err(DataError::Config("synthetic arithmetic: `ops` is empty".into()));
        }
        if let Some(t) = &cfg.teacher_error {
            if !(0.0..=1.0).contains(&t.rate) || t.offset == 0 {
                return Err(DataError::Config("synthetic arithmetic: teacher_error needs 0 <= rate <= 1 and a non-zero offset".into()));
            }
        }
        Ok(Arithmetic { cfg })
    }

    fn operand(&self, g: &mut SplitMix64) -> i64 {
        let d = g.range_inclusive(self.cfg.min_digits as i64, self.cfg.max_digits as i64) as u32;
        let lo = if d == 1 { 0 } else { 10i64.pow(d - 1) };
        g.range_inclusive(lo, 10i64.pow(d) - 1)
    }

    /// Problem number `i`.
    pub fn problem(&self, i: u64) -> Problem {
        let mut g = SplitMix64::derive(self.cfg.seed, i);
        let op = self.cfg.ops[g.below(self.cfg.ops.len() as u64) as usize];
        let (mut a, mut b) = (self.operand(&mut g), self.operand(&mut g));
        let answer = match op {
            Op::Add => a + b,
            Op::Sub => {
                if self.cfg.non_negative && b > a {
                    std::mem::swap(&mut a, &mut b);
                }
                a - b
            }
            Op::Mul => a * b,
            Op::Div => {
                // a = q * b with b >= 1, so the quotient q is exact.
                let q = a;
                b = b.max(1);
                a = q * b;
                q
            }
        };
        let prompt = self.cfg.prompt.replace("{a}", &a.to_string()).replace("{op}", op.symbol()).replace("{b}", &b.to_string());
        Problem { a, op, b, answer, prompt }
    }

    /// `n` problems starting at `start`, as prompt-with-answer records.
    pub fn prompt_answer(&self, start: u64, n: usize) -> Vec<Record> {
        (start..start + n as u64)
            .map(|i| {
                let p = self.problem(i);
                Record::PromptAnswer {
                    prompt: vec![Message::user(p.prompt)],
                    answer: p.answer.to_string(),
                    solution: Some(format!("{} {} {} = {}", p.a, p.op.symbol(), p.b, p.answer)),
                    id: format!("arith-{}-{i}", self.cfg.seed),
                    domain: Some(format!("{:?}", p.op).to_lowercase()),
                }
            })
            .collect()
    }

    /// `n` problems as user/assistant conversations (the assistant gives the answer).
    pub fn conversations(&self, start: u64, n: usize) -> Vec<Record> {
        (start..start + n as u64)
            .map(|i| {
                let p = self.problem(i);
                let reply = p.answer + self.teacher_offset(&p, i);
                Record::Conversation { messages: vec![Message::user(p.prompt), Message::assistant(reply.to_string())] }
            })
            .collect()
    }

    /// The imperfect teacher's error on problem `i` (0 when its reply is right).
    fn teacher_offset(&self, p: &Problem, i: u64) -> i64 {
        match &self.cfg.teacher_error {
            Some(t) if t.ops.is_empty() || t.ops.contains(&p.op) => {
                let mut g = SplitMix64::derive(self.cfg.seed ^ 0x7EAC_4E55, i);
                if (g.below(1 << 24) as f64) < t.rate * (1u64 << 24) as f64 {
                    t.offset
                } else {
                    0
                }
            }
            _ => 0,
        }
    }

    /// `n` preference pairs: the correct answer is chosen, a near miss (off by 1 to 10, never equal) rejected.
    pub fn preferences(&self, start: u64, n: usize) -> Vec<Record> {
        (start..start + n as u64)
            .map(|i| {
                let p = self.problem(i);
                let mut g = SplitMix64::derive(self.cfg.seed ^ 0x0005_EED0_FBAD, i);
                let delta = g.range_inclusive(1, 10) * if g.below(2) == 0 { 1 } else { -1 };
                Record::Preference {
                    prompt: vec![Message::user(p.prompt)],
                    chosen: p.answer.to_string(),
                    rejected: (p.answer + delta).to_string(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_imperfect_teacher_errs_on_its_ops_at_its_rate_and_gold_answers_stay_exact() {
        let t = TeacherError { rate: 0.6, ops: vec![Op::Sub], offset: 1 };
        let g = Arithmetic::new(ArithmeticConfig { seed: 4, teacher_error: Some(t), ..Default::default() }).unwrap();
        let convs = g.conversations(0, 4000);
        let golds = g.prompt_answer(0, 4000);
        let (mut sub, mut sub_wrong) = (0, 0);
        for (c, a) in convs.iter().zip(&golds) {
            let (Record::Conversation { messages }, Record::PromptAnswer { answer, domain, .. }) = (c, a) else { panic!() };
            let reply: i64 = messages[1].content.parse().unwrap();
            let gold: i64 = answer.parse().unwrap();
            if domain.as_deref() == Some("sub") {
                sub += 1;
                sub_wrong += (reply != gold) as usize;
                assert!(reply == gold || reply == gold + 1);
            } else {
                assert_eq!(reply, gold, "additions are never wrong");
            }
        }
        let rate = sub_wrong as f64 / sub as f64;
        assert!((rate - 0.6).abs() < 0.04, "{rate}");
        assert!(Arithmetic::new(ArithmeticConfig { teacher_error: Some(TeacherError { rate: 1.5, ops: vec![], offset: 1 }), ..Default::default() }).is_err());
    }

    fn eval(p: &Problem) -> i64 {
        match p.op {
            Op::Add => p.a + p.b,
            Op::Sub => p.a - p.b,
            Op::Mul => p.a * p.b,
            Op::Div => {
                assert_eq!(p.a % p.b, 0, "{p:?}");
                p.a / p.b
            }
        }
    }

    #[test]
    fn answers_are_exact_and_digits_respected() {
        let g = Arithmetic::new(ArithmeticConfig { min_digits: 2, max_digits: 3, ops: vec![Op::Add, Op::Sub, Op::Mul, Op::Div], ..Default::default() }).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..2000 {
            let p = g.problem(i);
            assert_eq!(eval(&p), p.answer, "{p:?}");
            seen.insert(p.op as u8);
            if p.op != Op::Div {
                for x in [p.a, p.b] {
                    assert!((10..1000).contains(&x), "{p:?}");
                }
            }
            if p.op == Op::Sub {
                assert!(p.answer >= 0);
            }
            assert!(p.prompt.contains(&format!("{} {} {}", p.a, p.op.symbol(), p.b)));
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn seeded_and_random_access() {
        let a = Arithmetic::new(ArithmeticConfig { seed: 7, ..Default::default() }).unwrap();
        let b = Arithmetic::new(ArithmeticConfig { seed: 7, ..Default::default() }).unwrap();
        let c = Arithmetic::new(ArithmeticConfig { seed: 8, ..Default::default() }).unwrap();
        assert_eq!(a.prompt_answer(0, 50), b.prompt_answer(0, 50));
        assert_ne!(a.prompt_answer(0, 50), c.prompt_answer(0, 50));
        assert_eq!(a.prompt_answer(10, 5), a.prompt_answer(0, 15)[10..].to_vec());
    }

    #[test]
    fn preference_and_conversation_forms() {
        let g = Arithmetic::new(ArithmeticConfig::default()).unwrap();
        for (r, q) in g.preferences(0, 200).iter().zip(g.problem_range(0, 200)) {
            let Record::Preference { chosen, rejected, .. } = r else { panic!() };
            assert_eq!(chosen, &q.answer.to_string());
            let d = rejected.parse::<i64>().unwrap() - q.answer;
            assert!(d != 0 && d.abs() <= 10);
        }
        let Record::Conversation { messages } = &g.conversations(3, 1)[0] else { panic!() };
        assert_eq!(messages[1].content, g.problem(3).answer.to_string());
        assert!(Arithmetic::new(ArithmeticConfig { min_digits: 3, max_digits: 2, ..Default::default() }).is_err());
    }

    impl Arithmetic {
        fn problem_range(&self, start: u64, n: usize) -> Vec<Problem> {
            (start..start + n as u64).map(|i| self.problem(i)).collect()
        }
    }
}
