//! The store's batch insert (`POST /events/batch`): one transaction, outcomes
//! in order, idempotency resolved per item, within the list too.

use chrono::Utc;
use orchestrator::store::{InsertOutcome, NewEvent, Store};
use serde_json::json;

use crate::helpers::*;
use crate::sweep::store_for;

fn new_event(i: usize, key: Option<&str>, hash: &str) -> NewEvent {
    NewEvent {
        id: format!("01EV{i:05}"),
        partner_id: "p".into(),
        tipo: "T".into(),
        dados: json!({"i": i}),
        pipeline_version: "v".into(),
        received_at: Utc::now(),
        idempotency_key: key.map(str::to_owned),
        request_hash: hash.into(),
        request_id: Some(format!("req-{i}")),
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
    let (store, iso, _dir) = store_for(&backend).await;
    // 250 rows (three statements of at most 100), with duplicates of a key
    // inside one statement (10, 11, 12) and across statements (0 and 240),
    // and rows without a key.
    let batch: Vec<NewEvent> = (0..250)
        .map(|i| match i {
            11 => new_event(i, Some("k10"), "h10"),
            12 => new_event(i, Some("k10"), "other"),
            240 => new_event(i, Some("k0"), "h0"),
            245..=249 => new_event(i, None, "h"),
            _ => new_event(i, Some(&format!("k{i}")), &format!("h{i}")),
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
    }

    // A second batch meets the first one's keys.
    let outcomes = store
        .insert_events(vec![
            new_event(300, Some("k5"), "h5"),
            new_event(301, Some("k6"), "changed"),
            new_event(302, Some("fresh"), "h"),
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
    assert_eq!(store.stats(None).await.expect("stats").total, 247 + 1);
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

crate::both_backends!(batch_insert_resolves_every_key_in_order);
