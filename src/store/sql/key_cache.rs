//! Credentials cached in the process: the partner behind an API key (and
//! behind a JWT's partner id), so a partner request does not read the
//! database for them.
//!
//! **Invalidation across processes.** Every change of `partners` or
//! `api_keys`, by any writer (this service, the CLI in another process, an
//! operator's own SQL), moves the one-row `credentials_version` — triggers
//! in both schemas do it in the writer's transaction. Each process reads
//! that version every [`POLL`] and drops every entry when it moved. An
//! entry is served only while the last successful read began less than
//! [`FRESH`] ago, so when the database does not answer the reads go
//! through to it (and fail there) instead of trusting old entries: a
//! revoked key, a disabled partner or a changed limit is honoured
//! everywhere within [`FRESH`] of its commit, whatever happens to the
//! polling. A change made through this process's store also drops its
//! entries at once.
//!
//! Why a polled version and not PostgreSQL's `LISTEN`/`NOTIFY` or Redis
//! pub/sub: one mechanism for both stores (SQLite has no notification
//! across processes, and the embedded server shares its file with the
//! CLI), nothing to lose when a listening connection drops (a missed
//! notification would keep a revoked key alive until some other change),
//! and the cost is one primary-key read per process every 250 ms, over one
//! connection of its own per process.
//!
//! A read that raced an invalidation is not cached: each read notes the
//! cache's generation before asking the database and stores its answer
//! only if no invalidation came meanwhile. Unknown keys are never cached
//! (anyone can send them); the cache holds at most [`CAPACITY`] entries
//! and starts over when full.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, AnyPool, Connection, Row};

use crate::store::Partner;

/// How often each process reads `credentials_version`.
pub(super) const POLL: Duration = Duration::from_millis(250);
/// How long after the start of the last successful read entries are served.
pub(super) const FRESH: Duration = Duration::from_millis(750);
/// Entries kept per map before the map starts over.
const CAPACITY: usize = 100_000;

/// A partner as its login reads it: the partner and its password hash.
pub(super) type Login = (Partner, Option<String>);

pub(super) struct KeyCache {
    state: Mutex<State>,
    started: std::sync::OnceLock<()>,
    /// `credential_lookups_total{source}`: answered from the cache, or read
    /// from the store.
    lookups: prometheus::IntCounterVec,
    /// Its two counters, looked up once (not per request).
    hits: prometheus::IntCounter,
    misses: prometheus::IntCounter,
    /// The database the version is read from, over a connection of the
    /// poll's own: through the store's pool it would queue behind the
    /// data path when the pool is busy, and the cache would switch itself
    /// off exactly when it saves most.
    url: String,
}

#[derive(Default)]
struct State {
    /// The version the entries were read under; `None` until read.
    version: Option<i64>,
    /// When the last successful read of the version began.
    checked: Option<Instant>,
    /// Moves on every invalidation.
    generation: u64,
    keys: HashMap<String, Partner>,
    logins: HashMap<String, Login>,
}

impl State {
    fn fresh(&self) -> bool {
        self.checked.is_some_and(|at| at.elapsed() < FRESH)
    }

    fn clear(&mut self) {
        self.generation += 1;
        self.keys.clear();
        self.logins.clear();
    }
}

/// A read's ticket: the generation it began under.
#[derive(Clone, Copy)]
pub(super) struct Ticket(u64);

impl KeyCache {
    pub(super) fn new(url: &str) -> Self {
        let opts = prometheus::Opts::new(
            "credential_lookups_total",
            "API-key and login lookups of partner requests, by source (cache, store).",
        );
        let lookups = prometheus::IntCounterVec::new(opts, &["source"])
            .unwrap_or_else(|e| panic!("credential_lookups_total: {e}"));
        Self {
            state: Mutex::default(),
            started: std::sync::OnceLock::new(),
            hits: lookups.with_label_values(&["cache"]),
            misses: lookups.with_label_values(&["store"]),
            lookups,
            url: url.to_owned(),
        }
    }

    /// `credential_lookups_total`, for the metrics registry.
    pub(super) fn lookup_metric(&self) -> prometheus::IntCounterVec {
        self.lookups.clone()
    }

    /// Starts the version reads on first use (a process that never
    /// authenticates a partner, such as most CLI commands, never polls).
    fn start(self: &Arc<Self>, pool: &AnyPool) {
        self.started.get_or_init(|| {
            let weak = Arc::downgrade(self);
            tokio::spawn(poll(weak, pool.clone(), self.url.clone()));
        });
    }

    /// The cached partner of `key_hash`, if fresh; else a ticket for the
    /// read that follows.
    pub(super) fn key(self: &Arc<Self>, pool: &AnyPool, key_hash: &str) -> Result<Partner, Ticket> {
        self.start(pool);
        self.get(|st| &st.keys, key_hash)
    }

    pub(super) fn put_key(&self, ticket: Ticket, key_hash: &str, partner: &Partner) {
        self.put(ticket, |st| &mut st.keys, key_hash, partner);
    }

    /// The cached login of partner `id`, if fresh; else a ticket.
    pub(super) fn login(self: &Arc<Self>, pool: &AnyPool, id: &str) -> Result<Login, Ticket> {
        self.start(pool);
        self.get(|st| &st.logins, id)
    }

