//! The store: the source of truth for events, attempts, deliveries and
//! partners. One trait per thing it serves ([`EventStore`], [`PartnerStore`],
//! [`VersionStore`]), gathered in [`Store`], which is what the service holds;
//! [`sql::SqlStore`] implements them for SQLite and PostgreSQL with the same
//! queries.

mod group;
pub mod sql;
pub mod stats;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use engine::trace::TraceContext;
use engine::{DeliveryReport, StageTrace};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use sql::SqlStore;
pub use stats::{Counts, Percentiles, Stats, StatsQuery};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                StoreError::Unavailable(e.to_string())
            }
            // Contention, not the statement's fault: PostgreSQL deadlock,
            // serialization failure, lock not available; SQLite busy or
            // locked (after the busy timeout).
            sqlx::Error::Database(ref d)
                if d.code().is_some_and(|c| {
                    matches!(c.as_ref(), "40P01" | "40001" | "55P03")
                        || c.parse::<i32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))
                }) =>
            {
                StoreError::Unavailable(format!("database busy: {e}"))
            }
            other => StoreError::Database(other.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Event statuses, as stored and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Received,
    Processing,
    Retrying,
    Processed,
    DeadLettered,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Received,
        Status::Processing,
        Status::Retrying,
        Status::Processed,
        Status::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Received => "received",
            Status::Processing => "processing",
            Status::Retrying => "retrying",
            Status::Processed => "processed",
            Status::DeadLettered => "dead_lettered",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Processed | Status::DeadLettered)
    }
}

/// The last failure of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    pub category: String,
    pub message: String,
    pub transient: bool,
    /// Stage that failed, when a stage did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: String,
    pub partner_id: String,
    pub tipo: String,
    pub dados: Value,
    pub meta: Value,
    pub pipeline_version: String,
    pub status: Status,
    pub attempts: u32,
    /// Attempts made before the last manual retry; the retry budget counts from here.
    pub attempt_base: u32,
    pub received_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub processed_at: Option<DateTime<Utc>>,
    pub processing_ms: Option<i64>,
    pub last_error: Option<LastError>,
    pub last_trace: Vec<StageTrace>,
    /// The processed form (`dados`, `meta`, `routes`) written by `persist`.
    pub result: Option<Value>,
    pub idempotency_key: Option<String>,
    /// `X-Request-Id` of the request that created it.
    pub request_id: Option<String>,
    /// The destination it waits on (open circuit, throttling), if it does.
    pub waiting_on: Option<String>,
    /// When it began waiting (for the destination's `max_wait`).
    pub waiting_since: Option<DateTime<Utc>>,
    /// The trace its attempts and deliveries continue.
    pub trace: Option<TraceContext>,
    /// Its ordering key (a digest), when its pipeline orders events.
    pub order_key: Option<String>,
    /// The earlier event of its key it is parked behind, if it is.
    pub blocked_by: Option<String>,
}

/// An event to insert.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: String,
    pub partner_id: String,
    pub tipo: String,
    pub dados: Value,
    pub pipeline_version: String,
    pub received_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    /// Hash of the request body, to tell a replay from a conflicting reuse of a key.
    pub request_hash: String,
    pub request_id: Option<String>,
    /// The request's trace context (W3C), which the event continues.
    pub trace: Option<TraceContext>,
    /// Its ordering key (see `engine::ordering`), and whether a dead letter
    /// holds the key (`on_dead_letter: block`).
    pub order_key: Option<String>,
    pub order_block: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    Created(EventRecord),
    /// Same key, same body: the original event.
    Replayed(EventRecord),
    /// Same key, different body.
    Conflict {
        existing_id: String,
    },
}

/// How one attempt ended.
#[derive(Debug, Clone)]
pub struct AttemptFinish {
    pub status: Status,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_error: Option<LastError>,
    pub trace: Vec<StageTrace>,
    /// Destinations that answered 2xx in this attempt (recorded even when the
    /// claim was lost: the calls happened).
    pub deliveries: Vec<DeliveryReport>,
    /// The processed form `persist` produced (`{dados, meta, routes}`).
    pub result: Option<Value>,
    /// The attempt ended waiting for a destination: it does not count
    /// against the retry budget (`attempt_base` moves with `attempts`).
    pub wait: Option<FinishWait>,
    /// Set when the caller will run the next event of the ordering key
    /// itself: if the attempt ends its event, the first event the key
    /// releases is claimed for the caller in the same transaction, leased
    /// until then, and comes back as [`Finished::next`]. `None`: every
    /// released event comes back in [`Finished::released`], unclaimed.
    pub claim_next: Option<DateTime<Utc>>,
}

