//! [`Store`] on SQLite and PostgreSQL through sqlx's `Any` driver: both
//! schemas use the same column types (BIGINT epoch milliseconds, TEXT JSON),
//! so one set of portable queries serves both.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use engine::StageTrace;
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::group::{BatchOp, Coalescer};
use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    writes: Arc<Writes>,
    batch_sizes: prometheus::HistogramVec,
}

/// The event path's group-committed writes, and its per-request key lookup
/// (see [`super::group`]).
struct Writes {
    insert: Coalescer<InsertOp>,
    claim: Coalescer<ClaimOp>,
    finish: Coalescer<FinishOp>,
    key: Coalescer<KeyLookupOp>,
}

impl Writes {
    fn start(pool: &AnyPool, sizes: &prometheus::HistogramVec) -> Self {
        // One flusher per kind: the next batch forms while one is in flight.
        // Measured on PostgreSQL at saturation, one per kind gave 18% more
        // events/s than two (larger batches, fewer transactions); SQLite has
        // one writer at a time anyway. Key lookups only read: two.
        let size = |w: &str| sizes.with_label_values(&[w]);
        Self {
            insert: Coalescer::start(
                InsertOp { pool: pool.clone() },
                1,
                ROWS_PER_STATEMENT,
                size("insert"),
            ),
            claim: Coalescer::start(
                ClaimOp { pool: pool.clone() },
                1,
                ROWS_PER_STATEMENT,
                size("claim"),
            ),
            finish: Coalescer::start(
                FinishOp { pool: pool.clone() },
                1,
                ROWS_PER_STATEMENT,
                size("finish"),
            ),
            key: Coalescer::start(
                KeyLookupOp { pool: pool.clone() },
                2,
                ROWS_PER_STATEMENT,
                size("key"),
            ),
        }
    }
}

/// Rows per multi-row statement: 100 rows × at most 10 parameters stays far
/// below every backend's parameter limit.
const ROWS_PER_STATEMENT: usize = 100;

const EVENT_COLUMNS: &str = "id, partner_id, tipo, dados, meta, pipeline_version, status, attempts, attempt_base, received_at, \
     updated_at, next_attempt_at, processed_at, processing_ms, last_error, last_trace, result, idempotency_key, \
     request_id";

