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

use super::codec::{
    EVENT_COLUMNS, corrupt, event_from_row, json_text, ms, partner_from_row, requeue_from_row,
};
use super::counts::{Deltas, Writer};
use super::statement::{ROWS_PER_STATEMENT, held, key_holders, placeholders, releasable, unpark, values};
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
async fn insert_rows(
    conn: &mut sqlx::AnyConnection,
    rows: &[&NewEvent],
) -> StoreResult<HashMap<String, EventRecord>> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "INSERT INTO events (id, partner_id, tipo, dados, meta, pipeline_version, status, attempts, \
         received_at, updated_at, queued_at, idempotency_key, request_id, traceparent, tracestate, \
         order_key, order_block) VALUES {} \
         RETURNING {EVENT_COLUMNS}",
        values(
            "(#1, #2, #3, #4, '{}', #5, 'received', 0, #6, #6, #6, #7, #8, #9, #10, #11, #12)",
            12,
            1,
            rows.len()
        )
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
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
) -> StoreResult<InsertOutcome> {
    if let Some(o) = existing_outcome(conn, new).await? {
        return Ok(o);
    }
    if take_keys(conn, &[new]).await?.contains(&new.id)
        && let Some(ev) = insert_rows(conn, &[new]).await?.remove(&new.id)
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
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(new.len());
    let mut deltas = Deltas::default();
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        let took = take_keys(&mut tx, chunk).await?;
        let fresh: Vec<&NewEvent> = chunk
            .iter()
            .filter(|n| n.idempotency_key.is_none() || took.contains(&n.id))
            .copied()
            .collect();
        let mut created = insert_rows(&mut tx, &fresh).await?;
        for n in chunk {
            out.push(match created.remove(&n.id) {
                Some(ev) => {
                    deltas.status(&ev.partner_id, &ev.tipo, ms(ev.received_at), Status::Received, 1);
                    InsertOutcome::Created(ev)
                }
                None => resolve_taken(&mut tx, n, &mut deltas).await?,
            });
        }
    }
    deltas.apply(&mut tx, writer).await?;
    // An event whose key another one holds is parked now, without a task:
    // through the queue it would be fetched, refused by its claim and
    // parked then (measured: most of the cost of an ordered type).
    let ordered: Vec<&str> = out
        .iter()
        .filter_map(|o| match o {
            InsertOutcome::Created(ev) if ev.order_key.is_some() => Some(ev.id.as_str()),
            _ => None,
        })
        .collect();
    let now = ms(Utc::now());
    let mut parked = park_held(&mut tx, &ordered, now).await?;
    let postgres = is_postgres(&tx);
    tx.commit().await?;
    if postgres {
        for id in unpark_freed(pool, &parked, now).await {
            parked.remove(&id);
        }
    }
    for o in &mut out {
        if let InsertOutcome::Created(ev) = o {
            ev.blocked_by = parked.remove(&ev.id);
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
        "UPDATE events SET prior_status = status, status = 'processing', attempts = attempts + 1, \
         lease_until = $1, updated_at = $2, blocked_by = NULL \
         WHERE id IN ({}) AND (status = 'received' \
           OR (status = 'retrying' AND (next_attempt_at IS NULL OR next_attempt_at <= $3)) \
           OR (status = 'processing' AND lease_until < $2)) \
           AND {condition} \
         RETURNING {EVENT_COLUMNS}, prior_status",
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
        let prior: String = row.try_get("prior_status")?;
        let prior = Status::parse(&prior).ok_or_else(|| corrupt(format!("prior status {prior:?}")))?;
        let (partner, tipo): (String, String) = (row.try_get("partner_id")?, row.try_get("tipo")?);
        let received_at: i64 = row.try_get("received_at")?;
        deltas.status(&partner, &tipo, received_at, prior, -1);
        deltas.status(&partner, &tipo, received_at, Status::Processing, 1);
        claimed.insert(row.try_get::<String, _>("id")?, event_from_row(&row));
    }
    Ok(())
}

/// Whether `conn` is a PostgreSQL connection.
fn is_postgres(conn: &sqlx::AnyConnection) -> bool {
    conn.backend_name().eq_ignore_ascii_case("postgresql")
}

