//! The push policy end to end: a push that fails during a sweep is retried
//! at the next sweep, and a request dropped after its event was stored still
//! gets the event queued. Both with real faults in the real queue backends.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

/// A pipeline `T` that ends at a log destination: quick and always successful.
fn log_pipeline() -> PipelineDir {
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/t.yaml",
        r#"
event_type: T
schema: any.schema.json
stages:
  - plugin: deliver
destinations:
  audit:
    type: log
"#,
    );
    dir
}

/// Makes every push to the queue of `T` fail, for real, until mended: a
/// trigger that aborts inserts into apalis-sqlite's `Jobs` table, or a
/// string where apalis-redis keeps the queue's task data (an idle worker
/// reads neither).
enum BrokenQueue {
    Sqlite(sqlx::SqlitePool),
    Redis(redis::aio::MultiplexedConnection, String),
}

impl BrokenQueue {
    async fn break_now(app: &TestApp) -> BrokenQueue {
        match app.redis_prefix() {
            None => {
                let url = format!("sqlite://{}/queue.db", app._data.path().display());
                let pool = sqlx::SqlitePool::connect(&url).await.expect("queue database");
                sqlx::query(
                    "CREATE TRIGGER test_broken_queue BEFORE INSERT ON Jobs \
                     BEGIN SELECT RAISE(ABORT, 'queue broken by the test'); END",
                )
                .execute(&pool)
                .await
                .expect("trigger");
                BrokenQueue::Sqlite(pool)
            }
            Some(prefix) => {
                let url = app.redis_url().expect("redis url");
                let client = redis::Client::open(url).expect("redis client");
                let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
                let key = format!("{prefix}:events:T:data");
                redis::cmd("SET")
                    .arg(&key)
                    .arg("not a hash")
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("SET");
                BrokenQueue::Redis(conn, key)
            }
        }
    }

    async fn mend(self) {
        match self {
            BrokenQueue::Sqlite(pool) => {
                sqlx::query("DROP TRIGGER test_broken_queue")
                    .execute(&pool)
                    .await
                    .expect("drop trigger");
                pool.close().await;
            }
            BrokenQueue::Redis(mut conn, key) => {
                redis::cmd("DEL")
                    .arg(&key)
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("DEL");
            }
        }
    }
}

