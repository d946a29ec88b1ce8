//! The real math datasets under ../shared/data load through the public API with every gold answer extracted.
//! Skips (with a message) when ../shared is absent.

mod common;

use data::{load_records, AnswerFormat, DataConfig, Record};
use serde_json::Value;

fn raw_rows(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn answers(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.answer().expect("prompt-answer record").to_string()).collect()
}

fn is_int(s: &str) -> bool {
    let t = s.strip_prefix('-').unwrap_or(s);
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) && (t == "0" || !t.starts_with('0'))
}

#[test]
fn gsm8k_train_and_test() {
    let Some(dir) = common::shared_data("gsm8k") else { return };
    for (split, rows, with_commas, negative) in [("train", 7473, 79, 3), ("test", 1319, 14, 2)] {
        let cfg: DataConfig = toml::from_str(&format!(
            "path = {:?}\nsplit = \"{split}\"\nprompt = \"question\"\nanswer = \"answer\"\nanswer_format = \"gsm8k\"",
            dir.display().to_string()
        ))
        .unwrap();
        let recs = load_records(&cfg).unwrap();
        let got = answers(&recs);
        let raw = raw_rows(&dir.join(format!("{split}.jsonl")));
        assert_eq!(recs.len(), rows);
        assert_eq!(raw.len(), rows);
        let mut commas = 0;
        for (i, (g, r)) in got.iter().zip(&raw).enumerate() {
            let sol = r["answer"].as_str().unwrap();
            let last = sol.lines().last().unwrap();
            let n = last.strip_prefix("#### ").unwrap_or_else(|| panic!("row {i}: {last:?}"));
            commas += n.contains(',') as usize;
            let want: i64 = n.replace(',', "").trim().parse().unwrap();
            assert!(is_int(g), "row {}: {g:?}", i + 1);
            assert_eq!(g.parse::<i64>().unwrap(), want, "row {}", i + 1);
            assert_eq!(recs[i].prompt()[0].content, r["question"].as_str().unwrap());
        }
        assert_eq!(commas, with_commas, "{split}: answers with thousands separators");
        assert_eq!(got.iter().filter(|a| a.starts_with('-')).count(), negative, "{split}: negative answers");
        eprintln!("gsm8k/{split}: {} rows loaded, {} gold answers extracted", recs.len(), got.len());
    }
}

#[test]
fn math500_boxed_matches_answer_column() {
    let Some(path) = common::shared_data("math500/test.jsonl") else { return };
    let mut cfg = DataConfig::new(&path);
    cfg.prompt = Some("problem".into());
    cfg.answer = Some("solution".into());
    cfg.answer_format = AnswerFormat::Boxed;
    cfg.solution = Some("solution".into());
    cfg.id = Some("unique_id".into());
    cfg.domain = Some("subject".into());
    let recs = load_records(&cfg).unwrap();
    let raw = raw_rows(&path);
    assert_eq!(recs.len(), 500);
    let mut equal = 0;
    for (rec, r) in recs.iter().zip(&raw) {
        let Record::PromptAnswer { answer, id, domain, solution, .. } = rec else { panic!() };
        assert_eq!(id, r["unique_id"].as_str().unwrap());
        assert_eq!(domain.as_deref(), r["subject"].as_str());
        assert!(solution.is_some());
        assert_eq!(answer, r["answer"].as_str().unwrap(), "{id}");
        equal += 1;
    }
    // The plain answer column loads too.
    cfg.answer = Some("answer".into());
    cfg.answer_format = AnswerFormat::Raw;
    let plain = load_records(&cfg).unwrap();
    assert_eq!(answers(&plain), answers(&recs));
    let first = &recs[0];
    assert_eq!(first.answer(), Some(r"\left( 3, \frac{\pi}{2} \right)"));
    eprintln!("math500: {} rows loaded, {equal} last-\\boxed{{}} answers equal to the answer column", recs.len());
}

#[test]
fn aime24_zero_padded_answers_become_integers() {
    let Some(path) = common::shared_data("aime24/test.jsonl") else { return };
    let mut cfg = DataConfig::new(&path);
    cfg.prompt = Some("problem".into());
    cfg.answer = Some("answer".into());
    cfg.id = Some("id".into());
    let recs = load_records(&cfg).unwrap();
    let raw = raw_rows(&path);
    assert_eq!(recs.len(), 30);
    let got = answers(&recs);
    let padded = raw.iter().filter(|r| r["answer"].as_str().unwrap().starts_with('0')).count();
    assert_eq!(padded, 7);
    for (g, r) in got.iter().zip(&raw) {
        let want: i64 = r["answer"].as_str().unwrap().parse().unwrap();
        assert!(is_int(g) && (0..=999).contains(&want));
        assert_eq!(g, &want.to_string());
    }
    assert!(got.contains(&"25".to_string()) && got.contains(&"204".to_string()));
    eprintln!("aime24: {} rows loaded, {} integer gold answers ({padded} were zero-padded)", recs.len(), got.len());
}

#[test]
fn amc23_float_answers_become_integers() {
    let Some(path) = common::shared_data("amc23/test.jsonl") else { return };
    let mut cfg = DataConfig::new(&path);
    cfg.prompt = Some("question".into());
    cfg.answer = Some("answer".into());
    let recs = load_records(&cfg).unwrap();
    let raw = raw_rows(&path);
    assert_eq!(recs.len(), 40);
    let got = answers(&recs);
    for (g, r) in got.iter().zip(&raw) {
        let f = r["answer"].as_f64().unwrap();
        assert!(is_int(g), "{g}");
        assert_eq!(g.parse::<f64>().unwrap(), f);
    }
    assert!(got.contains(&"-1".to_string()) && got.contains(&"27".to_string()));
    eprintln!("amc23: {} rows loaded, {} integer gold answers", recs.len(), got.len());
}
