//! The gateway end to end through real processes (gateway + attention + experts, real etcd, the
//! real DeepSeek tokenizer, a tiny model with DeepSeek's vocabulary): HTTP chat and completions,
//! streaming parsed as an SSE client would, text equal to decoding the in-process engine's
//! tokens, failover of an attention worker mid-stream, and errors in OpenAI's shape.

mod common;

use common::Worker;
use common::http::{Http, VOCAB, events, finish, gateway_flags, post, send, tokenizer_path};
use expertmesh_gateway::Tokenizer;
use expertmesh_runtime::testkit::EtcdServer;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Cluster {
    gateway: Worker,
    attention: Vec<Worker>,
    _experts: Vec<Worker>,
    _etcd: EtcdServer,
}

fn cluster(attention_workers: usize, gateway_args: &[&str]) -> Cluster {
    cluster_with(attention_workers, &[], gateway_args)
}

fn cluster_with(attention_workers: usize, attention_args: &[&str], gateway_args: &[&str]) -> Cluster {
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let base = ["--vocab-size", VOCAB, "--etcd", e.as_str(), "--lease-ttl", "2"];
    let experts = vec![Worker::expert("0-7", &base), Worker::expert("8-15", &base)];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--wire-dtype", "f32"]);
    args.extend_from_slice(attention_args);
    let attention = (0..attention_workers).map(|_| Worker::spawn("attention", &args)).collect();
    let mut gw = gateway_flags(&tokenizer_path(), &e, "/expertmesh");
    gw.extend(gateway_args.iter().map(|a| a.to_string()));
    let gw: Vec<&str> = gw.iter().map(String::as_str).collect();
    let gateway = Worker::spawn_plain("gateway", &gw);
    // Ready when an engine is registered and can serve (experts registered too).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // (A key the keyed cluster accepts; an open gateway ignores it.)
        let r = post(
            &gateway.endpoint,
            "/v1/completions",
            &json!({"prompt": [5, 6], "max_tokens": 1}),
            &[("Authorization", "Bearer k1")],
        );
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "cluster never served: {} {}", r.status, r.body);
        std::thread::sleep(Duration::from_millis(100));
    }
    Cluster { gateway, attention, _experts: experts, _etcd: etcd }
}