/// Parks those of `ids` (events of an ordering key, by the statement's
/// own check) that an earlier event of their key holds: no task until the
/// key is released (`release_order`), and `blocked_by` names the earliest
/// holder, for the status. The parked ones, with their holders.
async fn park_held(
    tx: &mut sqlx::AnyConnection,
    ids: &[&str],
    now: i64,
) -> StoreResult<HashMap<String, String>> {
    let mut parked = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        // The holder found once per event (the CTE), not once to decide and
        // once to name it. The outer status check is the one PostgreSQL
        // repeats on a row changed meanwhile (claimed: not parked).
        // The updated rows are named by the same id list as the CTE's, so
        // the update reads them by key (without statistics PostgreSQL
        // joined the CTE against a scan of every partition).
        let list = placeholders(2, chunk.len());
        let sql = format!(
            "WITH p (pid, holder) AS (SELECT e.id, ({} ORDER BY h.id LIMIT 1) FROM events e \
               WHERE e.id IN ({list}) AND e.order_key IS NOT NULL AND e.status IN ('received', 'retrying')) \
             UPDATE events SET queued_at = -1, blocked_by = p.holder FROM p \
             WHERE events.id = p.pid AND events.id IN ({list}) AND p.holder IS NOT NULL \
               AND events.status IN ('received', 'retrying') \
             RETURNING events.id AS id, events.blocked_by AS blocked_by",
            key_holders("e", "$1"),
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(now);
        for id in chunk {
            q = q.bind(*id);
        }
        for row in q.fetch_all(&mut *tx).await? {
            parked.insert(row.try_get("id")?, row.try_get("blocked_by")?);
        }
    }
    Ok(parked)
}

/// After a park committed on PostgreSQL: those of `parked` that no event
/// holds any more, unparked (queued again as of `now`); their ids.
///
/// Under READ COMMITTED a park and the finish of its holder can each miss
/// the other: the park's check saw the holder running, and the finish's
/// release (in its transaction, and again after its commit when it
/// released nothing of the key) read before the park committed. Of that
/// read after the finish's commit and this one after the park's, the later
/// sees the other's write. A parked event whose named holder is still open
/// needs no more: that holder's own finish is still to commit, and reads
/// after it. So this reads the named holders first (by id), and runs the
/// release only for events whose holder is gone. SQLite runs one writer at
/// a time, so a park and a finish never overlap there.
///
/// The park is committed by then: a failed read is logged and leaves its
/// events to the sweeper's release.
async fn unpark_freed(pool: &AnyPool, parked: &HashMap<String, String>, now: i64) -> Vec<String> {
    let mut freed = Vec::new();
    if parked.is_empty() {
        return freed;
    }
    // What was released before an error is kept: those events have no
    // task and are no longer parked, so their caller must queue them.
    if let Err(e) = try_unpark_freed(pool, parked, now, &mut freed).await {
        warn!(error = %e, "could not check parked events' holders again; the sweeper releases them");
    }
    freed
}

async fn try_unpark_freed(
    pool: &AnyPool,
    parked: &HashMap<String, String>,
    now: i64,
    freed: &mut Vec<String>,
) -> StoreResult<()> {
    // A dead letter holds only events that block on it: it is read as
    // possibly gone, and the release's own check decides.
    let holders: Vec<&String> = parked.values().collect::<HashSet<_>>().into_iter().collect();
    let mut open = HashSet::new();
    for chunk in holders.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT id FROM events WHERE id IN ({}) AND status IN ('received', 'retrying', 'processing')",
            placeholders(1, chunk.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(id.as_str());
        }
        for row in q.fetch_all(pool).await? {
            open.insert(row.try_get::<String, _>("id")?);
        }
    }
    let ids: Vec<&String> = parked
        .iter()
        .filter(|(_, holder)| !open.contains(*holder))
        .map(|(id, _)| id)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    // Each chunk wakes at most its own hundred ids, one `unpark` statement:
    // it commits whole or not at all.
    let mut conn = pool.acquire().await?;
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let filter = format!(" AND b.id IN ({})", placeholders(3, chunk.len()));
        let args: Vec<&str> = chunk.iter().map(|id| id.as_str()).collect();
        let limit = i64::try_from(chunk.len()).unwrap_or(i64::MAX);
        for row in release_parked(&mut conn, &filter, &args, now, limit).await? {
            freed.push(row.try_get("id")?);
        }
    }
    Ok(())
}

