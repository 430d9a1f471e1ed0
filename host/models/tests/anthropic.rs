//! The Anthropic provider against a local server speaking the Messages API.

mod common;

use std::time::{Duration, Instant};

use common::{Reply, anthropic_sse, complete, reasoning, request, serve, tokens};
use keel_models::{
    AnthropicProvider, FinishReason, Message, ModelError, PriceTable, ProviderConfig, ProviderKind, ToolCall, ToolSpec,
};
use rust_decimal::Decimal;
use serde_json::json;

const KEY: &str = "sk-ant-test-secret";

fn provider(base_url: &str, stream: bool) -> AnthropicProvider {
    let config = ProviderConfig::new(ProviderKind::Anthropic)
        .with_base_url(base_url)
        .with_api_key(KEY)
        .with_stream(stream)
        .with_timeout(Duration::from_secs(5))
        .with_retries(2, Duration::from_millis(10), Duration::from_secs(2));
    AnthropicProvider::new(&config, PriceTable::builtin()).unwrap()
}

#[tokio::test]
async fn text_thinking_and_tool_use_not_streamed_with_request_mapping() {
    let server = serve(|_, _| {
        Reply::Json(
            200,
            json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
                "content": [
                    {"type": "thinking", "thinking": "need the file", "signature": "sig"},
                    {"type": "text", "text": "Reading it."},
                    {"type": "tool_use", "id": "toolu_1", "name": "fs__read", "input": {"path": "a.txt"}}
                ],
                "stop_reason": "tool_use",
                "usage": {"input_tokens": 1000000, "output_tokens": 100000}
            }),
            vec![],
        )
    })
    .await;
    let p = provider(&server.base_url, false);
    let call = ToolCall {
        id: "toolu_0".into(),
        name: "fs__list".into(),
        arguments: json!({"dir": "."}),
    };
    let call2 = ToolCall {
        id: "toolu_9".into(),
        name: "fs__list".into(),
        arguments: json!({"dir": "b"}),
    };
    let mut req = request(
        "claude-sonnet-4-5",
        vec![
            Message::system("Be careful."),
            Message::user("Look around"),
            Message::assistant("Listing.", vec![call, call2]),
            Message::tool("toolu_0", "a.txt"),
            Message::tool("toolu_9", "c.txt"),
        ],
    );
    req.tools = vec![ToolSpec {
        name: "fs__read".into(),
        description: "Read".into(),
        parameters: json!({"type": "object"}),
    }];
    let (result, deltas) = complete(&p, &req).await;
    let response = result.unwrap();
    assert_eq!(response.message.content, "Reading it.");
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.message.tool_calls,
        vec![ToolCall {
            id: "toolu_1".into(),
            name: "fs__read".into(),
            arguments: json!({"path": "a.txt"})
        }]
    );
    // 1M × $3 + 0.1M × $15
    assert_eq!(response.usage.cost, "4.5".parse::<Decimal>().unwrap());
    assert_eq!(reasoning(&deltas), "need the file");
    assert_eq!(tokens(&deltas), vec!["Reading it."]);

    let seen = server.request(0);
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], KEY);
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert!(seen.headers.get("authorization").is_none());
    let body = seen.body;
    assert_eq!(body["system"], "Be careful.");
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(
        body["tools"],
        json!([{"name": "fs__read", "description": "Read", "input_schema": {"type": "object"}}])
    );
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Look around"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Listing."},
                {"type": "tool_use", "id": "toolu_0", "name": "fs__list", "input": {"dir": "."}},
                {"type": "tool_use", "id": "toolu_9", "name": "fs__list", "input": {"dir": "b"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_0", "content": "a.txt"},
                {"type": "tool_result", "tool_use_id": "toolu_9", "content": "c.txt"},
            ]},
        ])
    );
}

fn start(input_tokens: u64) -> serde_json::Value {
    json!({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001", "content": [],
        "stop_reason": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}
    }})
}

#[tokio::test]
async fn text_and_thinking_streamed() {
    let server = serve(|_, _| {
        Reply::Sse(
            anthropic_sse(&[
                start(1_000_000),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm "}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "ok"}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "x"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "ping"}),
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hello"}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": " world"}}),
                json!({"type": "content_block_stop", "index": 1}),
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                       "usage": {"output_tokens": 1_000_000}}),
                json!({"type": "message_stop"}),
            ]),
            Duration::from_millis(2),
        )
    })
    .await;
    let p = provider(&server.base_url, true);
    let (result, deltas) = complete(&p, &request("claude-haiku-4-5", vec![Message::user("Hi")])).await;
    let response = result.unwrap();
    assert_eq!(tokens(&deltas), vec!["Hello", " world"]);
    assert_eq!(reasoning(&deltas), "hmm ok");
    assert_eq!(response.message.content, "Hello world");
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(response.model, "claude-haiku-4-5-20251001");
    assert_eq!(
        (response.usage.input_tokens, response.usage.output_tokens),
        (1_000_000, 1_000_000)
    );
    // $1 + $5
    assert_eq!(response.usage.cost, Decimal::from(6));
    assert_eq!(server.request(0).body["stream"], true);
}