#[test]
fn completions_and_chat_over_http_streaming_and_not() {
    let c = cluster(1, &[]);
    let url = &c.gateway.endpoint;
    let tok = Tokenizer::from_file(&tokenizer_path()).unwrap();

    // Non-streaming completion (greedy): the text is the decode of the in-process engine's tokens.
    let prompt = "The capital of France is";
    let r = post(url, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0}), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let ids = tok.encode(prompt).unwrap();
    // Experts grouped like the cluster's two shards, f32 wire: the same arithmetic (see common).
    let expected_tokens =
        common::Reference::grouped_with_vocab(&[0..8, 8..16], VOCAB.parse().unwrap()).greedy(&ids, 10);
    let eos_at = expected_tokens.iter().position(|&t| t == 1).unwrap_or(expected_tokens.len());
    assert_eq!(v["choices"][0]["text"], tok.decode(&expected_tokens[..eos_at]).unwrap());
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    // The same prompt as a one-element list (LangChain's `OpenAI` sends that), as text and as ids.
    for list in [json!([prompt]), json!([ids])] {
        let r = post(url, "/v1/completions", &json!({"prompt": list, "max_tokens": 10, "temperature": 0}), &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let w: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(w["choices"][0]["text"], v["choices"][0]["text"], "{list}");
    }
    // A batch of prompts: n choices per prompt, prompt by prompt, each as the prompt alone gives.
    let other = "Two plus two is";
    let alone = post(url, "/v1/completions", &json!({"prompt": other, "max_tokens": 10, "temperature": 0}), &[]);
    let alone: Value = serde_json::from_str(&alone.body).unwrap();
    let batch = json!({"prompt": [prompt, other], "max_tokens": 10, "temperature": 0, "n": 2});
    for stream in [false, true] {
        let mut body = batch.clone();
        body["stream"] = json!(stream);
        let r = post(url, "/v1/completions", &body, &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let mut texts = vec![String::new(); 4];
        if stream {
            for e in events(&r.body) {
                let c = &e["choices"][0];
                texts[c["index"].as_u64().unwrap() as usize] += c["text"].as_str().unwrap_or("");
            }
        } else {
            let w: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(w["usage"]["prompt_tokens"], ids.len() + tok.encode(other).unwrap().len());
            for c in w["choices"].as_array().unwrap() {
                texts[c["index"].as_u64().unwrap() as usize] = c["text"].as_str().unwrap().to_string();
            }
        }
        let want = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
        assert_eq!(texts, [want(&v), want(&v), want(&alone), want(&alone)], "stream: {stream}");
    }

    // Log-probabilities of the generated tokens (the greedy token is the most likely one, so its
    // log-probability is the largest of the step: ≤ 0 and > ln(1/vocab)).
    let r = post(
        url,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 0}),
        &[],
    );
    let lp: Value = serde_json::from_str(&r.body).unwrap();
    let values = lp["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(values.len() as u64, lp["usage"]["completion_tokens"].as_u64().unwrap());
    assert!(values.iter().all(|v| v.as_f64().is_some_and(|x| x <= 0.0 && x > -(129_280f64).ln())), "{values:?}");
    assert_eq!(lp["choices"][0]["text"], v["choices"][0]["text"]);
    // Streamed: one log-probability per token, the same values.
    let r = post(
        url,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 0, "stream": true}),
        &[],
    );
    let streamed: Vec<Value> = events(&r.body)
        .iter()
        .flat_map(|e| e["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(&streamed, values);

    // Streaming: the concatenated deltas equal the non-streaming text; usage comes last.
    let r = post(
        url,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
        &[],
    );
    assert_eq!(r.status, 200);
    let evs = events(&r.body);
    let text: String = evs.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());
    assert_eq!(evs.last().unwrap()["usage"]["completion_tokens"], v["usage"]["completion_tokens"]);

    // Chat in thinking mode: the reply is reasoning (the prompt opened <think>); streamed deltas
    // add up to the non-streaming message; finish reason and usage are present.
    let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! 你好"}], "max_tokens": 8, "temperature": 0});
    let r = post(url, "/v1/chat/completions", &chat, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let full: Value = serde_json::from_str(&r.body).unwrap();
    let msg = &full["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let evs = events(&post(url, "/v1/chat/completions", &streamed, &[]).body);
    assert_eq!(evs[0]["choices"][0]["delta"]["role"], "assistant");
    let cat = |field: &str| evs.iter().filter_map(|e| e["choices"][0]["delta"][field].as_str()).collect::<String>();
    assert_eq!(cat("reasoning_content"), msg["reasoning_content"].as_str().unwrap());
    assert_eq!(cat("content"), msg["content"].as_str().unwrap());
    assert_eq!(evs.last().unwrap()["choices"][0]["finish_reason"], full["choices"][0]["finish_reason"]);

    // A seed reproduces a sampled generation run the same way (here: alone on the engine). Not
    // across batch compositions: a decode token computed in a step with another sequence's
    // prefill takes the GEMM path, whose sums differ in the last bits from the matrix-vector
    // path's, and that can flip a sampled token (as in engines without a batch-invariant mode).
    // So the n = 2 request, whose two sequences the engine may admit in one step or in two, is
    // checked for distinct choices (seed + index), not against a rerun.
    let sampled = json!({"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 11});
    let a: Value = serde_json::from_str(&post(url, "/v1/completions", &sampled, &[]).body).unwrap();
    let b: Value = serde_json::from_str(&post(url, "/v1/completions", &sampled, &[]).body).unwrap();
    assert_eq!(a["choices"], b["choices"]);
    let mut two = sampled.clone();
    two["n"] = json!(2);
    let two: Value = serde_json::from_str(&post(url, "/v1/completions", &two, &[]).body).unwrap();
    assert_ne!(two["choices"][0]["text"], two["choices"][1]["text"]);

    // A stop string ends the text before it (here: the third word of the greedy text).
    let greedy = v["choices"][0]["text"].as_str().unwrap().to_string();
    if let Some(word) = greedy.split_whitespace().nth(2) {
        let r = post(
            url,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "stop": word}),
            &[],
        );
        let s: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(s["choices"][0]["text"].as_str().unwrap(), &greedy[..greedy.find(word).unwrap()]);
        assert_eq!(s["choices"][0]["finish_reason"], "stop");
    }

    // Errors in OpenAI's shape, naming the parameter; the gateway keeps serving.
    for (body, status, param) in [
        (json!({"prompt": "x", "max_tokens": 0}), 400, "max_tokens"),
        (json!({"prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
        (json!({"prompt": "x", "n": 99}), 400, "n"),
        (json!({"prompt": "x", "top_p": 5}), 400, "top_p"),
        (json!({"prompt": "x", "model": "gpt-9"}), 404, ""),
        (json!({"prompt": ""}), 400, "prompt"),
    ] {
        let r = post(url, "/v1/completions", &body, &[]);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let e: Value = serde_json::from_str(&r.body).unwrap();
        assert!(e["error"]["message"].as_str().unwrap().contains(param), "{}", r.body);
    }
    let r = post(url, "/v1/chat/completions", &json!({"messages": [{"role": "robot", "content": "x"}]}), &[]);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("messages[0].role"), "{}", r.body);
    // response_format: the schema goes into the prompt as DeepSeek's chat format states it (the
    // prompt is exactly the encoder's with that schema); json_object asks for any object.
    let messages = json!([{"role": "user", "content": "Reply in JSON."}]);
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]});
    for (format, expected) in [
        (json!({"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}), Some(schema.clone())),
        (json!({"type": "json_object"}), Some(json!({"type": "object"}))),
        (json!({"type": "text"}), None),
    ] {
        let body = json!({"messages": messages, "max_tokens": 1, "response_format": format});
        let r = post(url, "/v1/chat/completions", &body, &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let opts =
            expertmesh_gateway::ChatOptions { drop_thinking: true, response_format: expected, ..Default::default() };
        let parsed: Vec<expertmesh_gateway::Message> = serde_json::from_value(messages.clone()).unwrap();
        let prompt = tok.encode(&expertmesh_gateway::encode_chat(&parsed, &opts).unwrap()).unwrap();
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], prompt.len(), "{format}");
    }
    for (format, param) in [
        (json!({"type": "yaml"}), "response_format.type"),
        (json!({"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    ] {
        let r = post(url, "/v1/chat/completions", &json!({"messages": messages, "response_format": format}), &[]);
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains(param), "{}", r.body);
    }
    // The same through the gRPC SDK: streamed text equals the HTTP answers.
    let grpc_url = c.gateway.line.split("(gRPC ").nth(1).unwrap().trim_end_matches(')').to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use expertmesh_client::{Client, Event, Message, Options};
        use tokio_stream::StreamExt;
        let mut client = Client::connect(&grpc_url).await.unwrap();
        assert_eq!(client.models().await.unwrap(), ["deepseek-v4"]);
        let text = "多语言 multilingual テキスト — ok 🚀";
        let ids = client.tokenize(text).await.unwrap();
        assert_eq!(ids, tok.encode(text).unwrap());
        assert_eq!(client.detokenize(ids).await.unwrap(), text);
        let greedy = Options { max_tokens: 10, temperature: Some(0.0), ..Options::default() };
        let collect = |mut events: expertmesh_client::Events| async move {
            let (mut content, mut reasoning, mut done) = (String::new(), String::new(), None);
            while let Some(e) = events.next().await {
                match e.unwrap() {
                    Event::Text { content: c, reasoning: r } => {
                        content += &c;
                        reasoning += &r;
                    }
                    Event::Done { finish_reason, .. } => done = Some(finish_reason),
                }
            }
            (content, reasoning, done.expect("a final event"))
        };
        let (content, _, _) = collect(client.complete(prompt, greedy.clone()).await.unwrap()).await;
        assert_eq!(content, v["choices"][0]["text"].as_str().unwrap());
        let messages = vec![Message::system("Be brief."), Message::user("Hello! 你好")];
        let (content, reasoning, finish) =
            collect(client.chat(messages, true, Options { max_tokens: 8, ..greedy }).await.unwrap()).await;
        assert_eq!(
            (content.as_str(), reasoning.as_str()),
            (msg["content"].as_str().unwrap(), msg["reasoning_content"].as_str().unwrap())
        );
        assert_eq!(finish, full["choices"][0]["finish_reason"].as_str().unwrap());
        let err = client.complete("x", Options { top_p: 3.0, ..Options::default() }).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.to_string().contains("top_p"));
    });

    let big = "x".repeat(5 << 20);
    let r = finish(Vec::new(), send(url, "POST", "/v1/completions", &json!({"prompt": big}).to_string(), &[]));
    assert_eq!(r.status, 413);
    assert_eq!(post(url, "/v1/completions", &json!({"prompt": [5, 6], "max_tokens": 2}), &[]).status, 200);
}

#[test]
fn an_attention_worker_dying_mid_stream_loses_no_token() {
    let mut c = cluster(2, &["--api-keys", "k1,k2"]);
    let url = c.gateway.endpoint.clone();
    let auth = [("Authorization", "Bearer k2")];
    for headers in [&[][..], &[("Authorization", "Bearer wrong")][..]] {
        let r = post(&url, "/v1/completions", &json!({"prompt": "x", "max_tokens": 1}), headers);
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(r.body.contains("authentication_error"));
    }

    let body = json!({"prompt": "Once upon a time", "max_tokens": 120, "temperature": 0, "stream": true});
    let expected: Value = serde_json::from_str(
        &post(
            &url,
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 120, "temperature": 0}),
            &auth,
        )
        .body,
    )
    .unwrap();
    let mut stream = send(&url, "POST", "/v1/completions", &body.to_string(), &auth);
    // Read until a few tokens have arrived, then kill the worker that is generating them.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while raw.windows(6).filter(|w| w == b"data: ").count() < 4 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        raw.extend_from_slice(&buf[..n]);
    }
    let busy = c.attention.iter().position(|w| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut client = common::engine_client(&w.endpoint).await;
            client.get_stats(expertmesh_proto::v1::StatsRequest {}).await.unwrap().into_inner().running > 0
        })
    });
    c.attention[busy.expect("one worker is generating")].kill9();
    let r = finish(raw, stream);
    let text: String = events(&r.body).iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    assert_eq!(
        text,
        expected["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{expected}")),
        "no token lost or repeated"
    );
}

