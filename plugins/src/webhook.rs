//! One webhook call: Standard Webhooks signing and outcome classification.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How a webhook call ended (reported as an [`engine::DeliveryOutcome`] by
/// the `deliver` stage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    Delivered(u16),
    /// Worth retrying: timeout, connection error, 408, 429, 5xx.
    Transient {
        status: Option<u16>,
        error: String,
        /// `Retry-After` of a `429` or `503`.
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: other 4xx, 3xx, bad configuration.
    Permanent {
        status: Option<u16>,
        error: String,
    },
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` as Standard Webhooks
/// specifies; a `whsec_` secret is base64 after the prefix, any other secret
/// is used as raw bytes.
pub fn sign_payload(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|b64| STANDARD.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec());
    let mut mac = match Hmac::<Sha256>::new_from_slice(&key) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this arm is unreachable in practice.
        Err(_) => return String::new(),
    };
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

pub(crate) struct WebhookCall<'a> {
    pub url: &'a str,
    pub timeout: Duration,
    pub secret: Option<&'a str>,
    pub headers: &'a [(String, String)],
    pub event_id: &'a str,
    /// W3C trace context the call carries (`traceparent`, `tracestate`).
    pub trace: Option<engine::trace::TraceContext>,
    pub body: bytes::Bytes,
}

pub(crate) async fn call(http: &reqwest::Client, c: WebhookCall<'_>) -> WebhookOutcome {
    let mut req = http
        .post(c.url)
        .timeout(c.timeout)
        .header("content-type", "application/json")
        .header("idempotency-key", c.event_id);
    for (k, v) in c.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if let Some(trace) = &c.trace {
        // Replacing, not adding to, a `traceparent` the destination's
        // headers may name: two would make the receiver drop both.
        let mut h = reqwest::header::HeaderMap::new();
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = reqwest::header::HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        put("traceparent", &trace.traceparent());
        if let Some(state) = &trace.state {
            put("tracestate", state);
        }
        req = req.headers(h);
    }
    if let Some(secret) = c.secret {
        let ts = chrono::Utc::now().timestamp();
        req = req
            .header("webhook-id", c.event_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sign_payload(secret, c.event_id, ts, &c.body));
    }
    match req.body(c.body).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = match status {
                429 | 503 => resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, std::time::SystemTime::now())),
                _ => None,
            };
            // Drain a little of the body so the connection can be reused.
            let _ = tokio::time::timeout(Duration::from_millis(200), resp.bytes()).await;
            match classify(status) {
                WebhookOutcome::Transient { status, error, .. } => WebhookOutcome::Transient {
                    status,
                    error,
                    retry_after,
                },
                other => other,
            }
        }
        // Without the URL: it may hold a token, and this text is stored,
        // shown and exported.
        Err(e) if e.is_builder() => WebhookOutcome::Permanent {
            status: None,
            error: format!("invalid request: {}", e.without_url()),
        },
        Err(e) => {
            let what = if e.is_timeout() {
                format!("timed out after {:?}", c.timeout)
            } else if e.is_connect() {
                "connection failed".to_owned()
            } else {
                "request failed".to_owned()
            };
            WebhookOutcome::Transient {
                status: None,
                error: format!("{what}: {}", root_cause(&e)),
                retry_after: None,
            }
        }
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

pub(crate) fn classify(status: u16) -> WebhookOutcome {
    match status {
        200..=299 => WebhookOutcome::Delivered(status),
        408 | 429 | 500..=599 => WebhookOutcome::Transient {
            status: Some(status),
            error: format!("destination answered HTTP {status}"),
            retry_after: None,
        },
        _ => WebhookOutcome::Permanent {
            status: Some(status),
            error: format!("destination answered HTTP {status}"),
        },
    }
}

/// A `Retry-After` value (RFC 9110): delay-seconds or an HTTP date; how
/// long from `now`. A date in the past is no wait; garbage is ignored.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2026 07:28:00 GMT").expect("date");
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn classification() {
        assert_eq!(classify(204), WebhookOutcome::Delivered(204));
        assert!(matches!(classify(408), WebhookOutcome::Transient { .. }));
        assert!(matches!(classify(429), WebhookOutcome::Transient { .. }));
        assert!(matches!(classify(503), WebhookOutcome::Transient { .. }));
        assert!(matches!(classify(400), WebhookOutcome::Permanent { .. }));
        assert!(matches!(classify(404), WebhookOutcome::Permanent { .. }));
        assert!(matches!(classify(301), WebhookOutcome::Permanent { .. }));
    }

    #[test]
    fn standard_webhooks_reference_signature() {
        // The example from the Standard Webhooks specification.
        let sig = sign_payload(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
