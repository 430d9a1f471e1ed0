//! keel-app's scoped use cases and the job event stream, on a real SQLite database: another
//! scope's job or action is not found, jobs page by cursor, and a job's stream replays the stored
//! events then follows live ones with no gap and no duplicate while events are being written.

use std::time::Duration;

use futures::StreamExt as _;
use keel_app::actions::{ActionQuery, Decision, TokenAnswer, decide, get_action, list_actions, resolve_by_token};
use keel_app::events::{JobStreamItem, StreamOptions, job_events};
use keel_app::jobs::{JobQuery, cancel_job, get_job, list_jobs, show_job};
use keel_app::ledger::{UsageRequest, usage};
use keel_app::{Caller, ErrorKind, Role};
use keel_kernel::Kernel;
use keel_kernel::action::{ActionState, ActionType, NewAction, ToolCallRef};
use keel_kernel::event::EventType;
use keel_kernel::job::{JobState, NewJob};
use serde_json::json;
use uuid::Uuid;

/// A kernel over a fresh SQLite file (kept alive by the returned directory).
async fn kernel() -> (Kernel, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = keel_app::kernel::open_kernel(dir.path()).await.unwrap();
    (kernel, dir)
}

/// A RUNNING job of `scope`.
async fn running_job(kernel: &Kernel, scope: &str) -> Uuid {
    let job = kernel.jobs().create(NewJob::new(scope, "test")).await.unwrap().job;
    kernel.jobs().start(job.id).await.unwrap();
    job.id
}

/// An approval the job waits on, with its resume token.
async fn approval(kernel: &Kernel, job_id: Uuid) -> (Uuid, String) {
    let created = kernel
        .actions()
        .create(NewAction {
            job_id,
            action_type: ActionType::Approval,
            title: "write a file".into(),
            request: json!({ "tool": "fs/write", "arguments": { "path": "/out/x" } }),
            call: Some(ToolCallRef {
                tool: "fs/write".into(),
                arguments: json!({ "path": "/out/x" }),
            }),
            ttl: chrono::Duration::hours(1),
        })
        .await
        .unwrap();
    (created.action.id, created.token)
}

fn not_found<T: std::fmt::Debug>(result: Result<T, keel_app::AppError>) {
    let error = result.expect_err("another scope's object must not be found");
    assert_eq!(error.kind, ErrorKind::NotFound, "{}", error.message);
}

