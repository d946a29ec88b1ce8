//! Reading a recipe file: TOML into [`Recipe`], `--set` overrides, relative paths, and errors that name the
//! file and line (unknown keys get a did-you-mean; every problem is reported at once).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

use super::file::Recipe;

/// Line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The first line at or after `from` (1-based) that assigns `key`.
fn key_line(text: &str, from: usize, key: &str) -> Option<usize> {
    text.lines().enumerate().skip(from.saturating_sub(1)).find_map(|(i, l)| {
        let rest = l.trim_start().strip_prefix(key)?;
        rest.trim_start().starts_with('=').then_some(i + 1)
    })
}

/// The line (1-based) of the key, in the table whose header is on line `header`, holding the value that a
/// serde "invalid type: string \"x\"" / "invalid value: integer `-1`" message names.
fn value_line(text: &str, header: usize, msg: &str) -> Option<usize> {
    let rest = msg.strip_prefix("invalid type: ").or_else(|| msg.strip_prefix("invalid value: "))?;
    let literal = if let Some(r) = rest.strip_prefix("string \"") {
        format!("\"{}\"", r.split('"').next()?)
    } else {
        let r = rest.split_once(' ')?.1;
        let r = r.strip_prefix('`')?;
        r.split('`').next()?.to_string()
    };
    let lines: Vec<&str> = text.lines().collect();
    let in_table = lines.get(header.checked_sub(1)?)?.trim_start().starts_with('[');
    if !in_table {
        return None;
    }
    (header..lines.len()).take_while(|&i| !lines[i].trim_start().starts_with('[')).find_map(|i| {
        let value = lines[i].split_once('=')?.1;
        let value = value.split(" #").next()?.trim();
        (value == literal).then_some(i + 1)
    })
}

/// Levenshtein distance (for did-you-mean).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Adds a did-you-mean to serde's "unknown field `x`, expected one of `a`, `b`" messages.
fn did_you_mean(msg: &str) -> String {
    let Some(rest) = msg.strip_prefix("unknown field `") else { return msg.to_string() };
    let Some((field, expected)) = rest.split_once('`') else { return msg.to_string() };
    let options: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = options.iter().map(|o| (distance(field, o), *o)).min();
    match best {
        Some((d, o)) if d <= 3.max(field.len() / 3) => format!("unknown key `{field}` (did you mean `{o}`?)"),
        _ => format!("unknown key `{field}`; expected one of {}", options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")),
    }
}

/// Applies one `--set key.path=value` override (value parsed as TOML, else taken as a string);
/// `stage.1.lr` addresses the second `[[stage]]`.
fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((path, raw)) = spec.split_once('=') else { bail!("--set {spec}: expected key.path=value") };
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = path.trim().split('.').collect();
    let mut root = toml::Value::Table(std::mem::take(doc));
    let mut cur = &mut root;
    let mut result = Ok(());
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let next = match cur {
            toml::Value::Table(t) if last => {
                t.insert(part.to_string(), value.clone());
                break;
            }
            toml::Value::Table(t) => t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default())),
            toml::Value::Array(a) => match part.parse::<usize>().ok().filter(|&k| k < a.len()) {
                Some(k) if last => {
                    a[k] = value.clone();
                    break;
                }
                Some(k) => &mut a[k],
                None => {
                    result = Err(anyhow::anyhow!("--set {spec}: `{part}` is not an index of a list of {} entries", a.len()));
                    break;
                }
            },
            _ => {
                result = Err(anyhow::anyhow!("--set {spec}: `{}` is not a table", parts[..i].join(".")));
                break;
            }
        };
        cur = next;
    }
    if let toml::Value::Table(t) = root {
        *doc = t;
    }
    result
}

/// Reads, overrides and validates a recipe (all problems are collected and reported together); with `missing_ok`, files and directories that do not exist yet (a model or dataset the user
/// will provide) are returned as warnings instead of errors (for `--dry-run`).
pub fn load_with(path: &Path, overrides: &[String], missing_ok: bool) -> Result<(Recipe, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    parse_with(&text, &path.display().to_string(), overrides, path.parent().unwrap_or(Path::new(".")), missing_ok)
}