impl SqlStore {
    /// Connects to `url` (`sqlite://path` or `postgres://…`). SQLite files are
    /// created, put in WAL mode, and never run with `synchronous=OFF`.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Unavailable(
                "DATABASE_URL must start with sqlite: or postgres://".into(),
            ));
        };
        if backend == Backend::Sqlite {
            // Create the file and switch it to WAL once (WAL is persistent).
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            if let Some(dir) = opts.get_filename().parent() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(e.to_string()))?;
            }
            use sqlx::{ConnectOptions, Connection};
            let conn = opts.connect().await?;
            conn.close().await?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // No ping before every acquire: that was a round trip per
            // statement. A connection that died is found by its next query,
            // which fails (the caller answers 503 or the event is retried)
            // and is not returned to the pool.
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let batch_sizes = super::group::batch_size_histogram();
        let writes = Arc::new(Writes::start(&pool, &batch_sizes));
        Ok(Self {
            pool,
            backend,
            writes,
            batch_sizes,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `store_write_batch_size`, for the metrics registry.
    pub fn batch_size_metric(&self) -> prometheus::HistogramVec {
        self.batch_sizes.clone()
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

fn parse_json(s: &str) -> StoreResult<Value> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn partner_from_row(r: &AnyRow) -> StoreResult<Partner> {
    let limit = |c: &str| -> StoreResult<Option<u32>> {
        Ok(r.try_get::<Option<i64>, _>(c)?
            .and_then(|v| u32::try_from(v).ok()))
    };
    Ok(Partner {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        rate_per_minute: limit("rate_per_minute")?,
        burst: limit("burst")?,
        disabled: r.try_get::<Option<i64>, _>("disabled_at")?.is_some(),
    })
}

/// One multi-row `INSERT … ON CONFLICT DO NOTHING RETURNING`: the stored
/// event for each row inserted, `None` where the idempotency key exists.
async fn insert_rows(
    conn: &mut sqlx::AnyConnection,
    rows: &[&NewEvent],
) -> StoreResult<Vec<Option<EventRecord>>> {
    use std::fmt::Write as _;
    let mut sql = String::from(
        "INSERT INTO events (id, partner_id, tipo, dados, meta, pipeline_version, status, attempts, \
         received_at, updated_at, queued_at, idempotency_key, request_hash, request_id) VALUES ",
    );
    for i in 0..rows.len() {
        let p = i * 9;
        let _ = write!(
            sql,
            "{}(${}, ${}, ${}, ${}, '{{}}', ${}, 'received', 0, ${}, ${}, ${}, ${}, ${}, ${})",
            sep(i),
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5,
            p + 6,
            p + 6,
            p + 6,
            p + 7,
            p + 8,
            p + 9
        );
    }
    let _ = write!(
        sql,
        " ON CONFLICT (partner_id, idempotency_key) DO NOTHING RETURNING {EVENT_COLUMNS}"
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
            .bind(&new.request_hash)
            .bind(&new.request_id);
    }
    let mut created: std::collections::HashMap<String, EventRecord> = std::collections::HashMap::new();
    for row in q.fetch_all(&mut *conn).await? {
        let ev = event_from_row(&row)?;
        created.insert(ev.id.clone(), ev);
    }
    Ok(rows.iter().map(|n| created.remove(&n.id)).collect())
}

/// The idempotency key of `new` exists for its partner: replay or conflict.
async fn existing_outcome(conn: &mut sqlx::AnyConnection, new: &NewEvent) -> StoreResult<InsertOutcome> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, request_hash FROM events WHERE partner_id = $1 AND idempotency_key = $2"
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(&new.partner_id)
        .bind(&new.idempotency_key)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::Database("idempotency conflict without a row".into()))?;
    let hash: Option<String> = row.try_get("request_hash")?;
    let existing = event_from_row(&row)?;
    if hash.as_deref() == Some(new.request_hash.as_str()) {
        Ok(InsertOutcome::Replayed(existing))
    } else {
        Ok(InsertOutcome::Conflict {
            existing_id: existing.id,
        })
    }
}

fn event_from_row(row: &AnyRow) -> StoreResult<EventRecord> {
    let status: String = row.try_get("status")?;
    let last_error: Option<String> = row.try_get("last_error")?;
    let last_trace: Option<String> = row.try_get("last_trace")?;
    let result: Option<String> = row.try_get("result")?;
    let opt_ms = |c: &str| -> StoreResult<Option<DateTime<Utc>>> {
        Ok(row.try_get::<Option<i64>, _>(c)?.map(from_ms))
    };
    Ok(EventRecord {
        id: row.try_get("id")?,
        partner_id: row.try_get("partner_id")?,
        tipo: row.try_get("tipo")?,
        dados: parse_json(&row.try_get::<String, _>("dados")?)?,
        meta: parse_json(&row.try_get::<String, _>("meta")?)?,
        pipeline_version: row.try_get("pipeline_version")?,
        status: Status::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
        attempt_base: u32::try_from(row.try_get::<i64, _>("attempt_base")?).unwrap_or(0),
        received_at: from_ms(row.try_get("received_at")?),
        updated_at: from_ms(row.try_get("updated_at")?),
        next_attempt_at: opt_ms("next_attempt_at")?,
        processed_at: opt_ms("processed_at")?,
        processing_ms: row.try_get("processing_ms")?,
        last_error: last_error
            .map(|s| serde_json::from_str::<LastError>(&s).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()?,
        last_trace: match last_trace {
            Some(s) => {
                serde_json::from_str::<Vec<StageTrace>>(&s).map_err(|e| StoreError::Corrupt(e.to_string()))?
            }
            None => Vec::new(),
        },
        result: result.map(|s| parse_json(&s)).transpose()?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_id: row.try_get("request_id")?,
    })
}

/// Inserts `new` in one transaction (one statement without one), resolving
/// each idempotency key in list order: the first of two equal keys is
/// created, the second replays or conflicts with it.
async fn insert_all(pool: &AnyPool, new: &[&NewEvent]) -> StoreResult<Vec<InsertOutcome>> {
    if let [one] = new {
        let mut conn = pool.acquire().await?;
        let created = insert_rows(&mut conn, new).await?.pop().flatten();
        return Ok(vec![match created {
            Some(ev) => InsertOutcome::Created(ev),
            None => existing_outcome(&mut conn, one).await?,
        }]);
    }
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(new.len());
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        let created = insert_rows(&mut tx, chunk).await?;
        for (n, ev) in chunk.iter().zip(created) {
            out.push(match ev {
                Some(ev) => InsertOutcome::Created(ev),
                None => existing_outcome(&mut tx, n).await?,
            });
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// Concurrent `POST /events` inserts, group-committed.
struct InsertOp {
    pool: AnyPool,
}

#[async_trait]
impl BatchOp for InsertOp {
    type Item = NewEvent;
    type Out = InsertOutcome;

    async fn run(&self, items: &[NewEvent]) -> StoreResult<Vec<InsertOutcome>> {
        insert_in_key_order(&self.pool, &items.iter().collect::<Vec<_>>()).await
    }
}

/// [`insert_all`] with the rows in key order, so two transactions in flight
/// lock equal keys in the same order and cannot deadlock; the stable sort
/// keeps list order between equal keys. Outcomes come back in list order.
async fn insert_in_key_order(pool: &AnyPool, items: &[&NewEvent]) -> StoreResult<Vec<InsertOutcome>> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| (&items[i].partner_id, &items[i].idempotency_key);
        key(a).cmp(&key(b))
    });
    let sorted: Vec<&NewEvent> = order.iter().map(|&i| items[i]).collect();
    let mut outs: Vec<Option<InsertOutcome>> = (0..items.len()).map(|_| None).collect();
    for (i, o) in order.into_iter().zip(insert_all(pool, &sorted).await?) {
        outs[i] = Some(o);
    }
    outs.into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Database("an insert returned no outcome".into())))
        .collect()
}

