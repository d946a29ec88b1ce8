//! Recursive-descent parser from tokens to [`Expr`].
//!
//! Grammar, lowest precedence first:
//! list (`,` `;` `and` `or`) → relation chain (`= < <= > >= != \approx \in`) → ratio (`:`)
//! → union (`\cup`) → sum (`+ - \pm`) → product (`* / \cdot \times`, juxtaposition)
//! → unary (`- + \pm`) → power (`^`, right-associative) → postfix (`! %`) → primary.

use super::ast::{Const, Expr, RelOp};
use super::budget::Budget;
use super::lex::{lex, Tok};
use super::MathError;
use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Zero};

/// Deepest nesting the parser accepts.
pub const MAX_DEPTH: usize = 400;
/// Longest answer string the parser accepts (characters).
pub const MAX_ANSWER_CHARS: usize = 20_000;

const FUNCS: &[&str] = &["sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "arccot", "sinh", "cosh", "tanh", "log", "ln", "lg", "exp", "max", "min", "gcd", "lcm", "det", "sgn"];
const UNITS: &[&str] = &[
    "cm", "mm", "km", "m", "meter", "meters", "metre", "metres", "inch", "inches", "ft", "feet", "foot", "yard", "yards", "mile", "miles", "mi", "kg", "g", "mg", "lb", "lbs", "pound", "pounds", "oz", "ounce", "ounces", "l", "ml", "liter", "liters", "litre", "litres", "gallon", "gallons", "s", "sec", "secs", "second", "seconds", "min", "mins", "minute", "minutes", "h", "hr", "hrs", "hour", "hours", "day", "days", "week", "weeks", "month", "months", "year", "years", "dollar", "dollars", "cent", "cents", "yuan", "euro", "euros", "units", "unit", "sq", "square", "cubic", "degree", "degrees", "deg", "rad", "radians", "mph", "kmh", "people", "students", "times", "ways", "points", "items", "apples", "pages", "books", "marbles", "cookies",
];
/// Single letters that are read as functions when followed by `(`.
const FUNC_LETTERS: &[char] = &['f', 'g', 'h', 'F', 'G', 'H', 'P', 'Q', 'W', 'p', 'q'];

fn is_separator_word(w: &str) -> bool {
    matches!(w, "and" | "or" | "und" | "et")
}

/// Words inside `\text{}` that only separate list items.
fn text_is_separator(t: &str) -> bool {
    let t = t.trim().trim_matches(|c: char| c == ',' || c == ';' || c == '.');
    t.split_whitespace().all(|w| is_separator_word(&w.to_ascii_lowercase())) && !t.trim().is_empty()
}

/// Parse one extracted answer.
pub fn parse(src: &str, budget: &mut Budget) -> Result<Expr, MathError> {
    if src.chars().count() > MAX_ANSWER_CHARS {
        return Err(MathError::TooLarge(format!("answer of {} characters", src.len())));
    }
    budget.charge(src.len() as u64 / 4 + 1)?;
    let toks = lex(src)?;
    let mut p = Parser { toks, pos: 0, depth: 0, budget };
    let e = p.parse_top()?;
    if p.pos < p.toks.len() {
        return Err(MathError::Parse(format!("unexpected {:?}", p.toks[p.pos])));
    }
    Ok(e)
}

struct Parser<'b> {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
    budget: &'b mut Budget,
}

