//! Behaviour of `math::verify` on the answer forms the issue lists, and its bounds on adversarial input.

use rewards::math::{verify, VerifyConfig};
use std::time::{Duration, Instant};

fn eq(g: &str, p: &str) -> bool {
    verify(g, p, &VerifyConfig::default()).equivalent
}

macro_rules! same {
    ($($g:expr, $p:expr);* $(;)?) => {$(
        let v = verify($g, $p, &VerifyConfig::default());
        assert!(v.equivalent, "expected {:?} == {:?}: {:?}", $g, $p, v);
    )*};
}
macro_rules! differ {
    ($($g:expr, $p:expr);* $(;)?) => {$(
        let v = verify($g, $p, &VerifyConfig::default());
        assert!(!v.equivalent, "expected {:?} != {:?}: {:?}", $g, $p, v);
    )*};
}

#[test]
fn numbers() {
    same! {
        "18", "The answer is \\boxed{18}.";
        "123456789012345678901234567890", "\\boxed{123456789012345678901234567890}";
        "\\frac{14}{3}", "\\boxed{\\dfrac{14}{3}}";
        "\\frac{14}{3}", "\\boxed{14/3}";
        "\\frac{5}{2}", "\\boxed{2\\frac{1}{2}}";
        "0.5", "\\boxed{\\tfrac12}";
        "1500", "\\boxed{1.5e3}";
        "1500", "\\boxed{1.5 \\times 10^{3}}";
        "#### 1,080", "so \\boxed{1080}";
        "1080", "\\boxed{1,080}";
        "50\\%", "\\boxed{50}";
        "50\\%", "\\boxed{0.5}";
        "-3", "\\boxed{-3}";
        "1024", "\\boxed{2^{10}}";
        "\\frac{1}{3}", "\\boxed{0.\\overline{3}}";
        "\\frac{1}{6}", "\\boxed{0.1\\overline{6}}";
        "\\frac{4}{33}", "\\boxed{0.\\overline{12}}";
    }
    differ! {
        "\\frac{1}{3}", "\\boxed{0.333}";
        "\\frac{1}{6}", "\\boxed{0.\\overline{16}}";
        "10^{30}", "\\boxed{10^{30}+1}";
        "18", "\\boxed{19}";
        "2", "\\boxed{\\frac{1+\\sqrt{5}}{2}}";
    }
}

#[test]
fn optional_rounding() {
    let cfg6 = VerifyConfig { float_rounding: Some(6), ..VerifyConfig::default() };
    assert!(verify("\\sqrt{17}", "4.123105625617661", &cfg6).equivalent);
    let cfg = VerifyConfig { float_rounding: Some(3), ..VerifyConfig::default() };
    assert!(verify("\\frac{1}{3}", "0.333", &cfg).equivalent);
    let cfg4 = VerifyConfig { float_rounding: Some(4), ..VerifyConfig::default() };
    assert!(!verify("\\frac{1}{3}", "0.333", &cfg4).equivalent);
}

#[test]
fn radicals_constants_functions() {
    same! {
        "2\\sqrt{2}", "\\boxed{\\sqrt{8}}";
        "3\\sqrt{13}", "\\boxed{\\sqrt{117}}";
        "\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}";
        "\\frac{\\pi}{2}", "\\boxed{0.5\\pi}";
        "-1", "\\boxed{e^{i\\pi}}";
        "3+4i", "\\boxed{4i+3}";
        "1", "\\boxed{\\sin^2 x + \\cos^2 x}";
        "3", "\\boxed{\\log_2 8}";
        "\\infty", "\\boxed{\\infty}";
        "90^\\circ", "\\boxed{90}";
        "5 \\text{ cm}", "\\boxed{5}";
        "\\sqrt[3]{27}", "\\boxed{3}";
    }
    same! {
        "\\frac{1}{2}", "\\boxed{\\sin(\\pi/6)}";
        "0.5", "\\boxed{\\sin(\\pi/6)}";
    }
    differ! {
        // A rounded decimal is not the irrational it approximates (unless float_rounding is set).
        "\\sqrt{17}", "\\boxed{4.123105625617661}";
        "\\sqrt{2}", "\\boxed{1.4142136}";
        "2\\sqrt{2}", "\\boxed{\\sqrt{6}}";
        "\\pi", "\\boxed{3.14}";
        "\\infty", "\\boxed{-\\infty}";
    }
}

