//! whet's data crate: everything between files on disk and token vectors. It does not depend on libtorch; it
//! hands plain `Vec<u32>` / `Vec<i64>` rows to the trainer and the rollout engine.
//!
//! - [`source`]: JSONL, JSON arrays, Parquet (streamed row group by row group) and the Hugging Face datasets
//!   layout, with column mapping ([`config::DataConfig`]) into typed [`record::Record`]s.
//! - [`answer`]: exact gold-answer extraction from dataset columns (GSM8K `#### N`, last `\boxed{}`, plain).
//! - [`template`]: Jinja chat templates from `tokenizer_config.json`, rendered like transformers does.
//! - [`tokenize`]: tokenizer wrapper, tokenization with loss masks, truncation, rayon and an on-disk cache.
//! - [`pack`]: best-fit-decreasing packing with per-document position ids, and the padded path.
//! - [`sampler`]: seeded, shardable, exactly resumable samplers, mixtures, domain-aware dynamic sampling and
//!   difficulty filtering.
//! - [`synth`]: a seeded arithmetic generator.

pub mod answer;
pub mod config;
pub mod error;
pub mod pack;
pub mod record;
pub mod rng;
pub mod sampler;
pub mod source;
pub mod synth;
pub mod template;
pub mod tokenize;

pub use config::{AnswerFormat, DataConfig, Format, MixEntry, RecordKind};
pub use error::{DataError, Result};
pub use pack::{pack, pad, PackedBatch, PackedRow, PaddedRow};
pub use record::{Message, Record};
pub use sampler::{Sampler, SamplerConfig, SamplerState};
pub use source::{load_mixture, load_records, stream_records};
pub use template::ChatTemplate;
pub use tokenize::{LossOn, TokenizeConfig, TokenizedExample, Tokenizer, Truncation};