fn perr<T>(msg: impl Into<String>) -> Result<T, MathError> {
    Err(MathError::Parse(msg.into()))
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.pos + k)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat_p(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::P(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn is_p(&self, c: char) -> bool {
        self.peek() == Some(&Tok::P(c))
    }
    fn is_cmd(&self, name: &str) -> bool {
        matches!(self.peek(), Some(Tok::Cmd(c)) if c == name)
    }
    fn enter(&mut self) -> Result<(), MathError> {
        self.depth += 1;
        self.budget.charge(1)?;
        if self.depth > MAX_DEPTH {
            return Err(MathError::TooLarge("nesting deeper than the parser limit".into()));
        }
        Ok(())
    }
    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Is the next token a list separator? (`,` `;` `and` `or` `\text{and}` `\quad`)
    fn at_separator(&self) -> bool {
        match self.peek() {
            Some(Tok::P(',')) | Some(Tok::P(';')) | Some(Tok::P(' ')) => true,
            Some(Tok::Word(w)) => is_separator_word(&w.to_ascii_lowercase()),
            Some(Tok::Text(t)) => text_is_separator(t),
            _ => false,
        }
    }

    /// Skip separators; returns whether one was a `;`.
    fn skip_separators(&mut self) -> (bool, bool) {
        let mut any = false;
        let mut semi = false;
        while self.at_separator() {
            if self.is_p(';') {
                semi = true;
            }
            any = true;
            self.pos += 1;
        }
        (any, semi)
    }

    fn at_end_of_seq(&self, closers: &[Tok]) -> bool {
        match self.peek() {
            None => true,
            Some(t) => closers.contains(t),
        }
    }

    /// A sequence of items separated by list separators, until one of `closers`.
    /// Returns items and, for `;`-separated input, the group boundaries.
    fn parse_seq(&mut self, closers: &[Tok]) -> Result<(Vec<Expr>, Vec<usize>), MathError> {
        let mut items = Vec::new();
        let mut semis = Vec::new();
        self.skip_separators();
        while !self.at_end_of_seq(closers) {
            let e = self.parse_relation()?;
            items.push(e);
            let (any, semi) = self.skip_separators();
            if semi {
                semis.push(items.len());
            }
            if !any && !self.at_end_of_seq(closers) {
                return perr(format!("unexpected {:?}", self.peek()));
            }
        }
        Ok((items, semis))
    }

    fn parse_top(&mut self) -> Result<Expr, MathError> {
        let (items, semis) = self.parse_seq(&[])?;
        if items.is_empty() {
            return perr("empty answer");
        }
        if !semis.is_empty() {
            // `p=5,q=2;p=7,q=2`: `;` separates groups, `,` separates a group's members.
            let mut groups = Vec::new();
            let mut start = 0;
            for &b in semis.iter().chain(std::iter::once(&items.len())) {
                if b > start {
                    let g: Vec<Expr> = items[start..b].to_vec();
                    groups.push(if g.len() == 1 { g.into_iter().next().unwrap() } else { Expr::Tuple(g) });
                }
                start = b;
            }
            return Ok(if groups.len() == 1 { groups.pop().unwrap() } else { Expr::List(groups) });
        }
        Ok(if items.len() == 1 { items.into_iter().next().unwrap() } else { Expr::List(items) })
    }

    fn rel_op(&self) -> Option<RelOp> {
        match self.peek()? {
            Tok::P('=') => Some(RelOp::Eq),
            Tok::P('<') => Some(RelOp::Lt),
            Tok::P('>') => Some(RelOp::Gt),
            Tok::Op2("<=") => Some(RelOp::Le),
            Tok::Op2(">=") => Some(RelOp::Ge),
            Tok::Op2("!=") => Some(RelOp::Ne),
            Tok::Cmd(c) if c == "approx" || c == "equiv" || c == "sim" || c == "cong" => Some(RelOp::Approx),
            Tok::Cmd(c) if c == "in" => Some(RelOp::In),
            _ => None,
        }
    }

    fn parse_relation(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        let first = self.parse_ratio()?;
        let mut parts = vec![first];
        let mut ops = Vec::new();
        while let Some(op) = self.rel_op() {
            self.pos += 1;
            ops.push(op);
            parts.push(self.parse_ratio()?);
        }
        self.leave();
        Ok(if ops.is_empty() { parts.pop().unwrap() } else { Expr::Rel(parts, ops) })
    }

    fn parse_ratio(&mut self) -> Result<Expr, MathError> {
        let first = self.parse_union()?;
        if !self.is_p(':') {
            return Ok(first);
        }
        let mut v = vec![first];
        while self.eat_p(':') {
            v.push(self.parse_union()?);
        }
        Ok(Expr::Ratio(v))
    }

    fn parse_union(&mut self) -> Result<Expr, MathError> {
        let first = self.parse_sum()?;
        if !self.is_cmd("cup") {
            return Ok(first);
        }
        let mut v = vec![first];
        while self.is_cmd("cup") {
            self.pos += 1;
            v.push(self.parse_sum()?);
        }
        Ok(Expr::Union(v))
    }

    fn parse_sum(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        let mut terms = vec![self.parse_unary()?];
        loop {
            self.budget.charge(1)?;
            if self.eat_p('+') {
                terms.push(self.parse_product()?);
            } else if self.eat_p('-') {
                let t = self.parse_product()?;
                terms.push(Expr::Neg(Box::new(t)));
            } else if self.is_cmd("pm") || self.is_cmd("mp") {
                self.pos += 1;
                let rhs = self.parse_product()?;
                let lhs = if terms.len() == 1 { terms.pop().unwrap() } else { Expr::Add(std::mem::take(&mut terms)) };
                terms = vec![Expr::PlusMinus(Box::new(lhs), Box::new(rhs))];
            } else {
                break;
            }
        }
        self.leave();
        Ok(if terms.len() == 1 { terms.pop().unwrap() } else { Expr::Add(terms) })
    }

    fn parse_unary(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        let r = if self.eat_p('-') {
            Expr::Neg(Box::new(self.parse_unary()?))
        } else if self.eat_p('+') {
            self.parse_unary()?
        } else if self.is_cmd("pm") || self.is_cmd("mp") {
            self.pos += 1;
            Expr::PlusMinus(Box::new(Expr::int(0)), Box::new(self.parse_unary()?))
        } else {
            self.parse_product()?
        };
        self.leave();
        Ok(r)
    }

    /// Can the next token start a factor multiplied by juxtaposition?
    fn starts_implicit_factor(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(_)) | Some(Tok::Letter(_)) | Some(Tok::P('(')) | Some(Tok::P('{')) => true,
            Some(Tok::Word(w)) => !is_separator_word(&w.to_ascii_lowercase()),
            Some(Tok::Text(t)) => !text_is_separator(t),
            Some(Tok::Cmd(c)) => matches!(
                c.as_str(),
                "frac" | "sqrt" | "pi" | "infty" | "sin" | "cos" | "tan" | "sec" | "csc" | "cot" | "arcsin" | "arccos" | "arctan" | "sinh" | "cosh" | "tanh" | "log" | "ln" | "lg" | "exp" | "binom" | "theta" | "alpha" | "beta" | "gamma" | "delta" | "lambda" | "mu" | "sigma" | "phi" | "varphi" | "omega" | "rho" | "tau" | "psi" | "eta" | "zeta" | "xi" | "chi" | "nu" | "kappa" | "epsilon" | "varepsilon" | "begin" | "overline" | "vec" | "hat" | "bar" | "tilde" | "lfloor" | "lceil" | "sum" | "prod" | "lim" | "Delta" | "Gamma" | "Omega" | "Phi" | "Sigma" | "Lambda" | "Theta" | "Pi" | "angle" | "ell"
            ),
            _ => false,
        }
    }

    fn parse_product(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        let mut factors: Vec<Expr> = Vec::new();
                let first = self.parse_power()?;
        push_factor(&mut factors, first);
        loop {
            self.budget.charge(1)?;
            if self.eat_p('*') {
                let f = self.parse_power_signed()?;
                push_factor(&mut factors, f);
            } else if self.eat_p('/') {
                let d = self.parse_power_signed()?;
                let num = collapse_mul(std::mem::take(&mut factors));
                factors = vec![Expr::Div(Box::new(num), Box::new(d))];
            } else if let Some(Tok::Word(w)) = self.peek() {
                let lw = w.to_ascii_lowercase();
                if matches!(lw.as_str(), "percent" | "pct" | "percentage") {
                    self.pos += 1;
                    let inner = collapse_mul(std::mem::take(&mut factors));
                    factors = vec![Expr::Percent(Box::new(inner))];
                } else if UNITS.contains(&lw.as_str()) && !factors.is_empty() && !FUNCS.contains(&lw.as_str()) {
                    // A unit after a quantity: dropped (with an optional power, `cm^2`).
                    self.pos += 1;
                    if self.eat_p('^') {
                        self.parse_power()?;
                    }
                } else if self.starts_implicit_factor() {
                    let f = self.parse_power()?;
                    push_factor(&mut factors, f);
                } else {
                    break;
                }
            } else if self.starts_implicit_factor() {
                let f = self.parse_power()?;
                push_factor(&mut factors, f);
            } else {
                break;
            }
        }
        self.leave();
        // Text factors next to a quantity are units (`5 \text{ cm}`): drop them.
        let has_math = factors.iter().any(|f| !is_text_like(f));
        if has_math {
            factors.retain(|f| !is_text_like(f));
        } else if factors.len() > 1 {
            // Several text pieces: join them.
            let mut s = String::new();
            for f in &factors {
                if let Some(t) = text_of(f) {
                    if !s.is_empty() {
                        s.push(' ');
                    }
                    s.push_str(t.trim());
                }
            }
            return Ok(Expr::Text(s));
        }
        Ok(collapse_mul(factors))
    }

    fn parse_power_signed(&mut self) -> Result<Expr, MathError> {
        if self.eat_p('-') {
            return Ok(Expr::Neg(Box::new(self.parse_power_signed()?)));
        }
        if self.eat_p('+') {
            return self.parse_power_signed();
        }
        self.parse_power()
    }

    fn parse_power(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        let base = self.parse_postfix()?;
        let r = if self.eat_p('^') {
            let exp = self.parse_exponent()?;
            let mut e = Expr::Pow(Box::new(base), Box::new(exp));
            // postfix after the exponent: `x^2!` is rare; `%` matters: `10^2\%`.
            while self.is_p('!') {
                self.pos += 1;
                e = Expr::Factorial(Box::new(e));
            }
            e
        } else {
            base
        };
        self.leave();
        Ok(r)
    }

    fn parse_exponent(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        let r = if self.eat_p('-') {
            Expr::Neg(Box::new(self.parse_exponent()?))
        } else if self.eat_p('+') {
            self.parse_exponent()?
        } else {
            let b = self.parse_postfix()?;
            if self.eat_p('^') {
                Expr::Pow(Box::new(b), Box::new(self.parse_exponent()?))
            } else {
                b
            }
        };
        self.leave();
        Ok(r)
    }

    fn parse_postfix(&mut self) -> Result<Expr, MathError> {
        let mut e = self.parse_primary()?;
        loop {
            if self.is_p('!') && self.peek_at(1) != Some(&Tok::P('=')) {
                self.pos += 1;
                e = Expr::Factorial(Box::new(e));
            } else if self.eat_p('%') {
                e = Expr::Percent(Box::new(e));
            } else if self.is_p('\'') {
                self.pos += 1;
                e = match e {
                    Expr::Sym(s) => Expr::Sym(format!("{s}'")),
                    other => Expr::Func("prime".into(), vec![other]),
                };
            } else {
                break;
            }
        }
        Ok(e)
    }

    /// A braced group `{...}` or a single token argument (`\frac12`, `\sqrt2`).
    fn parse_arg(&mut self, single_digit: bool) -> Result<Expr, MathError> {
        match self.peek().cloned() {
            Some(Tok::P('{')) => {
                self.pos += 1;
                let e = self.parse_group_until(&Tok::P('}'))?;
                Ok(e)
            }
            Some(Tok::Num(s)) if single_digit && s.len() > 1 && s.chars().all(|c| c.is_ascii_digit()) => {
                // `\frac13`: the argument is one digit; leave the rest.
                let (a, b) = s.split_at(1);
                self.toks[self.pos] = Tok::Num(b.to_string());
                Ok(num_literal(a)?)
            }
            Some(Tok::Word(w)) if single_digit => {
                let mut cs = w.chars();
                let c = cs.next().unwrap();
                let rest: String = cs.collect();
                self.toks[self.pos] = if rest.len() == 1 { Tok::Letter(rest.chars().next().unwrap()) } else { Tok::Word(rest) };
                Ok(letter_expr(c))
            }
            Some(_) => self.parse_postfix(),
            None => perr("missing argument"),
        }
    }

    /// Parse up to and including `close`; one item is returned as is, several as a list.
    fn parse_group_until(&mut self, close: &Tok) -> Result<Expr, MathError> {
        self.enter()?;
        let (items, _) = self.parse_seq(std::slice::from_ref(close))?;
        if self.peek() != Some(close) {
            return perr(format!("expected {close:?}"));
        }
        self.pos += 1;
        self.leave();
        match items.len() {
            0 => Ok(Expr::Text(String::new())),
            1 => Ok(items.into_iter().next().unwrap()),
            _ => Ok(Expr::List(items)),
        }
    }

    fn parse_subscript_name(&mut self) -> Result<String, MathError> {
        // After `_`: a group or a single token, rendered into the name.
        match self.next() {
            Some(Tok::P('{')) => {
                let mut depth = 1;
                let mut s = String::new();
                while let Some(t) = self.next() {
                    match &t {
                        Tok::P('{') => depth += 1,
                        Tok::P('}') => {
                            depth -= 1;
                            if depth == 0 {
                                return Ok(s);
                            }
                        }
                        _ => {}
                    }
                    s.push_str(&tok_text(&t));
                }
                perr("unclosed subscript")
            }
            Some(t @ (Tok::Num(_) | Tok::Letter(_) | Tok::Word(_))) => {
                if let Tok::Num(n) = &t {
                    // `x_12` in LaTeX is x_1 followed by 2.
                    if n.len() > 1 {
                        self.pos -= 1;
                        let (a, b) = n.split_at(1);
                        let a = a.to_string();
                        self.toks[self.pos] = Tok::Num(b.to_string());
                        return Ok(a);
                    }
                }
                Ok(tok_text(&t))
            }
            Some(Tok::Cmd(c)) => Ok(c),
            _ => perr("bad subscript"),
        }
    }

    fn parse_primary(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        self.budget.charge(1)?;
        let t = match self.next() {
            Some(t) => t,
            None => return perr("unexpected end"),
        };
        let r = match t {
            Tok::Num(s) => {
                // Repeating decimal `0.1\overline{6}` (the lexer dropped a trailing `.`).
                if self.is_cmd("overline") && !s.contains('e') {
                    let digits = match (self.peek_at(1), self.peek_at(2), self.peek_at(3)) {
                        (Some(Tok::P('{')), Some(Tok::Num(d)), Some(Tok::P('}'))) => Some((d.clone(), 4)),
                        (Some(Tok::Num(d)), _, _) => Some((d[..1].to_string(), 0)),
                        _ => None,
                    };
                    if let Some((rep, skip)) = digits.filter(|(d, _)| !d.is_empty() && d.len() <= 50 && d.bytes().all(|b| b.is_ascii_digit())) {
                        if skip == 4 {
                            self.pos += 4;
                        } else {
                            self.pos += 1;
                            let Some(Tok::Num(d)) = self.peek().cloned() else { unreachable!() };
                            if d.len() == 1 {
                                self.pos += 1;
                            } else {
                                self.toks[self.pos] = Tok::Num(d[1..].to_string());
                            }
                        }
                        self.leave();
                        return repeating_decimal(&s, &rep);
                    }
                }
                let n = num_literal(&s)?;
                // Mixed number: `2\frac{1}{2}` is 2 + 1/2.
                if matches!(n, Expr::Num(_)) && self.is_cmd("frac") {
                    let save = self.pos;
                    self.pos += 1;
                    let a = self.parse_arg(true)?;
                    let b = self.parse_arg(true)?;
                    if matches!(a, Expr::Num(_)) && matches!(b, Expr::Num(_)) {
                        Expr::Add(vec![n, Expr::Div(Box::new(a), Box::new(b))])
                    } else {
                        self.pos = save;
                        n
                    }
                } else if let (Expr::Num(_), Some(Tok::P('_'))) = (&n, self.peek()) {
                    // A number in another base, `204_5`: kept as an opaque symbol.
                    self.pos += 1;
                    let base = self.parse_subscript_name()?;
                    Expr::Sym(format!("{s}_{base}"))
                } else {
                    n
                }
            }
            Tok::Letter(c) => {
                let mut name = c.to_string();
                let mut subscripted = false;
                if self.eat_p('_') {
                    let sub = self.parse_subscript_name()?;
                    name = format!("{c}_{sub}");
                    subscripted = true;
                }
                if (FUNC_LETTERS.contains(&c) || subscripted) && self.is_p('(') {
                    self.pos += 1;
                    let (args, _) = self.parse_seq(&[Tok::P(')')])?;
                    if !self.eat_p(')') {
                        return perr("unclosed function call");
                    }
                    Expr::Func(name, args)
                } else if subscripted {
                    Expr::Sym(name)
                } else {
                    letter_expr(c)
                }
            }
            Tok::Word(w) => {
                let lw = w.to_ascii_lowercase();
                if FUNCS.contains(&lw.as_str()) {
                    self.parse_function(lw)?
                } else if lw == "sqrt" {
                    let a = self.parse_arg(false)?;
                    Expr::Root(Box::new(a), Box::new(Expr::int(2)))
                } else if lw == "pi" {
                    Expr::Const(Const::Pi)
                } else if lw == "inf" || lw == "infty" || lw == "infinity" || lw == "oo" {
                    Expr::Const(Const::Inf)
                } else if w.len() > 12 {
                    Expr::Text(w)
                } else {
                    // `xy` is x*y in math mode: re-read the word as single letters.
                    self.pos -= 1;
                    let letters: Vec<Tok> = w.chars().map(Tok::Letter).collect();
                    self.toks.splice(self.pos..self.pos + 1, letters);
                    let e = self.parse_primary()?;
                    self.leave();
                    return Ok(e);
                }
            }
            Tok::Text(s) => {
                let t = s.trim();
                // `\text{(C)}`, `\text{ cm}`: kept as text; the product rule drops units.
                Expr::Text(t.to_string())
            }
            Tok::P('(') => self.parse_bracketed('(')?,
            Tok::P('[') => self.parse_bracketed('[')?,
            Tok::P('{') => self.parse_group_until(&Tok::P('}'))?,
            Tok::P('|') => {
                let inner = self.parse_sum()?;
                if !self.eat_p('|') {
                    return perr("unclosed |");
                }
                Expr::Func("abs".into(), vec![inner])
            }
            Tok::Cmd(c) => self.parse_command(c)?,
            other => return perr(format!("unexpected {other:?}")),
        };
        self.leave();
        Ok(r)
    }

    fn parse_bracketed(&mut self, open: char) -> Result<Expr, MathError> {
        self.enter()?;
        let closers = [Tok::P(')'), Tok::P(']')];
        let (items, _) = self.parse_seq(&closers)?;
        let close = match self.next() {
            Some(Tok::P(c)) if c == ')' || c == ']' => c,
            _ => return perr(format!("unclosed {open}")),
        };
        self.leave();
        if items.len() == 1 && ((open == '(' && close == ')') || (open == '[' && close == ']')) {
            return Ok(items.into_iter().next().unwrap());
        }
        if items.len() == 2 && (open != '(' || close != ')') {
            let mut it = items.into_iter();
            return Ok(Expr::Interval { lo: Box::new(it.next().unwrap()), hi: Box::new(it.next().unwrap()), lo_closed: open == '[', hi_closed: close == ']' });
        }
        if items.is_empty() {
            return perr("empty brackets");
        }
        Ok(Expr::Tuple(items))
    }

    fn parse_function(&mut self, name: String) -> Result<Expr, MathError> {
        // Optional power `\sin^2 x` and base `\log_2 x`.
        let mut power = None;
        let mut base = None;
        for _ in 0..2 {
            if self.eat_p('^') {
                power = Some(self.parse_exponent()?);
            } else if self.eat_p('_') {
                base = Some(self.parse_arg(false)?);
            }
        }
        let arg = if self.is_p('(') {
            self.pos += 1;
            let (args, _) = self.parse_seq(&[Tok::P(')')])?;
            if !self.eat_p(')') {
                return perr("unclosed function call");
            }
            if args.len() == 1 {
                args.into_iter().next().unwrap()
            } else {
                Expr::Tuple(args)
            }
        } else {
            // `\sin 2x`: the argument is a juxtaposed product without operators.
            self.parse_function_arg()?
        };
        let mut args = match arg {
            Expr::Tuple(v) if matches!(name.as_str(), "max" | "min" | "gcd" | "lcm") => v,
            a => vec![a],
        };
        if let Some(b) = base {
            args.push(b);
        }
        let f = Expr::Func(name, args);
        Ok(match power {
            // `\sin^{-1}` is arcsin.
            Some(Expr::Neg(ref inner)) if **inner == Expr::int(1) => match f {
                Expr::Func(n, a) if ["sin", "cos", "tan"].contains(&n.as_str()) => Expr::Func(format!("arc{n}"), a),
                f => Expr::Pow(Box::new(f), Box::new(Expr::int(-1))),
            },
            Some(p) => Expr::Pow(Box::new(f), Box::new(p)),
            None => f,
        })
    }

    fn parse_function_arg(&mut self) -> Result<Expr, MathError> {
        self.enter()?;
        let mut factors = vec![self.parse_power_signed()?];
        while matches!(self.peek(), Some(Tok::Num(_)) | Some(Tok::Letter(_))) || self.is_cmd("pi") || self.is_cmd("theta") || self.is_cmd("frac") {
            factors.push(self.parse_power()?);
        }
        self.leave();
        Ok(collapse_mul(factors))
    }

    fn parse_command(&mut self, c: String) -> Result<Expr, MathError> {
        Ok(match c.as_str() {
            "frac" => {
                let a = self.parse_arg(true)?;
                let b = self.parse_arg(true)?;
                Expr::Div(Box::new(a), Box::new(b))
            }
            "binom" => {
                let a = self.parse_arg(true)?;
                let b = self.parse_arg(true)?;
                Expr::Func("binom".into(), vec![a, b])
            }
            "sqrt" => {
                let index = if self.eat_p('[') {
                    let e = self.parse_sum()?;
                    if !self.eat_p(']') {
                        return perr("unclosed \\sqrt[");
                    }
                    e
                } else {
                    Expr::int(2)
                };
                let a = self.parse_arg(true)?;
                Expr::Root(Box::new(a), Box::new(index))
            }
            "pi" => Expr::Const(Const::Pi),
            "infty" => Expr::Const(Const::Inf),
            "emptyset" | "varnothing" => Expr::Set(vec![]),
            "reals" => Expr::Interval { lo: Box::new(Expr::Neg(Box::new(Expr::Const(Const::Inf)))), hi: Box::new(Expr::Const(Const::Inf)), lo_closed: false, hi_closed: false },
            "dots" | "ldots" | "cdots" => Expr::Sym("...".into()),
            "sin" | "cos" | "tan" | "sec" | "csc" | "cot" | "arcsin" | "arccos" | "arctan" | "arccot" | "sinh" | "cosh" | "tanh" | "log" | "ln" | "lg" | "exp" | "max" | "min" | "gcd" | "lcm" | "det" | "sgn" => self.parse_function(c)?,
            "{" => {
                let (items, _) = self.parse_seq(&[Tok::Cmd("}".into())])?;
                if !self.is_cmd("}") {
                    return perr("unclosed \\{");
                }
                self.pos += 1;
                Expr::Set(items)
            }
            "langle" => {
                let (items, _) = self.parse_seq(&[Tok::Cmd("rangle".into())])?;
                if !self.is_cmd("rangle") {
                    return perr("unclosed \\langle");
                }
                self.pos += 1;
                Expr::Tuple(items)
            }
            "lfloor" | "lceil" => {
                let close = if c == "lfloor" { "rfloor" } else { "rceil" };
                let inner = self.parse_sum()?;
                if !self.is_cmd(close) {
                    return perr(format!("unclosed \\{c}"));
                }
                self.pos += 1;
                Expr::Func(if c == "lfloor" { "floor".into() } else { "ceil".into() }, vec![inner])
            }
            "overline" | "vec" | "hat" | "bar" | "tilde" | "widehat" | "overrightarrow" | "angle" | "triangle" => {
                let a = self.parse_arg(false)?;
                Expr::Sym(format!("{c}({a})"))
            }
            "sum" | "prod" | "lim" | "int" => {
                let mut lower = Expr::Text(String::new());
                let mut upper = Expr::Text(String::new());
                for _ in 0..2 {
                    if self.eat_p('_') {
                        lower = self.parse_arg(false)?;
                    } else if self.eat_p('^') {
                        upper = self.parse_arg(false)?;
                    }
                }
                let body = self.parse_product()?;
                Expr::Func(c, vec![lower, upper, body])
            }
            "begin" => self.parse_environment()?,
            u if u.starts_with('?') => Expr::Sym(format!("\\{}", &u[1..])),
            "to" | "rightarrow" | "Rightarrow" | "implies" => return perr("arrow in answer"),
            g if is_greek(g) => {
                let mut name = g.to_string();
                if self.eat_p('_') {
                    let sub = self.parse_subscript_name()?;
                    name = format!("{g}_{sub}");
                }
                Expr::Sym(name)
            }
            other => return perr(format!("unsupported command \\{other}")),
        })
    }

    fn parse_environment(&mut self) -> Result<Expr, MathError> {
        let name = match (self.next(), self.next(), self.next()) {
            (Some(Tok::P('{')), Some(Tok::Word(w)), Some(Tok::P('}'))) => w,
            (Some(Tok::P('{')), Some(Tok::Word(w)), Some(Tok::P('*'))) => {
                self.eat_p('}');
                w
            }
            _ => return perr("bad \\begin"),
        };
        if !name.ends_with("matrix") && name != "array" && name != "cases" && name != "aligned" && name != "align" {
            return perr(format!("unsupported environment {name}"));
        }
        if name == "array" && self.eat_p('{') {
            // column spec
            while let Some(t) = self.next() {
                if t == Tok::P('}') {
                    break;
                }
            }
        }
        let mut rows: Vec<Vec<Expr>> = Vec::new();
        let mut row: Vec<Expr> = Vec::new();
        loop {
            self.budget.charge(1)?;
            match self.peek() {
                None => return perr(format!("unclosed {name}")),
                Some(Tok::Cmd(c)) if c == "end" => {
                    self.pos += 1;
                    // `{pmatrix}`
                    if self.eat_p('{') {
                        while let Some(t) = self.next() {
                            if t == Tok::P('}') {
                                break;
                            }
                        }
                    }
                    if !row.is_empty() {
                        rows.push(std::mem::take(&mut row));
                    }
                    break;
                }
                Some(Tok::Cmd(c)) if c == "\\" => {
                    self.pos += 1;
                    if !row.is_empty() {
                        rows.push(std::mem::take(&mut row));
                    }
                }
                Some(Tok::P('&')) => {
                    self.pos += 1;
                }
                _ => {
                    let e = self.parse_relation()?;
                    row.push(e);
                    if !(self.is_p('&') || self.is_cmd("\\") || self.is_cmd("end")) {
                        return perr("bad matrix entry");
                    }
                }
            }
        }
        if name == "cases" || name.starts_with("align") {
            return Ok(Expr::List(rows.into_iter().flatten().collect()));
        }
        if rows.is_empty() || rows.iter().any(|r| r.len() != rows[0].len()) {
            return perr("ragged matrix");
        }
        Ok(Expr::Matrix(rows))
    }
}

