//! Which script is running on this thread: its origin (for log records) and
//! its reference tables (for `lookup`).
//!
//! Rhai calls the registered helpers and the print/debug hooks without any
//! handle on the script being run, and one engine serves every script and
//! thread; so the host installs this context around each run, per thread.

use std::cell::RefCell;
use std::sync::Arc;

use rhai::Position;

use super::error::ScriptOrigin;
use crate::tables::Tables;

thread_local! {
    /// Origin of the script run currently executing on this thread (for logs).
    static CURRENT_ORIGIN: RefCell<Option<Arc<ScriptOrigin>>> = const { RefCell::new(None) };
    /// Reference tables of the script run currently executing on this thread.
    static CURRENT_TABLES: RefCell<Option<Arc<Tables>>> = const { RefCell::new(None) };
}

/// Installs the context of one run; restores the previous one on drop (also
/// on panic).
pub(super) struct RunContext {
    prev_origin: Option<Arc<ScriptOrigin>>,
    prev_tables: Option<Arc<Tables>>,
}

impl RunContext {
    pub(super) fn enter(origin: &Arc<ScriptOrigin>, tables: &Arc<Tables>) -> Self {
        let prev_origin = CURRENT_ORIGIN.with(|o| o.replace(Some(Arc::clone(origin))));
        let prev_tables = CURRENT_TABLES.with(|t| t.replace(Some(Arc::clone(tables))));
        Self {
            prev_origin,
            prev_tables,
        }
    }
}

impl Drop for RunContext {
    fn drop(&mut self) {
        let prev = self.prev_origin.take();
        CURRENT_ORIGIN.with(|o| *o.borrow_mut() = prev);
        let prev = self.prev_tables.take();
        CURRENT_TABLES.with(|t| *t.borrow_mut() = prev);
    }
}

/// `"file:line"` of the script running on this thread, for log records.
pub(super) fn current_location(pos: Position) -> String {
    CURRENT_ORIGIN.with(|o| match o.try_borrow().ok().as_deref() {
        Some(Some(origin)) => origin.location(pos),
        _ => "<script>".to_string(),
    })
}

/// Calls `f` with the tables of the script running on this thread (`None`
/// outside a run).
pub(super) fn with_current_tables<R>(f: impl FnOnce(Option<&Tables>) -> R) -> R {
    CURRENT_TABLES.with(|tables| f(tables.borrow().as_deref()))
}
