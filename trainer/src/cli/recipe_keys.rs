//! `train recipe-keys`: every recipe key with its type, default and meaning, generated from the recipe
//! types themselves (their doc comments and serde defaults, through a JSON schema), so it cannot drift.

use serde_json::{Map, Value};

fn resolve<'a>(s: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    if let Some(r) = s.get("$ref").and_then(|r| r.as_str()) {
        if let Some(d) = r.rsplit('/').next().and_then(|n| defs.get(n)) {
            return resolve(d, defs);
        }
    }
    // Option<T>: anyOf [T, null]
    if let Some(any) = s.get("anyOf").and_then(|a| a.as_array()) {
        let some: Vec<&Value> = any.iter().filter(|x| x.get("type").and_then(|t| t.as_str()) != Some("null")).collect();
        if let [t] = some.as_slice() {
            return resolve(t, defs);
        }
    }
    s
}

/// The types of an untagged enum (`anyOf` of several non-null types), e.g. "array of string or string".
fn alternatives(r: &Value, defs: &Map<String, Value>) -> Option<String> {
    let any = r.get("anyOf")?.as_array()?;
    let some: Vec<String> = any.iter().filter(|x| x.get("type").and_then(|t| t.as_str()) != Some("null")).map(|x| type_name(x, defs)).collect();
    (some.len() > 1).then(|| some.join(" or "))
}

fn type_name(s: &Value, defs: &Map<String, Value>) -> String {
    let r = resolve(s, defs);
    if let Some(alt) = alternatives(r, defs) {
        return alt;
    }
    if let Some(e) = r.get("enum").and_then(|e| e.as_array()) {
        return e.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" / ");
    }
    if let Some(one) = r.get("oneOf").and_then(|o| o.as_array()) {
        let consts: Vec<String> = one.iter().filter_map(variant_value).map(|c| c.to_string()).collect();
        if consts.len() == one.len() {
            return consts.join(" / ");
        }
    }
    match r.get("type") {
        Some(Value::String(t)) if t == "array" => format!("array of {}", r.get("items").map(|i| type_name(i, defs)).unwrap_or_default()),
        Some(Value::String(t)) if t == "object" && r.get("properties").is_some() => "table".into(),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str()).filter(|x| *x != "null").collect::<Vec<_>>().join(" / "),
        _ => "any".into(),
    }
}

/// The value of one variant of an enum's `oneOf` (a documented variant is `{const}` or `{enum: [value]}`).
fn variant_value(x: &Value) -> Option<&Value> {
    x.get("const").or_else(|| x.get("enum").and_then(|e| e.get(0)))
}

/// The values of an enum with their doc comments (`` `a`: meaning; `b`: meaning ``), from the enum itself, so that
/// what the table says a key accepts is what the parser accepts.
fn value_docs(r: &Value) -> Option<String> {
    let one = r.get("oneOf")?.as_array()?;
    let docs: Vec<String> = one
        .iter()
        .filter_map(|x| {
            let c = variant_value(x)?.as_str()?;
            let d = x.get("description").and_then(|d| d.as_str())?.replace('\n', " ");
            Some(format!("`{c}`: {}", d.trim_end_matches('.')))
        })
        .collect();
    (docs.len() == one.len() && !docs.is_empty()).then(|| docs.join("; ") + ".")
}

fn walk(s: &Value, defs: &Map<String, Value>, prefix: &str, out: &mut Vec<[String; 4]>) {
    let r = resolve(s, defs);
    let Some(props) = r.get("properties").and_then(|p| p.as_object()) else { return };
    for (k, sub) in props {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let target = resolve(sub, defs);
        let mut doc = sub.get("description").or_else(|| target.get("description")).and_then(|d| d.as_str()).unwrap_or("").replace('\n', " ");
        if let Some(values) = value_docs(target) {
            doc = format!("{doc} Values: {values}").trim().to_string();
        }
        // a key with no default is required where the table lists it so, else optional (absent: off)
        let required = r.get("required").and_then(|q| q.as_array()).is_some_and(|q| q.iter().any(|x| x.as_str() == Some(k)));
        let default = sub.get("default").map(|d| d.to_string()).unwrap_or_else(|| if required { "required" } else { "none" }.into());
        out.push([path.clone(), type_name(sub, defs), default, doc]);
        if target.get("properties").is_some() {
            walk(target, defs, &path, out);
        }
        // arrays of tagged tables ([[stage]]): one block per kind
        if let Some(items) = target.get("items") {
            let it = resolve(items, defs);
            for v in it.get("oneOf").and_then(|o| o.as_array()).into_iter().flatten() {
                let kind = v.pointer("/properties/kind/const").and_then(|c| c.as_str()).unwrap_or("?");
                walk(v, defs, &format!("{path}[kind={kind}]"), out);
            }
        }
    }
}

