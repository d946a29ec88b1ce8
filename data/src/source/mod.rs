//! Reading rows from files and mapping them to [`Record`]s.
//!
//! Every reader yields [`SourceRow`]s: a JSON object plus the file and 1-based row number it came from, so that
//! mapping errors can name the file, row and column.

pub mod hf;
pub mod json;
pub mod jsonl;
pub mod parquet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::answer;
use crate::config::{AnswerFormat, DataConfig, Format, RecordKind};
use crate::error::{DataError, Result};
use crate::record::{Message, Record};

/// One row of a source file.
#[derive(Clone, Debug)]
pub struct SourceRow {
    /// The file it came from.
    pub file: Arc<str>,
    /// 1-based row number within the file (the line number for JSONL).
    pub row: usize,
    /// The row's columns.
    pub fields: Map<String, Value>,
}

/// A stream of rows.
pub type RowIter = Box<dyn Iterator<Item = Result<SourceRow>> + Send>;

/// The format a path resolves to under `Format::Auto`.
pub fn detect_format(path: &Path) -> Result<Format> {
    if path.is_dir() {
        return Ok(Format::Hf);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
    if name.ends_with(".parquet") {
        Ok(Format::Parquet)
    } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        Ok(Format::Jsonl)
    } else if name.ends_with(".json") {
        json::sniff(path)
    } else {
        Err(DataError::Config(format!(
            "{}: cannot guess the format from the name; set `format` to jsonl, json, parquet or hf",
            path.display()
        )))
    }
}

