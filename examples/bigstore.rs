//! A big store, and how fast it reads: fills a database with millions of
//! events straight through SQL (not the API), then measures the latency of
//! `GET /events/stats` and of `GET /events` under every filter combination
//! against a running server. `scripts/bigstore.sh` runs the whole thing.
//!
//! ```sh
//! # 10 million events over the last 7 days, 20 partners (bench1…), 5 types
//! cargo run --release --example bigstore -- load \
//!     --database-url 'postgres://postgres@127.0.0.1:5432/bigstore?sslmode=disable' --events 10000000
//!
//! # latencies against a server on that database
//! cargo run --release --example bigstore -- read --url http://127.0.0.1:3910 --admin-key "$ADMIN_API_KEY"
//!
//! # table and index sizes
//! cargo run --release --example bigstore -- sizes --database-url '…'
//! ```
//!
//! **load** runs the migrations, creates the partners and (PostgreSQL) one
//! time partition per day of the range, then writes the events in time
//! order: PostgreSQL with `COPY` (`--jobs` connections, each a contiguous
//! slice of the time range), SQLite with multi-row `INSERT`s in
//! transactions. Ids are ULIDs made from `received_at`, which is spread
//! evenly over the last `--days` days. Partners and types are Zipf-weighted
//! (`bench1` and the first type are the busiest). Statuses: 95 % processed
//! (processing times log-normal, median 40 ms, with a retried and a slow
//! tail), 3 % dead-lettered, 1 % retrying, 1 % received; every event has an
//! idempotency key (`--keys`). No attempts or deliveries rows are written.
//! The events not finished count as queued at load time, so a server whose
//! `REQUEUE_AFTER` is longer than the time since the load does not queue
//! them again. Then `event_counts` is filled from the events with one
//! aggregate `INSERT … SELECT` (minute buckets, as migration 0004 does),
//! with the running totals, rolled up with `MaintenanceStore::compact`,
//! and (PostgreSQL) the database analysed with `VACUUM (ANALYZE)`, so
//! autovacuum has nothing left to do during a read run. The SQLite file is
//! not analysed, as the service never analyses it.
//!
//! **read** times each request on its own (one connection, one request at a
//! time, a few untimed warm-up calls first) and prints p50/p95/p99/max per
//! case with the target (stats 20 ms, lists 50 ms, compared with p99).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand};
use orchestrator::store::sql::Backend;
use orchestrator::store::stats::MS_BOUNDS;
use orchestrator::store::{MaintenanceStore, NewPartner, PartnerStore, SqlStore, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, Row};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// The columns every loaded event fills, in this order.
const COLUMNS: [&str; 22] = [
    "id",
    "partner_id",
    "tipo",
    "dados",
    "meta",
    "pipeline_version",
    "status",
    "attempts",
    "attempt_base",
    "received_at",
    "updated_at",
    "next_attempt_at",
    "lease_until",
    "queued_at",
    "processed_at",
    "processing_ms",
    "last_error",
    "last_trace",
    "result",
    "idempotency_key",
    "request_id",
    "prior_status",
];

/// The seed pipelines' types first, then made-up ones.
const TYPE_NAMES: [&str; 5] = [
    "VENDA",
    "DEVOLUÇÃO",
    "ATUALIZAÇÃO_ESTOQUE",
    "CANCELAMENTO",
    "TRANSFERÊNCIA",
];

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fill a fresh database with events.
    Load(LoadArgs),
    /// Measure read latencies against a running server.
    Read(ReadArgs),
    /// Print table and index sizes.
    Sizes(SizesArgs),
}

#[derive(Args, Debug)]
struct LoadArgs {
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events are received over the last this many days.
    #[arg(long, default_value_t = 7.0)]
    days: f64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    partners: u32,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    types: u32,
    /// PostgreSQL: concurrent COPY connections (SQLite: always one writer).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    jobs: u32,
    /// Events per transaction.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    chunk: u64,
    /// Share of the events with an idempotency key (0 to 1).
    #[arg(long, default_value_t = 1.0)]
    keys: f64,
    /// Seed of the distributions (ids stay random).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// PostgreSQL: ANALYZE only, no VACUUM.
    #[arg(long)]
    no_vacuum: bool,
    /// Keep the minute counters of the last two hours as one writer-0 row
    /// each, instead of the ingest, claim and outcome writers' rows a
    /// running server has.
    #[arg(long)]
    single_writer: bool,
}

#[derive(Args, Debug)]
struct ReadArgs {
    #[arg(long, default_value = "http://127.0.0.1:3910")]
    url: String,
    #[arg(long)]
    admin_key: String,
    /// Partner of the partner filter.
    #[arg(long, default_value = "bench1")]
    partner: String,
    /// Partner of the stats' partner filter.
    #[arg(long, default_value = "bench3")]
    stats_partner: String,
    /// Type of the type filter.
    #[arg(long, default_value = "VENDA")]
    tipo: String,
    /// Status of the status filter.
    #[arg(long, default_value = "dead_lettered")]
    status: String,
    /// Timed calls per case.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    calls: u32,
    /// Untimed calls per case first.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Deep page: pages followed (limit 50) before the timed one.
    #[arg(long, default_value_t = 20)]
    depth: u32,
    /// Only the cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SizesArgs {
    #[arg(long)]
    database_url: String,
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Load(a) => load(a).await,
        Command::Read(a) => read(a).await,
        Command::Sizes(a) => sizes(a).await,
    }
}

