//! Tokenization with loss labels, truncation, rayon parallelism and an on-disk cache.
//!
//! Labels follow the Hugging Face convention: aligned with `input_ids` (not shifted; the trainer shifts), with
//! `-100` where no loss is taken. With a chat template, the loss span of an assistant turn starts right after
//! the generation prompt that precedes it (`render(messages[..i], add_generation_prompt = true)`, which must
//! be a prefix of the full render) and ends after the turn's content plus its end-of-turn token
//! (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, the template's `eos_token`, …), so the model learns to stop. Any
//! template-inserted text between the two (Qwen3's `<think>\n\n</think>\n\n`) is part of the span.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::error::{DataError, Result};
use crate::record::{Message, Record};
use crate::template::ChatTemplate;

/// Byte offsets `(start, end)` of each token in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// Label value for positions without loss.
pub const IGNORE_INDEX: i64 = -100;

/// Strings that end a turn in the supported templates; the one right after an assistant turn's content joins
/// its loss span.
const END_OF_TURN: [&str; 7] = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "</s>"];

/// A `tokenizer.json` (Hugging Face fast-tokenizer format) with the special tokens the stages need.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    hash: String,
    /// End-of-sequence token string (from `tokenizer_config.json`), if known.
    pub eos_token: Option<String>,
    /// Its id.
    pub eos_id: Option<u32>,
    /// Beginning-of-sequence id, if the config names one.
    pub bos_id: Option<u32>,
    /// Padding id: `pad_token`, else the eos id, else 0.
    pub pad_id: u32,
    /// The longest token string of the vocabulary in bytes (at least the bytes any one token covers), so that
    /// a text of more than `n × max_token_bytes` bytes has more than `n` tokens whatever it holds.
    pub max_token_bytes: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("eos", &self.eos_token)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn cfg_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` bytes; `config` is the parsed `tokenizer_config.json`, if any.
    pub fn from_bytes(bytes: &[u8], config: Option<&serde_json::Value>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| DataError::Tokenizer(e.to_string()))?;
        let hash = hex(&Sha256::digest(bytes));
        let tok = |k: &str| config.and_then(|c| cfg_token(c, k));
        let eos_token = tok("eos_token");
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let bos_id = tok("bos_token").and_then(|t| inner.token_to_id(&t));
        let pad_id = tok("pad_token").and_then(|t| inner.token_to_id(&t)).or(eos_id).unwrap_or(0);
        let max_token_bytes = inner.get_vocab(true).keys().map(|k| k.len()).max().unwrap_or(1).max(1);
        Ok(Tokenizer { inner, hash, eos_token, eos_id, bos_id, pad_id, max_token_bytes })
    }

    /// Loads a `tokenizer.json` file (and the `tokenizer_config.json` next to it, when present).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let cfg = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => Some(serde_json::from_str(&t).map_err(|e| {
                DataError::Tokenizer(format!("{}: invalid JSON: {e}", cfg_path.display()))
            })?),
            Err(_) => None,
        };
        Self::from_bytes(&bytes, cfg.as_ref())
            .map_err(|e| DataError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Loads `dir/tokenizer.json` and, when `dir/tokenizer_config.json` has one, its chat template.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<(Self, Option<ChatTemplate>)> {
        let dir = dir.as_ref();
        let tok = Self::from_file(dir.join("tokenizer.json"))?;
        let cfg = dir.join("tokenizer_config.json");
        let has_template = cfg.is_file()
            && (dir.join("chat_template.jinja").is_file()
                || std::fs::read_to_string(&cfg)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|v| v.get("chat_template").is_some_and(|t| !t.is_null())));
        // A template that is present but does not compile is an error, not a silent `None`.
        let template = if has_template { Some(ChatTemplate::from_tokenizer_config(&cfg)?) } else { None };
        Ok((tok, template))
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// SHA-256 of the `tokenizer.json` bytes (part of cache keys).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end generation: the eos id plus every end-of-turn token of the supported templates that exists in
    /// this vocabulary (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, …), sorted and deduplicated.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = END_OF_TURN.iter().filter_map(|t| self.inner.token_to_id(t)).collect();
        v.extend(self.eos_id);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS); text
    /// rendered by a chat template already has its special tokens, so pass `false` for it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(|e| DataError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids with byte offsets into `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Offsets)> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| DataError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| DataError::Tokenizer(e.to_string()))
    }
}

