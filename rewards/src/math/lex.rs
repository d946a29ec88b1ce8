//! Tokenizer for LaTeX and plain-text math answers.

use super::MathError;


/// A token.
#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// Digits with optional decimal point / exponent, already cleaned of separators.
    Num(String),
    /// A single letter.
    Letter(char),
    /// A run of two or more letters (plain-text words such as `sin`, `cm`, `and`).
    Word(String),
    /// A LaTeX command name without the backslash (`frac`, `{`, `}` for `\{` `\}`).
    Cmd(String),
    /// The content of `\text{...}` and friends.
    Text(String),
    /// Punctuation and operators: `+ - * / ^ _ ( ) [ ] { } , ; : = < > ! | & ' %`.
    P(char),
    /// A two-character operator written in plain text: `<=`, `>=`, `!=`.
    Op2(&'static str),
}

/// Commands that take a brace group holding plain text.
const TEXT_CMDS: &[&str] = &["text", "textbf", "textit", "textrm", "texttt", "textsf", "textnormal", "mbox", "hbox", "textup", "emph"];
/// Commands whose argument is kept as math (the command itself is dropped).
const STYLE_CMDS: &[&str] = &["mathrm", "mathbf", "mathit", "mathsf", "mathtt", "boldsymbol", "bm", "operatorname", "mathnormal", "displaystyle", "textstyle", "scriptstyle", "boxed", "fbox", "underline", "mathbb", "mathcal"];
/// Commands that produce nothing.
const SKIP_CMDS: &[&str] = &[
    "left", "right", "big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl", "Bigr", "biggl", "biggr", "displaystyle", "limits", "nolimits", "circ", "degree", "qquad", "quad", "hfill", "medspace", "thinspace", "enspace", "relax", "nonumber", "notag", "cr", "hline", "mathstrut", "strut", "phantom",
    "dollar", "tag",
];
/// All other command names the parser understands.
pub const KNOWN_CMDS: &[&str] = &[
    "frac", "dfrac", "tfrac", "cfrac", "sqrt", "pi", "infty", "infinity", "cdot", "times", "div", "pm", "mp", "le", "leq", "leqslant", "ge", "geq", "geqslant", "ne", "neq", "lt", "gt", "approx", "in", "cup", "cap", "sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "log", "ln", "lg", "exp", "sum", "prod", "lim", "int", "binom", "dbinom", "tbinom", "begin", "end", "langle", "rangle", "lfloor", "rfloor", "lceil", "rceil", "emptyset", "varnothing", "dots", "ldots", "cdots", "overline", "vec", "hat", "bar", "tilde", "widehat", "overrightarrow", "angle", "triangle", "theta", "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "lambda", "mu", "sigma", "phi", "varphi", "omega", "rho", "tau", "psi", "eta", "zeta", "xi", "chi", "nu", "kappa", "Delta", "Gamma", "Omega", "Phi", "Sigma", "Lambda", "Theta", "Pi", "to", "rightarrow", "Rightarrow", "implies", "iff", "perp", "parallel", "equiv", "sim", "cong", "mid", "nmid", "pmod", "bmod", "mod", "wedge", "vee", "land", "lor", "neg", "forall", "exists", "setminus", "subset", "subseteq", "supset", "cot", "arccot", "max", "min", "gcd", "lcm", "det", "deg", "dim", "sgn", "prime", "ell", "partial", "nabla", "emptyset", "colon", "vert", "Vert", "lvert", "rvert", "mathrm", "text",
];

fn is_known(cmd: &str) -> bool {
    KNOWN_CMDS.contains(&cmd) || TEXT_CMDS.contains(&cmd) || STYLE_CMDS.contains(&cmd) || SKIP_CMDS.contains(&cmd)
}

/// Maximum digits in one numeric literal.
pub const MAX_LITERAL_DIGITS: usize = 5000;

