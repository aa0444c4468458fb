//! Ordering keys' writes: parking an event behind the event that holds its
//! key, and releasing a key's parked events once nothing holds it. A
//! finish claims the first event it releases for the worker that finished
//! the holder, in its own transaction: the chain of a key costs one update
//! of each event's row to start it, not a wake and then a claim.

use std::collections::{HashMap, HashSet};

use sqlx::any::AnyRow;
use sqlx::{AnyPool, AssertSqlSafe, Row};
use tracing::warn;

use super::codec::{event_from_row, requeue_from_row};
use super::counts::Deltas;
use super::statement::{ROWS_PER_STATEMENT, claim_parked, key_holders, placeholders, releasable, unpark};
use super::writes::is_postgres;
use crate::store::{EventRecord, Requeue, StoreResult};

/// On PostgreSQL, the rest of the transaction runs generic plans
/// (`generic`) or plans made for each run's values (the default). Generic
/// plans are made once per prepared statement, and the driver keeps a
/// statement prepared while its per-connection cache holds it. For the
/// insert of keyed events: its holder subquery reads every partition
/// whatever the values (a key is not the partition key, so there is
/// nothing to prune), and planning it for each run cost more than running
/// it (`log_min_duration_statement`, 20,000 stock updates: 1.16 s planning
/// and 1.08 s running, generic 0.43 and 1.00 s). Not for the releases and
/// parks: their generic plan ran four times longer than the custom one
/// saved (1.5 → 5.9 s).
pub(super) async fn plan_mode(tx: &mut sqlx::AnyConnection, generic: bool) -> StoreResult<()> {
    if is_postgres(tx) {
        let mode = if generic { "force_generic_plan" } else { "auto" };
        sqlx::raw_sql(AssertSqlSafe(format!("SET LOCAL plan_cache_mode = {mode}")))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Parks those of `ids` (events of an ordering key, by the statement's
/// own check) that an earlier event of their key holds: no task until the
/// key is released, and `blocked_by` names the earliest holder, for the
/// status. The parked ones, with their holders.
pub(super) async fn park_held(
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

/// After a park committed on PostgreSQL: those of `parked` (event →
/// holder) that no event holds any more, unparked (queued again as of
/// `now`); their ids.
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
pub(super) async fn unpark_freed(pool: &AnyPool, parked: &HashMap<String, String>, now: i64) -> Vec<String> {
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
    let open: HashSet<String> = read_in(
        pool,
        "SELECT id AS v FROM events WHERE id IN (#) AND status IN ('received', 'retrying', 'processing')",
        &holders,
    )
    .await?
    .into_iter()
    .collect();
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
        for row in release_parked(&mut conn, &filter, &args, now, limit, None)
            .await?
            .woken
        {
            freed.push(row.try_get("id")?);
        }
    }
    Ok(())
}

/// The keys whose first released event a release claims (for the worker
/// that finished the key's holder), leased until `lease`.
pub(super) struct ClaimNext<'a> {
    pub(super) keys: &'a HashSet<&'a str>,
    pub(super) lease: i64,
}

/// What a release let go.
#[derive(Default)]
pub(super) struct Released {
    /// The first released event of each key of the [`ClaimNext`], claimed:
    /// rows of [`claim_parked`].
    pub(super) claimed: Vec<AnyRow>,
    /// The others, woken for a task: rows of [`unpark`].
    pub(super) woken: Vec<AnyRow>,
}

/// Releases the parked events no event holds any more (those of
/// [`releasable`] with `filter` and `args`, at most `limit`): the first of
/// each key of `claim` is claimed, the others woken.
pub(super) async fn release_parked(
    conn: &mut sqlx::AnyConnection,
    filter: &str,
    args: &[&str],
    now: i64,
    limit: i64,
    claim: Option<&ClaimNext<'_>>,
) -> StoreResult<Released> {
    let mut q = sqlx::query(AssertSqlSafe(releasable(filter)))
        .bind(now)
        .bind(limit);
    for a in args {
        q = q.bind(*a);
    }
    let (mut to_claim, mut to_wake) = (Vec::new(), Vec::new());
    let mut first = HashSet::new();
    // Oldest first: the first of a key is the one to run.
    for row in q.fetch_all(&mut *conn).await? {
        let id: String = row.try_get("id")?;
        let key: Option<String> = row.try_get("order_key")?;
        match (claim, key) {
            (Some(c), Some(k)) if c.keys.contains(k.as_str()) && first.insert(k.clone()) => to_claim.push(id),
            _ => to_wake.push(id),
        }
    }
    let mut out = Released::default();
    if let Some(c) = claim {
        // A few keys a finish: one statement, as a rule.
        for chunk in to_claim.chunks(ROWS_PER_STATEMENT) {
            let mut q = sqlx::query(AssertSqlSafe(claim_parked(chunk.len())))
                .bind(now)
                .bind(c.lease);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            out.claimed.extend(q.fetch_all(&mut *conn).await?);
        }
    }
    for chunk in to_wake.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::query(AssertSqlSafe(unpark(chunk.len()))).bind(now);
        for id in chunk {
            q = q.bind(id.as_str());
        }
        out.woken.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(out)
}

/// An event a finish's release let go.
pub(super) enum Freed {
    /// Claimed for the finisher of its key's holder.
    Claimed(EventRecord),
    /// Woken, for a task.
    Woken(Requeue),
}

/// Releases the parked events of `keys` that no event holds any more (see
/// [`release_parked`]): each with its key. The claims' status changes go
/// to `deltas`.
pub(super) async fn release_keys(
    conn: &mut sqlx::AnyConnection,
    keys: &[&String],
    now: i64,
    claim: Option<&ClaimNext<'_>>,
    deltas: &mut Deltas,
) -> StoreResult<Vec<(String, Freed)>> {
    let mut out = Vec::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let filter = format!(" AND b.order_key IN ({})", placeholders(3, chunk.len()));
        let args: Vec<&str> = chunk.iter().map(|k| k.as_str()).collect();
        let limit = i64::try_from(chunk.len())
            .unwrap_or(i64::MAX)
            .saturating_mul(i64::from(RELEASE_PER_KEY));
        let released = release_parked(conn, &filter, &args, now, limit, claim).await?;
        for row in released.woken {
            out.push((
                row.try_get::<String, _>("order_key")?,
                Freed::Woken(requeue_from_row(&row)?),
            ));
        }
        for row in released.claimed {
            deltas.claimed(&row)?;
            let key = row.try_get::<String, _>("order_key")?;
            match event_from_row(&row) {
                Ok(ev) => out.push((key, Freed::Claimed(ev))),
                // Claimed, and nobody to run it: its lease expires and the
                // sweeper queues it (failing the finish would only meet the
                // same row again when it is run again).
                Err(e) => warn!(error = %e, "a claimed event could not be read; the sweeper queues it"),
            }
        }
    }
    Ok(out)
}

/// Those of `keys` with a parked event: a probe of the parked events' key
/// index (`events_blocked_key`), without the holder check that makes a
/// release cost more to plan than to run.
pub(super) async fn keys_with_parked(pool: &AnyPool, keys: &[&String]) -> StoreResult<Vec<String>> {
    read_in(
        pool,
        "SELECT DISTINCT order_key AS v FROM events WHERE blocked_by IS NOT NULL AND order_key IN (#)",
        keys,
    )
    .await
}

/// The column `v` of what `sql` reads, whose `#` is the list of `values`
/// (a hundred to a statement).
async fn read_in(pool: &AnyPool, sql: &str, values: &[&String]) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    for chunk in values.chunks(ROWS_PER_STATEMENT) {
        let mut q = sqlx::query(AssertSqlSafe(sql.replace('#', &placeholders(1, chunk.len()))));
        for v in chunk {
            q = q.bind(v.as_str());
        }
        for row in q.fetch_all(pool).await? {
            out.push(row.try_get("v")?);
        }
    }
    Ok(out)
}

/// Most parked events a finish releases per key (one, as a rule: the
/// others wait behind it).
const RELEASE_PER_KEY: u32 = 500;
