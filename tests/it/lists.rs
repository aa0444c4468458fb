//! `GET /events`'s store query: keyset pages under every combination of
//! filters, on both stores.

use chrono::Utc;
use orchestrator::store::{EventStore, ListFilter, Status};

use crate::helpers::*;

/// Lists under every combination of filters, paged: exactly the matching
/// events, newest first, each once.
async fn lists_page_every_filter_combination(backend: Backend) {
    let (store, iso, _dir) = test_store(&backend).await;
    let start = Utc::now() - chrono::Duration::hours(2);
    let mut all = Vec::new();
    for i in 0..48_i64 {
        let received = start + chrono::Duration::minutes(i * 2);
        let id = ulid::Ulid::from_datetime(received.into()).to_string();
        let partner = ["p1", "p2"][(i % 2) as usize];
        let tipo = ["A", "B", "C"][(i % 3) as usize];
        store
            .insert_event(at(&id, tipo, partner, received, None))
            .await
            .expect("insert");
        let status = match i % 4 {
            0 => Status::Received,
            1 => Status::Processed,
            2 => Status::DeadLettered,
            _ => Status::Retrying,
        };
        if status != Status::Received {
            run(&store, &id, status).await;
        }
        all.push((id, partner, tipo, status, received));
    }
    let window = (
        start + chrono::Duration::minutes(20),
        start + chrono::Duration::minutes(70),
    );
    for partner in [None, Some("p1"), Some("p2")] {
        for tipo in [None, Some("A"), Some("C")] {
            for status in [None, Some(Status::Received), Some(Status::DeadLettered)] {
                for times in [None, Some(window)] {
                    let mut expected: Vec<&str> = all
                        .iter()
                        .filter(|(_, p, t, s, r)| {
                            partner.is_none_or(|x| x == *p)
                                && tipo.is_none_or(|x| x == *t)
                                && status.is_none_or(|x| x == *s)
                                && times.is_none_or(|(a, b)| *r >= a && *r < b)
                        })
                        .map(|e| e.0.as_str())
                        .collect();
                    expected.sort_unstable_by(|a, b| b.cmp(a));
                    let mut got = Vec::new();
                    let mut filter = ListFilter {
                        category: None,
                        partner_id: partner.map(str::to_owned),
                        status,
                        tipo: tipo.map(str::to_owned),
                        since: times.map(|w| w.0),
                        until: times.map(|w| w.1),
                        before_id: None,
                        limit: 5,
                    };
                    loop {
                        let page = store.list_events(&filter).await.expect("list");
                        got.extend(page.iter().map(|e| e.id.clone()));
                        match page.last() {
                            Some(last) if page.len() == 5 => filter.before_id = Some(last.id.clone()),
                            _ => break,
                        }
                    }
                    assert_eq!(got, expected, "{partner:?} {tipo:?} {status:?} {times:?}");
                }
            }
        }
    }
    store.close().await;
    if let Some(i) = iso {
        i.remove().await;
    }
}

both_backends!(lists_page_every_filter_combination);