    pub(super) fn put_login(&self, ticket: Ticket, id: &str, login: &Login) {
        self.put(ticket, |st| &mut st.logins, id, login);
    }

    /// The entry of `id` in `map`, served only while the version is fresh;
    /// counted as a hit or a miss.
    fn get<V: Clone>(&self, map: fn(&State) -> &HashMap<String, V>, id: &str) -> Result<V, Ticket> {
        let st = self.lock();
        let found = match map(&st).get(id) {
            Some(v) if st.fresh() => Ok(v.clone()),
            _ => Err(Ticket(st.generation)),
        };
        match found {
            Ok(_) => self.hits.inc(),
            Err(_) => self.misses.inc(),
        }
        found
    }

    /// Keeps `value` unless an invalidation came since `ticket` was taken or
    /// the version is not fresh.
    fn put<V: Clone>(
        &self,
        ticket: Ticket,
        map: fn(&mut State) -> &mut HashMap<String, V>,
        id: &str,
        value: &V,
    ) {
        let mut st = self.lock();
        if st.generation != ticket.0 || !st.fresh() {
            return;
        }
        let entries = map(&mut st);
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(id.to_owned(), value.clone());
    }

    /// Drops every entry (a change made through this store).
    pub(super) fn invalidate(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement: a panic elsewhere
        // cannot leave it half-changed.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One successful read of the version `v`, begun at `began`. A failed
    /// read changes nothing: the entries stop being served once [`FRESH`]
    /// has passed since the last good one began.
    fn observe(&self, began: Instant, v: i64) {
        let mut st = self.lock();
        if st.version != Some(v) {
            st.clear();
            st.version = Some(v);
        }
        // Reads finish in order (one at a time), so `began` only grows.
        st.checked = Some(began);
    }
}

/// Reads the version every [`POLL`] while the cache is alive and the
/// store's pool open, over a connection of its own (made again after any
/// failure).
async fn poll(cache: Weak<KeyCache>, pool: AnyPool, url: String) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<AnyConnection> = None;
    loop {
        tick.tick().await;
        if pool.is_closed() {
            break;
        }
        let began = Instant::now();
        let read = tokio::time::timeout(FRESH, version(&mut conn, &url)).await;
        let Some(cache) = cache.upgrade() else { break };
        match read {
            Ok(Ok(v)) => cache.observe(began, v),
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {FRESH:?}"),
                };
                tracing::debug!(%error, "could not read credentials_version; cached credentials are not used");
                conn = None;
            }
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

async fn version(conn: &mut Option<AnyConnection>, url: &str) -> Result<i64, sqlx::Error> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(AnyConnection::connect(url).await?),
    };
    sqlx::query("SELECT version FROM credentials_version WHERE id = 1")
        .fetch_one(c)
        .await?
        .try_get(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partner(name: &str) -> Partner {
        Partner {
            id: "p".into(),
            name: name.into(),
            rate_per_minute: None,
            burst: None,
            disabled: false,
        }
    }

    fn served(cache: &KeyCache, key_hash: &str) -> Option<Partner> {
        cache.get(|st| &st.keys, key_hash).ok()
    }

    #[test]
    fn entries_are_served_only_while_the_version_is_fresh() {
        let cache = KeyCache::new("");
        cache.observe(Instant::now(), 1);
        let t = Ticket(cache.lock().generation);
        cache.put_key(t, "h", &partner("a"));
        assert_eq!(served(&cache, "h").map(|p| p.name).as_deref(), Some("a"));
        assert_eq!(
            served(&cache, "other"),
            None,
            "unknown keys are read from the store"
        );
        // The last good read began longer ago than FRESH (the polls since
        // failed): the entry is kept but not served.
        cache.lock().checked = Instant::now().checked_sub(FRESH + Duration::from_millis(1));
        assert!(cache.lock().keys.contains_key("h"));
        assert_eq!(served(&cache, "h"), None);
        // A good read again: served again.
        cache.observe(Instant::now(), 1);
        assert!(served(&cache, "h").is_some());
        assert_eq!((cache.hits.get(), cache.misses.get()), (2, 2));
    }

    #[test]
    fn a_moved_version_drops_everything_and_a_racing_read_is_not_kept() {
        let cache = KeyCache::new("");
        cache.observe(Instant::now(), 1);
        let before = Ticket(cache.lock().generation);
        cache.put_key(before, "h", &partner("a"));
        cache.observe(Instant::now(), 1);
        assert_eq!(cache.lock().keys.len(), 1, "same version: kept");
        cache.observe(Instant::now(), 2);
        assert!(cache.lock().keys.is_empty(), "moved version: dropped");
        // A read that began before the move answers after it: not cached.
        cache.put_key(before, "h", &partner("stale"));
        assert!(cache.lock().keys.is_empty());
        cache.invalidate();
        let t = Ticket(cache.lock().generation);
        cache.put_login(t, "p", &(partner("b"), None));
        assert_eq!(cache.lock().logins.len(), 1);
        cache.invalidate();
        assert!(cache.lock().logins.is_empty());
    }

    #[test]
    fn nothing_is_kept_or_served_before_a_good_read() {
        let cache = KeyCache::new("");
        let t = Ticket(cache.lock().generation);
        cache.put_key(t, "h", &partner("a"));
        assert!(cache.lock().keys.is_empty(), "not stored while not fresh");
        assert_eq!(served(&cache, "h"), None);
    }
}
