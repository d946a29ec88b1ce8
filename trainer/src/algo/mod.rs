//! The algorithms, as pure functions of tensors and numbers: log-probability passes and the causal-LM loss
//! (`logprobs`), GRPO-family policy-gradient pieces — advantages, importance ratios, clipping, KL estimators,
//! loss aggregation (`policy_gradient`) — and the pairwise preference losses of DPO and its variants
//! (`preference`), and the sampler/trainer mismatch's metrics and corrections, TIS and MIS
//! (`rollout_correction`). No recipe, no checkpoint, no I/O: each is tested against its published formula.

pub mod logprobs;
pub mod policy_gradient;
pub mod preference;
pub mod rollout_correction;
#[cfg(test)]
mod testing;
