//! Property test: random and adversarial strings never panic the verifier or the extractor.

use proptest::prelude::*;
use rewards::math::{extract_answer, verify, ExtractConfig, VerifyConfig};

fn latexish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "\\frac", "\\sqrt", "{", "}", "(", ")", "[", "]", "\\{", "\\}", "^", "_", "1", "23", "0.5", "x", "y", "e", "i", "\\pi", "+", "-", "*", "/", ",", ";", "=", "<", "\\le", "\\pm", "\\boxed{", "$", "$$", "\\text{", "and", " ", "\\cup", "\\infty", "%", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\", "!", "|", "\\sin", "\\log_", "9^9^9", "é", "\\left(", "\\right)", "####", "The answer is", "\\", ":",
    ]);
    prop::collection::vec(atoms, 0..40).prop_map(|v| v.concat())
}

proptest! {
    // PROPTEST_CASES=100000 for a longer run.
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(600), .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_unicode_never_panics(g in "\\PC{0,60}", p in "\\PC{0,120}") {
        let _ = verify(&g, &p, &VerifyConfig::default());
        let _ = extract_answer(&p, &ExtractConfig::default());
    }

    #[test]
    fn latex_soup_never_panics(g in latexish(), p in latexish()) {
        let v = verify(&g, &p, &VerifyConfig::default());
        // A string always matches itself once something is extracted from it.
        let s = verify(&p, &p, &VerifyConfig::default());
        if s.gold_extracted.is_some() && s.pred_extracted.is_some() && s.gold_extracted == s.pred_extracted {
            prop_assert!(s.equivalent, "{p:?} is not equivalent to itself: {s:?}");
        }
        let _ = v;
    }
}