/// The files a config reads, in order (one for a file, the split's shards for a directory).
pub fn files(config: &DataConfig) -> Result<Vec<(PathBuf, Format)>> {
    let format = match config.format {
        Format::Auto => detect_format(&config.path)?,
        f => f,
    };
    if format == Format::Hf {
        hf::split_files(&config.path, &config.split)
    } else {
        if !config.path.is_file() {
            return Err(DataError::io(&config.path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")));
        }
        Ok(vec![(config.path.clone(), format)])
    }
}

/// Raw rows of all files of a config; Parquet reads only `columns` (all when `None`).
pub fn rows(config: &DataConfig, columns: Option<&[String]>) -> Result<RowIter> {
    let files = files(config)?;
    let columns: Option<Vec<String>> = columns.map(|c| c.to_vec());
    let mut iters: Vec<Result<RowIter>> = Vec::new();
    for (path, format) in files {
        iters.push(open_file(&path, format, columns.as_deref()));
    }
    Ok(Box::new(iters.into_iter().flat_map(|r| -> RowIter {
        match r {
            Ok(it) => it,
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    })))
}

fn open_file(path: &Path, format: Format, columns: Option<&[String]>) -> Result<RowIter> {
    match format {
        Format::Jsonl => jsonl::rows(path),
        Format::Json => json::rows(path),
        Format::Parquet => parquet::rows(path, columns),
        Format::Auto | Format::Hf => {
            let f = detect_format(path)?;
            if f == Format::Hf {
                return Err(DataError::Config(format!("{}: nested directory", path.display())));
            }
            open_file(path, f, columns)
        }
    }
}

/// Streams records: rows are read lazily (Parquet row group by row group) and mapped one by one.
pub fn stream_records(config: &DataConfig) -> Result<Box<dyn Iterator<Item = Result<Record>> + Send>> {
    let cols = config.columns()?;
    let mapper = Mapper::new(config)?;
    let rows = rows(config, Some(&cols))?;
    if std::fs::metadata(&config.path).is_ok_and(|m| m.is_file() && m.len() == 0) {
        return Err(crate::DataError::Config(format!("{}: the file is empty (0 bytes): no records to read", config.path.display())));
    }
    let it = rows.map(move |r| r.and_then(|row| mapper.map(&row)));
    Ok(match config.limit {
        Some(n) => Box::new(it.take(n)),
        None => Box::new(it),
    })
}

/// Loads every record of a source; the first bad row is an error naming its file, row and column.
pub fn load_records(config: &DataConfig) -> Result<Vec<Record>> {
    stream_records(config)?.collect()
}

/// Loads every source of a mixture and builds a [`crate::sampler::MixtureSampler`] over them; the sampler yields
/// `(source index, record index)`.
pub fn load_mixture(
    entries: &[crate::config::MixEntry],
    sampler: crate::sampler::SamplerConfig,
    rank: usize,
    world_size: usize,
) -> Result<(Vec<Vec<Record>>, crate::sampler::MixtureSampler)> {
    let mut all = Vec::with_capacity(entries.len());
    let mut sources = Vec::with_capacity(entries.len());
    for e in entries {
        let recs = load_records(&e.data)?;
        let name = e.name.clone().unwrap_or_else(|| e.data.path.display().to_string());
        sources.push(crate::sampler::MixSource { name, weight: e.weight, len: recs.len() });
        all.push(recs);
    }
    let m = crate::sampler::MixtureSampler::new(sources, sampler, rank, world_size)?;
    Ok((all, m))
}

/// Maps rows to records according to a config.
#[derive(Clone, Debug)]
pub struct Mapper {
    kind: RecordKind,
    config: DataConfig,
}

impl Mapper {
    /// Checks the config and prepares the mapping.
    pub fn new(config: &DataConfig) -> Result<Self> {
        let kind = config.record_kind()?;
        config.columns()?;
        if let Some(t) = &config.prompt_template {
            if !t.contains("{prompt}") {
                return Err(DataError::Config(format!("prompt_template must contain `{{prompt}}`, got {t:?}")));
            }
        }
        Ok(Mapper { kind, config: config.clone() })
    }

    /// One row to one record.
    pub fn map(&self, row: &SourceRow) -> Result<Record> {
        let c = &self.config;
        Ok(match self.kind {
            RecordKind::PromptAnswer => {
                let prompt = self.prompt(row, col(&c.prompt))?;
                let acol = col(&c.answer);
                let cell = get(row, acol)?;
                let answer = extract_answer(cell, c.answer_format).ok_or_else(|| {
                    DataError::row(&row.file, row.row, acol, answer_error(cell, c.answer_format))
                })?;
                let solution = match &c.solution {
                    Some(s) => Some(string(row, s, get(row, s)?)?),
                    None => None,
                };
                let id = match &c.id {
                    Some(i) => scalar_text(row, i, get(row, i)?)?,
                    None => format!("{}:{}", row.file, row.row),
                };
                let domain = match &c.domain {
                    Some(d) => Some(scalar_text(row, d, get(row, d)?)?),
                    None => None,
                };
                Record::PromptAnswer { prompt, answer, solution, id, domain }
            }
            RecordKind::Conversation => {
                let m = col(&c.messages);
                let mut messages = messages(row, m, get(row, m)?)?;
                if messages.is_empty() {
                    return Err(DataError::row(&row.file, row.row, m, "empty message list"));
                }
                self.add_system(&mut messages);
                Record::Conversation { messages }
            }
            RecordKind::PromptCompletion => {
                let prompt = self.prompt(row, col(&c.prompt))?;
                let cc = col(&c.completion);
                let completion = reply(row, cc, get(row, cc)?)?;
                Record::PromptCompletion { prompt, completion }
            }
            RecordKind::Preference => {
                let prompt = self.prompt(row, col(&c.prompt))?;
                let (ch, rj) = (col(&c.chosen), col(&c.rejected));
                let chosen = reply(row, ch, get(row, ch)?)?;
                let rejected = reply(row, rj, get(row, rj)?)?;
                Record::Preference { prompt, chosen, rejected }
            }
        })
    }

    fn prompt(&self, row: &SourceRow, column: &str) -> Result<Vec<Message>> {
        let cell = get(row, column)?;
        let mut msgs = match cell {
            Value::String(s) => {
                let text = match &self.config.prompt_template {
                    Some(t) => t.replace("{prompt}", s),
                    None => s.clone(),
                };
                vec![Message::user(text)]
            }
            Value::Array(_) => messages(row, column, cell)?,
            other => {
                return Err(DataError::row(
                    &row.file,
                    row.row,
                    column,
                    format!("expected a string or a list of messages, found {}", type_name(other)),
                ))
            }
        };
        self.add_system(&mut msgs);
        Ok(msgs)
    }

    fn add_system(&self, msgs: &mut Vec<Message>) {
        if let Some(sys) = &self.config.system_prompt {
            if msgs.first().map(|m| m.role != "system").unwrap_or(true) {
                msgs.insert(0, Message::system(sys.clone()));
            }
        }
    }
}

fn col(name: &Option<String>) -> &str {
    name.as_deref().expect("checked in Mapper::new")
}

/// The gold answer of a cell under a format.
pub fn extract_answer(cell: &Value, format: AnswerFormat) -> Option<String> {
    match format {
        AnswerFormat::Plain => answer::plain_answer(cell),
        AnswerFormat::Raw => match cell {
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        },
        AnswerFormat::Gsm8k => cell.as_str().and_then(answer::gsm8k_answer),
        AnswerFormat::Boxed => cell.as_str().and_then(answer::last_boxed).map(|s| s.trim().to_string()),
    }
}

fn answer_error(cell: &Value, format: AnswerFormat) -> String {
    match (format, cell) {
        (AnswerFormat::Gsm8k, Value::String(_)) => "no `#### <answer>` line".into(),
        (AnswerFormat::Boxed, Value::String(_)) => "no balanced \\boxed{...}".into(),
        (AnswerFormat::Gsm8k | AnswerFormat::Boxed, v) => format!("expected a string, found {}", type_name(v)),
        (_, v) => format!("expected a non-empty string or a number, found {}", type_name(v)),
    }
}

fn get<'a>(row: &'a SourceRow, column: &str) -> Result<&'a Value> {
    match row.fields.get(column) {
        Some(v) => Ok(v),
        None => {
            let mut have: Vec<&str> = row.fields.keys().map(|k| k.as_str()).collect();
            have.sort();
            Err(DataError::row(&row.file, row.row, column, format!("missing (row has: {})", have.join(", "))))
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string(row: &SourceRow, column: &str, v: &Value) -> Result<String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| DataError::row(&row.file, row.row, column, format!("expected a string, found {}", type_name(v))))
}

fn scalar_text(row: &SourceRow, column: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(DataError::row(
            &row.file,
            row.row,
            column,
            format!("expected a string or a number, found {}", type_name(other)),
        )),
    }
}

/// A reply cell: a string, or a list of messages whose last one is the reply.
fn reply(row: &SourceRow, column: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(_) => {
            let msgs = messages(row, column, v)?;
            match msgs.last() {
                Some(m) if m.role == "assistant" => Ok(m.content.clone()),
                Some(m) => Err(DataError::row(
                    &row.file,
                    row.row,
                    column,
                    format!("the last message must be from the assistant, found role `{}`", m.role),
                )),
                None => Err(DataError::row(&row.file, row.row, column, "empty message list")),
            }
        }
        other => Err(DataError::row(
            &row.file,
            row.row,
            column,
            format!("expected a string or a list of messages, found {}", type_name(other)),
        )),
    }
}

