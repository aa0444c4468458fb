//! The event path's group-committed writes (see [`crate::store::group`]):
//! ingest inserts, workers' claims and attempt outcomes, and the per-request
//! API-key lookup, each run for many callers at once as multi-row
//! statements. Also the insert path itself, which `POST /events/batch` uses
//! directly.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use engine::trace::TraceContext;
use futures::future::BoxFuture;
use sqlx::{AnyPool, AssertSqlSafe, Row};
use tracing::warn;

use super::codec::{EVENT_COLUMNS, corrupt, event_from_row, json_text, ms, partner_from_row};
use super::counts::{Deltas, Writer};
use super::ordering::{ClaimNext, Freed, keys_with_parked, park_held, plan_mode, release_keys, unpark_freed};
use super::statement::{ROWS_PER_STATEMENT, claim_set, held, key_holders, placeholders, values};
use crate::store::group::{BatchOp, Coalescer};
use crate::store::{
    AttemptFinish, EventRecord, Finished, InsertOutcome, NewEvent, Partner, Requeue, Status, StoreError,
    StoreResult,
};

/// One coalescer per kind of write.
pub(super) struct Writes {
    insert: Coalescer<PoolOp<NewEvent, InsertOutcome>>,
    claim: Coalescer<PoolOp<ClaimReq, StoreResult<Option<EventRecord>>>>,
    finish: Coalescer<PoolOp<FinishRow, Finished>>,
    key: Coalescer<PoolOp<String, Option<Partner>>>,
}

impl Writes {
    pub(super) fn start(pool: &AnyPool, sizes: &prometheus::HistogramVec) -> Self {
        // One flusher per kind: the next batch forms while one is in flight.
        // Measured on PostgreSQL at saturation, one per kind gave 18% more
        // events/s than two (larger batches, fewer transactions); SQLite has
        // one writer at a time anyway. Key lookups only read: two.
        let size = |write: &str| sizes.with_label_values(&[write]);
        Self {
            insert: coalesce(pool, |p, b| Box::pin(insert_batch(p, b)), 1, size("insert")),
            claim: coalesce(pool, |p, b| Box::pin(claim_batch(p, b)), 1, size("claim")),
            finish: coalesce(pool, |p, b| Box::pin(finish_batch(p, b)), 1, size("finish")),
            key: coalesce(pool, |p, b| Box::pin(key_batch(p, b)), 2, size("key")),
        }
    }

    pub(super) async fn insert(&self, new: NewEvent) -> StoreResult<InsertOutcome> {
        self.insert.submit(new).await
    }

    pub(super) async fn claim(
        &self,
        id: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<EventRecord>> {
        let req = ClaimReq {
            id: id.to_owned(),
            now,
            lease_until,
        };
        self.claim.submit(req).await?
    }

    pub(super) async fn finish(&self, id: &str, attempt: u32, f: &AttemptFinish) -> StoreResult<Finished> {
        self.finish.submit(FinishRow::new(id, attempt, f)?).await
    }

    pub(super) async fn partner_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Partner>> {
        self.key.submit(key_hash.to_owned()).await
    }
}

/// A batch of writes (or reads) of one kind: one output per item, in order.
type BatchFn<I, O> = for<'a> fn(&'a AnyPool, &'a [I]) -> BoxFuture<'a, StoreResult<Vec<O>>>;

/// One kind of group-committed write: `run` on the pool, for a batch of items.
struct PoolOp<I, O> {
    pool: AnyPool,
    run: BatchFn<I, O>,
}

/// Batches of up to one statement's rows, run by `flushers` tasks.
fn coalesce<I, O>(
    pool: &AnyPool,
    run: BatchFn<I, O>,
    flushers: usize,
    sizes: prometheus::Histogram,
) -> Coalescer<PoolOp<I, O>>
where
    PoolOp<I, O>: BatchOp,
{
    let op = PoolOp {
        pool: pool.clone(),
        run,
    };
    Coalescer::start(op, flushers, ROWS_PER_STATEMENT, sizes)
}

#[async_trait]
impl<I: Send + Sync + 'static, O: Send + 'static> BatchOp for PoolOp<I, O> {
    type Item = I;
    type Out = O;

