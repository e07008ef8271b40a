//! `expertmesh complete "…"` / `expertmesh chat "…"`: talk to a gateway over gRPC, streaming the
//! answer to stdout (reasoning, in thinking mode, to stderr).

use anyhow::Result;
use clap::Args;
use expertmesh_client::{Client, Event, Events, Message, Options};
use std::io::Write;
use tokio_stream::StreamExt;

use super::cluster::runtime;

#[derive(Args)]
pub struct ClientArgs {
    /// The prompt (complete) or the user's message (chat).
    pub text: String,
    /// The gateway's gRPC address.
    #[arg(long, env = "EXPERTMESH_GATEWAY", default_value = "http://127.0.0.1:8001")]
    pub gateway: String,
    #[arg(long, env = "EXPERTMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// chat: a system message first.
    #[arg(long)]
    pub system: Option<String>,
    /// chat: answer directly instead of reasoning first.
    #[arg(long)]
    pub no_thinking: bool,
}

impl ClientArgs {
    fn options(&self) -> Options {
        Options { max_tokens: self.max_tokens, temperature: self.temperature, seed: self.seed, ..Options::default() }
    }
}

/// Prints a stream; returns the finish reason.
pub async fn print_events(mut events: Events) -> Result<String> {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(e) = events.next().await {
        match e? {
            Event::Text { content, reasoning } => {
                write!(err, "{reasoning}")?;
                write!(out, "{content}")?;
                out.flush()?;
            }
            Event::Done { finish_reason, prompt_tokens, completion_tokens, .. } => {
                writeln!(out)?;
                eprintln!("[{finish_reason}: {prompt_tokens} prompt + {completion_tokens} generated tokens]");
                return Ok(finish_reason);
            }
        }
    }
    anyhow::bail!("the stream ended without a final event")
}

async fn connect(a: &ClientArgs) -> Result<Client> {
    let client = Client::connect(&a.gateway).await?;
    Ok(match &a.api_key {
        Some(k) => client.with_api_key(k)?,
        None => client,
    })
}

pub fn complete(a: ClientArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&a).await?;
        print_events(client.complete(&a.text, a.options()).await?).await.map(drop)
    })
}

pub fn chat(a: ClientArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&a).await?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message::system(s));
        }
        messages.push(Message::user(&a.text));
        print_events(client.chat(messages, !a.no_thinking, a.options()).await?).await.map(drop)
    })
}