/// A list of `{role, content, ...}` (or ShareGPT `{from, value}`) objects; fields beyond role and content are kept.
fn messages(row: &SourceRow, column: &str, v: &Value) -> Result<Vec<Message>> {
    let list = v.as_array().ok_or_else(|| {
        DataError::row(&row.file, row.row, column, format!("expected a list of messages, found {}", type_name(v)))
    })?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let bad = |msg: String| DataError::row(&row.file, row.row, &format!("{column}[{i}]"), msg);
        let obj = m.as_object().ok_or_else(|| bad(format!("expected an object, found {}", type_name(m))))?;
        let role = obj.get("role").or_else(|| obj.get("from"));
        let content = obj.get("content").or_else(|| obj.get("value"));
        let role = match role {
            Some(Value::String(r)) => match r.as_str() {
                "human" => "user".to_string(),
                "gpt" => "assistant".to_string(),
                r => r.to_string(),
            },
            _ => return Err(bad("needs a string `role` (or `from`)".into())),
        };
        let has_tool_calls = obj.get("tool_calls").is_some_and(|t| !t.is_null());
        let content = match content {
            Some(Value::String(c)) => c.clone(),
            // An assistant turn that only calls tools has no text (OpenAI's format writes `content: null`).
            Some(Value::Null) | None if has_tool_calls => String::new(),
            Some(Value::Null) | None => return Err(bad("needs a string `content` (or `value`)".into())),
            Some(other) => return Err(bad(format!("`content` must be a string, found {}", type_name(other)))),
        };
        // Every other field goes to the chat template as given (reasoning_content, tool_calls, name, …).
        let fields = obj.iter().filter(|(k, _)| !matches!(k.as_str(), "role" | "from" | "content" | "value")).map(|(k, v)| (k.clone(), v.clone())).collect();
        out.push(Message { role, content, fields });
    }
    Ok(out)
}
