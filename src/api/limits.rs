//! Rate limits: per client IP (tower_governor, before anything else) and per
//! partner (checked once the caller is known, with the partner's own quota
//! when one is stored).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock, QuantaInstant};
use governor::middleware::NoOpMiddleware;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::PeerIpKeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use super::error::ApiError;
use crate::config::Config;
use crate::store::Partner;
use crate::telemetry::Metrics;

/// The per-client-IP layer (tower_governor): `RATE_LIMIT_IP_PER_MINUTE`, all
/// of it usable at once, keyed by the TCP peer address; 429s are problem+json.
pub fn ip_layer(
    config: &Config,
    metrics: Arc<Metrics>,
) -> GovernorLayer<PeerIpKeyExtractor, NoOpMiddleware<QuantaInstant>, Body> {
    let per_minute = config.rate_limit_ip_per_minute.max(1);
    let period = Duration::from_secs(60) / per_minute;
    let governor = GovernorConfigBuilder::default()
        .period(period.max(Duration::from_nanos(1)))
        .burst_size(per_minute)
        .key_extractor(PeerIpKeyExtractor)
        .finish();
    let layer = match governor {
        Some(g) => GovernorLayer::new(g),
        None => GovernorLayer::new(GovernorConfig::default()),
    };
    layer.error_handler(move |e| {
        let retry_after = match e {
            GovernorError::TooManyRequests { wait_time, .. } => Duration::from_secs(wait_time.max(1)),
            _ => Duration::from_secs(1),
        };
        metrics.rate_limited.with_label_values(&["ip"]).inc();
        ApiError::RateLimited {
            retry_after,
            limit: per_minute,
        }
        .into_response()
    })
}

/// One token bucket per partner and quota.
#[derive(Default)]
pub struct PartnerLimits {
    buckets: Mutex<HashMap<(String, u32, u32), Arc<DefaultDirectRateLimiter>>>,
}

impl PartnerLimits {
    /// `Err` with the error to return when the partner is over its limit.
    pub fn check(&self, partner: &Partner, config: &Config) -> Result<(), ApiError> {
        let per_minute = partner
            .rate_per_minute
            .unwrap_or(config.rate_limit_partner_per_minute)
            .max(1);
        let burst = partner.burst.unwrap_or(config.rate_limit_partner_burst).max(1);
        let limiter = {
            let Ok(mut buckets) = self.buckets.lock() else {
                return Ok(());
            };
            buckets
                .entry((partner.id.clone(), per_minute, burst))
                .or_insert_with(|| {
                    let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN))
                        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                    Arc::new(RateLimiter::direct(quota))
                })
                .clone()
        };
        limiter.check().map_err(|not_until| ApiError::RateLimited {
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            limit: per_minute,
        })
    }
}

/// Adds `Retry-After` and `RateLimit-*` headers to a 429.
pub fn rate_limit_headers(resp: &mut Response, retry_after: Duration, limit: u32) {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let secs = secs.max(1).to_string();
    let h = resp.headers_mut();
    for (name, value) in [
        ("retry-after", secs.clone()),
        ("ratelimit-limit", limit.to_string()),
        ("ratelimit-remaining", "0".to_owned()),
        ("ratelimit-reset", secs),
    ] {
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}
