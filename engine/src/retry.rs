//! What a pipeline's [`RetryPolicy`] decides after a failed attempt: retry
//! after a delay, or dead-letter.
//!
//! The service's worker, its dry run and the pipeline tests
//! ([`crate::fixtures`]) all ask [`RetryPolicy::decide`], so the three can
//! never disagree on what an attempt's failure leads to.

use std::time::Duration;

use crate::model::{Backoff, RetryPolicy};
use crate::stage::StageError;

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Run the event again after `delay`.
    Retry { delay: Duration },
    /// Nothing failed: the event waits for a destination (until the
    /// epoch-millisecond `until_ms`, or until woken when `park`), and the
    /// attempt does not count against the retry budget. The service
    /// dead-letters it once it has waited longer than the destination's
    /// `max_wait`.
    Wait { until_ms: i64, park: bool },
    /// Give up: the failure is permanent or the attempts are used up.
    DeadLetter,
}

impl RetryPolicy {
    /// Attempts an event gets (the first one and its retries) before a
    /// transient failure dead-letters it.
    pub fn max_attempts(&self) -> u32 {
        self.max_retries.saturating_add(1)
    }

    /// The decision after `error` ended an attempt. `attempt`: 1-based
    /// attempts made since the last manual retry, including the one that just
    /// failed.
    ///
    /// A `Retry-After` the error carries delays the retry at least that long,
    /// capped by `max_delay`.
    pub fn decide(&self, error: &StageError, attempt: u32) -> RetryDecision {
        if let Some(w) = error.wait.as_ref().filter(|_| error.is_waiting()) {
            return RetryDecision::Wait {
                until_ms: w.until_ms,
                park: w.park,
            };
        }
        if error.is_transient() && attempt < self.max_attempts() {
            let asked = error
                .retry_after_ms
                .map(|ms| Duration::from_millis(ms).min(self.max_delay))
                .unwrap_or_default();
            RetryDecision::Retry {
                delay: self.delay_for(attempt).max(asked),
            }
        } else {
            RetryDecision::DeadLetter
        }
    }

    /// Delay before retry number `retry` (1-based): 1s, 4s, 16s with the defaults.
    pub fn delay_for(&self, retry: u32) -> Duration {
        let delay = match self.backoff {
            Backoff::Fixed => self.initial_delay,
            Backoff::Exponential => {
                let exp = retry.saturating_sub(1).min(64) as i32;
                let secs = self.initial_delay.as_secs_f64() * self.multiplier.powi(exp);
                if secs.is_finite() && secs < self.max_delay.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    self.max_delay
                }
            }
        };
        delay.min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient() -> StageError {
        StageError::transient("delivery", "erp: timed out")
    }

    #[test]
    fn default_backoff_is_1_4_16_seconds() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay_for(1), Duration::from_secs(1));
        assert_eq!(p.delay_for(2), Duration::from_secs(4));
        assert_eq!(p.delay_for(3), Duration::from_secs(16));
        assert_eq!(p.delay_for(60), Duration::from_secs(600));
    }

    #[test]
    fn fixed_backoff_and_cap() {
        let p = RetryPolicy {
            backoff: Backoff::Fixed,
            initial_delay: Duration::from_secs(20),
            max_delay: Duration::from_secs(5),
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay_for(3), Duration::from_secs(5));
    }

    #[test]
    fn transient_failure_with_attempts_left_is_retried_after_the_backoff() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts(), 4);
        assert_eq!(
            p.decide(&transient(), 1),
            RetryDecision::Retry {
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            p.decide(&transient(), 3),
            RetryDecision::Retry {
                delay: Duration::from_secs(16)
            }
        );
    }

    #[test]
    fn transient_failure_of_the_last_attempt_is_dead_lettered() {
        let p = RetryPolicy::default();
        assert_eq!(p.decide(&transient(), 4), RetryDecision::DeadLetter);
        // A crash mid-attempt can leave the count above the budget.
        assert_eq!(p.decide(&transient(), 9), RetryDecision::DeadLetter);
    }

    #[test]
    fn permanent_failure_is_dead_lettered_at_once() {
        let p = RetryPolicy::default();
        let e = StageError::permanent("validation", "/valor: required");
        assert_eq!(p.decide(&e, 1), RetryDecision::DeadLetter);
    }

    #[test]
    fn retry_after_delays_the_retry_up_to_max_delay() {
        let p = RetryPolicy {
            max_delay: Duration::from_secs(30),
            ..RetryPolicy::default()
        };
        let mut e = transient();
        e.retry_after_ms = Some(3_000);
        assert_eq!(
            p.decide(&e, 1),
            RetryDecision::Retry {
                delay: Duration::from_secs(3)
            }
        );
        // The backoff wins when it is longer.
        assert_eq!(
            p.decide(&e, 3),
            RetryDecision::Retry {
                delay: Duration::from_secs(16)
            }
        );
        e.retry_after_ms = Some(3_600_000);
        assert_eq!(
            p.decide(&e, 1),
            RetryDecision::Retry {
                delay: Duration::from_secs(30)
            }
        );
    }

    #[test]
    fn a_wait_is_not_a_failure_even_past_the_budget() {
        let p = RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        };
        let e = StageError::waiting(
            "destination_unavailable",
            "erp: circuit open",
            crate::stage::Wait {
                destination: "erp".into(),
                until_ms: 42,
                park: true,
            },
        );
        assert_eq!(
            p.decide(&e, 7),
            RetryDecision::Wait {
                until_ms: 42,
                park: true
            }
        );
    }

    #[test]
    fn no_retries_means_one_attempt() {
        let p = RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.max_attempts(), 1);
        assert_eq!(p.decide(&transient(), 1), RetryDecision::DeadLetter);
        let p = RetryPolicy {
            max_retries: u32::MAX,
            ..RetryPolicy::default()
        };
        assert_eq!(p.max_attempts(), u32::MAX);
    }
}
