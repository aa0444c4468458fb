//! Rate limits: per client IP (tower_governor, before anything else) and per
//! partner (checked once the caller is known, with the partner's own quota
//! when one is stored).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use governor::DefaultKeyedRateLimiter;
use governor::clock::{Clock, DefaultClock, QuantaInstant};
use governor::middleware::NoOpMiddleware;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use super::error::ApiError;
use crate::config::Config;
use crate::store::Partner;
use crate::telemetry::Metrics;

/// The client's address: the TCP peer, unless the peer is one of
/// `TRUSTED_PROXIES`; then the right-most `X-Forwarded-For` entry that is not
/// itself a trusted proxy (entries left of it are the client's to forge).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            // Garbage in the chain: trust nothing left of it.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// `203.0.113.7`, `2001:db8::1`, `[2001:db8::1]:443` or `203.0.113.7:5000`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// The client IP of a request that came through axum with `ConnectInfo`.
pub fn request_client_ip<T>(req: &axum::http::Request<T>, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())?;
    Some(client_ip(peer, req.headers(), trusted))
}

/// tower_governor key: [`client_ip`].
#[derive(Debug, Clone)]
pub struct ClientIpKeyExtractor {
    trusted: Arc<[IpNet]>,
}

impl KeyExtractor for ClientIpKeyExtractor {
    type Key = IpAddr;

    fn extract<T>(&self, req: &axum::http::Request<T>) -> Result<IpAddr, GovernorError> {
        request_client_ip(req, &self.trusted).ok_or(GovernorError::UnableToExtractKey)
    }
}

/// The per-client-IP layer (tower_governor): `RATE_LIMIT_IP_PER_MINUTE`, all
/// of it usable at once, keyed by [`client_ip`]; 429s are problem+json.
pub fn ip_layer(
    config: &Config,
    metrics: Arc<Metrics>,
) -> GovernorLayer<ClientIpKeyExtractor, NoOpMiddleware<QuantaInstant>, Body> {
    let per_minute = config.rate_limit_ip_per_minute.max(1);
    let period = Duration::from_secs(60) / per_minute;
    let extractor = ClientIpKeyExtractor {
        trusted: config.trusted_proxies.clone().into(),
    };
    let governor = GovernorConfigBuilder::default()
        .period(period.max(Duration::from_nanos(1)))
        .burst_size(per_minute)
        .key_extractor(extractor.clone())
        .finish()
        .or_else(|| GovernorConfigBuilder::default().key_extractor(extractor).finish())
        .expect("tower_governor's default configuration is valid");
    let layer = GovernorLayer::new(governor);
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

/// A partner's budget after a decision, sent back as `RateLimit-Limit`,
/// `RateLimit-Remaining` and `RateLimit-Reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Events per minute.
    pub limit: u32,
    /// Events that could be sent right now.
    pub remaining: u32,
    /// Until the burst is whole again.
    pub reset: Duration,
}

/// Where the partner check leaves the budget for the response headers:
/// [`budget_headers`] puts one in each request and writes it out.
#[derive(Clone, Default)]
pub struct BudgetSlot(Arc<Mutex<Option<Budget>>>);

impl BudgetSlot {
    pub fn set(&self, budget: Budget) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(budget);
        }
    }

    fn get(&self) -> Option<Budget> {
        self.0.lock().ok().and_then(|slot| *slot)
    }
}

