//! Request handling: validate, tokenize, run `n` generations (each surviving worker failures),
//! and answer as JSON or as an SSE stream.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use expertmesh_proto::v1::{FinishReason, SamplingParams};
use expertmesh_runtime::trace::{TRACEPARENT, TraceContext, to_hex};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::errors::ApiError;
use super::requests::{ChatRequest, CompletionRequest, Prompt, Sampling, Thinking, parse};
use super::text::{Delta, TextAssembler};
use crate::chat::{ChatOptions, ReasoningEffort, ThinkingMode, encode_chat};
use crate::generation::{self, GenEvent, GenRequest, Generation};
use crate::observe::gateway_metrics;
use crate::router::EngineRouter;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_prompt_tokens: usize,
    pub max_tokens: u32,
    pub default_max_tokens: u32,
    pub max_n: u32,
    /// Requests handled at once; more get 429.
    pub max_concurrent: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            max_prompt_tokens: 65_536,
            max_tokens: 32_768,
            default_max_tokens: 256,
            max_n: 8,
            max_concurrent: 1024,
        }
    }
}

pub struct AppState {
    pub engines: Arc<EngineRouter>,
    pub tokenizer: Arc<Tokenizer>,
    pub model: String,
    pub limits: Limits,
    /// Accepted `Authorization: Bearer` keys; empty = no authentication.
    pub api_keys: Vec<String>,
    /// Token ids that end generation (EOS).
    pub stop_ids: Vec<u32>,
    pub slots: Arc<Semaphore>,
    /// Share of requests arriving without a `traceparent` whose new trace is sampled (sampled
    /// traces are carried to the expert workers).
    pub trace_sample_ratio: f64,
}

/// Who a request is, for logs and the engines: its id and its trace (the caller's
/// `traceparent`, or a new one).
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub id: String,
    pub trace: TraceContext,
    /// The client's span (its `traceparent`), parent of this request's spans.
    pub parent: Option<[u8; 8]>,
}

impl RequestContext {
    pub fn new(prefix: &str, traceparent: Option<&str>, sample_ratio: f64) -> Self {
        let caller = traceparent.and_then(TraceContext::parse);
        let trace = caller.unwrap_or_else(|| TraceContext::new_root(sample_ratio));
        // The id is random (a new span id), not derived from the trace: a client may send one
        // traceparent with many requests.
        RequestContext {
            id: format!("{prefix}-{}", to_hex(&trace.child().span_id)),
            trace,
            parent: caller.map(|c| c.span_id),
        }
    }

    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("request", request_id = %self.id, trace_id = %self.trace.trace_id_hex())
    }

    /// The generation of choice `index` (its own span in the request's trace).
    pub fn generation(&self, index: u32, prompt: Vec<u32>, sampling: SamplingParams) -> GenRequest {
        GenRequest {
            id: format!("{}-{index}", self.id),
            prompt,
            sampling,
            trace: self.trace.child(),
            parent: self.parent,
        }
    }
}

fn context(s: &AppState, headers: &HeaderMap, kind: Kind) -> RequestContext {
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    RequestContext::new(prefix, headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()), s.trace_sample_ratio)
}

/// The response header naming the request (as in its log lines), like OpenAI's API.
const REQUEST_ID: &str = "x-request-id";

fn with_request_id(mut r: Response, id: &str) -> Response {
    if let Ok(v) = header::HeaderValue::from_str(id) {
        r.headers_mut().insert(REQUEST_ID, v);
    }
    r
}

/// A request refused before any generation started: counted, then answered.
fn rejected(e: ApiError, id: &str) -> Response {
    gateway_metrics().failed(e.error_kind());
    tracing::info!(status = e.status.as_u16(), message = %e.message, "request refused");
    with_request_id(e.into_response(), id)
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(|| async { expertmesh_runtime::metrics::metrics_response() }))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn ready(State(s): State<Arc<AppState>>) -> Response {
    if s.engines.workers() > 0 {
        "ready".into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "no attention worker registered")
            .into_response()
    }
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return e.into_response();
    }
    axum::Json(
        json!({"object": "list", "data": [{"id": s.model, "object": "model", "created": 0, "owned_by": "expertmesh"}]}),
    )
    .into_response()
}

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    check_key(s, value)
}

