//! DeepSeek-V4's chat format: OpenAI-style messages (system, user, assistant with reasoning and
//! tool calls, tool results, developer, latest_reminder) → the prompt string the model was trained
//! on, reproducing the official encoder (`encoding/encoding_dsv4.py`) byte for byte.
//!
//! The rules, in the order they apply:
//! 1. `tool` messages become `<tool_result>…</tool_result>` blocks of a user turn (consecutive
//!    tool results and user texts merge into one turn, parts joined by a blank line), sorted by
//!    the order of the calls in the preceding assistant turn.
//! 2. The prompt starts with the BOS token.
//! 3. In thinking mode, reasoning of assistant turns before the last user turn is dropped (and
//!    developer turns there are dropped) — unless tools are defined, which keeps everything.
//! 4. Each user/developer turn that the model answers next ends with `<｜Assistant｜>` and `<think>`
//!    (thinking) or `</think>` (chat, or a turn whose reasoning was dropped).

mod json;
mod tools;

use serde::Deserialize;
use serde_json::Value;

use crate::tokenizer::TextError;

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const LATEST_REMINDER: &str = "<｜latest_reminder｜>";
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ThinkingMode {
    /// The model reasons inside `<think>…</think>` first.
    #[default]
    Thinking,
    /// The model answers directly.
    Chat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReasoningEffort {
    #[default]
    Low,
    High,
    Max,
}

impl ReasoningEffort {
    fn prompt(self) -> &'static str {
        match self {
            ReasoningEffort::Low => "",
            ReasoningEffort::High => concat!(
                "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n",
                "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n",
                "Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
            ),
            ReasoningEffort::Max => concat!(
                "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n",
                "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its most fundamental components, trace every causal chain to its root, and resolve the underlying cause rather than any surface symptom.\n",
                "Do not stop reasoning until you have independently verified the solution from multiple angles and are certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
            ),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ChatOptions {
    pub thinking: ThinkingMode,
    /// Drop earlier turns' reasoning (the official default).
    pub drop_thinking: bool,
    pub reasoning_effort: ReasoningEffort,
    /// Tools (OpenAI format: `{"type": "function", "function": {...}}`), shown in the system turn.
    pub tools: Vec<Value>,
    /// A JSON schema the reply must follow (rendered after the tools).
    pub response_format: Option<Value>,
}

/// Message content: a string or OpenAI content parts (text parts are concatenated).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object, as a string (OpenAI's format).
    pub arguments: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ToolCall {
    #[serde(default)]
    pub id: Option<String>,
    pub function: FunctionCall,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

impl Message {
    fn text(&self) -> Result<String, TextError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    ("text", None) => Ok(""),
                    (other, _) => Err(TextError::Chat(format!("content part type {other:?} is not supported"))),
                })
                .collect(),
        }
    }
}

/// A turn after tool results are merged into user turns.
#[derive(Clone, Debug)]
enum Turn {
    System(String),
    Developer(String),
    /// Parts: plain text or a tool result (with the id of the call it answers).
    User(Vec<(Option<String>, String)>),
    Assistant {
        content: String,
        reasoning: Option<String>,
        calls: Vec<(Option<String>, String, String)>,
    },
    LatestReminder(String),
}

impl Turn {
    fn is_user_like(&self) -> bool {
        matches!(self, Turn::User(_) | Turn::Developer(_))
    }
}

fn merge(messages: &[Message]) -> Result<Vec<Turn>, TextError> {
    let mut turns: Vec<Turn> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let part = match m.role.as_str() {
            "tool" => {
                (Some(m.tool_call_id.clone().unwrap_or_default()), format!("<tool_result>{}</tool_result>", m.text()?))
            }
            "user" => (None, m.text()?),
            "system" => {
                turns.push(Turn::System(m.text()?));
                continue;
            }
            "developer" => {
                let text = m.text()?;
                if text.is_empty() {
                    return Err(TextError::Chat(format!("messages[{i}]: a developer message needs content")));
                }
                turns.push(Turn::Developer(text));
                continue;
            }
            "latest_reminder" => {
                turns.push(Turn::LatestReminder(m.text()?));
                continue;
            }
            "assistant" => {
                let calls = m
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|c| (c.id.clone(), c.function.name.clone(), c.function.arguments.clone()))
                    .collect();
                turns.push(Turn::Assistant { content: m.text()?, reasoning: m.reasoning_content.clone(), calls });
                continue;
            }
            other => return Err(TextError::Chat(format!("messages[{i}].role: unknown role {other:?}"))),
        };
        match turns.last_mut() {
            Some(Turn::User(parts)) => parts.push(part),
            _ => turns.push(Turn::User(vec![part])),
        }
    }
    sort_tool_results(&mut turns);
    Ok(turns)
}

