//! Where each sequence's tokens sit in a call, and which of them a layer must produce outputs
//! for.
//!
//! The last block of a step only has to produce the rows someone reads: the tokens that yield
//! logits (for generation, a chunk's last token) and any whose final streams are returned. Every
//! token still writes its keys and caches, so a sequence's state is the same either way; only
//! the queries, the attention over them, the output projection and the FFN side are skipped for
//! the rest. For a 256-token prefill of an 8-layer model that is most of one layer in eight.

use std::borrow::Cow;

/// Where a sequence's tokens sit in the call: positions `t0..t0+len`, rows `row0..row0+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub t0: usize,
    pub len: usize,
    pub row0: usize,
}

/// The tokens of a call, each sequence's chunk, and the tokens a layer produces outputs for:
/// per chunk a suffix of its tokens.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The call's chunks, one per sequence.
    pub chunks: Vec<Chunk>,
    /// The output tokens as chunks of their own (same positions), rows numbered densely from 0.
    pub outputs: Vec<Chunk>,
    /// Each output row's row in the call; `None` when every row is an output.
    rows: Option<Vec<usize>>,
}

impl Layout {
    /// Every token of every chunk is an output.
    pub fn all(chunks: Vec<Chunk>) -> Self {
        Layout { outputs: chunks.clone(), chunks, rows: None }
    }

    /// Chunk `i`'s tokens from `from[i]` on are outputs (`from[i] == len`: none of its tokens).
    pub fn with_outputs_from(chunks: Vec<Chunk>, from: &[usize]) -> Self {
        assert_eq!(chunks.len(), from.len(), "one suffix start per chunk");
        if from.iter().all(|&f| f == 0) {
            return Self::all(chunks);
        }
        let mut outputs = Vec::with_capacity(chunks.len());
        let mut rows = Vec::new();
        for (c, &f) in chunks.iter().zip(from) {
            let f = f.min(c.len);
            outputs.push(Chunk { t0: c.t0 + f, len: c.len - f, row0: rows.len() });
            rows.extend(c.row0 + f..c.row0 + c.len);
        }
        Layout { chunks, outputs, rows: Some(rows) }
    }

    /// Rows of the call.
    pub fn tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }

    /// Output rows.
    pub fn output_tokens(&self) -> usize {
        self.outputs.iter().map(|c| c.len).sum()
    }

    /// Whether every row of the call is an output (nothing to gather).
    pub fn is_all(&self) -> bool {
        self.rows.is_none()
    }

    /// The call row that output row `r` comes from.
    pub fn source_row(&self, r: usize) -> usize {
        self.rows.as_ref().map_or(r, |rows| rows[r])
    }

    /// The output rows of `data` (`width` values per call row), borrowed when all rows are.
    pub fn gather<'a, T: Clone>(&self, data: &'a [T], width: usize) -> Cow<'a, [T]> {
        match &self.rows {
            None => Cow::Borrowed(data),
            Some(rows) => {
                Cow::Owned(rows.iter().flat_map(|&r| data[r * width..(r + 1) * width].iter().cloned()).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_suffixes_renumber_rows_and_keep_positions() {
        let chunks =
            vec![Chunk { t0: 0, len: 5, row0: 0 }, Chunk { t0: 9, len: 1, row0: 5 }, Chunk { t0: 3, len: 4, row0: 6 }];
        let out = Layout::with_outputs_from(chunks, &[4, 1, 2]);
        assert_eq!(
            out.outputs,
            vec![Chunk { t0: 4, len: 1, row0: 0 }, Chunk { t0: 10, len: 0, row0: 1 }, Chunk { t0: 5, len: 2, row0: 1 }]
        );
        assert_eq!((out.tokens(), out.output_tokens()), (10, 3));
        assert_eq!((0..3).map(|r| out.source_row(r)).collect::<Vec<_>>(), vec![4, 8, 9]);
        let data: Vec<u32> = (0..20).collect();
        assert_eq!(out.gather(&data, 2).as_ref(), &[8, 9, 16, 17, 18, 19]);
    }

    #[test]
    fn all_rows_gather_nothing() {
        let chunks = vec![Chunk { t0: 2, len: 3, row0: 0 }];
        let out = Layout::with_outputs_from(chunks.clone(), &[0]);
        assert!(out.is_all());
        assert!(matches!(out.gather(&[1.0f32, 2.0, 3.0], 1), Cow::Borrowed(_)));
        assert_eq!(out.outputs, chunks);
    }
}
