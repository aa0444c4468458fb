//! [`EventStore`] on SQL: reads, statistics (from [`counts`]), manual retries and the
//! sweeper's queries run here; ingest, claims and outcomes go through the
//! group-committed [`Writes`](super::writes::Writes).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};

use super::codec::{EVENT_COLUMNS, event_from_row, from_ms, id_floor, ms, parse_json, requeue_from_row};
use super::counts::{self, Deltas, Writer};
use super::ordering::release_parked;
use super::statement::{key_holders, placeholders};
use super::writes::insert_in_key_order;
use super::{Backend, SqlStore};
use crate::store::{
    AttemptFinish, AttemptRow, DeadLetterGroup, DeliveryRow, DiscardOutcome, EventRecord, EventStore,
    Finished, InsertOutcome, ListFilter, NewEvent, Requeue, RetryOutcome, Stats, StatsQuery, Status,
    StoreResult, Sweep, Waiting,
};

/// A bound value of a statement built from optional filters.
enum Arg<'a> {
    Text(&'a str),
    Int(i64),
}

impl SqlStore {
    /// A SQL expression: the field `name` of the event's `last_error` (JSON
    /// text), as each backend reads it.
    fn last_error_field(&self, name: &str) -> String {
        match self.backend() {
            Backend::Postgres => format!("(CAST(last_error AS jsonb) ->> '{name}')"),
            Backend::Sqlite => format!("json_extract(last_error, '$.{name}')"),
        }
    }
}

