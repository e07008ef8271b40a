//! Rust client for expertmesh's gRPC API (`expertmesh.v1.Inference` on the gateway).
//!
//! ```no_run
//! use expertmesh_client::{Client, Event, Options};
//! use tokio_stream::StreamExt;
//!
//! # async fn example() -> Result<(), expertmesh_client::ClientError> {
//! let mut client = Client::connect("http://127.0.0.1:8001").await?.with_api_key("secret")?;
//! let mut events = client.complete("The capital of France is", Options { max_tokens: 16, ..Options::default() }).await?;
//! while let Some(event) = events.next().await {
//!     match event? {
//!         Event::Text { content, .. } => print!("{content}"),
//!         Event::Done { finish_reason, completion_tokens, .. } => println!("\n[{finish_reason}, {completion_tokens} tokens]"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Chat uses DeepSeek-V4's chat format on the gateway; in thinking mode the model's reasoning
//! arrives as `reasoning` text, separate from the answer:
//!
//! ```no_run
//! use expertmesh_client::{Client, Event, Message, Options};
//! use tokio_stream::StreamExt;
//!
//! # async fn example() -> Result<(), expertmesh_client::ClientError> {
//! let mut client = Client::connect("http://127.0.0.1:8001").await?;
//! let messages = vec![Message::system("Be brief."), Message::user("Why is the sky blue?")];
//! let mut events = client.chat(messages, true, Options::default()).await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Text { content, reasoning } = event? {
//!         eprint!("{reasoning}");
//!         print!("{content}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use expertmesh_proto::v1::inference_client::InferenceClient;
use expertmesh_proto::v1::inference_event::Event as Wire;
use expertmesh_proto::v1::{
    ChatMessage, ChatRequest, DetokenizeRequest, GenerationOptions, InferenceRequest, ListModelsRequest, TokenList,
    TokenizeRequest, inference_request,
};
use std::pin::Pin;
use thiserror::Error;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

pub use expertmesh_proto::v1::ToolCall;

/// Errors keep the gRPC code the gateway answered with.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ClientError {
    #[error("{code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("invalid API key: {0}")]
    ApiKey(String),
}

impl ClientError {
    /// The gRPC code (`Unknown` for local errors).
    pub fn code(&self) -> tonic::Code {
        match self {
            ClientError::Status { code, .. } => *code,
            _ => tonic::Code::Unknown,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status { code: s.code(), message: s.message().to_string() }
    }
}

/// Generation options; zero values mean the gateway's defaults.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub max_tokens: u32,
    /// `None` = 1.0; `Some(0.0)` = greedy.
    pub temperature: Option<f32>,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl From<Options> for GenerationOptions {
    fn from(o: Options) -> Self {
        GenerationOptions {
            max_tokens: o.max_tokens,
            temperature: o.temperature,
            top_p: o.top_p,
            top_k: o.top_k,
            seed: o.seed,
            stop: o.stop,
        }
    }
}

/// One chat message.
#[derive(Clone, Debug, Default)]
pub struct Message(pub ChatMessage);

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message(ChatMessage { role: role.into(), content: content.into(), ..Default::default() })
    }
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Settled text: the answer, and (thinking mode) the reasoning.
    Text {
        content: String,
        reasoning: String,
    },
    Done {
        finish_reason: String,
        prompt_tokens: u32,
        completion_tokens: u32,
        tool_calls: Vec<ToolCall>,
    },
}

pub type Events = Pin<Box<dyn Stream<Item = Result<Event, ClientError>> + Send>>;

#[derive(Clone)]
pub struct Client {
    inner: InferenceClient<Channel>,
    api_key: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Connects to a gateway's gRPC address (`http://…`; `https://…` with the `tls` feature).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let fail = |e: &dyn std::fmt::Display| ClientError::Connect { url: url.to_string(), message: e.to_string() };
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| fail(&e))?.tcp_nodelay(true);
        #[cfg(feature = "tls")]
        let endpoint = if url.starts_with("https://") {
            endpoint.tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots()).map_err(|e| fail(&e))?
        } else {
            endpoint
        };
        let channel = endpoint.connect().await.map_err(|e| fail(&e))?;
        Ok(Client { inner: InferenceClient::new(channel), api_key: None })
    }

    /// Sends `authorization: Bearer KEY` with every call.
    pub fn with_api_key(mut self, key: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {key}").parse().map_err(|_| ClientError::ApiKey("not ASCII".into()))?;
        self.api_key = Some(value);
        Ok(self)
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(k) = &self.api_key {
            r.metadata_mut().insert("authorization", k.clone());
        }
        r
    }

    fn events(stream: tonic::Streaming<expertmesh_proto::v1::InferenceEvent>) -> Events {
        Box::pin(stream.filter_map(|item| match item {
            Err(s) => Some(Err(ClientError::from(s))),
            Ok(ev) => match ev.event? {
                Wire::Delta(d) => Some(Ok(Event::Text { content: d.content, reasoning: d.reasoning_content })),
                Wire::Done(d) => Some(Ok(Event::Done {
                    finish_reason: d.finish_reason,
                    prompt_tokens: d.prompt_tokens,
                    completion_tokens: d.completion_tokens,
                    tool_calls: d.tool_calls,
                })),
            },
        }))
    }

    /// Completes a text prompt, streaming.
    pub async fn complete(&mut self, prompt: &str, options: Options) -> Result<Events, ClientError> {
        let req = InferenceRequest {
            prompt: Some(inference_request::Prompt::Text(prompt.into())),
            options: Some(options.into()),
        };
        Ok(Self::events(self.inner.generate(self.request(req)).await?.into_inner()))
    }

    /// Completes a prompt given as token ids, streaming.
    pub async fn complete_tokens(&mut self, ids: Vec<u32>, options: Options) -> Result<Events, ClientError> {
        let req = InferenceRequest {
            prompt: Some(inference_request::Prompt::Tokens(TokenList { ids })),
            options: Some(options.into()),
        };
        Ok(Self::events(self.inner.generate(self.request(req)).await?.into_inner()))
    }

    /// One chat turn, streaming; `thinking` lets the model reason first.
    pub async fn chat(
        &mut self,
        messages: Vec<Message>,
        thinking: bool,
        options: Options,
    ) -> Result<Events, ClientError> {
        let req = ChatRequest {
            messages: messages.into_iter().map(|m| m.0).collect(),
            tools_json: Vec::new(),
            thinking,
            options: Some(options.into()),
        };
        Ok(Self::events(self.inner.chat(self.request(req)).await?.into_inner()))
    }

    pub async fn tokenize(&mut self, text: &str) -> Result<Vec<u32>, ClientError> {
        Ok(self.inner.tokenize(self.request(TokenizeRequest { text: text.into() })).await?.into_inner().ids)
    }

    pub async fn detokenize(&mut self, ids: Vec<u32>) -> Result<String, ClientError> {
        Ok(self.inner.detokenize(self.request(DetokenizeRequest { ids })).await?.into_inner().text)
    }

    pub async fn models(&mut self) -> Result<Vec<String>, ClientError> {
        Ok(self.inner.list_models(self.request(ListModelsRequest {})).await?.into_inner().models)
    }
}
