//! Retention and statistics: counters that follow every status change, the
//! purge of expired events with what they own, leases, the admin view, and
//! a database at the previous schema upgraded with its events.

use std::time::Duration;

use chrono::{DateTime, Utc};
use orchestrator::store::{
    AttemptFinish, EventStore, Expiry, InsertOutcome, MaintenanceStore, NewEvent, Purged, RetryOutcome,
    SqlStore, StatsQuery, Status, Store,
};
use serde_json::{Value, json};
use sqlx::Row;

use crate::helpers::*;

/// The statistics of `q`; without a window, also checks that the running
/// totals agree with the sum of every counter row (a window from 1970).
async fn total(store: &SqlStore, q: StatsQuery) -> (i64, Value) {
    let s = store.stats(&q).await.expect("stats");
    if q.since.is_none() && q.until.is_none() {
        let all = StatsQuery {
            since: DateTime::from_timestamp(0, 0),
            ..q.clone()
        };
        let windowed = store.stats(&all).await.expect("stats");
        assert_eq!(
            format!("{s:?}"),
            format!("{windowed:?}"),
            "totals = sum of the rows"
        );
    }
    (s.total, json!({"by_status": s.by_status, "by_type": s.by_type}))
}

/// Counter rows that meet `condition` (width 0: the running totals).
async fn count_rows(store: &SqlStore, condition: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) AS n FROM event_counts WHERE {condition}");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .expect("rows")
        .try_get("n")
        .expect("n")
}

/// Rows of `table` whose `column` is `id`.
async fn rows_of(store: &SqlStore, table: &str, column: &str, id: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE {column} = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("count")
        .try_get("n")
        .expect("n")
}

async fn owned_rows(store: &SqlStore, id: &str) -> i64 {
    let mut n = 0;
    for table in ["attempts", "deliveries", "idempotency_keys"] {
        n += rows_of(store, table, "event_id", id).await;
    }
    n
}

