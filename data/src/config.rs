//! Recipe configuration for a data source (`[stage.data]` in a TOML recipe). Key names follow what TRL and verl
//! users know: `prompt`, `answer`, `messages`, `completion`, `chosen`, `rejected`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How the files are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Guess from the path: a directory is `hf`, `*.parquet` is `parquet`, `*.jsonl`/`*.ndjson` is `jsonl`,
    /// `*.json` is a JSON array (or JSON Lines when the file starts with `{`).
    #[default]
    Auto,
    /// JSON Lines: one object per line.
    Jsonl,
    /// One JSON array of objects.
    Json,
    /// Apache Parquet, streamed row group by row group.
    Parquet,
    /// The Hugging Face datasets layout: a directory with `data/<split>-*.parquet` (or `.jsonl`/`.json`),
    /// `<split>-*.parquet`, `<split>/*.parquet` or `<split>.jsonl`.
    Hf,
}

/// Which record shape the rows are mapped to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// Prompt with a gold answer (needs `prompt` and `answer`).
    PromptAnswer,
    /// A list of messages (needs `messages`).
    Conversation,
    /// Prompt and completion (needs `prompt` and `completion`).
    PromptCompletion,
    /// Preference pair (needs `prompt`, `chosen` and `rejected`).
    Preference,
}

/// How the gold answer is pulled out of the `answer` column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// The cell is the answer: numbers normalised (`27.0` → `27`, `"025"` → `25`), other text trimmed.
    #[default]
    Plain,
    /// GSM8K: the text after the last `####`, thousands separators removed.
    Gsm8k,
    /// MATH-style solutions: the content of the last `\boxed{}`, braces matched.
    Boxed,
    /// The cell as is (a string, trimmed), no normalisation.
    Raw,
}

/// One data source: where it is, how it is stored and which columns mean what.
///
/// ```toml
/// [stage.data]
/// path = "../shared/data/gsm8k"
/// split = "train"
/// prompt = "question"
/// answer = "answer"
/// answer_format = "gsm8k"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A file, or a directory in the Hugging Face datasets layout.
    pub path: PathBuf,
    /// Storage format (default `auto`: guessed from the path).
    #[serde(default)]
    pub format: Format,
    /// Split to read from a directory (default `train`).
    #[serde(default = "default_split")]
    pub split: String,
    /// Record shape; default: inferred from the columns set (`messages` → conversation, `chosen` → preference,
    /// `completion` → prompt_completion, `answer` → prompt_answer).
    #[serde(default)]
    pub kind: Option<RecordKind>,
    /// Column holding the prompt: a string, or a list of `{role, content}` messages.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Column holding the gold answer (or the solution it is extracted from; see `answer_format`).
    #[serde(default)]
    pub answer: Option<String>,
    /// How the gold answer is extracted from the `answer` column (default `plain`).
    #[serde(default)]
    pub answer_format: AnswerFormat,
    /// Column with a reference solution, kept alongside the answer (e.g. MATH's `solution`).
    #[serde(default)]
    pub solution: Option<String>,
    /// Column holding a list of messages (`{role, content}`, or ShareGPT's `{from, value}`).
    #[serde(default)]
    pub messages: Option<String>,
    /// Column holding the completion.
    #[serde(default)]
    pub completion: Option<String>,
    /// Column holding the preferred reply (a string, or a list of messages whose last is the reply).
    #[serde(default)]
    pub chosen: Option<String>,
    /// Column holding the dispreferred reply.
    #[serde(default)]
    pub rejected: Option<String>,
    /// Column with a row id (default: `file:row`).
    #[serde(default)]
    pub id: Option<String>,
    /// Column with a domain label, for domain-aware sampling.
    #[serde(default)]
    pub domain: Option<String>,
    /// A system prompt put before every prompt and conversation that has none.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Wraps a plain-text prompt: `{prompt}` is replaced by the cell, e.g.
    /// `"{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."`.
    #[serde(default)]
    pub prompt_template: Option<String>,
    /// Read at most this many rows (after skipping none); default all.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One weighted source of a data mixture (`[[stage.mix]]` in a recipe):