/// Tool results in a user turn follow the order of the calls of the assistant turn before it.
fn sort_tool_results(turns: &mut [Turn]) {
    let mut order: Vec<String> = Vec::new();
    for t in turns.iter_mut() {
        match t {
            Turn::Assistant { calls, .. } if !calls.is_empty() => {
                order = calls.iter().map(|c| c.0.clone().unwrap_or_default()).collect();
            }
            Turn::User(parts) => {
                let rank = |id: &Option<String>| {
                    id.as_ref().and_then(|id| order.iter().position(|o| !o.is_empty() && o == id)).unwrap_or(0)
                };
                let slots: Vec<usize> = (0..parts.len()).filter(|&i| parts[i].0.is_some()).collect();
                if slots.len() > 1 && !order.is_empty() {
                    let mut results: Vec<(Option<String>, String)> = slots.iter().map(|&i| parts[i].clone()).collect();
                    results.sort_by_key(|r| rank(&r.0));
                    for (slot, r) in slots.into_iter().zip(results) {
                        parts[slot] = r;
                    }
                }
            }
            _ => {}
        }
    }
}

/// The prompt for `messages`, ending (when the last turn is the user's) with the opening of the
/// assistant's reply.
pub fn encode_chat(messages: &[Message], opts: &ChatOptions) -> Result<String, TextError> {
    let mut turns = merge(messages)?;
    let thinking = opts.thinking == ThinkingMode::Thinking;
    let drop = opts.drop_thinking && opts.tools.is_empty();
    let last_user = |turns: &[Turn]| turns.iter().rposition(Turn::is_user_like);
    if thinking && drop {
        let last = last_user(&turns);
        let mut kept = Vec::with_capacity(turns.len());
        for (i, t) in turns.into_iter().enumerate() {
            let before_last = last.is_some_and(|l| i < l);
            match t {
                Turn::Developer(_) if before_last => {}
                Turn::Assistant { content, calls, .. } if before_last => {
                    kept.push(Turn::Assistant { content, reasoning: None, calls })
                }
                other => kept.push(other),
            }
        }
        turns = kept;
    }
    let schemas: Vec<Value> =
        opts.tools.iter().map(|t| t.get("function").cloned().unwrap_or_else(|| t.clone())).collect();
    let extras = |mut text: String| {
        if !schemas.is_empty() {
            text += "\n\n";
            text += &tools::render_tools(&schemas);
        }
        if let Some(schema) = &opts.response_format {
            text += "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";
            text += &json::dumps(schema);
        }
        text
    };
    // Tools and the response format live in the system turn; without one, an empty one carries them.
    let has_extras = !schemas.is_empty() || opts.response_format.is_some();
    if has_extras && !matches!(turns.first(), Some(Turn::System(_) | Turn::Developer(_))) {
        turns.insert(0, Turn::System(String::new()));
    }
    let last_user = last_user(&turns);
    let mut prompt = String::from(BOS);
    // Tools and response format go to the first system (or developer) turn.
    let mut extras_pending = true;
    for (i, turn) in turns.iter().enumerate() {
        if i == 0 && thinking {
            prompt += opts.reasoning_effort.prompt();
        }
        match turn {
            Turn::System(text) => {
                prompt += &if std::mem::take(&mut extras_pending) { extras(text.clone()) } else { text.clone() };
            }
            Turn::Developer(text) => {
                prompt += USER;
                prompt += &if std::mem::take(&mut extras_pending) { extras(text.clone()) } else { text.clone() };
            }
            Turn::User(parts) => {
                prompt += USER;
                prompt += &parts.iter().map(|p| p.1.as_str()).collect::<Vec<_>>().join("\n\n");
            }
            Turn::LatestReminder(text) => {
                prompt += LATEST_REMINDER;
                prompt += text;
            }
            Turn::Assistant { content, reasoning, calls } => {
                if thinking && (!drop || last_user.is_none_or(|l| i > l)) {
                    prompt += reasoning.as_deref().unwrap_or("");
                    prompt += THINK_END;
                }
                prompt += content;
                if !calls.is_empty() {
                    let calls: Vec<(String, String)> = calls.iter().map(|c| (c.1.clone(), c.2.clone())).collect();
                    prompt += &tools::render_tool_calls(&calls);
                }
                prompt += EOS;
            }
        }
        let answered_next =
            turns.get(i + 1).is_none_or(|n| matches!(n, Turn::Assistant { .. } | Turn::LatestReminder(_)));
        if turn.is_user_like() && answered_next {
            prompt += ASSISTANT;
            let open_thinking = thinking && (!drop || last_user.is_some_and(|l| i >= l));
            prompt += if open_thinking { THINK_START } else { THINK_END };
        }
    }
    Ok(prompt)
}