async fn counters_follow_every_change_and_the_purge(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let now = Utc::now();
    let h = chrono::Duration::hours(1);
    store
        .insert_event(at("01OLD", "T", "p", now - h * 72, None))
        .await
        .expect("insert");
    store
        .insert_event(at("01MID", "T", "p", now - h * 3, Some("mid")))
        .await
        .expect("insert");
    let batch = vec![
        at("01NEW", "U", "q", now, Some("k")),
        at("01WAIT", "T", "p", now, None),
    ];
    store.insert_events(batch).await.expect("insert");
    run(&store, "01OLD", Status::Processed).await;
    run(&store, "01MID", Status::DeadLettered).await;
    run(&store, "01NEW", Status::Retrying).await;
    run(&store, "01NEW", Status::Processed).await;
    store
        .finish_attempt(
            "01OLD",
            1,
            &AttemptFinish {
                deliveries: vec![engine::DeliveryReport {
                    status_code: Some(200),
                    duration_ms: 1.0,
                    ..engine::DeliveryReport::not_called("erp", engine::DeliveryOutcome::Delivered, None)
                }],
                ..finish(Status::Processed)
            },
        )
        .await
        .expect("late finish");

    let (n, s) = total(&store, StatsQuery::default()).await;
    assert_eq!(n, 4, "{s}");
    assert_eq!(
        s["by_status"],
        json!({"processed": 2, "dead_lettered": 1, "received": 1})
    );
    assert_eq!(s["by_type"], json!({"T": 3, "U": 1}));
    let q = |since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>>, partner: Option<&str>| StatsQuery {
        partner_id: partner.map(str::to_owned),
        since,
        until,
    };
    assert_eq!(total(&store, q(None, None, Some("q"))).await.0, 1);
    assert_eq!(total(&store, q(Some(now - h), None, None)).await.0, 2);
    assert_eq!(
        total(&store, q(Some(now - h * 4), Some(now - h), None)).await.0,
        1
    );
    assert_eq!(total(&store, q(None, Some(now - h * 24), None)).await.0, 1);
    assert_eq!(total(&store, q(Some(now + h), None, None)).await.0, 0);
    let stats = store.stats(&StatsQuery::default()).await.expect("stats");
    assert!(stats.processing_ms.p99.is_some(), "{stats:?}");

    // A manual retry moves the dead letter back to received.
    assert!(matches!(
        store.manual_retry("01MID").await.expect("retry"),
        RetryOutcome::Requeued(_)
    ));
    let counts = store.status_counts().await.expect("counts");
    assert_eq!(counts["received"], 2);
    assert_eq!(counts["dead_lettered"], 0);
    // The oldest unfinished event per type: the one retried, received 3 h ago.
    let oldest = store.oldest_pending().await.expect("oldest");
    assert_eq!(oldest.len(), 1, "{oldest:?}");
    assert_eq!(oldest["T"].timestamp_millis(), (now - h * 3).timestamp_millis());

    // Merging the writers' minutes and rolling every row up into days
    // changes no total.
    let before = total(&store, StatsQuery::default()).await;
    assert!(count_rows(&store, "width = 60000 AND writer <> 0").await > 0);
    store
        .compact(now + chrono::Duration::minutes(10))
        .await
        .expect("compact");
    assert_eq!(total(&store, StatsQuery::default()).await, before);
    assert_eq!(
        count_rows(&store, "width = 60000 AND writer <> 0").await,
        0,
        "minutes older than five merged into one writer"
    );
    assert!(
        count_rows(&store, "width = 60000").await > 0,
        "the minutes stay minutes"
    );
    store.compact(now + h * 24 * 30).await.expect("compact");
    assert_eq!(total(&store, StatsQuery::default()).await, before);
    assert_eq!(
        count_rows(&store, "width > 0 AND width < 86400000").await,
        0,
        "every counter row was rolled up into days"
    );
    assert!(count_rows(&store, "width = 0").await > 0, "the totals stay");

    // Everything terminal has expired an hour from now; nothing else goes.
    let expiry = Expiry {
        processed_before: now + h,
        dead_lettered_before: now + h,
    };
    assert_eq!(
        store.count_expired(&expiry).await.expect("count"),
        Purged {
            processed: 2,
            dead_lettered: 0,
            partitions: 0
        }
    );
    assert_eq!(store.purge_expired(&expiry, 1).await.expect("purge").total(), 1);
    assert_eq!(store.purge_expired(&expiry, 10).await.expect("purge").total(), 1);
    assert_eq!(store.purge_expired(&expiry, 10).await.expect("purge").total(), 0);
    for id in ["01OLD", "01NEW"] {
        assert!(store.get_event(id).await.expect("get").is_none(), "{id} purged");
        assert_eq!(owned_rows(&store, id).await, 0, "{id}'s rows purged");
    }
    for id in ["01MID", "01WAIT"] {
        assert!(store.get_event(id).await.expect("get").is_some(), "{id} kept");
    }
    assert_eq!(owned_rows(&store, "01MID").await, 2, "its attempt and key stay");
    let (n, s) = total(&store, StatsQuery::default()).await;
    assert_eq!((n, &s["by_status"]), (2, &json!({"received": 2})), "{s}");
    assert_eq!(
        store
            .stats(&StatsQuery::default())
            .await
            .expect("stats")
            .processing_ms
            .p50,
        None
    );

    // The purged event's key is free again; the retained one's is not.
    match store
        .insert_event(at("01AGAIN", "U", "q", Utc::now(), Some("k")))
        .await
        .expect("insert")
    {
        InsertOutcome::Created(ev) => assert_eq!(ev.id, "01AGAIN"),
        other => panic!("a purged event's key makes a new event: {other:?}"),
    }
    match store
        .insert_event(at("01MID2", "T", "p", Utc::now(), Some("mid")))
        .await
        .expect("insert")
    {
        InsertOutcome::Replayed(ev) => assert_eq!(ev.id, "01MID"),
        other => panic!("a retained event's key replays: {other:?}"),
    }
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

async fn one_holder_at_a_time(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let now = Utc::now();
    let later = now + chrono::Duration::seconds(60);
    assert!(store.take_lease("purge", "a", now, later).await.expect("lease"));
    assert!(!store.take_lease("purge", "b", now, later).await.expect("lease"));
    assert!(store.take_lease("purge", "a", now, later).await.expect("renew"));
    // A lease that ran out can be taken over.
    let after = later + chrono::Duration::seconds(1);
    assert!(
        store
            .take_lease("purge", "b", after, after)
            .await
            .expect("take over")
    );
    store
        .finish_task("purge", "b", &json!({"removed": 1}))
        .await
        .expect("finish");
    let state = store.task_state("purge").await.expect("state").expect("row");
    assert_eq!(state.last_run, Some(json!({"removed": 1})));
    assert!(
        store
            .take_lease("purge", "a", now, later)
            .await
            .expect("free again")
    );
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

/// A type whose webhook answers what `rx` says for `/d`, with one retry a
/// minute away (so a failing event stays `retrying`).
fn webhook_pipeline(rx: &Receiver) -> PipelineDir {
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/nota.yaml",
        &format!(
            r#"
event_type: NOTA
schema: any.schema.json
retry:
  max_retries: 1
  backoff: fixed
  initial_delay: 60s
stages:
  - plugin: deliver
destinations:
  d:
    type: webhook
    url: {}
    timeout: 2s
"#,
            rx.url("/d")
        ),
    );
    dir
}

async fn expired_events_go_and_the_rest_stays(backend: Backend) {
    let rx = Receiver::start().await;
    let app = spawn_app_with(backend, webhook_pipeline(&rx), |c| {
        c.insert("RETENTION_PROCESSED".into(), "3s".into());
        c.insert("RETENTION_DEAD_LETTERED".into(), "1h".into());
        c.insert("PURGE_INTERVAL".into(), "1s".into());
    })
    .await;
    let post = |dados: Value, key: Option<String>| {
        let mut req = app
            .http
            .post(app.url("/events"))
            .header("X-API-Key", &app.key)
            .json(&json!({"tipo": "NOTA", "dados": dados}));
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send()
    };
    let mut processed = Vec::new();
    for i in 0..60 {
        let resp = post(json!({"i": i}), Some(format!("k{i}"))).await.expect("post");
        processed.push(accepted_id(resp).await);
    }
    for id in &processed {
        app.wait_for(id, "processed", Duration::from_secs(20)).await;
    }
    // A replay while the event is retained answers the event: the last one,
    // processed just now (the first may be past its 3 s retention already
    // when the machine is busy: the suite saw it purged, and the replay
    // made a new event).
    let resp = post(json!({"i": 59}), Some("k59".into())).await.expect("post");
    assert_eq!(resp.status(), 200);
    // Then: a dead letter (400 is permanent) and one waiting for its retry.
    rx.set("/d", Behaviour::Status(400));
    let dead = accepted_id(post(json!({"dead": true}), None).await.expect("post")).await;
    app.wait_for(&dead, "dead_lettered", Duration::from_secs(20))
        .await;
    rx.set("/d", Behaviour::Status(503));
    let waiting = accepted_id(post(json!({"retry": true}), None).await.expect("post")).await;
    app.wait_for(&waiting, "retrying", Duration::from_secs(20)).await;

    // Processed 3 s ago at most, purged every second: gone within ~5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = app.get_json("/events/stats", ADMIN_KEY).await;
        if stats["by_status"]["processed"] == 0 {
            assert_eq!(stats["total"], 2, "{stats}");
            assert_eq!(stats["by_status"]["dead_lettered"], 1, "{stats}");
            assert_eq!(stats["by_status"]["retrying"], 1, "{stats}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not purged: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &processed {
        let (status, _) = app.get_json(&format!("/events/{id}"), &app.key).await;
        assert_eq!(status, 404, "{id} is purged");
    }
    for id in [&dead, &waiting] {
        let (status, _) = app.get_json(&format!("/events/{id}"), &app.key).await;
        assert_eq!(status, 200, "{id} is kept");
    }
    let (_, page) = app.get_json("/events?limit=1000", &app.key).await;
    let listed: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");

    // The key of a purged event makes a new one.
    let resp = post(json!({"i": 0}), Some("k0".into())).await.expect("post");
    assert_eq!(resp.status(), 202);
    let again = accepted_id(resp).await;
    assert!(!processed.contains(&again));

    let doc = app.openapi().await;
    let key_doc = doc["paths"]["/events"]["post"]["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "Idempotency-Key"))
        .and_then(|p| p["description"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        key_doc.contains("as long as"),
        "the OpenAPI text says how long a key lives: {key_doc}"
    );

    let metrics = app.metrics_text().await;
    let purged: u64 = metrics
        .lines()
        .find(|l| l.starts_with("events_purged_total{status=\"processed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("events_purged_total");
    assert_eq!(purged, 60, "{metrics}");
    let (status, view) = app.get_json("/admin/retention", ADMIN_KEY).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["processed_seconds"], 3);
    assert!(view["last_run"]["finished_at"].is_string(), "{view}");
    assert!(view["next_run_at"].is_string(), "{view}");
    let (status, _) = app.get_json("/admin/retention", &app.key).await;
    assert_eq!(status, 403, "partners do not see it");
    let dry = app
        .http
        .post(app.url("/admin/retention/purge?dry_run=true"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("dry run");
    assert_eq!(dry.status(), 200);
    let dry: Value = dry.json().await.expect("json");
    assert_eq!(dry["dry_run"], true);
    let bad = app
        .http
        .post(app.url("/admin/retention/purge?dry_run=maybe"))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("bad query");
    assert_eq!(bad.status(), 422);
    let bad: Value = bad.json().await.expect("problem json");
    assert_eq!(bad["code"], "invalid_query");
    app.stop().await;
}

/// The schema before retention (migrations 1–3), with events in it.
async fn a_database_with_events_upgrades(backend: Backend) {
    let (url, iso, _dir) = test_database(&backend).await;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.expect("connect");
    let mut old = match backend {
        Backend::Embedded => sqlx::migrate!("./migrations/sqlite"),
        Backend::Production { .. } => sqlx::migrate!("./migrations/postgres"),
    };
    old.migrations = old
        .migrations
        .iter()
        .filter(|m| m.version <= 3)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    old.run(&pool).await.expect("old schema");
    let now = Utc::now().timestamp_millis();
    for (id, status, key, hash, took) in [
        ("01UP1", "processed", Some("key-1"), Some("hash-1"), Some(40_i64)),
        ("01UP2", "dead_lettered", None, Some("h"), None),
        ("01UP3", "received", Some("key-3"), Some("hash-3"), None),
    ] {
        sqlx::query(
            "INSERT INTO events (id, partner_id, tipo, dados, meta, pipeline_version, status, attempts, \
             received_at, updated_at, processing_ms, idempotency_key, request_hash, queued_at) \
             VALUES ($1, 'p', 'T', '{\"a\":1}', '{}', 'v', $2, 1, $3, $3, $4, $5, $6, $3)",
        )
        .bind(id)
        .bind(status)
        .bind(now - 120_000)
        .bind(took)
        .bind(key)
        .bind(hash)
        .execute(&pool)
        .await
        .expect("old event");
    }
    pool.close().await;

    let store = SqlStore::connect(&url, 4).await.expect("connect");
    store.migrate().await.expect("upgrade");
    let ev = store.get_event("01UP1").await.expect("get").expect("kept");
    assert_eq!(ev.dados, json!({"a": 1}));
    assert_eq!(ev.status, Status::Processed);
    let stats = store.stats(&StatsQuery::default()).await.expect("stats");
    assert_eq!(stats.total, 3);
    assert_eq!(stats.by_status.get("dead_lettered"), Some(&1));
    assert!(stats.processing_ms.p50.is_some_and(|v| (25..=50).contains(&v)));
    // Old keys still answer exactly.
    let again = |key: &str, hash: &str| NewEvent {
        idempotency_key: Some(key.into()),
        request_hash: hash.into(),
        ..new_event("01UPNEW")
    };
    assert!(matches!(
        store.insert_event(again("key-1", "hash-1")).await.expect("insert"),
        InsertOutcome::Replayed(e) if e.id == "01UP1"
    ));
    assert!(matches!(
        store.insert_event(again("key-3", "other")).await.expect("insert"),
        InsertOutcome::Conflict { existing_id } if existing_id == "01UP3"
    ));
    // The old events take part in the upkeep.
    let expiry = Expiry {
        processed_before: Utc::now(),
        dead_lettered_before: Utc::now(),
    };
    assert_eq!(
        store.purge_expired(&expiry, 100).await.expect("purge"),
        Purged {
            processed: 1,
            dead_lettered: 1,
            partitions: 0
        }
    );
    assert_eq!(store.stats(&StatsQuery::default()).await.expect("stats").total, 1);
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

both_backends!(
    counters_follow_every_change_and_the_purge,
    one_holder_at_a_time,
    expired_events_go_and_the_rest_stays,
    a_database_with_events_upgrades,
    purges_run_beside_writes,
    a_pass_removes_every_chunk,
);

/// PostgreSQL: a due time partition is dropped whole; what it must keep
/// moves to the default partition with its attempts and key.
async fn partitions_go_whole_and_keep_what_must_stay(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let now = Utc::now();
    let minute = chrono::Duration::minutes(1);
    let t0 = now - minute * 10;
    assert_eq!(
        store
            .prepare(t0, Duration::from_secs(60), Duration::from_secs(200))
            .await
            .expect("prepare"),
        4
    );
    let partitions = || async {
        sqlx::query("SELECT COUNT(*) AS n FROM event_partitions")
            .fetch_one(store.pool())
            .await
            .expect("partitions")
            .try_get::<i64, _>("n")
            .expect("n")
    };
    // Five events received in the first partition.
    let received = t0 + chrono::Duration::seconds(30);
    let ids: Vec<String> = (0..5)
        .map(|i| ulid::Ulid::from_datetime((received + chrono::Duration::milliseconds(i)).into()).to_string())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let ev = NewEvent {
            received_at: received,
            idempotency_key: Some(format!("key-{i}")),
            ..new_event(id)
        };
        store.insert_event(ev).await.expect("insert");
    }
    assert_eq!(
        rows_of(&store, "events_kept", "id", &ids[0]).await,
        0,
        "stored in its time partition"
    );
    run(&store, &ids[0], Status::Processed).await;
    run(&store, &ids[1], Status::Processed).await;
    run(&store, &ids[2], Status::DeadLettered).await;
    run(&store, &ids[3], Status::Retrying).await;
    // ids[4] stays received.

    // Processed events have expired, dead letters have not.
    let expiry = Expiry {
        processed_before: Utc::now() + minute,
        dead_lettered_before: Utc::now() - minute * 60,
    };
    let would = store.count_expired(&expiry).await.expect("count");
    assert_eq!(
        (would.processed, would.dead_lettered, would.partitions),
        (2, 0, 4)
    );
    let first = store.purge_expired(&expiry, 500).await.expect("purge");
    assert_eq!(
        first,
        Purged {
            processed: 2,
            dead_lettered: 0,
            partitions: 1
        }
    );
    assert_eq!(partitions().await, 3);
    for id in &ids[..2] {
        assert!(store.get_event(id).await.expect("get").is_none());
        assert_eq!(owned_rows(&store, id).await, 0);
    }
    for id in &ids[2..] {
        assert!(store.get_event(id).await.expect("get").is_some(), "{id} kept");
        assert_eq!(
            rows_of(&store, "events_kept", "id", id).await,
            1,
            "{id} moved to the default partition"
        );
    }
    assert_eq!(
        rows_of(&store, "attempts_kept", "event_id", &ids[2]).await,
        1,
        "its attempt moved too"
    );
    let (n, s) = total(&store, StatsQuery::default()).await;
    assert_eq!(n, 3, "{s}");
    assert_eq!(
        s["by_status"],
        json!({"received": 1, "retrying": 1, "dead_lettered": 1})
    );
    // The moved events go on: a retry, a finish; the kept key still answers.
    assert!(matches!(
        store.manual_retry(&ids[2]).await.expect("retry"),
        RetryOutcome::Requeued(_)
    ));
    run(&store, &ids[3], Status::Processed).await;
    let replay = NewEvent {
        idempotency_key: Some("key-4".into()),
        ..new_event("01ANOTHER")
    };
    assert!(matches!(
        store.insert_event(replay).await.expect("insert"),
        InsertOutcome::Replayed(e) if e.id == ids[4]
    ));
    let fresh = NewEvent {
        idempotency_key: Some("key-0".into()),
        ..new_event("01FRESH")
    };
    assert!(matches!(
        store.insert_event(fresh).await.expect("insert"),
        InsertOutcome::Created(_)
    ));

    // The empty partitions go one per call; then the kept row, row by row.
    let expiry = Expiry {
        processed_before: Utc::now() + minute,
        dead_lettered_before: Utc::now() - minute * 60,
    };
    let mut dropped = 0;
    loop {
        let p = store.purge_expired(&expiry, 500).await.expect("purge");
        dropped += p.partitions;
        if p.partitions == 0 {
            assert_eq!(p.processed, 1, "the moved event processed since: {p:?}");
            break;
        }
    }
    assert_eq!(dropped, 3);
    assert_eq!(partitions().await, 0);
    assert!(store.get_event(&ids[3]).await.expect("get").is_none());
    let counts = store.status_counts().await.expect("counts");
    assert_eq!((counts["received"], counts["processed"]), (3, 0), "{counts:?}");
    // A new partition, a period ahead of the clock; more when the caller
    // asks for more.
    assert_eq!(
        store
            .prepare(Utc::now(), Duration::from_secs(60), Duration::ZERO)
            .await
            .expect("prepare"),
        1
    );
    assert_eq!(
        store
            .prepare(Utc::now(), Duration::from_secs(60), Duration::from_secs(150))
            .await
            .expect("prepare"),
        2
    );
    assert_eq!(
        store
            .prepare(Utc::now(), Duration::from_secs(60), Duration::ZERO)
            .await
            .expect("prepare"),
        0
    );
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

/// The purge beside a steady stream of writes: no pass fails (SQLite: the
/// chunk takes its write lock before reading), and the counters still match
/// the rows.
async fn purges_run_beside_writes(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    for i in 0..400 {
        let id = format!("01PURGE{i:05}");
        store.insert_event(new_event(&id)).await.expect("insert");
        run(&store, &id, Status::Processed).await;
    }
    // The cut-off after the last of them, before the writer's first.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let expiry = Expiry {
        processed_before: Utc::now(),
        dead_lettered_before: Utc::now(),
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let id = format!("01WRITE{i:05}");
                store
                    .insert_event(new_event(&id))
                    .await
                    .expect("insert beside the purge");
                if i % 2 == 0 {
                    run(&store, &id, Status::Processed).await;
                }
            }
        })
    };
    let mut purged = 0;
    loop {
        let p = store
            .purge_expired(&expiry, 50)
            .await
            .expect("a purge chunk beside writes");
        purged += p.processed;
        if p.total() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    assert_eq!(purged, 400, "exactly the events expired at the cut-off");
    let rows: Vec<(String, i64)> = sqlx::query("SELECT status, COUNT(*) AS n FROM events GROUP BY status")
        .fetch_all(store.pool())
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.try_get("status").expect("status"), r.try_get("n").expect("n")))
        .collect();
    let counted = store.status_counts().await.expect("counts");
    for (status, n) in rows {
        assert_eq!(counted[&status], n, "{status}: counters {counted:?}");
    }
    assert_eq!(counted.values().sum::<i64>(), 300);
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

/// A pass goes on chunk after chunk, renewing its own lease, until nothing
/// expired is left.
async fn a_pass_removes_every_chunk(backend: Backend) {
    use orchestrator::retention::Purger;
    let (store, iso, _dir) = test_store(&backend).await;
    let batch: Vec<NewEvent> = (0..1_100).map(|i| new_event(&format!("01CHUNK{i:05}"))).collect();
    store.insert_events(batch).await.expect("insert");
    for i in 0..1_100 {
        run(&store, &format!("01CHUNK{i:05}"), Status::Processed).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let config = orchestrator::config::Config::from_map(&std::collections::HashMap::from([(
        "RETENTION_PROCESSED".to_owned(),
        "1s".to_owned(),
    )]))
    .expect("config");
    let store = std::sync::Arc::new(store);
    let purger = Purger::new(
        store.clone(),
        std::sync::Arc::new(orchestrator::telemetry::Metrics::new()),
        &config,
    );
    let report = purger.run_once().await.expect("pass");
    assert_eq!(report.error, None);
    assert_eq!(report.removed.processed, 1_100);
    assert_eq!(total(&store, StatsQuery::default()).await.0, 0);
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

/// PostgreSQL: the default partition holds an id of the range the next
/// partitions would cover (a clock ahead of ours): they start after it.
async fn partitions_start_after_ids_already_kept(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let ahead = Utc::now() + chrono::Duration::seconds(3);
    let id = ulid::Ulid::from_datetime(ahead.into()).to_string();
    store
        .insert_event(at(&id, "T", "p", ahead, None))
        .await
        .expect("insert");
    let made = store
        .prepare(Utc::now(), Duration::from_secs(1), Duration::from_secs(5))
        .await
        .expect("partitions after the kept id");
    assert!(made >= 1);
    let first: i64 = sqlx::query("SELECT MIN(lo) AS lo FROM event_partitions")
        .fetch_one(store.pool())
        .await
        .expect("partitions")
        .try_get("lo")
        .expect("lo");
    assert!(first > ahead.timestamp_millis(), "{first} starts after {ahead}");
    assert!(store.get_event(&id).await.expect("get").is_some());
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

/// PostgreSQL: a dead letter whose (shorter) retention has run out goes
/// from a partition that is not due yet.
async fn dead_letters_go_from_live_partitions(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let now = Utc::now();
    let minute = chrono::Duration::minutes(1);
    let t0 = now - minute * 10;
    store
        .prepare(t0, Duration::from_secs(60), Duration::ZERO)
        .await
        .expect("prepare");
    let received = t0 + chrono::Duration::seconds(30);
    let id = ulid::Ulid::from_datetime(received.into()).to_string();
    store
        .insert_event(at(&id, "T", "p", received, Some("dl")))
        .await
        .expect("insert");
    run(&store, &id, Status::DeadLettered).await;
    let expiry = Expiry {
        processed_before: now - minute * 60,
        dead_lettered_before: Utc::now() + minute,
    };
    let gone = Purged {
        processed: 0,
        dead_lettered: 1,
        partitions: 0,
    };
    assert_eq!(store.count_expired(&expiry).await.expect("count"), gone);
    assert_eq!(store.purge_expired(&expiry, 500).await.expect("purge"), gone);
    assert!(store.get_event(&id).await.expect("get").is_none());
    assert_eq!(owned_rows(&store, &id).await, 0);
    assert_eq!(total(&store, StatsQuery::default()).await.0, 0);
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

/// PostgreSQL: an event of a due partition that was processed after the
/// cut-off (it finished late) stays, moved to the default partition; one
/// processed before it goes with the partition.
async fn late_finishers_outlive_their_partition(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let minute = chrono::Duration::minutes(1);
    let t0 = Utc::now() - minute * 10;
    let made = store
        .prepare(t0, Duration::from_secs(60), Duration::ZERO)
        .await
        .expect("prepare");
    assert_eq!(made, 1, "one partition, due at the cut-off");
    let received = t0 + chrono::Duration::seconds(30);
    let ids: Vec<String> = (0..2)
        .map(|i| ulid::Ulid::from_datetime((received + chrono::Duration::milliseconds(i)).into()).to_string())
        .collect();
    for id in &ids {
        store
            .insert_event(at(id, "T", "p", received, None))
            .await
            .expect("insert");
    }
    run(&store, &ids[0], Status::Processed).await;
    // The cut-off falls between the two finishes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    run(&store, &ids[1], Status::Processed).await;
    let expiry = Expiry {
        processed_before: cut,
        dead_lettered_before: cut,
    };
    let purged = store.purge_expired(&expiry, 500).await.expect("purge");
    assert_eq!((purged.processed, purged.partitions), (1, 1), "{purged:?}");
    assert!(store.get_event(&ids[0]).await.expect("get").is_none());
    let late = store
        .get_event(&ids[1])
        .await
        .expect("get")
        .expect("the late one stays");
    assert_eq!(late.status, Status::Processed);
    for (table, column) in [("events_kept", "id"), ("attempts_kept", "event_id")] {
        assert_eq!(
            rows_of(&store, table, column, &ids[1]).await,
            1,
            "moved to {table}"
        );
    }
    assert_eq!(total(&store, StatsQuery::default()).await.0, 1);
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

production_only!(
    late_finishers_outlive_their_partition,
    partitions_go_whole_and_keep_what_must_stay,
    dead_letters_go_from_live_partitions,
    partitions_start_after_ids_already_kept,
);
