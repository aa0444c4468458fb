//! [`Store`](crate::store::Store) on SQLite and PostgreSQL through sqlx's
//! `Any` driver: both schemas use the same column types (BIGINT epoch
//! milliseconds, TEXT JSON), so one set of portable queries serves both.
//!
//! * `connect`: backend detection, the pool, migrations;
//! * `codec`: rows to records and the column encodings;
//! * `counts`: the counters statistics are read from;
//! * `statement`: statements whose text depends on their input;
//! * `writes`: the group-committed event writes and key lookups;
//! * `events`, `partners`, `versions`, `maintenance`: one trait of the store each.

mod codec;
mod connect;
mod counts;
mod events;
mod maintenance;
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

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
