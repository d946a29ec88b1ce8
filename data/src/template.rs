//! Chat templates: the Jinja `chat_template` of a `tokenizer_config.json`, rendered with minijinja the way
//! transformers' `apply_chat_template` renders it with jinja2:
//!
//! - `trim_blocks` and `lstrip_blocks` on, loop controls (`break` / `continue`) on;
//! - globals `raise_exception(msg)`, `strftime_now(fmt)` (UTC), `namespace`, `dict`;
//! - a `tojson` filter with Python `json.dumps` output (`", "` / `": "` separators, `ensure_ascii=False`,
//!   `indent`, `separators`, `sort_keys`), not Jinja's HTML-escaping one;
//! - Python string/dict/list methods (`.strip()`, `.split()`, `.startswith()`, `.items()`, …);
//! - context: `messages`, `tools` (null unless given), `documents` (null), `add_generation_prompt`, the named
//!   special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`, …) and any extra variables
//!   (`enable_thinking`, `date_string`, …);
//! - messages with `null` fields lose them, and `reasoning_content` / `thinking` are aliased as transformers does.
//!
//! Parity with transformers is checked byte for byte against fixtures rendered by
//! `data/scripts/gen_template_fixtures.py`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde_json::{Map, Value as Json};

use crate::error::{DataError, Result};
use crate::record::Message;

const NAME: &str = "chat_template";
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A compiled chat template plus the special-token strings it can refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special_tokens: Map<String, Json>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("special_tokens", &self.special_tokens).finish_non_exhaustive()
    }
}

/// Options for [`ChatTemplate::render_with`].
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// Append the assistant header so the model starts a reply.
    pub add_generation_prompt: bool,
    /// Tool definitions (JSON schemas), passed as `tools`.
    pub tools: Option<Vec<Json>>,
    /// Extra template variables (e.g. `enable_thinking = false`, `date_string = "26 Jul 2024"`).
    pub extra: Map<String, Json>,
}

fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Compiles `source` with the given special tokens (`bos_token`, `eos_token`, … → their strings).
    pub fn from_str(source: &str, special_tokens: &[(&str, &str)]) -> Result<Self> {
        let mut map = Map::new();
        for (k, v) in special_tokens {
            map.insert(k.to_string(), Json::String(v.to_string()));
        }
        Self::build(source.to_string(), map)
    }

    /// Reads `chat_template` (a string, or a list of `{name, template}` where `default` is taken) and the special
    /// tokens from a `tokenizer_config.json`. When the config has no template, a `chat_template.jinja` next to it
    /// is used (transformers ≥ 4.47 saves it there).
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let cfg: Json = serde_json::from_str(&text)
            .map_err(|e| DataError::Template(format!("{}: invalid JSON: {e}", path.display())))?;
        let mut special = Map::new();
        for k in SPECIAL_TOKEN_KEYS {
            if let Some(s) = cfg.get(k).and_then(token_string) {
                special.insert(k.to_string(), Json::String(s));
            }
        }
        let source = match cfg.get("chat_template") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                .map(str::to_string)
                .ok_or_else(|| {
                    DataError::Template(format!("{}: `chat_template` list has no `default` entry", path.display()))
                })?,
            _ => {
                let jinja = path.with_file_name("chat_template.jinja");
                std::fs::read_to_string(&jinja).map_err(|_| {
                    DataError::Template(format!(
                        "{}: no `chat_template` key and no {} next to it",
                        path.display(),
                        jinja.display()
                    ))
                })?
            }
        };
        Self::build(source, special)
    }

    fn build(source: String, special_tokens: Map<String, Json>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| DataError::Template(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JError> {
            Err(JError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
            strftime(secs, &fmt)
        });
        env.add_filter("tojson", tojson_filter);
        env.add_template_owned(NAME, source.clone()).map_err(|e| DataError::Template(describe(&e)))?;
        Ok(ChatTemplate { env, source, special_tokens })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A special token string (e.g. `"eos_token"`), if the config had it.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special_tokens.get(key).and_then(|v| v.as_str())
    }

    /// Renders messages (role, content and every other field they carry).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, &RenderOptions { add_generation_prompt, ..Default::default() })
    }

    /// Renders with options (tools, extra variables).
    pub fn render_with(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        let json: Vec<Json> = messages.iter().map(|m| serde_json::to_value(m).expect("plain struct")).collect();
        self.render_json(&json, opts)
    }

    /// Renders messages given as JSON objects (so they can carry `tool_calls`, `reasoning_content`, …).
    pub fn render_json(&self, messages: &[Json], opts: &RenderOptions) -> Result<String> {
        let mut msgs = Vec::with_capacity(messages.len());
        for m in messages {
            let Json::Object(o) = m else {
                return Err(DataError::Template(format!("a message must be an object, got {m}")));
            };
            let mut o: Map<String, Json> = o.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
            let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| o.get(*k).cloned());
            if let Some(r) = reasoning {
                o.insert("thinking".into(), r.clone());
                o.insert("reasoning_content".into(), r);
            }
            msgs.push(Json::Object(o));
        }
        let mut ctx = Map::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), v.clone());
        }
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Json::Array(msgs));
        ctx.insert("tools".into(), opts.tools.clone().map(Json::Array).unwrap_or(Json::Null));
        ctx.insert("documents".into(), Json::Null);
        ctx.insert("add_generation_prompt".into(), Json::Bool(opts.add_generation_prompt));
        let tmpl = self.env.get_template(NAME).map_err(|e| DataError::Template(describe(&e)))?;
        tmpl.render(Value::from(minijinja::value::Serde(&ctx))).map_err(|e| DataError::Template(describe(&e)))
    }
}

