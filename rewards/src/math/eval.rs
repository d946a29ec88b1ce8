//! Evaluation of expression trees: exact over big rationals, and numeric over
//! complex doubles. Both are charged to the [`Budget`].

use super::ast::{Const, Expr};
use super::budget::Budget;
use super::MathError;
use num_bigint::BigInt;
use num_complex::Complex64;
use num_integer::Integer;
use num_rational::BigRational;
use num_traits::{One, Signed, ToPrimitive, Zero};

/// Variable assignment: exact value and its complex image.
pub struct Env<'a> {
    pub vars: &'a [(String, BigRational, Complex64)],
}

fn bits(r: &BigRational) -> u64 {
    r.numer().bits() + r.denom().bits()
}

fn charge_big(budget: &mut Budget, a: &BigRational, b: &BigRational) -> Result<(), MathError> {
    // Schoolbook cost estimate in 64-bit words.
    let wa = bits(a) / 64 + 1;
    let wb = bits(b) / 64 + 1;
    budget.charge(wa.saturating_mul(wb).min(1 << 40) + 1)
}

const LOG2_10: f64 = std::f64::consts::LOG2_10;

/// Exact rational value, or `None` when the expression is not a rational number
/// we can compute exactly (irrational, symbolic, too large).
pub fn exact(e: &Expr, env: &Env, budget: &mut Budget) -> Result<Option<BigRational>, MathError> {
    budget.charge(1)?;
    Ok(match e {
        Expr::Num(r) | Expr::Dec(r) => Some(r.clone()),
        Expr::Sym(s) => env.vars.iter().find(|(n, _, _)| n == s).map(|(_, r, _)| r.clone()),
        Expr::Const(_) => None,
        Expr::Add(v) => {
            let mut acc = BigRational::zero();
            for x in v {
                match exact(x, env, budget)? {
                    Some(r) => {
                        charge_big(budget, &acc, &r)?;
                        acc += r
                    }
                    None => return Ok(None),
                }
            }
            Some(acc)
        }
        Expr::Mul(v) => {
            let mut acc = BigRational::one();
            for x in v {
                match exact(x, env, budget)? {
                    Some(r) => {
                        charge_big(budget, &acc, &r)?;
                        if bits(&acc) + bits(&r) > budget.max_digits * 4 {
                            return Ok(None);
                        }
                        acc *= r
                    }
                    None => return Ok(None),
                }
            }
            Some(acc)
        }
        Expr::Neg(a) => exact(a, env, budget)?.map(|r| -r),
        Expr::Div(a, b) => {
            let (Some(x), Some(y)) = (exact(a, env, budget)?, exact(b, env, budget)?) else { return Ok(None) };
            if y.is_zero() {
                return Ok(None);
            }
            charge_big(budget, &x, &y)?;
            Some(x / y)
        }
        Expr::Percent(a) => exact(a, env, budget)?.map(|r| r / BigRational::from_integer(BigInt::from(100))),
        Expr::Pow(a, b) => {
            let Some(base) = exact(a, env, budget)? else { return Ok(None) };
            let Some(ex) = exact(b, env, budget)? else { return Ok(None) };
            pow_exact(&base, &ex, budget)?
        }
        Expr::Root(a, n) => {
            let (Some(x), Some(k)) = (exact(a, env, budget)?, exact(n, env, budget)?) else { return Ok(None) };
            if !k.is_integer() {
                return Ok(None);
            }
            let Some(k) = k.to_integer().to_u32() else { return Ok(None) };
            root_exact(&x, k, budget)?
        }
        Expr::Factorial(a) => {
            let Some(x) = exact(a, env, budget)? else { return Ok(None) };
            if !x.is_integer() || x.is_negative() {
                return Ok(None);
            }
            let Some(n) = x.to_integer().to_u64() else { return Ok(None) };
            if n > 1000 {
                return Ok(None);
            }
            budget.charge(n * (n / 64 + 1))?;
            let mut acc = BigInt::one();
            for k in 2..=n {
                acc *= k;
            }
            Some(BigRational::from_integer(acc))
        }
        Expr::Func(name, args) => {
            let mut vals = Vec::with_capacity(args.len());
            for a in args {
                match exact(a, env, budget)? {
                    Some(r) => vals.push(r),
                    None => return Ok(None),
                }
            }
            func_exact(name, &vals, budget)?
        }
        _ => None,
    })
}