/// Releases the parked events no event holds any more (those of
/// [`releasable`] with `filter` and `args`, at most `limit`): the rows
/// [`unpark`] woke.
pub(super) async fn release_parked(
    conn: &mut sqlx::AnyConnection,
    filter: &str,
    args: &[&str],
    now: i64,
    limit: i64,
) -> StoreResult<Vec<sqlx::any::AnyRow>> {
    let mut q = sqlx::query(AssertSqlSafe(releasable(filter)))
        .bind(now)
        .bind(limit);
    for a in args {
        q = q.bind(*a);
    }
    let ids = q
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::query(AssertSqlSafe(unpark(chunk.len()))).bind(now);
        for id in chunk {
            q = q.bind(id.as_str());
        }
        out.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(out)
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
        })
    }
}

/// Concurrent attempt outcomes in one transaction of three multi-row
/// statements: deliveries, the events' updates, their attempt rows; and,
/// for the terminal ones of an ordering key, one release of the events
/// parked behind them.
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
    deltas.apply(&mut tx, Writer::Finish).await?;

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
    // next event of each key comes back with the outcome, and the worker
    // runs it at once (no round trip of its own on the chain of a key).
    let keys: Vec<&String> = released.values().collect::<HashSet<_>>().into_iter().collect();
    let mut next = release_keys(&mut tx, &keys, now).await?;
    let postgres = is_postgres(&tx);
    tx.commit().await?;
    // Under READ COMMITTED a park that commits after the release above read
    // may have missed this finish too; of a read after this commit and the
    // park's own check after its commit (`unpark_freed`), the later sees
    // the other's write. A key that released an event is held by it, so
    // nothing parked meanwhile can be free: only the others are read
    // again. A failed read leaves the release to the sweeper: the outcome
    // is committed and must not be written again.
    let freed: HashSet<&str> = next.iter().map(|(k, _)| k.as_str()).collect();
    let again: Vec<&String> = keys
        .iter()
        .copied()
        .filter(|k| !freed.contains(k.as_str()))
        .collect();
    if postgres && !again.is_empty() {
        // In a transaction of its own: a release is a read and then one
        // update per hundred events, and a failure half-way must not leave
        // events woken that nobody queues.
        let released = async {
            let mut tx = pool.begin().await?;
            let more = release_keys(&mut tx, &again, now).await?;
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
    // Each key's released events go to the first finished event of the key.
    let mut by_key: HashMap<String, Vec<Requeue>> = HashMap::new();
    for (key, r) in next {
        by_key.entry(key).or_default().push(r);
    }
    Ok(items
        .iter()
        .map(|f| {
            let recorded = done.contains(&(f.id.clone(), f.attempt));
            let mut next = released
                .get(&f.id)
                .filter(|_| recorded)
                .and_then(|k| by_key.remove(k))
                .unwrap_or_default();
            // Woken in acceptance order, so they run in it.
            next.sort_by(|a, b| a.id.cmp(&b.id));
            Finished {
                recorded,
                released: next,
            }
        })
        .collect())
}

/// Releases the parked events of `keys` that no event holds any more (see
/// [`release_parked`]): each with its key.
async fn release_keys(
    conn: &mut sqlx::AnyConnection,
    keys: &[&String],
    now: i64,
) -> StoreResult<Vec<(String, Requeue)>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let filter = format!(" AND b.order_key IN ({})", placeholders(3, chunk.len()));
        let args: Vec<&str> = chunk.iter().map(|k| k.as_str()).collect();
        let limit = i64::try_from(chunk.len())
            .unwrap_or(i64::MAX)
            .saturating_mul(i64::from(RELEASE_PER_KEY));
        for row in release_parked(conn, &filter, &args, now, limit).await? {
            out.push((row.try_get::<String, _>("order_key")?, requeue_from_row(&row)?));
        }
    }
    Ok(out)
}

/// Most parked events a finish releases per key (one, as a rule: the
/// others wait behind it).
const RELEASE_PER_KEY: u32 = 500;

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