/// A worker's [`Store::claim`].
struct ClaimReq {
    id: String,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
}

/// Concurrent claims as one `UPDATE … WHERE id IN (…) RETURNING`.
struct ClaimOp {
    pool: AnyPool,
}

#[async_trait]
impl BatchOp for ClaimOp {
    type Item = ClaimReq;
    /// Per caller: the claimed event, `None`, or the error decoding its row
    /// (the claim is committed by then, so it must not be rerun).
    type Out = StoreResult<Option<EventRecord>>;

    async fn run(&self, items: &[ClaimReq]) -> StoreResult<Vec<StoreResult<Option<EventRecord>>>> {
        // Requests of one batch differ by microseconds: the latest clock and
        // lease serve them all.
        let (Some(now), Some(lease_until)) = (
            items.iter().map(|c| c.now).max(),
            items.iter().map(|c| c.lease_until).max(),
        ) else {
            return Ok(Vec::new());
        };
        let ids: Vec<String> = (0..items.len()).map(|i| format!("${}", i + 4)).collect();
        let sql = format!(
            "UPDATE events SET status = 'processing', attempts = attempts + 1, lease_until = $1, updated_at = $2 \
             WHERE id IN ({}) AND (status = 'received' \
               OR (status = 'retrying' AND (next_attempt_at IS NULL OR next_attempt_at <= $3)) \
               OR (status = 'processing' AND lease_until < $2)) \
             RETURNING {EVENT_COLUMNS}",
            ids.join(", ")
        );
        // A task may arrive a little before its due time; do not make it wait another sweep.
        let due = ms(now) + 250;
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(ms(lease_until))
            .bind(ms(now))
            .bind(due);
        for c in items {
            q = q.bind(&c.id);
        }
        let mut claimed = std::collections::HashMap::with_capacity(items.len());
        for row in q.fetch_all(&self.pool).await? {
            claimed.insert(row.try_get::<String, _>("id")?, event_from_row(&row));
        }
        // The same event twice in a batch (a duplicate task): the first gets it.
        Ok(items.iter().map(|c| claimed.remove(&c.id).transpose()).collect())
    }
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
}

impl FinishRow {
    fn new(id: &str, attempt: u32, f: &AttemptFinish) -> StoreResult<Self> {
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
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
        })
    }
}

/// Concurrent attempt outcomes in one transaction of three multi-row
/// statements: deliveries, the events' updates, their attempt rows.
struct FinishOp {
    pool: AnyPool,
}

#[async_trait]
impl BatchOp for FinishOp {
    type Item = FinishRow;
    type Out = bool;

