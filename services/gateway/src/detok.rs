//! Streaming text out of generated tokens.
//!
//! [`IncrementalDecoder`]: byte-level BPE tokens may end inside a UTF-8 character, so the text of
//! a token is only known once the character completes. The decoder re-decodes a short window
//! (from the last point where the text was settled) and emits only what is settled: never half a
//! character (no U+FFFD at the end), never text that a later token would change.
//!
//! [`StopMatcher`]: stop strings may span tokens. Text that could be the start of a stop string
//! is held back until it either completes the stop string (the stream ends before it) or cannot
//! anymore (it is released).

use crate::tokenizer::{TextError, Tokenizer};

pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the window re-decoded for context.
    prefix: usize,
    /// Tokens before this index have been emitted as text.
    read: usize,
}

impl<'t> IncrementalDecoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        IncrementalDecoder { tokenizer, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds a token; returns the text it settles (possibly empty). Ids without a token (padding
    /// rows of the embedding, which a model can still sample) have no text.
    pub fn push(&mut self, id: u32) -> Result<String, TextError> {
        if !self.tokenizer.knows(id) {
            return Ok(String::new());
        }
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let text = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(text)
        } else {
            Ok(String::new())
        }
    }

    /// Text of tokens never settled (an incomplete character at the very end), for the last
    /// event of a stream.
    pub fn finish(&mut self) -> Result<String, TextError> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

/// Whether the stream goes on after a piece of text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to emit now.
    Continue(String),
    /// A stop string completed: `before` is the text that preceded it (emit it and end the
    /// stream); `after` is what followed it in the same push (for splitters that go on).
    Stopped { before: String, after: String },
}

pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.held.push_str(text);
        if let Some((at, len)) =
            self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s.len()))).min()
        {
            let before = self.held[..at].to_string();
            let after = self.held[at + len..].to_string();
            self.held.clear();
            return StopOutcome::Stopped { before, after };
        }
        // Hold back the longest tail that some stop string starts with.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        StopOutcome::Continue(out)
    }

    /// Releases held text at the end of the stream (no stop string completed).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out += &t,
                StopOutcome::Stopped { before, .. } => return (out + &before, true),
            }
        }
        (out + &m.finish(), false)
    }

    #[test]
    fn stop_strings_spanning_pieces_end_the_stream_before_them() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".into(), true));
        assert_eq!(run(&["\n\n"], &["line\n", "\nnext"]), ("line".into(), true));
        // A near miss is released once it cannot match anymore.
        assert_eq!(run(&["END"], &["abc EN", "x"]), ("abc ENx".into(), false));
        // The earliest of several stops wins; multi-byte text is cut on character boundaries.
        assert_eq!(run(&["世界", "b"], &["你好世", "界b"]), ("你好".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        let mut m = StopMatcher::new(["</think>".to_string()]);
        assert_eq!(m.push("reason</th"), StopOutcome::Continue("reason".into()));
        assert_eq!(
            m.push("ink>The answer"),
            StopOutcome::Stopped { before: String::new(), after: "The answer".into() }
        );
    }

    #[test]
    fn held_text_is_the_only_delay() {
        let mut m = StopMatcher::new(["STOP".to_string()]);
        assert_eq!(m.push("xx S"), StopOutcome::Continue("xx ".into()));
        assert_eq!(m.push("T"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("a"), StopOutcome::Continue("STa".into()));
    }
}
