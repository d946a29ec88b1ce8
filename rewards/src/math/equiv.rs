//! Equivalence of two parsed answers.
//!
//! Approach (all exact unless stated):
//! * Numbers: exact big-rational arithmetic; `0.333` is not `1/3` unless the caller asks for
//!   `float_rounding`.
//! * Expressions with variables: evaluation at several deterministic rational points. When both
//!   sides evaluate exactly (polynomials and rational functions with rational coefficients) the
//!   comparison is exact at each point; by the Schwartz–Zippel lemma (Schwartz 1980, Zippel 1979)
//!   two different rational functions of low degree agree on a random point with probability at
//!   most deg/|S|. Expressions with radicals, `pi`, `e`, trigonometric or logarithmic functions are
//!   compared in complex double precision at the same points with a relative tolerance of 1e-9.
//! * Structures: ordered tuples, unordered sets and solution lists (with `±` expanded), intervals
//!   and unions, matrices, ratios, equations (equal up to a non-zero factor) and inequalities
//!   (equal up to a positive factor, or as intervals).

use super::ast::{Const, Expr, RelOp};
use super::budget::Budget;
use super::eval::{exact, numeric, Env};
use super::MathError;
use num_bigint::BigInt;
use num_complex::Complex64;
use num_rational::BigRational;
use num_traits::Zero;

/// Comparison settings.
#[derive(Debug, Clone, Default)]
pub struct EquivConfig {
    /// Compare numbers after rounding to this many decimals, when either side has a decimal literal.
    pub float_rounding: Option<u32>,
    /// Variables must match by name (`f(x)` is not `f(y)`). When false, variables are renamed by
    /// order of appearance before comparing.
    pub strict: bool,
    /// Also accept a relation in the prediction for an interval in the gold answer.
    pub allow_set_relation_comp: bool,
}

/// Rational points for variables: positive, non-integer, distinct.
const POINTS: &[(i64, i64)] = &[(3, 7), (11, 5), (13, 9), (17, 11), (5, 3), (19, 13), (23, 17), (29, 19), (7, 4), (31, 23), (37, 29), (41, 31), (9, 8), (43, 37)];
const N_POINTS: usize = 3;
const REL_TOL: f64 = 1e-9;

pub struct Checker<'a> {
    pub cfg: &'a EquivConfig,
    pub budget: &'a mut Budget,
}

fn is_num_zero(e: &Expr) -> bool {
    matches!(e, Expr::Num(r) if r.is_zero())
}

/// Names and expressions that may stand on the left of `=` as a label: `x`, `f(x)`, `|AB|`,
/// `A:B`, `(p,q)`, `\frac{NO}{BO}` — no number literals and no sums.
pub fn is_label(e: &Expr) -> bool {
    match e {
        Expr::Sym(_) => true,
        Expr::Const(Const::E) | Expr::Const(Const::I) => true,
        Expr::Func(_, args) => !args.is_empty(),
        Expr::Mul(v) | Expr::Tuple(v) | Expr::Ratio(v) => v.iter().all(is_label),
        Expr::Div(a, b) => is_label(a) && is_label(b),
        Expr::Pow(a, _) => is_label(a),
        _ => false,
    }
}

/// Most decimal places among the decimal literals of `e` (0 when there are none).
fn decimal_places(e: &Expr) -> u64 {
    let mut m = 0;
    e.walk(&mut |x| {
        if let Expr::Dec(r) = x {
            // The denominator of a reduced decimal is 2^a 5^b; it has max(a, b) places.
            let d = r.denom();
            let a = d.trailing_zeros().unwrap_or(0);
            let mut b = 0;
            let mut q = d.clone();
            let five = BigInt::from(5);
            while b < 400 && (&q % &five).is_zero() {
                q /= &five;
                b += 1;
            }
            m = m.max(a.max(b));
        }
    });
    m
}

/// Expand every `±` into two alternatives (bounded).
pub fn expand_pm(e: &Expr, out: &mut Vec<Expr>, limit: usize) {
    if out.len() >= limit {
        return;
    }
    if !e.any(|x| matches!(x, Expr::PlusMinus(..))) {
        out.push(e.clone());
        return;
    }
    for sign in [false, true] {
        let mut done = false;
        let r = replace_first_pm(e.clone(), sign, &mut done);
        expand_pm(&r, out, limit);
    }
}

