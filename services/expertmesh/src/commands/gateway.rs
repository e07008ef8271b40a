//! `expertmesh gateway`: the OpenAI-compatible HTTP API in front of the attention workers found
//! in the registry.

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_gateway::openai::{AppState, Limits};
use expertmesh_gateway::router::EngineRouter;
use expertmesh_gateway::{Tokenizer, server};
use expertmesh_runtime::registry::Registry;
use expertmesh_runtime::shutdown::Shutdown;
use std::path::PathBuf;
use std::sync::Arc;

use super::cluster::{RegistryArgs, runtime};

#[derive(Args, Clone, Debug)]
pub struct GatewayArgs {
    /// The model's `tokenizer.json` (Hugging Face format).
    #[arg(long, env = "EXPERTMESH_TOKENIZER")]
    pub tokenizer: PathBuf,
    /// HTTP address (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "EXPERTMESH_HTTP_LISTEN", default_value = "0.0.0.0:8000")]
    pub http_listen: String,
    /// gRPC address of `expertmesh.v1.Inference` (port 0 picks a free port).
    #[arg(long, env = "EXPERTMESH_GRPC_LISTEN", default_value = "0.0.0.0:8001")]
    pub grpc_listen: String,
    /// The model name clients use (`model` in requests, `/v1/models`).
    #[arg(long, env = "EXPERTMESH_MODEL_NAME", default_value = "deepseek-v4")]
    pub model_name: String,
    /// Accepted API keys (`Authorization: Bearer KEY`), comma separated; none = open.
    #[arg(long, env = "EXPERTMESH_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Requests handled at once; more are answered 429.
    #[arg(long, env = "EXPERTMESH_MAX_CONCURRENT", default_value_t = 1024)]
    pub max_concurrent: usize,
    /// Largest `max_tokens` accepted.
    #[arg(long, env = "EXPERTMESH_MAX_TOKENS_LIMIT", default_value_t = 32768)]
    pub max_tokens_limit: u32,
    /// `max_tokens` of requests that give none (a thinking reply spends its first tokens
    /// reasoning: raise this when clients rarely set `max_tokens`).
    #[arg(long, env = "EXPERTMESH_DEFAULT_MAX_TOKENS", default_value_t = 256)]
    pub default_max_tokens: u32,
    /// Largest prompt accepted, tokens.
    #[arg(long, env = "EXPERTMESH_MAX_PROMPT_TOKENS", default_value_t = 65536)]
    pub max_prompt_tokens: usize,
    /// Share of requests without a `traceparent` whose new trace is sampled (sampled traces
    /// reach the expert workers' debug logs; every trace id is in the gateway's and the
    /// attention workers' logs).
    #[arg(long, env = "EXPERTMESH_TRACE_SAMPLE_RATIO", default_value_t = 1.0)]
    pub trace_sample_ratio: f64,
    /// End-of-sequence token id (generation stops there).
    #[arg(long, env = "EXPERTMESH_EOS_TOKEN_ID", default_value_t = 1)]
    pub eos_token_id: u32,
}

impl GatewayArgs {
    pub fn state(&self, registry: &dyn Registry) -> Result<Arc<AppState>> {
        if self.default_max_tokens == 0 || self.default_max_tokens > self.max_tokens_limit {
            anyhow::bail!(
                "--default-max-tokens {} is not in 1..={} (--max-tokens-limit)",
                self.default_max_tokens,
                self.max_tokens_limit
            );
        }
        let tokenizer = Tokenizer::from_file(&self.tokenizer).with_context(|| "--tokenizer")?;
        let limits = Limits {
            max_tokens: self.max_tokens_limit,
            default_max_tokens: self.default_max_tokens,
            max_prompt_tokens: self.max_prompt_tokens,
            max_concurrent: self.max_concurrent,
            ..Limits::default()
        };
        Ok(Arc::new(AppState {
            engines: Arc::new(EngineRouter::new(registry.subscribe())),
            tokenizer: Arc::new(tokenizer),
            model: self.model_name.clone(),
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent)),
            limits,
            api_keys: self.api_keys.clone(),
            stop_ids: vec![self.eos_token_id],
            trace_sample_ratio: self.trace_sample_ratio.clamp(0.0, 1.0),
        }))
    }
}

#[derive(Args)]
pub struct GatewayCommand {
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(a: GatewayCommand) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let registry = a.registry.build()?;
        expertmesh_runtime::metrics::watch_registry(registry.clone());
        let state = a.gateway.state(registry.as_ref())?;
        let shutdown = Shutdown::new();
        tokio::spawn(shutdown.clone().on_signals());
        let grpc = server::start_grpc(state.clone(), &a.gateway.grpc_listen, shutdown.clone()).await?;
        let http = server::start(state, &a.gateway.http_listen, shutdown).await?;
        println!("gateway listening on {} (gRPC {})", http.url, grpc.url);
        let (h, g) = (http.task.await, grpc.task.await);
        registry.close().await;
        h??;
        Ok(g??)
    })
}
