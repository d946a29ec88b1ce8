//! Errors the engine reports for bad requests or budgets (never panics on user input).

/// What went wrong in [`crate::Engine::generate`].
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// A request or its sampling parameters are invalid (the message names the request and field).
    #[error("request {index}: {msg}")]
    InvalidRequest { index: usize, msg: String },
    /// One sequence of a request cannot fit the KV cache budget even alone.
    #[error(
        "request {index}: one sequence needs {needed} cache tokens (prompt {prompt} + max_new_tokens {max_new}) \
         but cache_budget_tokens is {budget}; raise the budget or lower max_new_tokens"
    )]
    CacheBudget { index: usize, needed: i64, prompt: usize, max_new: usize, budget: i64 },
    /// The engine configuration is invalid.
    #[error("engine config: {0}")]
    Config(String),
    /// Recording a CUDA graph failed (the engine then decodes the call again without graphs).
    #[error("CUDA graph: {0}")]
    CudaGraph(String),
    /// A tensor operation failed (out of memory, device error).
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, RolloutError>;
