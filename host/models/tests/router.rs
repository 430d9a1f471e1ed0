//! The router (config, env, prefixes, prices) and the scripted provider.

mod common;

use common::{Reply, complete, request, serve, tokens};
use keel_models::{
    FinishReason, Message, ModelError, ModelPrice, ModelProvider, ModelRouter, ModelsConfig, ScriptedProvider,
    ScriptedTurn, ToolCall,
};
use rust_decimal::Decimal;
use serde_json::json;

fn script_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("demo.json");
    std::fs::write(
        &path,
        json!({"turns": [
            {"tool_calls": [{"name": "fs__read", "arguments": {"path": "notes.txt"}}]},
            {"text": "The notes say hello.", "usage": {"input_tokens": 1000, "output_tokens": 10}}
        ]})
        .to_string(),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn scripted_turns_follow_the_conversation_not_internal_state() {
    let dir = tempfile::tempdir().unwrap();
    let p = ScriptedProvider::from_file(script_file(&dir)).unwrap();
    let first = request("demo", vec![Message::user("what do my notes say?")]);
    for _ in 0..2 {
        // Asked twice (a restarted job): the same answer.
        let (result, deltas) = complete(&p, &first).await;
        let response = result.unwrap();
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            response.message.tool_calls,
            vec![ToolCall {
                id: "call_0_0".into(),
                name: "fs__read".into(),
                arguments: json!({"path": "notes.txt"})
            }]
        );
        assert!(deltas.is_empty());
        assert_eq!(response.model, "demo");
        // No scripted usage: a deterministic estimate.
        assert_eq!(response.usage.input_tokens, 6);
    }
    let second = request(
        "demo",
        vec![
            Message::user("what do my notes say?"),
            Message::assistant(
                "",
                vec![ToolCall {
                    id: "call_0_0".into(),
                    name: "fs__read".into(),
                    arguments: json!({}),
                }],
            ),
            Message::tool("call_0_0", "hello"),
        ],
    );
    let (result, deltas) = complete(&p, &second).await;
    let response = result.unwrap();
    assert_eq!(response.message.content, "The notes say hello.");
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(tokens(&deltas), vec!["The ", "notes ", "say ", "hello."]);
    assert_eq!((response.usage.input_tokens, response.usage.output_tokens), (1000, 10));

    let mut third = second.messages.clone();
    third.push(Message::assistant("The notes say hello.", vec![]));
    third.push(Message::user("and then?"));
    let (result, _) = complete(&p, &request("demo", third)).await;
    let Err(ModelError::InvalidRequest { message }) = result else {
        panic!("{result:?}")
    };
    assert!(
        message.contains("scripted model has no response for turn 3"),
        "{message}"
    );
}

#[tokio::test]
async fn scripted_from_toml_and_from_a_vec() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        "[[turns]]\ntext = \"hi there\"\nusage = { input_tokens = 1, output_tokens = 2 }\n",
    )
    .unwrap();
    let p = ScriptedProvider::from_file(&path).unwrap();
    let (result, _) = complete(&p, &request("x", vec![Message::user("hi")])).await;
    assert_eq!(result.unwrap().message.content, "hi there");

    let p = ScriptedProvider::new(vec![ScriptedTurn::tool_call("a__b", json!({"n": 1})).with_usage(1, 1)]);
    let (result, _) = complete(&p, &request("x", vec![Message::user("hi")])).await;
    assert_eq!(result.unwrap().message.tool_calls[0].name, "a__b");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"turns": [{"txt": "typo"}]}"#).unwrap();
    let err = ScriptedProvider::from_file(&bad).unwrap_err().to_string();
    assert!(err.contains("bad.json") && err.contains("txt"), "{err}");
}

const CONFIG: &str = r#"
[prices."llama3:8b"]
input_per_mtok = "1"
output_per_mtok = 2.5

[prices.gpt-4o]
input_per_mtok = "3.00"
output_per_mtok = "12.00"

[providers.ollama]
kind = "openai"
base_url = "BASE"
stream = false
timeout_ms = 5000

[providers.scripted]
kind = "scripted"
script = "SCRIPT"
"#;

fn config(base_url: &str, script: &std::path::Path) -> ModelsConfig {
    let text = CONFIG
        .replace("BASE", base_url)
        .replace("SCRIPT", &script.display().to_string());
    toml::from_str(&text).unwrap()
}