// ---------------------------------------------------------------- load

/// Cumulative weights ∝ 1/rank (Zipf, s = 1).
fn zipf(n: u32) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|r| 1.0 / f64::from(r)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x / total;
            acc
        })
        .collect()
}

fn pick(cum: &[f64], u: f64) -> usize {
    cum.partition_point(|&c| c < u).min(cum.len() - 1)
}

/// What the generated events are made of.
struct Mix {
    partners: Vec<String>,
    partner_cum: Vec<f64>,
    types: Vec<String>,
    type_cum: Vec<f64>,
    versions: Vec<String>,
    /// Received at, from `start` over `span` ms, evenly.
    start: i64,
    span: i64,
    total: u64,
    /// When the load started: the unfinished events count as queued then.
    now: i64,
    keys: f64,
}

impl Mix {
    fn new(a: &LoadArgs, now: i64) -> Self {
        let types: Vec<String> = (0..a.types as usize)
            .map(|i| match TYPE_NAMES.get(i) {
                Some(n) => (*n).to_owned(),
                None => format!("TIPO_{}", i + 1),
            })
            .collect();
        let versions = types
            .iter()
            .enumerate()
            .map(|(i, _)| format!("{:016x}", 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(i as u64 + 1)))
            .collect();
        let span = (a.days * DAY as f64) as i64;
        Self {
            partners: (1..=a.partners).map(|i| format!("bench{i}")).collect(),
            partner_cum: zipf(a.partners),
            type_cum: zipf(a.types),
            types,
            versions,
            start: now - span,
            span,
            total: a.events,
            now,
            keys: a.keys,
        }
    }
}

/// One event's column values, in [`COLUMNS`] order (`None` = NULL), and
/// its idempotency key row.
struct Generated {
    cols: [Option<String>; 22],
    key: Option<[String; 4]>,
}

/// Log-normal with this median (ms) and sigma.
fn log_normal(rng: &mut StdRng, median: f64, sigma: f64) -> i64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    ((median.ln() + sigma * z).exp().round() as i64).max(1)
}

const ERRORS: [&str; 4] = [
    "POST http://erp.example/erp answered 503",
    "POST http://wms.example/wms: connection refused",
    "POST http://erp.example/erp timed out after 10s",
    "POST http://wms.example/wms answered 429",
];