/// Checks an `Authorization` value (`Bearer KEY`) against the configured keys.
pub(crate) fn check_key(s: &AppState, authorization: Option<&str>) -> Result<(), ApiError> {
    if s.api_keys.is_empty() {
        return Ok(());
    }
    let key = authorization.and_then(|v| v.strip_prefix("Bearer "));
    match key {
        Some(k) if s.api_keys.iter().any(|a| a == k) => Ok(()),
        _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "missing or invalid API key")),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What both endpoints need to run a request.
pub(crate) struct Plan {
    /// One prompt (chat, gRPC), or a completions batch.
    pub(crate) prompts: Vec<Vec<u32>>,
    pub(crate) sampling: SamplingParams,
    pub(crate) n: u32,
    pub(crate) stops: Vec<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) reasoning: bool,
    pub(crate) tools: bool,
    pub(crate) logprobs: bool,
}

impl Plan {
    /// The reply's choices: `n` per prompt, prompt by prompt (choice `p·n + j` is prompt `p`'s
    /// `j`-th).
    pub(crate) fn choices(&self) -> u32 {
        self.prompts.len() as u32 * self.n
    }

    /// Prompt tokens of the whole request.
    pub(crate) fn prompt_tokens(&self) -> u32 {
        self.prompts.iter().map(|p| p.len() as u32).sum()
    }
}

/// Stop strings per request, and bytes per stop string, at most.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 1024;
/// Prompts in one completions request, at most (LangChain batches 20).
const MAX_PROMPTS: usize = 32;

pub(crate) fn plan(s: &AppState, p: &Sampling, prompts: Vec<Vec<u32>>) -> Result<Plan, ApiError> {
    let l = &s.limits;
    if let Some(m) = &p.model
        && m != &s.model
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("model {m:?} does not exist (serving {:?})", s.model),
        ));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid("prompt", format!("{} prompts; at most {MAX_PROMPTS}", prompts.len())));
    }
    for (i, prompt) in prompts.iter().enumerate() {
        let param = if prompts.len() == 1 { "prompt".to_string() } else { format!("prompt[{i}]") };
        if prompt.is_empty() {
            return Err(ApiError::invalid(param, "empty"));
        }
        if prompt.len() > l.max_prompt_tokens {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("{param}: {} tokens exceed the limit of {}", prompt.len(), l.max_prompt_tokens),
            ));
        }
    }
    let max_tokens = p.max_completion_tokens.or(p.max_tokens).unwrap_or(l.default_max_tokens);
    if max_tokens == 0 || max_tokens > l.max_tokens {
        return Err(ApiError::invalid("max_tokens", format!("{max_tokens} is not in 1..={}", l.max_tokens)));
    }
    let n = p.n.unwrap_or(1);
    if n == 0 || n > l.max_n {
        return Err(ApiError::invalid("n", format!("{n} is not in 1..={}", l.max_n)));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", format!("{temperature} is not in [0, 2]")));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("{top_p} is not in (0, 1]")));
    }
    let logprobs = match &p.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= 20) => true,
        Some(other) => {
            return Err(ApiError::invalid("logprobs", format!("{other} is not a boolean or a count 0..=20")));
        }
    };
    let stops = p.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    // Every stop string is searched for after every token: their number and length are bounded.
    if stops.len() > MAX_STOPS || stops.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_BYTES} bytes each"),
        ));
    }
    Ok(Plan {
        prompts,
        sampling: SamplingParams {
            temperature,
            top_k: p.top_k.unwrap_or(0),
            top_p,
            seed: p.seed,
            max_tokens,
            stop_token_ids: s.stop_ids.clone(),
            logprobs,
        },
        n,
        stops,
        stream: p.stream,
        include_usage: p.stream_options.as_ref().is_some_and(|o| o.include_usage),
        reasoning: false,
        tools: false,
        logprobs,
    })
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let ctx = context(&s, &headers, Kind::Completion);
    let span = ctx.span();
    let result = async {
        authorize(&s, &headers)?;
        let req: CompletionRequest = parse(&body)?;
        let sampling: Sampling = parse(&body)?;
        let prompts = match req.prompt {
            Prompt::Tokens(ids) => vec![ids],
            Prompt::TokenLists(list) => list,
            Prompt::Text(text) => vec![tokenize(&s, text, "prompt").await?],
            Prompt::Texts(list) => {
                let mut prompts = Vec::with_capacity(list.len());
                for (i, text) in list.into_iter().enumerate() {
                    prompts.push(tokenize(&s, text, &format!("prompt[{i}]")).await?);
                }
                prompts
            }
        };
        let plan = plan(&s, &sampling, prompts)?;
        Ok::<_, ApiError>(plan)
    }
    .await;
    match result {
        Ok(plan) => run(s, plan, Kind::Completion, ctx).instrument(span).await,
        Err(e) => span.in_scope(|| rejected(e, &ctx.id)),
    }
}