#[test]
fn bad_requests_disconnects_and_overload() {
    let c = cluster(1, &["--max-concurrent", "2", "--default-max-tokens", "3"]);
    let url = c.gateway.endpoint.clone();
    let raw = |body: &[u8]| {
        let addr = url.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        finish(Vec::new(), s)
    };
    let check = |r: Http, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        let e: Value = serde_json::from_str(&r.body).unwrap_or_else(|_| panic!("error body is JSON: {}", r.body));
        assert!(e["error"]["message"].as_str().unwrap().contains(needle), "{needle:?} not in {}", r.body);
        assert!(e["error"]["type"].is_string());
    };
    // A request without max_tokens gets the gateway's --default-max-tokens.
    let r = post(&url, "/v1/completions", &json!({"prompt": [5, 6], "temperature": 0}), &[]);
    let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|_| panic!("{}", r.body));
    assert_eq!(
        (v["usage"]["completion_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()),
        (Some(3), Some("length")),
        "{}",
        r.body
    );
    check(raw(b"{not json"), 400, "body");
    check(raw(b"{\"prompt\": \"\xff\xfe\"}"), 400, "");
    check(post(&url, "/v1/chat/completions", &json!({"messages": "hi"}), &[]), 400, "messages");
    check(post(&url, "/v1/chat/completions", &json!({"messages": []}), &[]), 400, "messages");
    check(post(&url, "/v1/completions", &json!({"prompt": "x", "max_tokens": 1_000_000}), &[]), 400, "max_tokens");
    check(post(&url, "/v1/completions", &json!({"prompt": "x", "stop": ["ab".repeat(600)]}), &[]), 400, "stop");
    check(post(&url, "/v1/completions", &json!({"prompt": [[5], []]}), &[]), 400, "prompt[1]");
    check(post(&url, "/v1/completions", &json!({"prompt": vec!["x"; 33]}), &[]), 400, "at most 32");
    // Over the model's context (4096 positions): the engine's verdict, passed through, naming
    // the request's field.
    let long: Vec<u32> = (0..5000).map(|i| 100 + i % 1000).collect();
    let r = post(&url, "/v1/completions", &json!({"prompt": long, "max_tokens": 4}), &[]);
    assert_eq!(serde_json::from_str::<Value>(&r.body).unwrap()["error"]["param"], "prompt", "{}", r.body);
    check(r, 400, "context");
    // Streamed too: the status is the rejection's, not a 200 followed by an error event.
    check(
        post(&url, "/v1/completions", &json!({"prompt": long, "max_tokens": 4, "stream": true}), &[]),
        400,
        "context",
    );

    // A client that disconnects mid-stream stops the engine's work.
    let mut s = send(
        &url,
        "POST",
        "/v1/completions",
        &json!({"prompt": "Tell a long story", "max_tokens": 2000, "stream": true}).to_string(),
        &[],
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stats = || {
        rt.block_on(async {
            let mut client = common::engine_client(&c.attention[0].endpoint).await;
            client.get_stats(expertmesh_proto::v1::StatsRequest {}).await.unwrap().into_inner()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats().running > 0 {
        assert!(Instant::now() < deadline, "the abandoned sequence kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(stats().generated_tokens < 1000, "stopped long before max_tokens");

    // More concurrent requests than the limit (2): the excess get 429 at once, the rest finish.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = post(
                    &url,
                    "/v1/completions",
                    &json!({"prompt": format!("story {i}"), "max_tokens": 40, "stream": true}),
                    &[],
                );
                (r, t.elapsed())
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        let (r, took) = h.join().unwrap();
        match r.status {
            200 => {
                assert_eq!(events(&r.body).iter().filter(|e| e["choices"][0]["finish_reason"].is_string()).count(), 1);
                ok += 1;
            }
            429 => {
                // At once: no generation ran for it (the admitted ones take seconds).
                assert!(took < Duration::from_secs(5), "429 took {took:?}");
                assert!(r.body.contains("rate_limit_error"));
                refused += 1;
            }
            other => panic!("unexpected status {other}: {}", r.body),
        }
    }
    assert!(ok >= 2 && refused >= 1, "{ok} served, {refused} refused");
    // And the gateway still serves.
    assert_eq!(post(&url, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2}), &[]).status, 200);

    // A gateway with no attention worker answers 503 at once (and is not ready).
    let flags = gateway_flags(&tokenizer_path(), &c._etcd.endpoint(), "/nobody");
    let lonely = Worker::spawn_plain("gateway", &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let t = Instant::now();
    check(post(&lonely.endpoint, "/v1/completions", &json!({"prompt": "x"}), &[]), 503, "no attention worker");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(finish(Vec::new(), send(&lonely.endpoint, "GET", "/ready", "", &[])).status, 503);
}

/// A client that disconnects while its request waits in the engine's queue (or prefills) frees
/// it at once, over HTTP (SSE) and gRPC alike: the request leaves the queue while the one ahead
/// of it still runs, rather than being admitted, prefilled and cancelled at its first token.
#[test]
fn a_client_gone_while_queued_frees_its_request() {
    let c = cluster_with(1, &["--max-running", "1"], &[]);
    let url = c.gateway.endpoint.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stats = || {
        rt.block_on(async {
            let mut client = common::engine_client(&c.attention[0].endpoint).await;
            client.get_stats(expertmesh_proto::v1::StatsRequest {}).await.unwrap().into_inner()
        })
    };
    let wait_for = |what: &str, done: &dyn Fn(&expertmesh_proto::v1::EngineStats) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = stats();
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The one running request: long enough to outlast everything below.
    let long = json!({"prompt": "Tell a long story", "max_tokens": 4000, "stream": true});
    let running = send(&url, "POST", "/v1/completions", &long.to_string(), &[]);
    wait_for("the long request runs", &|s| s.running == 1);

    // An SSE client queued behind it, then gone.
    let queued = send(
        &url,
        "POST",
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 8, "stream": true}).to_string(),
        &[],
    );
    wait_for("the second request queues", &|s| s.waiting == 1);
    drop(queued);
    let s = wait_for("the abandoned request leaves the queue", &|s| s.waiting == 0);
    assert_eq!(s.running, 1, "it left because the queue moved on: {s:?}");

    // A gRPC client queued behind it, then gone.
    let grpc_url = c.gateway.line.split("(gRPC ").nth(1).unwrap().trim_end_matches(')').to_string();
    let (client, events) = rt.block_on(async {
        let mut client = expertmesh_client::Client::connect(&grpc_url).await.unwrap();
        let options = expertmesh_client::Options { max_tokens: 8, ..Default::default() };
        let events = client.complete("hi", options).await.unwrap();
        (client, events)
    });
    wait_for("the gRPC request queues", &|s| s.waiting == 1);
    drop(events);
    let s = wait_for("the abandoned gRPC request leaves the queue", &|s| s.waiting == 0);
    assert_eq!(s.running, 1, "it left because the queue moved on: {s:?}");
    drop(client);
    drop(running);
}

/// An attention worker is routed to only while it can serve. Started before any expert worker,
/// it stays out of the registry: the gateway is not ready and answers 503 at once, rather than
/// sending requests it must fail. It joins when every routed expert has a live replica, and
/// leaves again when a range of experts loses its last one.
#[test]
fn attention_workers_are_routed_to_only_while_ready() {
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let base = ["--vocab-size", VOCAB, "--etcd", e.as_str(), "--lease-ttl", "2"];
    let _attention = Worker::spawn("attention", &base);
    let gw = gateway_flags(&tokenizer_path(), &e, "/expertmesh");
    let gateway = Worker::spawn_plain("gateway", &gw.iter().map(String::as_str).collect::<Vec<_>>());
    let ready = || finish(Vec::new(), send(&gateway.endpoint, "GET", "/ready", "", &[])).status;
    let wait_until = |status: u16, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ready() != status {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Long enough for a registered worker to reach the gateway's view (tens of milliseconds).
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        assert_eq!(ready(), 503, "the gateway routes to an attention worker that has no experts");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let r = post(&gateway.endpoint, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2}), &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(2), "refused at once: {:?}", t.elapsed());

    let mut experts = [Worker::expert("0-7", &base), Worker::expert("8-15", &base)];
    wait_until(200, "the attention worker never joined once its experts were up");
    let r = post(&gateway.endpoint, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2}), &[]);
    assert_eq!(r.status, 200, "{}", r.body);

    experts[1].kill9();
    wait_until(503, "the attention worker stayed routed to after experts 8-15 lost their last replica");
}
