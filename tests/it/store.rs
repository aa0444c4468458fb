//! The store's batch insert (`POST /events/batch`): one transaction, outcomes
//! in order, idempotency resolved per item, within the list too; and the
//! group-committed single-event writes under concurrency.

use chrono::Utc;
use orchestrator::store::{EventStore, InsertOutcome, NewEvent};
use serde_json::json;

use crate::helpers::*;

fn numbered_event(i: usize, key: Option<&str>, hash: &str) -> NewEvent {
    NewEvent {
        dados: json!({"i": i}),
        idempotency_key: key.map(str::to_owned),
        request_hash: hash.into(),
        request_id: Some(format!("req-{i}")),
        trace: engine::trace::TraceContext::parse(
            &format!("00-4bf92f3577b34da6a3ce929d0e0e{i:04}-00f067aa0ba902b7-01"),
            Some("vendor=opaque"),
        ),
        ..new_event(&format!("01EV{i:05}"))
    }
}

/// What each outcome says, compactly: ("created" | "replayed" | "conflict", event id).
fn summary(o: &InsertOutcome) -> (&'static str, String) {
    match o {
        InsertOutcome::Created(ev) => ("created", ev.id.clone()),
        InsertOutcome::Replayed(ev) => ("replayed", ev.id.clone()),
        InsertOutcome::Conflict { existing_id } => ("conflict", existing_id.clone()),
    }
}

