//! Exact gold-answer extraction from dataset columns. These are small, strict helpers for *reference* answers
//! (which are well formed); judging model output is the rewards crate's math verifier's job.

use serde_json::Value;

/// The content of the last `\boxed{...}` (or `\boxed {...}`, `\fbox{...}`) in `text`, with braces matched, so
/// `\boxed{\frac{2}{3}}` gives `\frac{2}{3}`. `None` when there is no box or its braces are unbalanced.
pub fn last_boxed(text: &str) -> Option<&str> {
    let mut best: Option<&str> = None;
    let bytes = text.as_bytes();
    let mut search = 0;
    while search < text.len() {
        let rest = &text[search..];
        let (pos, name_len) = match (rest.find("\\boxed"), rest.find("\\fbox")) {
            (Some(a), Some(b)) if b < a => (b, 5),
            (Some(a), _) => (a, 6),
            (None, Some(b)) => (b, 5),
            (None, None) => break,
        };
        let start = search + pos + name_len;
        let mut i = start;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            if let Some(end) = matching_brace(text, i) {
                best = Some(&text[i + 1..end]);
                search = end + 1;
                continue;
            }
        }
        search = start;
    }
    best
}

/// Index of the `}` closing the `{` at `open`, skipping escaped braces `\{` / `\}`.
fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                i += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// GSM8K's final answer: the text after the last `####`, trimmed, with thousands separators removed and a
/// numeric value normalised (`1,080` → `1080`, `-3` → `-3`, `5.50` → `5.5`). `None` when there is no `####`
/// or nothing after it.
pub fn gsm8k_answer(text: &str) -> Option<String> {
    let idx = text.rfind("####")?;
    let tail = text[idx + 4..].trim();
    let tail = tail.lines().next().unwrap_or("").trim();
    if tail.is_empty() {
        return None;
    }
    let no_commas: String = tail.chars().filter(|&c| c != ',').collect();
    Some(normalize_number(&no_commas).unwrap_or(no_commas))
}

/// If `s` is a plain decimal number (optional sign, digits, optional fraction; thousands separators `1,234`
/// allowed), its canonical form: no leading zeros, no trailing fractional zeros, no `.0` (`027` → `27`,
/// `27.0` → `27`, `-0.50` → `-0.5`, `1,080` → `1080`). Exact: works on the digits, never through floats.
pub fn normalize_number(s: &str) -> Option<String> {
    let s = s.trim();
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let body = strip_thousands(body)?;
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body.as_str(), ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let mut out = String::new();
    if neg && !(int == "0" && frac.is_empty()) {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    Some(out)
}

/// `1,234,567` → `1234567`; a string with commas that are not thousands separators → `None`;
/// no commas → unchanged.
fn strip_thousands(s: &str) -> Option<String> {
    if !s.contains(',') {
        return Some(s.to_string());
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let groups: Vec<&str> = int.split(',').collect();
    let first_ok = !groups[0].is_empty() && groups[0].len() <= 3;
    if !first_ok || groups[1..].iter().any(|g| g.len() != 3) {
        return None;
    }
    let mut out = groups.concat();
    if let Some(f) = frac {
        out.push('.');
        out.push_str(f);
    }
    Some(out)
}

/// A plain answer cell: a JSON number (AMC's `27.0` → `27`), or a string that is normalised when it is a number
/// (AIME's `"025"` → `25`) and kept trimmed otherwise (LaTeX such as `\frac{14}{3}`). `None` for null, empty,
/// or a list/object.
pub fn plain_answer(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i.to_string())
            } else if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else {
                // serde_json prints the shortest round-trip representation; normalise "27.0" → "27".
                normalize_number(&n.to_string()).or_else(|| Some(n.to_string()))
            }
        }
        Value::String(s) => {
            let t = s.trim();
            if t.is_empty() {
                None
            } else {
                Some(normalize_number(t).unwrap_or_else(|| t.to_string()))
            }
        }
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn boxed_matches_nested_braces_and_takes_the_last() {
        assert_eq!(last_boxed(r"so $\boxed{\frac{2}{3}}$."), Some(r"\frac{2}{3}"));
        assert_eq!(last_boxed(r"\boxed{15\frac{39}{40}} or \boxed{\frac{639}{40}}"), Some(r"\frac{639}{40}"));
        assert_eq!(last_boxed(r"\boxed {7}"), Some("7"));
        assert_eq!(last_boxed(r"\fbox{x} then \boxed{\{1,2\}}"), Some(r"\{1,2\}"));
        assert_eq!(last_boxed(r"\boxed{unclosed"), None);
        assert_eq!(last_boxed("no box"), None);
        assert_eq!(last_boxed(r"\boxed{a} \boxed{b"), Some("a"));
    }

    #[test]
    fn gsm8k_removes_separators() {
        assert_eq!(gsm8k_answer("x\n#### 1,080").as_deref(), Some("1080"));
        assert_eq!(gsm8k_answer("#### 109,200,000").as_deref(), Some("109200000"));
        assert_eq!(gsm8k_answer("a\n#### -3").as_deref(), Some("-3"));
        assert_eq!(gsm8k_answer("no marker"), None);
        assert_eq!(gsm8k_answer("#### "), None);
    }

    #[test]
    fn numbers_normalise_exactly() {
        assert_eq!(normalize_number("025").as_deref(), Some("25"));
        assert_eq!(normalize_number("27.0").as_deref(), Some("27"));
        assert_eq!(normalize_number("-0.50").as_deref(), Some("-0.5"));
        assert_eq!(normalize_number("-0").as_deref(), Some("0"));
        assert_eq!(normalize_number("000").as_deref(), Some("0"));
        assert_eq!(normalize_number("1,234.5").as_deref(), Some("1234.5"));
        assert_eq!(normalize_number("12345678901234567890123").as_deref(), Some("12345678901234567890123"));
        assert_eq!(normalize_number("1,-2"), None);
        assert_eq!(normalize_number("3, 5, 7"), None);
        assert_eq!(normalize_number(r"\frac{1}{2}"), None);
        assert_eq!(normalize_number("."), None);
    }

    #[test]
    fn plain_answers() {
        assert_eq!(plain_answer(&json!(27.0)).as_deref(), Some("27"));
        assert_eq!(plain_answer(&json!(-1.0)).as_deref(), Some("-1"));
        assert_eq!(plain_answer(&json!(2.5)).as_deref(), Some("2.5"));
        assert_eq!(plain_answer(&json!("025")).as_deref(), Some("25"));
        assert_eq!(plain_answer(&json!(" \\frac{14}{3} ")).as_deref(), Some("\\frac{14}{3}"));
        assert_eq!(plain_answer(&json!(null)), None);
        assert_eq!(plain_answer(&json!("")), None);
        assert_eq!(plain_answer(&json!([1])), None);
    }
}