#[test]
fn symbolic() {
    same! {
        "x^2-1", "\\boxed{(x-1)(x+1)}";
        "\\frac{x+2}{7}", "\\boxed{\\frac{x}{7}+\\frac{2}{7}}";
        "\\tan^2(y)+1", "\\boxed{\\sec^2(y)}";
        "(a+b)^3", "\\boxed{a^3+3a^2b+3ab^2+b^3}";
    }
    differ! {
        "x^2-1", "\\boxed{(x-1)^2}";
        "x+2n+1", "\\boxed{x+1}";
        "x", "\\boxed{y}";
    }
}

#[test]
fn structures() {
    same! {
        "\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}";
        "\\{1,2\\}", "\\boxed{\\{2,1\\}}";
        "1, 2", "\\boxed{2, 1}";
        "x = 1, x = 2", "\\boxed{2} and \\boxed{1}";
        "\\pm 2", "\\boxed{-2, 2}";
        "[0,1)", "\\boxed{[0,1)}";
        "(-\\infty, 0) \\cup (1, \\infty)", "\\boxed{(1,\\infty)\\cup(-\\infty,0)}";
        "\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}", "\\boxed{\\begin{bmatrix}1 & 2\\\\3 & 4\\end{bmatrix}}";
        "y = 2x + 1", "\\boxed{2x - y + 1 = 0}";
        "\\begin{pmatrix} 1 \\\\ -2 \\\\ \\frac{1}{2} \\end{pmatrix}", "\\boxed{(1, -2, 0.5)}";
        "\\langle 1, 2 \\rangle", "\\boxed{(1,2)}";
        "(-\\infty, \\infty)", "\\boxed{\\mathbb{R}}";
        "x \\in \\mathbb{R}", "\\boxed{(-\\infty,\\infty)}";
        "x \\geq 5", "\\boxed{5 \\le x}";
        "x > 2", "\\boxed{(2, \\infty)}";
        "\\text{(C)}", "\\boxed{C}";
        "\\text{Evelyn}", "\\boxed{\\text{Evelyn}}";
        "\\text{(B)}", "The correct option is **(B)**.";
        "C", "(C) 12 is the only value that works.";
    }
    differ! {
        "(1, 2)", "\\boxed{(2, 1)}";
        "[0,1)", "\\boxed{(0,1)}";
        "[0,1]", "\\boxed{[0,1)}";
        "\\pm 2", "\\boxed{2}";
        "\\begin{pmatrix}1 & 2\\\\3 & 4\\end{pmatrix}", "\\boxed{\\begin{pmatrix}1 & 2\\\\3 & 5\\end{pmatrix}}";
        "x > 5", "\\boxed{x < 5}";
        "\\text{(C)}", "\\boxed{D}";
        "\\text{(B)}", "Option B looks right at first, but the correct option is **(D)**.";
        "1, 2, 3", "\\boxed{1, 2}";
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{(2, 1)}";
    }
}

#[test]
fn verdict_reports_extracted_and_normalized_forms() {
    let v = verify("#### 1,080", "Work... so the total is \\boxed{1080}.", &VerifyConfig::default());
    assert!(v.equivalent);
    assert_eq!(v.gold_extracted.as_deref(), Some("1,080"));
    assert_eq!(v.pred_extracted.as_deref(), Some("1080"));
    assert_eq!(v.gold_normalized.as_deref(), Some("1080"));
    let md = verify("42", "<think>6*7 = 42, or 41?</think>\n\n**Final Answer:** 42", &VerifyConfig::default());
    assert!(md.equivalent);
    assert_eq!(md.pred_source, Some(rewards::math::extract::Source::Phrase));
    let md = verify("42", "The final answer is **42**.", &VerifyConfig::default());
    assert_eq!(md.pred_extracted.as_deref(), Some("42"));
    let none = verify("5", "I could not solve it.", &VerifyConfig::default());
    assert!(!none.equivalent);
    assert!(none.pred_extracted.is_none());
}