async fn batch_insert_resolves_every_key_in_order(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    // 250 rows (three statements of at most 100), with duplicates of a key
    // inside one statement (10, 11, 12) and across statements (0 and 240),
    // and rows without a key.
    let batch: Vec<NewEvent> = (0..250)
        .map(|i| match i {
            11 => numbered_event(i, Some("k10"), "h10"),
            12 => numbered_event(i, Some("k10"), "other"),
            240 => numbered_event(i, Some("k0"), "h0"),
            245..=249 => numbered_event(i, None, "h"),
            _ => numbered_event(i, Some(&format!("k{i}")), &format!("h{i}")),
        })
        .collect();
    let outcomes = store.insert_events(batch).await.expect("insert");
    assert_eq!(outcomes.len(), 250);
    for (i, o) in outcomes.iter().enumerate() {
        let expected = match i {
            11 => ("replayed", "01EV00010".to_owned()),
            12 => ("conflict", "01EV00010".to_owned()),
            240 => ("replayed", "01EV00000".to_owned()),
            _ => ("created", format!("01EV{i:05}")),
        };
        assert_eq!(summary(o), expected, "item {i}");
    }
    if let InsertOutcome::Created(ev) = &outcomes[3] {
        assert_eq!(ev.dados, json!({"i": 3}));
        assert_eq!(ev.request_id.as_deref(), Some("req-3"));
        let trace = ev.trace.as_ref().expect("the trace context is stored");
        assert_eq!(
            trace.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e0003-00f067aa0ba902b7-01"
        );
        assert_eq!(trace.state.as_deref(), Some("vendor=opaque"));
    }

    // A second batch meets the first one's keys.
    let outcomes = store
        .insert_events(vec![
            numbered_event(300, Some("k5"), "h5"),
            numbered_event(301, Some("k6"), "changed"),
            numbered_event(302, Some("fresh"), "h"),
        ])
        .await
        .expect("insert");
    let got: Vec<_> = outcomes.iter().map(summary).collect();
    assert_eq!(
        got,
        vec![
            ("replayed", "01EV00005".to_owned()),
            ("conflict", "01EV00006".to_owned()),
            ("created", "01EV00302".to_owned()),
        ]
    );
    // Exactly the created rows exist.
    assert_eq!(
        store.stats(&Default::default()).await.expect("stats").total,
        247 + 1
    );
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

/// Single-event writes from concurrent callers (requests, workers) are
/// group-committed; each caller still gets exactly its own outcome.
async fn concurrent_writes_each_get_their_own_outcome(backend: Backend) {
    use orchestrator::store::{AttemptFinish, LastError, Status};
    let (store, iso, _dir) = test_store(&backend).await;

    // 200 concurrent inserts; i and i + 100 share a key: the same request
    // (replay) for even i, a different one (conflict) for odd i.
    let inserts: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            let hash = if i % 2 == 0 || i < 100 {
                format!("h{}", i % 100)
            } else {
                "other".to_owned()
            };
            let ev = numbered_event(i, Some(&format!("k{}", i % 100)), &hash);
            tokio::spawn(async move { (i, store.insert_event(ev).await.expect("insert")) })
        })
        .collect();
    let mut winner = std::collections::HashMap::new();
    let mut losers = Vec::new();
    for t in inserts {
        let (i, o) = t.await.expect("task");
        match o {
            InsertOutcome::Created(ev) => {
                assert_eq!(ev.id, format!("01EV{i:05}"));
                assert_eq!(ev.dados, json!({"i": i}));
                assert!(
                    winner.insert(i % 100, ev.id).is_none(),
                    "key k{} created twice",
                    i % 100
                );
            }
            other => losers.push((i, summary(&other))),
        }
    }
    assert_eq!(winner.len(), 100);
    assert_eq!(losers.len(), 100);
    for (i, (kind, id)) in losers {
        let conflict = i % 2 == 1;
        assert_eq!(kind, if conflict { "conflict" } else { "replayed" }, "item {i}");
        assert_eq!(id, winner[&(i % 100)], "item {i} names the stored event");
    }
    assert_eq!(store.stats(&Default::default()).await.expect("stats").total, 100);

    // Two concurrent claims per event (a duplicated task): one wins.
    let now = Utc::now();
    let claims: Vec<_> = winner
        .values()
        .flat_map(|id| [id.clone(), id.clone()])
        .map(|id| {
            let store = store.clone();
            tokio::spawn(async move {
                let claimed = store
                    .claim(&id, now, now + chrono::Duration::seconds(30))
                    .await
                    .expect("claim");
                (id, claimed)
            })
        })
        .collect();
    let mut claimed = std::collections::HashMap::new();
    for t in claims {
        let (id, ev) = t.await.expect("task");
        if let Some(ev) = ev {
            assert_eq!((ev.status, ev.attempts), (Status::Processing, 1), "{id}");
            assert!(claimed.insert(id.clone(), ev).is_none(), "{id} claimed twice");
        }
    }
    assert_eq!(claimed.len(), 100);

    // Concurrent outcomes: even events processed with two deliveries, odd ones
    // retrying; plus a stale attempt number, which must not record.
    let finishes: Vec<_> = claimed
        .keys()
        .cloned()
        .enumerate()
        .map(|(n, id)| {
            let store = store.clone();
            tokio::spawn(async move {
                let processed = n % 2 == 0;
                let finish = AttemptFinish {
                    status: if processed {
                        Status::Processed
                    } else {
                        Status::Retrying
                    },
                    next_attempt_at: (!processed).then(|| Utc::now() + chrono::Duration::hours(1)),
                    last_error: (!processed).then(|| LastError {
                        category: "http".into(),
                        message: format!("failed {id}"),
                        transient: true,
                        stage: Some("deliver".into()),
                    }),
                    trace: Vec::new(),
                    deliveries: if processed {
                        ["a", "b"]
                            .map(|d| engine::DeliveryReport {
                                status_code: Some(200),
                                duration_ms: 1.0,
                                ..engine::DeliveryReport::not_called(
                                    d,
                                    engine::DeliveryOutcome::Delivered,
                                    None,
                                )
                            })
                            .to_vec()
                    } else {
                        Vec::new()
                    },
                    result: processed.then(|| json!({"dados": {"id": id}, "meta": {"m": 1}, "routes": []})),
                    wait: None,
                    claim_next: None,
                };
                let stale = store
                    .finish_attempt(&id, 2, &finish)
                    .await
                    .expect("finish")
                    .recorded;
                let recorded = store
                    .finish_attempt(&id, 1, &finish)
                    .await
                    .expect("finish")
                    .recorded;
                (id, processed, stale, recorded)
            })
        })
        .collect();
    for t in finishes {
        let (id, processed, stale, recorded) = t.await.expect("task");
        assert!(!stale, "{id}: a stale attempt must not record");
        assert!(recorded, "{id}");
        let ev = store.get_event(&id).await.expect("get").expect("exists");
        let deliveries = store.deliveries(&id).await.expect("deliveries");
        if processed {
            assert_eq!(ev.status, Status::Processed);
            assert!(ev.processed_at.is_some() && ev.processing_ms.is_some());
            assert_eq!(
                ev.result,
                Some(json!({"dados": {"id": id}, "meta": {"m": 1}, "routes": []}))
            );
            assert_eq!(ev.meta, json!({"m": 1}));
            assert_eq!(deliveries.len(), 2, "{id}");
        } else {
            assert_eq!(ev.status, Status::Retrying);
            assert!(ev.next_attempt_at.is_some() && ev.processed_at.is_none());
            assert_eq!(
                ev.last_error.as_ref().map(|e| e.message.clone()),
                Some(format!("failed {id}"))
            );
            assert!(deliveries.is_empty());
        }
    }
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

