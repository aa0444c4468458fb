//! Rhai scripting for event enrichment and routing.
//!
//! Analysts write Rhai scripts that see the current event as `event`
//! (`#{id, tipo, partner_id, received_at, dados, meta}`, see
//! [`crate::stage::Event`]), may change `event.dados` and `event.meta`, and
//! return a value (typically an array of destination names for routing
//! scripts).
//!
//! Scripts are compiled once ([`ScriptHost::compile`]) and run many times
//! ([`ScriptHost::run`], or [`ScriptHost::evaluate`] for scripts that only
//! read the event) under a budget ([`ScriptLimits`]). `eval` and `import` are
//! not available to scripts.
//!
//! The module is split by concern, and the dependencies point one way, away
//! from the host: `host` uses all the others; `helpers` use `context` and
//! `error`; `budget` and `context` use `error`; `context` reads
//! [`crate::tables`], which uses `convert` and never the host.
//!
//! * `host` – [`ScriptHost`] and [`CompiledScript`]: compile, run, evaluate;
//! * `budget` – [`ScriptLimits`] and the per-thread wall-time deadline;
//! * `context` – which script runs on this thread (for logs and lookups);
//! * `helpers` – the functions registered for analysts (`reject`, `lookup`, …);
//! * `error` – [`ScriptError`], [`ScriptCompileError`], [`ScriptOrigin`] and
//!   the mapping of Rhai's errors to them;
//! * `convert` – JSON ↔ Rhai `Dynamic`.

mod budget;
mod context;
pub(crate) mod convert;
mod error;
mod helpers;
mod host;
#[cfg(test)]
mod testkit;

pub use budget::ScriptLimits;
pub use error::{ScriptCompileError, ScriptError, ScriptOrigin};
pub use host::{CompiledScript, ScriptHost};
