//! The expression tree that both sides of a comparison are parsed into.

use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Signed, Zero};
use std::fmt;

/// Named constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Const {
    Pi,
    E,
    I,
    Inf,
}

/// Relation operators, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Approx,
    In,
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// An exact number written without a decimal point (integers; fractions are `Div`).
    Num(BigRational),
    /// A number written with a decimal point or in scientific notation (exact value kept).
    Dec(BigRational),
    /// A variable, possibly with a subscript folded into the name (`x_1`).
    Sym(String),
    Const(Const),
    Add(Vec<Expr>),
    Mul(Vec<Expr>),
    Neg(Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    /// `Root(radicand, index)`.
    Root(Box<Expr>, Box<Expr>),
    /// A named function application (sin, log, abs, an unknown `f`...).
    Func(String, Vec<Expr>),
    Percent(Box<Expr>),
    /// `a ± b` (unary `±b` is `PlusMinus(0, b)`).
    PlusMinus(Box<Expr>, Box<Expr>),
    Factorial(Box<Expr>),
    Text(String),
    /// Ordered tuple `(a, b, ...)`.
    Tuple(Vec<Expr>),
    /// A bare solution list `a, b and c` (unordered).
    List(Vec<Expr>),
    /// A set `\{a, b\}` (unordered).
    Set(Vec<Expr>),
    Interval {
        lo: Box<Expr>,
        hi: Box<Expr>,
        lo_closed: bool,
        hi_closed: bool,
    },
    Union(Vec<Expr>),
    Matrix(Vec<Vec<Expr>>),
    /// A relation chain `e0 op0 e1 op1 e2 ...`.
    Rel(Vec<Expr>, Vec<RelOp>),
    Ratio(Vec<Expr>),
}

impl Expr {
    pub fn int(n: i64) -> Expr {
        Expr::Num(BigRational::from_integer(BigInt::from(n)))
    }

    /// Whether any node satisfies `pred`.
    pub fn any(&self, pred: impl Fn(&Expr) -> bool) -> bool {
        let mut found = false;
        self.walk(&mut |e| found = found || pred(e));
        found
    }

    /// Whether a decimal literal occurs anywhere inside.
    pub fn has_decimal(&self) -> bool {
        self.any(|e| matches!(e, Expr::Dec(_)))
    }

    /// Visit every node (pre-order).
    pub fn walk(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Add(v) | Expr::Mul(v) | Expr::Func(_, v) | Expr::Tuple(v) | Expr::List(v) | Expr::Set(v) | Expr::Union(v) | Expr::Ratio(v) | Expr::Rel(v, _) => {
                for e in v {
                    e.walk(f)
                }
            }
            Expr::Neg(a) | Expr::Percent(a) | Expr::Factorial(a) => a.walk(f),
            Expr::Div(a, b) | Expr::Pow(a, b) | Expr::Root(a, b) | Expr::PlusMinus(a, b) => {
                a.walk(f);
                b.walk(f)
            }
            Expr::Interval { lo, hi, .. } => {
                lo.walk(f);
                hi.walk(f)
            }
            Expr::Matrix(rows) => {
                for r in rows {
                    for e in r {
                        e.walk(f)
                    }
                }
            }
            Expr::Num(_) | Expr::Dec(_) | Expr::Sym(_) | Expr::Const(_) | Expr::Text(_) => {}
        }
    }

    /// Apply `f` to every direct child, rebuilding the node.
    pub fn map_children(self, f: &mut dyn FnMut(Expr) -> Expr) -> Expr {
        let mv = |v: Vec<Expr>, f: &mut dyn FnMut(Expr) -> Expr| v.into_iter().map(&mut *f).collect::<Vec<_>>();
        match self {
            Expr::Add(v) => Expr::Add(mv(v, f)),
            Expr::Mul(v) => Expr::Mul(mv(v, f)),
            Expr::Func(n, v) => Expr::Func(n, mv(v, f)),
            Expr::Tuple(v) => Expr::Tuple(mv(v, f)),
            Expr::List(v) => Expr::List(mv(v, f)),
            Expr::Set(v) => Expr::Set(mv(v, f)),
            Expr::Union(v) => Expr::Union(mv(v, f)),
            Expr::Ratio(v) => Expr::Ratio(mv(v, f)),
            Expr::Rel(v, ops) => Expr::Rel(mv(v, f), ops),
            Expr::Neg(a) => Expr::Neg(Box::new(f(*a))),
            Expr::Percent(a) => Expr::Percent(Box::new(f(*a))),
            Expr::Factorial(a) => Expr::Factorial(Box::new(f(*a))),
            Expr::Div(a, b) => Expr::Div(Box::new(f(*a)), Box::new(f(*b))),
            Expr::Pow(a, b) => Expr::Pow(Box::new(f(*a)), Box::new(f(*b))),
            Expr::Root(a, b) => Expr::Root(Box::new(f(*a)), Box::new(f(*b))),
            Expr::PlusMinus(a, b) => Expr::PlusMinus(Box::new(f(*a)), Box::new(f(*b))),
            Expr::Interval { lo, hi, lo_closed, hi_closed } => Expr::Interval { lo: Box::new(f(*lo)), hi: Box::new(f(*hi)), lo_closed, hi_closed },
            Expr::Matrix(rows) => Expr::Matrix(rows.into_iter().map(|r| mv(r, f)).collect()),
            e @ (Expr::Num(_) | Expr::Dec(_) | Expr::Sym(_) | Expr::Const(_) | Expr::Text(_)) => e,
        }
    }

    /// Free variable names, sorted and deduplicated.
    pub fn free_vars(&self) -> Vec<String> {
        let mut v = Vec::new();
        self.walk(&mut |e| {
            if let Expr::Sym(s) = e {
                v.push(s.clone())
            }
        });
        v.sort();
        v.dedup();
        v
    }

    /// Node count (used to bound work).
    pub fn size(&self) -> usize {
        let mut n = 0;
        self.walk(&mut |_| n += 1);
        n
    }
}