fn keyed(id: &str, key: &str) -> NewEvent {
    NewEvent {
        order_key: Some(key.into()),
        ..new_event(id)
    }
}

/// The holder an insert parked the event behind (`None`: not parked).
fn parked_behind(o: &InsertOutcome) -> Option<String> {
    match o {
        InsertOutcome::Created(ev) => ev.blocked_by.clone(),
        other => panic!("not created: {other:?}"),
    }
}

/// An event whose ordering key another one holds is parked by its insert
/// (no task needed); the holder's finish releases the next one of its key,
/// only that one, and only once.
async fn an_insert_parks_behind_the_key_holder(backend: Backend) {
    use orchestrator::store::{AttemptFinish, Status};
    let (store, _iso, _dir) = test_store(&backend).await;
    let first = store.insert_event(keyed("01KEY0001", "k")).await.expect("insert");
    assert_eq!(parked_behind(&first), None);
    let second = store.insert_event(keyed("01KEY0002", "k")).await.expect("insert");
    assert_eq!(parked_behind(&second).as_deref(), Some("01KEY0001"));
    let other = store
        .insert_event(keyed("01KEY0003", "other"))
        .await
        .expect("insert");
    assert_eq!(parked_behind(&other), None);
    let unordered = store.insert_event(new_event("01KEY0004")).await.expect("insert");
    assert_eq!(parked_behind(&unordered), None);
    // One batch: the first of a key goes, the rest wait behind the
    // earliest holder.
    let batch = store
        .insert_events(vec![
            keyed("01KEY0005", "b"),
            keyed("01KEY0006", "b"),
            keyed("01KEY0007", "k"),
        ])
        .await
        .expect("insert");
    let behind: Vec<Option<String>> = batch.iter().map(parked_behind).collect();
    assert_eq!(
        behind,
        vec![None, Some("01KEY0005".into()), Some("01KEY0001".into())]
    );
    let stored = store.get_event("01KEY0002").await.expect("read").expect("stored");
    assert_eq!(stored.blocked_by.as_deref(), Some("01KEY0001"));

    // The holder runs and finishes: the next of its key, and only it, is released.
    let now = Utc::now();
    let claimed = store
        .claim("01KEY0001", now, now + chrono::Duration::seconds(30))
        .await
        .expect("claim");
    assert!(claimed.is_some(), "the holder is claimable");
    let parked = store
        .claim("01KEY0002", now, now + chrono::Duration::seconds(30))
        .await
        .expect("claim");
    assert!(
        parked.is_none(),
        "a parked event is not claimable while its key is held"
    );
    let finish = AttemptFinish {
        status: Status::Processed,
        next_attempt_at: None,
        last_error: None,
        trace: Vec::new(),
        deliveries: Vec::new(),
        result: None,
        wait: None,
        claim_next: None,
    };
    let finished = store
        .finish_attempt("01KEY0001", 1, &finish)
        .await
        .expect("finish");
    assert!(finished.recorded);
    let ids: Vec<&str> = finished.released.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["01KEY0002"],
        "the finish releases the next event of its key, only it"
    );
    let again = store
        .release_order(Some("k"), 500, Utc::now())
        .await
        .expect("release");
    assert!(again.is_empty(), "released once: {again:?}");
    let next = store.get_event("01KEY0002").await.expect("read").expect("stored");
    assert_eq!(next.blocked_by, None);
    let later = store.get_event("01KEY0007").await.expect("read").expect("stored");
    assert!(
        later.blocked_by.is_some(),
        "0007 stays parked: 0002 holds its key now"
    );
    assert_eq!(
        store
            .key_holder("01KEY0007", Utc::now())
            .await
            .expect("holder")
            .as_deref(),
        Some("01KEY0002")
    );
}

