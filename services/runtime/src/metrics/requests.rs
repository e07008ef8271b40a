//! Request-level families (vLLM's names), shared by the gateway and the attention workers and
//! told apart by `role`.

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use std::sync::OnceLock;
use std::time::Instant;

use super::buckets::{FIRST_TOKEN_SECONDS, INTER_TOKEN_SECONDS, REQUEST_SECONDS};
use super::{counter_vec, histogram_vec, int_gauge_vec};

/// Where a request is observed (label `role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Attention,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Gateway, Role::Attention];
    pub fn label(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Attention => "attention",
        }
    }
}

/// Why a request ended without an error (label `finished_reason`, vLLM's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishedReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Cancelled, or the client went away.
    Abort,
}

impl FinishedReason {
    pub const ALL: [FinishedReason; 3] = [FinishedReason::Stop, FinishedReason::Length, FinishedReason::Abort];
    pub fn label(self) -> &'static str {
        match self {
            FinishedReason::Stop => "stop",
            FinishedReason::Length => "length",
            FinishedReason::Abort => "abort",
        }
    }
}

/// Why a request failed (label `kind`): the gRPC code families both APIs map onto.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unauthenticated,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Cancelled,
    DeadlineExceeded,
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::InvalidArgument,
        ErrorKind::Unauthenticated,
        ErrorKind::NotFound,
        ErrorKind::ResourceExhausted,
        ErrorKind::Unavailable,
        ErrorKind::Cancelled,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn of_code(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => ErrorKind::InvalidArgument,
            Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Unauthenticated,
            Code::NotFound => ErrorKind::NotFound,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::Cancelled => ErrorKind::Cancelled,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            _ => ErrorKind::Internal,
        }
    }
}

pub struct RequestMetrics {
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    first_token: HistogramVec,
    inter_token: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    prefill: HistogramVec,
    decode: HistogramVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    success: IntCounterVec,
    errors: IntCounterVec,
}

/// The families resolved for one role (no label lookups on the hot path).
#[derive(Clone)]
pub struct RoleRequestMetrics {
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub first_token: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub prefill: Histogram,
    pub decode: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    success: [IntCounter; 3],
    errors: [IntCounter; 8],
}

impl RoleRequestMetrics {
    pub fn finished(&self, reason: FinishedReason) {
        self.success[reason as usize].inc();
    }

    pub fn failed(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }
}

pub fn requests() -> &'static RequestMetrics {
    static M: OnceLock<RequestMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let role = &["role"];
        RequestMetrics {
            running: int_gauge_vec("num_requests_running", "Requests generating now.", role),
            waiting: int_gauge_vec("num_requests_waiting", "Requests queued for admission.", role),
            first_token: histogram_vec(
                "time_to_first_token_seconds",
                "From arrival to the first generated token.",
                role,
                FIRST_TOKEN_SECONDS,
            ),
            inter_token: histogram_vec(
                "inter_token_latency_seconds",
                "Between consecutive tokens of one sequence.",
                role,
                INTER_TOKEN_SECONDS,
            ),
            e2e: histogram_vec(
                "e2e_request_latency_seconds",
                "From arrival to the request's end.",
                role,
                REQUEST_SECONDS,
            ),
            queue: histogram_vec(
                "request_queue_time_seconds",
                "Waiting for admission (KV budget, batch size).",
                role,
                REQUEST_SECONDS,
            ),
            prefill: histogram_vec(
                "request_prefill_time_seconds",
                "From admission to the first token.",
                role,
                REQUEST_SECONDS,
            ),
            decode: histogram_vec(
                "request_decode_time_seconds",
                "From the first token to the last.",
                role,
                REQUEST_SECONDS,
            ),
            prompt_tokens: counter_vec("prompt_tokens_total", "Prompt tokens of requests (prefilled).", role),
            generation_tokens: counter_vec("generation_tokens_total", "Tokens generated.", role),
            success: counter_vec(
                "request_success_total",
                "Requests that ended without an error, by reason.",
                &["role", "finished_reason"],
            ),
            errors: counter_vec("request_errors_total", "Requests that failed, by kind.", &["role", "kind"]),
        }
    })
}

/// The families of `role`, resolved once per process.
pub fn role_metrics(role: Role) -> &'static RoleRequestMetrics {
    static M: [OnceLock<RoleRequestMetrics>; 2] = [OnceLock::new(), OnceLock::new()];
    M[role as usize].get_or_init(|| requests().role(role))
}

/// One sequence's token timing: time to first token, then the gap between tokens; at the end,
/// the whole request and its decode phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenClock {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl TokenClock {
    /// Records a token generated now for a request that arrived at `arrived`; true for the first.
    pub fn token(&mut self, m: &RoleRequestMetrics, arrived: Instant) -> bool {
        let now = Instant::now();
        let first = match self.last {
            None => {
                m.first_token.observe((now - arrived).as_secs_f64());
                self.first = Some(now);
                true
            }
            Some(last) => {
                m.inter_token.observe((now - last).as_secs_f64());
                false
            }
        };
        self.last = Some(now);
        m.generation_tokens.inc();
        first
    }

    /// Records the end of a request that arrived at `arrived`: end-to-end and decode time.
    pub fn end(&self, m: &RoleRequestMetrics, arrived: Instant) {
        let now = Instant::now();
        m.e2e.observe((now - arrived).as_secs_f64());
        if let Some(first) = self.first {
            m.decode.observe((now - first).as_secs_f64());
        }
    }
}

impl RequestMetrics {
    /// The families for `role`, every label value of the closed sets created (so they export
    /// zeros and `rate()` works from the first scrape).
    fn role(&self, role: Role) -> RoleRequestMetrics {
        let r = role.label();
        RoleRequestMetrics {
            running: self.running.with_label_values(&[r]),
            waiting: self.waiting.with_label_values(&[r]),
            first_token: self.first_token.with_label_values(&[r]),
            inter_token: self.inter_token.with_label_values(&[r]),
            e2e: self.e2e.with_label_values(&[r]),
            queue: self.queue.with_label_values(&[r]),
            prefill: self.prefill.with_label_values(&[r]),
            decode: self.decode.with_label_values(&[r]),
            prompt_tokens: self.prompt_tokens.with_label_values(&[r]),
            generation_tokens: self.generation_tokens.with_label_values(&[r]),
            success: FinishedReason::ALL.map(|f| self.success.with_label_values(&[r, f.label()])),
            errors: ErrorKind::ALL.map(|k| self.errors.with_label_values(&[r, k.label()])),
        }
    }
}