/// A server's usage numbers are hostile input: input counts that add up past `u64::MAX` (cached
/// input on top of input) stop at the top instead of wrapping to a small number (a budget let
/// through) or panicking.
#[tokio::test]
async fn usage_past_u64_saturates() {
    let server = serve(|_, _| {
        Reply::Sse(
            anthropic_sse(&[
                json!({"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
                    "content": [], "stop_reason": null,
                    "usage": {"input_tokens": 3, "output_tokens": 1}
                }}),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                       "usage": {"input_tokens": u64::MAX, "output_tokens": u64::MAX,
                                 "cache_read_input_tokens": u64::MAX, "cache_creation_input_tokens": 7}}),
                json!({"type": "message_stop"}),
            ]),
            Duration::from_millis(1),
        )
    })
    .await;
    let p = provider(&server.base_url, true);
    let (result, _) = complete(&p, &request("claude-haiku-4-5", vec![Message::user("Hi")])).await;
    let response = result.expect("a response, whatever its usage says");
    assert_eq!(response.message.content, "Hi");
    assert_eq!(
        (response.usage.input_tokens, response.usage.output_tokens),
        (u64::MAX, u64::MAX)
    );
}

#[tokio::test]
async fn parallel_tool_use_streamed_in_fragments() {
    let server = serve(|_, _| {
        let frag = |index: u32, s: &str| {
            json!({"type": "content_block_delta", "index": index,
                   "delta": {"type": "input_json_delta", "partial_json": s}})
        };
        let begin = |index: u32, id: &str| {
            json!({"type": "content_block_start", "index": index,
                   "content_block": {"type": "tool_use", "id": id, "name": "fs__read", "input": {}}})
        };
        Reply::Sse(
            anthropic_sse(&[
                start(10),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Both."}}),
                json!({"type": "content_block_stop", "index": 0}),
                begin(1, "toolu_a"),
                frag(1, ""),
                frag(1, "{\"pa"),
                frag(1, "th\": \"a."),
                frag(1, "txt\"}"),
                json!({"type": "content_block_stop", "index": 1}),
                begin(2, "toolu_b"),
                frag(2, "{\"path\": \"b.txt\""),
                frag(2, "}"),
                json!({"type": "content_block_stop", "index": 2}),
                begin(3, "toolu_c"),
                json!({"type": "content_block_stop", "index": 3}),
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 40}}),
                json!({"type": "message_stop"}),
            ]),
            Duration::from_millis(1),
        )
    })
    .await;
    let p = provider(&server.base_url, true);
    let (result, _) = complete(&p, &request("claude-sonnet-4-5", vec![Message::user("read")])).await;
    let response = result.unwrap();
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(response.message.content, "Both.");
    let calls: Vec<_> = response
        .message
        .tool_calls
        .iter()
        .map(|c| (c.id.as_str(), c.arguments.clone()))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("toolu_a", json!({"path": "a.txt"})),
            ("toolu_b", json!({"path": "b.txt"})),
            ("toolu_c", json!({}))
        ]
    );
    assert_eq!((response.usage.input_tokens, response.usage.output_tokens), (10, 40));
}

