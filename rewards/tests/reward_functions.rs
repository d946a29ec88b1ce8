//! Reward terms configured from TOML recipes, scored on batches.

use rewards::plugin::PluginRegistry;
use rewards::reward::{BatchContext, RewardError, RewardFn, RewardOutput};
use rewards::{RewardConfig, RewardSet, Sample};
use serde::Deserialize;

#[derive(Deserialize)]
struct Stage {
    reward: Vec<RewardConfig>,
}

fn set(toml_src: &str) -> RewardSet {
    let st: Stage = toml::from_str(toml_src).unwrap_or_else(|e| panic!("recipe: {e}"));
    RewardSet::from_config(&st.reward).unwrap()
}

fn sample(completion: &str, gold: Option<&str>, tokens: usize, max: usize) -> Sample {
    Sample { prompt: "Q".into(), completion: completion.into(), gold: gold.map(String::from), completion_tokens: tokens, max_tokens: max, truncated: tokens >= max, row: Default::default() }
}

#[test]
fn accuracy_phi4_values() {
    let rs = set(r#"
        [[reward]]
        kind = "accuracy"
        weight = 1.0
        correct = 1.0
        incorrect = -1.0
        no_answer = -1.0
    "#);
    let b = vec![
        sample("so x = \\boxed{\\frac{14}{3}}", Some("\\frac{14}{3}"), 10, 100),
        sample("so x = \\boxed{5}", Some("\\frac{14}{3}"), 10, 100),
        sample("I am not sure", Some("7"), 10, 100),
        sample("\\boxed{3}", None, 10, 100),
    ];
    let s = rs.score_batch(&b).unwrap();
    assert_eq!(s.total, vec![Some(1.0), Some(-1.0), Some(-1.0), None]);
    assert_eq!(s.correct, vec![Some(true), Some(false), Some(false), None]);
    assert_eq!(s.metrics["accuracy"], 1.0 / 3.0);
    assert_eq!(s.metrics["reward/accuracy/answered"], 2.0 / 3.0);
    assert_eq!(s.metrics["reward/accuracy/applicable"], 0.75);
}

#[test]
fn gold_from_row_column_and_custom_values() {
    let rs = set(r#"
        [[reward]]
        kind = "accuracy"
        correct = 2.0
        incorrect = 0.0
        no_answer = -0.5
        gold_key = "answer"
    "#);
    let mut a = sample("\\boxed{1080}", None, 5, 50);
    a.row.insert("answer".into(), serde_json::json!("#### 1,080"));
    let mut b = sample("nothing", None, 5, 50);
    b.row.insert("answer".into(), serde_json::json!(42));
    let s = rs.score_batch(&[a, b]).unwrap();
    assert_eq!(s.total, vec![Some(2.0), Some(-0.5)]);
}

#[test]
fn weighted_sum_of_accuracy_format_and_overlong() {
    let rs = set(r#"
        [[reward]]
        kind = "accuracy"
        [[reward]]
        kind = "format"
        weight = 0.5
        think = true
        boxed = true
        [[reward]]
        kind = "overlong"
        overlong_buffer_len = 20
        overlong_penalty_factor = 1.0
    "#);
    let good = sample("<think>2+2 is 4</think> The answer is \\boxed{4}.", Some("4"), 50, 100);
    let no_think = sample("The answer is \\boxed{4}.", Some("4"), 90, 100);
    let s = rs.score_batch(&[good, no_think]).unwrap();
    // accuracy 1 + 0.5 * format 1 + overlong 0
    assert_eq!(s.total[0], Some(1.5));
    // accuracy 1 + 0.5 * 0 (think block missing, prompt-opened think needs a closing tag) + overlong -0.5
    assert_eq!(s.total[1], Some(0.5));
    assert_eq!(s.terms.len(), 3);
    assert_eq!(s.metrics["reward/format/think"], 0.5);
    assert_eq!(s.metrics["reward/overlong/penalized"], 0.5);
}

#[test]
fn cosine_length_prefers_short_correct_and_long_wrong() {
    let rs = set(r#"
        [[reward]]
        kind = "cosine_length"
        max_len = 1000
    "#);
    let s = rs
        .score_batch(&[
            sample("\\boxed{4}", Some("4"), 0, 2000),
            sample("\\boxed{4}", Some("4"), 1000, 2000),
            sample("\\boxed{5}", Some("4"), 0, 2000),
            sample("\\boxed{5}", Some("4"), 1000, 2000),
        ])
        .unwrap();
    let t: Vec<f64> = s.total.iter().map(|x| x.unwrap()).collect();
    assert!((t[0] - 1.0).abs() < 1e-12 && (t[1] - 0.5).abs() < 1e-12);
    assert!((t[2] + 1.0).abs() < 1e-12 && (t[3] + 0.5).abs() < 1e-12);
}

#[test]
fn config_errors_are_clear() {
    let e = toml::from_str::<Stage>("[[reward]]\nkind = \"accuracy\"\ncorect = 1.0\n").err().unwrap().to_string();
    assert!(e.contains("corect"), "{e}");
    let e = toml::from_str::<Stage>("[[reward]]\nkind = \"nope\"\n").err().unwrap().to_string();
    assert!(e.contains("nope"), "{e}");
    let st: Stage = toml::from_str("[[reward]]\nkind = \"overlong\"\noverlong_buffer_len = 0\n").unwrap();
    assert!(RewardSet::from_config(&st.reward).is_err());
    assert!(RewardSet::from_config(&[]).is_err());
    let st: Stage = toml::from_str("[[reward]]\nkind = \"plugin\"\nname = \"mine\"\ntransport = \"native\"\n").unwrap();
    let e = RewardSet::from_config(&st.reward).err().unwrap().to_string();
    assert!(e.contains("mine") && e.contains("not registered"), "{e}");
}

struct ContainsWord {
    word: String,
}

impl RewardFn for ContainsWord {
    fn name(&self) -> &str {
        "contains_word"
    }
    fn score(&self, samples: &[Sample], _ctx: &BatchContext) -> Result<Vec<RewardOutput>, RewardError> {
        Ok(samples.iter().map(|s| RewardOutput::value(if s.completion.contains(&self.word) { 1.0 } else { 0.0 })).collect())
    }
}

#[test]
fn native_plugin_from_registry() {
    let mut reg = PluginRegistry::default();
    reg.register("contains_word", |params| {
        let word = params["word"].as_str().ok_or_else(|| RewardError::Config("contains_word: params.word must be a string".into()))?;
        Ok(Box::new(ContainsWord { word: word.to_string() }))
    });
    let st: Stage = toml::from_str("[[reward]]\nkind = \"plugin\"\nname = \"contains_word\"\ntransport = \"native\"\nweight = 2.0\nparams = { word = \"therefore\" }\n").unwrap();
    let rs = RewardSet::from_config_with(&st.reward, &reg).unwrap();
    let s = rs.score_batch(&[sample("therefore 4", None, 1, 10), sample("4", None, 1, 10)]).unwrap();
    assert_eq!(s.total, vec![Some(2.0), Some(0.0)]);
    let bad: Stage = toml::from_str("[[reward]]\nkind = \"plugin\"\nname = \"contains_word\"\ntransport = \"native\"\n").unwrap();
    assert!(RewardSet::from_config_with(&bad.reward, &reg).err().unwrap().to_string().contains("params.word"));
}

#[test]
fn large_batches_score_in_parallel_consistently() {
    let rs = set("[[reward]]\nkind = \"accuracy\"\n[[reward]]\nkind = \"format\"\n");
    let batch: Vec<Sample> = (0..512).map(|i| sample(&format!("\\boxed{{{}}}", i % 7), Some(&format!("{}", i % 5)), 10, 100)).collect();
    let s = rs.score_batch(&batch).unwrap();
    for (i, t) in s.total.iter().enumerate() {
        let expect = if i % 7 == i % 5 { 2.0 } else { 0.0 };
        assert_eq!(*t, Some(expect), "sample {i}");
    }
}
