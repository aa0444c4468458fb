//! The sweeper's query: what counts as stranded, on both stores.

use chrono::{Duration, Utc};
use orchestrator::store::{AttemptFinish, EventStore, SqlStore, Status, Sweep};

use crate::helpers::*;

async fn insert(store: &SqlStore, id: &str) {
    store.insert_event(new_event(id)).await.expect("insert");
}

fn ids(r: &[orchestrator::store::Requeue]) -> Vec<&str> {
    r.iter().map(|r| r.id.as_str()).collect()
}

async fn stranded_events_are_found_and_waiting_ones_left_alone(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let now = Utc::now();
    let sweep = |at: chrono::DateTime<Utc>, idle: &'static [String]| Sweep {
        now: at,
        stale_before: at - Duration::seconds(60),
        very_stale_before: at - Duration::seconds(600),
        idle_types: idle,
        limit: 100,
    };
    insert(&store, "01A-waiting").await;
    insert(&store, "01B-unqueued").await;
    insert(&store, "01C-retry").await;
    store.mark_unqueued(&["01B-unqueued"]).await.expect("mark");
    // A retry scheduled in an hour whose push failed.
    let claimed = store
        .claim("01C-retry", now, now + Duration::seconds(30))
        .await
        .expect("claim")
        .expect("claimable");
    assert_eq!(claimed.status, Status::Processing);
    let finish = AttemptFinish {
        status: Status::Retrying,
        next_attempt_at: Some(now + Duration::hours(1)),
        last_error: None,
        trace: Vec::new(),
        deliveries: Vec::new(),
        result: None,
        wait: None,
        claim_next: None,
    };
    assert!(
        store
            .finish_attempt("01C-retry", 1, &finish)
            .await
            .expect("finish")
            .recorded
    );
    store.mark_unqueued(&["01C-retry"]).await.expect("mark");

    // Now: only the known-unqueued received event; the waiting one may just be in a long queue.
    let taken = store.take_stranded(&sweep(now, &[])).await.expect("sweep");
    assert_eq!(ids(&taken), vec!["01B-unqueued"]);
    // Taken events are marked queued: not taken twice.
    assert!(
        store
            .take_stranded(&sweep(now, &[]))
            .await
            .expect("sweep")
            .is_empty()
    );
    // Waiting events once their queue is idle and they are stale (the one queued
    // by the first sweep is stale again by then), never the retry before it is due.
    static IDLE: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| vec!["T".to_owned()]);
    let later = now + Duration::seconds(120);
    let taken = store.take_stranded(&sweep(later, &IDLE)).await.expect("sweep");
    assert_eq!(ids(&taken), vec!["01A-waiting", "01B-unqueued"]);
    // Without an idle queue, only after ten times the stale age; still not the retry.
    let half_hour = now + Duration::minutes(30);
    let taken = store.take_stranded(&sweep(half_hour, &[])).await.expect("sweep");
    assert_eq!(ids(&taken), vec!["01A-waiting", "01B-unqueued"]);
    // The failed retry push once the retry is due.
    let due = now + Duration::hours(1) + Duration::seconds(1);
    let taken = store.take_stranded(&sweep(due, &[])).await.expect("sweep");
    assert!(ids(&taken).contains(&"01C-retry"), "{:?}", ids(&taken));
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

crate::both_backends!(stranded_events_are_found_and_waiting_ones_left_alone);