fn replace_first_pm(e: Expr, minus: bool, done: &mut bool) -> Expr {
    if *done {
        return e;
    }
    match e {
        Expr::PlusMinus(a, b) => {
            *done = true;
            let b = if minus { Expr::Neg(b) } else { *b };
            if is_num_zero(&a) {
                b
            } else {
                Expr::Add(vec![*a, b])
            }
        }
        other => other.map_children(&mut |c| replace_first_pm(c, minus, done)),
    }
}

/// Normalise the top of an answer: relation chains, `x \in S`, `±`, matrix arithmetic, singletons.
pub fn prepare(e: Expr) -> Expr {
    let e = match e {
        Expr::Rel(parts, ops) => prepare_rel(parts, ops),
        Expr::List(v) => {
            let mut out = prepare_items(v);
            if out.len() == 1 {
                out.pop().unwrap()
            } else {
                Expr::List(out)
            }
        }
        Expr::Set(v) => Expr::Set(prepare_items(v)),
        Expr::Tuple(v) => Expr::Tuple(v.into_iter().map(prepare_scalar).collect()),
        Expr::Add(_) | Expr::Mul(_) => simplify_matrix(e),
        e => e,
    };
    // `±` at the top makes a solution list.
    if !matches!(e, Expr::List(_) | Expr::Set(_)) && e.any(|x| matches!(x, Expr::PlusMinus(..))) {
        let mut out = Vec::new();
        expand_pm(&e, &mut out, 16);
        return if out.len() == 1 { out.pop().unwrap() } else { Expr::List(out) };
    }
    e
}

/// Prepare each element; elements that become lists (`±`) are spliced in.
fn prepare_items(v: Vec<Expr>) -> Vec<Expr> {
    let mut out = Vec::with_capacity(v.len());
    for x in v {
        match prepare(x) {
            Expr::List(inner) => out.extend(inner),
            y => out.push(y),
        }
    }
    out
}

fn prepare_scalar(e: Expr) -> Expr {
    match e {
        Expr::Rel(parts, ops) => prepare_rel(parts, ops),
        e => e,
    }
}

fn prepare_rel(mut parts: Vec<Expr>, ops: Vec<RelOp>) -> Expr {
    // `x \in S` is S.
    if ops.len() == 1 && ops[0] == RelOp::In {
        return prepare(parts.pop().unwrap());
    }
    let all_eq = ops.iter().all(|o| matches!(o, RelOp::Eq | RelOp::Approx));
    if all_eq {
        // `x = 5+5+1 = 11 \approx 11.0`: keep the first part and the last `=` part.
        let last_eq = ops.iter().rposition(|o| *o == RelOp::Eq);
        let k = match last_eq {
            Some(i) => i + 1,
            None => parts.len() - 1,
        };
        let rhs = parts.swap_remove(k);
        let lhs = parts.swap_remove(0);
        // `1/2 = 10/9` (numbers only): the answer is the last value.
        if !lhs.any(|x| matches!(x, Expr::Sym(_))) && !rhs.any(|x| matches!(x, Expr::Sym(_))) {
            return prepare(rhs);
        }
        return Expr::Rel(vec![lhs, prepare_scalar(rhs)], vec![RelOp::Eq]);
    }
    Expr::Rel(parts, ops)
}

/// `A + B` and `A B` for matrices.
fn simplify_matrix(e: Expr) -> Expr {
    match e {
        Expr::Add(v) if v.len() >= 2 && v.iter().all(|x| matches!(x, Expr::Matrix(_))) => {
            let mats: Vec<Vec<Vec<Expr>>> = v.into_iter().map(|x| if let Expr::Matrix(m) = x { m } else { unreachable!() }).collect();
            let (r, c) = (mats[0].len(), mats[0][0].len());
            if mats.iter().any(|m| m.len() != r || m.iter().any(|row| row.len() != c)) {
                return Expr::Add(mats.into_iter().map(Expr::Matrix).collect());
            }
            let rows = (0..r).map(|i| (0..c).map(|j| Expr::Add(mats.iter().map(|m| m[i][j].clone()).collect())).collect()).collect();
            Expr::Matrix(rows)
        }
        Expr::Mul(v) if v.len() >= 2 && v.iter().all(|x| matches!(x, Expr::Matrix(_))) => {
            let mut it = v.into_iter().map(|x| if let Expr::Matrix(m) = x { m } else { unreachable!() });
            let mut acc = it.next().unwrap();
            for m in it {
                if acc[0].len() != m.len() || m.len() * m[0].len() * acc.len() > 400 {
                    return Expr::Text("matrix product".into());
                }
                let rows = (0..acc.len()).map(|i| (0..m[0].len()).map(|j| Expr::Add((0..m.len()).map(|k| Expr::Mul(vec![acc[i][k].clone(), m[k][j].clone()])).collect())).collect()).collect();
                acc = rows;
            }
            Expr::Matrix(acc)
        }
        e => e,
    }
}

