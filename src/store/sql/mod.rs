//! [`Store`](crate::store::Store) on SQLite and PostgreSQL through sqlx's
//! `Any` driver: both schemas use the same column types (BIGINT epoch
//! milliseconds, TEXT JSON), so one set of portable queries serves both.
//!
//! * `connect`: backend detection, the pool, migrations;
//! * `codec`: rows to records and the column encodings;
//! * `counts`: the counters statistics are read from;
//! * `partitions`: PostgreSQL's time partitions;
//! * `statement`: statements whose text depends on their input;
//! * `writes`: the group-committed event writes and key lookups;
//! * `ordering`: parking events behind their ordering key's holder, and
//!   releasing (or claiming) them once it is free;
//! * `key_cache`: API keys and logins cached in the process, dropped when
//!   any process changes a partner or a key;
//! * `events`, `partners`, `versions`, `maintenance`, `console`: one trait of the store each.

mod codec;
mod connect;
mod console;
pub(crate) use connect::WAL_SIZE_LIMIT_BYTES;
mod counts;
mod events;
mod key_cache;
mod maintenance;
mod ordering;
mod partitions;
mod partners;
mod statement;
mod versions;
mod writes;

use std::sync::Arc;

use sqlx::AnyPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    writes: Arc<writes::Writes>,
    key_cache: Arc<key_cache::KeyCache>,
    batch_sizes: prometheus::HistogramVec,
}

impl SqlStore {
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `store_write_batch_size`, for the metrics registry.
    pub fn batch_size_metric(&self) -> prometheus::HistogramVec {
        self.batch_sizes.clone()
    }

    /// `credential_lookups_total`, for the metrics registry.
    pub fn credential_lookup_metric(&self) -> prometheus::IntCounterVec {
        self.key_cache.lookup_metric()
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// PostgreSQL: partitions of `period` covering `[from, to)` that no
    /// partition covers yet, after the newest one (for loaders that write
    /// past events straight into the store, such as the benchmarks'); how
    /// many it made. SQLite: nothing.
    pub async fn create_partitions(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
        period: std::time::Duration,
    ) -> crate::store::StoreResult<u32> {
        if self.backend != Backend::Postgres {
            return Ok(0);
        }
        let period = i64::try_from(period.as_millis()).unwrap_or(i64::MAX).max(1_000);
        let (from, to) = (from.timestamp_millis(), to.timestamp_millis());
        partitions::extend(&self.pool, from, to, period, usize::MAX).await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