fn is_greek(g: &str) -> bool {
    matches!(
        g,
        "theta" | "alpha" | "beta" | "gamma" | "delta" | "epsilon" | "varepsilon" | "lambda" | "mu" | "sigma" | "phi" | "varphi" | "omega" | "rho" | "tau" | "psi" | "eta" | "zeta" | "xi" | "chi" | "nu" | "kappa" | "Delta" | "Gamma" | "Omega" | "Phi" | "Sigma" | "Lambda" | "Theta" | "Pi" | "ell"
    )
}

fn letter_expr(c: char) -> Expr {
    match c {
        'e' => Expr::Const(Const::E),
        'i' => Expr::Const(Const::I),
        _ => Expr::Sym(c.to_string()),
    }
}

fn tok_text(t: &Tok) -> String {
    match t {
        Tok::Num(s) | Tok::Word(s) | Tok::Text(s) => s.clone(),
        Tok::Letter(c) | Tok::P(c) => c.to_string(),
        Tok::Cmd(c) => c.clone(),
        Tok::Op2(s) => s.to_string(),
    }
}

fn is_text_like(e: &Expr) -> bool {
    match e {
        Expr::Text(_) => true,
        Expr::Pow(b, _) => matches!(b.as_ref(), Expr::Text(_)),
        _ => false,
    }
}