fn describe(e: &JError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`.
fn tojson_filter(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    JError::new(ErrorKind::InvalidOperation, format!("tojson: indent must be an int or a string, got {v}"))
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(JError::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| JError::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialise: {e}")))?;
    let mut out = String::new();
    let opts = PyJson { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false), ensure_ascii: ensure_ascii.unwrap_or(false) };
    opts.write(&json, 0, &mut out);
    Ok(Value::from(out))
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::to_string(s).expect("string serialises");
        if self.ensure_ascii {
            for c in quoted.chars() {
                if (c as u32) < 0x80 {
                    out.push(c);
                } else {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{:04x}", u));
                    }
                }
            }
        } else {
            out.push_str(&quoted);
        }
    }

    fn write(&self, v: &Json, level: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&py_number(n)),
            Json::String(s) => self.string(s, out),
            Json::Array(a) => {
                if a.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Json::Object(o) => {
                if o.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut keys: Vec<&String> = o.keys().collect();
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(&o[k.as_str()], level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }
}

/// Python's `repr(float)`-style output for floats (`1.0`, `1e+20`), integers as is.
fn py_number(n: &serde_json::Number) -> String {
    if !n.is_f64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    let a = f.abs();
    if f == 0.0 || (1e-4..1e16).contains(&a) {
        let s = format!("{f}");
        return if s.contains('.') { s } else { format!("{s}.0") };
    }
    // Python switches to exponent form outside [1e-4, 1e16): "1e+16", "1.5e-07".
    let s = format!("{f:e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Days since 1970-01-01 → (year, month 1-12, day 1-31). Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A subset of C `strftime` for a UTC Unix time: `%d %m %Y %y %b %B %a %A %H %M %S %j %e %%`; other directives
/// are copied as is.
pub fn strftime(unix_secs: i64, fmt: &str) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = ((days + 3).rem_euclid(7)) as usize; // 1970-01-01 was a Thursday (index 3 from Monday)
    let doy = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{doy:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime(0, "%d %b %Y %A %H:%M:%S %j"), "01 Jan 1970 Thursday 00:00:00 001");
        // 2024-07-26 00:00:00 UTC (Llama 3.1's default date string) was a Friday.
        assert_eq!(strftime(1_721_952_000, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(strftime(1_721_952_000, "%a %B %e %y"), "Fri July 26 24");
        // 2000-02-29 12:34:56 UTC, leap day, day 60.
        assert_eq!(strftime(951_827_696, "%Y-%m-%d %H:%M:%S %j %%"), "2000-02-29 12:34:56 060 %");
        assert_eq!(strftime(-86_400, "%Y-%m-%d"), "1969-12-31");
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = ChatTemplate::from_str("{{ raise_exception('only user and assistant roles') }}", &[]).unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("only user and assistant roles"), "{e}");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = ChatTemplate::from_str(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é<' | tojson }}|{{ [1.5, 0.1, 1e20, 1.5e-7] | tojson }}|{{ [] | tojson }}",
            &[],
        )
        .unwrap();
        let mut extra = Map::new();
        extra.insert("x".into(), serde_json::json!({"a": [1, 2.0, "q\""], "b": null}));
        let out = t.render_json(&[], &RenderOptions { extra, ..Default::default() }).unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.0, \"q\\\"\"], \"b\": null}|{\n  \"a\": [\n    1,\n    2.0,\n    \"q\\\"\"\n  ],\n  \"b\": null\n}|\"é<\"|[1.5, 0.1, 1e+20, 1.5e-07]|[]"
        );
    }

    #[test]
    fn loop_controls_python_methods_and_whitespace_control() {
        let src = "{% for m in messages %}\n  {% if m.role == 'system' %}{% continue %}{% endif %}\n{{ m.content.strip().upper() }}{% if loop.index > 2 %}{% break %}{% endif %}\n{% endfor %}";
        let t = ChatTemplate::from_str(src, &[]).unwrap();
        let msgs = vec![Message::system("s"), Message::user(" a "), Message::assistant("b"), Message::user("c")];
        // trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before one.
        assert_eq!(t.render(&msgs, false).unwrap(), "AB");
    }

    #[test]
    fn null_tools_are_defined_but_none() {
        let t = ChatTemplate::from_str("{{ tools is defined }} {{ tools is none }} {{ bos_token }}", &[("bos_token", "<s>")]).unwrap();
        // Python-style booleans, as jinja2 prints them.
        assert_eq!(t.render(&[], false).unwrap(), "True True <s>");
    }
}