#[test]
fn batch_verification_keeps_order() {
    let pairs: Vec<(String, String)> = (0..200).map(|i| (format!("{}", i), format!("\\boxed{{{}}}", if i % 3 == 0 { i } else { i + 1 }))).collect();
    let v = rewards::math::verify_batch(&pairs, &VerifyConfig::default());
    for (i, x) in v.iter().enumerate() {
        assert_eq!(x.equivalent, i % 3 == 0, "pair {i}");
    }
}

fn bounded(g: &str, p: &str) -> (bool, Duration) {
    let t = Instant::now();
    let v = verify(g, p, &VerifyConfig::default());
    (v.equivalent, t.elapsed())
}

#[test]
fn adversarial_inputs_are_bounded() {
    let limit = Duration::from_millis(1500); // generous: debug build on a shared 2-core machine
    let (e, t) = bounded("1", "\\boxed{9^{9^{9^{9}}}}");
    assert!(!e && t < limit, "{t:?}");
    let (e, t) = bounded("1", "\\boxed{9^9^9^9}");
    assert!(!e && t < limit, "{t:?}");
    let (e, t) = bounded("(x+1)^{1000000}", "\\boxed{(x+2)^{1000000}}");
    assert!(!e && t < limit, "{t:?}");
    let big = "7".repeat(1_000_000);
    let (e, t) = bounded(&big, &format!("\\boxed{{{big}}}"));
    assert!(e && t < limit, "identical million-digit strings match: {t:?}");
    let big2 = format!("{}8", "7".repeat(999_999));
    let (e, t) = bounded(&big, &format!("\\boxed{{{big2}}}"));
    assert!(!e && t < limit, "{t:?}");
    let nested = format!("\\boxed{{{}1{}}}", "{".repeat(100_000), "}".repeat(100_000));
    // Too deep for the parser; the last-number fallback still reads the 1 inside.
    let (e, t) = bounded("1", &nested);
    assert!(e && t < limit, "{t:?}");
    let (e, t) = bounded("2", &nested);
    assert!(!e && t < limit, "{t:?}");
    let unclosed = format!("\\boxed{{{}", "{".repeat(100_000));
    let (_, t) = bounded("1", &unclosed);
    assert!(t < limit, "{t:?}");
    let parens = format!("{}1{}", "(".repeat(50_000), ")".repeat(50_000));
    let (_, t) = bounded("1", &parens);
    assert!(t < limit, "{t:?}");
    let (_, t) = bounded("1", &"\\frac{1}{".repeat(20_000));
    assert!(t < limit, "{t:?}");
    let (e, t) = bounded("1", "\\boxed{1000000!}");
    assert!(!e && t < limit, "{t:?}");
    let (_, t) = bounded(&"x+".repeat(20_000), &"x*".repeat(20_000));
    assert!(t < limit, "{t:?}");
}

#[test]
fn garbage_does_not_panic() {
    for s in ["", "\\", "$", "$$", "\\boxed{", "}}}}", "\\frac", "\\sqrt[", "^^^", "1/0", "0^{-1}", "\\begin{pmatrix}", "((((", "\u{0}\u{1}", "é\\boxed{ü}", "\\left(\\right)", "1e99999", "0.0.0", "#### ", "\\boxed 5 \\boxed"] {
        let _ = verify(s, s, &VerifyConfig::default());
        let _ = verify("1", s, &VerifyConfig::default());
        let _ = eq(s, "1");
    }
}
