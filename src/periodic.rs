//! A background pass that runs at once and then every interval until
//! shutdown (the sweeper and the destination waker).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// Runs `pass` now, then again `interval` after each pass ends, until
/// `shutdown` turns true (a pass in progress finishes first).
pub async fn every<F, Fut>(interval: Duration, mut shutdown: watch::Receiver<bool>, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        if *shutdown.borrow() {
            return;
        }
        pass().await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
    }
}