    async fn run(&self, items: &[FinishRow]) -> StoreResult<Vec<bool>> {
        use std::fmt::Write as _;
        let now = ms(Utc::now());
        let mut tx = self.pool.begin().await?;

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
            let mut sql = String::from(
                "INSERT INTO deliveries (event_id, destination, delivered_at, status_code) VALUES ",
            );
            for i in 0..chunk.len() {
                let p = i * 3;
                let _ = write!(sql, "{}(${}, ${}, $1, ${})", sep(i), p + 2, p + 3, p + 4);
            }
            sql += " ON CONFLICT (event_id, destination) DO NOTHING";
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(now);
            for (id, dest, code) in chunk {
                q = q.bind(*id).bind(*dest).bind(*code);
            }
            q.execute(&mut *tx).await?;
        }

        // Outcomes, only where the attempt still holds the claim.
        let mut done = std::collections::HashSet::with_capacity(items.len());
        for chunk in items.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from("WITH v (eid, att, st, nxt, err, trc, prc, res, mta) AS (VALUES ");
            for i in 0..chunk.len() {
                let p = i * 9;
                let _ = write!(sql, "{}(", sep(i));
                for k in 1..=9 {
                    let _ = write!(sql, "{}${}", if k == 1 { "" } else { ", " }, p + k + 1);
                }
                sql.push(')');
            }
            sql += ") UPDATE events SET status = v.st, next_attempt_at = v.nxt, lease_until = NULL, \
                    last_error = v.err, last_trace = v.trc, updated_at = $1, queued_at = $1, \
                    processed_at = CASE WHEN v.prc = 1 THEN $1 ELSE processed_at END, \
                    processing_ms = CASE WHEN v.prc = 1 THEN $1 - received_at ELSE processing_ms END, \
                    result = COALESCE(v.res, result), meta = COALESCE(v.mta, meta) \
                    FROM v WHERE id = v.eid AND status = 'processing' AND attempts = v.att \
                    RETURNING id, attempts";
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
                    .bind(&f.meta);
            }
            for row in q.fetch_all(&mut *tx).await? {
                done.insert((
                    row.try_get::<String, _>("id")?,
                    row.try_get::<i64, _>("attempts")?,
                ));
            }
        }

        let finished: Vec<&FinishRow> = items
            .iter()
            .filter(|f| done.contains(&(f.id.clone(), f.attempt)))
            .collect();
        for chunk in finished.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO attempts (event_id, attempt, finished_at, outcome, error, trace) VALUES ",
            );
            for i in 0..chunk.len() {
                let p = i * 5;
                let _ = write!(
                    sql,
                    "{}(${}, ${}, $1, ${}, ${}, ${})",
                    sep(i),
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5,
                    p + 6
                );
            }
            sql += " ON CONFLICT (event_id, attempt) DO NOTHING";
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
        tx.commit().await?;
        Ok(items
            .iter()
            .map(|f| done.contains(&(f.id.clone(), f.attempt)))
            .collect())
    }
}

/// Concurrent API-key lookups (one per partner request) as one
/// `… WHERE key_hash IN (…)`: still read per request, so a revoked key or a
/// disabled partner is refused from the next request on.
struct KeyLookupOp {
    pool: AnyPool,
}

#[async_trait]
impl BatchOp for KeyLookupOp {
    type Item = String;
    type Out = Option<Partner>;

    async fn run(&self, items: &[String]) -> StoreResult<Vec<Option<Partner>>> {
        let params: Vec<String> = (0..items.len()).map(|i| format!("${}", i + 1)).collect();
        let sql = format!(
            "SELECT k.key_hash, p.id, p.name, p.rate_per_minute, p.burst, p.disabled_at FROM api_keys k \
             JOIN partners p ON p.id = k.partner_id WHERE k.key_hash IN ({}) AND k.revoked_at IS NULL",
            params.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for hash in items {
            q = q.bind(hash);
        }
        let mut found = std::collections::HashMap::new();
        for row in q.fetch_all(&self.pool).await? {
            found.insert(row.try_get::<String, _>("key_hash")?, partner_from_row(&row)?);
        }
        Ok(items.iter().map(|h| found.get(h).cloned()).collect())
    }
}

fn sep(i: usize) -> &'static str {
    if i == 0 { "" } else { ", " }
}

#[async_trait]
impl Store for SqlStore {
    async fn migrate(&self) -> StoreResult<()> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_event(&self, new: NewEvent) -> StoreResult<InsertOutcome> {
        self.writes.insert.submit(new).await
    }