/// Which tokens carry the SFT loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// Every assistant turn (TRL's `assistant_only_loss`).
    #[default]
    AllAssistant,
    /// Only the last assistant turn.
    LastTurn,
    /// Only the completion of a prompt-completion record (TRL's `completion_only_loss`); for conversations, the
    /// last assistant turn.
    Completion,
    /// Every token (mid-training on raw text, continued pre-training).
    All,
}

/// What to do with an example longer than `max_length`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `max_length` tokens.
    #[default]
    Right,
    /// Keep the last `max_length` tokens.
    Left,
    /// Drop the example.
    Drop,
}

/// Tokenization settings (`[stage.tokenize]` in a recipe).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// Maximum tokens per example (TRL's `max_length`; default 2048).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Which tokens carry the loss (default `all_assistant`).
    #[serde(default)]
    pub loss_on: LossOn,
    /// Over-long examples: `right` (keep the start, default), `left` (keep the end) or `drop`.
    #[serde(default)]
    pub truncation: Truncation,
    /// Without a chat template: append the eos token to the completion (default true).
    #[serde(default = "default_true")]
    pub add_eos: bool,
    /// Extra template variables, e.g. `{ enable_thinking = false }`.
    #[serde(default)]
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
}

fn default_max_length() -> usize {
    2048
}
fn default_true() -> bool {
    true
}

impl Default for TokenizeConfig {
    fn default() -> Self {
        TokenizeConfig {
            max_length: default_max_length(),
            loss_on: LossOn::default(),
            truncation: Truncation::default(),
            add_eos: true,
            template_kwargs: Default::default(),
        }
    }
}

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Same length; the token id where the loss is taken, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

impl TokenizedExample {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Number of positions with loss.
    pub fn num_loss_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Counters from tokenizing a dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeStats {
    /// Records read.
    pub records: usize,
    /// Examples kept.
    pub examples: usize,
    /// Kept after truncation.
    pub truncated: usize,
    /// Dropped as too long (`truncation = "drop"`).
    pub dropped_too_long: usize,
    /// Dropped because no loss token was left.
    pub dropped_no_loss: usize,
    /// Tokens in kept examples.
    pub tokens: usize,
    /// Loss tokens in kept examples.
    pub loss_tokens: usize,
}

/// Why an example was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Longer than `max_length` under `truncation = "drop"`.
    TooLong,
    /// No loss token left.
    NoLoss,
}

/// A tokenized example or why it was dropped; `truncated` says whether it was cut.
pub type Outcome = std::result::Result<(TokenizedExample, bool), Dropped>;

fn apply_truncation(mut ex: TokenizedExample, cfg: &TokenizeConfig) -> Outcome {
    let mut truncated = false;
    if ex.len() > cfg.max_length {
        match cfg.truncation {
            Truncation::Drop => return Err(Dropped::TooLong),
            Truncation::Right => {
                ex.input_ids.truncate(cfg.max_length);
                ex.labels.truncate(cfg.max_length);
            }
            Truncation::Left => {
                let cut = ex.len() - cfg.max_length;
                ex.input_ids.drain(..cut);
                ex.labels.drain(..cut);
            }
        }
        truncated = true;
    }
    if ex.num_loss_tokens() == 0 {
        return Err(Dropped::NoLoss);
    }
    Ok((ex, truncated))
}

/// Encodes `text` with offsets, reading only as much of a text far over `max_length` tokens as truncation
/// keeps: a text of more than 2 × max_length × `max_token_bytes` bytes surely has more than max_length tokens,
/// so `drop` judges it without tokenizing (returns `None`), `right` tokenizes a prefix of that many bytes and
/// `left` a suffix (offsets still index `text`). The first (last) max_length tokens of the cut text are those
/// of the whole unless one pre-token (a run without spaces) straddles the cut. A 50 MB row costs a string
/// scan, not gigabytes of tokenizer state.
fn encode_bounded(tok: &Tokenizer, text: &str, cfg: &TokenizeConfig, add_special: bool) -> Result<Option<(Vec<u32>, Offsets)>> {
    let bound = cfg.max_length.saturating_mul(tok.max_token_bytes).saturating_mul(2).max(1);
    if text.len() <= bound {
        return tok.encode_with_offsets(text, add_special).map(Some);
    }
    match cfg.truncation {
        Truncation::Drop => Ok(None),
        Truncation::Right => {
            let mut cut = bound;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            tok.encode_with_offsets(&text[..cut], add_special).map(Some)
        }
        Truncation::Left => {
            let mut start = text.len() - bound;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            let (ids, offsets) = tok.encode_with_offsets(&text[start..], add_special)?;
            Ok(Some((ids, offsets.into_iter().map(|(a, b)| (a + start, b + start)).collect())))
        }
    }
}