/// PostgreSQL: the rest of the transaction reads through an index wherever
/// one serves (`enable_seqscan = off`). For the periodic reads of the few
/// waiting, parked or stranded events through their partial indexes: a
/// partition without statistics yet (a young one; autovacuum analyzes it
/// within a minute or so of its first rows) looks to the planner as if
/// nearly every row matched `waiting_on IS NOT NULL`, and it read the whole
/// partition instead, twice a second (measured in a fresh 30,000-event
/// database: 19 ms a destinations read, 40 ms a count of parked events,
/// together 7% of PostgreSQL's CPU during the run).
async fn prefer_indexes(tx: &mut sqlx::AnyConnection) -> StoreResult<()> {
    sqlx::raw_sql("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

impl SqlStore {
    /// The rows of `q` (a read, or an update that returns its rows), run
    /// on PostgreSQL in a transaction of its own under [`prefer_indexes`].
    async fn fetch_indexed(
        &self,
        q: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> StoreResult<Vec<sqlx::any::AnyRow>> {
        if self.backend != Backend::Postgres {
            return Ok(q.fetch_all(&self.pool).await?);
        }
        let mut tx = self.pool.begin().await?;
        prefer_indexes(&mut tx).await?;
        let rows = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }
}

#[async_trait]
impl EventStore for SqlStore {
    async fn insert_event(&self, new: NewEvent) -> StoreResult<InsertOutcome> {
        self.writes.insert(new).await
    }

    async fn insert_events(&self, new: Vec<NewEvent>) -> StoreResult<Vec<InsertOutcome>> {
        insert_in_key_order(&self.pool, &new.iter().collect::<Vec<_>>(), Writer::Other).await
    }

    async fn get_event(&self, id: &str) -> StoreResult<Option<EventRecord>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(event_from_row).transpose()
    }

    async fn list_events(&self, f: &ListFilter) -> StoreResult<Vec<EventRecord>> {
        // A time window is also an id range (an id's time is its event's
        // received_at), so every index ending in the id serves it; the exact
        // received_at bounds stay for ids made otherwise. The id range is a
        // second wider on each side.
        let since_id = f.since.map(|t| id_floor(ms(t) - 1_000));
        let until_id = f.until.map(|t| id_floor(ms(t) + 1_000));
        let filters = [
            ("partner_id =", f.partner_id.as_deref().map(Arg::Text)),
            ("tipo =", f.tipo.as_deref().map(Arg::Text)),
            ("received_at >=", f.since.map(|t| Arg::Int(ms(t)))),
            ("received_at <", f.until.map(|t| Arg::Int(ms(t)))),
            ("id >=", since_id.as_deref().map(Arg::Text)),
            ("id <", until_id.as_deref().map(Arg::Text)),
            ("id <", f.before_id.as_deref().map(Arg::Text)),
        ];
        let category = format!("{} =", self.last_error_field("category"));
        let filters = filters
            .into_iter()
            .chain([(category.as_str(), f.category.as_deref().map(Arg::Text))]);
        let set: Vec<(&str, Arg)> = filters
            .into_iter()
            .filter_map(|(clause, arg)| Some((clause, arg?)))
            .collect();
        let mut conds = String::from("1 = 1");
        for (i, (clause, _)) in set.iter().enumerate() {
            conds += &format!(" AND {clause} ${}", i + 1);
        }
        let limit = f.limit.clamp(1, 1001);
        // Each index that starts with the partner or the type goes on with
        // the status, then the id: without a status filter such a list reads
        // one range per status, newest first, and merges them.
        let statuses: Vec<Option<Status>> = match f.status {
            Some(s) => vec![Some(s)],
            None if f.partner_id.is_some() || f.tipo.is_some() => Status::ALL.map(Some).to_vec(),
            None => vec![None],
        };
        let branch = |status: Option<Status>| {
            let status = status
                .map(|s| format!(" AND status = '{}'", s.as_str()))
                .unwrap_or_default();
            format!("SELECT {EVENT_COLUMNS} FROM events WHERE {conds}{status} ORDER BY id DESC LIMIT {limit}")
        };
        let sql = match statuses.as_slice() {
            [one] => branch(*one),
            many => {
                let parts: Vec<String> = many
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("SELECT * FROM ({}) s{i}", branch(*s)))
                    .collect();
                format!("{} ORDER BY id DESC LIMIT {limit}", parts.join(" UNION ALL "))
            }
        };
        // Planned for its own values each time: a cached statement may get
        // PostgreSQL's generic plan, which cannot see how narrow a time
        // window or how rare a status is (measured at ten million events: a
        // week's window of one partner, type and status took 539 ms with the
        // generic plan, 23 ms planned for its values).
        let mut q = sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for (_, arg) in set {
            q = match arg {
                Arg::Text(s) => q.bind(s),
                Arg::Int(n) => q.bind(n),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn stats(&self, q: &StatsQuery) -> StoreResult<Stats> {
        let mut conn = self.pool.acquire().await?;
        let per_type = counts::read(
            &mut conn,
            q.partner_id.as_deref(),
            q.since.map(ms),
            q.until.map(ms),
        )
        .await?;
        Ok(Stats::from_types(per_type))
    }

    async fn deliveries(&self, id: &str) -> StoreResult<Vec<DeliveryRow>> {
        let rows = sqlx::query(
            "SELECT destination, delivered_at, status_code FROM deliveries WHERE event_id = $1 ORDER BY destination",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRow {
                    destination: r.try_get("destination")?,
                    delivered_at: from_ms(r.try_get("delivered_at")?),
                    status_code: r
                        .try_get::<Option<i64>, _>("status_code")?
                        .and_then(|c| u16::try_from(c).ok()),
                })
            })
            .collect()
    }

    async fn dead_letter_groups(&self, since: Option<DateTime<Utc>>) -> StoreResult<Vec<DeadLetterGroup>> {
        // Terminal events are not updated again: `updated_at` is when it
        // was dead-lettered, and (status, updated_at) is indexed.
        let field = |name: &str| self.last_error_field(name);
        let sql = format!(
            "SELECT tipo, {category} AS category, COUNT(*) AS n, MAX(updated_at) AS newest, MIN({message}) AS example \
             FROM events WHERE status = 'dead_lettered' AND updated_at >= $1 \
             GROUP BY tipo, {category} ORDER BY n DESC, tipo",
            category = field("category"),
            message = field("message"),
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(since.map_or(i64::MIN, ms))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetterGroup {
                    tipo: r.try_get("tipo")?,
                    category: r.try_get("category")?,
                    count: r.try_get("n")?,
                    newest: from_ms(r.try_get("newest")?),
                    example: r.try_get("example")?,
                })
            })
            .collect()
    }

    async fn attempts(&self, id: &str) -> StoreResult<Vec<AttemptRow>> {
        let rows = sqlx::query(
            "SELECT attempt, finished_at, outcome, error, trace FROM attempts WHERE event_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRow {
                    attempt: u32::try_from(r.try_get::<i64, _>("attempt")?).unwrap_or(0),
                    finished_at: from_ms(r.try_get("finished_at")?),
                    outcome: r.try_get("outcome")?,
                    error: r
                        .try_get::<Option<String>, _>("error")?
                        .map(|e| parse_json(&e))
                        .transpose()?,
                    trace: parse_json(&r.try_get::<String, _>("trace")?)?,
                })
            })
            .collect()
    }

    async fn received_per_minute(
        &self,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<(DateTime<Utc>, String, i64)>> {
        let mut conn = self.pool.acquire().await?;
        counts::per_minute(&mut conn, ms(since)).await
    }

    async fn claim(
        &self,
        id: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<EventRecord>> {
        self.writes.claim(id, now, lease_until).await
    }

    async fn finish_attempt(&self, id: &str, attempt: u32, f: &AttemptFinish) -> StoreResult<Finished> {
        self.writes.finish(id, attempt, f).await
    }

    async fn manual_retry(&self, id: &str) -> StoreResult<RetryOutcome> {
        let now = ms(Utc::now());
        let sql = format!(
            "UPDATE events SET status = 'received', next_attempt_at = NULL, updated_at = $1, queued_at = $1, \
             attempt_base = attempts \
             WHERE id = $2 AND status = 'dead_lettered' RETURNING {EVENT_COLUMNS}"
        );
        let mut tx = self.pool.begin().await?;
        if let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        {
            let ev = event_from_row(&row)?;
            let mut deltas = Deltas::default();
            let received_at = ms(ev.received_at);
            deltas.status(&ev.partner_id, &ev.tipo, received_at, Status::DeadLettered, -1);
            deltas.status(&ev.partner_id, &ev.tipo, received_at, Status::Received, 1);
            deltas.apply(&mut tx, Writer::Other).await?;
            tx.commit().await?;
            return Ok(RetryOutcome::Requeued(ev));
        }
        tx.rollback().await?;
        Ok(match self.get_event(id).await? {
            Some(e) => RetryOutcome::WrongStatus(e.status),
            None => RetryOutcome::NotFound,
        })
    }

    async fn discard_dead_letter(&self, id: &str) -> StoreResult<DiscardOutcome> {
        // The transaction's first statement writes: SQLite takes its write
        // lock before reading (as the purge does).
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query(
            "DELETE FROM events WHERE id = $1 AND status = 'dead_lettered' \
             RETURNING partner_id, tipo, received_at, order_key",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = gone else {
            tx.rollback().await?;
            return Ok(match self.get_event(id).await? {
                Some(e) => DiscardOutcome::WrongStatus(e.status),
                None => DiscardOutcome::NotFound,
            });
        };
        for table in ["attempts", "deliveries", "idempotency_keys"] {
            sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE event_id = $1")))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let (partner, tipo): (String, String) = (row.try_get("partner_id")?, row.try_get("tipo")?);
        let mut deltas = Deltas::default();
        deltas.status(
            &partner,
            &tipo,
            row.try_get("received_at")?,
            Status::DeadLettered,
            -1,
        );
        deltas.apply(&mut tx, Writer::Other).await?;
        tx.commit().await?;
        Ok(DiscardOutcome::Discarded {
            tipo,
            order_key: row.try_get("order_key")?,
        })
    }

    async fn take_stranded(&self, sweep: &Sweep<'_>) -> StoreResult<Vec<Requeue>> {
        // One branch per unfinished status (parked events, queued_at -1,
        // are not stranded: the destination waker, or the release of their
        // ordering key, wakes them). `received` and `retrying` read
        // their own partial index on `queued_at` (only the events not queued
        // since the bound), `processing` the (status, id) index: the sweep
        // reads the stranded events only, however many finished or freshly
        // queued ones the store holds. Every condition implies
        // `queued_at < bound`, so each branch is one range of its index.
        let idle = |cond: &str| {
            if sweep.idle_types.is_empty() {
                String::new()
            } else {
                format!(
                    " OR (tipo IN ({}) AND {cond})",
                    placeholders(5, sweep.idle_types.len())
                )
            }
        };
        let bound = if sweep.idle_types.is_empty() { "$2" } else { "$3" };
        let branches = [
            format!(
                "status = 'received' AND queued_at >= 0 AND queued_at < {bound} AND (queued_at < $2{})",
                idle("1 = 1")
            ),
            format!(
                "status = 'retrying' AND queued_at >= 0 AND queued_at < {bound} \
                 AND ((queued_at = 0 AND next_attempt_at <= $1) \
                 OR (next_attempt_at < $2 AND queued_at < $2){})",
                idle("next_attempt_at < $3")
            ),
            "status = 'processing' AND lease_until < $1".to_owned(),
        ];
        let parts: Vec<String> = branches
            .iter()
            .enumerate()
            .map(|(i, cond)| {
                format!(
                    "SELECT * FROM (SELECT id, partner_id, tipo, pipeline_version FROM events \
                     WHERE {cond} ORDER BY id LIMIT $4) s{i}"
                )
            })
            .collect();
        let sql = format!("{} ORDER BY id LIMIT $4", parts.join(" UNION ALL "));
        // Planned for its bounds each time, like the lists: the generic plan
        // cannot see that `queued_at < bound` is narrow and walks the
        // (status, id) index instead (measured: 600 ms a pass with 200,000
        // unfinished events and every queue empty, 35 ms planned for its
        // values).
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .persistent(false)
            .bind(ms(sweep.now))
            .bind(ms(sweep.very_stale_before))
            .bind(ms(sweep.stale_before))
            .bind(i64::from(sweep.limit));
        for t in sweep.idle_types {
            q = q.bind(t);
        }
        let rows = self.fetch_indexed(q).await?;
        let out = rows
            .iter()
            .map(requeue_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        if !out.is_empty() {
            let sql = format!(
                "UPDATE events SET queued_at = $1 WHERE id IN ({})",
                placeholders(2, out.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(ms(sweep.now));
            for r in &out {
                q = q.bind(&r.id);
            }
            q.execute(&self.pool).await?;
        }
        Ok(out)
    }

    async fn mark_unqueued(&self, ids: &[&str]) -> StoreResult<()> {
        for chunk in ids.chunks(super::statement::ROWS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE events SET queued_at = 0 WHERE id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn release_leases(&self) -> StoreResult<u64> {
        let r = sqlx::query("UPDATE events SET lease_until = 0 WHERE status = 'processing'")
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn status_counts(&self) -> StoreResult<BTreeMap<String, i64>> {
        let mut conn = self.pool.acquire().await?;
        counts::status_totals(&mut conn).await
    }

    async fn partner_activity(&self) -> StoreResult<Vec<(String, i64, i64)>> {
        let mut conn = self.pool.acquire().await?;
        counts::partner_activity(&mut conn).await
    }

    async fn waiting(&self) -> StoreResult<Vec<Waiting>> {
        let rows = self
            .fetch_indexed(sqlx::query(
                "SELECT tipo, waiting_on, COUNT(*) AS events, COUNT(CASE WHEN queued_at = -1 THEN 1 END) AS parked, \
                 MIN(waiting_since) AS oldest FROM events WHERE waiting_on IS NOT NULL GROUP BY tipo, waiting_on",
            ))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Waiting {
                    tipo: r.try_get("tipo")?,
                    destination: r.try_get("waiting_on")?,
                    events: r.try_get("events")?,
                    parked: r.try_get("parked")?,
                    oldest_since: r.try_get::<Option<i64>, _>("oldest")?.map(from_ms),
                })
            })
            .collect()
    }

    async fn unpark(
        &self,
        tipo: &str,
        destination: &str,
        limit: u32,
        since_before: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Requeue>> {
        // The outer `queued_at = -1` is checked again on the locked row
        // (PostgreSQL), so two processes waking the same destination wake
        // each event once.
        let since = if since_before.is_some() {
            " AND waiting_since < $5"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE events SET queued_at = $1, next_attempt_at = $1 \
             WHERE waiting_on IS NOT NULL AND queued_at = -1 AND status = 'retrying' AND id IN (SELECT id FROM events \
               WHERE waiting_on IS NOT NULL AND tipo = $2 AND waiting_on = $3 AND queued_at = -1 \
               AND status = 'retrying'{since} \
               ORDER BY id LIMIT $4) \
             RETURNING id, partner_id, tipo, pipeline_version"
        );
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .persistent(false)
            .bind(ms(now))
            .bind(tipo)
            .bind(destination)
            .bind(i64::from(limit));
        if let Some(before) = since_before {
            q = q.bind(ms(before));
        }
        let rows = self.fetch_indexed(q).await?;
        let mut out = rows
            .iter()
            .map(requeue_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        // Oldest first (ids sort by time), as they go to the queue.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn oldest_pending(&self) -> StoreResult<BTreeMap<String, DateTime<Utc>>> {
        // Per type and unfinished status, the oldest event is the first entry
        // of the (tipo, status, id) index: a probe each, however long the
        // backlog or the history. The types are the counters'.
        let firsts: Vec<String> = ["received", "processing", "retrying"]
            .iter()
            .map(|s| {
                format!(
                    "SELECT t.tipo AS tipo, (SELECT e.received_at FROM events e \
                     WHERE e.tipo = t.tipo AND e.status = '{s}' ORDER BY e.id LIMIT 1) AS oldest \
                     FROM (SELECT DISTINCT tipo FROM event_counts) t"
                )
            })
            .collect();
        let sql = format!(
            "SELECT tipo, MIN(oldest) AS oldest FROM ({}) firsts WHERE oldest IS NOT NULL GROUP BY tipo",
            firsts.join(" UNION ALL ")
        );
        let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("tipo")?,
                    from_ms(r.try_get::<i64, _>("oldest")?),
                ))
            })
            .collect()
    }

    async fn release_order(
        &self,
        order_key: Option<&str>,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Requeue>> {
        // Most finished events of a key have no one parked behind them: a
        // read of the parked rows' index answers that, without the write an
        // UPDATE costs even when it changes nothing (on SQLite it takes the
        // one write lock). A park racing this read checks its holder again
        // once it has committed (`writes::unpark_freed`).
        if let Some(k) = order_key {
            let parked = sqlx::query(
                "SELECT 1 AS parked FROM events WHERE blocked_by IS NOT NULL AND order_key = $1 LIMIT 1",
            )
            .bind(k)
            .fetch_optional(&self.pool)
            .await?;
            if parked.is_none() {
                return Ok(Vec::new());
            }
        }
        let (filter, args) = match order_key {
            Some(k) => (" AND b.order_key = $3", vec![k]),
            None => ("", Vec::new()),
        };
        // On PostgreSQL one transaction: more than a hundred events are
        // woken by several statements, and a failure half-way must not leave
        // some woken without the caller queueing them. Not on SQLite, where
        // a transaction that reads and then writes fails outright when
        // another connection wrote in between (its one writer makes a
        // failure half-way an I/O error, not a race).
        let limit = i64::from(limit);
        let rows = if self.backend == Backend::Postgres {
            let mut tx = self.pool.begin().await?;
            prefer_indexes(&mut tx).await?;
            let rows = release_parked(&mut tx, filter, &args, ms(now), limit, None).await?;
            tx.commit().await?;
            rows.woken
        } else {
            let mut conn = self.pool.acquire().await?;
            release_parked(&mut conn, filter, &args, ms(now), limit, None)
                .await?
                .woken
        };
        let mut out = rows
            .iter()
            .map(requeue_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        // Woken in acceptance order, so their tasks are too.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn key_holder(&self, id: &str, now: DateTime<Utc>) -> StoreResult<Option<String>> {
        let sql = format!(
            "SELECT ({} ORDER BY h.id LIMIT 1) AS holder FROM events o WHERE o.id = $1 AND o.order_key IS NOT NULL",
            key_holders("o", "$2")
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .bind(ms(now))
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("holder")?,
            None => None,
        })
    }

    async fn blocked_counts(&self) -> StoreResult<BTreeMap<String, i64>> {
        let rows = self
            .fetch_indexed(sqlx::query(
                "SELECT tipo, COUNT(*) AS n FROM events WHERE blocked_by IS NOT NULL GROUP BY tipo",
            ))
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("tipo")?, r.try_get("n")?)))
            .collect()
    }
}
