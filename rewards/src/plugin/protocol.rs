//! The plugin wire format (JSON), shared by the exec and http transports.
//!
//! Request (one JSON object; for exec, one line on stdin):
//! `{"protocol": 1, "plugin": NAME, "batch_id": N, "params": {...}, "samples": [{"prompt", "completion",
//! "gold", "completion_tokens", "max_tokens", "truncated", "row": {...}}, ...]}`
//!
//! Response (for exec, one line on stdout):
//! `{"batch_id": N, "rewards": [number | null, ...], "metrics": {"name": [number, ...] | number}}`
//! `rewards` has one entry per sample (null = not applicable); `batch_id` is optional but must
//! match when present; `metrics` is optional.

use crate::reward::{RewardOutput, Sample};
use serde_json::{json, Value};

/// Build the request for a batch.
pub fn request(plugin: &str, batch_id: u64, samples: &[Sample], params: &Value) -> Value {
    json!({
        "protocol": 1,
        "plugin": plugin,
        "batch_id": batch_id,
        "params": params,
        "samples": samples,
    })
}

/// Validate and decode a response.
pub fn parse_response(text: &str, n: usize, batch_id: u64) -> Result<Vec<RewardOutput>, String> {
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| format!("malformed JSON response ({e}): {}", snippet(text)))?;
    let Value::Object(obj) = v else { return Err(format!("response is not a JSON object: {}", snippet(text))) };
    if let Some(id) = obj.get("batch_id") {
        if id.as_u64() != Some(batch_id) {
            return Err(format!("response batch_id {id} does not match request {batch_id}"));
        }
    }
    if let Some(err) = obj.get("error") {
        return Err(format!("plugin reported an error: {err}"));
    }
    let Some(Value::Array(rs)) = obj.get("rewards") else { return Err(format!("response has no `rewards` array: {}", snippet(text))) };
    if rs.len() != n {
        return Err(format!("response has {} rewards for a batch of {n}", rs.len()));
    }
    let mut out = Vec::with_capacity(n);
    for (i, r) in rs.iter().enumerate() {
        let reward = match r {
            Value::Null => None,
            Value::Number(x) => match x.as_f64() {
                Some(f) if f.is_finite() => Some(f),
                _ => return Err(format!("rewards[{i}] is not a finite number")),
            },
            other => return Err(format!("rewards[{i}] must be a number or null, got {other}")),
        };
        out.push(RewardOutput { reward, metrics: Vec::new() });
    }
    if let Some(m) = obj.get("metrics") {
        let Value::Object(m) = m else { return Err("`metrics` must be an object".into()) };
        for (k, v) in m {
            match v {
                Value::Number(x) => {
                    let f = x.as_f64().unwrap_or(0.0);
                    out.iter_mut().for_each(|o| o.metrics.push((k.clone(), f)));
                }
                Value::Array(a) if a.len() == n => {
                    for (o, x) in out.iter_mut().zip(a) {
                        if let Some(f) = x.as_f64() {
                            o.metrics.push((k.clone(), f));
                        }
                    }
                }
                _ => return Err(format!("metrics[{k:?}] must be a number or an array of {n} numbers")),
            }
        }
    }
    Ok(out)
}

fn snippet(s: &str) -> String {
    let t: String = s.chars().take(120).collect();
    if s.chars().count() > 120 {
        format!("{t}...")
    } else {
        t
    }
}