fn fmt_rational(r: &BigRational, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if r.denom().is_one() {
        write!(f, "{}", r.numer())
    } else {
        write!(f, "{}/{}", r.numer(), r.denom())
    }
}

fn join(f: &mut fmt::Formatter<'_>, v: &[Expr], sep: &str) -> fmt::Result {
    for (i, e) in v.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write!(f, "{e}")?;
    }
    Ok(())
}

impl fmt::Display for RelOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelOp::Eq => "=",
            RelOp::Ne => "!=",
            RelOp::Lt => "<",
            RelOp::Le => "<=",
            RelOp::Gt => ">",
            RelOp::Ge => ">=",
            RelOp::Approx => "~=",
            RelOp::In => " in ",
        })
    }
}

/// A plain-text normal form, shown in verdicts.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Num(r) => fmt_rational(r, f),
            Expr::Dec(r) => {
                if r.denom().is_one() {
                    write!(f, "{}.0", r.numer())
                } else {
                    // Write the exact decimal expansion when short.
                    let mut den = r.denom().clone();
                    let mut digits = 0;
                    let ten = BigInt::from(10);
                    while !den.is_one() && digits < 60 {
                        let g = num_integer::Integer::gcd(&den, &ten);
                        if g.is_one() {
                            break;
                        }
                        den /= g;
                        digits += 1;
                    }
                    if den.is_one() {
                        let scaled = (r * BigRational::from_integer(ten.pow(digits as u32))).to_integer();
                        let neg = scaled.is_negative();
                        let s = scaled.abs().to_string();
                        let s = format!("{:0>width$}", s, width = digits + 1);
                        let (a, b) = s.split_at(s.len() - digits);
                        write!(f, "{}{}.{}", if neg { "-" } else { "" }, a, b)
                    } else {
                        fmt_rational(r, f)
                    }
                }
            }
            Expr::Sym(s) => f.write_str(s),
            Expr::Const(c) => f.write_str(match c {
                Const::Pi => "pi",
                Const::E => "E",
                Const::I => "I",
                Const::Inf => "oo",
            }),
            Expr::Add(v) => {
                f.write_str("(")?;
                for (i, e) in v.iter().enumerate() {
                    match e {
                        Expr::Neg(inner) if i > 0 => write!(f, " - {inner}")?,
                        _ if i > 0 => write!(f, " + {e}")?,
                        _ => write!(f, "{e}")?,
                    }
                }
                f.write_str(")")
            }
            Expr::Mul(v) => join(f, v, "*"),
            Expr::Neg(a) => write!(f, "-{a}"),
            Expr::Div(a, b) => write!(f, "({a})/({b})"),
            Expr::Pow(a, b) => write!(f, "({a})^({b})"),
            Expr::Root(a, n) => {
                if *n.as_ref() == Expr::int(2) {
                    write!(f, "sqrt({a})")
                } else {
                    write!(f, "root({a}, {n})")
                }
            }
            Expr::Func(n, v) => {
                write!(f, "{n}(")?;
                join(f, v, ", ")?;
                f.write_str(")")
            }
            Expr::Percent(a) => write!(f, "{a}%"),
            Expr::PlusMinus(a, b) => {
                if matches!(a.as_ref(), Expr::Num(r) if r.is_zero()) {
                    write!(f, "+-{b}")
                } else {
                    write!(f, "({a} +- {b})")
                }
            }
            Expr::Factorial(a) => write!(f, "({a})!"),
            Expr::Text(s) => write!(f, "\"{s}\""),
            Expr::Tuple(v) => {
                f.write_str("(")?;
                join(f, v, ", ")?;
                f.write_str(")")
            }
            Expr::List(v) => join(f, v, ", "),
            Expr::Set(v) => {
                f.write_str("{")?;
                join(f, v, ", ")?;
                f.write_str("}")
            }
            Expr::Interval { lo, hi, lo_closed, hi_closed } => {
                write!(f, "{}{lo}, {hi}{}", if *lo_closed { "[" } else { "(" }, if *hi_closed { "]" } else { ")" })
            }
            Expr::Union(v) => join(f, v, " U "),
            Expr::Matrix(rows) => {
                f.write_str("Matrix([")?;
                for (i, r) in rows.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str("[")?;
                    join(f, r, ", ")?;
                    f.write_str("]")?;
                }
                f.write_str("])")
            }
            Expr::Rel(v, ops) => {
                for (i, e) in v.iter().enumerate() {
                    if i > 0 {
                        write!(f, " {} ", ops[i - 1])?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
            Expr::Ratio(v) => join(f, v, ":"),
        }
    }
}
