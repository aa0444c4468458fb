//! Opening the database: which backend a URL names, the SQLite file's
//! one-time setup, the pool and its per-connection settings, and the
//! migrations and liveness check of [`Store`].

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::AnyPoolOptions;

use super::key_cache::KeyCache;
use super::writes::Writes;
use super::{Backend, SqlStore};
use crate::store::group::batch_size_histogram;
use crate::store::{Store, StoreError, StoreResult};

impl Backend {
    fn of_url(url: &str) -> StoreResult<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::Unavailable(
                "DATABASE_URL must start with sqlite: or postgres://".into(),
            ))
        }
    }
}

impl SqlStore {
    /// Connects to `url` (`sqlite://path` or `postgres://…`) with at most
    /// `max_connections` (SQLite: at most [`SQLITE_CONNECTIONS`]). SQLite
    /// files are created, put in WAL mode, and never run with
    /// `synchronous=OFF`.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let max_connections = match backend {
            Backend::Sqlite => {
                create_sqlite_file(url).await?;
                max_connections.min(SQLITE_CONNECTIONS)
            }
            Backend::Postgres => max_connections,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // No ping before every acquire: that was a round trip per
            // statement. A connection that died is found by its next query,
            // which fails (the caller answers 503 or the event is retried)
            // and is not returned to the pool.
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Postgres {
                        // Every statement here is short. PostgreSQL compiles
                        // a plan whose estimated cost passes `jit_above_cost`
                        // with LLVM, and a young partition without statistics
                        // inflates the estimates: the ordering release's read
                        // (0.1 ms to run) took 75–80 ms of JIT compilation
                        // while a 50,000-event backlog drained.
                        sqlx::query("SET jit = off").execute(&mut *conn).await?;
                    }
                    if backend == Backend::Sqlite {
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        // A checkpoint that resets the WAL truncates it to
                        // this size: without it the file keeps the size of
                        // its largest burst (seen growing in the soak).
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}"
                        )))
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&pool_url(url, backend))
            .await?;
        let batch_sizes = batch_size_histogram();
        let writes = Arc::new(Writes::start(&pool, &batch_sizes));
        Ok(Self {
            pool,
            backend,
            writes,
            // Its version poll has a connection of its own, outside the
            // pool, for one statement: the URL as given.
            key_cache: Arc::new(KeyCache::new(url)),
            batch_sizes,
        })
    }
}

/// Connections to a SQLite event store. SQLite runs one write transaction
/// at a time whatever the pool, and each connection keeps a page cache and
/// prepared statements of its own: the embedded bench (20,000 events, 32
/// connections) ran as fast with 4 as with 8 or 16 (768–1,016/s, 1,050–
/// 1,139/s, 799–992/s), with a server RSS of 123–126 MiB against 144 and
/// 135–158 MiB. The price: WAL readers run beside the writer, but while
/// the group-commit writers (insert, claim, finish) all wait for the
/// write lock (a purge batch, a checkpoint), one connection is left for
/// reads, and they queue for it.
const SQLITE_CONNECTIONS: u32 = 4;

/// Prepared statements each PostgreSQL connection keeps (sqlx's default is
/// 100). A multi-row statement has a text per row count: a 30,000-event run
/// prepared some 560 texts, so with 100 each connection kept evicting and
/// preparing them again (measured: PostgreSQL 5–13% less CPU with room for
/// all). A `statement-cache-capacity` in `DATABASE_URL` wins.
const STATEMENT_CACHE: usize = 1024;

/// `url` with [`STATEMENT_CACHE`] for a PostgreSQL pool, unless its query
/// names a capacity (read as sqlx reads it: decoded, before any fragment).
fn pool_url(url: &str, backend: Backend) -> Cow<'_, str> {
    const KEY: &str = "statement-cache-capacity";
    if backend != Backend::Postgres {
        return Cow::Borrowed(url);
    }
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        // sqlx reports the malformed URL.
        return Cow::Borrowed(url);
    };
    if parsed.query_pairs().any(|(k, _)| k == KEY) {
        return Cow::Borrowed(url);
    }
    parsed
        .query_pairs_mut()
        .append_pair(KEY, &STATEMENT_CACHE.to_string());
    Cow::Owned(parsed.into())
}

/// The size (bytes) a reset WAL is truncated to, on every SQLite
/// connection of the event store and of the embedded queue.
pub(crate) const WAL_SIZE_LIMIT_BYTES: i64 = 16 << 20;

/// Creates the file (and its directory) and switches it to WAL once: WAL is
/// a property of the file, so the pooled connections need not set it. A new
/// file also gets incremental auto-vacuum, so purges can give space back
/// (a file made before that is converted by [`Store::migrate`]).
async fn create_sqlite_file(url: &str) -> StoreResult<()> {
    use sqlx::{ConnectOptions, Connection};
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
        .create_if_missing(true)
        .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::Incremental)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    if let Some(dir) = opts.get_filename().parent() {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    }
    let conn = opts.connect().await?;
    conn.close().await?;
    Ok(())
}

#[async_trait]
impl Store for SqlStore {
    async fn migrate(&self) -> StoreResult<()> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))?;
        if self.backend == Backend::Sqlite {
            incremental_vacuum_on(&self.pool).await?;
        }
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Switches a SQLite file made without incremental auto-vacuum to it: the
/// mode only takes effect through a full `VACUUM`, once.
async fn incremental_vacuum_on(pool: &sqlx::AnyPool) -> StoreResult<()> {
    use sqlx::Row;
    const INCREMENTAL: i64 = 2;
    let mut conn = pool.acquire().await?;
    let mode: i64 = sqlx::query("PRAGMA auto_vacuum")
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    if mode != INCREMENTAL {
        tracing::info!("switching the SQLite database to incremental auto-vacuum (one full VACUUM)");
        sqlx::query("PRAGMA auto_vacuum = INCREMENTAL")
            .execute(&mut *conn)
            .await?;
        sqlx::query("VACUUM").execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled(url: &str) -> String {
        pool_url(url, Backend::Postgres).into_owned()
    }

    #[test]
    fn postgres_urls_get_the_statement_cache_unless_they_name_one() {
        assert_eq!(
            pooled("postgres://u:p@db/x"),
            "postgres://u:p@db/x?statement-cache-capacity=1024"
        );
        assert_eq!(
            pooled("postgresql://db/x?sslmode=require#f"),
            "postgresql://db/x?sslmode=require&statement-cache-capacity=1024#f"
        );
        assert_eq!(
            pooled("postgres:///x?host=/var/run/postgresql"),
            "postgres:///x?host=/var/run/postgresql&statement-cache-capacity=1024"
        );
        for own in [
            "postgres://db/x?statement-cache-capacity=10",
            "postgres://db/x?statement%2Dcache%2Dcapacity=10",
        ] {
            assert_eq!(pooled(own), own);
        }
        // A value that merely contains the key's text is not the key.
        assert_eq!(
            pooled("postgres://db/x?application_name=statement-cache-capacity="),
            "postgres://db/x?application_name=statement-cache-capacity=&statement-cache-capacity=1024"
        );
        assert_eq!(pool_url("sqlite://a.db", Backend::Sqlite), "sqlite://a.db");
    }
}
