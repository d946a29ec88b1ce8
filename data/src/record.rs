//! Typed records: what a row of a dataset becomes after column mapping.

use serde::{Deserialize, Serialize};

/// One chat message (`role` is `system`, `user`, `assistant`, or anything a template accepts, e.g. `tool`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The speaker.
    pub role: String,
    /// The text.
    pub content: String,
    /// Every other field of the message as the dataset gave it (`reasoning_content`, `tool_calls`, `name`,
    /// `tool_call_id`, …), in its order: chat templates read them (Qwen3 renders `reasoning_content` as the think
    /// block of a long chain-of-thought trace), so they are kept to the render.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into(), fields: Default::default() }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// A dataset row, mapped to one of the four shapes the stages consume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A prompt with a gold answer: RL (GRPO) and evaluation.
    PromptAnswer {
        /// The prompt as messages (a plain-text prompt becomes one `user` message, after an optional system one).
        prompt: Vec<Message>,
        /// The extracted, normalised gold answer.
        answer: String,
        /// A reference solution, when the dataset has one and the config names its column.
        solution: Option<String>,
        /// Row id (the `id` column, or `file:row`).
        id: String,
        /// Domain label for domain-aware sampling (the `domain` column), if any.
        domain: Option<String>,
    },
    /// A conversation (system / user / assistant turns, possibly multi-turn): SFT and mid-training.
    Conversation {
        /// The messages in order.
        messages: Vec<Message>,
    },
    /// A prompt with a completion (SFT with loss on the completion).
    PromptCompletion {
        /// The prompt as messages.
        prompt: Vec<Message>,
        /// The completion text.
        completion: String,
    },
    /// A preference pair (DPO).
    Preference {
        /// The shared prompt as messages.
        prompt: Vec<Message>,
        /// The preferred assistant reply.
        chosen: String,
        /// The dispreferred assistant reply.
        rejected: String,
    },
}

impl Record {
    /// The prompt messages (for a conversation, everything before the last assistant turn).
    pub fn prompt(&self) -> &[Message] {
        match self {
            Record::PromptAnswer { prompt, .. }
            | Record::PromptCompletion { prompt, .. }
            | Record::Preference { prompt, .. } => prompt,
            Record::Conversation { messages } => {
                let end = messages.iter().rposition(|m| m.role == "assistant").unwrap_or(messages.len());
                &messages[..end]
            }
        }
    }

    /// The gold answer of a [`Record::PromptAnswer`].
    pub fn answer(&self) -> Option<&str> {
        match self {
            Record::PromptAnswer { answer, .. } => Some(answer),
            _ => None,
        }
    }

    /// The messages to train on with SFT: a conversation as is, a prompt-completion as prompt + assistant turn,
    /// a prompt-answer with a solution as prompt + solution.
    pub fn sft_messages(&self) -> Option<Vec<Message>> {
        match self {
            Record::Conversation { messages } => Some(messages.clone()),
            Record::PromptCompletion { prompt, completion } => {
                let mut m = prompt.clone();
                m.push(Message::assistant(completion.clone()));
                Some(m)
            }
            Record::PromptAnswer { prompt, solution: Some(s), .. } => {
                let mut m = prompt.clone();
                m.push(Message::assistant(s.clone()));
                Some(m)
            }
            _ => None,
        }
    }
}
