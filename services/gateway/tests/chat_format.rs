//! The official DeepSeek-V4 chat-format vectors (`../shared/data/chat-format`), byte for byte,
//! and the prompts' tokens through the real tokenizer.

use expertmesh_gateway::Tokenizer;
use expertmesh_gateway::chat::{ChatOptions, Message, ThinkingMode, encode_chat};
use serde_json::Value;
use std::path::PathBuf;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data").join(rel)
}

/// A vector's messages and tools (the input is a message list, or `{tools, messages}`).
fn case(n: u32) -> (Vec<Message>, Vec<Value>, String) {
    let input: Value =
        serde_json::from_str(&std::fs::read_to_string(data(&format!("chat-format/case{n}.input.json"))).unwrap())
            .unwrap();
    let (messages, tools) = match &input {
        Value::Array(_) => (input.clone(), Vec::new()),
        obj => (obj["messages"].clone(), obj.get("tools").and_then(Value::as_array).cloned().unwrap_or_default()),
    };
    let expected = std::fs::read_to_string(data(&format!("chat-format/case{n}.output.txt"))).unwrap();
    (serde_json::from_value(messages).unwrap(), tools, expected)
}

fn thinking(tools: Vec<Value>) -> ChatOptions {
    ChatOptions { thinking: ThinkingMode::Thinking, drop_thinking: true, tools, ..Default::default() }
}

#[test]
fn official_vectors_are_reproduced_byte_for_byte() {
    for n in [1, 2] {
        let (messages, tools, expected) = case(n);
        let got = encode_chat(&messages, &thinking(tools)).unwrap();
        assert_eq!(got, expected, "case {n}");
    }
}

#[test]
fn a_generation_prompt_opens_the_assistant_turn() {
    let (mut messages, _, _) = case(2);
    messages.pop(); // ends with the user's question now
    let thinking_prompt = encode_chat(&messages, &thinking(vec![])).unwrap();
    assert!(thinking_prompt.ends_with("What is the capital of France?<｜Assistant｜><think>"), "{thinking_prompt}");
    let chat = ChatOptions { thinking: ThinkingMode::Chat, drop_thinking: true, ..Default::default() };
    let chat_prompt = encode_chat(&messages, &chat).unwrap();
    assert!(chat_prompt.ends_with("<｜Assistant｜></think>"));
    // Earlier reasoning is not shown in chat mode either.
    assert!(!chat_prompt.contains("greet back"));
}

#[test]
fn bad_messages_are_named() {
    let m: Vec<Message> = serde_json::from_str(r#"[{"role": "robot", "content": "x"}]"#).unwrap();
    let e = encode_chat(&m, &ChatOptions::default()).unwrap_err();
    assert!(e.to_string().contains("messages[0].role"), "{e}");
}

#[test]
fn the_prompt_tokenizes_with_special_tokens_as_single_ids() {
    let tok = Tokenizer::from_file(&data("tokenizer-deepseek-v3/tokenizer.json")).unwrap();
    let (messages, _, expected) = case(2);
    let ids = tok.encode(&encode_chat(&messages, &thinking(vec![])).unwrap()).unwrap();
    let (bos, user, assistant) = (
        tok.token_id("<｜begin▁of▁sentence｜>").unwrap(),
        tok.token_id("<｜User｜>").unwrap(),
        tok.token_id("<｜Assistant｜>").unwrap(),
    );
    assert_eq!(ids[0], bos);
    assert_eq!(ids.iter().filter(|&&t| t == user).count(), 2);
    assert_eq!(ids.iter().filter(|&&t| t == assistant).count(), 2);
    assert_eq!(tok.decode(&ids).unwrap(), expected);
}
