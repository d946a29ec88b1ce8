//! Every config type deserialises from a TOML recipe fragment and rejects unknown keys.

use data::sampler::{DifficultyFilterConfig, DomainSamplingConfig, SamplerConfig};
use data::synth::{ArithmeticConfig, Op};
use data::{AnswerFormat, DataConfig, LossOn, TokenizeConfig, Truncation};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    data: DataConfig,
    tokenize: TokenizeConfig,
    sampler: SamplerConfig,
    domain_sampling: DomainSamplingConfig,
    difficulty_filter: DifficultyFilterConfig,
    synthetic: ArithmeticConfig,
}

const RECIPE: &str = r#"
[data]
path = "../shared/data/math500/test.jsonl"
prompt = "problem"
answer = "solution"
answer_format = "boxed"
domain = "subject"
prompt_template = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."

[tokenize]
max_length = 4096
loss_on = "last_turn"
truncation = "left"
template_kwargs = { enable_thinking = false }

[sampler]
seed = 7
num_epochs = 3

[domain_sampling]
temperature = 0.25

[difficulty_filter]
min_pass_rate = 0.1
max_pass_rate = 0.9
min_attempts = 8

[synthetic]
seed = 3
max_digits = 3
ops = ["add", "mul", "div"]
"#;

#[test]
fn a_recipe_fragment_deserialises_with_defaults() {
    let s: Stage = toml::from_str(RECIPE).unwrap();
    assert_eq!(s.data.answer_format, AnswerFormat::Boxed);
    assert_eq!(s.data.split, "train");
    assert_eq!(s.tokenize.loss_on, LossOn::LastTurn);
    assert_eq!(s.tokenize.truncation, Truncation::Left);
    assert!(s.tokenize.add_eos);
    assert_eq!(s.tokenize.template_kwargs["enable_thinking"], serde_json::json!(false));
    assert_eq!((s.sampler.seed, s.sampler.shuffle, s.sampler.num_epochs, s.sampler.drop_last), (7, true, Some(3), false));
    assert_eq!(s.domain_sampling.temperature, 0.25);
    assert_eq!(s.domain_sampling.alpha, DomainSamplingConfig::default().alpha);
    assert_eq!(s.difficulty_filter.min_attempts, 8);
    assert_eq!(s.synthetic.ops, vec![Op::Add, Op::Mul, Op::Div]);
    assert_eq!(s.synthetic.min_digits, 1);
}

#[test]
fn unknown_keys_are_rejected_in_every_section() {
    for (section, key) in [
        ("[data]", "answer_fmt = \"gsm8k\""),
        ("[tokenize]", "max_len = 1"),
        ("[sampler]", "shuffel = false"),
        ("[domain_sampling]", "temp = 1.0"),
        ("[difficulty_filter]", "max_pass = 1.0"),
        ("[synthetic]", "digits = 2"),
    ] {
        let text = RECIPE.replace(section, &format!("{section}\n{key}"));
        let err = toml::from_str::<Stage>(&text).err().unwrap_or_else(|| panic!("{section} accepted {key}"));
        let bad = key.split(' ').next().unwrap();
        assert!(err.to_string().contains(bad), "{section}: {err}");
    }
}
