//! Load generator: posts a mix of the seed event types (VENDA, DEVOLUÇÃO,
//! ATUALIZAÇÃO_ESTOQUE; `--types` picks some), each with a unique idempotency
//! key (`--products N` spreads them over N products, so over N ordering keys
//! of ATUALIZAÇÃO_ESTOQUE) and rotating over
//! the partner keys given, then waits until every accepted event is terminal
//! (processed or dead-lettered, per `GET /events/stats` read with the admin
//! key) and reports ingest and end-to-end figures.
//!
//! Two modes:
//!
//! - **closed loop** (the default): `--connections` workers each send a
//!   request, wait for its answer, then send the next one. Latency runs from
//!   the actual send.
//! - **open loop** (`--rate R`): requests leave on a fixed timetable of `R`
//!   events per second whatever the answers, with at most `--connections` in
//!   flight. Latency runs from the *scheduled* send time, so a slow server
//!   shows up as latency rather than as less load offered (no coordinated
//!   omission). A request that cannot leave on time, because every connection
//!   is busy or the generator itself fell more than 10 ms behind, is sent as
//!   soon as it can be and its events are counted as late; nothing is dropped.
//!
//! Either mode sends `--events` events, or keeps sending for `--duration`
//! seconds when that is given. `--batch N` (N > 1) sends N events per
//! `POST /events/batch` instead of one per `POST /events`: statuses are counted
//! per event, latency per request. Once everything is terminal, the
//! end-to-end latency (`received_at` → `processed_at`) is read from
//! `GET /events/{id}` for a uniform random sample of `--sample` accepted events.
//!
//! `--count-from metrics` counts terminal events from the `/metrics`
//! counters (`events_processed_total` + `events_dead_lettered_total`, summed
//! over `tipo`) instead of `GET /events/stats`: with a short retention
//! (`RETENTION_PROCESSED`, `RETENTION_DEAD_LETTERED`) the stats go down as
//! events are purged, the counters only go up. They are the server process's
//! own, so this needs one server process that is not restarted during the run.
//!
//! `--report-every SECS` prints a line per interval: events accepted per
//! second (as answered to this generator) and events completed per second
//! (from the `/metrics` counters, so it works under retention too), from the
//! start until everything is terminal. `--poll-stats MS` polls
//! `GET /events/stats` with the admin key, one request at a time, every `MS`
//! milliseconds over the same window (a poll slower than `MS` is followed
//! at once by the next) and reports how many ran and their latency, to see
//! what a dashboard costs and suffers. Both print to stdout, or to stderr
//! with `--json`; `--json-file PATH` also writes the JSON report to `PATH`.
//!
//! ```sh
//! # closed loop: 20 000 events from 32 connections
//! cargo run --release --example loadgen -- --url http://127.0.0.1:3000 --key "$KEY" \
//!     --admin-key "$ADMIN_API_KEY" --events 20000 --connections 32
//!
//! # open loop: 2000 events/s for 60 s from two partners, at most 64 requests in flight
//! cargo run --release --example loadgen -- --url http://127.0.0.1:3000 --key "$KEY_A" --key "$KEY_B" \
//!     --admin-key "$ADMIN_API_KEY" --rate 2000 --duration 60 --connections 64
//!
//! # batches of 100 events, one JSON object as the report
//! cargo run --release --example loadgen -- --key "$KEY" --admin-key "$ADMIN_API_KEY" \
//!     --events 50000 --batch 100 --connections 8 --json
//!
//! # steady 300 events/s for 10 minutes against a server with a 1 minute
//! # retention, one line every 30 s, a dashboard polling the stats every 100 ms
//! cargo run --release --example loadgen -- --key "$KEY" --admin-key "$ADMIN_API_KEY" \
//!     --rate 300 --duration 600 --count-from metrics --report-every 30 --poll-stats 100
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

/// Most events the server takes in one `POST /events/batch`.
const MAX_BATCH: usize = 500;
/// Open loop: a request leaving later than this after its scheduled time is late.
const LATE_AFTER: Duration = Duration::from_millis(10);
/// Concurrent `GET /events/{id}` while sampling end-to-end latency.
const SAMPLE_CONCURRENCY: usize = 32;

