//! Response bodies built from store rows: the serializable counterparts of
//! what the store returns, so that the HTTP face of a row (field names, what
//! is shown, its OpenAPI schema) can change without touching storage, and
//! the other way round. Store rows derive neither `Serialize` for HTTP nor
//! `ToSchema`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::store::{ApiKeyInfo, DeliveryRow, LastError, PartnerInfo, Percentiles, Stats, Status};

/// The last failure of an event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = LastError)]
pub struct ErrorOut {
    /// Stable machine category: `delivery`, `rejected`, `script`,
    /// `script_budget`, `validation`, `timeout`, `attempts_exhausted`, …
    pub category: String,
    pub message: String,
    /// Whether a later attempt may succeed.
    pub transient: bool,
    /// Stage that failed, when a stage did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

impl From<LastError> for ErrorOut {
    fn from(e: LastError) -> Self {
        Self {
            category: e.category,
            message: e.message,
            transient: e.transient,
            stage: e.stage,
        }
    }
}

/// A destination that answered 2xx for the event.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = DeliveryRow)]
pub struct DeliveryOut {
    pub destination: String,
    pub delivered_at: DateTime<Utc>,
    pub status_code: Option<u16>,
}

impl From<DeliveryRow> for DeliveryOut {
    fn from(d: DeliveryRow) -> Self {
        Self {
            destination: d.destination,
            delivered_at: d.delivered_at,
            status_code: d.status_code,
        }
    }
}

/// One API key of a partner, as listed (the key itself is never stored).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = ApiKeyInfo)]
pub struct KeyOut {
    /// Stable key id (the first 16 hex characters of the key's SHA-256).
    pub id: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyInfo> for KeyOut {
    fn from(k: ApiKeyInfo) -> Self {
        Self {
            id: k.id,
            prefix: k.prefix,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A partner with its keys, for operators.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = PartnerInfo)]
pub struct PartnerOut {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub disabled: bool,
    /// Whether `POST /auth/login` works for this partner.
    pub has_password: bool,
    /// Requests per minute; `null` = the server default.
    pub rate_per_minute: Option<u32>,
    /// Burst size; `null` = the server default.
    pub burst: Option<u32>,
    /// Share of each type's workers when several partners have work waiting (1 = equal).
    pub weight: u32,
    pub keys: Vec<KeyOut>,
}

impl From<PartnerInfo> for PartnerOut {
    fn from(p: PartnerInfo) -> Self {
        Self {
            id: p.id,
            name: p.name,
            created_at: p.created_at,
            disabled: p.disabled,
            has_password: p.has_password,
            rate_per_minute: p.rate_per_minute,
            burst: p.burst,
            weight: p.weight,
            keys: p.keys.into_iter().map(KeyOut::from).collect(),
        }
    }
}

/// Milliseconds from received to processed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Percentiles)]
pub struct PercentilesOut {
    pub p50: Option<i64>,
    pub p95: Option<i64>,
    pub p99: Option<i64>,
}

impl From<Percentiles> for PercentilesOut {
    fn from(p: Percentiles) -> Self {
        Self {
            p50: p.p50,
            p95: p.p95,
            p99: p.p99,
        }
    }
}

/// `GET /events/stats`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Stats)]
pub struct StatsOut {
    pub total: i64,
    /// Every status, in lifecycle order, with 0 for the ones no event has.
    #[schema(value_type = BTreeMap<String, i64>)]
    pub by_status: serde_json::Map<String, serde_json::Value>,
    pub by_type: BTreeMap<String, i64>,
    /// Received → processed, over processed events, in milliseconds:
    /// estimated from fixed buckets (5 ms … 1 h), by linear interpolation
    /// inside the bucket that holds the percentile.
    pub processing_ms: PercentilesOut,
}

impl From<Stats> for StatsOut {
    fn from(s: Stats) -> Self {
        // `serde_json::Map` keeps insertion order (`preserve_order`):
        // received, processing, retrying, processed, dead_lettered.
        let mut by_status: serde_json::Map<String, serde_json::Value> = Status::ALL
            .iter()
            .map(|st| (st.as_str().to_owned(), 0.into()))
            .collect();
        for (k, v) in s.by_status {
            by_status.insert(k, v.into());
        }
        Self {
            total: s.total,
            by_status,
            by_type: s.by_type,
            processing_ms: s.processing_ms.into(),
        }
    }
}