fn generate(m: &Mix, i: u64, rng: &mut StdRng) -> Generated {
    let received = m.start + ((i as f64 + rng.random::<f64>()) * m.span as f64 / m.total as f64) as i64;
    let at = DateTime::<Utc>::from_timestamp_millis(received).unwrap_or_default();
    let id = ulid::Ulid::from_datetime_with_source(at.into(), rng).to_string();
    let p = pick(&m.partner_cum, rng.random());
    let t = pick(&m.type_cum, rng.random());
    let partner = &m.partners[p];
    let dados = format!(
        r#"{{"pedido":"PED-{i}","cliente":"C{}","itens":{},"valor":{:.2}}}"#,
        rng.random_range(1..100_000),
        rng.random_range(1..20),
        rng.random_range(1.0..5_000.0_f64)
    );
    let u: f64 = rng.random();
    let error = |rng: &mut StdRng| {
        json!({
            "category": "delivery",
            "message": ERRORS[rng.random_range(0..ERRORS.len())],
            "transient": true,
            "stage": "entregar",
        })
        .to_string()
    };
    let trace = |outcome: &str, ms: f64| {
        format!(
            r#"[{{"stage":"validar","plugin":"schema","outcome":"ok","duration_ms":0.21}},{{"stage":"enriquecer","plugin":"script","outcome":"ok","duration_ms":0.84}},{{"stage":"entregar","plugin":"webhook","outcome":"{outcome}","duration_ms":{ms:.1}}}]"#
        )
    };
    let result = || {
        format!(
            r#"{{"dados":{},"meta":{{"origem":"api","canal":"b2b"}},"routes":["erp","wms"]}}"#,
            dados.replacen('}', r#","total_com_impostos":1.0}"#, 1)
        )
    };
    let mut cols: [Option<String>; 22] = Default::default();
    let (status, attempts, updated, prior) = if u < 0.95 {
        // processed: most at once, some after retries, a few late
        let v: f64 = rng.random();
        let (ms, attempts) = if v < 0.97 {
            (log_normal(rng, 40.0, 0.9), 1)
        } else if v < 0.995 {
            (log_normal(rng, 5_000.0, 1.0), rng.random_range(2..4))
        } else {
            (log_normal(rng, 60_000.0, 1.2), 1)
        };
        let done = received + ms;
        cols[14] = Some(done.to_string());
        cols[15] = Some(ms.to_string());
        cols[13] = Some(done.to_string());
        cols[17] = Some(trace("ok", (ms as f64 * 0.6).min(10_000.0)));
        cols[18] = Some(result());
        (
            "processed",
            attempts,
            done,
            Some(if attempts > 1 { "retrying" } else { "received" }),
        )
    } else if u < 0.98 {
        let done = received + log_normal(rng, 120_000.0, 1.0);
        cols[13] = Some(done.to_string());
        cols[16] = Some(error(rng));
        cols[17] = Some(trace("failed", 10_000.0));
        cols[18] = Some(result());
        ("dead_lettered", 5, done, Some("retrying"))
    } else if u < 0.99 {
        let attempts: i64 = rng.random_range(1..5);
        let done = received + log_normal(rng, 10_000.0, 1.0);
        cols[11] = Some((done + 1_000 * (1 << attempts)).to_string());
        cols[13] = Some(m.now.to_string());
        cols[16] = Some(error(rng));
        cols[17] = Some(trace("failed", 10_000.0));
        cols[18] = Some(result());
        (
            "retrying",
            attempts,
            done,
            Some(if attempts > 1 { "retrying" } else { "received" }),
        )
    } else {
        cols[13] = Some(m.now.to_string());
        ("received", 0, received, None)
    };
    let key = (rng.random::<f64>() < m.keys).then(|| format!("pedido-{i}-{:08x}", rng.random::<u32>()));
    let request_id = format!("{:032x}", rng.random::<u128>());
    cols[0] = Some(id.clone());
    cols[1] = Some(partner.clone());
    cols[2] = Some(m.types[t].clone());
    cols[3] = Some(dados.clone());
    cols[4] = Some(
        if status == "received" {
            "{}"
        } else {
            r#"{"origem":"api","canal":"b2b"}"#
        }
        .to_owned(),
    );
    cols[5] = Some(m.versions[t].clone());
    cols[6] = Some(status.to_owned());
    cols[7] = Some(attempts.to_string());
    cols[8] = Some("0".to_owned());
    cols[9] = Some(received.to_string());
    cols[10] = Some(updated.to_string());
    cols[19] = key.clone();
    cols[20] = Some(request_id);
    cols[21] = prior.map(str::to_owned);
    let key = key.map(|k| {
        let hash = format!("{:032x}{:032x}", rng.random::<u128>(), rng.random::<u128>());
        [partner.clone(), k, id, hash]
    });
    Generated { cols, key }
}

/// Appends a value in COPY's text format.
fn copy_field(out: &mut String, v: Option<&str>) {
    let Some(s) = v else {
        out.push_str("\\N");
        return;
    };
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

fn copy_row<'a>(out: &mut String, fields: impl Iterator<Item = Option<&'a str>>) {
    for (i, f) in fields.enumerate() {
        if i > 0 {
            out.push('\t');
        }
        copy_field(out, f);
    }
    out.push('\n');
}

/// Which column of [`COLUMNS`] holds a number (bound as BIGINT on SQLite).
fn numeric(col: usize) -> bool {
    matches!(col, 7..=15)
}

/// PostgreSQL: events `from..to` with COPY, `chunk` per transaction.
async fn copy_slice(
    url: String,
    mix: Arc<Mix>,
    (from, to): (u64, u64),
    chunk: u64,
    seed: u64,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::raw_sql("SET synchronous_commit = off")
        .execute(&mut conn)
        .await?;
    let mut rng = StdRng::seed_from_u64(seed);
    let events_copy = format!("COPY events ({}) FROM STDIN", COLUMNS.join(", "));
    let keys_copy = "COPY idempotency_keys (partner_id, idempotency_key, event_id, request_hash) FROM STDIN";
    let mut i = from;
    while i < to {
        let end = (i + chunk).min(to);
        let mut events = String::with_capacity(1 << 20);
        let mut keys = String::with_capacity(1 << 18);
        let mut tx = conn.begin().await?;
        let mut copy = tx.copy_in_raw(&events_copy).await?;
        let mut key_rows = Vec::new();
        for n in i..end {
            let g = generate(&mix, n, &mut rng);
            copy_row(&mut events, g.cols.iter().map(|c| c.as_deref()));
            if let Some(k) = g.key {
                key_rows.push(k);
            }
            if events.len() > 1 << 20 {
                copy.send(events.as_bytes()).await?;
                events.clear();
            }
        }
        if !events.is_empty() {
            copy.send(events.as_bytes()).await?;
        }
        copy.finish().await?;
        let mut copy = tx.copy_in_raw(keys_copy).await?;
        for k in &key_rows {
            copy_row(&mut keys, k.iter().map(|s| Some(s.as_str())));
            if keys.len() > 1 << 20 {
                copy.send(keys.as_bytes()).await?;
                keys.clear();
            }
        }
        if !keys.is_empty() {
            copy.send(keys.as_bytes()).await?;
        }
        copy.finish().await?;
        tx.commit().await?;
        done.fetch_add(end - i, Ordering::Relaxed);
        i = end;
    }
    conn.close().await?;
    Ok(())
}

/// SQLite: every event with multi-row INSERTs, `chunk` per transaction.
async fn insert_all(
    store: &SqlStore,
    mix: &Mix,
    chunk: u64,
    seed: u64,
    done: &AtomicU64,
) -> anyhow::Result<()> {
    const ROWS: usize = 50;
    let mut conn = store.pool().acquire().await?;
    sqlx::query("PRAGMA cache_size = -262144")
        .execute(&mut *conn)
        .await?;
    let row = |first: usize, n: usize| {
        (0..n)
            .map(|k| format!("${}", first + k))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let events_sql = |n: usize| {
        let rows: Vec<String> = (0..n)
            .map(|r| format!("({})", row(1 + r * COLUMNS.len(), COLUMNS.len())))
            .collect();
        format!(
            "INSERT INTO events ({}) VALUES {}",
            COLUMNS.join(", "),
            rows.join(", ")
        )
    };
    let keys_sql = |n: usize| {
        let rows: Vec<String> = (0..n).map(|r| format!("({})", row(1 + r * 4, 4))).collect();
        format!(
            "INSERT INTO idempotency_keys (partner_id, idempotency_key, event_id, request_hash) VALUES {}",
            rows.join(", ")
        )
    };
    let full_events = events_sql(ROWS);
    let full_keys = keys_sql(ROWS);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut i = 0;
    while i < mix.total {
        let end = (i + chunk).min(mix.total);
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut batch = Vec::with_capacity(ROWS);
        let mut keys = Vec::new();
        for n in i..end {
            let g = generate(mix, n, &mut rng);
            if let Some(k) = g.key {
                keys.push(k);
            }
            batch.push(g.cols);
            if batch.len() == ROWS || n + 1 == end {
                let sql = if batch.len() == ROWS {
                    full_events.clone()
                } else {
                    events_sql(batch.len())
                };
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for cols in batch.drain(..) {
                    for (c, v) in cols.into_iter().enumerate() {
                        q = if numeric(c) {
                            q.bind(v.map(|s| s.parse::<i64>().unwrap_or(0)))
                        } else {
                            q.bind(v)
                        };
                    }
                }
                q.execute(&mut *tx).await?;
            }
        }
        for part in keys.chunks(ROWS) {
            let sql = if part.len() == ROWS {
                full_keys.clone()
            } else {
                keys_sql(part.len())
            };
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for k in part {
                for v in k {
                    q = q.bind(v.clone());
                }
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        done.fetch_add(end - i, Ordering::Relaxed);
        i = end;
    }
    Ok(())
}

/// The histogram columns of `event_counts`, in order.
fn hist_columns() -> Vec<String> {
    let mut names: Vec<String> = MS_BOUNDS.iter().map(|b| format!("ms_le_{b}")).collect();
    names.push("ms_inf".into());
    names
}

/// The aggregate that fills `event_counts` from the events (minute buckets,
/// writer 0), as migration 0004 backfills it.
fn counts_sql() -> String {
    let cond = |lo: Option<i64>, hi: Option<i64>| {
        let mut c = String::from("status = 'processed' AND processing_ms IS NOT NULL");
        if let Some(lo) = lo {
            let _ = write!(c, " AND processing_ms > {lo}");
        }
        if let Some(hi) = hi {
            let _ = write!(c, " AND processing_ms <= {hi}");
        }
        format!("CAST(SUM(CASE WHEN {c} THEN 1 ELSE 0 END) AS BIGINT)")
    };
    let mut hist = Vec::new();
    let mut lower = None;
    for b in MS_BOUNDS {
        hist.push(cond(lower, Some(b)));
        lower = Some(b);
    }
    hist.push(cond(lower, None));
    let status = |s: &str| format!("CAST(SUM(CASE WHEN status = '{s}' THEN 1 ELSE 0 END) AS BIGINT)");
    format!(
        "INSERT INTO event_counts (bucket, width, partner_id, tipo, writer, received, processing, retrying, \
         processed, dead_lettered, ms_sum, {names}) \
         SELECT (received_at / 60000) * 60000, 60000, partner_id, tipo, 0, {}, {}, {}, {}, {}, \
         CAST(SUM(CASE WHEN status = 'processed' THEN COALESCE(processing_ms, 0) ELSE 0 END) AS BIGINT), {hist} \
         FROM events GROUP BY (received_at / 60000) * 60000, partner_id, tipo",
        status("received"),
        status("processing"),
        status("retrying"),
        status("processed"),
        status("dead_lettered"),
        names = hist_columns().join(", "),
        hist = hist.join(", "),
    )
}

/// The running totals (width 0) from the minute rows, as migration 0006
/// fills them.
fn totals_sql() -> String {
    let mut cols = vec![
        "received",
        "processing",
        "retrying",
        "processed",
        "dead_lettered",
        "ms_sum",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    cols.extend(hist_columns());
    let sums: Vec<String> = cols.iter().map(|c| format!("CAST(SUM({c}) AS BIGINT)")).collect();
    format!(
        "INSERT INTO event_counts (bucket, width, partner_id, tipo, writer, {}) \
         SELECT 0, 0, partner_id, tipo, 0, {} FROM event_counts WHERE width > 0 GROUP BY partner_id, tipo",
        cols.join(", "),
        sums.join(", ")
    )
}

/// The minute rows a running server has: each group-committed writer keeps
/// rows of its own (ingest 1: into `received`; claims 2: `received` →
/// `processing`; outcomes 3: `processing` → where the event ended) until the
/// roll-up merges a minute five minutes old, so the backfilled writer-0
/// minutes of the last five minutes become those three, with the same sums.
fn split_writers_sql(now: i64) -> Vec<String> {
    let key = "bucket, width, partner_id, tipo";
    let src = format!(
        "FROM event_counts WHERE width = 60000 AND writer = 0 AND bucket >= {}",
        now - 5 * 60_000
    );
    let claimed = "processing + retrying + processed + dead_lettered";
    let finished = "retrying + processed + dead_lettered";
    let hist = hist_columns().join(", ");
    vec![
        format!(
            "INSERT INTO event_counts ({key}, writer, received) \
             SELECT {key}, 1, received + {claimed} {src}"
        ),
        format!(
            "INSERT INTO event_counts ({key}, writer, received, processing) \
             SELECT {key}, 2, -({claimed}), {claimed} {src} AND {claimed} <> 0"
        ),
        format!(
            "INSERT INTO event_counts ({key}, writer, processing, retrying, processed, dead_lettered, ms_sum, {hist}) \
             SELECT {key}, 3, -({finished}), retrying, processed, dead_lettered, ms_sum, {hist} {src} AND {finished} <> 0"
        ),
        format!("DELETE {src}"),
    ]
}

async fn load(a: LoadArgs) -> anyhow::Result<()> {
    if a.events == 0 || !(a.days.is_finite() && a.days > 0.0) || !(0.0..=1.0).contains(&a.keys) {
        bail!("--events must be at least 1, --days positive, --keys from 0 to 1");
    }
    let t0 = Instant::now();
    let store = SqlStore::connect(&a.database_url, 4)
        .await
        .context("connecting to the database")?;
    store.migrate().await?;
    let existing: i64 = sqlx::query("SELECT COUNT(*) AS n FROM (SELECT id FROM events LIMIT 1) e")
        .fetch_one(store.pool())
        .await?
        .try_get("n")?;
    if existing > 0 {
        bail!("the database has events already; load into a fresh one");
    }
    let now = Utc::now();
    let mix = Arc::new(Mix::new(&a, now.timestamp_millis()));
    for p in &mix.partners {
        store
            .create_partner(&NewPartner {
                id: p.clone(),
                name: format!("Bench partner {p}"),
                password_hash: None,
                rate_per_minute: None,
                burst: None,
                weight: 1,
            })
            .await?;
    }
    let backend = store.backend();
    if backend == Backend::Postgres {
        let from =
            DateTime::<Utc>::from_timestamp_millis(mix.start.div_euclid(DAY) * DAY).unwrap_or_default();
        let made = store
            .create_partitions(
                from,
                now + chrono::Duration::hours(1),
                Duration::from_secs(86_400),
            )
            .await?;
        eprintln!("created {made} daily partitions from {from}");
    }
    eprintln!(
        "loading {} events over {} days ({} partners, {} types) into {:?}",
        a.events, a.days, a.partners, a.types, backend
    );
    let done = Arc::new(AtomicU64::new(0));
    let progress = {
        let done = done.clone();
        let total = a.events;
        tokio::spawn(async move {
            let start = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let n = done.load(Ordering::Relaxed);
                let s = start.elapsed().as_secs_f64();
                eprintln!(
                    "  {n} / {total} events ({:.1} %), {:.0} s, {:.0} events/s",
                    100.0 * n as f64 / total as f64,
                    s,
                    n as f64 / s
                );
            }
        })
    };
    let t_insert = Instant::now();
    match backend {
        Backend::Postgres => {
            let jobs = u64::from(a.jobs).min(a.events);
            let mut tasks = Vec::new();
            for j in 0..jobs {
                let slice = (a.events * j / jobs, a.events * (j + 1) / jobs);
                tasks.push(tokio::spawn(copy_slice(
                    a.database_url.clone(),
                    mix.clone(),
                    slice,
                    a.chunk,
                    a.seed.wrapping_add(j),
                    done.clone(),
                )));
            }
            for t in tasks {
                t.await??;
            }
        }
        Backend::Sqlite => insert_all(&store, &mix, a.chunk, a.seed, &done).await?,
    }
    progress.abort();
    let insert_s = t_insert.elapsed().as_secs_f64();
    eprintln!(
        "inserted {} events in {insert_s:.1} s ({:.0} events/s)",
        a.events,
        a.events as f64 / insert_s
    );

    let t_counts = Instant::now();
    let mut conn = store.pool().acquire().await?;
    if backend == Backend::Postgres {
        sqlx::query("SET work_mem = '256MB'").execute(&mut *conn).await?;
    }
    let rows = sqlx::query(AssertSqlSafe(counts_sql()))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query(AssertSqlSafe(totals_sql()))
        .execute(&mut *conn)
        .await?;
    drop(conn);
    let counts_s = t_counts.elapsed().as_secs_f64();
    eprintln!("event_counts: {rows} minute rows in {counts_s:.1} s");
    let t_compact = Instant::now();
    // A running server rolls up as minutes age; the backfill has a week of
    // minutes at once, so compact (a bounded number of chunks a pass) runs
    // until nothing is left to move.
    let mut rolled = i64::MAX;
    loop {
        store.compact(Utc::now()).await?;
        let left: i64 = sqlx::query("SELECT COUNT(*) AS n FROM event_counts")
            .fetch_one(store.pool())
            .await?
            .try_get("n")?;
        if left >= rolled {
            break;
        }
        rolled = left;
    }
    let compact_s = t_compact.elapsed().as_secs_f64();
    eprintln!("compact: {rolled} rows left in {compact_s:.1} s");
    let t_tidy = Instant::now();
    if !a.single_writer {
        let mut tx = store.pool().begin().await?;
        for sql in split_writers_sql(Utc::now().timestamp_millis()) {
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    if backend == Backend::Postgres {
        // The roll-up deleted nearly every backfilled row; a running server
        // never has that many minute rows at once, so its table is not left
        // this empty. Rewritten, it is as big as its rows.
        sqlx::raw_sql("VACUUM FULL event_counts")
            .execute(store.pool())
            .await?;
    }
    let tidy_s = t_tidy.elapsed().as_secs_f64();
    let left: i64 = sqlx::query("SELECT COUNT(*) AS n FROM event_counts")
        .fetch_one(store.pool())
        .await?
        .try_get("n")?;
    eprintln!("event_counts: {left} rows after the writer split and rewrite ({tidy_s:.1} s)");
    let t_analyze = Instant::now();
    // SQLite: no ANALYZE, as the service never analyses its event store
    // (with statistics, SQLite chose skip-scans that read a week's window of
    // one type in seconds).
    let analyze = match backend {
        Backend::Postgres if !a.no_vacuum => "VACUUM (ANALYZE)",
        Backend::Postgres => "ANALYZE",
        Backend::Sqlite => "",
    };
    if !analyze.is_empty() {
        sqlx::raw_sql(analyze).execute(store.pool()).await?;
    }
    let analyze_s = t_analyze.elapsed().as_secs_f64();
    eprintln!("{analyze}: {analyze_s:.1} s");
    store.close().await;
    let total_s = t0.elapsed().as_secs_f64();
    println!(
        "load: {} events in {total_s:.1} s (insert {insert_s:.1} s = {:.0} events/s, event_counts {counts_s:.1} s, \
         compact {compact_s:.1} s, writer split and rewrite {tidy_s:.1} s, {analyze} {analyze_s:.1} s); \
         event_counts rows: {left}",
        a.events,
        a.events as f64 / insert_s,
    );
    Ok(())
}

// ---------------------------------------------------------------- read

/// One measured request.
struct Case {
    kind: &'static str,
    name: String,
    params: Vec<(String, String)>,
    /// Follow this many pages first and time the next one.
    deep: Option<u32>,
}

struct Measured {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    mean: f64,
    items: usize,
    depth: u32,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn cases(a: &ReadArgs, now: DateTime<Utc>) -> Vec<Case> {
    let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let hour_ago = ts(now - chrono::Duration::hours(1));
    let (day_from, day_to) = (
        ts(now - chrono::Duration::days(3)),
        ts(now - chrono::Duration::days(2)),
    );
    let mut out = Vec::new();
    let stats = |name: &str, params: Vec<(String, String)>| Case {
        kind: "stats",
        name: name.to_owned(),
        params,
        deep: None,
    };
    out.push(stats("stats", vec![]));
    out.push(stats("stats since=1h", vec![p("since", &hour_ago)]));
    out.push(stats(
        "stats 1d window 3d ago",
        vec![p("since", &day_from), p("until", &day_to)],
    ));
    out.push(stats(
        &format!("stats partner_id={}", a.stats_partner),
        vec![p("partner_id", &a.stats_partner)],
    ));
    out.push(stats(
        &format!("stats partner_id={} since=1h", a.stats_partner),
        vec![p("partner_id", &a.stats_partner), p("since", &hour_ago)],
    ));
    let windows: [(&str, Vec<(String, String)>); 3] = [
        ("", vec![]),
        (" since=1h", vec![p("since", &hour_ago)]),
        (
            " 1d window 3d ago",
            vec![p("since", &day_from), p("until", &day_to)],
        ),
    ];
    let filters: [(&str, Vec<(String, String)>); 8] = [
        ("none", vec![]),
        ("status", vec![p("status", &a.status)]),
        ("tipo", vec![p("tipo", &a.tipo)]),
        ("partner", vec![p("partner_id", &a.partner)]),
        (
            "partner+status",
            vec![p("partner_id", &a.partner), p("status", &a.status)],
        ),
        ("tipo+status", vec![p("tipo", &a.tipo), p("status", &a.status)]),
        (
            "partner+tipo",
            vec![p("partner_id", &a.partner), p("tipo", &a.tipo)],
        ),
        (
            "partner+tipo+status",
            vec![
                p("partner_id", &a.partner),
                p("tipo", &a.tipo),
                p("status", &a.status),
            ],
        ),
    ];
    for deep in [None, Some(a.depth)] {
        for (wname, wparams) in &windows {
            for (fname, fparams) in &filters {
                let mut params = vec![p("limit", "50")];
                params.extend(fparams.iter().cloned());
                params.extend(wparams.iter().cloned());
                let page = if deep.is_some() { " deep" } else { "" };
                out.push(Case {
                    kind: "list",
                    name: format!("list {fname}{wname}{page}"),
                    params,
                    deep,
                });
            }
        }
    }
    // Statuses other than the filter's: the most and the least common.
    for s in ["processed", "received"] {
        if s != a.status {
            out.push(Case {
                kind: "list",
                name: format!("list status={s}"),
                params: vec![p("limit", "50"), p("status", s)],
                deep: None,
            });
        }
    }
    match &a.only {
        Some(only) => out
            .into_iter()
            .filter(|c| c.name.contains(only.as_str()))
            .collect(),
        None => out,
    }
}

async fn get(
    http: &reqwest::Client,
    a: &ReadArgs,
    path: &str,
    params: &[(String, String)],
) -> anyhow::Result<Value> {
    let resp = http
        .get(format!("{}{path}", a.url))
        .header("x-api-key", &a.admin_key)
        .query(params)
        .send()
        .await?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        bail!("GET {path} {params:?}: {status}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn measure(http: &reqwest::Client, a: &ReadArgs, case: &Case) -> anyhow::Result<Measured> {
    let path = if case.kind == "stats" {
        "/events/stats"
    } else {
        "/events"
    };
    let mut params = case.params.clone();
    let mut depth = 0;
    if let Some(pages) = case.deep {
        for _ in 0..pages {
            let page = get(http, a, path, &params).await?;
            let Some(cursor) = page["next_cursor"].as_str() else {
                break;
            };
            params.retain(|(k, _)| k != "cursor");
            params.push(("cursor".into(), cursor.to_owned()));
            depth += 1;
        }
    }
    for _ in 0..a.warmup {
        get(http, a, path, &params).await?;
    }
    let mut times = Vec::with_capacity(a.calls as usize);
    let mut items = 0;
    for _ in 0..a.calls {
        let t = Instant::now();
        let body = get(http, a, path, &params).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        items = match case.kind {
            "stats" => body["total"].as_i64().unwrap_or(0) as usize,
            _ => body["items"].as_array().map_or(0, Vec::len),
        };
    }
    times.sort_by(f64::total_cmp);
    Ok(Measured {
        p50: pct(&times, 0.50),
        p95: pct(&times, 0.95),
        p99: pct(&times, 0.99),
        max: *times.last().unwrap_or(&0.0),
        mean: times.iter().sum::<f64>() / times.len() as f64,
        items,
        depth,
    })
}

async fn read(a: ReadArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1)
        .build()?;
    let now = Utc::now();
    let all = cases(&a, now);
    let mut rows = Vec::new();
    if !a.json {
        println!(
            "{} calls per case after {} warm-up calls, one at a time; milliseconds; target: p99 under 20 (stats) / 50 (list)",
            a.calls, a.warmup
        );
        println!(
            "{:<44} {:>8} {:>8} {:>8} {:>8} {:>10}  verdict",
            "case", "p50", "p95", "p99", "max", "items"
        );
    }
    let mut failed = 0;
    for case in &all {
        let m = measure(&http, &a, case).await?;
        let target = if case.kind == "stats" { 20.0 } else { 50.0 };
        let ok = m.p99 < target;
        if !ok {
            failed += 1;
        }
        let items = match (case.kind, case.deep) {
            ("stats", _) => format!("total {}", m.items),
            (_, Some(_)) => format!("{} @p{}", m.items, m.depth + 1),
            _ => m.items.to_string(),
        };
        if !a.json {
            println!(
                "{:<44} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10}  {}",
                case.name,
                m.p50,
                m.p95,
                m.p99,
                m.max,
                items,
                if ok { "ok" } else { "SLOW" }
            );
        }
        let query: Vec<String> = case.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(json!({
            "kind": case.kind,
            "name": case.name,
            "query": query.join("&"),
            "calls": a.calls,
            "p50_ms": m.p50,
            "p95_ms": m.p95,
            "p99_ms": m.p99,
            "max_ms": m.max,
            "mean_ms": m.mean,
            "items": m.items,
            "page": case.deep.map(|_| m.depth + 1),
            "target_p99_ms": target,
            "ok": ok,
        }));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "measured_at": ts(now),
                "calls": a.calls,
                "warmup": a.warmup,
                "cases": rows,
                "slow": failed,
            }))?
        );
    } else {
        println!("{failed} of {} cases over target", all.len());
    }
    Ok(())
}

// ---------------------------------------------------------------- sizes

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

async fn sizes(a: SizesArgs) -> anyhow::Result<()> {
    let store = SqlStore::connect(&a.database_url, 2).await?;
    let pool = store.pool();
    let mut out = BTreeMap::<String, Value>::new();
    let mut lines = Vec::new();
    match store.backend() {
        Backend::Postgres => {
            // The partitioned tables summed over their partitions.
            for table in [
                "events",
                "attempts",
                "deliveries",
                "event_counts",
                "idempotency_keys",
            ] {
                let sql = format!(
                    "SELECT CAST(COALESCE(SUM(pg_total_relation_size(relid)), 0) AS BIGINT) AS total, \
                     CAST(COALESCE(SUM(pg_indexes_size(relid)), 0) AS BIGINT) AS indexes, \
                     CAST(COALESCE(SUM(pg_relation_size(relid)), 0) AS BIGINT) AS heap, \
                     CAST(COUNT(*) AS BIGINT) AS parts \
                     FROM (SELECT relid FROM pg_partition_tree('{table}') WHERE isleaf \
                           UNION SELECT oid FROM pg_class WHERE oid = '{table}'::regclass AND relkind = 'r') t"
                );
                let r = sqlx::query(AssertSqlSafe(sql)).fetch_one(pool).await?;
                let (total, indexes, heap, parts): (i64, i64, i64, i64) = (
                    r.try_get("total")?,
                    r.try_get("indexes")?,
                    r.try_get("heap")?,
                    r.try_get("parts")?,
                );
                let rows: i64 = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) AS n FROM {table}")))
                    .fetch_one(pool)
                    .await?
                    .try_get("n")?;
                lines.push(format!(
                    "{table:<18} rows {rows:>10}  total {:>11}  heap {:>11}  indexes {:>11}{}",
                    mib(total),
                    mib(heap),
                    mib(indexes),
                    if parts > 1 {
                        format!("  ({parts} partitions)")
                    } else {
                        String::new()
                    }
                ));
                out.insert(
                    table.to_owned(),
                    json!({"rows": rows, "total_bytes": total, "heap_bytes": heap, "index_bytes": indexes, "partitions": parts}),
                );
            }
            let sql = "SELECT CAST(c.relname AS TEXT) AS name, \
                       (SELECT CAST(COALESCE(SUM(pg_relation_size(relid)), 0) AS BIGINT) FROM pg_partition_tree(i.indexrelid)) AS bytes \
                       FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                       WHERE i.indrelid = 'events'::regclass ORDER BY 2 DESC";
            let mut idx = BTreeMap::new();
            for r in sqlx::query(sql).fetch_all(pool).await? {
                let (name, bytes): (String, i64) = (r.try_get("name")?, r.try_get("bytes")?);
                lines.push(format!("  index {name:<28} {:>11}", mib(bytes)));
                idx.insert(name, bytes);
            }
            out.insert("events_indexes".into(), json!(idx));
            let db: i64 = sqlx::query("SELECT CAST(pg_database_size(current_database()) AS BIGINT) AS n")
                .fetch_one(pool)
                .await?
                .try_get("n")?;
            lines.push(format!("database           {}", mib(db)));
            out.insert("database_bytes".into(), json!(db));
        }
        Backend::Sqlite => {
            let path = a
                .database_url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned();
            for (name, file) in [("file", path.clone()), ("wal", format!("{path}-wal"))] {
                let bytes = std::fs::metadata(&file).map(|m| m.len() as i64).unwrap_or(0);
                lines.push(format!("{name:<18} {:>11}  {file}", mib(bytes)));
                out.insert(format!("{name}_bytes"), json!(bytes));
            }
            match sqlx::query(
                "SELECT name, CAST(SUM(pgsize) AS BIGINT) AS bytes FROM dbstat GROUP BY name ORDER BY 2 DESC",
            )
            .fetch_all(pool)
            .await
            {
                Ok(rows) => {
                    let mut objs = BTreeMap::new();
                    for r in rows {
                        let (name, bytes): (String, i64) = (r.try_get("name")?, r.try_get("bytes")?);
                        if bytes >= 1 << 20
                            || ["events", "event_counts", "idempotency_keys"].contains(&name.as_str())
                        {
                            lines.push(format!("  {name:<34} {:>11}", mib(bytes)));
                        }
                        objs.insert(name, bytes);
                    }
                    out.insert("dbstat".into(), json!(objs));
                }
                Err(e) => lines.push(format!("dbstat unavailable: {e}")),
            }
            for table in ["events", "event_counts", "idempotency_keys"] {
                let rows: i64 = sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) AS n FROM {table}")))
                    .fetch_one(pool)
                    .await?
                    .try_get("n")?;
                lines.push(format!("{table:<18} rows {rows:>10}"));
                out.insert(format!("{table}_rows"), json!(rows));
            }
        }
    }
    let mut widths = BTreeMap::new();
    for r in sqlx::query("SELECT width, COUNT(*) AS n FROM event_counts GROUP BY width ORDER BY width")
        .fetch_all(pool)
        .await?
    {
        let (w, n): (i64, i64) = (r.try_get("width")?, r.try_get("n")?);
        let name = match w {
            MINUTE => "minute".to_owned(),
            HOUR => "hour".to_owned(),
            DAY => "day".to_owned(),
            other => format!("{other} ms"),
        };
        widths.insert(name, n);
    }
    lines.push(format!("event_counts rows by width: {widths:?}"));
    out.insert("event_counts_by_width".into(), json!(widths));
    store.close().await;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    Ok(())
}