/// Where the end-of-run wait reads how many events are terminal.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CountFrom {
    /// `GET /events/stats`: `by_status.processed` + `by_status.dead_lettered`.
    Stats,
    /// `GET /metrics`: `events_processed_total` + `events_dead_lettered_total`.
    Metrics,
}

impl CountFrom {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stats => "stats",
            Self::Metrics => "metrics",
        }
    }
}

#[derive(Parser, Debug)]
// A later occurrence of an option replaces an earlier one (scripts put
// defaults first); --key still adds up.
#[command(args_override_self = true)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Partner API key (repeat for several partners; requests rotate).
    #[arg(long, required = true)]
    key: Vec<String>,
    /// Admin key, to read global stats while waiting for the end and to sample events.
    #[arg(long)]
    admin_key: String,
    /// Events to send (ignored when --duration is given).
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Closed loop: concurrent workers. Open loop: most requests in flight.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    connections: usize,
    /// Open loop: events per second offered on a fixed timetable.
    #[arg(long, value_parser = positive_f64)]
    rate: Option<f64>,
    /// Send for this many seconds instead of a fixed number of events.
    #[arg(long, value_parser = positive_f64)]
    duration: Option<f64>,
    /// Events per request: 1 posts to /events, more posts to /events/batch (at most 500).
    #[arg(long, default_value_t = 1, value_parser = batch_size)]
    batch: usize,
    /// Accepted events whose end-to-end latency is read back (0 skips it).
    #[arg(long, default_value_t = 2000)]
    sample: usize,
    /// Give up waiting for terminal statuses after this many seconds.
    #[arg(long, default_value_t = 600)]
    wait_secs: u64,
    /// Give up on one request after this many seconds (counted as status 0).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
    /// Count terminal events for the end-of-run wait from `stats`
    /// (GET /events/stats, lowered by retention) or `metrics` (the /metrics
    /// counters of the server process, which only go up).
    #[arg(long, value_enum, default_value_t = CountFrom::Stats)]
    count_from: CountFrom,
    /// Also poll GET /events/stats every MS milliseconds (one at a time) until
    /// everything is terminal, and report the polls' latency.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    poll_stats: Option<u64>,
    /// Print accepted and completed events per second every SECS seconds.
    #[arg(long, value_name = "SECS", value_parser = positive_f64)]
    report_every: Option<f64>,
    /// The seed types to send, in turn (comma-separated; default all three).
    #[arg(long, value_delimiter = ',', value_parser = seed_type)]
    types: Vec<String>,
    /// Products the events name (`produto_id` P-0 … P-{N-1}, in turn); by
    /// default every event names a product of its own. With
    /// ATUALIZAÇÃO_ESTOQUE, ordered by product, this sets how many ordering
    /// keys the load spreads over.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    products: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "PATH")]
    json_file: Option<std::path::PathBuf>,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number of at least 1".into()),
    }
}

fn batch_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {MAX_BATCH}")),
    }
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        // Also keeps Duration::from_secs_f64 from panicking later on.
        Ok(x) if x > 0.0 && x.is_finite() && x < 1e9 => Ok(x),
        _ => Err("must be a positive number".into()),
    }
}

const SEED_TYPES: [&str; 3] = ["VENDA", "DEVOLUÇÃO", "ATUALIZAÇÃO_ESTOQUE"];

fn seed_type(s: &str) -> Result<String, String> {
    SEED_TYPES
        .iter()
        .find(|t| **t == s.trim())
        .map(|t| (*t).to_owned())
        .ok_or_else(|| format!("one of {}", SEED_TYPES.join(", ")))
}

