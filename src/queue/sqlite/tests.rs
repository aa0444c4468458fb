//! The SQLite queue's tests: the shared scenarios (see
//! [`crate::queue::test_support`]) on a fresh database file each, and what
//! only SQLite has: its migrations, its PRAGMAs and its janitor.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use apalis::prelude::{TaskBuilder, TaskId};
use apalis_sqlite::SqliteTask;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::SqliteQueue;
use crate::queue::Queue;
use crate::queue::codec::new_task_id;
use crate::queue::test_support::{
    bad_tasks_scenario, delayed_elsewhere_scenario, delayed_push_scenario, fair_sharing_scenario,
    graceful_shutdown_scenario, idle_wake_scenario, init_tracing, orphan_recovery_scenario,
    push_handle_restart_scenario, restart_after_backend_error_scenario,
};

async fn open(dir: &std::path::Path) -> SqlitePool {
    let opts = SqliteConnectOptions::new()
        .filename(dir.join("queue.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .expect("open sqlite")
}

/// A queue on a fresh database file, and that file's pool.
async fn sqlite_queue(dir: &tempfile::TempDir) -> (SqliteQueue, SqlitePool) {
    let pool = open(dir.path()).await;
    let q = SqliteQueue::new(pool.clone()).await.expect("queue");
    (q, pool)
}

/// Also: the migrations run twice, apalis leaves `synchronous` alone, and the janitor
/// deletes finished rows once they are old enough, and of their queue only.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_push_handle_restart() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, pool) = sqlite_queue(&dir).await;
    // Running the migrations again is a no-op.
    let q = {
        drop(q);
        SqliteQueue::new(pool.clone()).await.expect("queue again")
    };
    // The worker's own janitor must not delete what this test counts.
    q.inner.retention_secs.store(3600, Ordering::Relaxed);
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&pool)
        .await
        .expect("pragma");
    assert_eq!(sync, 1, "apalis must not have switched synchronous to OFF");

    let queue = "events:TEST";
    const N: usize = 300;
    let janitor = async || {
        let rows =
            || sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM Jobs WHERE job_type = ?1").bind(queue);
        assert_eq!(rows().fetch_one(&pool).await.expect("count"), N as i64);
        q.inner.janitor(queue).await.expect("janitor");
        assert_eq!(
            rows().fetch_one(&pool).await.expect("count"),
            N as i64,
            "deleted rows too early"
        );
        sqlx::query("UPDATE Jobs SET done_at = done_at - 100000")
            .execute(&pool)
            .await
            .expect("age rows");
        q.inner.janitor(queue).await.expect("janitor");
        assert_eq!(
            rows().fetch_one(&pool).await.expect("count"),
            0,
            "finished rows were not deleted"
        );
        assert_eq!(
            q.depth("events:OTHER").await.expect("depth"),
            1,
            "janitor touched another queue"
        );
    };
    push_handle_restart_scenario(&q, queue, &|| q.instance_starts(), N, 4, janitor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_delayed_push_waits() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, _pool) = sqlite_queue(&dir).await;
    // A due time is rounded up to the next millisecond, never down: no slack.
    delayed_push_scenario(
        &q,
        "events:DELAY",
        Duration::from_millis(2000),
        Duration::from_millis(1500),
        Duration::ZERO,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_survives_bad_payloads_and_panics() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, pool) = sqlite_queue(&dir).await;
    let queue = "events:BAD";
    // A payload from a future version (does not decode) and a garbage one.
    let rows: Vec<SqliteTask> = [br#"{"v":"9"}"#.to_vec(), b"\xff garbage".to_vec()]
        .into_iter()
        .map(|p| {
            TaskBuilder::new(p)
                .task_id(TaskId::from_str(&new_task_id()).expect("id"))
                .max_attempts(1)
                .build()
        })
        .collect();
    let mut tx = pool.begin().await.expect("tx");
    apalis_sqlite::queries::push_tasks(&mut *tx, queue, &rows)
        .await
        .expect("raw push");
    tx.commit().await.expect("commit");
    bad_tasks_scenario(&q, queue, &|| q.instance_starts()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_shares_a_queue_fairly_between_partners() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, _pool) = sqlite_queue(&dir).await;
    fair_sharing_scenario(&q, "events:FAIR").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_idle_workers_wake_on_work() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, _pool) = sqlite_queue(&dir).await;
    idle_wake_scenario(&q, &q, "events:IDLE").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_graceful_shutdown_keeps_claimed_tasks() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, _pool) = sqlite_queue(&dir).await;
    graceful_shutdown_scenario(&q, "events:GRACE").await;
}

/// The fault: the jobs table disappears for a while; the supervisor keeps restarting the
/// worker with backoff until it is back.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_worker_restarts_after_backend_error() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, pool) = sqlite_queue(&dir).await;
    let rename = |sql: &'static str| {
        let pool = pool.clone();
        async move || {
            sqlx::query(sql).execute(&pool).await.expect(sql);
        }
    };
    let starts = || q.instance_starts();
    restart_after_backend_error_scenario(
        &q,
        "events:RESTART",
        &starts,
        3,
        Duration::from_secs(15),
        rename("ALTER TABLE Jobs RENAME TO Jobs_away"),
        rename("ALTER TABLE Jobs_away RENAME TO Jobs"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_orphaned_tasks_are_recovered() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, pool) = sqlite_queue(&dir).await;
    let queue = "events:ORPHAN";
    // A dead worker that claimed the task 100 s ago.
    let kill = async || {
        sqlx::query(
            "INSERT INTO Workers (id, worker_type, storage_name, layers, last_seen, started_at)
             VALUES ('ghost', ?1, 'SqliteStorage', '', strftime('%s', 'now') - 100, strftime('%s', 'now') - 200)",
        )
        .bind(queue)
        .execute(&pool)
        .await
        .expect("ghost worker");
        sqlx::query(
            "UPDATE Jobs SET status = 'Queued', lock_by = 'ghost', lock_at = strftime('%s', 'now') - 100",
        )
        .execute(&pool)
        .await
        .expect("claim");
    };
    orphan_recovery_scenario(&q, queue, kill).await;
}

/// Delayed tasks pushed before a restart (another queue object on the
/// file) start on time: the upkeep reads when they are due from the table.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_delayed_tasks_from_before_a_restart_start_on_time() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (before, pool) = sqlite_queue(&dir).await;
    let after = SqliteQueue::new(pool).await.expect("queue again");
    delayed_elsewhere_scenario(&after, &before, "events:LATER", false).await;
}
