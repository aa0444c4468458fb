//! Redis key names. They mirror apalis-redis 1.0's `Config`: the apalis queue
//! name is `{prefix}:{queue}`, and each queue's keys hang below it
//! (`:active`, `:scheduled`, `:data`, `:meta:<id>`, `:signal`, `:workers`,
//! `:inflight:<worker>`, `:done`, `:dead`, `:workers:metadata:<worker>`);
//! `:delayed`, `:fair` and `:flows` are ours. Only apalis's registry of queues lives outside the
//! prefix.

/// apalis's global sorted set of every queue name.
#[cfg(test)]
pub(super) const QUEUE_REGISTRY: &str = "core:apalis:queues:list";

/// The apalis queue name of `queue` under `prefix` (no prefix: `queue` itself).
pub(super) fn apalis_queue(prefix: &str, queue: &str) -> String {
    if prefix.is_empty() {
        queue.to_owned()
    } else {
        format!("{prefix}:{queue}")
    }
}

/// The key names of one apalis queue.
pub(super) struct Keys(String);

impl Keys {
    pub(super) fn new(prefix: &str, queue: &str) -> Self {
        Keys(apalis_queue(prefix, queue))
    }
    /// Ids due now, in order; `fetch_next.lua` takes a batch from its head.
    pub(super) fn active(&self) -> String {
        format!("{}:active", self.0)
    }
    /// apalis's own delayed tasks (score: epoch seconds).
    pub(super) fn scheduled(&self) -> String {
        format!("{}:scheduled", self.0)
    }
    /// Our delayed tasks (score: server-clock milliseconds).
    pub(super) fn delayed(&self) -> String {
        format!("{}:delayed", self.0)
    }
    /// Due ids waiting for the active list, scored by fair-sharing tag.
    pub(super) fn fair(&self) -> String {
        format!("{}:fair", self.0)
    }
    /// The partners' finish tags and the largest tag given (`:high`).
    pub(super) fn flows(&self) -> String {
        format!("{}:flows", self.0)
    }
    /// The keys of the push script, in its order.
    pub(super) fn push(&self) -> [String; 7] {
        [
            self.data(),
            self.active(),
            self.signal(),
            self.delayed(),
            self.meta(),
            self.fair(),
            self.flows(),
        ]
    }
    /// Payloads by task id.
    pub(super) fn data(&self) -> String {
        format!("{}:data", self.0)
    }
    /// Prefix of the per-task metadata hashes (`…:meta:<id>`).
    pub(super) fn meta(&self) -> String {
        format!("{}:meta", self.0)
    }
    pub(super) fn signal(&self) -> String {
        format!("{}:signal", self.0)
    }
    /// Registered workers (score: last heartbeat, epoch seconds).
    pub(super) fn workers(&self) -> String {
        format!("{}:workers", self.0)
    }
    /// Prefix of the per-worker in-flight sets.
    pub(super) fn inflight(&self) -> String {
        format!("{}:inflight", self.0)
    }
    pub(super) fn inflight_of(&self, worker: &str) -> String {
        format!("{}:inflight:{worker}", self.0)
    }
    pub(super) fn worker_metadata(&self, worker: &str) -> String {
        format!("{}:workers:metadata:{worker}", self.0)
    }
    pub(super) fn done(&self) -> String {
        format!("{}:done", self.0)
    }
    pub(super) fn dead(&self) -> String {
        format!("{}:dead", self.0)
    }
}