/// The byte span of `full` that assistant turn `i` (its content and end-of-turn token) occupies.
fn assistant_span(template: &ChatTemplate, messages: &[Message], i: usize, full: &str, cfg: &TokenizeConfig) -> Result<(usize, usize)> {
    let opts = crate::template::RenderOptions { add_generation_prompt: true, tools: None, extra: cfg.template_kwargs.clone() };
    let prefix = template.render_with(&messages[..i], &opts)?;
    if !full.starts_with(&prefix) {
        return Err(DataError::Template(format!(
            "the render of the turns before assistant turn {i} (with the generation prompt) is not a prefix of the \
             whole conversation's render, so its loss span cannot be located"
        )));
    }
    let start = prefix.len();
    let content = &messages[i].content;
    let after_think = content.rsplit_once("</think>").map(|(_, c)| c.trim()).unwrap_or(content.trim());
    let candidates = [content.as_str(), content.trim(), after_think];
    let rest = &full[start..];
    let eos = template.special_token("eos_token");
    let markers = || END_OF_TURN.iter().copied().chain(eos);
    // Usual case: the turn runs to the first end-of-turn token, and what it holds contains the content.
    if let Some((p, mlen)) = markers().filter_map(|m| rest.find(m).map(|p| (p, m.len()))).min() {
        let region = &rest[..p];
        if content.trim().is_empty() || candidates.iter().any(|c| !c.is_empty() && region.contains(c)) {
            return Ok((start, start + p + mlen));
        }
    }
    // No end-of-turn token (or the content contains one): locate the content itself.
    let (pos, len) = candidates
        .iter()
        .filter(|c| !c.is_empty())
        .find_map(|c| rest.find(*c).map(|p| (p, c.len())))
        .or_else(|| if content.trim().is_empty() { Some((0, 0)) } else { None })
        .ok_or_else(|| {
            DataError::Template(format!(
                "assistant turn {i}'s content does not appear in the render (the template rewrites it); use \
                 loss_on = \"last_turn\""
            ))
        })?;
    let mut end = start + pos + len;
    // The end-of-turn token joins the span, also when the template left whitespace before it.
    let tail = &full[end..];
    let ws = tail.len() - tail.trim_start().len();
    if let Some(m) = markers().find(|m| tail[ws..].starts_with(m)) {
        end += ws + m.len();
    }
    Ok((start, end))
}

