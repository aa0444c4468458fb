//! Load generator: posts a mix of the seed event types with unique
//! idempotency keys from N concurrent connections, then waits until every
//! accepted event is terminal and reports ingest and end-to-end figures.
//!
//! ```sh
//! cargo run --release --example loadgen -- --url http://127.0.0.1:3000 --key "$KEY" \
//!     --admin-key "$ADMIN_API_KEY" --events 20000 --connections 32
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Partner API key (repeat for several partners; requests rotate).
    #[arg(long, required = true)]
    key: Vec<String>,
    /// Admin key, to read global stats while waiting for the end.
    #[arg(long)]
    admin_key: String,
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Give up waiting for terminal statuses after this many seconds.
    #[arg(long, default_value_t = 600)]
    wait_secs: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn dados(i: usize) -> (&'static str, Value) {
    match i % 3 {
        0 => (
            "VENDA",
            json!({"produto_id": format!("P-{i}"), "quantidade": 1 + i % 5, "valor": (i % 1000) as f64 * 1.5}),
        ),
        1 => (
            "DEVOLUÇÃO",
            json!({"venda_id": format!("V-{i}"), "motivo": "produto com defeito"}),
        ),
        _ => (
            "ATUALIZAÇÃO_ESTOQUE",
            json!({"produto_id": format!("P-{i}"), "quantidade": i % 50}),
        ),
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn terminal_count(http: &reqwest::Client, args: &Args) -> (u64, u64, Value) {
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
    (processed, dead, stats)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()
        .expect("http client");
    let (before_processed, before_dead, _) = terminal_count(&http, &args).await;
    let run = ulid::Ulid::new().to_string();
    let started = Instant::now();
    let results: Vec<(u16, f64)> = futures::stream::iter(0..args.events)
        .map(|i| {
            let http = http.clone();
            let key = args.key[i % args.key.len()].clone();
            let url = format!("{}/events", args.url);
            let run = run.clone();
            async move {
                let (tipo, dados) = dados(i);
                let t = Instant::now();
                let status = http
                    .post(url)
                    .header("x-api-key", key)
                    .header("idempotency-key", format!("{run}-{i}"))
                    .json(&json!({"tipo": tipo, "dados": dados}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                (status, t.elapsed().as_secs_f64() * 1000.0)
            }
        })
        .buffer_unordered(args.connections)
        .collect()
        .await;
    let ingest = started.elapsed();
    let accepted = results.iter().filter(|(s, _)| *s == 202).count() as u64;
    let mut errors = std::collections::BTreeMap::new();
    for (s, _) in &results {
        if *s != 202 {
            *errors.entry(*s).or_insert(0u64) += 1;
        }
    }
    let mut lat: Vec<f64> = results.iter().map(|(_, l)| *l).collect();
    lat.sort_by(|a, b| a.total_cmp(b));

    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    let (mut processed, mut dead);
    loop {
        let (p, d, _) = terminal_count(&http, &args).await;
        processed = p - before_processed;
        dead = d - before_dead;
        if processed + dead >= accepted || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = started.elapsed();
    let lost = accepted.saturating_sub(processed + dead);
    let report = json!({
        "events": args.events,
        "connections": args.connections,
        "accepted": accepted,
        "errors_by_status": errors,
        "ingest_seconds": ingest.as_secs_f64(),
        "accepted_per_second": accepted as f64 / ingest.as_secs_f64(),
        "ingest_latency_ms": {"p50": pct(&lat, 0.5), "p95": pct(&lat, 0.95), "p99": pct(&lat, 0.99), "max": pct(&lat, 1.0)},
        "processed": processed,
        "dead_lettered": dead,
        "end_to_end_seconds": total.as_secs_f64(),
        "processed_per_second": (processed + dead) as f64 / total.as_secs_f64(),
        "lost": lost,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "accepted        {accepted} of {} ({:.0}/s over {:.1}s)",
            args.events,
            report["accepted_per_second"].as_f64().unwrap_or(0.0),
            ingest.as_secs_f64()
        );
        println!(
            "ingest latency  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.95),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
        println!("errors          {errors:?}");
        println!(
            "terminal        {processed} processed, {dead} dead-lettered, {:.0}/s end to end over {:.1}s",
            report["processed_per_second"].as_f64().unwrap_or(0.0),
            total.as_secs_f64()
        );
        println!("lost            {lost}");
    }
}