#[tokio::test]
async fn overloaded_then_success_honours_retry_after_seconds() {
    let server = serve(|n, _| match n {
        0 => Reply::Json(
            429,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}),
            vec![("retry-after", "1".into())],
        ),
        1 => Reply::Json(
            529,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
            vec![],
        ),
        _ => Reply::Sse(
            anthropic_sse(&[
                start(5),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "fine"}}),
                json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 3}}),
                json!({"type": "message_stop"}),
            ]),
            Duration::ZERO,
        ),
    })
    .await;
    let p = provider(&server.base_url, true);
    let started = Instant::now();
    let (result, deltas) = complete(&p, &request("claude-haiku-4-5", vec![Message::user("Hi")])).await;
    let response = result.unwrap();
    assert_eq!(response.message.content, "fine");
    assert_eq!(tokens(&deltas), vec!["fine"]);
    assert_eq!(response.finish_reason, FinishReason::Length);
    assert_eq!(server.hits(), 3);
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn overloaded_to_the_end_is_unavailable() {
    let server = serve(|_, _| {
        Reply::Json(
            529,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
            vec![],
        )
    })
    .await;
    let p = provider(&server.base_url, false);
    let (result, _) = complete(&p, &request("claude-haiku-4-5", vec![Message::user("Hi")])).await;
    assert!(matches!(result, Err(ModelError::Unavailable { .. })), "{result:?}");
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn auth_and_unknown_model() {
    let server = serve(|_, seen| {
        if seen.headers["x-api-key"] != KEY {
            return Reply::Json(
                401,
                json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
                vec![],
            );
        }
        Reply::Json(
            404,
            json!({"type": "error", "error": {"type": "not_found_error", "message": "model: claude-nope"}}),
            vec![],
        )
    })
    .await;
    let bad = AnthropicProvider::new(
        &ProviderConfig::new(ProviderKind::Anthropic)
            .with_base_url(&server.base_url)
            .with_api_key("wrong-key"),
        PriceTable::empty(),
    )
    .unwrap();
    let (result, _) = complete(&bad, &request("claude-nope", vec![Message::user("Hi")])).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, ModelError::Auth { .. }) && err.to_string().contains("invalid x-api-key"),
        "{err:?}"
    );
    assert!(!format!("{bad:?}").contains("wrong-key"));

    let p = provider(&server.base_url, true);
    let (result, _) = complete(&p, &request("claude-nope", vec![Message::user("Hi")])).await;
    let Err(ModelError::UnknownModel { model, .. }) = result else {
        panic!("{result:?}")
    };
    assert_eq!(model, "claude-nope");
    assert_eq!(server.hits(), 2);
}

/// A model call never follows a redirect: the key (`x-api-key`, which reqwest does not strip
/// across hosts) and the conversation would go to whatever host the server names.
#[tokio::test]
async fn a_redirect_is_an_error_and_the_key_never_leaves_for_its_target() {
    let elsewhere = serve(|_, _| Reply::Json(200, json!({}), vec![])).await;
    for status in [301, 302, 307, 308] {
        let target = format!("{}/v1/messages", elsewhere.base_url);
        let server = serve(move |_, _| Reply::Json(status, json!({}), vec![("location", target.clone())])).await;
        let p = provider(&server.base_url, true);
        let (result, _) = complete(&p, &request("claude-sonnet-4", vec![Message::user("Hi")])).await;
        let err = result.unwrap_err();
        assert!(
            matches!(err, ModelError::InvalidRequest { .. }) && err.to_string().contains("redirect"),
            "{status}: {err:?}"
        );
        assert_eq!(server.hits(), 1, "{status}: a redirect is not retried");
    }
    assert_eq!(elsewhere.hits(), 0, "a redirect was followed (with the key)");
}

#[tokio::test]
async fn no_key_at_all_is_auth() {
    let p = AnthropicProvider::with_env(
        &ProviderConfig::anthropic().with_base_url("http://127.0.0.1:9"),
        PriceTable::empty(),
        &|_| None,
    )
    .unwrap();
    let (result, _) = complete(&p, &request("claude-haiku-4-5", vec![Message::user("Hi")])).await;
    let Err(ModelError::Auth { message }) = result else {
        panic!("{result:?}")
    };
    assert!(message.contains("ANTHROPIC_API_KEY"), "{message}");
}

#[tokio::test]
async fn malformed_and_truncated_streams_and_stream_errors() {
    let server = serve(|n, _| match n {
        0 => Reply::Sse(
            vec!["event: message_start\ndata: {\"type\": \"message_start\", \"mess\n\n".into()],
            Duration::ZERO,
        ),
        1 => Reply::Sse(anthropic_sse(&[start(3)]), Duration::ZERO),
        _ => Reply::Sse(
            anthropic_sse(&[
                start(3),
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ]),
            Duration::ZERO,
        ),
    })
    .await;
    let p = provider(&server.base_url, true);
    let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
    assert!(matches!(result, Err(ModelError::InvalidResponse { .. })), "{result:?}");
    let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
    let Err(ModelError::InvalidResponse { message }) = result else {
        panic!("{result:?}")
    };
    assert!(message.contains("message_stop"), "{message}");
    let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
    let Err(ModelError::Unavailable { message }) = result else {
        panic!("{result:?}")
    };
    assert!(message.contains("Overloaded"), "{message}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let server = serve(|_, _| Reply::Hang).await;
    let config = ProviderConfig::new(ProviderKind::Anthropic)
        .with_base_url(&server.base_url)
        .with_api_key(KEY)
        .with_timeout(Duration::from_millis(300))
        .with_retries(0, Duration::from_millis(10), Duration::from_millis(50));
    let p = AnthropicProvider::new(&config, PriceTable::empty()).unwrap();
    let (result, _) = complete(&p, &request("m", vec![Message::user("Hi")])).await;
    assert!(matches!(result, Err(ModelError::Timeout { .. })), "{result:?}");
    assert_eq!(server.hits(), 1);
}
