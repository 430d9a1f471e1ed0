//! The OpenAI-compatible provider against a local server speaking Chat Completions.

mod common;

use std::time::{Duration, Instant};

use common::{Reply, complete, openai_sse, request, serve, tokens};
use keel_models::{
    FinishReason, Message, ModelError, ModelProvider, OpenAiProvider, PriceTable, ProviderConfig, ToolCall, ToolSpec,
};
use rust_decimal::Decimal;
use serde_json::json;

const KEY: &str = "sk-test-secret-123";

fn provider(base_url: &str, stream: bool) -> OpenAiProvider {
    let config = ProviderConfig::new(keel_models::ProviderKind::Openai)
        .with_base_url(base_url)
        .with_api_key(KEY)
        .with_stream(stream)
        .with_timeout(Duration::from_secs(5))
        .with_retries(3, Duration::from_millis(10), Duration::from_secs(2));
    OpenAiProvider::new(&config, PriceTable::builtin()).unwrap()
}

fn tool() -> ToolSpec {
    ToolSpec {
        name: "fs__read".into(),
        description: "Read a file".into(),
        parameters: json!({"type": "object", "properties": {"path": {"type": "string"}}}),
    }
}

fn text_response(text: &str) -> Reply {
    Reply::Json(
        200,
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
        }),
        vec![],
    )
}

