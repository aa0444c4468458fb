//! Row codecs: how the store's values sit in columns and come back out.
//!
//! Both schemas store times as BIGINT epoch milliseconds and structured
//! values as JSON TEXT, so one set of codecs serves SQLite and PostgreSQL. A
//! column that does not decode is a [`StoreError::Corrupt`], never a panic.

use std::fmt::Display;

use chrono::{DateTime, TimeZone, Utc};
use engine::StageTrace;
use engine::trace::TraceContext;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::store::{EventRecord, LastError, Partner, Requeue, Status, StoreError, StoreResult};

/// The columns [`event_from_row`] reads, for `SELECT` and `RETURNING`.
pub(super) const EVENT_COLUMNS: &str = "id, partner_id, tipo, dados, meta, pipeline_version, status, attempts, attempt_base, received_at, \
     updated_at, next_attempt_at, processed_at, processing_ms, last_error, last_trace, result, idempotency_key, \
     request_id, waiting_on, waiting_since, traceparent, tracestate, order_key, blocked_by";

pub(super) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(super) fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

/// The smallest event id of the time `ms` (epoch milliseconds): ids are
/// ULIDs made from the time their event was received, so ids sort by it.
pub(super) fn id_floor(ms: i64) -> String {
    ulid::Ulid::from_parts(u64::try_from(ms).unwrap_or(0), 0).to_string()
}

pub(super) fn json_text(v: &Value) -> String {
    v.to_string()
}

/// A JSON column's value; text that does not parse is a corrupt row.
pub(super) fn parse_json<T: DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(corrupt)
}

pub(super) fn corrupt(e: impl Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

pub(super) fn event_from_row(row: &AnyRow) -> StoreResult<EventRecord> {
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
        last_error: last_error.map(|s| parse_json::<LastError>(&s)).transpose()?,
        last_trace: match last_trace {
            Some(s) => parse_json::<Vec<StageTrace>>(&s)?,
            None => Vec::new(),
        },
        result: result.map(|s| parse_json(&s)).transpose()?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_id: row.try_get("request_id")?,
        waiting_on: row.try_get("waiting_on")?,
        waiting_since: opt_ms("waiting_since")?,
        trace: trace_from_row(row)?,
        order_key: row.try_get("order_key")?,
        blocked_by: row.try_get("blocked_by")?,
    })
}

/// The stored trace context; one that no longer parses is dropped (the
/// next attempt starts a new trace) rather than failing the event.
fn trace_from_row(row: &AnyRow) -> StoreResult<Option<TraceContext>> {
    let parent: Option<String> = row.try_get("traceparent")?;
    let state: Option<String> = row.try_get("tracestate")?;
    Ok(parent.and_then(|p| TraceContext::parse(&p, state.as_deref())))
}

/// An event to queue again, from a row with `id, partner_id, tipo, pipeline_version`.
pub(super) fn requeue_from_row(r: &AnyRow) -> StoreResult<Requeue> {
    Ok(Requeue {
        id: r.try_get("id")?,
        partner_id: r.try_get("partner_id")?,
        tipo: r.try_get("tipo")?,
        pipeline_version: r.try_get("pipeline_version")?,
        run_at: None,
    })
}

/// A partner from a row with `id, name, rate_per_minute, burst, disabled_at`.
pub(super) fn partner_from_row(r: &AnyRow) -> StoreResult<Partner> {
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