/// Event `i` of the run: its type (the `--types` in turn) and `dados`.
fn dados(ctx: &Ctx, i: usize) -> (&'static str, Value) {
    let tipo = match ctx.types.as_slice() {
        [] => SEED_TYPES[i % SEED_TYPES.len()],
        types => SEED_TYPES
            .iter()
            .copied()
            .find(|t| *t == types[i % types.len()])
            .unwrap_or(SEED_TYPES[0]),
    };
    let produto = format!("P-{}", ctx.products.map_or(i, |n| i % n));
    let dados = match tipo {
        "VENDA" => json!({"produto_id": produto, "quantidade": 1 + i % 5, "valor": (i % 1000) as f64 * 1.5}),
        "DEVOLUÇÃO" => json!({"venda_id": format!("V-{i}"), "motivo": "produto com defeito"}),
        _ => json!({"produto_id": produto, "quantidade": i % 50}),
    };
    (tipo, dados)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What every sender needs.
struct Ctx {
    http: reqwest::Client,
    url: String,
    keys: Vec<String>,
    /// Unique per run, so idempotency keys never collide with an earlier run.
    run: String,
    batch: usize,
    /// `--types` and `--products`.
    types: Vec<String>,
    products: Option<usize>,
    /// Events answered 202 so far, for --report-every.
    accepted: AtomicU64,
}

/// The answer to one request: a status per event (0 = connection error or
/// timeout) and the ids of the events accepted.
struct Sent {
    statuses: Vec<u16>,
    ids: Vec<String>,
}

/// Sends events `first..first + count` as request number `req`.
async fn send(ctx: &Ctx, req: usize, first: usize, count: usize) -> Sent {
    let sent = send_request(ctx, req, first, count).await;
    let accepted = sent.statuses.iter().filter(|s| **s == 202).count();
    ctx.accepted.fetch_add(accepted as u64, Ordering::Relaxed);
    sent
}

async fn send_request(ctx: &Ctx, req: usize, first: usize, count: usize) -> Sent {
    let key = &ctx.keys[req % ctx.keys.len()];
    let idem = |i: usize| format!("{}-{i}", ctx.run);
    if ctx.batch == 1 {
        let (tipo, dados) = dados(ctx, first);
        let resp = ctx
            .http
            .post(format!("{}/events", ctx.url))
            .header("x-api-key", key)
            .header("idempotency-key", idem(first))
            .json(&json!({"tipo": tipo, "dados": dados}))
            .send()
            .await;
        let Ok(resp) = resp else {
            return Sent {
                statuses: vec![0],
                ids: Vec::new(),
            };
        };
        let status = resp.status().as_u16();
        // Read the whole body either way, so latency covers the full answer.
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let ids = match body["id"].as_str() {
            Some(id) if status == 202 => vec![id.to_owned()],
            _ => Vec::new(),
        };
        return Sent {
            statuses: vec![status],
            ids,
        };
    }
    let items: Vec<Value> = (first..first + count)
        .map(|i| {
            let (tipo, dados) = dados(ctx, i);
            json!({"tipo": tipo, "dados": dados, "idempotency_key": idem(i)})
        })
        .collect();
    let resp = ctx
        .http
        .post(format!("{}/events/batch", ctx.url))
        .header("x-api-key", key)
        .json(&json!({ "events": items }))
        .send()
        .await;
    let Ok(resp) = resp else {
        return Sent {
            statuses: vec![0; count],
            ids: Vec::new(),
        };
    };
    let http_status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let results = body["results"].as_array().filter(|_| http_status / 100 == 2);
    let Some(results) = results else {
        // The whole batch was refused (401, 413, ...) or the answer is unreadable.
        return Sent {
            statuses: vec![http_status; count],
            ids: Vec::new(),
        };
    };
    let mut sent = Sent {
        statuses: Vec::with_capacity(count),
        ids: Vec::with_capacity(count),
    };
    for j in 0..count {
        // Read leniently: an item without a numeric status counts under the HTTP status.
        let result = results.get(j).unwrap_or(&Value::Null);
        let status = result["status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(http_status);
        if status == 202
            && let Some(id) = result["event"]["id"].as_str()
        {
            sent.ids.push(id.to_owned());
        }
        sent.statuses.push(status);
    }
    sent
}

/// Figures gathered while sending.
#[derive(Default)]
struct Totals {
    requests: u64,
    events: u64,
    late: u64,
    /// Per request.
    latencies_ms: Vec<f64>,
    /// Per event.
    by_status: BTreeMap<u16, u64>,
    ids: Vec<String>,
}

impl Totals {
    fn add(&mut self, latency: Duration, late: bool, sent: Sent) {
        let n = sent.statuses.len() as u64;
        self.requests += 1;
        self.events += n;
        if late {
            self.late += n;
        }
        self.latencies_ms.push(latency.as_secs_f64() * 1000.0);
        for s in sent.statuses {
            *self.by_status.entry(s).or_insert(0) += 1;
        }
        self.ids.extend(sent.ids);
    }

    fn merge(&mut self, other: Totals) {
        self.requests += other.requests;
        self.events += other.events;
        self.late += other.late;
        self.latencies_ms.extend(other.latencies_ms);
        for (s, n) in other.by_status {
            *self.by_status.entry(s).or_insert(0) += n;
        }
        self.ids.extend(other.ids);
    }
}

/// The events of request `req`, or None once everything is sent. With a
/// duration, the caller stops on time instead.
fn chunk(req: usize, batch: usize, events: Option<usize>) -> Option<(usize, usize)> {
    let first = req * batch;
    match events {
        None => Some((first, batch)),
        Some(total) if first < total => Some((first, batch.min(total - first))),
        Some(_) => None,
    }
}

/// Closed loop: each worker sends, waits for the answer, sends again.
async fn closed_loop(
    ctx: Arc<Ctx>,
    connections: usize,
    events: Option<usize>,
    until: Option<Instant>,
) -> Totals {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (ctx, next) = (ctx.clone(), next.clone());
            tokio::spawn(async move {
                let mut totals = Totals::default();
                loop {
                    if until.is_some_and(|u| Instant::now() >= u) {
                        break;
                    }
                    let req = next.fetch_add(1, Ordering::Relaxed);
                    let Some((first, count)) = chunk(req, ctx.batch, events) else {
                        break;
                    };
                    let t = Instant::now();
                    let sent = send(&ctx, req, first, count).await;
                    totals.add(t.elapsed(), false, sent);
                }
                totals
            })
        })
        .collect();
    let mut totals = Totals::default();
    for w in futures::future::join_all(workers).await {
        totals.merge(w.expect("closed-loop worker"));
    }
    totals
}