/// The JSON schema an OpenAI `response_format` asks the reply to follow: DeepSeek's chat format
/// states it in the system turn (the reply is not constrained token by token). `json_object`
/// asks for any object.
fn reply_schema(format: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = format else { return Ok(None) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => match format.pointer("/json_schema/schema") {
            Some(schema) if schema.is_object() => Ok(Some(schema.clone())),
            _ => Err(ApiError::invalid("response_format.json_schema.schema", "missing or not an object")),
        },
        other => Err(ApiError::invalid(
            "response_format.type",
            format!("{} is not text, json_object or json_schema", other.map_or("missing".into(), |t| format!("{t:?}"))),
        )),
    }
}

/// Token ids of a request's text, tokenized off the async runtime (see
/// [`Tokenizer::encode_off_runtime`]); errors name `field`.
async fn tokenize(s: &AppState, text: String, field: &str) -> Result<Vec<u32>, ApiError> {
    s.tokenizer.encode_off_runtime(text).await.map_err(|e| ApiError::invalid(field, e.to_string()))
}

async fn chat_completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let ctx = context(&s, &headers, Kind::Chat);
    let span = ctx.span();
    let result = async {
        authorize(&s, &headers)?;
        let req: ChatRequest = parse(&body)?;
        let sampling: Sampling = parse(&body)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages", "empty"));
        }
        let thinking = match &req.thinking {
            None => true,
            Some(Thinking::Flag(b)) => *b,
            Some(Thinking::Typed { kind }) => match kind.as_str() {
                "enabled" => true,
                "disabled" => false,
                other => {
                    return Err(ApiError::invalid("thinking.type", format!("{other:?} is not enabled or disabled")));
                }
            },
        };
        let reasoning_effort = match req.reasoning_effort.as_deref() {
            None | Some("low") => ReasoningEffort::Low,
            Some("high") | Some("medium") => ReasoningEffort::High,
            Some("max") => ReasoningEffort::Max,
            Some(other) => {
                return Err(ApiError::invalid("reasoning_effort", format!("{other:?} is not low, high or max")));
            }
        };
        let response_format = reply_schema(req.response_format.as_ref())?;
        let tools = req.tools.clone().unwrap_or_default();
        let opts = ChatOptions {
            thinking: if thinking { ThinkingMode::Thinking } else { ThinkingMode::Chat },
            drop_thinking: true,
            reasoning_effort,
            tools: tools.clone(),
            response_format,
        };
        let text = encode_chat(&req.messages, &opts).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
        let prompt = tokenize(&s, text, "messages").await?;
        let mut plan = plan(&s, &sampling, vec![prompt])?;
        plan.reasoning = thinking;
        plan.tools = !tools.is_empty();
        Ok(plan)
    }
    .await;
    match result {
        Ok(plan) => run(s, plan, Kind::Chat, ctx).instrument(span).await,
        Err(e) => span.in_scope(|| rejected(e, &ctx.id)),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

pub(crate) fn finish_reason(reason: FinishReason, stopped_by_string: bool, tool_calls: bool) -> &'static str {
    if tool_calls {
        "tool_calls"
    } else if stopped_by_string || reason == FinishReason::Stop {
        "stop"
    } else {
        "length"
    }
}

/// One choice's output so far.
struct Choice<'t> {
    text: TextAssembler<'t>,
    reasoning: String,
    content: String,
    finish: Option<&'static str>,
    completion_tokens: u32,
    /// (token text, log-probability) of each generated token, when asked for.
    logprobs: Vec<(String, f32)>,
}

