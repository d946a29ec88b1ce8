//! Real data: MATH-500 gold answers against the last boxed expression of their own solutions,
//! and GSM8K `#### n` answers against the same number boxed in prose. Skips when ../shared is absent.

use rewards::math::{extract_answer, verify, ExtractConfig, VerifyConfig};
use serde_json::Value;

fn read_jsonl(rel: &str) -> Option<Vec<Value>> {
    let path = format!("{}/../../shared/{rel}", env!("CARGO_MANIFEST_DIR"));
    match std::fs::read_to_string(&path) {
        Ok(t) => Some(t.lines().enumerate().map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{path} line {}: {e}", i + 1))).collect()),
        Err(_) => {
            eprintln!("SKIP: {path} not found (../shared absent)");
            None
        }
    }
}

#[test]
fn math500_answers_match_their_solutions() {
    let Some(rows) = read_jsonl("data/math500/test.jsonl") else { return };
    assert_eq!(rows.len(), 500);
    let cfg = VerifyConfig::default();
    let mut bad = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let answer = r["answer"].as_str().unwrap();
        let solution = r["solution"].as_str().unwrap();
        // The solution's last boxed expression must exist.
        let boxed = extract_answer(solution, &ExtractConfig::boxed_only());
        assert!(boxed.is_some(), "row {i}: no boxed answer in solution");
        let v = verify(answer, solution, &cfg);
        if !v.equivalent {
            bad.push(format!("row {i} ({}): {answer:?} vs {:?} -> {:?} / {:?} {:?}", r["unique_id"], v.pred_extracted, v.gold_normalized, v.pred_normalized, v.note));
        }
    }
    for b in &bad {
        eprintln!("MISMATCH {b}");
    }
    eprintln!("MATH-500: {}/500 answers equivalent to their solution's boxed answer", 500 - bad.len());
    assert!(bad.is_empty());
}

#[test]
fn math500_answers_differ_from_other_rows() {
    // Control: row i's answer against row i+1's solution is almost never equivalent
    // (a few rows share an answer such as "2").
    let Some(rows) = read_jsonl("data/math500/test.jsonl") else { return };
    let cfg = VerifyConfig::default();
    let mut same = 0;
    let mut identical_text = 0;
    for i in 0..rows.len() - 1 {
        let a = rows[i]["answer"].as_str().unwrap();
        let b = rows[i + 1]["answer"].as_str().unwrap();
        if a.trim() == b.trim() {
            identical_text += 1;
        }
        if verify(a, rows[i + 1]["solution"].as_str().unwrap(), &cfg).equivalent {
            same += 1;
        }
    }
    eprintln!("MATH-500 control: {same}/499 neighbouring pairs equivalent ({identical_text} have identical answer text)");
    assert!(same >= identical_text);
    assert!(same <= identical_text + 3, "too many false matches: {same}");
}

#[test]
fn gsm8k_hash_answers_match_boxed_numbers_in_prose() {
    let Some(rows) = read_jsonl("data/gsm8k/test.jsonl") else { return };
    assert_eq!(rows.len(), 1319);
    let cfg = VerifyConfig::default();
    let mut ok = 0;
    let mut wrong_rejected = 0;
    for (i, r) in rows.iter().enumerate() {
        let gold = r["answer"].as_str().unwrap();
        let n = gold.rsplit("####").next().unwrap().trim().replace(',', "");
        let good = format!("First we compute 3 + 4 = 7 items, then 12 more.\nSo in total there are \\boxed{{{n}}} of them.");
        let v = verify(gold, &good, &cfg);
        if v.equivalent {
            ok += 1;
        } else {
            eprintln!("GSM8K row {i}: gold {:?} vs {:?}: {:?}", v.gold_extracted, v.pred_extracted, v.note);
        }
        let wrong: i128 = n.parse::<i128>().unwrap() + 1;
        let bad = format!("Adding up everything gives \\boxed{{{wrong}}} apples.");
        if !verify(gold, &bad, &cfg).equivalent {
            wrong_rejected += 1;
        }
    }
    eprintln!("GSM8K: {ok}/1319 matched, {wrong_rejected}/1319 off-by-one answers rejected");
    assert_eq!(ok, 1319);
    assert_eq!(wrong_rejected, 1319);
}

#[test]
fn aime_and_amc_answers_through_the_accuracy_reward() {
    use rewards::{RewardConfig, RewardSet, Sample};
    let (Some(aime), Some(amc)) = (read_jsonl("data/aime24/test.jsonl"), read_jsonl("data/amc23/test.jsonl")) else { return };
    let cfg: Vec<RewardConfig> = serde_json::from_value(serde_json::json!([{ "kind": "accuracy", "gold_key": "answer" }])).unwrap();
    let set = RewardSet::from_config(&cfg).unwrap();
    let mut samples = Vec::new();
    let mut expect = Vec::new();
    for r in aime.iter().chain(amc.iter()) {
        // AIME writes "025"; AMC stores numbers such as 27.0.
        let n: f64 = match &r["answer"] {
            Value::String(s) => s.parse().unwrap(),
            v => v.as_f64().unwrap(),
        };
        for (delta, ok) in [(0.0, true), (1.0, false)] {
            let row = r.as_object().unwrap().clone();
            samples.push(Sample { completion: format!("Thus the answer is $\\boxed{{{}}}$.", n + delta), row, max_tokens: 100, ..Default::default() });
            expect.push(Some(if ok { 1.0 } else { -1.0 }));
        }
    }
    let s = set.score_batch(&samples).unwrap();
    assert_eq!(s.total, expect);
    eprintln!("AIME 2024 + AMC 2023: {} gold answers matched and {} off-by-one answers rejected", expect.len() / 2, expect.len() / 2);
}