fn text_of(e: &Expr) -> Option<&str> {
    match e {
        Expr::Text(s) => Some(s),
        Expr::Pow(b, _) => text_of(b),
        _ => None,
    }
}

fn push_factor(factors: &mut Vec<Expr>, f: Expr) {
    match f {
        Expr::Text(ref s) if s.trim().is_empty() => {}
        Expr::Mul(v) => factors.extend(v),
        f => factors.push(f),
    }
}

fn collapse_mul(mut v: Vec<Expr>) -> Expr {
    match v.len() {
        0 => Expr::Text(String::new()),
        1 => v.pop().unwrap(),
        _ => Expr::Mul(v),
    }
}

/// `int.frac` followed by the repeating block `rep`: exactly
/// (int frac rep - int frac) / (10^|frac| (10^|rep| - 1)).
fn repeating_decimal(lit: &str, rep: &str) -> Result<Expr, MathError> {
    let (int_part, frac) = lit.split_once('.').unwrap_or((lit, ""));
    if int_part.len() + frac.len() > 1000 {
        return Err(MathError::TooLarge("repeating decimal".into()));
    }
    let parse = |d: &str| -> BigInt { if d.is_empty() { BigInt::zero() } else { d.parse().unwrap_or_default() } };
    let all = parse(&format!("{int_part}{frac}{rep}"));
    let head = parse(&format!("{int_part}{frac}"));
    let ten = BigInt::from(10);
    let den = num_traits::pow(ten.clone(), frac.len()) * (num_traits::pow(ten, rep.len()) - BigInt::one());
    Ok(Expr::Num(BigRational::new(all - head, den)))
}

