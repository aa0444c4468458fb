//! A webhook receiver to watch deliveries locally, verifying Standard Webhooks
//! signatures when `WEBHOOK_SECRET` is set.
//!
//! ```sh
//! WEBHOOK_SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw cargo run --example webhook_receiver   # listens on :9000
//! ERP_WEBHOOK_URL=http://127.0.0.1:9000/erp ERP_WEBHOOK_SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw cargo run --release
//! ```
//!
//! `FAIL_WITH=503` makes it answer that status instead, to watch retries and dead letters.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("RECEIVER_ADDR").unwrap_or_else(|_| "127.0.0.1:9000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("webhook receiver on http://{addr}");
    axum::serve(listener, axum::Router::new().fallback(receive)).await
}

async fn receive(uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let signature = match std::env::var("WEBHOOK_SECRET") {
        Ok(secret) if !secret.is_empty() => {
            let ts: i64 = header("webhook-timestamp").parse().unwrap_or(0);
            let expected = plugins::sign_payload(&secret, header("webhook-id"), ts, &body);
            if header("webhook-signature").split(' ').any(|s| s == expected) {
                "valid signature"
            } else {
                "INVALID signature"
            }
        }
        _ => "signature not checked",
    };
    println!(
        "{} idempotency-key={} ({signature}) {}",
        uri.path(),
        header("idempotency-key"),
        String::from_utf8_lossy(&body)
    );
    match std::env::var("FAIL_WITH")
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
    {
        Some(code) => StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        None => StatusCode::OK,
    }
}
