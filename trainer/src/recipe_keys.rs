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
        if let Some(t) = any.iter().find(|x| x.get("type").and_then(|t| t.as_str()) != Some("null")) {
            return resolve(t, defs);
        }
    }
    s
}

fn type_name(s: &Value, defs: &Map<String, Value>) -> String {
    let r = resolve(s, defs);
    if let Some(e) = r.get("enum").and_then(|e| e.as_array()) {
        return e.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" / ");
    }
    if let Some(one) = r.get("oneOf").and_then(|o| o.as_array()) {
        let consts: Vec<String> = one.iter().filter_map(|x| x.get("const").or_else(|| x.get("enum").and_then(|e| e.get(0)))).map(|c| c.to_string()).collect();
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

fn walk(s: &Value, defs: &Map<String, Value>, prefix: &str, out: &mut Vec<[String; 4]>) {
    let r = resolve(s, defs);
    let Some(props) = r.get("properties").and_then(|p| p.as_object()) else { return };
    for (k, sub) in props {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let target = resolve(sub, defs);
        let doc = sub.get("description").or_else(|| target.get("description")).and_then(|d| d.as_str()).unwrap_or("").replace('\n', " ");
        let default = sub.get("default").map(|d| d.to_string()).unwrap_or_else(|| "required".into());
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
    }
}
