//! W3C Trace Context: the `traceparent` a request carries from the gateway (HTTP header or gRPC
//! metadata, taken from the client or started there) to the attention worker (gRPC metadata)
//! and, for sampled traces, to the expert workers (the trace ids ride in each expert call, since
//! one call serves many requests). Logs about a request carry its `trace_id`.
//!
//! Format: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`, flag bit 0 = sampled.

pub mod export;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The header (and gRPC metadata key) name.
pub const TRACEPARENT: &str = "traceparent";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// Parses a `traceparent` value; `None` when malformed (the spec says: start a new trace).
    /// Versions after 00 are read by their first four fields, as the spec asks.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let _ = hex::<1>(version)?;
        let trace_id = hex::<16>(trace)?;
        let span_id = hex::<8>(span)?;
        let flags = hex::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// A new trace; sampled with probability `ratio`.
    pub fn new_root(ratio: f64) -> Self {
        let sampled = ratio >= 1.0 || (random_u64() as f64) < ratio.max(0.0) * u64::MAX as f64;
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&random_u64().to_be_bytes());
        trace_id[8..].copy_from_slice(&random_u64().to_be_bytes());
        TraceContext { trace_id, span_id: random_u64().max(1).to_be_bytes(), sampled }
    }

    /// The context to send downstream: same trace, a new span.
    pub fn child(&self) -> Self {
        TraceContext { span_id: random_u64().max(1).to_be_bytes(), ..*self }
    }

    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", to_hex(&self.trace_id), to_hex(&self.span_id), self.sampled as u8)
    }

    /// The trace id as logged (32 lowercase hex digits).
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> Option<Self> {
        md.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(Self::parse)
    }

    /// Sets `traceparent` on an outgoing gRPC request.
    pub fn inject(&self, md: &mut tonic::metadata::MetadataMap) {
        if let Ok(v) = self.header().parse() {
            md.insert(TRACEPARENT, v);
        }
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `2 * N` lowercase hex digits.
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Random enough for ids (not for secrets): std's per-process random hash keys over a counter.
fn random_u64() -> u64 {
    static STATE: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = STATE.get_or_init(Default::default).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specs_example_and_round_trips() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(v).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(t.sampled);
        assert_eq!(t.header(), v);
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
        assert!(!TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may append fields.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_some());
    }

    #[test]
    fn new_roots_are_distinct_and_honour_the_ratio() {
        let a = TraceContext::new_root(1.0);
        let b = TraceContext::new_root(1.0);
        assert_ne!(a.trace_id, b.trace_id);
        assert!(a.sampled && b.sampled);
        assert!(!TraceContext::new_root(0.0).sampled);
        assert_eq!(TraceContext::parse(&a.header()), Some(a));
        let sampled = (0..4000).filter(|_| TraceContext::new_root(0.25).sampled).count();
        // Binomial(4000, 0.25): mean 1000, sd 27; ±6 sd never fails by chance.
        assert!((840..=1160).contains(&sampled), "{sampled} of 4000 sampled at ratio 0.25");
    }
}