/// The table of keys, one line per key: `key  type  default  meaning`.
pub fn table() -> String {
    let schema = schemars::schema_for!(crate::recipe::Recipe);
    let v = serde_json::to_value(&schema).unwrap_or_default();
    let defs = v.get("$defs").and_then(|d| d.as_object()).cloned().unwrap_or_default();
    let mut rows = vec![];
    walk(&v, &defs, "", &mut rows);
    let mut s = String::from("| key | type | default | meaning |\n|---|---|---|---|\n");
    for [k, t, d, m] in rows {
        s.push_str(&format!("| `{k}` | {t} | {} | {m} |\n", d.replace('|', "\\|")));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_nested_and_stage_keys_with_docs_and_defaults() {
        let t = super::table();
        assert!(t.contains("| `run.seed` | integer | 0 | Seed for data order and sampling. |"), "{t}");
        assert!(t.contains("`stage[kind=sft].lr`"), "{t}");
        assert!(t.contains("`stage[kind=sft].tokenize.loss_on`"), "{t}");
        assert!(t.contains("`model.dtype` | string | \"float32\""), "{t}");
        assert!(t.contains("`stage[kind=sft].schedule` | \"constant\" / \"linear\" / \"cosine\""), "{t}");
        // an enum's values are documented from the enum's own variants
        assert!(t.contains("Values: `all_assistant`: Every assistant turn"), "{t}");
    }

    /// Every enum value of the schema, grouped by enum.
    fn enums() -> Vec<Vec<String>> {
        let schema = serde_json::to_value(schemars::schema_for!(crate::recipe::Recipe)).unwrap();
        let mut out = vec![];
        for d in schema["$defs"].as_object().unwrap().values() {
            let vals: Vec<String> = match (d.get("enum"), d.get("oneOf")) {
                (Some(e), _) => e.as_array().unwrap().iter().filter_map(|v| v.as_str().map(String::from)).collect(),
                (_, Some(o)) => o.as_array().unwrap().iter().filter_map(|x| super::variant_value(x)?.as_str().map(String::from)).collect(),
                _ => continue,
            };
            if !vals.is_empty() {
                out.push(vals);
            }
        }
        out
    }

    /// The value lists of a table's descriptions, e.g. "(a, b, c)", that name a value of some enum: each must
    /// hold only values of that enum. Returns how many lists were checked.
    fn check_value_lists(table: &str, enums: &[Vec<String>]) -> Result<usize, String> {
        let ident = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        let mut checked = 0;
        for line in table.lines() {
            let doc = line.trim_end_matches(" |").rsplit(" | ").next().unwrap_or("");
            for group in doc.split('(').skip(1).filter_map(|g| g.split_once(')').map(|(g, _)| g)) {
                let words: Vec<&str> = group.split([',', '/']).flat_map(|w| w.split(" or ")).map(|w| w.trim().trim_matches('`')).collect();
                if words.len() < 2 || !words.iter().all(|w| ident(w)) {
                    continue;
                }
                let Some(e) = enums.iter().find(|e| words.iter().any(|w| e.iter().any(|v| v == w))) else { continue };
                if let Some(w) = words.iter().find(|w| !e.contains(&w.to_string())) {
                    return Err(format!("{line}\n  documents `{w}`, which is not one of {e:?}"));
                }
                checked += 1;
            }
        }
        Ok(checked)
    }

    /// A description names only values the parser accepts (issue 16: `tokenize` documented `loss_on` as
    /// all_assistant, last_assistant, completion_only; the last two were never accepted).
    #[test]
    fn documented_value_lists_are_values_the_parser_accepts() {
        let enums = enums();
        if let Err(e) = check_value_lists(&super::table(), &enums) {
            panic!("{e}");
        }
        let old = "| `stage[kind=sft].tokenize` | table | {} | Tokenization: max_length, loss_on (all_assistant, last_assistant, completion_only), truncation. |";
        let e = check_value_lists(old, &enums).unwrap_err();
        assert!(e.contains("`last_assistant`"), "{e}");
        assert_eq!(check_value_lists("| `k` | t | d | one of (all_assistant, last_turn, completion). |", &enums), Ok(1));
    }
}