/// Open loop: request `k` is due at `started + k × batch / rate`, whatever the
/// answers so far; at most `connections` are in flight.
async fn open_loop(
    ctx: Arc<Ctx>,
    connections: usize,
    rate: f64,
    events: Option<usize>,
    duration: Option<Duration>,
    started: Instant,
) -> Totals {
    let interval = ctx.batch as f64 / rate;
    let slots = Arc::new(Semaphore::new(connections));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Duration, bool, Sent)>();
    let collector = tokio::spawn(async move {
        let mut totals = Totals::default();
        while let Some((latency, late, sent)) = rx.recv().await {
            totals.add(latency, late, sent);
        }
        totals
    });
    for req in 0.. {
        let offset = Duration::from_secs_f64(req as f64 * interval);
        if duration.is_some_and(|d| offset >= d) {
            break;
        }
        let Some((first, count)) = chunk(req, ctx.batch, events) else {
            break;
        };
        let due = started + offset;
        tokio::time::sleep_until(due).await;
        let (slot, waited) = match slots.clone().try_acquire_owned() {
            Ok(slot) => (slot, false),
            Err(_) => (
                slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
                true,
            ),
        };
        // Also late when an earlier wait (or the generator itself) put us behind.
        let late = waited || Instant::now() > due + LATE_AFTER;
        let (ctx, tx) = (ctx.clone(), tx.clone());
        tokio::spawn(async move {
            let sent = send(&ctx, req, first, count).await;
            let latency = due.elapsed();
            drop(slot);
            // The collector outlives every sender.
            let _ = tx.send((latency, late, sent));
        });
    }
    drop(tx);
    collector.await.expect("open-loop collector")
}

async fn stats_terminal_count(http: &reqwest::Client, args: &Args) -> (u64, u64) {
    let stats: Value = match http
        .get(format!("{}/events/stats", args.url))
        .header("x-api-key", &args.admin_key)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let processed = stats["by_status"]["processed"].as_u64().unwrap_or(0);
    let dead = stats["by_status"]["dead_lettered"].as_u64().unwrap_or(0);
    (processed, dead)
}

/// The server's event counters, read from `GET /metrics`, each summed over
/// its labels.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    /// `events_received_total`: events the server accepted.
    received: u64,
    /// `events_processed_total`.
    processed: u64,
    /// `events_dead_lettered_total`.
    dead_lettered: u64,
    /// `events_purged_total`: events the retention purge removed.
    purged: u64,
}

impl Counters {
    fn completed(&self) -> u64 {
        self.processed + self.dead_lettered
    }

