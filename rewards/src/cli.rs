//! `verify` command line: JSON lines with `gold` and `pred` in, one verdict per line out.
//! The `verify` binary and the trainer's `train verify` both call [`run_verify_cli`].

use crate::math::{verify, VerifyConfig};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::io::{BufWriter, Read, Write};

pub const VERIFY_USAGE: &str = "usage: verify --input FILE.jsonl [--output FILE.jsonl] [--gold-key gold] [--pred-key pred]
              [--float-rounding N] [--non-strict] [--config VERIFY_CONFIG.json] [--summary]

Reads JSON lines with a gold answer and a prediction (full responses are fine), writes one JSON
verdict per line: equivalent, extracted and normalised forms of both sides, and a note. `-` reads
stdin / writes stdout. With --summary, prints counts to stderr (and agreement when the input has
an `expected` boolean).";

/// Parsed command-line options.
#[derive(Debug, Clone)]
pub struct VerifyArgs {
    pub input: String,
    pub output: String,
    pub gold_key: String,
    pub pred_key: String,
    pub config: VerifyConfig,
    pub summary: bool,
}

/// Parse arguments (without the program name).
pub fn parse_verify_args<I: IntoIterator<Item = String>>(args: I) -> Result<VerifyArgs> {
    let mut a = VerifyArgs { input: String::new(), output: "-".into(), gold_key: "gold".into(), pred_key: "pred".into(), config: VerifyConfig::default(), summary: false };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{VERIFY_USAGE}"));
        match arg.as_str() {
            "--input" | "-i" => a.input = val("--input")?,
            "--output" | "-o" => a.output = val("--output")?,
            "--gold-key" => a.gold_key = val("--gold-key")?,
            "--pred-key" => a.pred_key = val("--pred-key")?,
            "--float-rounding" => {
                let v = val("--float-rounding")?;
                a.config.float_rounding = Some(v.parse().with_context(|| format!("--float-rounding expects a number of decimals, got {v:?}"))?);
            }
            "--non-strict" => a.config.strict = false,
            "--summary" => a.summary = true,
            "--config" => {
                let path = val("--config")?;
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
                a.config = serde_json::from_str(&text).with_context(|| format!("{path}: not a valid verify config"))?;
            }
            "--help" | "-h" => bail!("{VERIFY_USAGE}"),
            other => bail!("unknown argument {other:?}\n{VERIFY_USAGE}"),
        }
    }
    if a.input.is_empty() {
        bail!("--input is required\n{VERIFY_USAGE}");
    }
    Ok(a)
}

/// One input row, validated.
struct Row {
    line: usize,
    obj: Map<String, Value>,
    gold: String,
    pred: String,
}

fn value_as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Run the verifier over a JSON-lines file. `args` are the command-line arguments without the
/// program name (the `verify` binary and `train verify` pass theirs through). Errors name the
/// file, line and key.
pub fn run_verify_cli<I: IntoIterator<Item = String>>(args: I) -> Result<()> {
    let a = parse_verify_args(args)?;
    let mut text = String::new();
    if a.input == "-" {
        std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
    } else {
        text = std::fs::read_to_string(&a.input).with_context(|| format!("reading {}", a.input))?;
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", a.input, i + 1))?;
        let Value::Object(obj) = v else { bail!("{}:{}: expected a JSON object", a.input, i + 1) };
        let gold = obj.get(&a.gold_key).and_then(value_as_text).with_context(|| format!("{}:{}: missing string key {:?}", a.input, i + 1, a.gold_key))?;
        let pred = obj.get(&a.pred_key).and_then(value_as_text).with_context(|| format!("{}:{}: missing string key {:?}", a.input, i + 1, a.pred_key))?;
        rows.push(Row { line: i + 1, obj, gold, pred });
    }
    let verdicts: Vec<Value> = rows
        .par_iter()
        .map(|r| {
            let v = verify(&r.gold, &r.pred, &a.config);
            let mut out = json!({ "line": r.line });
            if let Some(id) = r.obj.get("id") {
                out["id"] = id.clone();
            }
            let vj = serde_json::to_value(&v).unwrap_or(Value::Null);
            if let (Value::Object(o), Value::Object(m)) = (&mut out, vj) {
                o.extend(m);
            }
            if let Some(Value::Bool(e)) = r.obj.get("expected") {
                out["expected"] = json!(e);
                out["agrees"] = json!(*e == v.equivalent);
            }
            out
        })
        .collect();
    let sink: Box<dyn Write> = if a.output == "-" { Box::new(std::io::stdout().lock()) } else { Box::new(std::fs::File::create(&a.output).with_context(|| format!("creating {}", a.output))?) };
    let mut w = BufWriter::new(sink);
    for v in &verdicts {
        writeln!(w, "{v}").with_context(|| format!("writing {}", a.output))?;
    }
    w.flush()?;
    if a.summary {
        let eq = verdicts.iter().filter(|v| v["equivalent"] == json!(true)).count();
        let with_exp: Vec<&Value> = verdicts.iter().filter(|v| v.get("agrees").is_some()).collect();
        let agree = with_exp.iter().filter(|v| v["agrees"] == json!(true)).count();
        eprintln!("{} rows, {} equivalent", verdicts.len(), eq);
        if !with_exp.is_empty() {
            eprintln!("agreement with `expected`: {}/{} = {:.1}%", agree, with_exp.len(), 100.0 * agree as f64 / with_exp.len() as f64);
        }
    }
    Ok(())
}