    async fn run(&self, items: &[I]) -> StoreResult<Vec<O>> {
        (self.run)(&self.pool, items).await
    }
}

/// Takes the idempotency keys of `rows` that are free (one multi-row
/// `INSERT … ON CONFLICT DO NOTHING`); the ids of the events that got theirs.
/// Of two equal keys in one list the first gets it.
async fn take_keys(conn: &mut sqlx::AnyConnection, rows: &[&NewEvent]) -> StoreResult<HashSet<String>> {
    let keyed: Vec<(&NewEvent, &str)> = rows
        .iter()
        .filter_map(|n| Some((*n, n.idempotency_key.as_deref()?)))
        .collect();
    if keyed.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "INSERT INTO idempotency_keys (partner_id, idempotency_key, event_id, request_hash) VALUES {} \
         ON CONFLICT (partner_id, idempotency_key) DO NOTHING RETURNING event_id",
        values("(#1, #2, #3, #4)", 4, 1, keyed.len())
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for (new, key) in &keyed {
        q = q
            .bind(&new.partner_id)
            .bind(*key)
            .bind(&new.id)
            .bind(&new.request_hash);
    }
    q.fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| Ok(r.try_get::<String, _>("event_id")?))
        .collect()
}

/// One multi-row `INSERT … RETURNING`: the stored events, by id.
///
/// An event of an ordering key that another event holds is parked as it
/// is inserted (`queued_at` -1, `blocked_by` its holder, no task): an
/// earlier event of its key in the database (see
/// [`key_holders`]), or else an earlier one of this statement, which the
/// statement's own check cannot see. A statement none of whose rows has
/// a key is a plain `INSERT` without the check, whose subquery over every
/// partition costs more to plan than the insert does to run.
async fn insert_rows(
    conn: &mut sqlx::AnyConnection,
    rows: &[&NewEvent],
    now: i64,
) -> StoreResult<HashMap<String, EventRecord>> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    const COLUMNS: &str = "id, partner_id, tipo, dados, meta, pipeline_version, status, attempts, \
         received_at, updated_at, queued_at, idempotency_key, request_id, traceparent, tracestate, \
         order_key, order_block";
    let ordered = rows.iter().any(|n| n.order_key.is_some());
    // `p` is MATERIALIZED so the holder is read once per row: inlined,
    // both planners copied the subquery into each of its two uses.
    let sql = if ordered {
        format!(
            "WITH v (id, partner_id, tipo, dados, pipeline_version, received_at, idempotency_key, request_id, \
               traceparent, tracestate, order_key, order_block, before) AS (VALUES {}), \
             p AS MATERIALIZED (SELECT v.*, CASE WHEN v.order_key IS NULL THEN NULL \
               ELSE COALESCE(({} ORDER BY h.id LIMIT 1), v.before) END AS holder FROM v) \
             INSERT INTO events ({COLUMNS}, blocked_by) \
             SELECT id, partner_id, tipo, dados, '{{}}', pipeline_version, 'received', 0, received_at, received_at, \
               CASE WHEN holder IS NULL THEN received_at ELSE -1 END, idempotency_key, request_id, \
               traceparent, tracestate, order_key, order_block, holder FROM p \
             RETURNING {EVENT_COLUMNS}",
            values(
                "(#1, #2, #3, #4, #5, #6, #7, #8, #9, #10, #11, #12, #13)",
                13,
                2,
                rows.len()
            ),
            key_holders("v", "$1"),
        )
    } else {
        format!(
            "INSERT INTO events ({COLUMNS}) VALUES {} RETURNING {EVENT_COLUMNS}",
            values(
                "(#1, #2, #3, #4, '{}', #5, 'received', 0, #6, #6, #6, #7, #8, #9, #10, #11, #12)",
                12,
                1,
                rows.len()
            )
        )
    };
    // The earliest event of each key in this statement holds the key for
    // the others.
    let mut first: HashMap<&str, &str> = HashMap::new();
    for n in rows {
        if let Some(k) = n.order_key.as_deref() {
            let f = first.entry(k).or_insert(n.id.as_str());
            if n.id.as_str() < *f {
                *f = n.id.as_str();
            }
        }
    }
    let mut q = sqlx::query(AssertSqlSafe(sql));
    if ordered {
        q = q.bind(now);
    }
    for new in rows {
        q = q
            .bind(&new.id)
            .bind(&new.partner_id)
            .bind(&new.tipo)
            .bind(json_text(&new.dados))
            .bind(&new.pipeline_version)
            .bind(ms(new.received_at))
            .bind(&new.idempotency_key)
            .bind(&new.request_id)
            .bind(new.trace.as_ref().map(TraceContext::traceparent))
            .bind(new.trace.as_ref().and_then(|t| t.state.clone()))
            .bind(&new.order_key)
            .bind(i64::from(new.order_block));
        if ordered {
            let before = new
                .order_key
                .as_deref()
                .and_then(|k| first.get(k))
                .filter(|f| **f != new.id.as_str());
            q = q.bind(before.map(|f| (*f).to_owned()));
        }
    }
    let mut created = HashMap::with_capacity(rows.len());
    for row in q.fetch_all(&mut *conn).await? {
        let ev = event_from_row(&row)?;
        created.insert(ev.id.clone(), ev);
    }
    Ok(created)
}