    /// Sums the samples of the counters above in Prometheus text format.
    fn parse(text: &str) -> Self {
        let mut c = Self::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            // `name{labels} value` or `name value`; label values may hold spaces.
            let (name, rest) = match line.find('{') {
                Some(open) => match line.rfind('}') {
                    Some(close) if close > open => (&line[..open], &line[close + 1..]),
                    _ => continue,
                },
                None => match line.split_once(' ') {
                    Some((name, rest)) => (name, rest),
                    None => continue,
                },
            };
            let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            let slot = match name {
                "events_received_total" => &mut c.received,
                "events_processed_total" => &mut c.processed,
                "events_dead_lettered_total" => &mut c.dead_lettered,
                "events_purged_total" => &mut c.purged,
                _ => continue,
            };
            *slot += value as u64;
        }
        c
    }
}

async fn metrics_counters(http: &reqwest::Client, args: &Args) -> Option<Counters> {
    let text = http
        .get(format!("{}/metrics", args.url))
        .header("x-api-key", &args.admin_key)
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    Some(Counters::parse(&text))
}

/// (processed, dead-lettered) as `--count-from` reads them.
async fn terminal_count(http: &reqwest::Client, args: &Args) -> (u64, u64) {
    match args.count_from {
        CountFrom::Stats => stats_terminal_count(http, args).await,
        CountFrom::Metrics => metrics_counters(http, args)
            .await
            .map_or((0, 0), |c| (c.processed, c.dead_lettered)),
    }
}

/// What the `--poll-stats` task saw.
#[derive(Default)]
struct Polls {
    /// Per poll, answered or not.
    latencies_ms: Vec<f64>,
    /// Polls that failed or did not answer 200.
    errors: u64,
}

/// Polls `GET /events/stats` every `every`, one request at a time, until `stop`.
async fn poll_stats(
    http: reqwest::Client,
    url: String,
    admin_key: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Polls {
    let mut polls = Polls::default();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticks.tick() => {}
        }
        let t = Instant::now();
        let ok = match http
            .get(format!("{url}/events/stats"))
            .header("x-api-key", &admin_key)
            .send()
            .await
        {
            // Read the whole body, so latency covers the full answer.
            Ok(r) => r.status() == reqwest::StatusCode::OK && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        polls.latencies_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !ok {
            polls.errors += 1;
        }
    }
    polls.latencies_ms.sort_by(|a, b| a.total_cmp(b));
    polls
}

/// One `--report-every` line.
struct Interval {
    /// Seconds since the start, at the end of the interval.
    at: f64,
    accepted_per_second: f64,
    /// None when /metrics could not be read at either end.
    completed_per_second: Option<f64>,
}

/// Prints a line every `every` until `stop`: accepted/s as answered to this
/// generator, completed/s from the /metrics counters.
async fn report_intervals(
    ctx: Arc<Ctx>,
    args: Arc<Args>,
    started: Instant,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Vec<Interval> {
    let mut out = Vec::new();
    let mut ticks = tokio::time::interval_at(started + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_at = started;
    let mut last_accepted = 0;
    let mut last_completed = metrics_counters(&ctx.http, &args).await.map(|c| c.completed());
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticks.tick() => {}
        }
        let counters = metrics_counters(&ctx.http, &args).await;
        let now = Instant::now();
        let accepted = ctx.accepted.load(Ordering::Relaxed);
        let dt = (now - last_at).as_secs_f64().max(1e-9);
        let completed = counters.map(|c| c.completed());
        let line = Interval {
            at: (now - started).as_secs_f64(),
            accepted_per_second: (accepted - last_accepted) as f64 / dt,
            completed_per_second: match (last_completed, completed) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / dt),
                _ => None,
            },
        };
        let completed_text = line
            .completed_per_second
            .map_or("?".to_owned(), |c| format!("{c:.0}"));
        let purged = counters.map_or("?".to_owned(), |c| c.purged.to_string());
        let text = format!(
            "[{:7.1}s] accepted {:>7.0}/s  completed {:>7}/s  (accepted so far {accepted}, server purged {purged})",
            line.at, line.accepted_per_second, completed_text
        );
        if args.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
        out.push(line);
        (last_at, last_accepted, last_completed) = (now, accepted, completed);
    }
    out
}

