//! Math answer verification: extraction, parsing and equivalence.
//!
//! See `rewards/README.md` for the approach and the measured agreement.

pub mod ast;
pub mod budget;
pub mod equiv;
pub mod eval;
pub mod extract;
pub mod lex;
pub mod parse;
pub mod verify;

pub use ast::Expr;
pub use extract::{extract_answer, extract_candidates, ExtractConfig};
pub use verify::{verify, verify_batch, Verdict, VerifyConfig};

/// Errors inside the verifier (they never escape as panics; `verify` reports them in the verdict).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum MathError {
    #[error("cannot parse: {0}")]
    Parse(String),
    #[error("input too large: {0}")]
    TooLarge(String),
    #[error("cost budget exhausted")]
    Budget,
}
