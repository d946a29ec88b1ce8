//! Requests, sampling parameters and completions.

use serde::{Deserialize, Deserializer, Serialize};

/// How to sample one request's completions. Key names follow vLLM and TRL, so recipes can embed it:
///
/// ```toml
/// [stage.sampling]
/// temperature = 1.0
/// top_p = 0.95
/// max_tokens = 1024
/// stop = ["</answer>"]
/// seed = 0
/// ```
///
/// Filters apply in this order: temperature, top-k, top-p (on the distribution left by top-k), min-p.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature. `0` is greedy decoding (argmax). Default 1.0.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches `top_p`
    /// (Holtzman et al. 2019). `1.0` (default) keeps all.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `0` or `-1` (default 0) keeps all.
    pub top_k: i64,
    /// Drop tokens whose probability is below `min_p` times the most likely token's (Nguyen et al. 2024).
    /// `0.0` (default) keeps all.
    pub min_p: f32,
    /// Most tokens to generate per sample (alias `max_tokens`). Default 256.
    #[serde(alias = "max_tokens")]
    pub max_new_tokens: usize,
    /// Token ids that end a sample (kept as its last token), in addition to the engine's end-of-sequence ids.
    pub stop_token_ids: Vec<i64>,
    /// Strings that end a sample (alias `stop`; a string or a list). The text is cut before the match; the
    /// token ids end with the token that completed it. Needs a decoder ([`crate::Engine::set_decoder`]).
    #[serde(alias = "stop", deserialize_with = "one_or_many")]
    pub stop_strings: Vec<String>,
    /// Seed of this request's samples. Sample `j` of a request draws its token at step `t` from a uniform that
    /// depends only on (`seed`, `j`, `t`). Unset: derived from the engine seed and the request's position.
    pub seed: Option<u64>,
    /// Keep generating past the engine's end-of-sequence ids (benchmarks, fixed-length sampling).
    /// Explicit `stop_token_ids` and `stop_strings` still apply.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_new_tokens: 256,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: None,
            ignore_eos: false,
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl SamplingParams {
    /// Greedy decoding with at most `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams { temperature: 0.0, max_new_tokens, ..Default::default() }
    }

    /// Whether these parameters always pick the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks ranges; the message names the field and what was expected.
    pub fn validate(&self, vocab_size: i64) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < -1 {
            return Err(format!("top_k must be >= 1, or 0 / -1 for no limit, got {}", self.top_k));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if let Some(&t) = self.stop_token_ids.iter().find(|&&t| t < 0 || t >= vocab_size) {
            return Err(format!("stop_token_ids: {t} is outside the vocabulary (0..{vocab_size})"));
        }
        if self.stop_strings.iter().any(|s| s.is_empty()) {
            return Err("stop_strings: empty string".into());
        }
        Ok(())
    }
}

/// One prompt to complete `n` times.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Prompt token ids (already templated).
    pub prompt_ids: Vec<i64>,
    /// Number of samples (a GRPO group); the prompt is encoded once and its cache shared by all of them.
    pub n: usize,
    /// Sampling parameters.
    pub params: SamplingParams,
}

/// Why a sample ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence or stop token id, or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One sampled completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Index of the request in the `generate` call.
    pub request_index: usize,
    /// Index of the sample within its request (0..n).
    pub sample_index: usize,
    /// Generated token ids (a stop token id, or the token completing a stop string, is the last one).
    pub token_ids: Vec<i64>,
    /// Decoded text (when the engine has a decoder), cut before a matched stop string.
    pub text: Option<String>,
    /// Log-probability of each sampled token under the distribution it was drawn from (after temperature,
    /// top-k, top-p, min-p). Greedy steps report 0 (a point mass).
    pub logprobs_sampled: Vec<f32>,
    /// Log-probability of each sampled token under the unmodified model (log-softmax of the logits, temperature
    /// 1): what the trainer's importance ratios need.
    pub logprobs_model: Vec<f32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The stop string that ended it, if one did.
    pub stop_string: Option<String>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (`token_ids.len()`).
    pub completion_tokens: usize,
    /// LongRoPE factor choice used for every position of this sample (false for other rope types). Pass it as
    /// `model::Batch::rope_long` to reproduce these log-probabilities with a full forward.
    pub rope_long: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_vllm_and_trl_key_names() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature":0.6,"top_p":0.95,"top_k":-1,"max_tokens":64,"stop":"</a>","seed":3}"#)
                .unwrap();
        assert_eq!(p.temperature, 0.6);
        assert_eq!(p.max_new_tokens, 64);
        assert_eq!(p.stop_strings, vec!["</a>".to_string()]);
        assert_eq!(p.seed, Some(3));
        assert!(p.validate(100).is_ok());
        let q: SamplingParams = serde_json::from_str(r#"{"max_new_tokens":8,"stop_strings":["a","b"],"min_p":0.1}"#).unwrap();
        assert_eq!(q.stop_strings.len(), 2);
        assert_eq!(q.temperature, 1.0);
        assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature":1}"#).is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        assert!(bad.validate(10).unwrap_err().contains("top_p"));
        let bad = SamplingParams { temperature: -1.0, ..Default::default() };
        assert!(bad.validate(10).unwrap_err().contains("temperature"));
        let bad = SamplingParams { stop_token_ids: vec![10], ..Default::default() };
        assert!(bad.validate(10).unwrap_err().contains("stop_token_ids"));
        let bad = SamplingParams { min_p: 1.5, ..Default::default() };
        assert!(bad.validate(10).unwrap_err().contains("min_p"));
    }
}