fn label_spans(ids: &[u32], offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<i64> {
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(s, _))| {
            if spans.iter().any(|&(a, b)| s >= a && s < b) {
                id as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect()
}

/// Tokenizes a conversation with its chat template, labelling the assistant turns chosen by `cfg.loss_on`.
/// `None` (with the reason) when truncation or masking leaves nothing to learn from.
pub fn tokenize_conversation(tok: &Tokenizer, template: &ChatTemplate, messages: &[Message], cfg: &TokenizeConfig) -> Result<Outcome> {
    let opts = crate::template::RenderOptions { add_generation_prompt: false, tools: None, extra: cfg.template_kwargs.clone() };
    let full = template.render_with(messages, &opts)?;
    let Some((ids, offsets)) = encode_bounded(tok, &full, cfg, false)? else { return Ok(Err(Dropped::TooLong)) };
    let assistant: Vec<usize> = messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
    let turns: Vec<usize> = match cfg.loss_on {
        LossOn::All => {
            let labels = ids.iter().map(|&i| i as i64).collect();
            return Ok(apply_truncation(TokenizedExample { input_ids: ids, labels }, cfg));
        }
        LossOn::AllAssistant => assistant,
        LossOn::LastTurn | LossOn::Completion => assistant.last().copied().into_iter().collect(),
    };
    let spans = turns.iter().map(|&i| assistant_span(template, messages, i, &full, cfg)).collect::<Result<Vec<_>>>()?;
    let labels = label_spans(&ids, &offsets, &spans);
    Ok(apply_truncation(TokenizedExample { input_ids: ids, labels }, cfg))
}

/// Tokenizes a prompt and a completion. With a template: rendered as `prompt + [assistant: completion]` and
/// labelled like the last turn. Without one: the prompt's text (contents joined by newlines) tokenized with the
/// tokenizer's special tokens, then the completion (and eos when `add_eos`) tokenized alone and labelled.
pub fn tokenize_prompt_completion(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    prompt: &[Message],
    completion: &str,
    cfg: &TokenizeConfig,
) -> Result<Outcome> {
    if let Some(t) = template {
        let mut msgs = prompt.to_vec();
        msgs.push(Message::assistant(completion));
        let mut c = cfg.clone();
        if c.loss_on != LossOn::All {
            c.loss_on = LossOn::LastTurn;
        }
        return tokenize_conversation(tok, t, &msgs, &c);
    }
    let text: Vec<&str> = prompt.iter().map(|m| m.content.as_str()).collect();
    let bounded = |t: &str, special: bool| -> Result<Option<Vec<u32>>> { Ok(encode_bounded(tok, t, cfg, special)?.map(|(ids, _)| ids)) };
    let (Some(p), Some(mut c)) = (bounded(&text.join("\n"), true)?, bounded(completion, false)?) else { return Ok(Err(Dropped::TooLong)) };
    if cfg.add_eos {
        c.extend(tok.eos_id);
    }
    let mut labels: Vec<i64> = if cfg.loss_on == LossOn::All { p.iter().map(|&i| i as i64).collect() } else { vec![IGNORE_INDEX; p.len()] };
    labels.extend(c.iter().map(|&i| i as i64));
    let mut input_ids = p;
    input_ids.extend(c);
    Ok(apply_truncation(TokenizedExample { input_ids, labels }, cfg))
}

/// Token ids of a prompt ready for generation (rendered with `add_generation_prompt = true`).
pub fn tokenize_prompt(tok: &Tokenizer, template: Option<&ChatTemplate>, prompt: &[Message], cfg: &TokenizeConfig) -> Result<Vec<u32>> {
    match template {
        Some(t) => {
            let opts = crate::template::RenderOptions { add_generation_prompt: true, tools: None, extra: cfg.template_kwargs.clone() };
            tok.encode(&t.render_with(prompt, &opts)?, false)
        }
        None => {
            let text: Vec<&str> = prompt.iter().map(|m| m.content.as_str()).collect();
            tok.encode(&text.join("\n"), true)
        }
    }
}

/// A tokenized preference pair: `chosen` and `rejected` share the prompt tokens; labels cover the replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedPair {
    /// Prompt + chosen reply.
    pub chosen: TokenizedExample,
    /// Prompt + rejected reply.
    pub rejected: TokenizedExample,
}

/// Tokenizes a preference pair; `None` when either side is dropped.
pub fn tokenize_preference(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    prompt: &[Message],
    chosen: &str,
    rejected: &str,
    cfg: &TokenizeConfig,
) -> Result<Option<TokenizedPair>> {
    let c = tokenize_prompt_completion(tok, template, prompt, chosen, cfg)?;
    let r = tokenize_prompt_completion(tok, template, prompt, rejected, cfg)?;
    Ok(match (c, r) {
        (Ok((chosen, _)), Ok((rejected, _))) => Some(TokenizedPair { chosen, rejected }),
        _ => None,
    })
}

/// Tokenizes one SFT record (conversation, prompt-completion, or prompt-answer with a solution).
pub fn tokenize_record(tok: &Tokenizer, template: Option<&ChatTemplate>, record: &Record, cfg: &TokenizeConfig) -> Result<Outcome> {
    match record {
        Record::Conversation { messages } => {
            let t = template.ok_or_else(|| DataError::Config("conversations need a chat template".into()))?;
            tokenize_conversation(tok, t, messages, cfg)
        }
        Record::PromptCompletion { prompt, completion } => tokenize_prompt_completion(tok, template, prompt, completion, cfg),
        Record::PromptAnswer { prompt, solution: Some(s), .. } => tokenize_prompt_completion(tok, template, prompt, s, cfg),
        Record::PromptAnswer { solution: None, .. } => Err(DataError::Config(
            "a prompt-answer record without a `solution` column has nothing to train on with SFT".into(),
        )),
        Record::Preference { .. } => Err(DataError::Config("preference pairs are tokenized with tokenize_preference".into())),
    }
}

/// Tokenizes records in parallel on the current rayon pool, in order.
pub fn tokenize_records(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    records: &[Record],
    cfg: &TokenizeConfig,
) -> Result<(Vec<TokenizedExample>, TokenizeStats)> {
    let outcomes: Vec<Outcome> = records
        .par_iter()
        .enumerate()
        .map(|(i, r)| tokenize_record(tok, template, r, cfg).map_err(|e| DataError::Record { index: i + 1, source: Box::new(e) }))
        .collect::<Result<_>>()?;
    let mut stats = TokenizeStats { records: records.len(), ..Default::default() };
    let mut out = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        match o {
            Ok((ex, truncated)) => {
                stats.truncated += truncated as usize;
                stats.tokens += ex.len();
                stats.loss_tokens += ex.num_loss_tokens();
                out.push(ex);
            }
            Err(Dropped::TooLong) => stats.dropped_too_long += 1,
            Err(Dropped::NoLoss) => stats.dropped_no_loss += 1,
        }
    }
    stats.examples = out.len();
    Ok((out, stats))
}

