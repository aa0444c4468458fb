//! The Lua scripts of the Redis queue, one `.lua` file each (their header
//! comments list the keys and arguments), and the `EVAL` that runs one.
//! Every script touches the keys of one queue only (see [`super::keys`]).

/// Due-now ids get their fair-sharing tag in `{queue}:fair` and the active
/// list is topped up from it; delayed ones go to `{queue}:delayed`.
/// Metadata mirrors apalis's `batch_push.lua`
/// (attempts/max_attempts/status/idempotency_key), which is what
/// `fetch_next.lua` and `deserialize_with_meta` need.
pub(super) const PUSH: &str = concat!(include_str!("feed.lua"), include_str!("push.lua"));

/// Tops the active list up from `{queue}:fair`, lowest tag first.
pub(super) const FEED: &str = concat!(include_str!("feed.lua"), include_str!("feed_call.lua"));

/// Promotes due ids in bounded chunks (never more than `ARGV[1]` per
/// `unpack`).
pub(super) const PROMOTE: &str = include_str!("promote.lua");

/// Drops ids at the head of the active list whose data or metadata is gone:
/// `fetch_next` would fail on them for ever.
pub(super) const SANITIZE: &str = include_str!("sanitize.lua");

/// A stopped instance: hands its claimed-but-unfinished ids back and
/// deregisters it (apalis's own close path removes the wrong member from the
/// workers set).
pub(super) const RETIRE: &str = include_str!("retire.lua");

/// Deletes data and metadata of finished tasks (apalis keeps them for ever).
pub(super) const JANITOR: &str = include_str!("janitor.lua");

/// Pending = active + fair + delayed + scheduled + claimed by live workers.
pub(super) const DEPTH: &str = include_str!("depth.lua");

/// An `EVAL` of `script` over `keys`; the caller appends the arguments.
pub(super) fn eval(script: &str, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(keys);
    cmd
}