fn func_exact(name: &str, v: &[BigRational], budget: &mut Budget) -> Result<Option<BigRational>, MathError> {
    Ok(match (name, v) {
        ("abs", [x]) => Some(x.abs()),
        ("floor", [x]) => Some(x.floor()),
        ("ceil", [x]) => Some(x.ceil()),
        ("sgn", [x]) => Some(BigRational::from_integer(BigInt::from(if x.is_zero() { 0 } else if x.is_positive() { 1 } else { -1 }))),
        ("binom", [n, k]) if n.is_integer() && k.is_integer() => {
            let (Some(n), Some(k)) = (n.to_integer().to_i64(), k.to_integer().to_i64()) else { return Ok(None) };
            if k < 0 || n < 0 || k > n || n > 5000 {
                return Ok(if k < 0 || (n >= 0 && k > n) { Some(BigRational::zero()) } else { None });
            }
            let k = k.min(n - k);
            budget.charge((k as u64) * (n as u64 / 64 + 1))?;
            let mut acc = BigInt::one();
            for j in 0..k {
                acc = acc * BigInt::from(n - j) / BigInt::from(j + 1);
            }
            Some(BigRational::from_integer(acc))
        }
        ("gcd" | "lcm", [a, b]) if a.is_integer() && b.is_integer() => {
            let (x, y) = (a.to_integer(), b.to_integer());
            Some(BigRational::from_integer(if name == "gcd" { x.gcd(&y) } else { x.lcm(&y) }))
        }
        ("max", vals) if !vals.is_empty() => vals.iter().max().cloned(),
        ("min", vals) if !vals.is_empty() => vals.iter().min().cloned(),
        ("sin" | "tan" | "arcsin" | "arctan" | "sinh" | "tanh", [x]) if x.is_zero() => Some(BigRational::zero()),
        ("cos" | "cosh" | "exp", [x]) if x.is_zero() => Some(BigRational::one()),
        ("ln", [x]) if x.is_one() => Some(BigRational::zero()),
        ("log", [x]) if x.is_one() => Some(BigRational::zero()),
        _ => None,
    })
}

/// `base^ex` when it is rational and small enough; refuses huge results before computing them.
pub fn pow_exact(base: &BigRational, ex: &BigRational, budget: &mut Budget) -> Result<Option<BigRational>, MathError> {
    if base.is_zero() {
        return Ok(if ex.is_positive() { Some(BigRational::zero()) } else if ex.is_zero() { Some(BigRational::one()) } else { None });
    }
    if base.is_one() {
        return Ok(Some(BigRational::one()));
    }
    // Rational exponent p/q: take the q-th root first (exact only for perfect powers).
    let (p, q) = (ex.numer().clone(), ex.denom().clone());
    let Some(q) = q.to_u32() else { return Ok(None) };
    let Some(p) = p.to_i64() else { return Ok(None) };
    let b = if q == 1 {
        base.clone()
    } else {
        match root_exact(base, q, budget)? {
            Some(r) => r,
            None => return Ok(None),
        }
    };
    let digits = (bits(&b) as f64 / LOG2_10) * (p.unsigned_abs() as f64);
    if digits > budget.max_digits as f64 {
        return Ok(None);
    }
    budget.charge((digits as u64 / 19 + 1).pow(2) / 8 + 1)?;
    let Ok(pu) = usize::try_from(p.unsigned_abs()) else { return Ok(None) };
    let r = num_traits::pow(b, pu);
    Ok(Some(if p < 0 { r.recip() } else { r }))
}