/// `processed_at − received_at` in ms for a uniform random sample of `ids`,
/// leaving out events that have no `processed_at`.
async fn end_to_end_sample(http: &reqwest::Client, args: &Args, ids: &[String]) -> Vec<f64> {
    let picked: Vec<String> = {
        let mut rng = rand::rng();
        rand::seq::index::sample(&mut rng, ids.len(), args.sample.min(ids.len()))
            .into_iter()
            .map(|i| ids[i].clone())
            .collect()
    };
    let rfc3339 = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok();
    let mut lat: Vec<f64> = futures::stream::iter(picked)
        .map(|id| async move {
            let event: Value = http
                .get(format!("{}/events/{id}", args.url))
                .header("x-api-key", &args.admin_key)
                .send()
                .await
                .ok()?
                .error_for_status()
                .ok()?
                .json()
                .await
                .ok()?;
            let received = rfc3339(&event["received_at"])?;
            let processed = rfc3339(&event["processed_at"])?;
            let us = processed.signed_duration_since(received).num_microseconds()?;
            Some(us as f64 / 1000.0)
        })
        .buffer_unordered(SAMPLE_CONCURRENCY)
        .filter_map(|l| async move { l })
        .collect()
        .await;
    lat.sort_by(|a, b| a.total_cmp(b));
    lat
}