/// As [`load_with`], from text; `origin` names the file in messages, relative paths resolve against `base`.
fn parse_with(text: &str, origin: &str, overrides: &[String], base: &Path, missing_ok: bool) -> Result<(Recipe, Vec<String>)> {
    let mut errors: Vec<String> = vec![];
    // Collect unknown-key and type errors one by one: blank out the offending line and parse again.
    let mut work = text.to_string();
    let mut recipe: Option<Recipe> = None;
    for _ in 0..64 {
        let mut doc: toml::Table = match work.parse() {
            Ok(d) => d,
            Err(e) => {
                let line = e.span().map(|s| line_of(&work, s.start)).unwrap_or(0);
                errors.push(format!("{origin}:{line}: {}", e.message().trim()));
                break;
            }
        };
        for o in overrides {
            if let Err(e) = apply_override(&mut doc, o) {
                errors.push(e.to_string());
            }
        }
        if !errors.is_empty() && errors.iter().any(|e| e.starts_with("--set")) {
            break;
        }
        let as_text = if overrides.is_empty() { work.clone() } else { toml::to_string(&doc).unwrap_or_default() };
        match toml::from_str::<Recipe>(&as_text) {
            Ok(r) => {
                recipe = Some(r);
                break;
            }
            Err(e) => {
                let msg = did_you_mean(e.message().trim());
                match e.span() {
                    Some(s) if overrides.is_empty() => {
                        let mut line = line_of(&work, s.start);
                        // Inside [[stage]] tables serde reports the table's header; find the key's own line.
                        if let Some(key) = msg.strip_prefix("unknown key `").and_then(|r| r.split('`').next()) {
                            if let Some(l) = key_line(&work, line, key) {
                                line = l;
                            }
                        } else if let Some(l) = value_line(&work, line, &msg) {
                            // a wrong type or value: the line in that table holding the value serde names
                            line = l;
                        }
                        let fatal = msg.starts_with("unknown variant") || msg.starts_with("missing field");
                        errors.push(format!("{origin}:{line}: {msg}"));
                        // blank the line and look for more problems
                        let mut lines: Vec<&str> = work.lines().collect();
                        if fatal || line == 0 || line > lines.len() || lines[line - 1].trim().is_empty() || lines[line - 1].trim_start().starts_with('[') {
                            break;
                        }
                        lines[line - 1] = "";
                        work = lines.join("\n");
                    }
                    _ => {
                        errors.push(format!("{origin}: {msg}"));
                        break;
                    }
                }
            }
        }
    }
    let Some(mut recipe) = recipe.filter(|_| errors.is_empty()) else {
        bail!("{} problem(s) in the recipe:\n  {}", errors.len().max(1), if errors.is_empty() { "invalid recipe".into() } else { errors.join("\n  ") });
    };
    // `--set model.path=""` removes the path (e.g. to swap in an inline `config`)
    if recipe.model.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        recipe.model.path = None;
    }
    resolve_paths(&mut recipe, base);
    let (warnings, problems): (Vec<String>, Vec<String>) = super::validate::validate(&recipe, origin).into_iter().partition(|p| missing_ok && p.contains(" does not exist"));
    if !problems.is_empty() {
        bail!("{} problem(s) in the recipe:\n  {}", problems.len(), problems.join("\n  "));
    }
    Ok((recipe, warnings))
}

fn resolve(base: &Path, p: &mut PathBuf) {
    // `~/` is the home directory (e.g. the caches scripts/ fill: ~/.cache/whet/...)
    if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), std::env::var_os("HOME")) {
        *p = PathBuf::from(home).join(rest);
    }
    if p.is_relative() && !p.as_os_str().is_empty() {
        let joined = base.join(&*p);
        // Prefer the recipe-relative path; keep the given one if only it exists (run from the repo root).
        if joined.exists() || !p.exists() {
            *p = joined;
        }
    }
}

fn resolve_paths(r: &mut Recipe, base: &Path) {
    if let Some(p) = r.model.path.as_mut() {
        resolve(base, p);
    }
    for s in &mut r.stage {
        s.resolve_paths(&mut |p| resolve(base, p));
    }
}
