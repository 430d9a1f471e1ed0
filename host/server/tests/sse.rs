//! SSE with resume: a client that disconnects mid-stream while the job is still emitting events
//! and reconnects with `Last-Event-ID` sees every event exactly once, in order.
//!
//! Its own test binary: it slows the scripted model down with the `testing` hook
//! (`KEEL_DEBUG_MODEL_DELAY_MS`), which is read from this process's environment.

mod common;

use common::{SseReader, TestServer, greet_turn, text_turn};
use keel_app::Role;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_with_last_event_id_sees_every_event_once() {
    // SAFETY: set before the server (and any thread that reads the environment) starts; this
    // binary has this one test.
    unsafe { std::env::set_var("KEEL_DEBUG_MODEL_DELAY_MS", "40") };
    let mut turns: Vec<Value> = (0..12).map(|i| greet_turn(&format!("n{i}"))).collect();
    turns.push(text_turn("All greeted."));
    let server = TestServer::start(Value::Array(turns), None, |_| {}).await;
    let key = server.key("acme", Role::Read).await;
    let writer = server.key("acme", Role::Write).await;
    let job = server.create_job(&writer, &["hello"], json!({}), 201).await["job"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // First connection: read a few events, then drop it mid-job.
    let url = format!("{}/v1/jobs/{job}/events", server.base);
    let mut first = SseReader::new(server.http.get(&url).bearer_auth(&key).send().await.unwrap());
    let mut seen: Vec<u64> = Vec::new();
    let mut types = Vec::new();
    while seen.len() < 6 {
        let e = first.next().await.expect("the stream ended early");
        assert_eq!(e.id, e.data["seq"].to_string(), "id is the sequence number");
        seen.push(e.data["seq"].as_u64().unwrap());
        types.push(e.event);
    }
    drop(first);
    // Events keep being committed while nobody listens.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let midway = server.get(&format!("/v1/jobs/{job}"), &key, 200).await;
    assert_ne!(
        midway["job"]["state"], "SUCCEEDED",
        "the job must still be running at the reconnect"
    );

    // Resume after the last event seen: the rest, live, until the job ends.
    let last = seen.last().unwrap().to_string();
    let mut second = SseReader::new(
        server
            .http
            .get(&url)
            .bearer_auth(&key)
            .header("Last-Event-ID", &last)
            .send()
            .await
            .unwrap(),
    );
    while let Some(e) = second.next().await {
        seen.push(e.data["seq"].as_u64().unwrap());
        types.push(e.event);
    }
    let expected: Vec<u64> = (1..=*seen.last().unwrap()).collect();
    assert_eq!(seen, expected, "every event exactly once, in order");
    assert!(seen.len() > 30, "only {} events", seen.len());
    assert_eq!(types.iter().filter(|t| *t == "tool.end").count(), 12);
    let done = server.get(&format!("/v1/jobs/{job}"), &key, 200).await;
    assert_eq!(done["job"]["state"], "SUCCEEDED");
    // Resuming after the end: nothing more, and the stream closes.
    let mut after_end = SseReader::new(
        server
            .http
            .get(&url)
            .bearer_auth(&key)
            .header("Last-Event-ID", seen.last().unwrap().to_string())
            .send()
            .await
            .unwrap(),
    );
    assert!(after_end.next().await.is_none());
    // A bad Last-Event-ID is a clear error.
    let r = server
        .http
        .get(&url)
        .bearer_auth(&key)
        .header("Last-Event-ID", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    server.stop().await;
}