/// The idempotency key of `new` is taken: replay or conflict, read with its
/// event in one statement. `None` when the key is gone meanwhile (its event
/// was purged after `take_keys` found it taken).
async fn existing_outcome(
    conn: &mut sqlx::AnyConnection,
    new: &NewEvent,
) -> StoreResult<Option<InsertOutcome>> {
    let columns: Vec<String> = EVENT_COLUMNS
        .split(", ")
        .map(|c| format!("e.{}", c.trim()))
        .collect();
    let sql = format!(
        "SELECT k.request_hash AS key_hash, {} FROM idempotency_keys k JOIN events e ON e.id = k.event_id \
         WHERE k.partner_id = $1 AND k.idempotency_key = $2",
        columns.join(", ")
    );
    let Some(row) = sqlx::query(AssertSqlSafe(sql))
        .bind(&new.partner_id)
        .bind(&new.idempotency_key)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let hash: String = row.try_get("key_hash")?;
    let existing = event_from_row(&row)?;
    Ok(Some(if hash == new.request_hash {
        InsertOutcome::Replayed(existing)
    } else {
        InsertOutcome::Conflict {
            existing_id: existing.id,
        }
    }))
}

/// The outcome of `new`, whose key was taken when its chunk was inserted:
/// the event that has it, or, if that event was purged since, `new` itself
/// with the key taken again.
async fn resolve_taken(
    conn: &mut sqlx::AnyConnection,
    new: &NewEvent,
    deltas: &mut Deltas,
    now: i64,
) -> StoreResult<InsertOutcome> {
    if let Some(o) = existing_outcome(conn, new).await? {
        return Ok(o);
    }
    if take_keys(conn, &[new]).await?.contains(&new.id)
        && let Some(ev) = insert_rows(conn, &[new], now).await?.remove(&new.id)
    {
        deltas.status(&ev.partner_id, &ev.tipo, ms(ev.received_at), Status::Received, 1);
        return Ok(InsertOutcome::Created(ev));
    }
    existing_outcome(conn, new)
        .await?
        .ok_or_else(|| StoreError::Database("an idempotency key without its event".into()))
}