/// Runs the plan's `n` generations; called within the request's span.
async fn run(s: Arc<AppState>, plan: Plan, kind: Kind, ctx: RequestContext) -> Response {
    // Held until the response (or its stream) ends.
    let Ok(permit) = s.slots.clone().try_acquire_owned() else {
        return rejected(
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "too many requests in flight"),
            &ctx.id,
        );
    };
    if s.engines.workers() == 0 {
        return rejected(
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "no attention worker is available"),
            &ctx.id,
        );
    }
    tracing::info!(prompt_tokens = plan.prompt_tokens(), n = plan.n, stream = plan.stream, "request accepted");
    // n independent generations per prompt; a fixed seed gives each of a prompt's choices its own
    // stream (seed + its index among them: a prompt's choices do not depend on the batch).
    let mut merged = tokio_stream::StreamMap::new();
    for c in 0..plan.choices() {
        let (prompt, j) = (&plan.prompts[(c / plan.n) as usize], c % plan.n);
        let mut sampling = plan.sampling.clone();
        sampling.seed = plan.sampling.seed.map(|seed| seed.wrapping_add(j as u64));
        let generation = generation::start(s.engines.clone(), ctx.generation(c, prompt.clone(), sampling));
        merged.insert(c as usize, generation);
    }
    let id = ctx.id;
    if plan.stream {
        // A rejection still gets its status, not a 200 and an error event.
        for (_, generation) in merged.iter_mut() {
            if let Err(e) = generation.accepted().await {
                return with_request_id(ApiError::from(e).into_response(), &id);
            }
        }
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(stream_events(s.clone(), plan, kind, id.clone(), merged, tx, permit).in_current_span());
        let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>));
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(REQUEST_ID, id.as_str())
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .unwrap();
    }
    let tok = s.tokenizer.clone();
    let mut choices: Vec<Choice> = (0..plan.choices())
        .map(|_| Choice {
            text: TextAssembler::new(&tok, s.stop_ids.clone(), plan.stops.clone(), plan.reasoning, plan.tools),
            reasoning: String::new(),
            content: String::new(),
            finish: None,
            completion_tokens: 0,
            logprobs: Vec::new(),
        })
        .collect();
    while let Some((i, ev)) = merged.next().await {
        let c = &mut choices[i];
        match ev {
            Err(e) => return with_request_id(ApiError::from(e).into_response(), &id),
            Ok(GenEvent::Token { id, logprob }) => {
                c.completion_tokens += 1;
                if let Some(lp) = logprob.filter(|_| plan.logprobs) {
                    c.logprobs.push((tok.decode(&[id]).unwrap_or_default(), lp));
                }
                match c.text.push(id) {
                    Ok(d) => {
                        c.reasoning += &d.reasoning;
                        c.content += &d.content;
                    }
                    Err(e) => {
                        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e.to_string())
                            .into_response();
                    }
                }
                if c.text.stopped {
                    c.finish = Some("stop");
                    // Stop generating this choice.
                    if let Some(g) = merged.remove(&i) {
                        g.stopped_by_text();
                    }
                }
            }
            Ok(GenEvent::Finished { reason, .. }) => {
                if let Ok(d) = c.text.finish() {
                    c.reasoning += &d.reasoning;
                    c.content += &d.content;
                }
                let calls = !c.text.tool_calls().is_empty();
                c.finish.get_or_insert(finish_reason(reason, c.text.stopped, calls));
            }
        }
    }
    drop(permit);
    let completion_tokens: u32 = choices.iter().map(|c| c.completion_tokens).sum();
    let usage = json!({"prompt_tokens": plan.prompt_tokens(), "completion_tokens": completion_tokens, "total_tokens": plan.prompt_tokens() + completion_tokens});
    let body = match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": now(), "model": s.model,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let logprobs = plan.logprobs.then(|| json!({
                    "tokens": c.logprobs.iter().map(|t| &t.0).collect::<Vec<_>>(),
                    "token_logprobs": c.logprobs.iter().map(|t| t.1).collect::<Vec<_>>(),
                    "top_logprobs": null,
                }));
                json!({"index": i, "text": c.content, "finish_reason": c.finish, "logprobs": logprobs})
            }).collect::<Vec<_>>(),
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": now(), "model": s.model,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let calls = c.text.tool_calls();
                let mut message = json!({"role": "assistant", "content": c.content});
                if plan.reasoning { message["reasoning_content"] = json!(c.reasoning); }
                if !calls.is_empty() { message["tool_calls"] = json!(calls); }
                let logprobs = plan.logprobs.then(|| json!({"content": c.logprobs.iter().map(|(t, lp)| json!({
                    "token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": [],
                })).collect::<Vec<_>>()}));
                json!({"index": i, "message": message, "finish_reason": c.finish, "logprobs": logprobs})
            }).collect::<Vec<_>>(),
            "usage": usage,
        }),
    };
    with_request_id(axum::Json(body).into_response(), &id)
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