#[tokio::test]
async fn text_answer_not_streamed() {
    let server = serve(|_, _| text_response("Hello there.")).await;
    let p = provider(&server.base_url, false);
    let mut req = request("gpt-4o-mini", vec![Message::system("Be brief."), Message::user("Hi")]);
    req.max_tokens = Some(100);
    req.temperature = Some(0.5);
    let (result, deltas) = complete(&p, &req).await;
    let response = result.unwrap();
    assert_eq!(response.message.content, "Hello there.");
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(response.model, "gpt-4o-mini-2024-07-18");
    assert_eq!(response.usage.input_tokens, 1000);
    assert_eq!(response.usage.output_tokens, 500);
    // 1000 × $0.15/M + 500 × $0.60/M
    assert_eq!(response.usage.cost, "0.00045".parse::<Decimal>().unwrap());
    assert_eq!(tokens(&deltas), vec!["Hello there."]);

    let seen = server.request(0);
    assert_eq!(seen.path, "/chat/completions");
    assert_eq!(seen.headers["authorization"], format!("Bearer {KEY}"));
    assert_eq!(seen.body["model"], "gpt-4o-mini");
    assert_eq!(
        seen.body["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(seen.body["messages"][1], json!({"role": "user", "content": "Hi"}));
    assert_eq!(seen.body["max_tokens"], 100);
    assert_eq!(seen.body["temperature"], 0.5);
    assert!(seen.body.get("stream").is_none());
    assert!(seen.body.get("tools").is_none());
}

#[tokio::test]
async fn text_answer_streamed() {
    let server = serve(|_, _| {
        Reply::Sse(
            openai_sse(&[
                json!({"model": "gpt-4o", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
                json!({"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
                json!({"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "lo, "}}]}),
                json!({"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "world"}, "finish_reason": null}]}),
                json!({"model": "gpt-4o", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
                json!({"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 2000000, "completion_tokens": 1000000}}),
            ]),
            Duration::from_millis(5),
        )
    })
    .await;
    let p = provider(&server.base_url, true);
    let (result, deltas) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    let response = result.unwrap();
    assert_eq!(tokens(&deltas), vec!["Hel", "lo, ", "world"]);
    assert_eq!(response.message.content, "Hello, world");
    assert_eq!(response.finish_reason, FinishReason::Length);
    // 2M × $2.50/M + 1M × $10/M
    assert_eq!(response.usage.cost, Decimal::from(15));
    let body = server.request(0).body;
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn streamed_parallel_tool_calls_in_fragments() {
    let server = serve(|_, _| {
        let call = |index: u32, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut function = json!({"arguments": args});
            if let Some(name) = name {
                function["name"] = json!(name);
            }
            let mut c = json!({"index": index, "function": function});
            if let Some(id) = id {
                c["id"] = json!(id);
                c["type"] = json!("function");
            }
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [c]}}]})
        };
        Reply::Sse(
            openai_sse(&[
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}}]}),
                call(0, Some("call_a"), Some("fs__read"), ""),
                call(0, None, None, "{\"pa"),
                call(1, Some("call_b"), Some("fs__read"), "{\"path\""),
                call(0, None, None, "th\": \"a.t"),
                call(1, None, None, ": \"b.txt\"}"),
                call(0, None, None, "xt\"}"),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
                json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 20}}),
            ]),
            Duration::from_millis(2),
        )
    })
    .await;
    let p = provider(&server.base_url, true);
    let mut req = request("gpt-4o", vec![Message::user("read a and b")]);
    req.tools = vec![tool()];
    let (result, deltas) = complete(&p, &req).await;
    let response = result.unwrap();
    assert!(tokens(&deltas).is_empty());
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.message.tool_calls,
        vec![
            ToolCall {
                id: "call_a".into(),
                name: "fs__read".into(),
                arguments: json!({"path": "a.txt"})
            },
            ToolCall {
                id: "call_b".into(),
                name: "fs__read".into(),
                arguments: json!({"path": "b.txt"})
            },
        ]
    );
    let body = server.request(0).body;
    assert_eq!(
        body["tools"],
        json!([{"type": "function", "function": {
            "name": "fs__read", "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        }}])
    );
}

#[tokio::test]
async fn tool_calls_not_streamed_and_conversation_mapping() {
    let server = serve(|_, _| {
        Reply::Json(
            200,
            json!({
                "model": "local",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": null,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "fs__read", "arguments": "{\"path\":\"x\"}"}},
                        {"id": "c2", "type": "function", "function": {"name": "fs__read", "arguments": "{\"path\": oops"}}
                    ]
                }}]
            }),
            vec![],
        )
    })
    .await;
    let p = provider(&server.base_url, false);
    let earlier = ToolCall {
        id: "c0".into(),
        name: "fs__list".into(),
        arguments: json!({"dir": "."}),
    };
    let bad = ToolCall {
        id: "c9".into(),
        name: "fs__list".into(),
        arguments: json!("{not json"),
    };
    let req = request(
        "local",
        vec![
            Message::user("go"),
            Message::assistant("", vec![earlier, bad]),
            Message::tool("c0", "a.txt"),
            Message::tool("c9", "invalid input"),
        ],
    );
    let (result, _) = complete(&p, &req).await;
    let response = result.unwrap();
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(response.message.tool_calls[0].arguments, json!({"path": "x"}));
    // Malformed arguments are kept verbatim as a string.
    assert_eq!(response.message.tool_calls[1].arguments, json!("{\"path\": oops"));
    // Unpriced model: zero cost, and `price` says so.
    assert_eq!(response.usage.cost, Decimal::ZERO);
    assert!(p.price("local").is_none());

    let messages = &server.request(0).body["messages"];
    assert_eq!(
        messages[1],
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "fs__list", "arguments": "{\"dir\":\".\"}"}},
            {"id": "c9", "type": "function", "function": {"name": "fs__list", "arguments": "{not json"}},
        ]})
    );
    assert_eq!(
        messages[2],
        json!({"role": "tool", "tool_call_id": "c0", "content": "a.txt"})
    );
    assert_eq!(
        messages[3],
        json!({"role": "tool", "tool_call_id": "c9", "content": "invalid input"})
    );
}