/// Tokenizes the prompts of records for generation (RL rollouts, evaluation), in parallel, in order.
pub fn tokenize_prompts(tok: &Tokenizer, template: Option<&ChatTemplate>, records: &[Record], cfg: &TokenizeConfig) -> Result<Vec<Vec<u32>>> {
    records
        .par_iter()
        .enumerate()
        .map(|(i, r)| tokenize_prompt(tok, template, r.prompt(), cfg).map_err(|e| DataError::Record { index: i + 1, source: Box::new(e) }))
        .collect()
}

/// Tokenizes preference records in parallel, in order; pairs where either side is dropped (too long under
/// `truncation = "drop"`, or no reply token left) are left out and counted in the second value.
pub fn tokenize_preferences(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    records: &[Record],
    cfg: &TokenizeConfig,
) -> Result<(Vec<TokenizedPair>, usize)> {
    let out: Vec<Option<TokenizedPair>> = records
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            let wrap = |e| DataError::Record { index: i + 1, source: Box::new(e) };
            match r {
                Record::Preference { prompt, chosen, rejected } => {
                    tokenize_preference(tok, template, prompt, chosen, rejected, cfg).map_err(wrap)
                }
                _ => Err(wrap(DataError::Config("expected a preference record".into()))),
            }
        })
        .collect::<Result<_>>()?;
    let dropped = out.iter().filter(|p| p.is_none()).count();
    Ok((out.into_iter().flatten().collect(), dropped))
}

/// Whether a tokenized dataset came from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the cache.
    Hit,
    /// Tokenized and written to the cache.
    Miss,
    /// No cache directory given.
    Disabled,
}

/// A tokenized dataset.
#[derive(Clone, Debug)]
pub struct TokenizedDataset {
    /// The examples, in data order.
    pub examples: Vec<TokenizedExample>,
    /// Counters.
    pub stats: TokenizeStats,
    /// Whether the cache was used.
    pub cache: CacheOutcome,
    /// The cache file (when a cache directory was given).
    pub cache_path: Option<PathBuf>,
}

const CACHE_MAGIC: &[u8; 8] = b"WHETTOK1";

