//! `expertmesh.v1.Inference`: the gateway's gRPC API, the same validation, routing, failover
//! and text handling as the HTTP API (API keys as `authorization: Bearer KEY` metadata).

use expertmesh_proto::v1::inference_server::Inference;
use expertmesh_proto::v1::{
    ChatRequest as GrpcChat, DetokenizeRequest, DetokenizeResponse, Done, GenerationOptions, InferenceEvent,
    InferenceRequest, ListModelsRequest, ListModelsResponse, TextDelta, TokenizeRequest, TokenizeResponse, ToolCall,
    inference_event::Event, inference_request,
};
use serde_json::Value;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::chat::{self, ChatOptions, Content, FunctionCall, Message, ThinkingMode};
use crate::generation::{self, GenEvent};
use crate::observe::gateway_metrics;
use crate::openai::ApiError;
use crate::openai::AppState;
use crate::openai::handlers::{Plan, RequestContext, check_key, finish_reason, plan};
use crate::openai::requests::{OneOrMany, Sampling};
use crate::openai::text::TextAssembler;
use expertmesh_runtime::metrics::ErrorKind;
use expertmesh_runtime::trace::TRACEPARENT;
use tracing::Instrument;

pub struct InferenceService {
    state: Arc<AppState>,
}

impl InferenceService {
    pub fn new(state: Arc<AppState>) -> Self {
        InferenceService { state }
    }

    fn authorize<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let value = r.metadata().get("authorization").and_then(|v| v.to_str().ok());
        Ok(check_key(&self.state, value)?)
    }

    fn sampling(o: Option<GenerationOptions>) -> Sampling {
        let o = o.unwrap_or_default();
        Sampling {
            max_tokens: (o.max_tokens > 0).then_some(o.max_tokens),
            temperature: o.temperature,
            top_p: (o.top_p > 0.0).then_some(o.top_p),
            top_k: (o.top_k > 0).then_some(o.top_k),
            seed: o.seed,
            stop: (!o.stop.is_empty()).then_some(OneOrMany::Many(o.stop)),
            ..Sampling::default()
        }
    }

    fn context<T>(&self, r: &Request<T>, prefix: &str) -> RequestContext {
        let traceparent = r.metadata().get(TRACEPARENT).and_then(|v| v.to_str().ok());
        RequestContext::new(prefix, traceparent, self.state.trace_sample_ratio)
    }

    /// Starts a planned request within its span; a refusal (bad plan, overload, no worker) is
    /// counted and logged.
    fn start(&self, plan: Result<Plan, Status>, ctx: RequestContext) -> Result<Response<EventStream>, Status> {
        let span = ctx.span();
        let _in_span = span.enter();
        plan.and_then(|p| self.run(p, ctx)).map(Response::new).inspect_err(|status| {
            gateway_metrics().failed(ErrorKind::of_code(status.code()));
            tracing::info!(code = ?status.code(), message = status.message(), "request refused");
        })
    }

    /// Runs a plan; events stream back (the stream's end cancels the generation).
    fn run(&self, plan: Plan, ctx: RequestContext) -> Result<EventStream, Status> {
        let permit = self
            .state
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many requests in flight"))?;
        if self.state.engines.workers() == 0 {
            return Err(Status::unavailable("no attention worker is available"));
        }
        tracing::info!(prompt_tokens = plan.prompt_tokens(), "request accepted");
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let task = async move {
            let _permit = permit;
            let mut events = generation::start(
                state.engines.clone(),
                ctx.generation(0, plan.prompts[0].clone(), plan.sampling.clone()),
            );
            let mut text = TextAssembler::new(
                &state.tokenizer,
                state.stop_ids.clone(),
                plan.stops.clone(),
                plan.reasoning,
                plan.tools,
            );
            let mut completion_tokens = 0u32;
            loop {
                let next = tokio::select! {
                    next = events.recv() => next,
                    () = tx.closed() => return, // the client went away while no event was due
                };
                let Some(ev) = next else { break };
                if let Ok(GenEvent::Token { .. }) = ev {
                    completion_tokens += 1;
                }
                let out = match ev {
                    Err(e) => Err(Status::from(ApiError::from(e))),
                    Ok(GenEvent::Token { id, .. }) => match text.push(id) {
                        Err(e) => Err(Status::internal(e.to_string())),
                        Ok(d) if d.is_empty() && !text.stopped => continue,
                        Ok(d) => Ok(Event::Delta(TextDelta {
                            content: d.content,
                            reasoning_content: d.reasoning,
                            token_ids: vec![id],
                        })),
                    },
                    Ok(GenEvent::Finished { reason, prompt_tokens, completion_tokens }) => {
                        let d = text.finish().unwrap_or_default();
                        if !d.is_empty() {
                            let delta = Event::Delta(TextDelta {
                                content: d.content,
                                reasoning_content: d.reasoning,
                                token_ids: vec![],
                            });
                            if tx.send(Ok(InferenceEvent { event: Some(delta) })).await.is_err() {
                                return;
                            }
                        }
                        let calls: Vec<ToolCall> = text.tool_calls().iter().map(to_tool_call).collect();
                        let reason = finish_reason(reason, text.stopped, !calls.is_empty()).to_string();
                        let done = Done { finish_reason: reason, prompt_tokens, completion_tokens, tool_calls: calls };
                        let _ = tx.send(Ok(InferenceEvent { event: Some(Event::Done(done)) })).await;
                        return;
                    }
                };
                let stop_now = text.stopped;
                if tx.send(out.map(|e| InferenceEvent { event: Some(e) })).await.is_err() || stop_now {
                    if stop_now {
                        events.stopped_by_text();
                        let done = Done {
                            finish_reason: "stop".into(),
                            prompt_tokens: plan.prompt_tokens(),
                            completion_tokens,
                            ..Default::default()
                        };
                        let _ = tx.send(Ok(InferenceEvent { event: Some(Event::Done(done)) })).await;
                    }
                    return;
                }
            }
        };
        tokio::spawn(task.in_current_span());
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Token ids of a request's text, tokenized off the async runtime; errors name `field`.
    async fn encode_text(&self, text: String, field: &str) -> Result<Vec<u32>, Status> {
        self.state
            .tokenizer
            .encode_off_runtime(text)
            .await
            .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
    }

    async fn generate_plan(&self, request: Request<InferenceRequest>) -> Result<Plan, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let prompt = match r.prompt {
            Some(inference_request::Prompt::Text(t)) => self.encode_text(t, "prompt").await?,
            Some(inference_request::Prompt::Tokens(t)) => t.ids,
            None => return Err(Status::invalid_argument("prompt: missing (text or tokens)")),
        };
        Ok(plan(&self.state, &Self::sampling(r.options), vec![prompt])?)
    }

    async fn chat_plan(&self, request: Request<GrpcChat>) -> Result<Plan, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        if r.messages.is_empty() {
            return Err(Status::invalid_argument("messages: empty"));
        }
        let tools = r
            .tools_json
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::from_str::<Value>(t).map_err(|e| Status::invalid_argument(format!("tools_json[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let opts = ChatOptions {
            thinking: if r.thinking { ThinkingMode::Thinking } else { ThinkingMode::Chat },
            drop_thinking: true,
            tools: tools.clone(),
            ..ChatOptions::default()
        };
        let messages: Vec<Message> = r.messages.into_iter().map(to_message).collect();
        let text =
            chat::encode_chat(&messages, &opts).map_err(|e| Status::invalid_argument(format!("messages: {e}")))?;
        let prompt = self.encode_text(text, "messages").await?;
        let mut plan = plan(&self.state, &Self::sampling(r.options), vec![prompt])?;
        plan.reasoning = r.thinking;
        plan.tools = !tools.is_empty();
        Ok(plan)
    }
}