#[tokio::test]
async fn rate_limited_then_success_honours_retry_after() {
    let server = serve(|n, _| match n {
        0 => Reply::Json(
            429,
            json!({"error": {"message": "slow down", "type": "rate_limit_error"}}),
            vec![("retry-after-ms", "300".into())],
        ),
        _ => text_response("ok"),
    })
    .await;
    let p = provider(&server.base_url, false);
    let started = Instant::now();
    let (result, _) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    assert_eq!(result.unwrap().message.content, "ok");
    assert_eq!(server.hits(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "Retry-After not honoured: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn rate_limited_to_the_end() {
    let server = serve(|_, _| Reply::Json(429, json!({"error": {"message": "slow down"}}), vec![])).await;
    let p = provider(&server.base_url, false);
    let (result, _) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    assert!(matches!(result, Err(ModelError::RateLimited { .. })), "{result:?}");
    assert_eq!(server.hits(), 4);
}

#[tokio::test]
async fn server_errors_exhaust_retries() {
    let server = serve(|_, _| Reply::Raw(500, "text/plain", "boom".into())).await;
    let p = provider(&server.base_url, false);
    let (result, _) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    let Err(ModelError::Unavailable { message }) = result else {
        panic!("{result:?}")
    };
    assert!(
        message.contains("boom") && message.contains("after 4 attempts"),
        "{message}"
    );
    assert_eq!(server.hits(), 4, "1 attempt + max_retries (3)");
}

#[tokio::test]
async fn bad_key_is_auth_and_never_retried_or_leaked() {
    let server = serve(|_, _| {
        Reply::Json(
            401,
            json!({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}),
            vec![],
        )
    })
    .await;
    let p = provider(&server.base_url, true);
    let (result, _) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    let err = result.unwrap_err();
    assert!(matches!(err, ModelError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("Incorrect API key"));
    assert!(!err.to_string().contains(KEY));
    assert!(!format!("{p:?}").contains(KEY), "Debug leaks the key");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn unknown_model_and_invalid_request() {
    let server = serve(|_, seen| match seen.body["model"].as_str() {
        Some("nope") => Reply::Json(
            404,
            json!({"error": {"message": "The model `nope` does not exist", "code": "model_not_found"}}),
            vec![],
        ),
        _ => Reply::Json(400, json!({"error": {"message": "messages: too short"}}), vec![]),
    })
    .await;
    let p = provider(&server.base_url, false);
    let (result, _) = complete(&p, &request("nope", vec![Message::user("Hi")])).await;
    let Err(ModelError::UnknownModel { model, message }) = result else {
        panic!("{result:?}")
    };
    assert_eq!(model, "nope");
    assert!(message.contains("does not exist"), "{message}");
    let (result, _) = complete(&p, &request("gpt-4o", vec![])).await;
    assert!(matches!(result, Err(ModelError::InvalidRequest { .. })), "{result:?}");
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let server = serve(|_, _| Reply::Hang).await;
    let config = ProviderConfig::new(keel_models::ProviderKind::Openai)
        .with_base_url(&server.base_url)
        .with_timeout(Duration::from_millis(300))
        .with_retries(1, Duration::from_millis(10), Duration::from_millis(50));
    let p = OpenAiProvider::new(&config, PriceTable::empty()).unwrap();
    let started = Instant::now();
    let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
    assert!(matches!(result, Err(ModelError::Timeout { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_stream_that_stalls_times_out() {
    let server = serve(|_, _| {
        let mut chunks = openai_sse(&[json!({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})]);
        chunks.pop(); // no [DONE]: the body stays open
        chunks.push(String::new());
        Reply::Sse(chunks, Duration::from_millis(1000))
    })
    .await;
    let config = ProviderConfig::new(keel_models::ProviderKind::Openai)
        .with_base_url(&server.base_url)
        .with_timeout(Duration::from_millis(300))
        .with_retries(0, Duration::from_millis(10), Duration::from_millis(50));
    let p = OpenAiProvider::new(&config, PriceTable::empty()).unwrap();
    let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
    assert!(matches!(result, Err(ModelError::Timeout { .. })), "{result:?}");
}

/// A server that never stops sending is cut off at `max_response_bytes`, whatever it sends: an
/// event stream of text, a JSON body, an error body (only its start is read).
#[tokio::test]
async fn a_response_that_never_ends_is_cut_off_at_max_response_bytes() {
    let text = format!(
        "data: {}\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": "x".repeat(1000)}}]})
    );
    let cases = [
        ("event stream", Reply::Endless(200, "text/event-stream", text), true),
        (
            "JSON body",
            Reply::Endless(200, "application/json", format!("{{\"pad\": \"{}", "y".repeat(1000))),
            false,
        ),
        (
            "error body",
            Reply::Endless(500, "application/json", "z".repeat(1000)),
            true,
        ),
    ];
    for (what, reply, stream) in cases {
        let reply = std::sync::Mutex::new(Some(reply));
        let server = serve(move |_, _| reply.lock().unwrap().take().unwrap_or(Reply::Hang)).await;
        let mut config = ProviderConfig::new(keel_models::ProviderKind::Openai)
            .with_base_url(&server.base_url)
            .with_stream(stream)
            .with_retries(0, Duration::from_millis(10), Duration::from_millis(50));
        config.max_response_bytes = 1 << 20;
        let p = OpenAiProvider::new(&config, PriceTable::empty()).unwrap();
        let (result, _) = tokio::time::timeout(
            Duration::from_secs(30),
            complete(&p, &request("m", vec![Message::user("Hi")])),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: still reading after 30 s"));
        let err = result.unwrap_err();
        if what == "error body" {
            assert!(matches!(err, ModelError::Unavailable { .. }), "{what}: {err:?}");
        } else {
            assert!(
                matches!(err, ModelError::InvalidResponse { .. }) && err.to_string().contains("1048576"),
                "{what}: {err:?}"
            );
        }
    }
}

/// The idle timeout counts from the last event that carried something (text, a tool-call
/// fragment, usage, the end): a server sending only empty events (or empty deltas) stalls as
/// surely as a silent one.
#[tokio::test]
async fn a_stream_of_keep_alives_times_out() {
    for keep_alive in ["data: \n\n", "data: {\"choices\": [{\"index\": 0, \"delta\": {}}]}\n\n"] {
        let server = serve(move |_, _| {
            let mut chunks = openai_sse(&[json!({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})]);
            chunks.pop(); // no [DONE]
            chunks.extend(std::iter::repeat_n(keep_alive.to_string(), 100));
            Reply::Sse(chunks, Duration::from_millis(100))
        })
        .await;
        let config = ProviderConfig::new(keel_models::ProviderKind::Openai)
            .with_base_url(&server.base_url)
            .with_timeout(Duration::from_millis(500))
            .with_retries(0, Duration::from_millis(10), Duration::from_millis(50));
        let p = OpenAiProvider::new(&config, PriceTable::empty()).unwrap();
        let started = Instant::now();
        let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
        assert!(
            matches!(result, Err(ModelError::Timeout { .. })),
            "{keep_alive:?}: {result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{keep_alive:?}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn malformed_streams_are_invalid_responses() {
    let server = serve(|n, _| match n {
        0 => Reply::Sse(
            vec!["data: {\"choices\": [{\"delta\": {\"content\": \"a\"}}\n\n".into()],
            Duration::ZERO,
        ),
        // Ends without [DONE] or a finish_reason.
        _ => Reply::Sse(
            vec![format!(
                "data: {}\n\n",
                json!({"choices": [{"index": 0, "delta": {"content": "a"}}]})
            )],
            Duration::ZERO,
        ),
    })
    .await;
    let p = provider(&server.base_url, true);
    for _ in 0..2 {
        let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
        assert!(matches!(result, Err(ModelError::InvalidResponse { .. })), "{result:?}");
    }
    assert_eq!(server.hits(), 2, "invalid responses are not retried");
}

#[tokio::test]
async fn missing_key_variable_fails_before_any_request() {
    let server = serve(|_, _| text_response("never")).await;
    let config = ProviderConfig::new(keel_models::ProviderKind::Openai)
        .with_base_url(&server.base_url)
        .with_api_key_env("KEEL_TEST_UNSET_KEY");
    let p = OpenAiProvider::with_env(&config, PriceTable::empty(), &|_| None).unwrap();
    let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
    let Err(ModelError::Auth { message }) = result else {
        panic!("{result:?}")
    };
    assert!(message.contains("KEEL_TEST_UNSET_KEY"));
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn a_server_ignoring_stream_true_still_works() {
    let server = serve(|_, _| text_response("plain json")).await;
    let p = provider(&server.base_url, true);
    let (result, deltas) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    assert_eq!(result.unwrap().message.content, "plain json");
    assert_eq!(tokens(&deltas), vec!["plain json"]);
}

#[tokio::test]
async fn a_retry_after_longer_than_we_wait_ends_retries_at_once() {
    let server = serve(|_, _| {
        Reply::Json(
            429,
            json!({"error": {"message": "quota"}}),
            vec![("retry-after", "3600".into())],
        )
    })
    .await;
    let p = provider(&server.base_url, false);
    let started = Instant::now();
    let (result, _) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    assert!(matches!(result, Err(ModelError::RateLimited { .. })), "{result:?}");
    assert_eq!(server.hits(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn connection_refused_is_unavailable_after_retries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let p = provider(&format!("http://{addr}"), true);
    let (result, _) = complete(&p, &request("gpt-4o", vec![Message::user("Hi")])).await;
    let Err(ModelError::Unavailable { message }) = result else {
        panic!("{result:?}")
    };
    assert!(message.contains("after 4 attempts"), "{message}");
}