/// A wait in whole seconds, rounded up, at least 1 (`Retry-After`,
/// `RateLimit-Reset`).
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Adds the partner's `RateLimit-*` headers to every response of a request
/// the partner check let through (a `429` already has its own).
pub async fn budget_headers(mut req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let slot = BudgetSlot::default();
    req.extensions_mut().insert(slot.clone());
    let mut resp = next.run(req).await;
    if let Some(b) = slot.get()
        && !resp.headers().contains_key("ratelimit-limit")
    {
        let reset = if b.reset.is_zero() {
            0
        } else {
            whole_seconds(b.reset)
        };
        let h = resp.headers_mut();
        for (name, value) in [
            ("ratelimit-limit", b.limit.to_string()),
            ("ratelimit-remaining", b.remaining.to_string()),
            ("ratelimit-reset", reset.to_string()),
        ] {
            if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
    }
    resp
}

type PartnerLimiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::StateInformationMiddleware,
>;

/// One token bucket per partner and quota; each event sent costs a token
/// (a request that sends none, one).
#[derive(Default)]
pub struct PartnerLimits {
    buckets: Mutex<HashMap<(String, u32, u32), Arc<PartnerLimiter>>>,
}

/// What [`PartnerLimits::take`] granted.
#[derive(Debug)]
pub struct Taken {
    /// Tokens granted, from the first asked for.
    pub granted: usize,
    /// The budget after them.
    pub budget: Option<Budget>,
    /// When not all were granted: how long until the next token.
    pub retry_after: Option<Duration>,
    limit: u32,
}

impl Taken {
    /// The refusal each token not granted answers with.
    pub fn refusal(&self) -> Option<ApiError> {
        self.retry_after.map(|retry_after| ApiError::RateLimited {
            retry_after,
            limit: self.limit,
        })
    }
}

impl PartnerLimits {
    fn limiter(&self, partner: &Partner, config: &Config) -> Option<(Arc<PartnerLimiter>, u32)> {
        let per_minute = partner
            .rate_per_minute
            .unwrap_or(config.rate_limit_partner_per_minute)
            .max(1);
        let burst = partner.burst.unwrap_or(config.rate_limit_partner_burst).max(1);
        let mut buckets = self.buckets.lock().ok()?;
        let limiter = buckets
            .entry((partner.id.clone(), per_minute, burst))
            .or_insert_with(|| {
                let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                Arc::new(
                    RateLimiter::direct(quota)
                        .with_middleware::<governor::middleware::StateInformationMiddleware>(),
                )
            })
            .clone();
        Some((limiter, per_minute))
    }

    /// One token, the request's: the budget after it, or the error to return
    /// when the partner is over its limit.
    pub fn check(&self, partner: &Partner, config: &Config) -> Result<Option<Budget>, ApiError> {
        let taken = self.take(partner, config, 1);
        match taken.refusal() {
            Some(e) => Err(e),
            None => Ok(taken.budget),
        }
    }

    /// Up to `n` tokens, one at a time, stopping at the first refused (the
    /// bucket refills evenly, so the rest would be refused too).
    pub fn take(&self, partner: &Partner, config: &Config, n: usize) -> Taken {
        let Some((limiter, per_minute)) = self.limiter(partner, config) else {
            // A poisoned lock must not lock partners out.
            return Taken {
                granted: n,
                budget: None,
                retry_after: None,
                limit: 0,
            };
        };
        let mut taken = Taken {
            granted: 0,
            budget: None,
            retry_after: None,
            limit: per_minute,
        };
        while taken.granted < n {
            match limiter.check() {
                Ok(snapshot) => {
                    taken.granted += 1;
                    let remaining = snapshot.remaining_burst_capacity();
                    let burst = snapshot.quota().burst_size().get();
                    let interval = snapshot.quota().replenish_interval();
                    taken.budget = Some(Budget {
                        limit: per_minute,
                        remaining,
                        reset: interval * (burst - remaining),
                    });
                }
                Err(not_until) => {
                    let retry_after = not_until.wait_time_from(DefaultClock::default().now());
                    taken.budget = Some(Budget {
                        limit: per_minute,
                        remaining: 0,
                        reset: retry_after,
                    });
                    taken.retry_after = Some(retry_after);
                    break;
                }
            }
        }
        taken
    }
}

/// `POST /auth/login` attempts, per username and per client IP, so
/// passwords cannot be guessed at speed (argon2 makes each guess slow; this
/// makes them few).
pub struct LoginLimits {
    per_user: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    per_user_minute: u32,
    per_ip_minute: u32,
    calls: std::sync::atomic::AtomicU64,
}

impl LoginLimits {
    pub fn new(config: &Config) -> Self {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_user: RateLimiter::keyed(quota(config.login_per_user_per_minute)),
            per_ip: RateLimiter::keyed(quota(config.login_per_ip_per_minute)),
            per_user_minute: config.login_per_user_per_minute.max(1),
            per_ip_minute: config.login_per_ip_per_minute.max(1),
            calls: Default::default(),
        }
    }

    /// Takes one attempt from the IP's and the username's allowance.
    pub fn check(&self, username: &str, ip: Option<IpAddr>) -> Result<(), ApiError> {
        // Forget idle keys now and then, so random usernames cannot grow the maps.
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1024 == 1023 {
            self.per_user.retain_recent();
            self.per_ip.retain_recent();
        }
        let now = DefaultClock::default().now();
        if let Some(ip) = ip {
            self.per_ip.check_key(&ip).map_err(|n| ApiError::RateLimited {
                retry_after: n.wait_time_from(now),
                limit: self.per_ip_minute,
            })?;
        }
        self.per_user
            .check_key(&username.to_owned())
            .map_err(|n| ApiError::RateLimited {
                retry_after: n.wait_time_from(now),
                limit: self.per_user_minute,
            })
    }
}

/// Adds `Retry-After` and `RateLimit-*` headers to a 429.
pub fn rate_limit_headers(resp: &mut Response, retry_after: Duration, limit: u32) {
    let secs = whole_seconds(retry_after).to_string();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().expect("header"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn client_ip_trusts_forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().expect("net"),
            "127.0.0.1/32".parse().expect("net"),
        ];
        // Not from a proxy: the header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &headers(&["203.0.113.9"]), &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &headers(&["203.0.113.9"]), &[]),
            ip("10.0.0.2")
        );
        // From a proxy: the right-most untrusted hop.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &headers(&["1.1.1.1, 203.0.113.9, 10.9.9.9"]),
                &trusted
            ),
            ip("203.0.113.9")
        );
        // Several header lines count as one list, in order.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &headers(&["1.1.1.1", "203.0.113.9"]), &trusted),
            ip("203.0.113.9")
        );
        // Ports and IPv6.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &headers(&["203.0.113.9:5555"]), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("127.0.0.1"), &headers(&["[2001:db8::1]:443"]), &trusted),
            ip("2001:db8::1")
        );
        // Garbage stops the walk at the last good hop.
        assert_eq!(
            client_ip(
                ip("127.0.0.1"),
                &headers(&["203.0.113.9, nonsense, 10.1.1.1"]),
                &trusted
            ),
            ip("10.1.1.1")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &HeaderMap::new(), &trusted),
            ip("127.0.0.1")
        );
    }
}
