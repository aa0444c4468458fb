//! Retention: terminal events older than their retention go, with what they
//! own, in bounded chunks, off the request path, by one process of a
//! cluster at a time (a lease in the store). The purge loop runs in every
//! process that runs workers; `orchestrator purge` runs one pass now.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Retention;
use crate::store::{Expiry, Purged, Store, StoreError};
use crate::telemetry::Metrics;

/// The lease's task name in the store.
pub const TASK: &str = "purge";

/// Events removed per transaction: a chunk holds the (SQLite) writer for a
/// few milliseconds, so ingest and workers go on between chunks.
const CHUNK: u32 = 500;

/// A pass that has not finished within this long lets another process take
/// over (the holder renews the lease at every chunk).
const LEASE: Duration = Duration::from_secs(60);

/// What one pass did, as the store keeps it and the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PurgeReport {
    /// The pass that ran it (host:pid:ulid).
    pub holder: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Events removed, by status.
    pub removed: Purged,
    /// Why the pass stopped early, if it did (the rest goes next pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the process that ran it runs the next pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("another process is purging ({holder}, lease until {until})")]
    Busy { holder: String, until: DateTime<Utc> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The instants before which terminal events have expired, at `now`.
pub fn expiry(retention: &Retention, now: DateTime<Utc>) -> Expiry {
    let back = |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    Expiry {
        processed_before: back(retention.processed),
        dead_lettered_before: back(retention.dead_lettered),
    }
}

/// Runs purges against one store.
pub struct Purger {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub retention: Retention,
    pub interval: Duration,
    /// PostgreSQL partitions' time range.
    pub partition_period: Duration,
    /// This process (host:pid); each pass holds the lease as
    /// `host:pid:<ulid>`.
    pub holder: String,
}

impl Purger {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, config: &crate::config::Config) -> Self {
        let holder = format!("{}:{}", crate::queue::host_name(), std::process::id());
        Self {
            store,
            metrics,
            retention: config.retention,
            interval: config.purge_interval,
            partition_period: config.partition_period,
            holder,
        }
    }

    /// What a pass would remove now.
    pub async fn dry_run(&self) -> Result<Purged, StoreError> {
        self.store
            .count_expired(&expiry(&self.retention, Utc::now()))
            .await
    }

    /// One pass: takes the lease, removes every expired event a chunk at a
    /// time, compacts, and keeps the report.
    pub async fn run_once(&self) -> Result<PurgeReport, PurgeError> {
        let started_at = Utc::now();
        // One holder per pass, so two passes of one process (the loop and an
        // admin call) exclude each other too.
        let holder = format!("{}:{}", self.holder, ulid::Ulid::new());
        let lease_until = |now: DateTime<Utc>| now + chrono::Duration::from_std(LEASE).unwrap_or_default();
        if !self
            .store
            .take_lease(TASK, &holder, started_at, lease_until(started_at))
            .await?
        {
            let state = self.store.task_state(TASK).await?;
            return Err(PurgeError::Busy {
                holder: state.as_ref().and_then(|s| s.holder.clone()).unwrap_or_default(),
                until: state.map(|s| s.lease_until).unwrap_or(started_at),
            });
        }
        // One cut-off for the whole pass: what expires meanwhile goes next time.
        let cut = expiry(&self.retention, started_at);
        let mut removed = Purged::default();
        let mut error = None;
        loop {
            match self.store.purge_expired(&cut, CHUNK).await {
                Ok(chunk) => {
                    self.count(chunk);
                    removed.add(chunk);
                    if chunk.partitions == 0 && chunk.total() < u64::from(CHUNK) {
                        break;
                    }
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
            let now = Utc::now();
            match self.store.take_lease(TASK, &holder, now, lease_until(now)).await {
                Ok(true) => {}
                Ok(false) => {
                    error = Some("the lease was lost to another process".into());
                    break;
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        if let Err(e) = self.store.compact(Utc::now()).await {
            error.get_or_insert(format!("compaction: {e}"));
        }
        if let Err(e) = self
            .store
            .prepare(Utc::now(), self.partition_period, self.ahead())
            .await
        {
            error.get_or_insert(format!("partitions ahead: {e}"));
        }
        let finished_at = Utc::now();
        let report = PurgeReport {
            holder: holder.clone(),
            started_at,
            finished_at,
            removed,
            error,
            next_run_at: Some(finished_at + chrono::Duration::from_std(self.interval).unwrap_or_default()),
        };
        let json = serde_json::to_value(&report).unwrap_or_default();
        self.store.finish_task(TASK, &holder, &json).await?;
        Ok(report)
    }

    /// How far ahead partitions are made: beyond the next few passes.
    pub fn ahead(&self) -> Duration {
        self.interval * 4
    }

    fn count(&self, p: Purged) {
        for (status, n) in [("processed", p.processed), ("dead_lettered", p.dead_lettered)] {
            if n > 0 {
                self.metrics.events_purged.with_label_values(&[status]).inc_by(n);
            }
        }
    }
}

/// Runs a pass every `interval` until shutdown; a pass another process is
/// running is skipped.
pub async fn purge_loop(p: Purger, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(p.interval) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        match p.run_once().await {
            Ok(PurgeReport {
                error: Some(e),
                removed,
                ..
            }) => warn!(
                processed = removed.processed,
                dead_lettered = removed.dead_lettered,
                error = %e,
                "retention purge stopped early; the next pass goes on"
            ),
            Ok(r) if r.removed.total() > 0 || r.removed.partitions > 0 => info!(
                processed = r.removed.processed,
                dead_lettered = r.removed.dead_lettered,
                partitions = r.removed.partitions,
                "retention purge"
            ),
            Ok(_) | Err(PurgeError::Busy { .. }) => {}
            Err(PurgeError::Store(e)) => warn!(error = %e, "retention purge failed"),
        }
    }
}