/// A finish that asks for it claims the next event of its key for its
/// worker, in its own transaction: leased, one attempt more, counted as
/// processing; the events behind that one stay parked, and a key's dead
/// letter under `skip` lets its next event go the same way.
async fn a_finish_claims_the_next_event_of_its_key(backend: Backend) {
    use orchestrator::store::Status;
    let (store, _iso, _dir) = test_store(&backend).await;
    let batch = store
        .insert_events(vec![
            keyed("01NXT0001", "k"),
            keyed("01NXT0002", "k"),
            keyed("01NXT0003", "k"),
            keyed("01NXT0004", "j"),
        ])
        .await
        .expect("insert");
    let behind: Vec<Option<String>> = batch.iter().map(parked_behind).collect();
    assert_eq!(
        behind,
        vec![None, Some("01NXT0001".into()), Some("01NXT0001".into()), None]
    );
    let now = Utc::now();
    let lease = now + chrono::Duration::seconds(30);
    assert!(
        store
            .claim("01NXT0001", now, lease)
            .await
            .expect("claim")
            .is_some()
    );
    // A finish of the first attempt of `id` that asks for the key's next event.
    let finish_claiming = |id: &'static str, status: Status| {
        let store = &store;
        async move {
            let f = orchestrator::store::AttemptFinish {
                claim_next: Some(lease),
                ..finish(status)
            };
            store.finish_attempt(id, 1, &f).await.expect("finish")
        }
    };
    let finished = finish_claiming("01NXT0001", Status::Processed).await;
    assert!(finished.recorded);
    assert!(finished.released.is_empty(), "{:?}", finished.released);
    let next = finished.next.expect("the next event of the key, claimed");
    assert_eq!(next.id, "01NXT0002");
    assert_eq!(next.status, Status::Processing);
    assert_eq!(next.attempts, 1);
    assert_eq!(next.blocked_by, None);
    assert!(
        store
            .claim("01NXT0002", Utc::now(), lease)
            .await
            .expect("claim")
            .is_none(),
        "claimed once: its lease holds it"
    );
    let third = store.get_event("01NXT0003").await.expect("read").expect("stored");
    assert!(third.blocked_by.is_some(), "0003 stays parked behind 0002");
    assert!(
        store
            .release_order(Some("k"), 500, Utc::now())
            .await
            .expect("release")
            .is_empty()
    );
    let counts = store.status_counts().await.expect("counts");
    assert_eq!(counts.get("processing").copied(), Some(1), "{counts:?}");
    assert_eq!(counts.get("processed").copied(), Some(1), "{counts:?}");
    assert_eq!(counts.get("received").copied(), Some(2), "{counts:?}");

    // Dead-lettered (the store's default is `skip`): the next one goes.
    let finished = finish_claiming("01NXT0002", Status::DeadLettered).await;
    assert_eq!(finished.next.map(|e| e.id).as_deref(), Some("01NXT0003"));
    // Without the ask, the next one is woken for a task, not claimed.
    let finished = store
        .finish_attempt("01NXT0003", 1, &finish(Status::Processed))
        .await
        .expect("finish");
    assert!(finished.next.is_none() && finished.released.is_empty());
    assert_eq!(
        store
            .status_counts()
            .await
            .expect("counts")
            .get("processing")
            .copied()
            .unwrap_or(0),
        0
    );
}

/// A batch of more than one statement's rows, whose earliest event of a
/// key is stored by a later statement (rows go in idempotency key order):
/// only that earliest one is left to run, every other one of its key is
/// parked.
async fn a_long_batch_parks_behind_its_earliest_event(backend: Backend) {
    let (store, _iso, _dir) = test_store(&backend).await;
    let mut batch: Vec<NewEvent> = (1..=150).map(|i| keyed(&format!("01LONG{i:04}"), "k")).collect();
    // The earliest, with an idempotency key: it sorts after the 149
    // without one, into the second statement.
    batch.insert(
        0,
        NewEvent {
            idempotency_key: Some("first".into()),
            ..keyed("01LONG0000", "k")
        },
    );
    let out = store.insert_events(batch).await.expect("insert");
    let free: Vec<String> = out
        .iter()
        .filter(|o| parked_behind(o).is_none())
        .map(|o| match o {
            InsertOutcome::Created(ev) => ev.id.clone(),
            other => panic!("not created: {other:?}"),
        })
        .collect();
    assert_eq!(free, vec!["01LONG0000".to_owned()]);
    let stored = store
        .get_event("01LONG0001")
        .await
        .expect("read")
        .expect("stored");
    assert!(stored.blocked_by.is_some(), "0001 waits for 0000");
}

crate::both_backends!(
    a_long_batch_parks_behind_its_earliest_event,
    batch_insert_resolves_every_key_in_order,
    concurrent_writes_each_get_their_own_outcome,
    an_insert_parks_behind_the_key_holder,
    a_finish_claims_the_next_event_of_its_key
);
