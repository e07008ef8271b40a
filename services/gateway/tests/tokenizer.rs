//! The real DeepSeek tokenizer: round trips on multilingual text, and incremental decoding that
//! streams exactly the full decode, never half a character.

use expertmesh_gateway::{IncrementalDecoder, Tokenizer};
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tokenizer-deepseek-v3/tokenizer.json");
    Tokenizer::from_file(&path).unwrap()
}

const TEXTS: [&str; 6] = [
    "Hello, world! The weather in Beijing is 22°C.",
    "北京今天天气晴朗，气温二十二度。",
    "こんにちは、世界。カタカナとひらがな。",
    "Привет, мир! Ünïcödé façade — naïve café.",
    "emoji 🚀🔥 and math ∑∫√ and code `fn main() { println!(\"hi\"); }`\n\n\tindented",
    "mixed 123456789 numbers 3.14159 and   spaces  ",
];

#[test]
fn multilingual_text_round_trips() {
    let tok = tokenizer();
    assert!(tok.vocab_size() >= 128_000);
    for text in TEXTS {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    // Digits split in groups of at most three (the pre-tokenizer's \p{N}{1,3}).
    let ids = tok.encode("123456789").unwrap();
    assert_eq!(ids.len(), 3);
}

#[test]
fn incremental_decoding_streams_the_full_text_without_broken_characters() {
    let tok = tokenizer();
    for text in TEXTS {
        let ids = tok.encode(text).unwrap();
        let mut dec = IncrementalDecoder::new(&tok);
        let mut streamed = String::new();
        for &id in &ids {
            let piece = dec.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: broken character streamed");
            streamed += &piece;
            // What was streamed is always a prefix of the final text: nothing is rewritten.
            assert!(text.starts_with(&streamed), "{streamed:?} is not a prefix of {text:?}");
        }
        streamed += &dec.finish().unwrap();
        assert_eq!(streamed, text);
    }
}

#[test]
fn unknown_ids_are_an_error_not_a_panic() {
    let tok = tokenizer();
    assert!(tok.decode(&[5, 10_000_000]).unwrap_err().to_string().contains("10000000"));
}

#[test]
fn ids_beyond_the_vocabulary_stream_no_text() {
    let tok = tokenizer();
    let ids = tok.encode("héllo").unwrap();
    let mut dec = IncrementalDecoder::new(&tok);
    let mut out = String::new();
    for &id in &ids {
        out += &dec.push(id).unwrap();
        // An embedding padding row (DeepSeek's model has 129280 rows for ~128.8k tokens).
        out += &dec.push(129_279).unwrap();
    }
    out += &dec.finish().unwrap();
    assert_eq!(out, "héllo");
}

/// A long text is tokenized off the async runtime: on a one-thread runtime, other tasks keep
/// running while the tokenizer works (tokenized on the runtime's thread, the whole text would be
/// done within one poll, and the loop below would see it finished at its first turn). The ids
/// are those of the plain call.
#[tokio::test(flavor = "current_thread")]
async fn long_texts_are_tokenized_off_the_runtime() {
    let tok = std::sync::Arc::new(tokenizer());
    let text = TEXTS.concat().repeat(2000); // ~0.5 MB: a second or so of tokenizing
    let task = tokio::spawn({
        let (tok, text) = (tok.clone(), text.clone());
        async move { tok.encode_off_runtime(text).await }
    });
    let mut turns = 0;
    while !task.is_finished() {
        tokio::task::yield_now().await;
        turns += 1;
    }
    assert!(turns > 1, "the runtime's thread was held by the tokenizer");
    assert_eq!(task.await.unwrap().unwrap(), tok.encode(&text).unwrap());
}