    async fn insert_events(&self, new: Vec<NewEvent>) -> StoreResult<Vec<InsertOutcome>> {
        insert_in_key_order(&self.pool, &new.iter().collect::<Vec<_>>()).await
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
        let mut sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE 1 = 1");
        let mut n = 0;
        let mut next = |clause: &str| {
            n += 1;
            format!(" AND {clause} ${n}")
        };
        if f.partner_id.is_some() {
            sql += &next("partner_id =");
        }
        if f.status.is_some() {
            sql += &next("status =");
        }
        if f.tipo.is_some() {
            sql += &next("tipo =");
        }
        if f.since.is_some() {
            sql += &next("received_at >=");
        }
        if f.until.is_some() {
            sql += &next("received_at <");
        }
        if f.before_id.is_some() {
            sql += &next("id <");
        }
        sql += &format!(" ORDER BY id DESC LIMIT {}", f.limit.clamp(1, 1001));
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(p) = &f.partner_id {
            q = q.bind(p);
        }
        if let Some(s) = f.status {
            q = q.bind(s.as_str());
        }
        if let Some(t) = &f.tipo {
            q = q.bind(t);
        }
        if let Some(t) = f.since {
            q = q.bind(ms(t));
        }
        if let Some(t) = f.until {
            q = q.bind(ms(t));
        }
        if let Some(c) = &f.before_id {
            q = q.bind(c);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn stats(&self, partner_id: Option<&str>) -> StoreResult<Stats> {
        let (cond, cond_and) = if partner_id.is_some() {
            ("WHERE partner_id = $1", "AND partner_id = $1")
        } else {
            ("", "")
        };
        let run = |sql: String| {
            let pool = self.pool.clone();
            let partner = partner_id.map(str::to_owned);
            async move {
                let mut q = sqlx::query(AssertSqlSafe(sql));
                if let Some(p) = partner {
                    q = q.bind(p);
                }
                q.fetch_all(&pool).await
            }
        };
        let mut by_status = BTreeMap::new();
        let mut total = 0;
        for row in run(format!(
            "SELECT status, COUNT(*) AS n FROM events {cond} GROUP BY status"
        ))
        .await?
        {
            let n: i64 = row.try_get("n")?;
            total += n;
            by_status.insert(row.try_get::<String, _>("status")?, n);
        }
        let mut by_type = BTreeMap::new();
        for row in run(format!(
            "SELECT tipo, COUNT(*) AS n FROM events {cond} GROUP BY tipo"
        ))
        .await?
        {
            by_type.insert(row.try_get::<String, _>("tipo")?, row.try_get::<i64, _>("n")?);
        }
        let processed = by_status.get("processed").copied().unwrap_or(0);
        let pct = |p: f64| {
            let offset = ((processed as f64 - 1.0) * p).round().max(0.0) as i64;
            run(format!(
                "SELECT processing_ms FROM events WHERE processing_ms IS NOT NULL {cond_and} \
                 ORDER BY processing_ms LIMIT 1 OFFSET {offset}"
            ))
        };
        let percentile = |rows: Vec<AnyRow>| -> StoreResult<Option<i64>> {
            rows.first()
                .map(|r| r.try_get::<i64, _>("processing_ms"))
                .transpose()
                .map_err(Into::into)
        };
        let processing_ms = if processed == 0 {
            Percentiles {
                p50: None,
                p95: None,
                p99: None,
            }
        } else {
            Percentiles {
                p50: percentile(pct(0.50).await?)?,
                p95: percentile(pct(0.95).await?)?,
                p99: percentile(pct(0.99).await?)?,
            }
        };
        Ok(Stats {
            total,
            by_status,
            by_type,
            processing_ms,
        })
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

    async fn claim(
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
        self.writes.claim.submit(req).await?
    }

    async fn finish_attempt(&self, id: &str, attempt: u32, f: &AttemptFinish) -> StoreResult<bool> {
        let row = FinishRow::new(id, attempt, f)?;
        self.writes.finish.submit(row).await
    }

    async fn manual_retry(&self, id: &str) -> StoreResult<RetryOutcome> {
        let now = ms(Utc::now());
        let sql = format!(
            "UPDATE events SET status = 'received', next_attempt_at = NULL, updated_at = $1, queued_at = $1, \
             attempt_base = attempts \
             WHERE id = $2 AND status = 'dead_lettered' RETURNING {EVENT_COLUMNS}"
        );
        if let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        {
            return Ok(RetryOutcome::Requeued(event_from_row(&row)?));
        }
        Ok(match self.get_event(id).await? {
            Some(e) => RetryOutcome::WrongStatus(e.status),
            None => RetryOutcome::NotFound,
        })
    }

    async fn take_stranded(&self, sweep: &Sweep<'_>) -> StoreResult<Vec<Requeue>> {
        let waiting = "((status = 'received' AND queued_at < {t}) \
             OR (status = 'retrying' AND next_attempt_at < {t} AND queued_at < {t}))";
        let mut sql = format!(
            "SELECT id, tipo, pipeline_version FROM events \
             WHERE (status = 'received' AND queued_at = 0) \
                OR (status = 'retrying' AND queued_at = 0 AND next_attempt_at <= $1) \
                OR (status = 'processing' AND lease_until < $1) \
                OR {}",
            waiting.replace("{t}", "$2")
        );
        if !sweep.idle_types.is_empty() {
            let params: Vec<String> = (0..sweep.idle_types.len())
                .map(|i| format!("${}", i + 5))
                .collect();
            sql += &format!(
                " OR (tipo IN ({}) AND {})",
                params.join(", "),
                waiting.replace("{t}", "$3")
            );
        }
        sql += " ORDER BY id LIMIT $4";
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(ms(sweep.now))
            .bind(ms(sweep.very_stale_before))
            .bind(ms(sweep.stale_before))
            .bind(i64::from(sweep.limit));
        for t in sweep.idle_types {
            q = q.bind(t);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let out = rows
            .iter()
            .map(|r| {
                Ok(Requeue {
                    id: r.try_get("id")?,
                    tipo: r.try_get("tipo")?,
                    pipeline_version: r.try_get("pipeline_version")?,
                    run_at: None,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        if !out.is_empty() {
            let params: Vec<String> = (0..out.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "UPDATE events SET queued_at = $1 WHERE id IN ({})",
                params.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(ms(sweep.now));
            for r in &out {
                q = q.bind(&r.id);
            }
            q.execute(&self.pool).await?;
        }
        Ok(out)
    }

    async fn mark_unqueued(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE events SET queued_at = 0 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_leases(&self) -> StoreResult<u64> {
        let r = sqlx::query("UPDATE events SET lease_until = 0 WHERE status = 'processing'")
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn status_counts(&self) -> StoreResult<BTreeMap<String, i64>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM events GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>("status")?, r.try_get::<i64, _>("n")?)))
            .collect()
    }

    async fn save_pipeline_version(
        &self,
        version: &str,
        tipo: &str,
        sources: &BTreeMap<String, String>,
    ) -> StoreResult<()> {
        let text = serde_json::to_string(sources).map_err(|e| StoreError::Database(e.to_string()))?;
        sqlx::query(
            "INSERT INTO pipeline_versions (version, tipo, sources, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(version)
        .bind(tipo)
        .bind(text)
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn pipeline_version(
        &self,
        version: &str,
    ) -> StoreResult<Option<(String, BTreeMap<String, String>)>> {
        let row = sqlx::query("SELECT tipo, sources FROM pipeline_versions WHERE version = $1")
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let sources: String = r.try_get("sources")?;
            let files = serde_json::from_str(&sources).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok((r.try_get("tipo")?, files))
        })
        .transpose()
    }

    async fn oldest_pending(&self) -> StoreResult<BTreeMap<String, DateTime<Utc>>> {
        let rows = sqlx::query(
            "SELECT tipo, MIN(received_at) AS oldest FROM events \
             WHERE status IN ('received', 'processing', 'retrying') GROUP BY tipo",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>("tipo")?,
                    from_ms(r.try_get::<i64, _>("oldest")?),
                ))
            })
            .collect()
    }

    async fn create_partner(&self, p: &NewPartner) -> StoreResult<bool> {
        let r = sqlx::query(
            "INSERT INTO partners (id, name, password_hash, rate_per_minute, burst, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&p.id)
        .bind(&p.name)
        .bind(&p.password_hash)
        .bind(p.rate_per_minute.map(i64::from))
        .bind(p.burst.map(i64::from))
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn add_api_key(&self, partner_id: &str, key_hash: &str, prefix: &str) -> StoreResult<bool> {
        let r = sqlx::query(
            "INSERT INTO api_keys (key_hash, partner_id, prefix, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (key_hash) DO NOTHING",
        )
        .bind(key_hash)
        .bind(partner_id)
        .bind(prefix)
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn partner_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Partner>> {
        self.writes.key.submit(key_hash.to_owned()).await
    }

    async fn partner_login(&self, id: &str) -> StoreResult<Option<(Partner, Option<String>)>> {
        let row = sqlx::query(
            "SELECT id, name, rate_per_minute, burst, disabled_at, password_hash FROM partners WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok((
                partner_from_row(&r)?,
                r.try_get::<Option<String>, _>("password_hash")?,
            ))
        })
        .transpose()
    }

    async fn count_partners(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM partners")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    async fn partners(&self, id: Option<&str>) -> StoreResult<Vec<PartnerInfo>> {
        let filter = if id.is_some() { "WHERE id = $1" } else { "" };
        let sql = format!(
            "SELECT id, name, rate_per_minute, burst, disabled_at, password_hash, created_at FROM partners \
             {filter} ORDER BY id"
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(id) = id {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let p = partner_from_row(r)?;
            out.push(PartnerInfo {
                has_password: r.try_get::<Option<String>, _>("password_hash")?.is_some(),
                created_at: from_ms(r.try_get("created_at")?),
                keys: Vec::new(),
                id: p.id,
                name: p.name,
                disabled: p.disabled,
                rate_per_minute: p.rate_per_minute,
                burst: p.burst,
            });
        }
        let key_filter = if id.is_some() { "WHERE partner_id = $1" } else { "" };
        let sql = format!(
            "SELECT partner_id, key_hash, prefix, created_at, revoked_at FROM api_keys {key_filter} \
             ORDER BY partner_id, created_at, key_hash"
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(id) = id {
            q = q.bind(id);
        }
        for r in q.fetch_all(&self.pool).await? {
            let owner: String = r.try_get("partner_id")?;
            let hash: String = r.try_get("key_hash")?;
            if let Some(p) = out.iter_mut().find(|p| p.id == owner) {
                p.keys.push(ApiKeyInfo {
                    id: hash.chars().take(16).collect(),
                    prefix: r.try_get("prefix")?,
                    created_at: from_ms(r.try_get("created_at")?),
                    revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(from_ms),
                });
            }
        }
        Ok(out)
    }

    async fn update_partner(&self, id: &str, update: &PartnerUpdate) -> StoreResult<bool> {
        // One statement, no read-modify-write: on SQLite a deferred
        // transaction that reads and then writes fails when a worker wrote in
        // between.
        let flag = |set: bool| i64::from(set);
        let disabled = match update.disabled {
            None => -1_i64,
            Some(false) => 0,
            Some(true) => 1,
        };
        let r = sqlx::query(
            "UPDATE partners SET \
               name = COALESCE(CAST($2 AS TEXT), name), \
               password_hash = CASE WHEN $3 = 1 THEN CAST($4 AS TEXT) ELSE password_hash END, \
               rate_per_minute = CASE WHEN $5 = 1 THEN CAST($6 AS BIGINT) ELSE rate_per_minute END, \
               burst = CASE WHEN $7 = 1 THEN CAST($8 AS BIGINT) ELSE burst END, \
               disabled_at = CASE WHEN $9 = 1 THEN COALESCE(disabled_at, $10) \
                                  WHEN $9 = 0 THEN NULL ELSE disabled_at END \
             WHERE id = $1",
        )
        .bind(id)
        .bind(update.name.clone())
        .bind(flag(update.password_hash.is_some()))
        .bind(update.password_hash.clone().flatten())
        .bind(flag(update.rate_per_minute.is_some()))
        .bind(update.rate_per_minute.flatten().map(i64::from))
        .bind(flag(update.burst.is_some()))
        .bind(update.burst.flatten().map(i64::from))
        .bind(disabled)
        .bind(ms(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn revoke_api_keys(
        &self,
        partner_id: &str,
        key_id: Option<&str>,
        keep_hash: Option<&str>,
    ) -> StoreResult<u64> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE partner_id = $2 AND revoked_at IS NULL \
             AND (CAST($3 AS TEXT) IS NULL OR substr(key_hash, 1, 16) = $3) \
             AND (CAST($4 AS TEXT) IS NULL OR key_hash <> $4)",
        )
        .bind(ms(Utc::now()))
        .bind(partner_id)
        .bind(key_id)
        .bind(keep_hash)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}