/// Rename free variables to `v0, v1, ...` by order of first appearance.
pub fn rename_vars(e: &Expr) -> Expr {
    let mut order: Vec<String> = Vec::new();
    e.walk(&mut |x| {
        if let Expr::Sym(s) = x {
            if !order.contains(s) {
                order.push(s.clone())
            }
        }
    });
    fn go(e: Expr, order: &[String]) -> Expr {
        match e {
            Expr::Sym(s) => Expr::Sym(format!("v{}", order.iter().position(|o| *o == s).unwrap_or(0))),
            Expr::Func(name, args) if name.len() == 1 || name.contains('_') => Expr::Func(name, args.into_iter().map(|a| go(a, order)).collect()),
            other => other.map_children(&mut |c| go(c, order)),
        }
    }
    go(e.clone(), &order)
}

fn text_key(s: &str) -> String {
    let mut t: String = s.chars().filter(|c| !c.is_whitespace() && !matches!(c, '(' | ')' | '{' | '}' | '$' | '.' | '\\')).collect();
    t.make_ascii_lowercase();
    for p in ["textbf", "textit", "text", "mathrm"] {
        t = t.replace(p, "");
    }
    t
}

/// A text rendering of a product of letters (`E`, `odd`), for comparing with `\text{...}`.
fn letters_of(e: &Expr) -> Option<String> {
    match e {
        Expr::Sym(s) => Some(s.clone()),
        Expr::Const(Const::E) => Some("e".into()),
        Expr::Const(Const::I) => Some("i".into()),
        Expr::Text(t) => Some(t.clone()),
        Expr::Mul(v) => {
            let mut s = String::new();
            for x in v {
                s.push_str(&letters_of(x)?);
            }
            Some(s)
        }
        Expr::Num(r) if r.is_integer() => Some(r.to_string()),
        _ => None,
    }
}

fn interval_from_rel(parts: &[Expr], ops: &[RelOp]) -> Option<Expr> {
    let inf = || Expr::Const(Const::Inf);
    let ninf = || Expr::Neg(Box::new(Expr::Const(Const::Inf)));
    let iv = |lo: Expr, hi: Expr, lc: bool, hc: bool| Some(Expr::Interval { lo: Box::new(lo), hi: Box::new(hi), lo_closed: lc, hi_closed: hc });
    // `a <= |z| <= b` is `[-b, -a] U [a, b]`.
    if let ([a, Expr::Func(f, args), b], [o1 @ (RelOp::Lt | RelOp::Le), o2 @ (RelOp::Lt | RelOp::Le)]) = (parts, ops) {
        if f == "abs" && args.len() == 1 && is_label(&args[0]) {
            let neg = |e: &Expr| Expr::Neg(Box::new(e.clone()));
            return Some(Expr::Union(vec![
                Expr::Interval { lo: Box::new(neg(b)), hi: Box::new(neg(a)), lo_closed: *o2 == RelOp::Le, hi_closed: *o1 == RelOp::Le },
                Expr::Interval { lo: Box::new(a.clone()), hi: Box::new(b.clone()), lo_closed: *o1 == RelOp::Le, hi_closed: *o2 == RelOp::Le },
            ]));
        }
    }
    match (parts, ops) {
        ([a, x, b], [o1, o2]) if is_label(x) => match (o1, o2) {
            (RelOp::Lt | RelOp::Le, RelOp::Lt | RelOp::Le) => iv(a.clone(), b.clone(), *o1 == RelOp::Le, *o2 == RelOp::Le),
            (RelOp::Gt | RelOp::Ge, RelOp::Gt | RelOp::Ge) => iv(b.clone(), a.clone(), *o2 == RelOp::Ge, *o1 == RelOp::Ge),
            _ => None,
        },
        ([x, a], [o]) if is_label(x) => match o {
            RelOp::Lt => iv(ninf(), a.clone(), false, false),
            RelOp::Le => iv(ninf(), a.clone(), false, true),
            RelOp::Gt => iv(a.clone(), inf(), false, false),
            RelOp::Ge => iv(a.clone(), inf(), true, false),
            _ => None,
        },
        ([a, x], [o]) if is_label(x) => match o {
            RelOp::Gt => iv(ninf(), a.clone(), false, false),
            RelOp::Ge => iv(ninf(), a.clone(), false, true),
            RelOp::Lt => iv(a.clone(), inf(), false, false),
            RelOp::Le => iv(a.clone(), inf(), true, false),
            _ => None,
        },
        _ => None,
    }
}

