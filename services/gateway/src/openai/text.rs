//! From generated tokens to what a chat client sees: settled text (incremental decoding), cut at
//! the caller's stop strings, split into `reasoning_content` (before `</think>` in thinking mode)
//! and `content`, with a DSML tool-calls block turned into OpenAI `tool_calls`.

use serde_json::{Map, Value, json};

use crate::chat::THINK_END;
use crate::detok::{IncrementalDecoder, StopMatcher, StopOutcome};
use crate::tokenizer::{TextError, Tokenizer};

const TOOL_CALLS_START: &str = "<｜DSML｜tool_calls>";

#[derive(Default, Debug, Clone, PartialEq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    Reasoning,
    Content,
    ToolCalls,
}

pub struct TextAssembler<'t> {
    decoder: IncrementalDecoder<'t>,
    /// Token ids that end generation (their text is not part of the answer).
    stop_ids: Vec<u32>,
    user_stops: StopMatcher,
    think: StopMatcher,
    tools: StopMatcher,
    phase: Phase,
    tool_text: String,
    /// A caller's stop string ended the text.
    pub stopped: bool,
}

impl<'t> TextAssembler<'t> {
    /// `reasoning`: the prompt opened `<think>`, so text up to `</think>` is reasoning.
    pub fn new(tokenizer: &'t Tokenizer, stop_ids: Vec<u32>, stops: Vec<String>, reasoning: bool, tools: bool) -> Self {
        TextAssembler {
            decoder: IncrementalDecoder::new(tokenizer),
            stop_ids,
            user_stops: StopMatcher::new(stops),
            think: StopMatcher::new([THINK_END.to_string()]),
            // Without tools in the request, DSML text is just text.
            tools: StopMatcher::new(if tools { vec![TOOL_CALLS_START.to_string()] } else { vec![] }),
            phase: if reasoning { Phase::Reasoning } else { Phase::Content },
            tool_text: String::new(),
            stopped: false,
        }
    }

    pub fn push(&mut self, id: u32) -> Result<Delta, TextError> {
        if self.stopped || self.stop_ids.contains(&id) {
            return Ok(Delta::default());
        }
        let piece = self.decoder.push(id)?;
        Ok(self.route(piece))
    }

    /// The rest at the end of the stream.
    pub fn finish(&mut self) -> Result<Delta, TextError> {
        if self.stopped {
            return Ok(Delta::default());
        }
        let tail = self.decoder.finish()?;
        let mut d = self.route(tail);
        let held = self.user_stops.finish();
        let more = self.route_unstoppable(held);
        d.reasoning += &more.reasoning;
        d.content += &more.content;
        match self.phase {
            Phase::Reasoning => d.reasoning += &self.think.finish(),
            Phase::Content => d.content += &self.tools.finish(),
            Phase::ToolCalls => {}
        }
        Ok(d)
    }

    /// Tool calls found in the text (OpenAI format), once the stream has finished.
    pub fn tool_calls(&self) -> Vec<Value> {
        parse_tool_calls(&self.tool_text)
    }

    fn route(&mut self, piece: String) -> Delta {
        match self.user_stops.push(&piece) {
            StopOutcome::Continue(text) => self.route_unstoppable(text),
            StopOutcome::Stopped { before, .. } => {
                let d = self.route_unstoppable(before);
                self.stopped = true;
                d
            }
        }
    }

    fn route_unstoppable(&mut self, text: String) -> Delta {
        let mut d = Delta::default();
        let mut text = text;
        loop {
            match self.phase {
                Phase::Reasoning => match self.think.push(&text) {
                    StopOutcome::Continue(t) => {
                        d.reasoning += &t;
                        return d;
                    }
                    StopOutcome::Stopped { before, after } => {
                        d.reasoning += &before;
                        self.phase = Phase::Content;
                        text = after;
                    }
                },
                Phase::Content => match self.tools.push(&text) {
                    StopOutcome::Continue(t) => {
                        d.content += &t;
                        return d;
                    }
                    StopOutcome::Stopped { before, after } => {
                        d.content += &before;
                        self.phase = Phase::ToolCalls;
                        text = after;
                    }
                },
                Phase::ToolCalls => {
                    self.tool_text += &text;
                    return d;
                }
            }
        }
    }
}

/// `<｜DSML｜invoke name="f">` blocks with `<｜DSML｜parameter name="k" string="true|false">v</…>`
/// lines → `[{"id", "type": "function", "function": {"name", "arguments"}}]`. String parameters
/// become JSON strings; others are JSON already (kept as text if they are not).
pub fn parse_tool_calls(text: &str) -> Vec<Value> {
    let mut calls = Vec::new();
    for block in text.split("<｜DSML｜invoke name=\"").skip(1) {
        let Some((name, body)) = block.split_once("\">") else { continue };
        let body = body.split("</｜DSML｜invoke>").next().unwrap_or(body);
        let mut args = Map::new();
        for param in body.split("<｜DSML｜parameter name=\"").skip(1) {
            let Some((key, rest)) = param.split_once("\" string=\"") else { continue };
            let Some((is_str, rest)) = rest.split_once("\">") else { continue };
            let value = rest.split("</｜DSML｜parameter>").next().unwrap_or(rest);
            let v = if is_str == "true" {
                Value::String(value.to_string())
            } else {
                serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()))
            };
            args.insert(key.to_string(), v);
        }
        calls.push(json!({
            "id": call_id(),
            "type": "function",
            "function": {"name": name, "arguments": Value::Object(args).to_string()},
        }));
    }
    calls
}

/// A tool call id unique among this process's replies (and, by its random seed, very likely
/// across gateways): agent frameworks match tool results to calls by id over many turns, so the
/// same `call_0` in every reply would mix them up.
fn call_id() -> String {
    use std::hash::BuildHasher;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(std::process::id()));
    // An odd multiplier and a fixed XOR are both one-to-one: distinct counters, distinct ids.
    let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("call_{:016x}", seed ^ n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsml_tool_calls_parse_into_openai_calls() {
        let text = "\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"location\" string=\"true\">Beijing</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        let calls = parse_tool_calls(text);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"location": "Beijing", "days": 3}));
        // Ids differ across calls and replies.
        let twice = format!("{text}{text}");
        let ids: std::collections::HashSet<String> = [parse_tool_calls(&twice), parse_tool_calls(&twice)]
            .concat()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 4);
        assert!(ids.iter().all(|id| id.starts_with("call_") && id.len() == 21), "{ids:?}");
    }
}