/// Inserts `new` in one transaction, resolving each idempotency key in list
/// order (the first of two equal keys is created, the second replays or
/// conflicts with it), and counts the new events as `writer`.
async fn insert_all(pool: &AnyPool, new: &[&NewEvent], writer: Writer) -> StoreResult<Vec<InsertOutcome>> {
    let now = ms(Utc::now());
    let mut tx = pool.begin().await?;
    let keyed = new.iter().any(|n| n.order_key.is_some());
    if keyed {
        plan_mode(&mut tx, true).await?;
    }
    let mut out = Vec::with_capacity(new.len());
    let mut deltas = Deltas::default();
    // Rows inserted by more than one statement: see the park below.
    let mut late = new.len() > ROWS_PER_STATEMENT;
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        let took = take_keys(&mut tx, chunk).await?;
        let fresh: Vec<&NewEvent> = chunk
            .iter()
            .filter(|n| n.idempotency_key.is_none() || took.contains(&n.id))
            .copied()
            .collect();
        let mut created = insert_rows(&mut tx, &fresh, now).await?;
        for n in chunk {
            out.push(match created.remove(&n.id) {
                Some(ev) => {
                    deltas.status(&ev.partner_id, &ev.tipo, ms(ev.received_at), Status::Received, 1);
                    InsertOutcome::Created(ev)
                }
                None => {
                    let o = resolve_taken(&mut tx, n, &mut deltas, now).await?;
                    late |= matches!(o, InsertOutcome::Created(_));
                    o
                }
            });
        }
    }
    deltas.apply(&mut tx, writer).await?;
    // A statement's rows see the keys of the rows before them and of each
    // other (`insert_rows`), not those of a later statement of this
    // transaction, whose ids may be earlier (the rows are in idempotency
    // key order): the rows not parked look again once all are in.
    if late {
        if keyed {
            plan_mode(&mut tx, false).await?;
        }
        let open: Vec<&str> = out
            .iter()
            .filter_map(|o| match o {
                InsertOutcome::Created(ev) if ev.order_key.is_some() && ev.blocked_by.is_none() => {
                    Some(ev.id.as_str())
                }
                _ => None,
            })
            .collect();
        let mut more = park_held(&mut tx, &open, now).await?;
        for o in &mut out {
            if let InsertOutcome::Created(ev) = o
                && let Some(holder) = more.remove(&ev.id)
            {
                ev.blocked_by = Some(holder);
            }
        }
    }
    // An event whose key another one holds was parked as it was inserted,
    // without a task: through the queue it would be fetched, refused by
    // its claim and parked then (measured: most of the cost of an ordered
    // type), and parked by a second update it would cost a row version.
    let parked: HashMap<String, String> = out
        .iter()
        .filter_map(|o| match o {
            InsertOutcome::Created(ev) => Some((ev.id.clone(), ev.blocked_by.clone()?)),
            _ => None,
        })
        .collect();
    let postgres = is_postgres(&tx);
    tx.commit().await?;
    if postgres {
        let freed: HashSet<String> = unpark_freed(pool, &parked, now).await.into_iter().collect();
        for o in &mut out {
            if let InsertOutcome::Created(ev) = o
                && freed.contains(&ev.id)
            {
                ev.blocked_by = None;
            }
        }
    }
    Ok(out)
}

/// [`insert_all`] with the rows in key order, so two transactions in flight
/// lock equal keys in the same order and cannot deadlock; the stable sort
/// keeps list order between equal keys. Outcomes come back in list order.
pub(super) async fn insert_in_key_order(
    pool: &AnyPool,
    items: &[&NewEvent],
    writer: Writer,
) -> StoreResult<Vec<InsertOutcome>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| (&items[i].partner_id, &items[i].idempotency_key);
        key(a).cmp(&key(b))
    });
    let sorted: Vec<&NewEvent> = order.iter().map(|&i| items[i]).collect();
    let mut outs: Vec<Option<InsertOutcome>> = (0..items.len()).map(|_| None).collect();
    for (i, o) in order.into_iter().zip(insert_all(pool, &sorted, writer).await?) {
        outs[i] = Some(o);
    }
    outs.into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Database("an insert returned no outcome".into())))
        .collect()
}

/// Concurrent `POST /events` inserts, group-committed.
async fn insert_batch(pool: &AnyPool, items: &[NewEvent]) -> StoreResult<Vec<InsertOutcome>> {
    insert_in_key_order(pool, &items.iter().collect::<Vec<_>>(), Writer::Insert).await
}

/// A worker's [`EventStore::claim`](crate::store::EventStore::claim).
#[derive(Clone)]
struct ClaimReq {
    id: String,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
}

/// Concurrent claims as one `UPDATE … WHERE id IN (…) RETURNING`. Per caller: the
/// claimed event, `None`, or the error decoding its row (the claim is committed by then,
/// so it must not be rerun).
async fn claim_batch(
    pool: &AnyPool,
    items: &[ClaimReq],
) -> StoreResult<Vec<StoreResult<Option<EventRecord>>>> {
    claim_rows(pool, items, CLAIM_ROUNDS).await
}