/// Tokenize an answer string.
pub fn lex(src: &str) -> Result<Vec<Tok>, MathError> {
    // `14{,}916`, `12,\! 000`: LaTeX thousands separators.
    let cleaned;
    let src = if src.contains("{,") || src.contains("\\!") {
        let mut t = String::with_capacity(src.len());
        let mut rest = src;
        while let Some(k) = rest.find(['{', '\\']) {
            t.push_str(&rest[..k]);
            let r = &rest[k..];
            if let Some(after) = r.strip_prefix("\\!") {
                rest = after.trim_start();
            } else if let Some(end) = brace_comma(&r.chars().take(8).collect::<Vec<_>>(), 0) {
                t.push(',');
                let skip: usize = r.chars().take(end).map(|c| c.len_utf8()).sum();
                rest = &r[skip..];
            } else {
                let c = r.chars().next().unwrap();
                t.push(c);
                rest = &r[c.len_utf8()..];
            }
        }
        t.push_str(rest);
        cleaned = t;
        cleaned.as_str()
    } else {
        src
    };
    let chars: Vec<char> = src.chars().collect();
    let n = chars.len();
    let mut out: Vec<Tok> = Vec::with_capacity(n / 2 + 4);
    let mut i = 0;
    // Bracket depth, used to decide whether `1,000` is a thousands separator.
    let mut depth: i32 = 0;
    while i < n {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' | '\r' | '~' | '$' => i += 1,
            '0'..='9' | '.' if c != '.' || (i + 1 < n && chars[i + 1].is_ascii_digit()) => {
                let (tok, next) = lex_number(&chars, i, depth == 0)?;
                out.push(tok);
                i = next;
            }
            'a'..='z' | 'A'..='Z' => {
                let start = i;
                while i < n && chars[i].is_ascii_alphabetic() {
                    i += 1;
                }
                let w: String = chars[start..i].iter().collect();
                if w.len() == 1 {
                    out.push(Tok::Letter(c));
                } else if let Some(rest) = ["or", "and"].iter().find_map(|p| w.strip_prefix(p).filter(|r| r.starts_with(|c: char| c.is_ascii_uppercase()))) {
                    // `W(x)=1orW(x)=-1`
                    out.push(Tok::Word(w[..w.len() - rest.len()].to_string()));
                    out.push(if rest.len() == 1 { Tok::Letter(rest.chars().next().unwrap()) } else { Tok::Word(rest.to_string()) });
                } else {
                    out.push(Tok::Word(w));
                }
            }
            '\\' => {
                i += 1;
                if i >= n {
                    break;
                }
                let d = chars[i];
                if d.is_ascii_alphabetic() {
                    let start = i;
                    while i < n && chars[i].is_ascii_alphabetic() {
                        i += 1;
                    }
                    let name: String = chars[start..i].iter().collect();
                    i = lex_command(&chars, name, start, i, &mut out)?;
                } else if d == '\\' {
                    // `\\boxed` (an over-escaped command) or a row separator.
                    let mut j = i + 1;
                    while j < n && chars[j].is_ascii_alphabetic() {
                        j += 1;
                    }
                    let name: String = chars[i + 1..j].iter().collect();
                    if !name.is_empty() && is_known(&name) && name != "end" {
                        i = lex_command(&chars, name, i + 1, j, &mut out)?;
                    } else {
                        out.push(Tok::Cmd("\\".into()));
                        i += 1;
                    }
                } else {
                    i += 1;
                    match d {
                        '{' => {
                            depth += 1;
                            out.push(Tok::Cmd("{".into()))
                        }
                        '}' => {
                            depth -= 1;
                            out.push(Tok::Cmd("}".into()))
                        }
                        '%' => out.push(Tok::P('%')),
                        '$' | ',' | ';' | ':' | '!' | ' ' | '>' | '<' | '\n' | '\t' | '/' | '#' | '&' => {}
                        '|' => out.push(Tok::P('|')),
                        _ => return Err(MathError::Parse(format!("unknown escape \\{d}"))),
                    }
                }
            }
            '{' => {
                // `{,}` is a LaTeX thousands separator.
                if let Some(end) = brace_comma(&chars, i) {
                    out.push(Tok::P(','));
                    i = end;
                } else {
                    depth += 1;
                    out.push(Tok::P('{'));
                    i += 1;
                }
            }
            '(' | '[' => {
                depth += 1;
                out.push(Tok::P(c));
                i += 1;
            }
            '}' | ')' | ']' => {
                depth -= 1;
                out.push(Tok::P(c));
                i += 1;
            }
            '<' | '>' | '!' if i + 1 < n && chars[i + 1] == '=' => {
                out.push(Tok::Op2(match c {
                    '<' => "<=",
                    '>' => ">=",
                    _ => "!=",
                }));
                i += 2;
            }
            '=' if i + 1 < n && chars[i + 1] == '=' => {
                out.push(Tok::P('='));
                i += 2;
            }
            '^' => {
                // Degrees: `^\circ`, `^{\circ}` are dropped with their caret.
                if let Some(end) = degree_after_caret(&chars, i + 1) {
                    i = end;
                } else {
                    out.push(Tok::P('^'));
                    i += 1;
                }
            }
            '+' | '-' | '*' | '/' | '_' | ',' | ';' | ':' | '=' | '<' | '>' | '!' | '|' | '&' | '\'' | '%' => {
                out.push(Tok::P(c));
                i += 1;
            }
            '.' => {
                // A full stop at the end of an answer or before a separator is punctuation.
                i += 1;
            }
            '°' | '€' | '£' | '¥' | '\u{a0}' | '\u{2009}' | '\u{202f}' => i += 1,
            '²' => {
                out.push(Tok::P('^'));
                out.push(Tok::Num("2".into()));
                i += 1
            }
            '³' => {
                out.push(Tok::P('^'));
                out.push(Tok::Num("3".into()));
                i += 1
            }
            '−' | '–' => {
                out.push(Tok::P('-'));
                i += 1
            }
            '×' | '·' => {
                out.push(Tok::P('*'));
                i += 1
            }
            '÷' => {
                out.push(Tok::P('/'));
                i += 1
            }
            '±' => {
                out.push(Tok::Cmd("pm".into()));
                i += 1
            }
            'π' => {
                out.push(Tok::Cmd("pi".into()));
                i += 1
            }
            '∞' => {
                out.push(Tok::Cmd("infty".into()));
                i += 1
            }
            '≤' => {
                out.push(Tok::Op2("<="));
                i += 1
            }
            '≥' => {
                out.push(Tok::Op2(">="));
                i += 1
            }
            '≠' => {
                out.push(Tok::Op2("!="));
                i += 1
            }
            '√' => {
                out.push(Tok::Cmd("sqrt".into()));
                i += 1
            }
            _ => return Err(MathError::Parse(format!("unexpected character {c:?}"))),
        }
    }
    Ok(out)
}