fn to_tool_call(v: &Value) -> ToolCall {
    ToolCall {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        name: v["function"]["name"].as_str().unwrap_or_default().to_string(),
        arguments: v["function"]["arguments"].as_str().unwrap_or_default().to_string(),
    }
}

fn to_message(m: expertmesh_proto::v1::ChatMessage) -> Message {
    let optional = |s: String| (!s.is_empty()).then_some(s);
    Message {
        role: m.role,
        content: Some(Content::Text(m.content)),
        reasoning_content: optional(m.reasoning_content),
        tool_call_id: optional(m.tool_call_id),
        tool_calls: (!m.tool_calls.is_empty()).then(|| {
            m.tool_calls
                .into_iter()
                .map(|c| chat::ToolCall {
                    id: optional(c.id),
                    function: FunctionCall { name: c.name, arguments: c.arguments },
                })
                .collect()
        }),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<InferenceEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = EventStream;
    type ChatStream = EventStream;

    async fn generate(&self, request: Request<InferenceRequest>) -> Result<Response<EventStream>, Status> {
        let ctx = self.context(&request, "cmpl");
        self.start(self.generate_plan(request).await, ctx)
    }

    async fn chat(&self, request: Request<GrpcChat>) -> Result<Response<EventStream>, Status> {
        let ctx = self.context(&request, "chatcmpl");
        self.start(self.chat_plan(request).await, ctx)
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        self.authorize(&request)?;
        let ids = self.encode_text(request.into_inner().text, "text").await?;
        Ok(Response::new(TokenizeResponse { ids }))
    }

    async fn detokenize(&self, request: Request<DetokenizeRequest>) -> Result<Response<DetokenizeResponse>, Status> {
        self.authorize(&request)?;
        let text = self
            .state
            .tokenizer
            .decode(&request.into_inner().ids)
            .map_err(|e| Status::invalid_argument(format!("ids: {e}")))?;
        Ok(Response::new(DetokenizeResponse { text }))
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(ListModelsResponse { models: vec![self.state.model.clone()] }))
    }
}