/// What a waiting event waits on.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishWait {
    pub destination: String,
    /// Parked: no queue task; woken when the destination's circuit closes
    /// or its probe is due ([`EventStore::unpark`]).
    pub park: bool,
}

/// Events waiting on one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub tipo: String,
    pub destination: String,
    /// Every waiting event, parked or with a task.
    pub events: i64,
    pub parked: i64,
    pub oldest_since: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    Requeued(EventRecord),
    WrongStatus(Status),
    NotFound,
}

/// What recording an attempt's outcome did.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// False when the attempt no longer held the claim (nothing written).
    pub recorded: bool,
    /// The event ended (processed or dead-lettered): the next event of its
    /// ordering key, claimed for the caller (see
    /// [`AttemptFinish::claim_next`]), which runs its attempt at once.
    pub next: Option<EventRecord>,
    /// The events of its ordering key that no event holds any more,
    /// released without a claim (in acceptance order; as a rule the next
    /// one, when it was not claimed as `next`). The caller queues them.
    pub released: Vec<Requeue>,
}

/// What discarding a dead letter did.
#[derive(Debug, Clone, PartialEq)]
pub enum DiscardOutcome {
    /// Deleted, with its attempts, deliveries and idempotency key; the
    /// ordering key it held, if any.
    Discarded {
        tipo: String,
        order_key: Option<String>,
    },
    WrongStatus(Status),
    NotFound,
}

/// Filters of `GET /events`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub partner_id: Option<String>,
    pub status: Option<Status>,
    pub tipo: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Exclusive upper bound on the id (keyset cursor; ids sort by time).
    pub before_id: Option<String>,
    /// `last_error.category`, compared in the database.
    pub category: Option<String>,
    pub limit: u32,
}

/// What the sweeper asks [`EventStore::take_stranded`] for.
#[derive(Debug, Clone)]
pub struct Sweep<'a> {
    pub now: DateTime<Utc>,
    pub stale_before: DateTime<Utc>,
    pub very_stale_before: DateTime<Utc>,
    pub idle_types: &'a [String],
    pub limit: u32,
}