/// How many times one claim call claims events again that it parked and
/// found freed (PostgreSQL); the last round's parks stay parked, for the
/// sweeper's release.
const CLAIM_ROUNDS: u32 = 2;

/// [`claim_batch`]; events parked by this claim whose holder finished
/// meanwhile are unparked and, `rounds` permitting, claimed again
/// (PostgreSQL).
async fn claim_rows(
    pool: &AnyPool,
    items: &[ClaimReq],
    rounds: u32,
) -> StoreResult<Vec<StoreResult<Option<EventRecord>>>> {
    // Requests of one batch differ by microseconds: the latest clock and
    // lease serve them all.
    let (Some(now), Some(lease_until)) = (
        items.iter().map(|c| c.now).max(),
        items.iter().map(|c| c.lease_until).max(),
    ) else {
        return Ok(Vec::new());
    };
    let mut tx = pool.begin().await?;
    let mut claimed = HashMap::with_capacity(items.len());
    let mut deltas = Deltas::default();
    // Unordered events first, in a statement without the key check: that
    // check's subquery costs PostgreSQL more to plan than the whole claim
    // does to run, and most types have no ordering. An event of an ordering
    // key is claimed only when no other event holds the key (all of one
    // batch are judged on the rows as they were before it, so of two events
    // of a key only the earlier goes); only the ids left over are tried so.
    let ids: Vec<&str> = items.iter().map(|c| c.id.as_str()).collect();
    claim_where(
        &mut tx,
        &ids,
        "order_key IS NULL",
        now,
        lease_until,
        &mut claimed,
        &mut deltas,
    )
    .await?;
    let left: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !claimed.contains_key(*id))
        .collect();
    if !left.is_empty() {
        let unheld = format!("order_key IS NOT NULL AND NOT {}", held("events", "$2"));
        claim_where(
            &mut tx,
            &left,
            &unheld,
            now,
            lease_until,
            &mut claimed,
            &mut deltas,
        )
        .await?;
    }
    deltas.apply(&mut tx, Writer::Claim).await?;
    let unclaimed: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !claimed.contains_key(*id))
        .collect();
    let parked = park_held(&mut tx, &unclaimed, ms(now)).await?;
    let postgres = is_postgres(&tx);
    tx.commit().await?;
    // A holder that finished while this batch parked behind it (see
    // `unpark_freed`): its events are unparked and claimed again. Nothing
    // after the commit may fail the batch (it would be run again).
    // On the last round they stay parked: the sweeper's release queues
    // them within a pass.
    if postgres && rounds > 0 {
        let freed: HashSet<String> = unpark_freed(pool, &parked, ms(now)).await.into_iter().collect();
        let again: Vec<ClaimReq> = items.iter().filter(|c| freed.contains(&c.id)).cloned().collect();
        if !again.is_empty() {
            match Box::pin(claim_rows(pool, &again, rounds - 1)).await {
                Ok(outs) => {
                    for (c, out) in again.iter().zip(outs) {
                        if let Some(out) = out.transpose() {
                            claimed.insert(c.id.clone(), out);
                        }
                    }
                }
                // Unparked, without a task: the sweeper's stranded pass
                // queues them (a database error, rare).
                Err(e) => warn!(error = %e, "could not claim unparked events again; the sweeper queues them"),
            }
        }
    }
    // The same event twice in a batch (a duplicate task): the first gets it.
    Ok(items.iter().map(|c| claimed.remove(&c.id).transpose()).collect())
}