/// The cache key: SHA-256 over the data files' contents, the data config (minus its path), the tokenizer's
/// `tokenizer.json` hash, the template source and special tokens, and the tokenize settings.
pub fn cache_key(data: &DataConfig, tok: &Tokenizer, template: Option<&ChatTemplate>, cfg: &TokenizeConfig) -> Result<String> {
    let mut h = Sha256::new();
    h.update(CACHE_MAGIC);
    for (path, _) in crate::source::files(data)? {
        let mut f = std::fs::File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let mut fh = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| DataError::io(&path, e))?;
            if n == 0 {
                break;
            }
            fh.update(&buf[..n]);
        }
        h.update(fh.finalize());
    }
    let mut d = data.clone();
    d.path = PathBuf::new();
    h.update(serde_json::to_vec(&d).expect("config serialises"));
    h.update(tok.hash().as_bytes());
    if let Some(t) = template {
        h.update(t.source().as_bytes());
        for k in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            h.update(k.as_bytes());
            h.update(t.special_token(k).unwrap_or("\u{0}").as_bytes());
        }
    }
    h.update(serde_json::to_vec(cfg).expect("config serialises"));
    Ok(hex(&h.finalize()))
}

/// Loads the records of `data`, tokenizes them for SFT (in parallel) and caches the result under `cache_dir`
/// keyed by [`cache_key`], so that a second run reads the cache instead.
pub fn tokenize_dataset(
    data: &DataConfig,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    cfg: &TokenizeConfig,
    cache_dir: Option<&Path>,
) -> Result<TokenizedDataset> {
    let cache_path = match cache_dir {
        Some(dir) => Some(dir.join(format!("{}.tok", cache_key(data, tok, template, cfg)?))),
        None => None,
    };
    if let Some(p) = &cache_path {
        if p.is_file() {
            let (examples, stats) = read_cache(p)?;
            return Ok(TokenizedDataset { examples, stats, cache: CacheOutcome::Hit, cache_path });
        }
    }
    let records = crate::source::load_records(data)?;
    let (examples, stats) = tokenize_records(tok, template, &records, cfg)?;
    if let Some(p) = &cache_path {
        write_cache(p, &examples, &stats)?;
    }
    let cache = if cache_path.is_some() { CacheOutcome::Miss } else { CacheOutcome::Disabled };
    Ok(TokenizedDataset { examples, stats, cache, cache_path })
}

/// Writes examples atomically: magic, stats JSON length (u32 LE) and JSON, count (u64 LE), then per example its
/// length (u32), ids (u32 each) and one loss flag byte per token.
pub fn write_cache(path: &Path, examples: &[TokenizedExample], stats: &TokenizeStats) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    let mut buf: Vec<u8> = Vec::new();
    buf.extend_from_slice(CACHE_MAGIC);
    let js = serde_json::to_vec(stats).expect("stats serialise");
    buf.extend_from_slice(&(js.len() as u32).to_le_bytes());
    buf.extend_from_slice(&js);
    buf.extend_from_slice(&(examples.len() as u64).to_le_bytes());
    for ex in examples {
        buf.extend_from_slice(&(ex.len() as u32).to_le_bytes());
        for &id in &ex.input_ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        buf.extend(ex.labels.iter().map(|&l| (l != IGNORE_INDEX) as u8));
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    f.write_all(&buf).map_err(|e| DataError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

/// Reads a cache file written by [`write_cache`].
pub fn read_cache(path: &Path) -> Result<(Vec<TokenizedExample>, TokenizeStats)> {
    let buf = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bad = |what: &str| DataError::Tokenizer(format!("{}: corrupt token cache ({what}); delete it", path.display()));
    let mut r = Reader { buf: &buf, pos: 0 };
    if r.take(8).ok_or_else(|| bad("short"))? != CACHE_MAGIC {
        return Err(bad("bad magic"));
    }
    let jl = r.u32().ok_or_else(|| bad("short"))? as usize;
    let stats: TokenizeStats = serde_json::from_slice(r.take(jl).ok_or_else(|| bad("short"))?).map_err(|_| bad("stats"))?;
    let n = r.u64().ok_or_else(|| bad("short"))? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 24));
    for _ in 0..n {
        let len = r.u32().ok_or_else(|| bad("short"))? as usize;
        let ids_b = r.take(len * 4).ok_or_else(|| bad("short"))?;
        let input_ids: Vec<u32> = ids_b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let flags = r.take(len).ok_or_else(|| bad("short"))?;
        let labels = input_ids.iter().zip(flags).map(|(&id, &f)| if f == 1 { id as i64 } else { IGNORE_INDEX }).collect();
        out.push(TokenizedExample { input_ids, labels });
    }
    if r.pos != buf.len() {
        return Err(bad("trailing bytes"));
    }
    Ok((out, stats))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
