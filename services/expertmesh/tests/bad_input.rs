//! Bad gRPC input to the expert and engine services gets a precise status naming the field, and
//! the services keep serving; a caller that goes away cancels its sequence.

mod common;

use common::{Worker, engine_client, generate, greedy_request, prompt, wait_ready};
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::generate_event::Event;
use expertmesh_proto::v1::{
    CancelRequest, Dtype, ForwardRequest, GenerateRequest, SamplingParams, StatsRequest, Tensor,
};
use expertmesh_runtime::testkit::EtcdServer;
use expertmesh_runtime::wire::{WireDType, encode};
use std::time::{Duration, Instant};
use tonic::Code;

const DIM: usize = 256;

fn good_call(tokens: usize) -> ForwardRequest {
    let hidden: Vec<f32> = (0..tokens * DIM).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    ForwardRequest {
        call_id: 9,
        layer: 3,
        hidden: Some(encode(&hidden, tokens, DIM, WireDType::Bf16)),
        expert_ids: (0..tokens as u32 * 4).map(|i| i % 4).collect(),
        weights: vec![0.25; tokens * 4],
        experts_per_token: 4,
        output_dtype: 0,
        trace_ids: vec![],
    }
}

async fn expect(
    client: &mut ExpertServiceClient<tonic::transport::Channel>,
    r: ForwardRequest,
    code: Code,
    field: &str,
) {
    let s = client.forward(r).await.expect_err("bad request accepted");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(s.message().contains(field), "{field:?} not named in {:?}", s.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expert_service_names_what_is_wrong_and_keeps_serving() {
    let worker = Worker::expert("0-7", &["--max-tokens-per-call", "8"]);
    let mut c = ExpertServiceClient::connect(worker.endpoint.clone()).await.unwrap();
    let hidden = |t: Tensor| Some(t);
    let base = good_call(2).hidden.unwrap();
    use Code::{InvalidArgument as Invalid, NotFound};
    expect(&mut c, ForwardRequest { hidden: None, ..good_call(2) }, Invalid, "hidden: missing").await;
    expect(
        &mut c,
        ForwardRequest { hidden: hidden(Tensor { dtype: 0, ..base.clone() }), ..good_call(2) },
        Invalid,
        "hidden.dtype",
    )
    .await;
    expect(
        &mut c,
        ForwardRequest { hidden: hidden(Tensor { dtype: 7, ..base.clone() }), ..good_call(2) },
        Invalid,
        "hidden.dtype",
    )
    .await;
    expect(
        &mut c,
        ForwardRequest { hidden: hidden(Tensor { shape: vec![2 * DIM as u64], ..base.clone() }), ..good_call(2) },
        Invalid,
        "hidden.shape",
    )
    .await;
    expect(
        &mut c,
        ForwardRequest { hidden: hidden(Tensor { shape: vec![4, 128], ..base.clone() }), ..good_call(2) },
        Invalid,
        "hidden.shape",
    )
    .await;
    expect(
        &mut c,
        ForwardRequest { hidden: hidden(Tensor { data: base.data[..100].to_vec(), ..base.clone() }), ..good_call(2) },
        Invalid,
        "hidden.data",
    )
    .await;
    let mut nan = vec![0.0f32; 2 * DIM];
    nan[300] = f32::NAN;
    expect(
        &mut c,
        ForwardRequest { hidden: hidden(encode(&nan, 2, DIM, WireDType::F32)), ..good_call(2) },
        Invalid,
        "hidden.data",
    )
    .await;
    expect(&mut c, ForwardRequest { layer: 99, ..good_call(2) }, Invalid, "layer").await;
    expect(&mut c, ForwardRequest { experts_per_token: 0, ..good_call(2) }, Invalid, "experts_per_token").await;
    expect(&mut c, ForwardRequest { expert_ids: vec![0; 7], ..good_call(2) }, Invalid, "expert_ids").await;
    expect(&mut c, ForwardRequest { weights: vec![0.5; 3], ..good_call(2) }, Invalid, "weights").await;
    let mut bad_id = good_call(2);
    bad_id.expert_ids[5] = 99;
    expect(&mut c, bad_id, Invalid, "expert_ids[5]").await;
    let mut bad_weight = good_call(2);
    bad_weight.weights[2] = f32::INFINITY;
    expect(&mut c, bad_weight, Invalid, "weights[2]").await;
    let mut not_held = good_call(2);
    not_held.expert_ids[1] = 12;
    expect(&mut c, not_held, NotFound, "expert 12").await;
    expect(&mut c, good_call(9), Invalid, "limit of 8").await;
    expect(&mut c, ForwardRequest { output_dtype: 5, ..good_call(2) }, Invalid, "output_dtype").await;

    // Still serving: a good call answers with [tokens, dim] in the request's dtype.
    let out = c.forward(good_call(3)).await.unwrap().into_inner();
    let t = out.output.unwrap();
    assert_eq!((t.shape.clone(), t.dtype, out.call_id), (vec![3, DIM as u64], Dtype::Bf16 as i32, 9));

    // The stream variant fails only the bad call.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c.forward_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(ForwardRequest { call_id: 1, layer: 42, ..good_call(1) }).await.unwrap();
    let r = replies.message().await.unwrap().unwrap();
    assert_eq!(r.call_id, 1);
    let e = r.error.expect("error reply");
    assert_eq!((e.code, e.message.contains("layer")), (Code::InvalidArgument as i32, true), "{e:?}");
    tx.send(ForwardRequest { call_id: 2, ..good_call(1) }).await.unwrap();
    let r = replies.message().await.unwrap().unwrap();
    assert_eq!((r.call_id, r.error.is_none(), r.output.unwrap().shape), (2, true, vec![1, DIM as u64]));
}

fn sampling(max_tokens: u32) -> Option<SamplingParams> {
    Some(SamplingParams { max_tokens, ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_service_names_what_is_wrong_keeps_serving_and_cancels_departed_callers() {
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let _experts = Worker::expert("0-15", &["--etcd", &e]);
    let attention = Worker::spawn("attention", &["--etcd", &e]);
    wait_ready(&attention.endpoint, 20).await;
    let mut c = engine_client(&attention.endpoint).await;
    let req = |prompt: Vec<u32>, sampling: Option<SamplingParams>| GenerateRequest {
        request_id: String::new(),
        prompt_tokens: prompt,
        sampling,
    };
    let cases = [
        (req(vec![], sampling(4)), "prompt_tokens"),
        (req(vec![1, 5000], sampling(4)), "prompt_tokens[1]"),
        (req(vec![1; 4096], sampling(4)), "context of 4096"),
        (req(vec![1, 2], None), "sampling"),
        (req(vec![1, 2], sampling(0)), "sampling.max_tokens"),
        (
            req(vec![1, 2], Some(SamplingParams { temperature: -1.0, max_tokens: 4, ..Default::default() })),
            "sampling.temperature",
        ),
        (req(vec![1, 2], Some(SamplingParams { top_p: 2.0, max_tokens: 4, ..Default::default() })), "sampling.top_p"),
    ];
    for (r, field) in cases {
        let s = c.generate(r).await.expect_err("bad request accepted");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(field), "{field:?} not named in {:?}", s.message());
    }
    let s = c.cancel(CancelRequest { request_id: String::new() }).await.unwrap_err();
    assert!(s.code() == Code::InvalidArgument && s.message().contains("request_id"));

    // Still serving.
    assert_eq!(generate(&mut c, greedy_request(prompt(1, 5), 4)).await.unwrap().len(), 4);

    // A caller that drops its stream mid-generation stops the work.
    let mut stream = c.generate(greedy_request(prompt(2, 5), 3000)).await.unwrap().into_inner();
    let mut seen = 0;
    while seen < 3 {
        if let Some(Event::Token(_)) = stream.message().await.unwrap().unwrap().event {
            seen += 1;
        }
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.get_stats(StatsRequest {}).await.unwrap().into_inner();
        if s.running == 0 {
            assert!(
                s.generated_tokens < 4 + 1000,
                "the dropped sequence stopped early ({} tokens)",
                s.generated_tokens
            );
            assert_eq!(s.kv_bytes_used, 0);
            break;
        }
        assert!(Instant::now() < deadline, "the dropped sequence is still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Cancel by id ends a request with reason CANCELLED.
    let mut r = greedy_request(prompt(3, 5), 3000);
    r.request_id = "to-cancel".into();
    let mut stream = c.generate(r).await.unwrap().into_inner();
    let mut reason = None;
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event {
            Some(Event::Token(t)) if t.index == 2 => {
                c.cancel(CancelRequest { request_id: "to-cancel".into() }).await.unwrap();
            }
            Some(Event::Finished(f)) => reason = Some((f.reason(), f.completion_tokens)),
            _ => {}
        }
    }
    let (reason, tokens) = reason.expect("finished event");
    assert_eq!(reason, expertmesh_proto::v1::FinishReason::Cancelled);
    assert!(tokens < 1000);
}