#[tokio::test]
async fn another_scopes_job_and_action_are_not_found() {
    let (kernel, _dir) = kernel().await;
    let a = Caller::local_admin("tenant-a");
    let b = Caller::local_admin("tenant-b");
    let job = running_job(&kernel, &a.scope).await;
    let (action, token) = approval(&kernel, job).await;

    // Tenant B learns nothing of A's job or action, and changes nothing.
    not_found(get_job(&kernel, &b, job).await);
    not_found(show_job(&kernel, &b, job).await);
    not_found(cancel_job(&kernel, &b, job, "mine now").await);
    not_found(
        job_events(&kernel, &b, job, StreamOptions::after(0, Duration::from_millis(10)))
            .await
            .map(|_| ()),
    );
    not_found(list_actions(&kernel, &b, &ActionQuery::pending(Some(job))).await);
    not_found(get_action(&kernel, &b, action).await);
    let approve = Decision {
        approved: true,
        for_session: false,
        value: json!(null),
        by: None,
    };
    not_found(decide(&kernel, &b, action, approve.clone()).await);
    let answer = TokenAnswer {
        approved: Some(true),
        ..TokenAnswer::default()
    };
    not_found(resolve_by_token(&kernel, Some(&b), &token, answer.clone()).await);
    assert!(
        list_jobs(&kernel, &b, &JobQuery::default())
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
    assert!(
        list_actions(&kernel, &b, &ActionQuery::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        usage(&kernel, &b, &UsageRequest::default()).await.unwrap().scope,
        "tenant-b"
    );
    assert_eq!(
        get_action(&kernel, &a, action).await.unwrap().state,
        ActionState::Pending
    );
    assert_eq!(get_job(&kernel, &a, job).await.unwrap().state, JobState::WaitingAction);

    // A reader of A may look but not answer or cancel.
    let reader = Caller {
        role: Role::Read,
        ..a.clone()
    };
    assert_eq!(
        list_actions(&kernel, &reader, &ActionQuery::pending(Some(job)))
            .await
            .unwrap()
            .len(),
        1
    );
    let refused = decide(&kernel, &reader, action, approve.clone()).await.unwrap_err();
    assert_eq!(refused.kind, ErrorKind::Forbidden);
    let refused = cancel_job(&kernel, &reader, job, "no").await.unwrap_err();
    assert_eq!(refused.kind, ErrorKind::Forbidden);

    // A's own token works for A, once.
    let resolved = resolve_by_token(&kernel, Some(&a), &token, answer.clone())
        .await
        .unwrap();
    assert_eq!(resolved.state, ActionState::Resolved);
    assert_eq!(resolved.resolution.unwrap().approved, Some(true));
    let again = resolve_by_token(&kernel, Some(&a), &token, answer).await.unwrap_err();
    assert_eq!(again.kind, ErrorKind::User, "{}", again.message);
    assert_eq!(
        cancel_job(&kernel, &a, job, "done").await.unwrap().state,
        JobState::Cancelled
    );
}

#[tokio::test]
async fn approve_for_the_session_is_recorded_and_only_for_approvals() {
    let (kernel, _dir) = kernel().await;
    let a = Caller::local_admin("s");
    let job = running_job(&kernel, &a.scope).await;
    let (action, _) = approval(&kernel, job).await;
    let deny_for_session = Decision {
        approved: false,
        for_session: true,
        value: json!(null),
        by: None,
    };
    assert_eq!(
        decide(&kernel, &a, action, deny_for_session).await.unwrap_err().kind,
        ErrorKind::User
    );
    let approve = Decision {
        approved: true,
        for_session: true,
        value: json!(null),
        by: Some("ada".into()),
    };
    let resolution = decide(&kernel, &a, action, approve).await.unwrap().resolution.unwrap();
    assert_eq!(resolution.value, json!("session"));
    assert_eq!(resolution.resolved_by.as_deref(), Some("ada"));
}

#[tokio::test]
async fn jobs_page_by_cursor_newest_first() {
    let (kernel, _dir) = kernel().await;
    let a = Caller::local_admin("pages");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(kernel.jobs().create(NewJob::new("pages", "test")).await.unwrap().job.id);
    }
    kernel.jobs().create(NewJob::new("elsewhere", "test")).await.unwrap();
    let mut seen = Vec::new();
    let mut query = JobQuery {
        limit: Some(2),
        ..JobQuery::default()
    };
    let mut pages = 0;
    loop {
        let page = list_jobs(&kernel, &a, &query).await.unwrap();
        pages += 1;
        assert!(page.jobs.len() <= 2);
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next_cursor {
            Some(cursor) => query.cursor = Some(cursor),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    ids.reverse();
    assert_eq!(seen, ids, "every job of the scope once, newest first");
    let empty_page = JobQuery {
        limit: Some(0),
        ..JobQuery::default()
    };
    assert_eq!(
        list_jobs(&kernel, &a, &empty_page).await.unwrap_err().kind,
        ErrorKind::User
    );
    let bad_cursor = JobQuery {
        cursor: Some("not-a-cursor".into()),
        ..JobQuery::default()
    };
    assert_eq!(
        list_jobs(&kernel, &a, &bad_cursor).await.unwrap_err().kind,
        ErrorKind::User
    );
    let all = list_jobs(&kernel, &a, &JobQuery::default()).await.unwrap();
    assert_eq!(all.jobs.len(), 5);
    assert!(all.next_cursor.is_none());
}

/// The sequence numbers of the events a stream yields, until it ends.
async fn collect_seqs(
    mut stream: futures::stream::BoxStream<'static, Result<JobStreamItem, keel_app::AppError>>,
) -> (Vec<u64>, usize) {
    let mut seqs = Vec::new();
    let mut waiting = 0;
    while let Some(item) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the stream ends after the job's terminal event")
    {
        match item.unwrap() {
            JobStreamItem::Event { event } => seqs.push(event.seq),
            JobStreamItem::Waiting { .. } => waiting += 1,
        }
    }
    (seqs, waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replays_then_follows_with_no_gap_and_no_duplicate() {
    let (kernel, dir) = kernel().await;
    let a = Caller::local_admin("stream");
    let job = running_job(&kernel, &a.scope).await;
    for i in 0..60 {
        kernel
            .jobs()
            .emit(job, EventType::Progress, json!({ "message": format!("stored {i}") }))
            .await
            .unwrap();
    }
    // Another process on the same database: its events are never published on this kernel's bus.
    let other = keel_app::kernel::open_kernel(dir.path()).await.unwrap();
    let writer = {
        let (kernel, other) = (kernel.clone(), other.clone());
        tokio::spawn(async move {
            for i in 0..150 {
                let by = if i % 3 == 0 { &other } else { &kernel };
                by.jobs()
                    .emit(job, EventType::Progress, json!({ "message": format!("live {i}") }))
                    .await
                    .unwrap();
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            kernel.jobs().complete(job, None).await.unwrap();
        })
    };
    // Opened while the writer runs: the replay of stored events races the live ones.
    let poll = Duration::from_millis(20);
    let from_start = job_events(&kernel, &a, job, StreamOptions::after(0, poll))
        .await
        .unwrap();
    let from_40 = job_events(&kernel, &a, job, StreamOptions::after(40, poll))
        .await
        .unwrap();
    let (whole, resumed) = tokio::join!(collect_seqs(from_start), collect_seqs(from_40));
    writer.await.unwrap();

    let stored = kernel
        .read_events(&keel_kernel::event::EventQuery {
            filter: keel_kernel::event::EventFilter::job(job),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = stored.last().unwrap();
    assert!(last.ends_job(), "the job ended: {last:?}");
    // queued + started + 60 stored + 150 live + completed
    assert_eq!(last.seq, 213);
    assert_eq!(
        whole.0,
        (1..=last.seq).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert_eq!(resumed.0, (41..=last.seq).collect::<Vec<_>>(), "resumed after seq 40");
    assert_eq!((whole.1, resumed.1), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_signals_a_pending_action_once_and_not_on_replay() {
    let (kernel, _dir) = kernel().await;
    let a = Caller::local_admin("waits");
    let job = running_job(&kernel, &a.scope).await;
    let mut stream = job_events(&kernel, &a, job, StreamOptions::after(0, Duration::from_millis(20)))
        .await
        .unwrap();
    let (action, _) = approval(&kernel, job).await;
    let mut items = Vec::new();
    // Up to the waiting signal.
    loop {
        let item = stream.next().await.unwrap().unwrap();
        let done = matches!(item, JobStreamItem::Waiting { .. });
        items.push(item);
        if done {
            break;
        }
    }
    let kinds: Vec<String> = items
        .iter()
        .map(|i| match i {
            JobStreamItem::Event { event } => event.event_type.as_str().to_string(),
            JobStreamItem::Waiting { action: w, .. } => {
                assert_eq!(w.id, action);
                "waiting".into()
            }
        })
        .collect();
    assert_eq!(kinds.last().unwrap(), "waiting");
    assert_eq!(kinds[kinds.len() - 2], "action.required", "{kinds:?}");
    let approve = Decision {
        approved: true,
        for_session: false,
        value: json!(null),
        by: None,
    };
    decide(&kernel, &a, action, approve).await.unwrap();
    kernel.jobs().complete(job, None).await.unwrap();
    let (rest, waiting) = collect_seqs(stream).await;
    assert!(!rest.is_empty());
    assert_eq!(waiting, 0);
    // Replayed after the answer: the action is no longer pending, so no signal.
    let replay = job_events(&kernel, &a, job, StreamOptions::after(0, Duration::from_millis(20)))
        .await
        .unwrap();
    let (seqs, waiting) = collect_seqs(replay).await;
    assert_eq!(waiting, 0);
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stream_of_a_finished_job_replays_and_ends() {
    let (kernel, _dir) = kernel().await;
    let a = Caller::local_admin("done");
    let job = running_job(&kernel, &a.scope).await;
    kernel.jobs().complete(job, None).await.unwrap();
    let stream = job_events(&kernel, &a, job, StreamOptions::after(0, Duration::from_millis(5)))
        .await
        .unwrap();
    let (seqs, _) = collect_seqs(stream).await;
    assert_eq!(seqs, vec![1, 2, 3]);
    // Past the end: nothing, and it still ends.
    let stream = job_events(&kernel, &a, job, StreamOptions::after(3, Duration::from_millis(5)))
        .await
        .unwrap();
    assert_eq!(collect_seqs(stream).await.0, Vec::<u64>::new());
}
