//! The destination gate shared by every worker process: each destination's
//! state in Redis, changed only by `gate.lua`, which runs
//! [`engine::gate::DestState`]'s transitions atomically (one script call per
//! admission and one per release; Redis runs scripts one at a time, so two
//! processes never both take the last slot or the one probe).
//!
//! Keys, under the service's `REDIS_PREFIX`:
//! `{prefix}:dest:{len(tipo)}:{tipo}:{destination}` (a hash),
//! `…:slots` (a sorted set) and `…:m:{minute}` (counters kept six minutes).
//! Times come from the callers' clocks (epoch milliseconds), as the
//! in-process gate's do: processes on one host, or hosts kept in step by
//! NTP, agree within milliseconds, which shifts the rate limit's spacing by
//! as much and no more.

use std::time::Duration;

use async_trait::async_trait;
use engine::DeliveryLimits;
use engine::gate::{
    Admission, CallResult, CircuitState, DestinationGate, GateKey, GateStatus, LEASE_MARGIN_MS, Permit,
    Transition, WaitReason, interval_ms,
};
use redis::Value;
use redis::aio::ConnectionManager;

const GATE: &str = include_str!("gate.lua");

pub struct RedisGate {
    conn: ConnectionManager,
    prefix: String,
    script: redis::Script,
}

fn err(e: redis::RedisError) -> String {
    format!("Redis: {e}")
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        Value::SimpleString(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

impl RedisGate {
    pub async fn connect(
        client: &redis::Client,
        prefix: &str,
    ) -> Result<Self, crate::redis_conn::ConnectError> {
        let timeouts = crate::redis_conn::Timeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(2),
            max_retry_delay: Duration::from_secs(2),
        };
        let conn = crate::redis_conn::manager(client, timeouts).await?;
        Ok(Self {
            conn,
            prefix: prefix.trim_end_matches(':').to_owned(),
            script: redis::Script::new(GATE),
        })
    }

    fn base(&self, k: GateKey<'_>) -> String {
        format!(
            "{}:dest:{}:{}:{}",
            self.prefix,
            k.tipo.len(),
            k.tipo,
            k.destination
        )
    }

    /// The state, the slots and the counters of the given minutes.
    fn keys(&self, k: GateKey<'_>, minutes: impl Iterator<Item = i64>) -> Vec<String> {
        let base = self.base(k);
        let mut keys = vec![base.clone(), format!("{base}:slots")];
        keys.extend(minutes.map(|m| format!("{base}:m:{m}")));
        keys
    }

    async fn run(&self, keys: Vec<String>, args: Vec<String>) -> Result<Value, String> {
        let mut inv = self.script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async::<Value>(&mut conn).await.map_err(err)
    }
}

fn minute(now_ms: i64) -> i64 {
    now_ms.div_euclid(60_000)
}

#[async_trait]
impl DestinationGate for RedisGate {
    async fn admit(
        &self,
        key: GateKey<'_>,
        limits: &DeliveryLimits,
        now_ms: i64,
        max_reserve_ms: i64,
    ) -> Result<Admission, String> {
        let slot = ulid::Ulid::new().to_string();
        let lease = limits.timeout.as_millis() as i64 + LEASE_MARGIN_MS;
        let args = vec![
            "admit".to_owned(),
            now_ms.to_string(),
            slot.clone(),
            lease.to_string(),
            limits.max_in_flight.to_string(),
            interval_ms(limits).unwrap_or(0).to_string(),
            max_reserve_ms.to_string(),
        ];
        let reply = items(self.run(self.keys(key, std::iter::empty()), args).await?);
        match reply.first().map(text).as_deref() {
            Some("go") => Ok(Admission::Go(Permit {
                slot,
                start_at_ms: reply.get(1).map(int).unwrap_or(now_ms),
                probe: reply.get(2).map(int) == Some(1),
            })),
            Some("wait") => Ok(Admission::Wait {
                until_ms: reply.get(1).map(int).unwrap_or(now_ms),
                reason: match reply.get(2).map(text).as_deref() {
                    Some("destination_unavailable") => WaitReason::DestinationUnavailable,
                    _ => WaitReason::Throttled,
                },
                why: reply.get(3).map(text).unwrap_or_default(),
            }),
            other => Err(format!("unexpected gate reply {other:?}")),
        }
    }

    async fn release(
        &self,
        key: GateKey<'_>,
        limits: &DeliveryLimits,
        permit: &Permit,
        result: CallResult,
        now_ms: i64,
    ) -> Result<Option<Transition>, String> {
        let (outcome, retry_after) = match result {
            CallResult::Succeeded => ("succeeded", -1),
            CallResult::Refused => ("refused", -1),
            CallResult::Failed { retry_after_ms } => ("failed", retry_after_ms.unwrap_or(-1)),
        };
        let cb = &limits.circuit_breaker;
        let args = vec![
            "release".to_owned(),
            now_ms.to_string(),
            permit.slot.clone(),
            if permit.probe { "1" } else { "0" }.to_owned(),
            outcome.to_owned(),
            retry_after.to_string(),
            cb.failure_threshold.to_string(),
            cb.open_for.as_millis().to_string(),
            cb.max_open.as_millis().to_string(),
        ];
        let keys = self.keys(key, std::iter::once(minute(now_ms)));
        let reply = items(self.run(keys, args).await?);
        Ok(match reply.first().map(text).as_deref() {
            Some("closed") => Some(Transition::Closed),
            Some("reopened") => Some(Transition::Reopened {
                until_ms: reply.get(1).map(int).unwrap_or(now_ms),
            }),
            Some("opened") => Some(Transition::Opened {
                until_ms: reply.get(1).map(int).unwrap_or(now_ms),
                failures: reply.get(2).map(int).unwrap_or(0) as u32,
            }),
            _ => None,
        })
    }

    async fn status(&self, key: GateKey<'_>, now_ms: i64) -> Result<GateStatus, String> {
        let m = minute(now_ms);
        let keys = self.keys(key, (m - 4)..=m);
        let reply = items(self.run(keys, vec!["status".into(), now_ms.to_string()]).await?);
        let at = |i: usize| reply.get(i).map(int).unwrap_or(0);
        let state = CircuitState::parse(&reply.first().map(text).unwrap_or_default());
        Ok(GateStatus {
            state,
            consecutive_failures: at(1) as u32,
            open_until_ms: (state == CircuitState::Open).then_some(at(2)),
            probe_until_ms: (state == CircuitState::HalfOpen).then_some(at(3)),
            throttled_until_ms: (at(4) > now_ms).then_some(at(4)),
            in_flight: at(5) as u32,
            calls_5m: at(6) as u64,
            failures_5m: at(7) as u64,
        })
    }

    async fn reset(&self, key: GateKey<'_>) -> Result<(), String> {
        let now = chrono::Utc::now().timestamp_millis();
        self.run(
            self.keys(key, std::iter::empty()),
            vec!["reset".into(), now.to_string()],
        )
        .await
        .map(|_| ())
    }
}