/// Exact k-th root of a rational, when it is one.
pub fn root_exact(x: &BigRational, k: u32, budget: &mut Budget) -> Result<Option<BigRational>, MathError> {
    if k == 0 || k > 64 {
        return Ok(None);
    }
    if x.is_negative() {
        if k % 2 == 1 {
            return Ok(root_exact(&-x, k, budget)?.map(|r| -r));
        }
        return Ok(None);
    }
    budget.charge((bits(x) / 64 + 1).pow(2))?;
    let n = x.numer().nth_root(k);
    let d = x.denom().nth_root(k);
    if num_traits::pow(n.clone(), k as usize) == *x.numer() && num_traits::pow(d.clone(), k as usize) == *x.denom() {
        Ok(Some(BigRational::new(n, d)))
    } else {
        Ok(None)
    }
}

fn to_c(r: &BigRational) -> Complex64 {
    Complex64::new(r.to_f64().unwrap_or(f64::NAN), 0.0)
}

/// A deterministic pseudo-random value for an unknown function applied to `args`:
/// two calls with (numerically) equal arguments agree.
fn opaque_func(name: &str, args: &[Complex64]) -> Complex64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    for a in args {
        for x in [a.re, a.im] {
            // Round to 9 significant digits so tiny float noise does not change the hash.
            let q = if x == 0.0 || !x.is_finite() { 0 } else { (x * 1e9 / 10f64.powf(x.abs().log10().floor())).round() as i64 ^ (x.abs().log10().floor() as i64) << 40 };
            h = (h ^ q as u64).wrapping_mul(0x100000001b3);
        }
    }
    Complex64::new(1.0 + (h >> 11) as f64 / (1u64 << 53) as f64, 0.0)
}

