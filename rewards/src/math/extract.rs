//! Finding the answer inside a response: the last `\boxed{}` (or `\fbox{}`), "final answer"
//! phrases, GSM8K's `#### n`, the last LaTeX math environment, the whole text when it is short,
//! and the last number.

use serde::{Deserialize, Serialize};

/// Which extraction strategies to try, in order of priority.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractConfig {
    /// Use the last `\boxed{...}` / `\fbox{...}` (adjacent boxes joined into a list).
    pub boxed: bool,
    /// Boxed answers outrank "final answer is ..." phrases (false: phrases first).
    pub boxed_first: bool,
    /// Use the text after "final answer is", "the answer is", "answer:".
    pub answer_phrases: bool,
    /// Use GSM8K's `#### n` line.
    pub gsm8k_hash: bool,
    /// Use the last `$...$`, `$$...$$`, `\(...\)` or `\[...\]` (adjacent ones joined).
    pub latex_envs: bool,
    /// Use the whole text when it looks like a bare answer (no prose).
    pub whole_text: bool,
    /// Use the last number in the text.
    pub last_number: bool,
    /// Multiple-choice letters (e.g. "ABCD"): find a standalone choice letter.
    pub choices: Option<String>,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig { boxed: true, boxed_first: true, answer_phrases: true, gsm8k_hash: true, latex_envs: true, whole_text: true, last_number: true, choices: None }
    }
}

impl ExtractConfig {
    /// Only the last boxed expression (what MATH-style "last boxed" evaluation uses).
    pub fn boxed_only() -> Self {
        ExtractConfig { boxed: true, boxed_first: true, answer_phrases: false, gsm8k_hash: false, latex_envs: false, whole_text: false, last_number: false, choices: None }
    }
}

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Boxed,
    Phrase,
    Hash,
    Latex,
    Whole,
    LastNumber,
    Choice,
}

/// A candidate answer string.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub text: String,
    pub source: Source,
}

/// The most likely answer string, if any.
pub fn extract_answer(text: &str, cfg: &ExtractConfig) -> Option<String> {
    extract_candidates(text, cfg).into_iter().next().map(|c| c.text)
}

/// All candidate answers in priority order (the verifier uses the first that parses).
///
/// Boxed answers come first, except that a "final answer is ..." phrase written *after* the last
/// box wins; the last number wins over the last math environment when it comes after it.
pub fn extract_candidates(text: &str, cfg: &ExtractConfig) -> Vec<Candidate> {
    let mut out = Vec::new();
    let push = |t: Option<String>, s: Source, out: &mut Vec<Candidate>| {
        if let Some(t) = t {
            let t = fix_decimal_comma(t.trim());
            if !t.is_empty() && !out.iter().any(|c: &Candidate| c.text == t) {
                out.push(Candidate { text: t, source: s });
            }
        }
    };
    let boxed = if cfg.boxed { boxed_group_pos(text) } else { None };
    let phrase = if cfg.answer_phrases { answer_phrase_pos(text) } else { None };
    let phrase_after_box = match (&boxed, &phrase) {
        // ... but "so our answer is correct" after the box is not an answer.
        (Some((_, bend)), Some((ptext, ppos))) => ppos > bend && ptext.contains(|c: char| c.is_ascii_digit() || c == '\\'),
        _ => true,
    };
    if cfg.boxed_first && !phrase_after_box {
        push(boxed.clone().map(|b| b.0), Source::Boxed, &mut out);
    }
    push(phrase.map(|p| p.0), Source::Phrase, &mut out);
    push(boxed.map(|b| b.0), Source::Boxed, &mut out);
    if let Some(ch) = &cfg.choices {
        push(choice_letter(text, ch), Source::Choice, &mut out);
    }
    if cfg.gsm8k_hash {
        push(hash_answer(text), Source::Hash, &mut out);
    }
    let env = if cfg.latex_envs { env_group_pos(text) } else { None };
    let num = if cfg.last_number { last_number_pos(text) } else { None };
    let num_after_env = matches!((&env, &num), (Some((_, eend)), Some((_, nst))) if nst >= eend);
    if num_after_env {
        push(num.clone().map(|n| n.0), Source::LastNumber, &mut out);
    }
    push(env.map(|e| e.0), Source::Latex, &mut out);
    if cfg.whole_text && looks_like_answer(text) {
        push(Some(text.to_string()), Source::Whole, &mut out);
    }
    push(num.map(|n| n.0), Source::LastNumber, &mut out);
    out
}

