//! Fake provider servers on 127.0.0.1 for the HTTP provider tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use keel_models::{ModelDelta, ModelError, ModelProvider, ModelRequest, ModelResponse};
use serde_json::Value;

/// What the fake server answers to one request.
pub enum Reply {
    /// A JSON body with a status and extra headers.
    Json(u16, Value, Vec<(&'static str, String)>),
    /// An event stream: each string is sent as its own chunk, `gap` apart.
    Sse(Vec<String>, Duration),
    /// Raw bytes with a content type.
    Raw(u16, &'static str, String),
    /// Never answer.
    Hang,
    /// A status and content type, then this chunk again and again, for ever.
    Endless(u16, &'static str, String),
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

pub struct FakeServer {
    pub base_url: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeServer {
    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn request(&self, i: usize) -> Seen {
        self.seen.lock().unwrap()[i].clone()
    }
}

type Handler = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

/// Starts a server that answers request number `n` (from 0) with `reply(n, &request)`.
pub async fn serve(reply: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> FakeServer {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let reply: Arc<Handler> = Arc::new(reply);
    let state = (seen.clone(), reply);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
        let (seen, reply) = state.clone();
        async move {
            let request = Seen {
                path: uri.path().to_string(),
                headers,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            };
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push(request.clone());
                seen.len() - 1
            };
            respond(reply(n, &request)).await
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    FakeServer {
        base_url: format!("http://{addr}"),
        seen,
    }
}

async fn respond(reply: Reply) -> Response {
    match reply {
        Reply::Json(status, body, headers) => {
            let mut response = Response::new(Body::from(body.to_string()));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            for (name, value) in headers {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_str(&value).unwrap());
            }
            response
        }
        Reply::Sse(chunks, gap) => {
            let stream = futures::stream::iter(chunks).then(move |chunk| async move {
                tokio::time::sleep(gap).await;
                Ok::<_, std::convert::Infallible>(Bytes::from(chunk))
            });
            let mut response = Response::new(Body::from_stream(stream));
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("text/event-stream"));
            response
        }
        Reply::Raw(status, content_type, body) => {
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static(content_type));
            response
        }
        Reply::Endless(status, content_type, chunk) => {
            let chunk = Bytes::from(chunk);
            let stream = futures::stream::repeat_with(move || Ok::<_, std::convert::Infallible>(chunk.clone()));
            let mut response = Response::new(Body::from_stream(stream));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static(content_type));
            response
        }
        Reply::Hang => {
            futures::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// `data: {json}\n\n` for each value, then `data: [DONE]` (OpenAI style).
pub fn openai_sse(chunks: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    out.push("data: [DONE]\n\n".into());
    out
}

/// `event: TYPE\ndata: {json}\n\n` for each value (Anthropic style).
pub fn anthropic_sse(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

/// Runs a completion, collecting the deltas.
pub async fn complete(
    provider: &dyn ModelProvider,
    request: &ModelRequest,
) -> (Result<ModelResponse, ModelError>, Vec<ModelDelta>) {
    let deltas = Mutex::new(Vec::new());
    let on_delta = |d: ModelDelta| deltas.lock().unwrap().push(d);
    let result = provider.complete(request, &on_delta).await;
    (result, deltas.into_inner().unwrap())
}

pub fn tokens(deltas: &[ModelDelta]) -> Vec<String> {
    deltas
        .iter()
        .filter_map(|d| match d {
            ModelDelta::Token(t) => Some(t.clone()),
            ModelDelta::Reasoning(_) => None,
        })
        .collect()
}

pub fn reasoning(deltas: &[ModelDelta]) -> String {
    deltas
        .iter()
        .filter_map(|d| match d {
            ModelDelta::Reasoning(t) => Some(t.as_str()),
            ModelDelta::Token(_) => None,
        })
        .collect()
}

pub fn request(model: &str, messages: Vec<keel_models::Message>) -> ModelRequest {
    ModelRequest {
        model: model.into(),
        messages,
        tools: vec![],
        max_tokens: None,
        temperature: None,
    }
}
