//! Job creation throughput over the HTTP API: N concurrent clients `POST /v1/jobs` against a real
//! `keel-server` (SQLite home, synchronous=FULL, in-process worker running every created job with
//! a one-turn scripted model) for a fixed time; prints jobs/s and latency percentiles per N.
//!
//! `cargo bench -p keel-server --bench job_throughput` measures (3 s per N); without `--bench`
//! (as `cargo test --all-targets` runs it) it is a smoke run of a few jobs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel_app::Role;
use keel_server::{Server, ServerConfig};
use serde_json::json;

/// The allocator the `keel` binary uses, so the bench measures what ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(measure));
}

async fn run(measure: bool) {
    let home = tempfile::tempdir().expect("temp home");
    let p = home.path();
    std::fs::write(p.join("script.json"), r#"{"turns": [{"text": "ok"}]}"#).unwrap();
    std::fs::write(
        p.join("config.toml"),
        "[agent]\npoll_ms = 50\n\n[models.providers.scripted]\nkind = \"scripted\"\nscript = \"script.json\"\n",
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        listen: addr,
        rate_per_second: 1_000_000,
        rate_burst: 1_000_000,
        ..ServerConfig::default()
    };
    let server = Server::open(p, config).await.expect("open server");
    let db = keel_app::kernel::open_db(p).await.unwrap();
    let key = keel_app::keys::create_key(&db, "bench", Role::Write, None)
        .await
        .unwrap()
        .key;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let url = format!("http://{addr}/v1/jobs");
    let (clients, duration): (&[usize], Duration) = if measure {
        (&[1, 4, 16], Duration::from_secs(3))
    } else {
        (&[2], Duration::from_millis(300))
    };
    println!("job creation over HTTP (POST /v1/jobs, jobs run by the in-process worker meanwhile)");
    for &n in clients {
        let running = Arc::new(AtomicBool::new(true));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (url, key, running) = (url.clone(), key.clone(), running.clone());
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut latencies = Vec::new();
                while running.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = http
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&json!({ "prompt": "hi", "model": "scripted:bench" }))
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
                    latencies.push(t.elapsed());
                }
                latencies
            }));
        }
        let start = Instant::now();
        tokio::time::sleep(duration).await;
        running.store(false, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.sort();
        let pct = |q: f64| all[((all.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        println!(
            "  {n:>2} clients: {:>6} jobs in {elapsed:.2} s = {:>7.1} jobs/s   latency p50 {:.2} ms, p99 {:.2} ms",
            all.len(),
            all.len() as f64 / elapsed,
            pct(0.5),
            pct(0.99)
        );
    }
    let _ = stop.send(());
    let _ = task.await;
}