/// Numeric value at the point given by `env` (`None` when undefined).
pub fn numeric(e: &Expr, env: &Env, budget: &mut Budget) -> Result<Option<Complex64>, MathError> {
    budget.charge(1)?;
    let r = match e {
        Expr::Num(r) | Expr::Dec(r) => to_c(r),
        Expr::Sym(s) => match env.vars.iter().find(|(n, _, _)| n == s) {
            Some((_, _, c)) => *c,
            None => return Ok(None),
        },
        Expr::Const(c) => match c {
            Const::Pi => Complex64::new(std::f64::consts::PI, 0.0),
            Const::E => Complex64::new(std::f64::consts::E, 0.0),
            Const::I => Complex64::new(0.0, 1.0),
            Const::Inf => Complex64::new(f64::INFINITY, 0.0),
        },
        Expr::Add(v) => {
            let mut acc = Complex64::new(0.0, 0.0);
            for x in v {
                let Some(y) = numeric(x, env, budget)? else { return Ok(None) };
                acc += y;
            }
            acc
        }
        Expr::Mul(v) => {
            let mut acc = Complex64::new(1.0, 0.0);
            for x in v {
                let Some(y) = numeric(x, env, budget)? else { return Ok(None) };
                acc *= y;
            }
            acc
        }
        Expr::Neg(a) => match numeric(a, env, budget)? {
            Some(x) => -x,
            None => return Ok(None),
        },
        Expr::Div(a, b) => {
            let (Some(x), Some(y)) = (numeric(a, env, budget)?, numeric(b, env, budget)?) else { return Ok(None) };
            if y.norm() == 0.0 {
                return Ok(None);
            }
            x / y
        }
        Expr::Percent(a) => match numeric(a, env, budget)? {
            Some(x) => x / 100.0,
            None => return Ok(None),
        },
        Expr::Pow(a, b) => {
            let (Some(x), Some(y)) = (numeric(a, env, budget)?, numeric(b, env, budget)?) else { return Ok(None) };
            cpow(x, y)
        }
        Expr::Root(a, n) => {
            let (Some(x), Some(k)) = (numeric(a, env, budget)?, numeric(n, env, budget)?) else { return Ok(None) };
            if k.im == 0.0 && k.re != 0.0 {
                // Real odd roots of negative reals stay real.
                if x.im == 0.0 && x.re < 0.0 && (k.re.round() == k.re) && (k.re as i64) % 2 != 0 {
                    Complex64::new(-(-x.re).powf(1.0 / k.re), 0.0)
                } else if x.im == 0.0 && x.re >= 0.0 {
                    Complex64::new(x.re.powf(1.0 / k.re), 0.0)
                } else {
                    x.powc(Complex64::new(1.0, 0.0) / k)
                }
            } else {
                return Ok(None);
            }
        }
        Expr::Factorial(a) => {
            let Some(x) = numeric(a, env, budget)? else { return Ok(None) };
            if x.im != 0.0 || x.re < 0.0 || x.re > 170.0 || x.re.fract() != 0.0 {
                return Ok(None);
            }
            let mut acc = 1.0;
            for k in 2..=(x.re as u64) {
                acc *= k as f64;
            }
            Complex64::new(acc, 0.0)
        }
        Expr::Func(name, args) => {
            let mut vals = Vec::with_capacity(args.len());
            for a in args {
                match a {
                    // Sum/limit bounds may be relations or empty; evaluate what we can.
                    Expr::Text(_) => vals.push(Complex64::new(0.0, 0.0)),
                    Expr::Rel(parts, _) => {
                        for p in parts {
                            match numeric(p, env, budget)? {
                                Some(v) => vals.push(v),
                                None => vals.push(Complex64::new(f64::NAN, 0.0)),
                            }
                        }
                    }
                    _ => match numeric(a, env, budget)? {
                        Some(v) => vals.push(v),
                        None => return Ok(None),
                    },
                }
            }
            match func_numeric(name, &vals) {
                Some(v) => v,
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    if r.re.is_nan() || r.im.is_nan() {
        return Ok(None);
    }
    Ok(Some(r))
}

fn cpow(x: Complex64, y: Complex64) -> Complex64 {
    if x.im == 0.0 && y.im == 0.0 {
        if x.re >= 0.0 {
            return Complex64::new(x.re.powf(y.re), 0.0);
        }
        if y.re.fract() == 0.0 {
            return Complex64::new(x.re.powf(y.re), 0.0);
        }
    }
    if x.norm() == 0.0 {
        return Complex64::new(0.0, 0.0);
    }
    x.powc(y)
}

fn func_numeric(name: &str, v: &[Complex64]) -> Option<Complex64> {
    let one = Complex64::new(1.0, 0.0);
    Some(match (name, v) {
        ("sin", [x]) => x.sin(),
        ("cos", [x]) => x.cos(),
        ("tan", [x]) => x.tan(),
        ("sec", [x]) => one / x.cos(),
        ("csc", [x]) => one / x.sin(),
        ("cot", [x]) => one / x.tan(),
        ("arcsin", [x]) => x.asin(),
        ("arccos", [x]) => x.acos(),
        ("arctan", [x]) => x.atan(),
        ("arccot", [x]) => (one / *x).atan(),
        ("sinh", [x]) => x.sinh(),
        ("cosh", [x]) => x.cosh(),
        ("tanh", [x]) => x.tanh(),
        ("ln", [x]) => x.ln(),
        ("log", [x]) => x.ln(),
        ("log", [x, b]) | ("ln", [x, b]) => x.ln() / b.ln(),
        ("lg", [x]) => x.log10(),
        ("exp", [x]) => x.exp(),
        ("abs", [x]) => Complex64::new(x.norm(), 0.0),
        ("floor", [x]) if x.im == 0.0 => Complex64::new(x.re.floor(), 0.0),
        ("ceil", [x]) if x.im == 0.0 => Complex64::new(x.re.ceil(), 0.0),
        _ => opaque_func(name, v),
    })
}