///
/// ```toml
/// [[stage.mix]]
/// weight = 3.0
/// data = { path = "../shared/data/gsm8k", prompt = "question", answer = "answer", answer_format = "gsm8k" }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MixEntry {
    /// Name in logs and checkpoints (default: the data path).
    #[serde(default)]
    pub name: Option<String>,
    /// Relative sampling weight (> 0).
    pub weight: f64,
    /// The source.
    pub data: DataConfig,
}

fn default_split() -> String {
    "train".to_string()
}

impl DataConfig {
    /// A config for `path` with every option at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DataConfig {
            path: path.into(),
            format: Format::Auto,
            split: default_split(),
            kind: None,
            prompt: None,
            answer: None,
            answer_format: AnswerFormat::Plain,
            solution: None,
            messages: None,
            completion: None,
            chosen: None,
            rejected: None,
            id: None,
            domain: None,
            system_prompt: None,
            prompt_template: None,
            limit: None,
        }
    }

    /// The record kind: the explicit `kind`, or inferred from the columns that are set.
    pub fn record_kind(&self) -> crate::Result<RecordKind> {
        if let Some(k) = self.kind {
            return Ok(k);
        }
        Ok(if self.messages.is_some() {
            RecordKind::Conversation
        } else if self.chosen.is_some() || self.rejected.is_some() {
            RecordKind::Preference
        } else if self.completion.is_some() {
            RecordKind::PromptCompletion
        } else if self.answer.is_some() {
            RecordKind::PromptAnswer
        } else {
            return Err(crate::DataError::Config(format!(
                "{}: cannot tell the record kind: set `kind`, or name the columns (`prompt` + `answer`, \
                 `messages`, `prompt` + `completion`, or `prompt` + `chosen` + `rejected`)",
                self.path.display()
            )));
        })
    }

    /// The columns a record of this kind reads (used to project Parquet columns).
    pub fn columns(&self) -> crate::Result<Vec<String>> {
        let kind = self.record_kind()?;
        let need = |name: &str, v: &Option<String>| -> crate::Result<String> {
            v.clone().ok_or_else(|| {
                crate::DataError::Config(format!(
                    "{}: kind `{}` needs the `{name}` column to be named",
                    self.path.display(),
                    kind_name(kind)
                ))
            })
        };
        let mut cols = match kind {
            RecordKind::PromptAnswer => vec![need("prompt", &self.prompt)?, need("answer", &self.answer)?],
            RecordKind::Conversation => vec![need("messages", &self.messages)?],
            RecordKind::PromptCompletion => vec![need("prompt", &self.prompt)?, need("completion", &self.completion)?],
            RecordKind::Preference => {
                vec![need("prompt", &self.prompt)?, need("chosen", &self.chosen)?, need("rejected", &self.rejected)?]
            }
        };
        for c in [&self.solution, &self.id, &self.domain].into_iter().flatten() {
            cols.push(c.clone());
        }
        cols.dedup();
        Ok(cols)
    }
}

pub(crate) fn kind_name(k: RecordKind) -> &'static str {
    match k {
        RecordKind::PromptAnswer => "prompt_answer",
        RecordKind::Conversation => "conversation",
        RecordKind::PromptCompletion => "prompt_completion",
        RecordKind::Preference => "preference",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_toml_deserialises_and_rejects_unknown_keys() {
        let c: DataConfig = toml::from_str(
            r#"path = "x/gsm8k"
               prompt = "question"
               answer = "answer"
               answer_format = "gsm8k""#,
        )
        .unwrap();
        assert_eq!(c.record_kind().unwrap(), RecordKind::PromptAnswer);
        assert_eq!(c.answer_format, AnswerFormat::Gsm8k);
        assert_eq!(c.split, "train");
        assert_eq!(c.columns().unwrap(), vec!["question", "answer"]);
        let err = toml::from_str::<DataConfig>("path = \"x\"\nanswr = \"a\"").unwrap_err();
        assert!(err.to_string().contains("answr"), "{err}");
    }

    #[test]
    fn missing_columns_are_named() {
        let mut c = DataConfig::new("f.jsonl");
        assert!(c.record_kind().is_err());
        c.kind = Some(RecordKind::Preference);
        c.prompt = Some("p".into());
        let e = c.columns().unwrap_err().to_string();
        assert!(e.contains("`chosen`"), "{e}");
    }
}