fn is_ineq(ops: &[RelOp]) -> bool {
    !ops.is_empty() && ops.iter().all(|o| matches!(o, RelOp::Lt | RelOp::Le | RelOp::Gt | RelOp::Ge | RelOp::Ne))
}

fn is_eq_rel(e: &Expr) -> bool {
    matches!(e, Expr::Rel(p, o) if p.len() == 2 && o[0] == RelOp::Eq)
}

fn as_items(e: &Expr) -> Option<&[Expr]> {
    match e {
        Expr::List(v) | Expr::Set(v) => Some(v),
        _ => None,
    }
}

impl Checker<'_> {
    /// Are `g` (gold) and `p` (prediction) the same answer?
    pub fn equiv(&mut self, g: &Expr, p: &Expr) -> Result<bool, MathError> {
        self.budget.charge(4)?;
        use Expr::*;
        // Text against anything: compare the words.
        if let Text(t) = g {
            return Ok(letters_of(p).map(|s| text_key(&s) == text_key(t)).unwrap_or(false) || matches!(p, Text(u) if text_key(u) == text_key(t)));
        }
        if let Text(t) = p {
            return Ok(letters_of(g).map(|s| text_key(&s) == text_key(t)).unwrap_or(false));
        }
        match (g, p) {
            (Rel(gp, go), Rel(pp, po)) if is_eq_rel(g) && is_eq_rel(p) => {
                if is_label(&gp[0]) && is_label(&pp[0]) {
                    return self.equiv(&gp[1], &pp[1]);
                }
                self.equation(&gp[0], &gp[1], &pp[0], &pp[1], go[0])
            }
            (Rel(gp, _), _) if is_eq_rel(g) => {
                if is_label(&gp[0]) {
                    self.equiv(&gp[1], p)
                } else {
                    Ok(false)
                }
            }
            (_, Rel(pp, _)) if is_eq_rel(p) => {
                if is_label(&pp[0]) {
                    self.equiv(g, &pp[1])
                } else {
                    Ok(false)
                }
            }
            (Rel(gp, go), Rel(pp, po)) if is_ineq(go) && is_ineq(po) => self.inequality(gp, go, pp, po),
            (Rel(gp, go), Interval { .. } | Union(_)) | (Rel(gp, go), Tuple(_)) if is_ineq(go) && !matches!(p, Tuple(t) if t.len() != 2) => match interval_from_rel(gp, go) {
                Some(iv) => self.equiv(&iv, p),
                None => Ok(false),
            },
            (Interval { .. } | Union(_), Rel(pp, po)) if is_ineq(po) && self.cfg.allow_set_relation_comp => match interval_from_rel(pp, po) {
                Some(iv) => self.equiv(g, &iv),
                None => Ok(false),
            },
            (Rel(..), _) | (_, Rel(..)) => Ok(false),
            // The prediction gives one answer in several equal forms (`15\frac{39}{40}, or \frac{639}{40}`).
            (x, List(v)) if !matches!(x, List(_) | Set(_) | Tuple(_)) && v.len() >= 2 && v.iter().all(|e| !matches!(e, Rel(..))) => {
                let (x, v) = (x.clone(), v.clone());
                for e in &v {
                    if !self.equiv(&x, e)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            (List(_) | Set(_), List(_) | Set(_)) => self.unordered(as_items(g).unwrap(), as_items(p).unwrap()),
            (Set(v), x) | (x, Set(v)) if v.len() == 1 && !matches!(x, Tuple(_)) => {
                let v0 = v[0].clone();
                let x = x.clone();
                if matches!(g, Set(_)) {
                    self.equiv(&v0, &x)
                } else {
                    self.equiv(&x, &v0)
                }
            }
            (Tuple(a), Tuple(b)) => self.ordered(a, b),
            (Tuple(a), List(b) | Set(b)) | (List(a) | Set(a), Tuple(b)) => self.ordered(a, b),
            (Tuple(a), Interval { lo, hi, lo_closed: false, hi_closed: false }) | (Interval { lo, hi, lo_closed: false, hi_closed: false }, Tuple(a)) if a.len() == 2 => {
                let (lo, hi) = (lo.as_ref().clone(), hi.as_ref().clone());
                let a = a.clone();
                Ok(self.equiv(&a[0], &lo)? && self.equiv(&a[1], &hi)?)
            }
            (Interval { lo: l1, hi: h1, lo_closed: a1, hi_closed: b1 }, Interval { lo: l2, hi: h2, lo_closed: a2, hi_closed: b2 }) => {
                Ok(a1 == a2 && b1 == b2 && self.equiv(l1, l2)? && self.equiv(h1, h2)?)
            }
            (Union(a), Union(b)) => self.unordered(a, b),
            (Union(a), x @ Interval { .. }) | (x @ Interval { .. }, Union(a)) if a.len() == 1 => {
                let (a0, x) = (a[0].clone(), x.clone());
                self.equiv(&a0, &x)
            }
            (Matrix(a), Matrix(b)) => {
                if a.len() != b.len() || a.iter().zip(b).any(|(r, s)| r.len() != s.len()) {
                    return Ok(false);
                }
                for (r, s) in a.iter().zip(b) {
                    for (x, y) in r.iter().zip(s) {
                        if !self.equiv(x, y)? {
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            }
            // A column or row vector written as a tuple: `\begin{pmatrix}1\\2\end{pmatrix}` and `(1, 2)`.
            (Matrix(m), Tuple(t)) | (Tuple(t), Matrix(m)) if m.len() == 1 || m.iter().all(|r| r.len() == 1) => {
                let flat: Vec<Expr> = m.iter().flatten().cloned().collect();
                let t = t.clone();
                if matches!(g, Matrix(_)) {
                    self.ordered(&flat, &t)
                } else {
                    self.ordered(&t, &flat)
                }
            }
            (Ratio(a), Ratio(b)) => self.ordered(a, b),
            (List(_) | Set(_) | Tuple(_) | Interval { .. } | Union(_) | Matrix(_) | Ratio(_), _) | (_, List(_) | Set(_) | Tuple(_) | Interval { .. } | Union(_) | Matrix(_) | Ratio(_)) => Ok(false),
            _ => self.scalar(g, p),
        }
    }

    fn ordered(&mut self, a: &[Expr], b: &[Expr]) -> Result<bool, MathError> {
        if a.len() != b.len() {
            return Ok(false);
        }
        for (x, y) in a.iter().zip(b) {
            if !self.equiv(x, y)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Set equality (duplicates ignored): every element on each side matches one on the other.
    fn unordered(&mut self, a: &[Expr], b: &[Expr]) -> Result<bool, MathError> {
        let mut a_hit = vec![false; a.len()];
        let mut b_hit = vec![false; b.len()];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                if a_hit[i] && b_hit[j] {
                    continue;
                }
                if self.equiv(x, y)? {
                    a_hit[i] = true;
                    b_hit[j] = true;
                }
            }
            if !a_hit[i] {
                return Ok(false);
            }
        }
        Ok(b_hit.iter().all(|h| *h))
    }

    fn points(&self, vars: &[String], k: usize) -> Vec<(String, BigRational, Complex64)> {
        vars.iter()
            .enumerate()
            .map(|(j, v)| {
                let (n, d) = POINTS[(j * 5 + k * 3) % POINTS.len()];
                let r = BigRational::new(BigInt::from(n), BigInt::from(d));
                (v.clone(), r, Complex64::new(n as f64 / d as f64, 0.0))
            })
            .collect()
    }

    fn union_vars(a: &Expr, b: &Expr) -> Vec<String> {
        let mut v = a.free_vars();
        v.extend(b.free_vars());
        v.sort();
        v.dedup();
        v
    }

    /// Numeric/symbolic equality of two scalar expressions.
    pub fn scalar(&mut self, g: &Expr, p: &Expr) -> Result<bool, MathError> {
        // Percent: `28\%` matches 28 and 0.28.
        let gp = matches!(g, Expr::Percent(_));
        let pp = matches!(p, Expr::Percent(_));
        if gp || pp {
            let strip = |e: &Expr| match e {
                Expr::Percent(x) => x.as_ref().clone(),
                e => e.clone(),
            };
            let (g0, p0) = (strip(g), strip(p));
            if self.scalar_core(&g0, &p0)? {
                return Ok(true);
            }
            return self.scalar_core(g, p);
        }
        self.scalar_core(g, p)
    }

    fn scalar_core(&mut self, g: &Expr, p: &Expr) -> Result<bool, MathError> {
        let (g, p) = if self.cfg.strict { (g.clone(), p.clone()) } else { (rename_vars(g), rename_vars(p)) };
        let vars = Self::union_vars(&g, &p);
        let decimals = g.has_decimal() || p.has_decimal();
        let npts = if vars.is_empty() { 1 } else { N_POINTS };
        let mut decided = 0;
        for k in 0..npts {
            let vals = self.points(&vars, k);
            let env = Env { vars: &vals };
            let eg = exact(&g, &env, self.budget)?;
            let ep = exact(&p, &env, self.budget)?;
            if let (Some(a), Some(b)) = (&eg, &ep) {
                if a == b || (decimals && self.rounded_eq_exact(a, b)) {
                    decided += 1;
                    continue;
                }
                return Ok(false);
            }
            let (Some(a), Some(b)) = (numeric(&g, &env, self.budget)?, numeric(&p, &env, self.budget)?) else { continue };
            // A long decimal (more than 6 places) against a value we could not compute exactly
            // (a radical, pi, ...) is an approximation: equal only with float_rounding.
            if self.cfg.float_rounding.is_none() && (eg.is_none() || ep.is_none()) {
                let (dg, dp) = (decimal_places(&g), decimal_places(&p));
                if (dg > 6 && dp == 0) || (dp > 6 && dg == 0) {
                    return Ok(false);
                }
            }
            // An overflow (not a written infinity) cannot be compared.
            let has_inf = |e: &Expr| e.any(|x| matches!(x, Expr::Const(Const::Inf)));
            if (!a.is_finite() && !has_inf(&g)) || (!b.is_finite() && !has_inf(&p)) {
                continue;
            }
            if !self.close(a, b, decimals) {
                return Ok(false);
            }
            decided += 1;
        }
        Ok(decided > 0)
    }

    fn rounded_eq_exact(&self, a: &BigRational, b: &BigRational) -> bool {
        let Some(d) = self.cfg.float_rounding else { return false };
        let scale = BigRational::from_integer(num_traits::pow(BigInt::from(10), d.min(60) as usize));
        let half = BigRational::new(BigInt::from(1), BigInt::from(2));
        let ra = (a * &scale + &half).floor();
        let rb = (b * &scale + &half).floor();
        ra == rb
    }

    fn close(&self, a: Complex64, b: Complex64, decimals: bool) -> bool {
        if a.re.is_infinite() || b.re.is_infinite() {
            return a.re == b.re && a.im == b.im;
        }
        if !(a.re.is_finite() && a.im.is_finite() && b.re.is_finite() && b.im.is_finite()) {
            return false;
        }
        if decimals {
            if let Some(d) = self.cfg.float_rounding {
                let s = 10f64.powi(d.min(300) as i32);
                if (a.re * s + 0.5).floor() == (b.re * s + 0.5).floor() && (a.im * s + 0.5).floor() == (b.im * s + 0.5).floor() {
                    return true;
                }
            }
        }
        let diff = (a - b).norm();
        diff <= REL_TOL * a.norm().max(b.norm()) || diff < 1e-12
    }

    /// Value of `l - r` at point k: exact when possible.
    fn diff_at(&mut self, l: &Expr, r: &Expr, vals: &[(String, BigRational, Complex64)]) -> Result<Option<Complex64>, MathError> {
        let d = Expr::Add(vec![l.clone(), Expr::Neg(Box::new(r.clone()))]);
        let env = Env { vars: vals };
        if let Some(x) = exact(&d, &env, self.budget)? {
            use num_traits::ToPrimitive;
            return Ok(Some(Complex64::new(x.to_f64().unwrap_or(f64::NAN), 0.0)));
        }
        numeric(&d, &env, self.budget)
    }

    /// `l1 op r1` and `l2 op r2` describe the same relation: `l1-r1 = c (l2-r2)` with c != 0
    /// (c > 0 when `positive`).
    fn proportional(&mut self, l1: &Expr, r1: &Expr, l2: &Expr, r2: &Expr, positive: bool) -> Result<bool, MathError> {
        let (l1, r1, l2, r2) = if self.cfg.strict {
            (l1.clone(), r1.clone(), l2.clone(), r2.clone())
        } else {
            let a = rename_vars(&Expr::Tuple(vec![l1.clone(), r1.clone()]));
            let b = rename_vars(&Expr::Tuple(vec![l2.clone(), r2.clone()]));
            let (Expr::Tuple(a), Expr::Tuple(b)) = (a, b) else { unreachable!() };
            (a[0].clone(), a[1].clone(), b[0].clone(), b[1].clone())
        };
        let mut vars = Self::union_vars(&l1, &r1);
        vars.extend(Self::union_vars(&l2, &r2));
        vars.sort();
        vars.dedup();
        if vars.is_empty() {
            return Ok(self.equiv(&l1, &l2)? && self.equiv(&r1, &r2)?);
        }
        let mut ratio: Option<Complex64> = None;
        let mut seen = 0;
        for k in 0..N_POINTS + 1 {
            let vals = self.points(&vars, k);
            let (Some(a), Some(b)) = (self.diff_at(&l1, &r1, &vals)?, self.diff_at(&l2, &r2, &vals)?) else { continue };
            let az = a.norm() < 1e-12;
            let bz = b.norm() < 1e-12;
            if az != bz {
                return Ok(false);
            }
            if az {
                seen += 1;
                continue;
            }
            let q = a / b;
            match ratio {
                None => {
                    if positive && !(q.re > 0.0 && q.im.abs() < 1e-9 * q.re.abs()) {
                        return Ok(false);
                    }
                    ratio = Some(q)
                }
                Some(r0) => {
                    if (q - r0).norm() > REL_TOL * r0.norm().max(1e-300) * 10.0 {
                        return Ok(false);
                    }
                }
            }
            seen += 1;
        }
        Ok(seen > 0)
    }

    fn equation(&mut self, l1: &Expr, r1: &Expr, l2: &Expr, r2: &Expr, _op: RelOp) -> Result<bool, MathError> {
        self.proportional(l1, r1, l2, r2, false)
    }

    fn inequality(&mut self, gp: &[Expr], go: &[RelOp], pp: &[Expr], po: &[RelOp]) -> Result<bool, MathError> {
        fn norm(parts: &[Expr], ops: &[RelOp]) -> (Vec<Expr>, Vec<RelOp>) {
            if ops.iter().all(|o| matches!(o, RelOp::Gt | RelOp::Ge)) {
                let p: Vec<Expr> = parts.iter().rev().cloned().collect();
                let o: Vec<RelOp> = ops.iter().rev().map(|o| if *o == RelOp::Gt { RelOp::Lt } else { RelOp::Le }).collect();
                (p, o)
            } else {
                (parts.to_vec(), ops.to_vec())
            }
        }
        let (gp, go) = norm(gp, go);
        let (pp, po) = norm(pp, po);
        if go != po || gp.len() != pp.len() {
            return Ok(false);
        }
        if gp.len() == 2 {
            let positive = go[0] != RelOp::Ne;
            return self.proportional(&gp[0], &gp[1], &pp[0], &pp[1], positive);
        }
        self.ordered(&gp, &pp)
    }
}