/// Turn a cleaned numeric literal into an exact value.
pub fn num_literal(s: &str) -> Result<Expr, MathError> {
    let (mant, exp) = match s.find(['e', 'E']) {
        Some(k) => (&s[..k], Some(&s[k + 1..])),
        None => (s, None),
    };
    let (int_part, frac_part) = match mant.find('.') {
        Some(k) => (&mant[..k], Some(&mant[k + 1..])),
        None => (mant, None),
    };
    let digits = format!("{}{}", int_part, frac_part.unwrap_or(""));
    let digits = if digits.is_empty() { "0".to_string() } else { digits };
    let n: BigInt = digits.parse().map_err(|_| MathError::Parse(format!("bad number {s}")))?;
    let mut scale: i64 = -(frac_part.map(|f| f.len()).unwrap_or(0) as i64);
    if let Some(e) = exp {
        let e: i64 = e.parse().map_err(|_| MathError::Parse(format!("bad exponent in {s}")))?;
        if e.abs() > 4000 {
            return Err(MathError::TooLarge(format!("exponent in {s}")));
        }
        scale += e;
    }
    let ten = BigInt::from(10);
    let val = if scale >= 0 {
        BigRational::from_integer(n * num_traits::pow(ten, scale as usize))
    } else {
        BigRational::new(n, num_traits::pow(ten, (-scale) as usize))
    };
    if frac_part.is_some() || exp.is_some() {
        Ok(Expr::Dec(val))
    } else {
        Ok(Expr::Num(val))
    }
}