/// Claims those of `ids` that are due and match `condition` (whose
/// parameters may be `$1`, the lease, and `$2`, the time): each claimed
/// event, or the error decoding its row, goes to `claimed`, its status
/// change to `deltas`.
async fn claim_where(
    tx: &mut sqlx::AnyConnection,
    ids: &[&str],
    condition: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    claimed: &mut HashMap<String, StoreResult<EventRecord>>,
    deltas: &mut Deltas,
) -> StoreResult<()> {
    let sql = format!(
        "UPDATE events SET {} \
         WHERE id IN ({}) AND (status = 'received' \
           OR (status = 'retrying' AND (next_attempt_at IS NULL OR next_attempt_at <= $3)) \
           OR (status = 'processing' AND lease_until < $2)) \
           AND {condition} \
         RETURNING {EVENT_COLUMNS}, prior_status",
        claim_set("$1", "$2"),
        placeholders(4, ids.len()),
    );
    // A task may arrive a little before its due time; do not make it wait another sweep.
    let due = ms(now) + 250;
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(ms(lease_until))
        .bind(ms(now))
        .bind(due);
    for id in ids {
        q = q.bind(*id);
    }
    for row in q.fetch_all(&mut *tx).await? {
        deltas.claimed(&row)?;
        claimed.insert(row.try_get::<String, _>("id")?, event_from_row(&row));
    }
    Ok(())
}

/// Whether `conn` is a PostgreSQL connection.
pub(super) fn is_postgres(conn: &sqlx::AnyConnection) -> bool {
    conn.backend_name().eq_ignore_ascii_case("postgresql")
}

/// An [`AttemptFinish`] as bound parameters, serialized by the caller.
struct FinishRow {
    id: String,
    attempt: i64,
    status: &'static str,
    processed: i64,
    next_attempt_at: Option<i64>,
    error: Option<String>,
    trace: String,
    result: Option<String>,
    meta: Option<String>,
    deliveries: Vec<(String, Option<i64>)>,
    /// The destination it waits on; `park` 1 when parked.
    waiting_on: Option<String>,
    park: i64,
    /// The lease of the key's next event, claimed for the caller.
    claim_next: Option<i64>,
}

impl FinishRow {
    fn new(id: &str, attempt: u32, f: &AttemptFinish) -> StoreResult<Self> {
        Ok(Self {
            id: id.to_owned(),
            attempt: i64::from(attempt),
            status: f.status.as_str(),
            processed: i64::from(f.status == Status::Processed),
            next_attempt_at: f.next_attempt_at.map(ms),
            error: f
                .last_error
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(corrupt)?,
            trace: serde_json::to_string(&f.trace).map_err(corrupt)?,
            result: f.result.as_ref().map(json_text),
            meta: f.result.as_ref().map(|r| match r.get("meta") {
                Some(m) => json_text(m),
                None => "{}".to_owned(),
            }),
            deliveries: f
                .deliveries
                .iter()
                .map(|d| (d.destination.clone(), d.status_code.map(i64::from)))
                .collect(),
            waiting_on: f.wait.as_ref().map(|w| w.destination.clone()),
            park: i64::from(f.wait.as_ref().is_some_and(|w| w.park)),
            claim_next: f.claim_next.map(ms),
        })
    }
}