#[tokio::test]
async fn router_from_toml_config_routes_and_strips_prefixes() {
    let server = serve(|_, seen| {
        Reply::Json(
            200,
            json!({
                "model": seen.body["model"],
                "choices": [{"message": {"role": "assistant", "content": "from ollama"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1000000, "completion_tokens": 1000000}
            }),
            vec![],
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!("{}/v1", server.base_url), &script_file(&dir));
    // A real OpenAI key in the environment must not reach a custom endpoint.
    let env = |var: &str| (var == "OPENAI_API_KEY").then(|| "sk-real-openai-key".to_string());
    let router = ModelRouter::from_config_with_env(&cfg, &env).unwrap();
    assert_eq!(
        router.provider_names(),
        vec!["anthropic", "ollama", "openai", "scripted"]
    );
    assert!(!format!("{router:?}").contains("sk-real"));

    let (result, _) = complete(&router, &request("ollama:llama3:8b", vec![Message::user("Hi")])).await;
    let response = result.unwrap();
    assert_eq!(response.message.content, "from ollama");
    assert_eq!(response.model, "llama3:8b");
    // Config price: $1 + $2.5.
    assert_eq!(response.usage.cost, "3.5".parse::<Decimal>().unwrap());
    let seen = server.request(0);
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body["model"], "llama3:8b");
    assert!(
        seen.headers.get("authorization").is_none(),
        "vendor key leaked to a custom endpoint"
    );

    let (result, _) = complete(&router, &request("scripted:demo", vec![Message::user("Hi")])).await;
    assert_eq!(result.unwrap().message.tool_calls[0].name, "fs__read");

    // Prices through the router: config overrides the built-in, built-ins stay, unknown is None.
    let price = |m: &str| router.price(m);
    assert_eq!(
        price("openai:gpt-4o"),
        Some(ModelPrice {
            input_per_mtok: Decimal::from(3),
            output_per_mtok: Decimal::from(12)
        })
    );
    assert_eq!(
        price("anthropic:claude-sonnet-4-5").unwrap().output_per_mtok,
        Decimal::from(15)
    );
    assert_eq!(
        price("openai:gpt-4o-mini").unwrap().input_per_mtok,
        "0.15".parse::<Decimal>().unwrap()
    );
    assert_eq!(price("ollama:mistral"), None);
    assert_eq!(price("nowhere:gpt-4o"), None);
    assert_eq!(price("gpt-4o"), None);
}

#[tokio::test]
async fn router_errors_name_the_configured_providers() {
    let router = ModelRouter::from_config_with_env(&ModelsConfig::default(), &|_| None).unwrap();
    for model in ["mystery:model", "gpt-4o"] {
        let (result, _) = complete(&router, &request(model, vec![Message::user("Hi")])).await;
        let Err(ModelError::UnknownModel { model: named, message }) = result else {
            panic!("{result:?}")
        };
        assert_eq!(named, model);
        assert!(message.contains("anthropic, openai"), "{message}");
    }
    // The default providers read their vendor variables; unset, the call fails clearly and sends nothing.
    let (result, _) = complete(&router, &request("openai:gpt-4o", vec![Message::user("Hi")])).await;
    let Err(ModelError::Auth { message }) = result else {
        panic!("{result:?}")
    };
    assert!(message.contains("OPENAI_API_KEY"), "{message}");
    // The same verdicts without calling anything, for front ends that refuse a job up front.
    assert!(matches!(router.check("openai:gpt-4o"), Err(ModelError::Auth { .. })));
    assert!(matches!(
        router.check("anthropic:claude-sonnet-4-5"),
        Err(ModelError::Auth { .. })
    ));
    assert!(matches!(
        router.check("mystery:model"),
        Err(ModelError::UnknownModel { .. })
    ));
    let keyed = ModelRouter::from_config_with_env(&ModelsConfig::default(), &|var| {
        (var == "OPENAI_API_KEY").then(|| "sk-test".to_string())
    })
    .unwrap();
    assert!(keyed.check("openai:gpt-4o").is_ok());
}

#[tokio::test]
async fn router_with_hand_registered_providers() {
    let router = ModelRouter::new().with_provider(
        "s",
        std::sync::Arc::new(ScriptedProvider::new(vec![ScriptedTurn::text("yes")])),
    );
    let (result, _) = complete(&router, &request("s:anything", vec![Message::user("?")])).await;
    assert_eq!(result.unwrap().message.content, "yes");
    assert_eq!(router.price("s:anything"), None);
}

#[test]
fn config_errors_are_clear() {
    let err = toml::from_str::<ModelsConfig>("[providers.x]\nkind = \"openai\"\nbase_ulr = \"http://x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("base_ulr"), "{err}");
    let cfg: ModelsConfig = toml::from_str("[providers.demo]\nkind = \"scripted\"\n").unwrap();
    let err = ModelRouter::from_config_with_env(&cfg, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`demo`") && err.contains("script"), "{err}");
    let cfg: ModelsConfig =
        toml::from_str("[providers.o]\nkind = \"openai\"\nmax_tokens_field = \"max_output\"\n").unwrap();
    let err = ModelRouter::from_config_with_env(&cfg, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`o`") && err.contains("max_output"), "{err}");
}
