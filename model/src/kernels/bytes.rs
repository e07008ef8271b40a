//! A cheap, shareable view of bytes that may live in a memory-mapped checkpoint or in a Vec.
//! Weights stay in the format they were stored in (bf16, FP8, FP4) and are decoded inside the
//! kernels, so a model needs about its checkpoint's size in memory.

use std::ops::Range;
use std::sync::Arc;

type Owner = Arc<dyn AsRef<[u8]> + Send + Sync>;

#[derive(Clone)]
pub struct Bytes {
    owner: Owner,
    start: usize,
    len: usize,
}

impl Bytes {
    /// Shares `owner` (an `Arc<Mmap>`, a `Vec<u8>`, ...) and views `range` of it.
    pub fn new(owner: Owner, range: Range<usize>) -> Self {
        let total = (*owner).as_ref().len();
        assert!(range.start <= range.end && range.end <= total, "byte range {range:?} outside {total}");
        Bytes { owner, start: range.start, len: range.end - range.start }
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes::new(Arc::new(v), 0..len)
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the owner holds a byte just before this view, so that reading `as_slice()`'s
    /// pointer minus one stays inside the owner (the FP8 dot kernels load from there).
    pub fn has_byte_before(&self) -> bool {
        self.start > 0
    }

    /// The same bytes, copied after one padding byte unless the owner already holds a byte before
    /// them (views of a memory-mapped checkpoint do: the header comes first).
    pub fn with_byte_before(self) -> Bytes {
        if self.has_byte_before() {
            return self;
        }
        let mut padded = Vec::with_capacity(self.len + 1);
        padded.push(0);
        padded.extend_from_slice(self.as_slice());
        Bytes::new(Arc::new(padded), 1..self.len + 1)
    }

    /// A sub-view (relative to this view).
    pub fn slice(&self, range: Range<usize>) -> Bytes {
        assert!(range.end <= self.len, "slice {range:?} outside {}", self.len);
        Bytes { owner: self.owner.clone(), start: self.start + range.start, len: range.end - range.start }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}