async fn failed_sweep_push_is_retried_at_the_next_sweep(backend: Backend) {
    // A stale-event rescue would take a minute: only the unqueued mark can
    // bring the event back within the test's bounds.
    let app = spawn_app_with(backend, log_pipeline(), |c| {
        c.insert("REQUEUE_AFTER".into(), "60s".into());
        c.insert("SWEEP_INTERVAL".into(), "200ms".into());
    })
    .await;
    let broken = BrokenQueue::break_now(&app).await;
    let id = accepted_id(app.post_event("T", json!({"n": 1})).await).await;
    // Long enough for the skip window after the ingest's failure to pass and
    // for several sweeps to take the event and fail to push it.
    let failing_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < failing_until {
        let (_, st) = app.get_json(&format!("/events/{id}/status"), ADMIN_KEY).await;
        assert_eq!(st["status"], "received", "ran while every push failed: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broken.mend().await;
    // Sweep interval plus the skip window after the last failure, with room
    // for a loaded machine; a stale-event rescue would take 60 s.
    app.wait_for(&id, "processed", Duration::from_secs(8)).await;
    app.stop().await;
}

/// Holds every write to the events table, for real, until released: a
/// write transaction on the SQLite store, or `LOCK TABLE events IN
/// EXCLUSIVE MODE` on PostgreSQL (reads go on; inserts wait).
enum HeldStore {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl HeldStore {
    async fn hold(app: &TestApp) -> HeldStore {
        use sqlx::Connection;
        match app.database_url() {
            None => {
                let url = format!("sqlite://{}/orchestrator.db", app._data.path().display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("store");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("lock");
                HeldStore::Sqlite(conn)
            }
            Some(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.expect("store");
                sqlx::query("BEGIN").execute(&mut conn).await.expect("begin");
                sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .expect("lock");
                HeldStore::Postgres(conn)
            }
        }
    }

    async fn release(self) {
        match self {
            HeldStore::Sqlite(mut conn) => {
                sqlx::query("COMMIT").execute(&mut conn).await.expect("unlock");
            }
            HeldStore::Postgres(mut conn) => {
                sqlx::query("COMMIT").execute(&mut conn).await.expect("unlock");
            }
        }
    }
}

/// The requests are dropped while their insert waits; the insert commits
/// afterwards (the store's group commit runs it whoever waits), so each
/// event is stored by a request that no longer exists. Each must still be
/// queued and processed.
async fn dropped_requests_never_strand_stored_events(backend: Backend) {
    const SINGLE: usize = 30;
    const BATCHES: usize = 5;
    const PER_BATCH: usize = 4;
    const N: usize = SINGLE + BATCHES * PER_BATCH;
    // Without a finished push, only a stale-event rescue (a minute) would
    // queue a stranded event.
    let app = spawn_app_with(backend, log_pipeline(), |c| {
        c.insert("REQUEUE_AFTER".into(), "60s".into());
    })
    .await;
    // The worker is warm and the queue answers.
    let warm = accepted_id(app.post_event("T", json!({"warm": true})).await).await;
    app.wait_for(&warm, "processed", Duration::from_secs(10)).await;

    let held = HeldStore::hold(&app).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .expect("client");
    let sends = (0..SINGLE).map(|i| {
        client
            .post(app.url("/events"))
            .header("x-api-key", &app.key)
            .json(&json!({"tipo": "T", "dados": {"n": i}}))
            .send()
    });
    // And batches, which store all their items in one transaction.
    let batches = (0..BATCHES).map(|b| {
        let events: Vec<Value> = (0..PER_BATCH)
            .map(|i| json!({"tipo": "T", "dados": {"batch": b, "i": i}}))
            .collect();
        client
            .post(app.url("/events/batch"))
            .header("x-api-key", &app.key)
            .json(&json!({ "events": events }))
            .send()
    });
    let (answers, batch_answers) = futures::future::join(
        futures::future::join_all(sends),
        futures::future::join_all(batches),
    )
    .await;
    let answered = answers.iter().chain(&batch_answers).filter(|r| r.is_ok()).count();
    assert_eq!(answered, 0, "requests answered while the store was held");
    // Give the server time to notice the closed connections.
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release().await;
    let released = Instant::now();

    // The inserts the dropped requests left waiting commit as soon as the
    // store answers (group commit runs them whoever waits); a request that
    // had not reached the store before its client gave up (a very loaded
    // machine) stored nothing, which is fine. Every stored event must then
    // be queued and run.
    // How fast they commit depends on the machine's load (other tests, a
    // browser): the stored count is read once it has not changed for 1 s.
    let count = || async {
        let (_, page) = app.get_json("/events?tipo=T&limit=1000", ADMIN_KEY).await;
        page["items"].as_array().cloned().unwrap_or_default()
    };
    let mut stored = count().await.len() - 1;
    let mut unchanged_since = Instant::now();
    while unchanged_since.elapsed() < Duration::from_secs(1) {
        assert!(
            released.elapsed() < Duration::from_secs(15),
            "the stored count kept changing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count().await.len() - 1;
        if now != stored {
            (stored, unchanged_since) = (now, Instant::now());
        }
    }
    let settled = Instant::now();
    assert!(
        stored >= N / 2,
        "only {stored} of the {N} events of dropped requests were stored; the test proves little"
    );
    let deadline = settled + Duration::from_secs(5);
    loop {
        let items = count().await;
        let waiting: Vec<&Value> = items.iter().filter(|e| e["status"] != "processed").collect();
        if waiting.is_empty() {
            assert_eq!(
                items.len() - 1,
                stored,
                "events were stored after the store answered"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "5 s after the stored count settled, {} of {} stored events not processed: {:?}",
            waiting.len(),
            items.len(),
            waiting
                .iter()
                .take(10)
                .map(|e| (&e["id"], &e["status"]))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

crate::both_backends!(
    failed_sweep_push_is_retried_at_the_next_sweep,
    dropped_requests_never_strand_stored_events
);
