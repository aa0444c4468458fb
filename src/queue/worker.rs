//! The apalis worker both backends run: built the same way on each (the
//! backend differs, nothing else), every delivered task handed to the
//! [`TaskHandler`] and reported to apalis as done, and the worker's event
//! stream driven to its end.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use apalis::prelude::{
    Backend, Event, ParallelizeExt, Task, WorkerBuilder, WorkerBuilderExt, WorkerContext, WorkerError,
};
use apalis_codec::json::JsonCodec;
use apalis_core::backend::finalize::Durable;
use apalis_core::backend::persistence::TaskPersistLayer;
use apalis_core::backend::{BackendConfig, WireFormatBackend};
use futures::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tracing::{error, warn};

use super::TaskHandler;
use super::codec::{Incoming, TaskCodec};
use super::supervisor::BoxFut;

/// An apalis 1.0 storage with [`TaskCodec`] on top, as each backend provides one.
///
/// apalis-redis's and apalis-sqlite's storages both fetch raw `Vec<u8>` payloads, are
/// durable (tasks are acknowledged back to them), and take the same middleware,
/// `TaskPersistLayer<JsonCodec<Value>, Value>`; naming that layer is what lets the
/// compiler check the worker's whole service stack in [`run`], once for both.
pub(crate) trait Storage:
    Backend<Task = Task<Vec<u8>>>
    + BackendConfig<Args = Incoming, Kind = Durable, Layer = TaskPersistLayer<JsonCodec<Value>, Value>>
    + WireFormatBackend<Codec = TaskCodec, Compact = Vec<u8>>
    + Send
    + Unpin
    + 'static
{
}

impl<B> Storage for B where
    B: Backend<Task = Task<Vec<u8>>>
        + BackendConfig<Args = Incoming, Kind = Durable, Layer = TaskPersistLayer<JsonCodec<Value>, Value>>
        + WireFormatBackend<Codec = TaskCodec, Compact = Vec<u8>>
        + Send
        + Unpin
        + 'static
{
}

/// Runs one worker instance named `ctx.name()` on `storage` until its stream ends.
pub(crate) fn run(
    storage: impl Storage,
    queue: Arc<str>,
    ctx: WorkerContext,
    concurrency: usize,
    handler: Arc<dyn TaskHandler>,
) -> BoxFut<()> {
    // Built outside the async block and boxed as `dyn Stream + Send`: proving `Send` for
    // apalis's worker types inside an async block trips rustc's higher-ranked lifetime
    // checks.
    let q = queue.clone();
    let worker = WorkerBuilder::new(&ctx)
        .backend(storage)
        .concurrency(concurrency)
        .parallelize(tokio::spawn)
        .build(move |incoming: Incoming| {
            let handler = handler.clone();
            let q = q.clone();
            async move {
                dispatch(handler, q, incoming).await;
                Ok::<(), std::convert::Infallible>(())
            }
        });
    let stream = worker.stream().boxed();
    Box::pin(drive_worker(stream, ctx, queue))
}

/// Runs the handler for one delivered task. Always "succeeds" towards apalis.
async fn dispatch(handler: Arc<dyn TaskHandler>, queue: Arc<str>, incoming: Incoming) {
    match incoming.0 {
        Ok(task) => {
            if let Err(panic) = AssertUnwindSafe(handler.handle(task)).catch_unwind().await {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                error!(queue = %queue, panic = %msg, "task handler panicked; task dropped (the sweeper re-queues it)");
            }
        }
        Err(e) => error!(queue = %queue, error = %e, "dropping undecodable queue task"),
    }
}

/// Drives one apalis worker stream to its end.
///
/// apalis's `Worker::run` returns on the first error and drops everything in flight. We
/// keep polling instead: after an error the worker is told to stop, so it finishes its
/// in-flight tasks, flushes their acknowledgements and closes the backend. A second error
/// can only come from closing; polling after that is not safe, so we stop there.
async fn drive_worker<S>(stream: S, ctx: WorkerContext, queue: Arc<str>)
where
    S: Stream<Item = Result<Event, WorkerError>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    let mut errors = 0u32;
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Error(e)) => warn!(queue = %queue, worker = %ctx.name(), error = %e, "task error"),
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                error!(queue = %queue, worker = %ctx.name(), error = %e, "worker backend error");
                if errors > 1 || ctx.is_shutting_down() {
                    break;
                }
                // Wind down gracefully; the supervisor starts a fresh instance.
                let _ = ctx.stop();
            }
        }
    }
}
