//! Group commit: concurrent single-event writes (an ingest insert, a worker's
//! claim, an attempt's outcome) coalesced into one transaction of multi-row
//! statements.
//!
//! Each kind of write has a [`Coalescer`]: callers [`submit`](Coalescer::submit)
//! one item and await its own result; a few flusher tasks each take whatever
//! is waiting (up to a batch) and run it as one [`BatchOp`]. Nothing waits to
//! fill a batch: under light load a batch is one item and costs what a single
//! write did; under load the batches grow by themselves while earlier ones are
//! in flight, so statements and commits per event fall as the load rises.
//!
//! A batch is atomic, so one bad item must not fail its neighbours: when a
//! batch of several fails with a database error (not an unreachable
//! database), every item is run again alone and gets its own result.
//!
//! The channel is bounded: when every flusher is busy and the channel is
//! full, callers wait (backpressure) instead of buffering without limit.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures::FutureExt as _;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{StoreError, StoreResult};

/// One kind of write, run for many items at once.
#[async_trait]
pub(crate) trait BatchOp: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    type Out: Send + 'static;
    /// Runs `items` atomically; one output per item, in order.
    async fn run(&self, items: &[Self::Item]) -> StoreResult<Vec<Self::Out>>;
}

type Job<T> = (
    <T as BatchOp>::Item,
    oneshot::Sender<StoreResult<<T as BatchOp>::Out>>,
);

pub(crate) struct Coalescer<T: BatchOp> {
    tx: mpsc::Sender<Job<T>>,
}

/// The histogram of batch sizes, `store_write_batch_size{write}`: how much
/// group commit is saving. Registered by the caller (the store exists before
/// the metrics registry).
pub(crate) fn batch_size_histogram() -> prometheus::HistogramVec {
    let opts = prometheus::HistogramOpts::new(
        "store_write_batch_size",
        "Writes per group-committed store transaction, by write (insert, claim, finish).",
    )
    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0]);
    prometheus::HistogramVec::new(opts, &["write"]).unwrap_or_else(|e| panic!("store_write_batch_size: {e}"))
}

impl<T: BatchOp> Coalescer<T> {
    /// Starts `flushers` tasks on the current runtime; they end when the
    /// coalescer is dropped and the waiting items are done.
    pub(crate) fn start(op: T, flushers: usize, max_batch: usize, sizes: prometheus::Histogram) -> Self {
        let (tx, rx) = mpsc::channel::<Job<T>>(max_batch * flushers * 4);
        let rx = Arc::new(Mutex::new(rx));
        let op = Arc::new(op);
        for _ in 0..flushers.max(1) {
            tokio::spawn(flush_loop(
                op.clone(),
                rx.clone(),
                max_batch.max(1),
                sizes.clone(),
            ));
        }
        Self { tx }
    }

    /// Runs `item` in the next batch and returns its own result.
    pub(crate) async fn submit(&self, item: T::Item) -> StoreResult<T::Out> {
        let (reply, result) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| StoreError::Unavailable("the store is shutting down".into()))?;
        result
            .await
            .map_err(|_| StoreError::Unavailable("the store's write task ended".into()))?
    }
}

async fn flush_loop<T: BatchOp>(
    op: Arc<T>,
    rx: Arc<Mutex<mpsc::Receiver<Job<T>>>>,
    max_batch: usize,
    sizes: prometheus::Histogram,
) {
    let mut jobs = Vec::with_capacity(max_batch);
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, max_batch).await == 0 {
                return;
            }
        }
        sizes.observe(jobs.len() as f64);
        let (items, replies): (Vec<_>, Vec<_>) = jobs.drain(..).unzip();
        // A panic must not take this kind of write down with the flusher.
        let results = match AssertUnwindSafe(run_batch(op.as_ref(), &items))
            .catch_unwind()
            .await
        {
            Ok(results) => results,
            Err(_) => {
                tracing::error!(writes = items.len(), "a group-committed batch panicked");
                items
                    .iter()
                    .map(|_| Err(StoreError::Database("the write panicked".into())))
                    .collect()
            }
        };
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have gone (a dropped request); its write stands.
            let _ = reply.send(result);
        }
    }
}