fn errors_line(errors: &BTreeMap<u16, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(s, n)| match s {
            0 => format!("{n} connection errors"),
            s => format!("{n} × {s}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(args.timeout_secs))
        .build()
        .expect("http client");
    let ctx = Arc::new(Ctx {
        http: http.clone(),
        url: args.url.clone(),
        keys: args.key.clone(),
        run: ulid::Ulid::new().to_string(),
        batch: args.batch,
        types: args.types.clone(),
        products: args.products,
        accepted: AtomicU64::new(0),
    });
    let duration = args.duration.map(Duration::from_secs_f64);
    // A duration replaces the event count.
    let events = if duration.is_some() {
        None
    } else {
        Some(args.events)
    };
    let mode = if args.rate.is_some() { "open" } else { "closed" };

    let (before_processed, before_dead) = terminal_count(&http, &args).await;
    let before_counters = metrics_counters(&http, &args).await;
    // Tells the poller and the reporter that everything is terminal.
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let poller = args.poll_stats.map(|ms| {
        tokio::spawn(poll_stats(
            http.clone(),
            args.url.clone(),
            args.admin_key.clone(),
            Duration::from_millis(ms),
            stopped.clone(),
        ))
    });
    let reporter = args.report_every.map(|secs| {
        tokio::spawn(report_intervals(
            ctx.clone(),
            args.clone(),
            started,
            Duration::from_secs_f64(secs),
            stopped.clone(),
        ))
    });
    let totals = match args.rate {
        Some(rate) => open_loop(ctx.clone(), args.connections, rate, events, duration, started).await,
        None => {
            closed_loop(
                ctx.clone(),
                args.connections,
                events,
                duration.map(|d| started + d),
            )
            .await
        }
    };
    let ingest = started.elapsed();
    let Totals {
        requests,
        events: sent,
        late,
        latencies_ms: mut lat,
        by_status,
        ids,
    } = totals;
    let accepted = by_status.get(&202).copied().unwrap_or(0);
    let errors: BTreeMap<u16, u64> = by_status.into_iter().filter(|(s, _)| *s != 202).collect();
    lat.sort_by(|a, b| a.total_cmp(b));

    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    let (mut processed, mut dead);
    loop {
        let (p, d) = terminal_count(&http, &args).await;
        processed = p.saturating_sub(before_processed);
        dead = d.saturating_sub(before_dead);
        if processed + dead >= accepted || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = started.elapsed();
    // Errors only if the sender is gone, and it is still here.
    let _ = stop.send(true);
    let polls = match poller {
        Some(p) => Some(p.await.expect("stats poller")),
        None => None,
    };
    let intervals = match reporter {
        Some(r) => r.await.expect("interval reporter"),
        None => Vec::new(),
    };
    let purged = match (before_counters, metrics_counters(&http, &args).await) {
        (Some(b), Some(a)) => Some(a.purged.saturating_sub(b.purged)),
        _ => None,
    };
    let lost = accepted.saturating_sub(processed + dead);
    let e2e = end_to_end_sample(&http, &args, &ids).await;

    let per_s = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let poll_report = polls.as_ref().map(|p| {
        let l = &p.latencies_ms;
        json!({
            "every_ms": args.poll_stats,
            "polls": l.len(),
            "errors": p.errors,
            "latency_ms": {"p50": pct(l, 0.5), "p95": pct(l, 0.95), "p99": pct(l, 0.99), "max": pct(l, 1.0)},
        })
    });
    let interval_report: Vec<Value> = intervals
        .iter()
        .map(|i| json!({"at_seconds": i.at, "accepted_per_second": i.accepted_per_second, "completed_per_second": i.completed_per_second}))
        .collect();
    let report = json!({
        "mode": mode,
        "rate": args.rate,
        "duration_seconds": args.duration,
        "events": sent,
        "requests": requests,
        "batch": args.batch,
        "connections": args.connections,
        "partners": args.key.len(),
        "accepted": accepted,
        "errors_by_status": errors,
        "late": late,
        "ingest_seconds": ingest.as_secs_f64(),
        "accepted_per_second": per_s(accepted, ingest),
        "ingest_latency_ms": {"p50": pct(&lat, 0.5), "p95": pct(&lat, 0.95), "p99": pct(&lat, 0.99), "max": pct(&lat, 1.0)},
        "processed": processed,
        "dead_lettered": dead,
        "end_to_end_seconds": total.as_secs_f64(),
        "processed_per_second": per_s(processed + dead, total),
        "lost": lost,
        "end_to_end_latency_ms": {"p50": pct(&e2e, 0.5), "p99": pct(&e2e, 0.99), "max": pct(&e2e, 1.0), "sampled": e2e.len()},
        "count_from": args.count_from.as_str(),
        "purged": purged,
        "poll_stats": poll_report,
        "intervals": interval_report,
    });
    if let Some(path) = &args.json_file
        && let Err(e) = std::fs::write(path, format!("{report}\n"))
    {
        eprintln!("cannot write {}: {e}", path.display());
    }
    if args.json {
        println!("{report}");
        return;
    }
    let how_long = match args.duration {
        Some(d) => format!("for {d} s"),
        None => format!("{} events", args.events),
    };
    match args.rate {
        Some(rate) => println!(
            "mode            open loop, {rate} events/s offered {how_long}, at most {} in flight",
            args.connections
        ),
        None => println!(
            "mode            closed loop, {how_long}, {} connections",
            args.connections
        ),
    }
    println!(
        "sent            {sent} events in {requests} requests (batch {}, {} partner key{})",
        args.batch,
        args.key.len(),
        if args.key.len() == 1 { "" } else { "s" }
    );
    println!(
        "accepted        {accepted} ({:.0}/s over {:.1}s)",
        per_s(accepted, ingest),
        ingest.as_secs_f64()
    );
    if args.rate.is_some() {
        println!("late            {late} events (no free connection, or sent over 10 ms behind schedule)");
    }
    println!(
        "ingest latency  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (per request{})",
        pct(&lat, 0.5),
        pct(&lat, 0.95),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        if args.rate.is_some() {
            ", from the scheduled send"
        } else {
            ""
        }
    );
    println!("errors          {}", errors_line(&errors));
    println!(
        "terminal        {processed} processed, {dead} dead-lettered, {:.0}/s end to end over {:.1}s{}",
        per_s(processed + dead, total),
        total.as_secs_f64(),
        match args.count_from {
            CountFrom::Stats => "",
            CountFrom::Metrics => " (counted from /metrics)",
        }
    );
    println!("lost            {lost}");
    if args.count_from == CountFrom::Metrics || purged.is_some_and(|n| n > 0) {
        println!(
            "purged          {} events by retention during the run (events_purged_total)",
            purged.map_or("?".to_owned(), |n| n.to_string())
        );
    }
    if let Some(p) = &polls {
        let l = &p.latencies_ms;
        println!(
            "stats polls     {} every {} ms, {} errors; latency p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            l.len(),
            args.poll_stats.unwrap_or_default(),
            p.errors,
            pct(l, 0.5),
            pct(l, 0.95),
            pct(l, 0.99),
            pct(l, 1.0)
        );
    }
    if args.sample == 0 {
        println!("end to end      not sampled (--sample 0)");
        return;
    }
    println!(
        "end to end      p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} processed of {} sampled)",
        pct(&e2e, 0.5),
        pct(&e2e, 0.99),
        pct(&e2e, 1.0),
        e2e.len(),
        args.sample.min(ids.len())
    );
}