/// An event that needs a (new) queue task.
#[derive(Debug, Clone, PartialEq)]
pub struct Requeue {
    pub id: String,
    pub partner_id: String,
    pub tipo: String,
    pub pipeline_version: String,
    pub run_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Partner {
    pub id: String,
    pub name: String,
    pub rate_per_minute: Option<u32>,
    pub burst: Option<u32>,
    pub disabled: bool,
}

/// One API key of a partner, as listed (the key itself is never stored).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyInfo {
    /// Stable key id (the first 16 hex characters of the key's SHA-256).
    pub id: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A partner with its keys, for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct PartnerInfo {
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
    /// Share of a type's workers when several partners have work waiting.
    pub weight: u32,
    pub keys: Vec<ApiKeyInfo>,
}

impl PartnerInfo {
    /// Keys not revoked.
    pub fn active_keys(&self) -> usize {
        self.keys.iter().filter(|k| k.revoked_at.is_none()).count()
    }
}

/// A change to a partner; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct PartnerUpdate {
    pub name: Option<String>,
    /// `Some(None)` removes the password.
    pub password_hash: Option<Option<String>>,
    /// `Some(None)` goes back to the server default.
    pub rate_per_minute: Option<Option<u32>>,
    pub burst: Option<Option<u32>>,
    pub weight: Option<u32>,
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct NewPartner {
    pub id: String,
    pub name: String,
    pub password_hash: Option<String>,
    pub rate_per_minute: Option<u32>,
    pub burst: Option<u32>,
    pub weight: u32,
}

/// Everything the service needs from its database, behind one object
/// (`Arc<dyn Store>`): the three stores, and the database's own upkeep.
#[async_trait]
pub trait Store:
    EventStore + PartnerStore + VersionStore + MaintenanceStore + ConsoleStore + Send + Sync + 'static
{
    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
}

/// Events: ingest, claims and outcomes, reads, sweeps, statistics.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Inserts a new event, or resolves its idempotency key.
    async fn insert_event(&self, new: NewEvent) -> StoreResult<InsertOutcome>;
    /// Inserts many events in one transaction (multi-row statements),
    /// resolving each idempotency key as [`EventStore::insert_event`] does; one
    /// outcome per event, in order. Two events of the list with the same key
    /// resolve as if sent one after the other.
    async fn insert_events(&self, new: Vec<NewEvent>) -> StoreResult<Vec<InsertOutcome>>;
    async fn get_event(&self, id: &str) -> StoreResult<Option<EventRecord>>;
    async fn list_events(&self, filter: &ListFilter) -> StoreResult<Vec<EventRecord>>;
    /// Counts of the events received in the window, from the counters kept
    /// with every status change (never a scan of the events).
    async fn stats(&self, query: &StatsQuery) -> StoreResult<Stats>;
    async fn deliveries(&self, id: &str) -> StoreResult<Vec<DeliveryRow>>;
    /// Dead letters by type and error category (biggest groups first),
    /// counted in the database: all retained, or those dead-lettered at or
    /// after `since`.
    async fn dead_letter_groups(&self, since: Option<DateTime<Utc>>) -> StoreResult<Vec<DeadLetterGroup>>;
    /// The attempts recorded for an event, first first.
    async fn attempts(&self, id: &str) -> StoreResult<Vec<AttemptRow>>;
    /// Events received per minute and type since `since` (the counters'
    /// minute rows, kept for the last two hours): `(minute, tipo, events)`.
    async fn received_per_minute(
        &self,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<(DateTime<Utc>, String, i64)>>;

    /// Takes the event for one attempt: `received`/`retrying` (due), or
    /// `processing` whose lease expired. Increments `attempts`. `None` when
    /// another worker has it or it is finished.
    async fn claim(
        &self,
        id: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Option<EventRecord>>;
    /// Records an attempt's outcome if this worker still holds the claim.
    async fn finish_attempt(&self, id: &str, attempt: u32, finish: &AttemptFinish) -> StoreResult<Finished>;
    /// Manual retry: only from `dead_lettered`; back to `received`.
    async fn manual_retry(&self, id: &str) -> StoreResult<RetryOutcome>;
    /// Deletes a dead letter for good (only from `dead_lettered`).
    async fn discard_dead_letter(&self, id: &str) -> StoreResult<DiscardOutcome>;
    /// Events whose queue task may be lost, marked queued now:
    /// * known unqueued (`queued_at = 0`: a push failed; `retrying` ones once
    ///   due) and `processing`
    ///   with an expired lease, always;
    /// * `received`, or `retrying` past due, not queued since `stale_before`,
    ///   for the event types in `idle_types` (their queue is empty, so the
    ///   task is not merely waiting);
    /// * the same, for any type, when not queued since `very_stale_before`.
    async fn take_stranded(&self, sweep: &Sweep<'_>) -> StoreResult<Vec<Requeue>>;
    /// Marks events as not queued, so the next sweep queues them (after a
    /// failed push); at most a few hundred ids per call.
    async fn mark_unqueued(&self, ids: &[&str]) -> StoreResult<()>;
    /// Ends every lease (only safe when this is the only process: embedded mode).
    async fn release_leases(&self) -> StoreResult<u64>;
    /// Number of events per status, from the counters.
    async fn status_counts(&self) -> StoreResult<std::collections::BTreeMap<String, i64>>;
    /// Per partner with any, from the counters: (partner, waiting, in flight),
    /// waiting being `received` or `retrying`, in flight `processing`.
    async fn partner_activity(&self) -> StoreResult<Vec<(String, i64, i64)>>;
    /// Events waiting on each destination (from an index of the waiting
    /// ones only).
    async fn waiting(&self) -> StoreResult<Vec<Waiting>>;
    /// Wakes up to `limit` of the events parked on a destination, oldest
    /// first (all of them with `since_before`: only those that began
    /// waiting before it): marks them queued and due now, and returns them
    /// for their tasks.
    async fn unpark(
        &self,
        tipo: &str,
        destination: &str,
        limit: u32,
        since_before: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Requeue>>;
    /// When the oldest event still waiting or running was received, per type.
    async fn oldest_pending(&self) -> StoreResult<std::collections::BTreeMap<String, DateTime<Utc>>>;
    /// Wakes the parked events (of `order_key`, or of any key) that no
    /// earlier event holds any more, at most `limit`: marks them queued and
    /// returns them for their tasks.
    async fn release_order(
        &self,
        order_key: Option<&str>,
        limit: u32,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Requeue>>;
    /// The event that holds `id`'s ordering key now (the earliest one), if
    /// any.
    async fn key_holder(&self, id: &str, now: DateTime<Utc>) -> StoreResult<Option<String>>;
    /// Events parked behind an earlier one of their key, per type.
    async fn blocked_counts(&self) -> StoreResult<std::collections::BTreeMap<String, i64>>;
}

/// Partners and their API keys.
#[async_trait]
pub trait PartnerStore: Send + Sync {
    async fn create_partner(&self, p: &NewPartner) -> StoreResult<bool>;
    /// `false` when a key with this hash exists already (for any partner).
    async fn add_api_key(&self, partner_id: &str, key_hash: &str, prefix: &str) -> StoreResult<bool>;
    async fn partner_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Partner>>;
    async fn count_partners(&self) -> StoreResult<i64>;
    /// Every partner (or one), with its keys, ordered by id.
    async fn partners(&self, id: Option<&str>) -> StoreResult<Vec<PartnerInfo>>;
    /// Applies `update`; `false` when the partner does not exist.
    async fn update_partner(&self, id: &str, update: &PartnerUpdate) -> StoreResult<bool>;
    /// Revokes one key by its id, or every active key but `keep_hash` when
    /// `key_id` is `None`; returns how many were revoked.
    async fn revoke_api_keys(
        &self,
        partner_id: &str,
        key_id: Option<&str>,
        keep_hash: Option<&str>,
    ) -> StoreResult<u64>;
    /// A partner and its password hash, by id.
    async fn partner_login(&self, id: &str) -> StoreResult<Option<(Partner, Option<String>)>>;
    /// The partners whose fair-sharing weight is not 1, with it.
    async fn partner_weights(&self) -> StoreResult<std::collections::HashMap<String, u32>>;
}

/// The files of every pipeline version served, so a process that never
/// loaded a version (an event accepted before a restart, or by another
/// process) can rebuild it.
#[async_trait]
pub trait VersionStore: Send + Sync {
    /// Keeps the files of a pipeline version (once; later calls change nothing).
    async fn save_pipeline_version(
        &self,
        version: &str,
        tipo: &str,
        sources: &std::collections::BTreeMap<String, String>,
    ) -> StoreResult<()>;
    /// The files of a pipeline version, if it was saved.
    async fn pipeline_version(
        &self,
        version: &str,
    ) -> StoreResult<Option<(String, std::collections::BTreeMap<String, String>)>>;
}

/// Operator accounts and the console's sessions.
#[async_trait]
pub trait ConsoleStore: Send + Sync {
    /// `false` when the name is taken.
    async fn create_operator(&self, name: &str, password_hash: &str) -> StoreResult<bool>;
    /// An operator's password hash.
    async fn operator_password(&self, name: &str) -> StoreResult<Option<String>>;
    /// Every operator with when it was created, by name.
    async fn operators(&self) -> StoreResult<Vec<(String, DateTime<Utc>)>>;
    /// Sets a password; `false` when there is no such operator.
    async fn set_operator_password(&self, name: &str, password_hash: &str) -> StoreResult<bool>;
    /// Removes an operator and its sessions; `false` when there was none.
    async fn delete_operator(&self, name: &str) -> StoreResult<bool>;
    async fn create_session(&self, session: &ConsoleSession) -> StoreResult<()>;
    /// A session by the hash of its token, with the password hash its
    /// operator has now (`None` for the admin key, or a removed operator).
    async fn session(&self, token_hash: &str) -> StoreResult<Option<(ConsoleSession, Option<String>)>>;
    /// Records the session's use now.
    async fn touch_session(&self, token_hash: &str, at: DateTime<Utc>) -> StoreResult<()>;
    async fn delete_session(&self, token_hash: &str) -> StoreResult<()>;
    /// Removes the sessions last used before `idle_before` or made before
    /// `created_before`; how many.
    async fn purge_sessions(
        &self,
        idle_before: DateTime<Utc>,
        created_before: DateTime<Utc>,
    ) -> StoreResult<u64>;
}

/// A signed-in console session.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleSession {
    /// SHA-256 (hex) of the cookie's token.
    pub token_hash: String,
    /// `None`: signed in with the admin key.
    pub operator: Option<String>,
    /// Fingerprint of the admin key or of the operator's password hash it
    /// was signed in with.
    pub credential: String,
    /// The token every change must carry.
    pub csrf: String,
    pub created_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
}

/// Dead letters of one type and error category.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterGroup {
    pub tipo: String,
    /// `last_error.category`; `None` for dead letters without an error.
    pub category: Option<String>,
    pub count: i64,
    /// When the newest of them was dead-lettered.
    pub newest: DateTime<Utc>,
    /// One of their error messages.
    pub example: Option<String>,
}

/// One recorded attempt of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub attempt: u32,
    pub finished_at: DateTime<Utc>,
    /// The status the attempt left the event in.
    pub outcome: String,
    pub error: Option<LastError>,
    pub trace: Vec<StageTrace>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    pub destination: String,
    pub delivered_at: DateTime<Utc>,
    pub status_code: Option<u16>,
}

/// Which terminal events have expired: those that reached their status
/// (`updated_at`: terminal events are not updated again) before these.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expiry {
    pub processed_before: DateTime<Utc>,
    pub dead_lettered_before: DateTime<Utc>,
}

/// Events a purge removed, or would remove, by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Purged {
    pub processed: u64,
    pub dead_lettered: u64,
    /// Time partitions dropped whole (PostgreSQL).
    #[serde(default)]
    pub partitions: u64,
}