/// `{,}` or `{, }` starting at `i`: returns the index after it.
fn brace_comma(chars: &[char], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < chars.len() && chars[j] == ' ' {
        j += 1;
    }
    if j < chars.len() && chars[j] == ',' {
        j += 1;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j < chars.len() && chars[j] == '}' {
            return Some(j + 1);
        }
    }
    None
}

fn degree_after_caret(chars: &[char], mut j: usize) -> Option<usize> {
    let rest: String = chars[j..chars.len().min(j + 12)].iter().collect();
    for pat in ["{\\circ}", "\\circ", "{\\degree}", "\\degree", "{°}", "°", "o "] {
        if rest.starts_with(pat) {
            j += pat.chars().count();
            return Some(j);
        }
    }
    None
}

fn lex_command(chars: &[char], name: String, start: usize, mut i: usize, out: &mut Vec<Tok>) -> Result<usize, MathError> {
    let n = chars.len();
    let mut name = name;
    if !is_known(&name) {
        // `\quadx` is `\quad x`: split the longest known prefix.
        let mut k = name.len();
        while k > 1 && !is_known(&name[..k]) {
            k -= 1;
        }
        if k <= 1 || !is_known(&name[..k]) {
            // An unknown command is an opaque symbol (`\zzz`).
            out.push(Tok::Cmd(format!("?{name}")));
            return Ok(i);
        }
        i = start + k;
        name.truncate(k);
    }
    if TEXT_CMDS.contains(&name.as_str()) {
        let mut j = i;
        while j < n && chars[j] == ' ' {
            j += 1;
        }
        if j < n && chars[j] == '{' {
            let mut d = 0i32;
            let mut k = j;
            while k < n {
                match chars[k] {
                    '{' => d += 1,
                    '}' => {
                        d -= 1;
                        if d == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                k += 1;
            }
            if k >= n {
                return Err(MathError::Parse(format!("unclosed \\{name}{{")));
            }
            let inner: String = chars[j + 1..k].iter().collect();
            out.push(Tok::Text(inner));
            return Ok(k + 1);
        }
        return Ok(i);
    }
    if SKIP_CMDS.contains(&name.as_str()) {
        if name == "left" || name == "right" {
            // `\left.` and `\right.` are invisible delimiters.
            if i < n && chars[i] == '.' {
                i += 1;
            }
        }
        if name == "quad" || name == "qquad" {
            out.push(Tok::P(' '));
        }
        return Ok(i);
    }
    if name == "mathbb" {
        // `\mathbb{R}` (all reals) is an interval; other blackboard letters stay symbols.
        let rest: String = chars[i..n.min(i + 4)].iter().collect();
        for pat in ["{R}", " R", "R"] {
            if rest.starts_with(pat) && !rest[pat.len()..].starts_with(|c: char| c.is_ascii_alphabetic()) {
                out.push(Tok::Cmd("reals".into()));
                return Ok(i + pat.len());
            }
        }
    }
    if STYLE_CMDS.contains(&name.as_str()) {
        return Ok(i);
    }
    match name.as_str() {
        "le" | "leq" | "leqslant" => out.push(Tok::Op2("<=")),
        "ge" | "geq" | "geqslant" => out.push(Tok::Op2(">=")),
        "ne" | "neq" => out.push(Tok::Op2("!=")),
        "lt" => out.push(Tok::P('<')),
        "gt" => out.push(Tok::P('>')),
        "cdot" | "times" => out.push(Tok::P('*')),
        "div" => out.push(Tok::P('/')),
        "vert" | "lvert" | "rvert" | "mid" => out.push(Tok::P('|')),
        "colon" => out.push(Tok::P(':')),
        "infinity" => out.push(Tok::Cmd("infty".into())),
        "dfrac" | "tfrac" | "cfrac" => out.push(Tok::Cmd("frac".into())),
        "dbinom" | "tbinom" => out.push(Tok::Cmd("binom".into())),
        _ => out.push(Tok::Cmd(name)),
    }
    Ok(i)
}

/// Lex a numeric literal, removing thousands separators (`1,000`, `1 000`, `12,\!000`)
/// when `top_level` (not inside brackets, where commas separate elements).
fn lex_number(chars: &[char], start: usize, top_level: bool) -> Result<(Tok, usize), MathError> {
    let n = chars.len();
    let mut s = String::new();
    let mut i = start;
    while i < n && chars[i].is_ascii_digit() {
        s.push(chars[i]);
        i += 1;
    }
    // Thousands groups: the integer part has 1-3 digits (no leading zero) and every
    // group after a separator has exactly three digits.
    if top_level && !s.is_empty() && s.len() <= 3 && !s.starts_with('0') {
        loop {
            let mut j = i;
            let sep_comma = j < n && chars[j] == ',';
            let sep_space = j < n && chars[j] == ' ';
            if !(sep_comma || sep_space) {
                break;
            }
            j += 1;
            let g0 = j;
            while j < n && chars[j].is_ascii_digit() {
                j += 1;
            }
            if j - g0 != 3 || (j < n && (chars[j].is_ascii_digit() || (sep_space && chars[j] == ','))) {
                break;
            }
            s.extend(&chars[g0..j]);
            i = j;
        }
    }
    if i < n && chars[i] == '.' && i + 1 < n && chars[i + 1].is_ascii_digit() {
        s.push('.');
        i += 1;
        while i < n && chars[i].is_ascii_digit() {
            s.push(chars[i]);
            i += 1;
        }
    }
    // Scientific notation: 1.5e3, 2E-4 (only when not followed by another letter).
    if i + 1 < n && (chars[i] == 'e' || chars[i] == 'E') {
        let mut j = i + 1;
        if j < n && (chars[j] == '+' || chars[j] == '-') {
            j += 1;
        }
        let g0 = j;
        while j < n && chars[j].is_ascii_digit() {
            j += 1;
        }
        if j > g0 && !(j < n && chars[j].is_ascii_alphabetic()) {
            s.push('e');
            s.extend(&chars[i + 1..j]);
            i = j;
        }
    }
    if s.len() > MAX_LITERAL_DIGITS {
        return Err(MathError::TooLarge(format!("a number literal with {} digits", s.len())));
    }
    Ok((Tok::Num(s), i))
}