async fn stream_events(
    s: Arc<AppState>,
    plan: Plan,
    kind: Kind,
    id: String,
    mut merged: tokio_stream::StreamMap<usize, Generation>,
    tx: mpsc::Sender<Bytes>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let tok = s.tokenizer.clone();
    let created = now();
    // `lp`: the token's text and log-probability, when the request asked for them.
    let chunk = |i: usize,
                 delta: &Delta,
                 finish: Option<&str>,
                 calls: Option<Vec<Value>>,
                 lp: Option<(String, f32)>|
     -> Value {
        match kind {
            Kind::Completion => {
                let logprobs = lp.map(|(t, l)| json!({"tokens": [t], "token_logprobs": [l], "top_logprobs": null}));
                json!({"id": id, "object": "text_completion", "created": created, "model": s.model,
                    "choices": [{"index": i, "text": delta.content, "finish_reason": finish, "logprobs": logprobs}]})
            }
            Kind::Chat => {
                let mut d = json!({});
                if !delta.content.is_empty() {
                    d["content"] = json!(delta.content);
                }
                if !delta.reasoning.is_empty() {
                    d["reasoning_content"] = json!(delta.reasoning);
                }
                if let Some(calls) = calls {
                    d["tool_calls"] = json!(
                        calls
                            .into_iter()
                            .enumerate()
                            .map(|(k, mut c)| {
                                c["index"] = json!(k);
                                c
                            })
                            .collect::<Vec<_>>()
                    );
                }
                let logprobs = lp.map(|(t, l)| json!({"content": [{"token": t, "logprob": l, "bytes": t.as_bytes(), "top_logprobs": []}]}));
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": s.model,
                    "choices": [{"index": i, "delta": d, "finish_reason": finish, "logprobs": logprobs}]})
            }
        }
    };
    let mut texts: Vec<TextAssembler> = (0..plan.choices())
        .map(|_| TextAssembler::new(&tok, s.stop_ids.clone(), plan.stops.clone(), plan.reasoning, plan.tools))
        .collect();
    let mut completion_tokens = 0u32;
    if kind == Kind::Chat {
        for i in 0..plan.choices() as usize {
            let first = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": s.model,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
            if tx.send(sse(&first)).await.is_err() {
                return;
            }
        }
    }
    loop {
        let next = tokio::select! {
            next = merged.next() => next,
            // The client went away while no event was due (queued, prefilling): dropping
            // `merged` cancels the generations now, not at their first token.
            () = tx.closed() => return,
        };
        let Some((i, ev)) = next else { break };
        let out = match ev {
            Err(e) => {
                let _ = tx.send(sse(&ApiError::from(e).body())).await;
                return;
            }
            Ok(GenEvent::Token { id: token, logprob }) => {
                completion_tokens += 1;
                let Ok(d) = texts[i].push(token) else { continue };
                // With logprobs every token gets its chunk (possibly without text yet).
                let lp = logprob.filter(|_| plan.logprobs).map(|l| (tok.decode(&[token]).unwrap_or_default(), l));
                if texts[i].stopped {
                    if let Some(g) = merged.remove(&i) {
                        g.stopped_by_text();
                    }
                    Some(chunk(i, &d, Some("stop"), None, lp))
                } else if d.is_empty() && lp.is_none() {
                    None
                } else {
                    Some(chunk(i, &d, None, None, lp))
                }
            }
            Ok(GenEvent::Finished { reason, .. }) => {
                let d = texts[i].finish().unwrap_or_default();
                let calls = texts[i].tool_calls();
                let reason = finish_reason(reason, texts[i].stopped, !calls.is_empty());
                Some(chunk(i, &d, Some(reason), (!calls.is_empty()).then_some(calls), None))
            }
        };
        if let Some(v) = out
            && tx.send(sse(&v)).await.is_err()
        {
            return; // the client went away: dropping `merged` cancels the generations
        }
    }
    if plan.include_usage {
        let usage = json!({"id": id, "object": if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": created, "model": s.model, "choices": [],
            "usage": {"prompt_tokens": plan.prompt_tokens(), "completion_tokens": completion_tokens, "total_tokens": plan.prompt_tokens() + completion_tokens}});
        let _ = tx.send(sse(&usage)).await;
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}