impl Purged {
    pub fn total(&self) -> u64 {
        self.processed + self.dead_lettered
    }

    pub fn add(&mut self, other: Purged) {
        self.processed += other.processed;
        self.dead_lettered += other.dead_lettered;
        self.partitions += other.partitions;
    }
}

/// A background task's lease and its last report, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub holder: Option<String>,
    pub lease_until: DateTime<Utc>,
    /// The last run's report (JSON), as the task saved it.
    pub last_run: Option<Value>,
}

/// The database's upkeep: retention, counter roll-ups, and the leases that
/// let one process of a cluster at a time do them.
#[async_trait]
pub trait MaintenanceStore: Send + Sync {
    /// How many events [`MaintenanceStore::purge_expired`] would remove.
    async fn count_expired(&self, expiry: &Expiry) -> StoreResult<Purged>;
    /// Removes expired events, with everything they own (attempts,
    /// deliveries, idempotency key) and their share of the counters, in one
    /// transaction: a whole time partition (PostgreSQL), or at most `limit`
    /// events row by row. Events that are not terminal are never removed.
    /// Call again while it removes a partition or `limit` events.
    async fn purge_expired(&self, expiry: &Expiry, limit: u32) -> StoreResult<Purged>;
    /// Makes the storage the next events need ahead of time (PostgreSQL: time
    /// partitions of `period`, from `now` to at least `ahead` and four
    /// periods ahead); how many partitions it made.
    async fn prepare(
        &self,
        now: DateTime<Utc>,
        period: std::time::Duration,
        ahead: std::time::Duration,
    ) -> StoreResult<u32>;
    /// Folds old counter rows into coarser ones and gives the space freed by
    /// purges back (SQLite); cheap when there is nothing to do.
    async fn compact(&self, now: DateTime<Utc>) -> StoreResult<()>;
    /// Takes (or renews) the lease of `task` for `holder` until `until`;
    /// `false` while another holder's lease runs.
    async fn take_lease(
        &self,
        task: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Ends `holder`'s lease of `task` and keeps `report` as its last run.
    async fn finish_task(&self, task: &str, holder: &str, report: &Value) -> StoreResult<()>;
    async fn task_state(&self, task: &str) -> StoreResult<Option<TaskState>>;
}
