//! `spin_ms`: a slow, CPU-bound, non-idempotent tool for the kernel soak (`host/cli/tests/soak.rs`).
//!
//! Every execution first leaves one marker file in the granted directory `dir`, named
//! `<job>.<call>.<wall-clock ns>` and holding `<wall-clock start in ms> <tag>` (the tag is the value of
//! the environment variable named by `tag_env`, if granted: which host ran it), then busy-computes for
//! `ms` milliseconds without yielding to the host. The soak counts the markers of each
//! (job, call id) to know exactly how often a call ran, and when each execution started.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_sdk::prelude::*;
use wasip2::filesystem::types::{DescriptorFlags, ErrorCode, OpenFlags, PathFlags};

/// Arguments of `spin_ms`.
#[derive(Deserialize, JsonSchema)]
pub struct Spin {
    /// Guest path of a writable preopen for the execution marker (e.g. `/marks`).
    dir: String,
    /// Milliseconds of busy computation.
    ms: u64,
    /// Environment variable whose value tags the marker (e.g. the host's name).
    #[serde(default)]
    tag_env: Option<String>,
}

/// `[A-Za-z0-9_-]` only, so ids from the model cannot make a path.
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Record this execution: one new file per execution, created exclusively (never appended, so two
/// processes running the same call at once cannot lose a marker).
fn mark(ctx: &Context, dir: &str, tag: &str) -> Result<u64, ToolError> {
    let d = super::preopen(dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let job = safe(ctx.job_id.as_deref().unwrap_or("nojob"));
    let call = safe(&ctx.call_id);
    let ms = now.as_millis() as u64;
    for n in 0..100u128 {
        let name = format!("{job}.{call}.{}", now.as_nanos() + n);
        match d.open_at(
            PathFlags::empty(),
            &name,
            OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
            DescriptorFlags::WRITE,
        ) {
            Ok(f) => {
                f.write(format!("{ms} {tag}\n").as_bytes(), 0)
                    .map_err(|e| ToolError::failed(format!("write marker {name}: {}", e.name())))?;
                return Ok(ms);
            }
            Err(ErrorCode::Exist) => continue,
            Err(e) => return Err(ToolError::failed(format!("create marker {name}: {}", e.name()))),
        }
    }
    Err(ToolError::failed("no free marker name"))
}

/// Mark, then compute for `ms` milliseconds.
pub fn spin_ms(ctx: &Context, i: Spin) -> Result<Value, ToolError> {
    let tag = i
        .tag_env
        .as_deref()
        .and_then(|name| std::env::var(name).ok())
        .map_or_else(|| "-".to_string(), |v| safe(&v));
    let started_ms = mark(ctx, &i.dir, &tag)?;
    let start = Instant::now();
    let until = Duration::from_millis(i.ms);
    let mut acc = 0u64;
    let mut rounds = 0u64;
    while start.elapsed() < until {
        for k in 0..10_000u64 {
            acc = black_box(acc.wrapping_mul(6364136223846793005).wrapping_add(k));
        }
        rounds += 1;
    }
    Ok(json!({ "spun_ms": i.ms, "rounds": rounds, "acc": acc, "started_ms": started_ms }))
}