/// Concurrent attempt outcomes in one transaction of three multi-row
/// statements: deliveries, the events' updates, their attempt rows; and,
/// for the terminal ones of an ordering key, one release of the events
/// parked behind them (the first of a key claimed for its finisher when it
/// asks, see [`AttemptFinish::claim_next`]).
async fn finish_batch(pool: &AnyPool, items: &[FinishRow]) -> StoreResult<Vec<Finished>> {
    let now = ms(Utc::now());
    let mut tx = pool.begin().await?;

    // Deliveries first, and whatever the claim: the calls happened.
    let deliveries: Vec<(&str, &str, Option<i64>)> = items
        .iter()
        .flat_map(|f| {
            f.deliveries
                .iter()
                .map(move |(d, code)| (f.id.as_str(), d.as_str(), *code))
        })
        .collect();
    for chunk in deliveries.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO deliveries (event_id, destination, delivered_at, status_code) VALUES {} \
             ON CONFLICT (event_id, destination) DO NOTHING",
            values("(#1, #2, $1, #3)", 3, 2, chunk.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(now);
        for (id, dest, code) in chunk {
            q = q.bind(*id).bind(*dest).bind(*code);
        }
        q.execute(&mut *tx).await?;
    }

    // Outcomes, only where the attempt still holds the claim.
    let mut done = HashSet::with_capacity(items.len());
    // The terminal ones' ordering keys, by event.
    let mut released: HashMap<String, String> = HashMap::new();
    let mut deltas = Deltas::default();
    for chunk in items.chunks(ROWS_PER_STATEMENT) {
        let mut sql = format!(
            "WITH v (eid, att, st, nxt, err, trc, prc, res, mta, wto, wpk) AS (VALUES {})",
            values(
                "(#1, #2, #3, #4, #5, #6, #7, #8, #9, #10, #11)",
                11,
                2,
                chunk.len()
            )
        );
        // A wait (v.wto set) keeps the budget where it was (attempt_base
        // follows attempts) and starts the wait's clock once; a parked one
        // has no task (queued_at -1) until it is woken.
        sql += " UPDATE events SET status = v.st, next_attempt_at = v.nxt, lease_until = NULL, \
                last_error = v.err, last_trace = v.trc, updated_at = $1, \
                queued_at = CASE WHEN v.wpk = 1 THEN -1 ELSE $1 END, \
                attempt_base = CASE WHEN v.wto IS NULL THEN attempt_base ELSE attempt_base + 1 END, \
                waiting_on = v.wto, \
                waiting_since = CASE WHEN v.wto IS NULL THEN NULL ELSE COALESCE(waiting_since, $1) END, \
                processed_at = CASE WHEN v.prc = 1 THEN $1 ELSE processed_at END, \
                processing_ms = CASE WHEN v.prc = 1 THEN $1 - received_at ELSE processing_ms END, \
                result = COALESCE(v.res, result), meta = COALESCE(v.mta, meta) \
                FROM v WHERE id = v.eid AND status = 'processing' AND attempts = v.att \
                RETURNING id, attempts, partner_id, tipo, received_at, status, processing_ms, order_key";
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(now);
        for f in chunk {
            q = q
                .bind(&f.id)
                .bind(f.attempt)
                .bind(f.status)
                .bind(f.next_attempt_at)
                .bind(&f.error)
                .bind(&f.trace)
                .bind(f.processed)
                .bind(&f.result)
                .bind(&f.meta)
                .bind(&f.waiting_on)
                .bind(f.park);
        }
        for row in q.fetch_all(&mut *tx).await? {
            let status: String = row.try_get("status")?;
            let status = Status::parse(&status).ok_or_else(|| corrupt(format!("status {status:?}")))?;
            let (partner, tipo): (String, String) = (row.try_get("partner_id")?, row.try_get("tipo")?);
            let received_at: i64 = row.try_get("received_at")?;
            deltas.status(&partner, &tipo, received_at, Status::Processing, -1);
            deltas.status(&partner, &tipo, received_at, status, 1);
            if status == Status::Processed
                && let Some(took) = row.try_get::<Option<i64>, _>("processing_ms")?
            {
                deltas.processing_ms(&partner, &tipo, received_at, took, 1);
            }
            let id = row.try_get::<String, _>("id")?;
            if matches!(status, Status::Processed | Status::DeadLettered)
                && let Some(key) = row.try_get::<Option<String>, _>("order_key")?
            {
                released.insert(id.clone(), key);
            }
            done.insert((id, row.try_get::<i64, _>("attempts")?));
        }
    }
    let finished: Vec<&FinishRow> = items
        .iter()
        .filter(|f| done.contains(&(f.id.clone(), f.attempt)))
        .collect();
    for chunk in finished.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO attempts (event_id, attempt, finished_at, outcome, error, trace) VALUES {} \
             ON CONFLICT (event_id, attempt) DO NOTHING",
            values("(#1, #2, $1, #3, #4, #5)", 5, 2, chunk.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(now);
        for f in chunk {
            q = q
                .bind(&f.id)
                .bind(f.attempt)
                .bind(f.status)
                .bind(&f.error)
                .bind(&f.trace);
        }
        q.execute(&mut *tx).await?;
    }
    // The terminal events' keys are released in the same transaction: the
    // next event of each key comes back with the outcome, claimed for the
    // worker that asked for it, which runs it at once (no round trip of its
    // own on the chain of a key, and no row version to wake it).
    let keys: Vec<&String> = released.values().collect::<HashSet<_>>().into_iter().collect();
    let claim_keys: HashSet<&str> = finished
        .iter()
        .filter(|f| f.claim_next.is_some())
        .filter_map(|f| released.get(&f.id).map(String::as_str))
        .collect();
    let claim = finished
        .iter()
        .filter_map(|f| f.claim_next)
        .max()
        .map(|lease| ClaimNext {
            keys: &claim_keys,
            lease,
        });
    let mut next = release_keys(&mut tx, &keys, now, claim.as_ref(), &mut deltas).await?;
    deltas.apply(&mut tx, Writer::Finish).await?;
    let postgres = is_postgres(&tx);
    tx.commit().await?;
    // Under READ COMMITTED a park that commits after the release above read
    // may have missed this finish too; of a read after this commit and the
    // park's own check after its commit (`unpark_freed`), the later sees
    // the other's write. A key that released an event is held by it, so
    // nothing parked meanwhile can be free: only the others are read
    // again, and what they free is woken, not claimed. A failed read
    // leaves the release to the sweeper: the outcome is committed and must
    // not be written again.
    let freed: HashSet<&str> = next.iter().map(|(k, _)| k.as_str()).collect();
    let again: Vec<&String> = keys
        .iter()
        .copied()
        .filter(|k| !freed.contains(k.as_str()))
        .collect();
    if postgres && !again.is_empty() {
        // Only the keys with a parked event at all: as a rule a key that
        // released nothing has none (the end of its chain), and the probe
        // costs a fraction of a release to plan. The release in a
        // transaction of its own: it is a read and then one update per
        // hundred events, and a failure half-way must not leave events
        // woken that nobody queues.
        let released = async {
            let parked = keys_with_parked(pool, &again).await?;
            if parked.is_empty() {
                return Ok(Vec::new());
            }
            let parked: Vec<&String> = parked.iter().collect();
            let mut tx = pool.begin().await?;
            let more = release_keys(&mut tx, &parked, now, None, &mut Deltas::default()).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(more)
        };
        match released.await {
            Ok(more) => next.extend(more),
            Err(e) => {
                warn!(error = %e, "could not release ordering keys after a finish; the sweeper releases them")
            }
        }
    }
    // Each key's released events go to the first finished event of the
    // key; its claimed one to the first that asked for one.
    let mut woken: HashMap<String, Vec<Requeue>> = HashMap::new();
    let mut claimed: HashMap<String, EventRecord> = HashMap::new();
    for (key, freed) in next {
        match freed {
            Freed::Woken(r) => woken.entry(key).or_default().push(r),
            Freed::Claimed(ev) => {
                claimed.insert(key, ev);
            }
        }
    }
    Ok(items
        .iter()
        .map(|f| {
            let recorded = done.contains(&(f.id.clone(), f.attempt));
            let key = released.get(&f.id).filter(|_| recorded);
            let mut queue = key.and_then(|k| woken.remove(k)).unwrap_or_default();
            // Woken in acceptance order, so they run in it.
            queue.sort_by(|a, b| a.id.cmp(&b.id));
            Finished {
                recorded,
                next: key
                    .filter(|_| f.claim_next.is_some())
                    .and_then(|k| claimed.remove(k)),
                released: queue,
            }
        })
        .collect())
}

/// Concurrent API-key lookups (those the process's cache could not answer)
/// as one `… WHERE key_hash IN (…)`.
async fn key_batch(pool: &AnyPool, items: &[String]) -> StoreResult<Vec<Option<Partner>>> {
    let sql = format!(
        "SELECT k.key_hash, p.id, p.name, p.rate_per_minute, p.burst, p.disabled_at FROM api_keys k \
         JOIN partners p ON p.id = k.partner_id WHERE k.key_hash IN ({}) AND k.revoked_at IS NULL",
        placeholders(1, items.len())
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for hash in items {
        q = q.bind(hash);
    }
    let mut found = HashMap::new();
    for row in q.fetch_all(pool).await? {
        found.insert(row.try_get::<String, _>("key_hash")?, partner_from_row(&row)?);
    }
    Ok(items.iter().map(|h| found.get(h).cloned()).collect())
}