/// The batch's results, one per item. A batch that met an unreachable or
/// busy database (a dead pooled connection, a deadlock, a lock timeout) is
/// run once more as a whole, on another connection; one that failed
/// otherwise is retried item by item, so that only the faulty item fails.
async fn run_batch<T: BatchOp>(op: &T, items: &[T::Item]) -> Vec<StoreResult<T::Out>> {
    let mut result = op.run(items).await;
    if let Err(StoreError::Unavailable(e)) = &result {
        tracing::warn!(writes = items.len(), error = %e, "a group-committed batch failed; running it once more");
        result = op.run(items).await;
    }
    let err = match result {
        Ok(outs) if outs.len() == items.len() => return outs.into_iter().map(Ok).collect(),
        Ok(outs) => StoreError::Database(format!(
            "a batch of {} writes returned {} results",
            items.len(),
            outs.len()
        )),
        Err(e) => e,
    };
    if items.len() == 1 || matches!(err, StoreError::Unavailable(_)) {
        return items.iter().map(|_| Err(err.clone())).collect();
    }
    tracing::warn!(writes = items.len(), error = %err, "a group-committed batch failed; running its writes one by one");
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        out.push(match op.run(std::slice::from_ref(item)).await {
            Ok(mut one) if one.len() == 1 => Ok(one.remove(0)),
            Ok(_) => Err(StoreError::Database("a write returned no result".into())),
            Err(e) => Err(e),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Doubles numbers; fails any batch holding a negative one.
    struct Double {
        batches: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl BatchOp for Double {
        type Item = i64;
        type Out = i64;
        async fn run(&self, items: &[i64]) -> StoreResult<Vec<i64>> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if items.iter().any(|i| *i < 0) {
                return Err(StoreError::Database(format!("negative in {items:?}")));
            }
            Ok(items.iter().map(|i| i * 2).collect())
        }
    }

    #[tokio::test]
    async fn concurrent_items_share_batches_and_a_bad_one_fails_alone() {
        let c = Arc::new(Coalescer::start(
            Double {
                batches: Arc::default(),
            },
            1,
            64,
            batch_size_histogram().with_label_values(&["test"]),
        ));
        let tasks: Vec<_> = (-1..200i64)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { (i, c.submit(i).await) })
            })
            .collect();
        for t in tasks {
            let (i, r) = t.await.expect("task");
            if i < 0 {
                let e = r.expect_err("the negative item fails");
                assert!(e.to_string().contains("negative in [-1]"), "{e}");
            } else {
                assert_eq!(r.expect("others succeed"), i * 2);
            }
        }
    }

    /// Fails its first call with a busy database, then panics on item 7.
    struct Flaky {
        calls: AtomicUsize,
    }

    #[async_trait]
    impl BatchOp for Flaky {
        type Item = i64;
        type Out = i64;
        async fn run(&self, items: &[i64]) -> StoreResult<Vec<i64>> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(StoreError::Unavailable("database busy".into()));
            }
            assert!(!items.contains(&7), "item 7 panics");
            Ok(items.to_vec())
        }
    }

    #[tokio::test]
    async fn a_busy_batch_runs_again_and_a_panic_fails_only_its_batch() {
        let c = Coalescer::start(
            Flaky {
                calls: AtomicUsize::new(0),
            },
            1,
            10,
            batch_size_histogram().with_label_values(&["test"]),
        );
        // The first call fails as busy: the batch runs once more and succeeds.
        assert_eq!(c.submit(1).await.expect("second run succeeds"), 1);
        let e = c.submit(7).await.expect_err("the panic is the caller's error");
        assert!(e.to_string().contains("panicked"), "{e}");
        // The flusher survived the panic.
        assert_eq!(c.submit(8).await.expect("still serving"), 8);
    }

    #[tokio::test]
    async fn load_builds_batches() {
        let batches = Arc::new(AtomicUsize::new(0));
        let op = Double {
            batches: batches.clone(),
        };
        let sizes = batch_size_histogram().with_label_values(&["test"]);
        let c = Arc::new(Coalescer::start(op, 1, 50, sizes.clone()));
        let tasks: Vec<_> = (0..500i64)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.submit(i).await })
            })
            .collect();
        let mut sum = 0;
        for t in tasks {
            sum += t.await.expect("task").expect("ok");
        }
        assert_eq!(sum, (0..500i64).sum::<i64>() * 2);
        // 500 writes waiting together go in full batches of 50, not one by one.
        let n = batches.load(Ordering::SeqCst);
        assert!((10..=20).contains(&n), "{n} batches for 500 items");
        assert_eq!(sizes.get_sample_count() as usize, n);
        assert_eq!(sizes.get_sample_sum(), 500.0);
    }
}