/// `2,74` and `0,111` are decimal commas; `1,000` is a thousands separator (left alone).
fn fix_decimal_comma(s: &str) -> String {
    let t = s.trim_matches(|c: char| c == '$' || c.is_whitespace());
    let body = t.strip_prefix('-').unwrap_or(t);
    if let Some((a, b)) = body.split_once(',') {
        let digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
        if digits(a) && digits(b) {
            let thousands = a.len() <= 3 && !a.starts_with('0') && b.len() == 3;
            if !thousands && b.len() >= 2 {
                return t.replacen(',', ".", 1);
            }
        }
    }
    s.to_string()
}

fn find_all(hay: &str, needle: &str) -> Vec<usize> {
    hay.match_indices(needle).map(|(i, _)| i).collect()
}

/// Content of a brace group starting at `open` (which must be `{`); returns (content, end).
/// Unclosed groups run to the end of the text.
fn brace_group(text: &str, open: usize) -> (String, usize) {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                i += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return (text[open + 1..i].to_string(), i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    let rest = text[open + 1..].trim_end().trim_end_matches(['$', '.', '}']);
    (rest.to_string(), b.len())
}

/// All top-level boxes: (start, end, content).
fn boxes(text: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut starts: Vec<(usize, usize)> = Vec::new();
    for (cmd, len) in [("\\boxed", 6), ("\\fbox", 5)] {
        for i in find_all(text, cmd) {
            starts.push((i, i + len));
        }
    }
    starts.sort();
    let mut pos = 0;
    for (s, after) in starts {
        if s < pos {
            continue;
        }
        let b = text.as_bytes();
        let mut j = after;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        if j < b.len() && b[j] == b'{' {
            let (c, end) = brace_group(text, j);
            out.push((s, end, c));
            pos = end;
        } else if j > after && j < b.len() {
            // `\boxed 5`: one token.
            let mut k = j;
            while k < b.len() && !b[k].is_ascii_whitespace() && b[k] != b'$' {
                k += 1;
            }
            let tok = text[j..k].trim_end_matches(['.', ',']);
            if !tok.is_empty() {
                out.push((s, k, tok.to_string()));
            }
            pos = k;
        }
    }
    out
}

/// Is the text between two answers only connecting words (`and`, `,`, `\quad`, a few words)?
fn is_connective_gap(gap: &str) -> bool {
    if gap.len() > 80 || gap.contains("\n\n") {
        return false;
    }
    let mut s = gap.to_string();
    for p in ["\\quad", "\\qquad", "\\text", "\\mbox", "\\textnormal", "\\(", "\\)", "\\[", "\\]", "\\,", "\\;", "\\ "] {
        s = s.replace(p, " ");
    }
    let words = s
        .split(|c: char| c.is_whitespace() || matches!(c, '$' | '{' | '}' | ',' | ';' | '.' | ':'))
        .filter(|w| !w.is_empty())
        .filter(|w| !matches!(w.to_ascii_lowercase().as_str(), "and" | "or" | "&"))
        .count();
    words <= 3
}

fn join_group(items: Vec<String>) -> String {
    if items.len() == 1 {
        return items.into_iter().next().unwrap();
    }
    items.join(", ")
}

/// The last box, joined with the boxes just before it when only connecting words separate them.
pub fn last_boxed_group(text: &str) -> Option<String> {
    boxed_group_pos(text).map(|b| b.0)
}

fn boxed_group_pos(text: &str) -> Option<(String, usize)> {
    if !text.contains("\\boxed") && !text.contains("\\fbox") {
        return None;
    }
    let bx = boxes(text);
    let last = bx.len().checked_sub(1)?;
    let mut first = last;
    while first > 0 && is_connective_gap(&text[bx[first - 1].1..bx[first].0]) && last - first < 64 {
        first -= 1;
    }
    Some((join_group(bx[first..=last].iter().map(|b| b.2.clone()).collect()), bx[last].1))
}

/// Math environments: (start, end, content).
fn envs(text: &str) -> Vec<(usize, usize, String)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'[' | b'(' => {
                    let close = if b[i + 1] == b'[' { "\\]" } else { "\\)" };
                    if let Some(k) = text[i + 2..].find(close) {
                        let content = &text[i + 2..i + 2 + k];
                        if b[i + 1] == b'[' || !content.contains('\n') {
                            out.push((i, i + 4 + k, content.to_string()));
                            i = i + 4 + k;
                            continue;
                        }
                    }
                    i += 2;
                    continue;
                }
                _ => {
                    i += 2;
                    continue;
                }
            }
        }
        if c == b'$' {
            if i + 1 < b.len() && b[i + 1] == b'$' {
                if let Some(k) = text[i + 2..].find("$$") {
                    out.push((i, i + 4 + k, text[i + 2..i + 2 + k].to_string()));
                    i = i + 4 + k;
                    continue;
                }
                i += 2;
                continue;
            }
            // Inline `$...$`: no newline, skip escaped `\$`.
            let mut k = i + 1;
            let mut found = None;
            while k < b.len() {
                match b[k] {
                    b'\\' => k += 1,
                    b'$' => {
                        found = Some(k);
                        break;
                    }
                    b'\n' => break,
                    _ => {}
                }
                k += 1;
            }
            if let Some(k) = found {
                let content = &text[i + 1..k];
                if !content.trim().is_empty() {
                    out.push((i, k + 1, content.to_string()));
                }
                i = k + 1;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The last math environment, joined with the ones just before it when only connecting words separate them.
pub fn last_env_group(text: &str) -> Option<String> {
    env_group_pos(text).map(|e| e.0)
}

fn env_group_pos(text: &str) -> Option<(String, usize)> {
    if !text.contains('$') && !text.contains("\\[") && !text.contains("\\(") {
        return None;
    }
    let ev = envs(text);
    let last = ev.len().checked_sub(1)?;
    let mut first = last;
    while first > 0 && last - first < 32 {
        let gap = &text[ev[first - 1].1..ev[first].0];
        let t = gap.trim();
        let only_conn = t.split_whitespace().all(|w| matches!(w.trim_matches(','), "and" | "or" | "")) && !t.is_empty() && gap.len() < 12;
        if only_conn {
            first -= 1;
        } else {
            break;
        }
    }
    Some((join_group(ev[first..=last].iter().map(|e| e.2.clone()).collect()), ev[last].1))
}

/// The text after the last "final answer is" / "the answer is" / "answer:", up to the end of the sentence.
pub fn answer_phrase(text: &str) -> Option<String> {
    answer_phrase_pos(text).map(|p| p.0)
}

fn answer_phrase_pos(text: &str) -> Option<(String, usize)> {
    let lower = text.to_ascii_lowercase();
    let mut best: Option<usize> = None;
    for p in ["final answer is", "final answer:", "the answer is", "answer is:", "answer:"] {
        if let Some(i) = lower.rfind(p) {
            let end = i + p.len();
            if best.is_none_or(|b| end > b) {
                best = Some(end);
            }
        }
    }
    let start = best?;
    let rest = &text[start..];
    let mut end = rest.len();
    for stop in ["\n", "I hope", ". ", "<|"] {
        if let Some(k) = find_outside_math(rest, stop) {
            end = end.min(k);
        }
    }
    // Markdown emphasis around the answer (`**Final Answer:** 42`, `is **42**.`) is not part of it.
    let seg = rest[..end].trim().trim_matches(|c: char| c == '*' || c == '_' || c.is_whitespace()).trim_end_matches('.').trim_matches(|c: char| c == '*' || c.is_whitespace());
    if seg.is_empty() {
        return None;
    }
    // "The volume of $ABCD$ is 120": the answer follows the last " is ".
    let seg = match find_last_outside_math(seg, " is ") {
        Some(k) => seg[k + 4..].trim(),
        None => seg,
    };
    let found = if let Some(e) = last_env_group(seg) {
        Some(e)
    } else if let Some(g) = last_boxed_group(seg) {
        Some(g)
    } else if prose_words(seg) >= 2 {
        last_number(seg)
    } else {
        Some(seg.trim_matches('"').to_string())
    };
    found.map(|f| (f, start))
}

fn find_last_outside_math(s: &str, pat: &str) -> Option<usize> {
    let mut last = None;
    let mut from = 0;
    while let Some(k) = find_outside_math(&s[from..], pat) {
        last = Some(from + k);
        from += k + pat.len();
    }
    last
}

/// Find `pat` outside `$...$` spans.
fn find_outside_math(s: &str, pat: &str) -> Option<usize> {
    let mut in_math = false;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == b'$' {
            in_math = !in_math;
        } else if !in_math && b[i..].starts_with(pat.as_bytes()) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// A multiple-choice letter: after "answer is", at the start (`B.` `(B)`), else the last standalone one.
pub fn choice_letter(text: &str, choices: &str) -> Option<String> {
    let is_choice = |c: char| choices.contains(c);
    let standalone = |s: &str| -> Vec<(usize, char)> {
        let cs: Vec<(usize, char)> = s.char_indices().collect();
        let mut out = Vec::new();
        for (k, &(i, c)) in cs.iter().enumerate() {
            if !is_choice(c) {
                continue;
            }
            let before = if k > 0 { Some(cs[k - 1].1) } else { None };
            let after = cs.get(k + 1).map(|x| x.1);
            if before.is_none_or(|b| !b.is_alphanumeric()) && after.is_none_or(|a| !a.is_alphanumeric()) {
                out.push((i, c));
            }
        }
        out
    };
    let lower = text.to_ascii_lowercase();
    for p in ["answer is", "answer:"] {
        if let Some(i) = lower.rfind(p) {
            if let Some((_, c)) = standalone(&text[i + p.len()..]).first() {
                return Some(c.to_string());
            }
        }
    }
    let t = text.trim_start().trim_start_matches('(');
    let mut it = t.chars();
    if let (Some(c), next) = (it.next(), it.next()) {
        if is_choice(c) && next.is_none_or(|n| matches!(n, '.' | ')' | ':' | ' ')) {
            return Some(c.to_string());
        }
    }
    standalone(text).last().map(|(_, c)| c.to_string())
}

/// GSM8K: the text after the last `####` on its line.
pub fn hash_answer(text: &str) -> Option<String> {
    let i = text.rfind("####")?;
    let line = text[i + 4..].lines().next().unwrap_or("").trim();
    if line.is_empty() {
        None
    } else {
        Some(line.to_string())
    }
}

/// Runs of ASCII letters outside LaTeX command names.
fn words(s: &str) -> impl Iterator<Item = &str> {
    let b = s.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() {
            if b[i] == b'\\' {
                i += 1;
                while i < b.len() && b[i].is_ascii_alphabetic() {
                    i += 1;
                }
            } else if b[i].is_ascii_alphabetic() {
                let st = i;
                while i < b.len() && b[i].is_ascii_alphabetic() {
                    i += 1;
                }
                return Some(&s[st..i]);
            } else {
                i += 1;
            }
        }
        None
    })
}

/// Words of three or more letters outside LaTeX commands.
fn prose_words(s: &str) -> usize {
    words(s).filter(|w| w.len() >= 3).count()
}

/// A short text with no prose (a bare answer such as `18`, `\frac{14}{3}`, `x \in [-2,7]`).
fn looks_like_answer(text: &str) -> bool {
    if text.len() > 2000 {
        return false;
    }
    // Text inside \text{}, \mbox{} and environment names does not count.
    let mut stripped = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(k) = ["\\text", "\\mbox", "\\begin", "\\end", "\\mathrm", "\\operatorname"].iter().filter_map(|p| rest.find(p)).min() {
        stripped.push_str(&rest[..k]);
        let after = &rest[k..];
        rest = after.find('}').map(|e| &after[e + 1..]).unwrap_or("");
    }
    stripped.push_str(rest);
    // One word of 4+ letters, or two words of 2+ letters (`so it is -1`), make it prose.
    let mut short = 0;
    for w in words(&stripped) {
        let math_word = matches!(w, "sqrt" | "frac" | "infty" | "percent" | "percentage" | "pct" | "sin" | "cos" | "tan" | "log" | "ln" | "exp" | "pi" | "or" | "and");
        if math_word {
            continue;
        }
        if w.len() >= 4 {
            return false;
        }
        if w.len() >= 2 {
            short += 1;
        }
    }
    short <= 1
}

/// The last number in the text: `-1,234.5`, `2/3`, `45%`; not glued to a preceding letter.
pub fn last_number(text: &str) -> Option<String> {
    last_number_pos(text).map(|n| n.0)
}

fn last_number_pos(text: &str) -> Option<(String, usize)> {
    let b = text.as_bytes();
    let mut i = b.len();
    while i > 0 {
        i -= 1;
        if !b[i].is_ascii_digit() {
            continue;
        }
        // Found the last digit; walk back over the number.
        let end = i + 1;
        let mut st = i;
        while st > 0 && (b[st - 1].is_ascii_digit() || ((b[st - 1] == b',' || b[st - 1] == b'.' || b[st - 1] == b'/') && st >= 2 && b[st - 2].is_ascii_digit())) {
            st -= 1;
        }
        if st > 0 && b[st - 1] == b'.' {
            st -= 1; // `.4`
        }
        if st > 0 && (b[st - 1].is_ascii_alphabetic() || b[st - 1] == b'^' || b[st - 1] == b'_') {
            // glued to a word (`AZYUK2A`, `x2`): not a number answer; keep looking.
            i = st;
            continue;
        }
        if end < b.len() && b[end].is_ascii_alphabetic() && b[end] != b'm' && !text[end..].starts_with("cm") {
            let word_end = text[end..].find(|c: char| !c.is_ascii_alphabetic()).map(|k| end + k).unwrap_or(b.len());
            // `2A` glued to letters: skip, unless a unit-like suffix.
            if word_end - end <= 1 {
                i = st;
                continue;
            }
        }
        let neg = st > 0 && b[st - 1] == b'-' && (st < 2 || !b[st - 2].is_ascii_alphanumeric());
        let mut s = String::new();
        if neg {
            s.push('-');
        }
        s.push_str(text[st..end].trim_end_matches(['.', ',', '/']));
        if end < b.len() && b[end] == b'%' {
            s.push('%');
        }
        return Some((s, st));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_boxed_nested_and_fbox() {
        let c = ExtractConfig::default();
        assert_eq!(extract_answer("so \\boxed{\\frac{1}{2}} is the first step of the computation, and the result is \\boxed{\\frac{a}{b^{2}}}", &c).as_deref(), Some("\\frac{a}{b^{2}}"));
        assert_eq!(extract_answer("x \\fbox{7}.", &c).as_deref(), Some("7"));
        assert_eq!(extract_answer("answer \\boxed 5.", &c).as_deref(), Some("5"));
        assert_eq!(extract_answer("\\boxed{1} and \\boxed{2}", &c).as_deref(), Some("1, 2"));
        assert_eq!(extract_answer("\\boxed{1} no no no no no \\boxed{2}", &c).as_deref(), Some("2"));
    }

    #[test]
    fn fallbacks() {
        let c = ExtractConfig::default();
        assert_eq!(extract_answer("blah\n#### 1,080", &c).as_deref(), Some("1,080"));
        assert_eq!(extract_answer("Final Answer: The final answer is $(0, 1)$. I hope it is correct.", &c).as_deref(), Some("(0, 1)"));
        assert_eq!(extract_answer("so the total is 42 apples in all", &c).as_deref(), Some("42"));
        assert_eq!(extract_answer("Soucis : 2,74 $ a..", &c).as_deref(), Some("2.74"));
        assert_eq!(extract_answer("no digits here", &c), None);
        let b = ExtractConfig::boxed_only();
        assert_eq!(extract_answer("The answer is 5", &b), None);
    }

    #[test]
    fn deep_braces_are_linear() {
        let s = format!("\\boxed{{{}}}", "{".repeat(100_000));
        let t = std::time::Instant::now();
        let _ = extract_answer(&s, &ExtractConfig::default());
        assert!(t.elapsed().as_millis() < 500);
    }
}
