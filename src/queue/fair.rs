//! Fair sharing between the partners of one queue: start-time fair queuing.
//!
//! Every task gets a *tag* in the queue's virtual time, and a queue serves
//! its due tasks in tag order. A partner's next task starts where its last
//! one ended (`finish`), or at the queue's head (`V`) when that is later; a
//! task advances its partner's finish by [`cost`] (`COST_UNIT / weight`).
//! So a partner that floods a queue only queues behind itself: its tags run
//! ahead of V, and a partner that was idle starts at V, next in line. Idle
//! partners cost nothing (no state beyond one number each); a partner of
//! weight 3 gets three tasks through for every one of a partner of weight 1.
//!
//! V is taken once per push: the tasks of one bulk push start from the same
//! V, however many the push holds.
//!
//! Delayed tasks (scheduled retries) charge nobody: they are work the
//! partner already had its turn for. SQLite tags them at V when they fall
//! due (until then they wait at the lowest priority, out of every fetch's
//! way); Redis promotes them, once due, straight to the active list,
//! ahead of every partner's waiting tasks (not through the fair set).
//!
//! SQLite keeps the partners' finish tags in the process ([`Flows`]) and
//! reads V from its queue (the first due task's priority); Redis keeps
//! both in the queue's keys and computes tags in its push script.

use std::collections::HashMap;

/// Virtual time of one task of weight 1. Tags stay exact integers in a
/// double (Redis scores) for 2^53 / 1000 tasks per queue.
pub(crate) const COST_UNIT: u64 = 1000;
/// Weights are clamped to 1..=MAX_WEIGHT (the partner API refuses others).
pub(crate) const MAX_WEIGHT: u32 = 1000;
/// Past this many partners, those behind V are forgotten (they start at V
/// anyway).
const PRUNE_AT: usize = 10_000;

/// The virtual time a task of `weight` takes.
pub(crate) fn cost(weight: u32) -> u64 {
    COST_UNIT / u64::from(weight.clamp(1, MAX_WEIGHT))
}

/// The partners' finish tags of one queue, and the largest tag given.
#[derive(Debug, Default)]
pub(crate) struct Flows {
    finish: HashMap<String, u64>,
    high: u64,
    /// The size at which the next prune runs: [`PRUNE_AT`], or twice what
    /// the last prune kept, so a map of partners that are all ahead of V
    /// is not scanned again on every task.
    prune_at: usize,
}

impl Flows {
    /// Sees a tag that is in the queue already (after a restart, the
    /// queue's newest task): new tags never start before it when the
    /// queue has no due task.
    pub(crate) fn observe(&mut self, tag: u64) {
        self.high = self.high.max(tag);
    }

    /// V, when the queue's first due task has tag `head` (`None`: nothing
    /// is due): taken once per push, for all of its tasks.
    pub(crate) fn v(&self, head: Option<u64>) -> u64 {
        head.unwrap_or(self.high)
    }

    /// The tag of a task of `partner` pushed at V = `v`.
    pub(crate) fn next(&mut self, v: u64, partner: &str, weight: u32) -> u64 {
        if self.finish.len() >= self.prune_at.max(PRUNE_AT) {
            self.finish.retain(|_, f| *f > v);
            self.prune_at = 2 * self.finish.len();
        }
        let f = self.finish.entry(partner.to_owned()).or_insert(0);
        let start = v.max(*f);
        *f = start + cost(weight);
        self.high = self.high.max(start);
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_partner_queues_behind_itself() {
        let mut f = Flows::default();
        let a: Vec<u64> = (0..5).map(|_| f.next(0, "a", 1)).collect();
        assert_eq!(a, vec![0, 1000, 2000, 3000, 4000]);
        // B arrives while A's backlog waits: B starts at the head.
        assert_eq!(f.next(0, "b", 1), 0);
        assert_eq!(f.next(0, "b", 1), 1000);
        // The head moved on; A's next is behind its own backlog.
        assert_eq!(f.next(2000, "a", 1), 5000);
        // B, idle meanwhile, starts at the head again.
        assert_eq!(f.next(3000, "b", 1), 3000);
    }

    #[test]
    fn weights_divide_the_cost() {
        let mut f = Flows::default();
        assert_eq!(f.next(0, "heavy", 4), 0);
        assert_eq!(f.next(0, "heavy", 4), 250);
        assert_eq!(f.next(0, "light", 1), 0);
        assert_eq!(f.next(0, "light", 1), 1000);
        assert_eq!(cost(0), 1000);
        assert_eq!(cost(5000), 1);
    }

    #[test]
    fn an_empty_queue_starts_at_the_largest_tag() {
        let mut f = Flows::default();
        f.observe(7000);
        let v = f.v(None);
        assert_eq!(f.next(v, "a", 1), 7000);
        // One push: every task starts from the same V.
        assert_eq!(f.next(v, "b", 1), 7000);
        assert_eq!(f.v(Some(3000)), 3000);
    }

    /// Flows holding [`PRUNE_AT`] partners, all one task ahead of V = 0.
    fn full_flows() -> Flows {
        let mut f = Flows::default();
        for i in 0..PRUNE_AT {
            f.next(0, &format!("p{i}"), 1);
        }
        f
    }

    #[test]
    fn pruning_forgets_partners_behind_the_head() {
        let mut f = full_flows();
        f.next(5000, "late", 1);
        assert_eq!(f.finish.len(), 1);
    }

    #[test]
    fn a_prune_that_keeps_everyone_waits_for_twice_as_many() {
        let mut f = full_flows();
        // Everyone is ahead of V = 0: the prune keeps them all, and the
        // next one waits until the map has doubled.
        f.next(0, "x", 1);
        assert_eq!(f.finish.len(), PRUNE_AT + 1);
        assert_eq!(f.prune_at, 2 * PRUNE_AT);
        f.next(0, "y", 1);
        assert_eq!(f.prune_at, 2 * PRUNE_AT);
    }
}
