//! The cost budget that bounds every verification call.
//!
//! Every parse step, arithmetic operation and evaluation point is charged to a
//! counter; big-number operations are charged by their digit count. When the
//! counter runs out the call stops with [`MathError::Budget`] — no signals, no
//! watchdog threads. Exponentiation is refused *before* it is computed when the
//! estimated result size exceeds [`Budget::max_digits`].

use super::MathError;

/// Limits for one verification call.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Remaining abstract operations.
    pub ops_left: u64,
    /// Largest number of decimal digits an exact intermediate result may have.
    pub max_digits: u64,
}

impl Budget {
    pub fn new(ops: u64, max_digits: u64) -> Self {
        Budget { ops_left: ops, max_digits }
    }

    /// Charge `n` operations.
    #[inline]
    pub fn charge(&mut self, n: u64) -> Result<(), MathError> {
        if self.ops_left < n {
            self.ops_left = 0;
            return Err(MathError::Budget);
        }
        self.ops_left -= n;
        Ok(())
    }
}
