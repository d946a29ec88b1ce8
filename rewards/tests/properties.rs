//! Property tests of equivalence on generated answers with known truth.

use proptest::prelude::*;
use rewards::math::{verify, VerifyConfig};

fn eq(g: &str, p: &str) -> bool {
    verify(g, p, &VerifyConfig::default()).equivalent
}

fn signed(v: i64) -> String {
    if v < 0 {
        format!("- {}", -v)
    } else {
        format!("+ {v}")
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(300), .. ProptestConfig::default() })]

    #[test]
    fn scaled_fractions_are_equal_and_shifted_ones_are_not(a in -1_000_000i64..1_000_000, b in 1i64..1_000_000, k in 1i64..1000) {
        let g = format!("\\frac{{{a}}}{{{b}}}");
        let ok = eq(&g, &format!("\\boxed{{\\dfrac{{{}}}{{{}}}}}", a * k, b * k));
        prop_assert!(ok);
        let ok = eq(&g, &format!("so it is {}/{}", a * k, b * k));
        prop_assert!(ok);
        let ok = !eq(&g, &format!("\\boxed{{\\frac{{{}}}{{{}}}}}", a * k + 1, b * k));
        prop_assert!(ok);
    }

    #[test]
    fn decimals_equal_their_fractions_exactly(n in -10_000_000i64..10_000_000, places in 1u32..7) {
        let den = 10i64.pow(places);
        let int = n / den;
        let frac = (n % den).abs();
        let sign = if n < 0 && int == 0 { "-" } else { "" };
        let dec = format!("{sign}{int}.{frac:0width$}", width = places as usize);
        let ok = eq(&format!("\\frac{{{n}}}{{{den}}}"), &format!("\\boxed{{{dec}}}"));
        prop_assert!(ok, "{} vs {}", n, dec);
        // One unit in the last place off is wrong: no float tolerance by default.
        let ok = !eq(&format!("\\frac{{{}}}{{{den}}}", n + 1), &format!("\\boxed{{{dec}}}"));
        prop_assert!(ok);
    }

    #[test]
    fn factored_and_expanded_quadratics(r1 in -50i64..50, r2 in -50i64..50, c in 1i64..9) {
        let factored = format!("{c}(x {})(x {})", signed(-r1), signed(-r2));
        let expanded = format!("{c}x^2 {}x {}", signed(-c * (r1 + r2)), signed(c * r1 * r2));
        let wrong = format!("{c}x^2 {}x {}", signed(-c * (r1 + r2)), signed(c * r1 * r2 + 1));
        let ok = eq(&factored, &format!("\\boxed{{{expanded}}}"));
        prop_assert!(ok, "{} vs {}", factored, expanded);
        let ok = !eq(&factored, &format!("\\boxed{{{wrong}}}"));
        prop_assert!(ok);
    }

    #[test]
    fn sets_ignore_order_tuples_do_not(v in prop::collection::vec(-100i64..100, 2..6)) {
        let mut rev = v.clone();
        rev.reverse();
        let join = |x: &[i64]| x.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
        let ok = eq(&format!("\\{{{}\\}}", join(&v)), &format!("\\boxed{{\\{{{}\\}}}}", join(&rev)));
        prop_assert!(ok);
        let ok = eq(&format!("({})", join(&v)), &format!("\\boxed{{({})}}", join(&rev)));
        prop_assert_eq!(ok, v == rev);
    }

    #[test]
    fn big_integers_are_exact(a in "[1-9][0-9]{20,80}") {
        let ok = eq(&a, &format!("\\boxed{{{a}}}"));
        prop_assert!(ok);
        let mut b = a.clone().into_bytes();
        let last = b.len() - 1;
        b[last] = if b[last] == b'9' { b'8' } else { b[last] + 1 };
        let b = String::from_utf8(b).unwrap();
        let ok = !eq(&a, &format!("\\boxed{{{b}}}"));
        prop_assert!(ok);
    }
}
