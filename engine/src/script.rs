//! Rhai scripting for event enrichment and routing.
//!
//! Analysts write Rhai scripts that see the current event as `event`
//! (`#{id, tipo, partner_id, received_at, dados, meta}`), may change
//! `event.dados` and `event.meta`, and return a value (typically an array of
//! destination names for routing scripts).
//!
//! Scripts are compiled once ([`ScriptHost::compile`]) and run many times
//! ([`ScriptHost::run`]) under a budget: operations, call depth, string /
//! array / map sizes, expression depth (checked at compile time) and wall time.
//! The wall-time deadline is kept per thread, so one [`ScriptHost`] can be
//! shared by many worker threads.
//!
//! Helper functions available to scripts:
//!
//! * `reject(reason)` – permanent business rejection ([`ScriptError::Rejected`]);
//!   it cannot be swallowed by `try`/`catch`.
//! * `log(msg)` – `tracing::info!` with target `script`.
//! * `now_iso()` – current UTC time as an RFC 3339 string (milliseconds, `Z`).
//! * `now_ms()` – current time as epoch milliseconds.
//! * `parse_iso_ms(s)` – RFC 3339 string to epoch milliseconds (error if invalid).
//! * `round(x, digits)` – round half away from zero to `digits` decimals.
//! * `lookup(table, key)` – the row of `key` in one of the pipeline's
//!   reference tables ([`crate::tables`]), a copy, or unit when there is
//!   none; `lookup(table, key, default)` returns `default` instead;
//!   `has_row(table, key)`. Keys are strings or integers; a unit key finds
//!   nothing; an undeclared table is an error.
//! * `upper(s)`, `lower(s)`, `trim(s)` – string helpers (`trim` keeps Rhai's
//!   in-place method behaviour and additionally returns the trimmed string).
//! * `print`/`debug` go to `tracing` at debug level.
//!
//! `eval` and `import` are not available to scripts.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::{
    AST, Array, Dynamic, Engine, EvalAltResult, ImmutableString, Map, NativeCallContext, ParseErrorType,
    Position, Scope,
};
use serde_json::Value;

use crate::tables::Tables;

/// Resource budget for one script run.
#[derive(Clone, Debug)]
pub struct ScriptLimits {
    /// Maximum number of Rhai operations per run (0 = unlimited).
    pub max_operations: u64,
    /// Maximum nesting of function calls.
    pub max_call_levels: usize,
    /// Maximum length of a string, in bytes (0 = unlimited).
    pub max_string_size: usize,
    /// Maximum number of elements of an array (0 = unlimited).
    pub max_array_size: usize,
    /// Maximum number of entries of an object map (0 = unlimited).
    pub max_map_size: usize,
    /// Maximum expression nesting depth, checked at compile time (0 = unlimited).
    pub max_expr_depth: usize,
    /// Maximum wall-clock time of one run.
    pub max_wall_time: Duration,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        Self {
            max_operations: 1_000_000,
            max_call_levels: 32,
            max_string_size: 1024 * 1024,
            max_array_size: 10_000,
            max_map_size: 10_000,
            max_expr_depth: 64,
            max_wall_time: Duration::from_millis(250),
        }
    }
}

/// Where a script came from, for error messages: "pipelines/venda.yaml:14" or
/// "pipelines/scripts/x.rhai:3".
#[derive(Clone, Debug)]
pub struct ScriptOrigin {
    pub file: PathBuf,
    /// Line in `file` where the script text starts minus 1 (0 for a standalone
    /// .rhai file; for an inline YAML block scalar, the YAML line before the
    /// first script line).
    pub line_offset: usize,
}

impl ScriptOrigin {
    pub fn new(file: impl Into<PathBuf>, line_offset: usize) -> Self {
        Self {
            file: file.into(),
            line_offset,
        }
    }

    /// Line in `file` for a 1-based line of the script text.
    pub fn file_line(&self, script_line: usize) -> usize {
        self.line_offset + script_line
    }

    /// `"file:line"` for a Rhai position (just `"file"` when the position is unknown).
    pub fn location(&self, pos: Position) -> String {
        match pos.line() {
            Some(line) => format!("{}:{}", self.file.display(), self.file_line(line)),
            None => self.file.display().to_string(),
        }
    }

    /// `"file:line:col"` for a Rhai position (less when parts are unknown).
    pub fn location_with_column(&self, pos: Position) -> String {
        match (pos.line(), pos.position()) {
            (Some(line), Some(col)) => format!("{}:{}:{}", self.file.display(), self.file_line(line), col),
            _ => self.location(pos),
        }
    }
}

impl fmt::Display for ScriptOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line_offset + 1)
    }
}

/// A compiled script: cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct CompiledScript {
    ast: Arc<AST>,
    origin: Arc<ScriptOrigin>,
    tables: Arc<Tables>,
}

impl CompiledScript {
    pub fn origin(&self) -> &ScriptOrigin {
        &self.origin
    }

    /// The reference tables `lookup` and `has_row` read (none by default).
    pub fn with_tables(mut self, tables: Arc<Tables>) -> Self {
        self.tables = tables;
        self
    }
}

impl fmt::Debug for CompiledScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledScript")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The `event` the script sees, as `#{id, tipo, partner_id, received_at, dados, meta}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScriptEvent {
    pub id: String,
    pub tipo: String,
    pub partner_id: String,
    pub received_at: String,
    pub dados: Value,
    pub meta: Value,
}

/// A script failed to compile.
#[derive(Debug, thiserror::Error)]
pub enum ScriptCompileError {
    /// Syntax (or other parse) error. `location` is `"file:line:col"`.
    #[error("script syntax error at {location}: {message}")]
    Syntax {
        message: String,
        location: String,
        file: PathBuf,
        /// Line in `file` (offset applied), if known.
        line: Option<usize>,
        /// 1-based column, if known.
        column: Option<usize>,
    },
    /// The script text itself exceeds a budget (expression depth, literal size).
    #[error("script exceeds its {budget} budget at {location}")]
    Budget { budget: &'static str, location: String },
}

/// A script run failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScriptError {
    /// `reject("...")` was called: permanent business rejection.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A resource budget was exceeded. `budget` is one of "operations",
    /// "call depth", "string size", "array size", "map size",
    /// "expression depth", "wall time".
    #[error("script exceeded its {budget} budget at {location}")]
    Budget { budget: &'static str, location: String },
    /// Any other error (including `throw`). `location` is `"file:line"`.
    #[error("script error at {location}: {message}")]
    Runtime { message: String, location: String },
}

impl ScriptError {
    /// Name of the exceeded budget, if this is a budget error.
    pub fn budget(&self) -> Option<&'static str> {
        match self {
            Self::Budget { budget, .. } => Some(budget),
            _ => None,
        }
    }
}

/// Termination token raised by `reject(reason)`.
#[derive(Clone, Debug)]
struct Rejection(String);

/// Termination token raised by the progress callback when the deadline passed.
#[derive(Clone, Debug)]
struct WallTimeExceeded;

/// How often (in operations) the wall-time deadline is checked.
const DEADLINE_CHECK_INTERVAL: u64 = 64;

/// Maximum nesting of JSON values converted to/from Rhai values.
const MAX_VALUE_DEPTH: usize = 200;

thread_local! {
    /// Deadline of the script run currently executing on this thread.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Origin of the script run currently executing on this thread (for logs).
    static CURRENT_ORIGIN: RefCell<Option<Arc<ScriptOrigin>>> = const { RefCell::new(None) };
    /// Reference tables of the script run currently executing on this thread.
    static CURRENT_TABLES: RefCell<Option<Arc<Tables>>> = const { RefCell::new(None) };
}

/// Installs the per-thread run context; restores the previous one on drop
/// (also on panic).
struct RunGuard {
    prev_deadline: Option<Instant>,
    prev_origin: Option<Arc<ScriptOrigin>>,
    prev_tables: Option<Arc<Tables>>,
}

impl RunGuard {
    fn enter(deadline: Option<Instant>, script: &CompiledScript) -> Self {
        let prev_deadline = DEADLINE.with(|d| d.replace(deadline));
        let prev_origin = CURRENT_ORIGIN.with(|o| o.replace(Some(Arc::clone(&script.origin))));
        let prev_tables = CURRENT_TABLES.with(|t| t.replace(Some(Arc::clone(&script.tables))));
        Self {
            prev_deadline,
            prev_origin,
            prev_tables,
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.prev_deadline));
        let prev = self.prev_origin.take();
        CURRENT_ORIGIN.with(|o| *o.borrow_mut() = prev);
        let prev = self.prev_tables.take();
        CURRENT_TABLES.with(|t| *t.borrow_mut() = prev);
    }
}

/// `"file:line"` of the script running on this thread, for log records.
fn current_location(pos: Position) -> String {
    CURRENT_ORIGIN.with(|o| match o.try_borrow().ok().as_deref() {
        Some(Some(origin)) => origin.location(pos),
        _ => "<script>".to_string(),
    })
}

/// Owns one Rhai engine configured with the limits and helper functions.
/// `Send + Sync`; share it via `Arc`.
pub struct ScriptHost {
    engine: Engine,
    limits: ScriptLimits,
}

impl fmt::Debug for ScriptHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptHost")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Default for ScriptHost {
    fn default() -> Self {
        Self::new(ScriptLimits::default())
    }
}

impl ScriptHost {
    pub fn new(limits: ScriptLimits) -> Self {
        let mut engine = Engine::new();

        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth);

        // Sandbox: no file-system modules, no runtime compilation.
        engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.disable_symbol("eval");

        engine.on_progress(|ops| {
            if ops % DEADLINE_CHECK_INTERVAL != 0 {
                return None;
            }
            let deadline = DEADLINE.with(Cell::get)?;
            (Instant::now() >= deadline).then(|| Dynamic::from(WallTimeExceeded))
        });

        engine.on_print(|text| {
            tracing::debug!(target: "script", script = %current_location(Position::NONE), "{text}");
        });
        engine.on_debug(|text, _source, pos| {
            tracing::debug!(target: "script", script = %current_location(pos), "{text}");
        });

        register_helpers(&mut engine);

        Self { engine, limits }
    }

    pub fn limits(&self) -> &ScriptLimits {
        &self.limits
    }

    pub fn compile(&self, source: &str, origin: ScriptOrigin) -> Result<CompiledScript, ScriptCompileError> {
        match self.engine.compile(source) {
            Ok(mut ast) => {
                ast.set_source(origin.file.display().to_string());
                Ok(CompiledScript {
                    ast: Arc::new(ast),
                    origin: Arc::new(origin),
                    tables: Arc::default(),
                })
            }
            Err(err) => {
                let rhai::ParseError(kind, pos) = err;
                Err(compile_error(*kind, pos, &origin))
            }
        }
    }

    /// Runs the script with `event` in scope; afterwards copies the script's
    /// changes of `event.dados` and `event.meta` back into `event` (other
    /// fields are read-only: changes to them are ignored). Returns the
    /// script's result as JSON (`Value::Null` for unit). `dados` and `meta`
    /// must stay objects, otherwise a `Runtime` error is returned. On any
    /// error `event` is left untouched.
    ///
    /// This blocks the calling thread for at most about `max_wall_time`;
    /// from async code call it via `spawn_blocking` or similar.
    pub fn run(&self, script: &CompiledScript, event: &mut ScriptEvent) -> Result<Value, ScriptError> {
        let origin = &*script.origin;
        let file_error = |message: String| ScriptError::Runtime {
            message,
            location: origin.location(Position::NONE),
        };
        let mut scope = Scope::new();
        let result = self.eval(script, event, &mut scope, false)?;

        // Variables declared by the script (possibly shadowing `event`) are dropped.
        scope.rewind(1);
        let script_event = scope
            .remove::<Dynamic>("event")
            .unwrap_or(Dynamic::UNIT)
            .flatten();
        let Some(mut script_event) = script_event.try_cast::<Map>() else {
            return Err(file_error("`event` must remain an object map".to_string()));
        };

        let result_size = self.engine.ensure_data_size_within_limits(&result);
        let dados = self.take_object_field(&mut script_event, "dados", &event.dados, origin)?;
        let meta = self.take_object_field(&mut script_event, "meta", &event.meta, origin)?;
        result_size.map_err(|err| map_eval_error(*err, origin))?;
        let output = dynamic_to_json(result, 0)
            .map_err(|e| file_error(format!("script result cannot be converted to JSON: {e}")))?;

        event.dados = dados;
        event.meta = meta;
        Ok(output)
    }

    /// Runs a script that only reads the event (a `route` script): `event` is
    /// a constant, so nothing is converted back afterwards, and a script that
    /// tries to change it fails with an error saying so. Returns the script's
    /// result as JSON.
    pub fn evaluate(&self, script: &CompiledScript, event: &ScriptEvent) -> Result<Value, ScriptError> {
        let mut scope = Scope::new();
        let result = self.eval(script, event, &mut scope, true)?;
        let origin = &*script.origin;
        self.engine
            .ensure_data_size_within_limits(&result)
            .map_err(|err| map_eval_error(*err, origin))?;
        dynamic_to_json(result, 0).map_err(|e| ScriptError::Runtime {
            message: format!("script result cannot be converted to JSON: {e}"),
            location: origin.location(Position::NONE),
        })
    }

    /// Evaluates the script with `event` in `scope`, under the budgets.
    fn eval(
        &self,
        script: &CompiledScript,
        event: &ScriptEvent,
        scope: &mut Scope<'_>,
        read_only: bool,
    ) -> Result<Dynamic, ScriptError> {
        let origin = &*script.origin;
        let event_value = event_to_dynamic(event).map_err(|e| ScriptError::Runtime {
            message: format!("event cannot be passed to the script: {e}"),
            location: origin.location(Position::NONE),
        })?;
        if read_only {
            scope.push_constant_dynamic("event", event_value);
        } else {
            scope.push_dynamic("event", event_value);
        }
        let deadline = Instant::now().checked_add(self.limits.max_wall_time);
        let result = {
            let _guard = RunGuard::enter(deadline, script);
            self.engine.eval_ast_with_scope::<Dynamic>(scope, &script.ast)
        };
        result.map_err(|err| match *err {
            EvalAltResult::ErrorAssignmentToConstant(name, pos) if read_only && name == "event" => {
                ScriptError::Runtime {
                    message:
                        "a route script cannot change `event`; change it in a `script` stage before the route"
                            .into(),
                    location: origin.location(pos),
                }
            }
            err => map_eval_error(err, origin),
        })
    }

    /// Extracts `event.<field>` after a run: it must be an object map (unless
    /// the original value was not an object and the script left it unchanged)
    /// within the size budgets (unless unchanged). Key order of the original
    /// object is preserved; new keys follow.
    ///
    /// Rhai does not re-check a map's size when a key is added by index
    /// assignment (`m[k] = v`), so the size budgets are enforced here too.
    fn take_object_field(
        &self,
        map: &mut Map,
        field: &str,
        original: &Value,
        origin: &ScriptOrigin,
    ) -> Result<Value, ScriptError> {
        let runtime = |message: String| ScriptError::Runtime {
            message,
            location: origin.location(Position::NONE),
        };
        let value = map.remove(field).unwrap_or(Dynamic::UNIT);
        let size_check = self.engine.ensure_data_size_within_limits(&value);
        let value = dynamic_to_json(value, 0)
            .map_err(|e| runtime(format!("`event.{field}` cannot be converted to JSON: {e}")))?;
        if value == *original {
            return Ok(value);
        }
        size_check.map_err(|err| map_eval_error(*err, origin))?;
        match value {
            Value::Object(_) => Ok(restore_order(original, value)),
            other => Err(runtime(format!(
                "`event.{field}` must remain an object, but the script made it {}",
                json_kind(&other)
            ))),
        }
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null / unit",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn compile_error(kind: ParseErrorType, pos: Position, origin: &ScriptOrigin) -> ScriptCompileError {
    let budget = match &kind {
        ParseErrorType::ExprTooDeep => Some("expression depth"),
        ParseErrorType::LiteralTooLarge(what, _) => Some(size_budget(what)),
        _ => None,
    };
    if let Some(budget) = budget {
        return ScriptCompileError::Budget {
            budget,
            location: origin.location_with_column(pos),
        };
    }
    ScriptCompileError::Syntax {
        message: kind.to_string(),
        location: origin.location_with_column(pos),
        file: origin.file.clone(),
        line: pos.line().map(|l| origin.file_line(l)),
        column: pos.position(),
    }
}

/// Maps Rhai's "data too large" descriptions to budget names.
fn size_budget(what: &str) -> &'static str {
    let what = what.to_ascii_lowercase();
    if what.contains("string") {
        "string size"
    } else if what.contains("map") {
        "map size"
    } else {
        // "Size of array/BLOB", "Size of BLOB"
        "array size"
    }
}

fn function_label(name: &str) -> String {
    if name.starts_with("anon$") {
        "closure".to_string()
    } else {
        format!("function '{name}'")
    }
}

fn map_eval_error(err: EvalAltResult, origin: &ScriptOrigin) -> ScriptError {
    // Unwrap calls of script-defined functions down to the innermost error,
    // remembering the call chain and the innermost known position.
    let mut err = err;
    let mut calls: Vec<String> = Vec::new();
    let mut pos = Position::NONE;
    loop {
        match err {
            EvalAltResult::ErrorInFunctionCall(name, _source, inner, call_pos) => {
                if !call_pos.is_none() {
                    pos = call_pos;
                }
                calls.push(name);
                err = *inner;
            }
            EvalAltResult::ErrorInModule(_name, inner, mod_pos) => {
                if !mod_pos.is_none() {
                    pos = mod_pos;
                }
                err = *inner;
            }
            other => {
                err = other;
                break;
            }
        }
    }
    let own_pos = err.take_position();
    if !own_pos.is_none() {
        pos = own_pos;
    }
    let location = origin.location(pos);
    let budget = |budget: &'static str| ScriptError::Budget {
        budget,
        location: location.clone(),
    };

    match &err {
        EvalAltResult::ErrorTerminated(token, _) => {
            if let Some(Rejection(reason)) = token.clone().try_cast::<Rejection>() {
                return ScriptError::Rejected(reason);
            }
            if token.is::<WallTimeExceeded>() {
                return budget("wall time");
            }
        }
        EvalAltResult::ErrorTooManyOperations(_) => return budget("operations"),
        EvalAltResult::ErrorStackOverflow(_) => return budget("call depth"),
        EvalAltResult::ErrorDataTooLarge(what, _) => return budget(size_budget(what)),
        EvalAltResult::ErrorParsing(ParseErrorType::ExprTooDeep, _) => {
            return budget("expression depth");
        }
        EvalAltResult::ErrorParsing(ParseErrorType::LiteralTooLarge(what, _), _) => {
            return budget(size_budget(what));
        }
        _ => {}
    }

    let mut message = err.to_string();
    if let Some((innermost, callers)) = calls.split_last() {
        message.push_str(&format!(" (in {}", function_label(innermost)));
        for caller in callers.iter().rev() {
            message.push_str(&format!(", called from {}", function_label(caller)));
        }
        message.push(')');
    }
    ScriptError::Runtime { message, location }
}

// ---------------------------------------------------------------------------
// Helper functions
// ---------------------------------------------------------------------------

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

fn register_helpers(engine: &mut Engine) {
    engine.register_fn("reject", script_reject);
    engine.register_fn("log", script_log);
    engine.register_fn("now_iso", || {
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    });
    engine.register_fn("now_ms", || chrono::Utc::now().timestamp_millis());
    engine.register_fn("parse_iso_ms", parse_iso_ms);
    engine.register_fn("round", round_digits);
    engine.register_fn("round", |x: rhai::INT, digits: rhai::INT| {
        round_digits(x as rhai::FLOAT, digits)
    });
    engine.register_fn("lookup", |table: ImmutableString, key: Dynamic| {
        table_lookup(&table, &key, Dynamic::UNIT)
    });
    engine.register_fn(
        "lookup",
        |table: ImmutableString, key: Dynamic, default: Dynamic| table_lookup(&table, &key, default),
    );
    engine.register_fn("has_row", |table: ImmutableString, key: Dynamic| {
        table_lookup(&table, &key, Dynamic::UNIT).map(|row| !row.is_unit())
    });
    engine.register_fn("upper", |s: ImmutableString| s.to_uppercase());
    engine.register_fn("lower", |s: ImmutableString| s.to_lowercase());
    // Same signature as Rhai's built-in in-place `trim` (so `s.trim();` still
    // trims `s`), but it also returns the trimmed string for `let t = trim(s);`.
    engine.register_fn("trim", |s: &mut ImmutableString| -> ImmutableString {
        if s.trim().len() != s.len() {
            *s = s.trim().into();
        }
        s.clone()
    });
}

/// `lookup(table, key[, default])`: the row of `key` in the running script's
/// reference table (a copy), or `default` (unit unless given) when there is
/// none. Keys are strings; integers are looked up by their decimal form; a
/// unit key (a missing field) finds nothing.
fn table_lookup(table: &str, key: &Dynamic, default: Dynamic) -> RhaiResult<Dynamic> {
    let key = if key.is_unit() {
        return Ok(default);
    } else if let Ok(i) = key.as_int() {
        i.to_string()
    } else if key.is_string() || key.is_char() {
        key.to_string()
    } else {
        return Err(format!(
            "lookup key must be a string or an integer, not {}",
            key.type_name()
        )
        .into());
    };
    CURRENT_TABLES.with(|tables| {
        let tables = tables.borrow();
        let Some(tables) = tables.as_deref() else {
            return Err("reference tables are not available here".into());
        };
        match tables.get(table) {
            Some(t) => Ok(t.get(&key).cloned().unwrap_or(default)),
            None if tables.is_empty() => {
                Err(format!("unknown table {table:?}: this pipeline declares no tables").into())
            }
            None => Err(format!(
                "unknown table {table:?}: this pipeline declares {}",
                tables.names().join(", ")
            )
            .into()),
        }
    })
}

fn dynamic_text(value: &Dynamic) -> String {
    // Display of a string Dynamic is the raw text (no quotes).
    value.to_string()
}

fn script_reject(reason: Dynamic) -> RhaiResult<()> {
    Err(
        EvalAltResult::ErrorTerminated(Dynamic::from(Rejection(dynamic_text(&reason))), Position::NONE)
            .into(),
    )
}

fn script_log(ctx: NativeCallContext, msg: Dynamic) {
    let location = current_location(ctx.call_position());
    tracing::info!(target: "script", script = %location, "{}", dynamic_text(&msg));
}

fn parse_iso_ms(text: ImmutableString) -> RhaiResult<rhai::INT> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|dt| dt.timestamp_millis())
        .map_err(|e| {
            format!(
                "parse_iso_ms: invalid RFC 3339 timestamp {:?}: {e}",
                text.as_str()
            )
            .into()
        })
}

/// Rounds half away from zero to `digits` decimal places (negative `digits`
/// round to tens, hundreds, ...).
fn round_digits(x: rhai::FLOAT, digits: rhai::INT) -> rhai::FLOAT {
    if !x.is_finite() {
        return x;
    }
    let digits = i32::try_from(digits.clamp(-300, 300)).unwrap_or(0);
    let factor = 10f64.powi(digits);
    let scaled = x * factor;
    if factor == 0.0 || !factor.is_finite() || !scaled.is_finite() {
        return x;
    }
    let rounded = scaled.round() / factor;
    if rounded.is_finite() { rounded } else { x }
}

// ---------------------------------------------------------------------------
// JSON <-> Dynamic
// ---------------------------------------------------------------------------

fn event_to_dynamic(event: &ScriptEvent) -> Result<Dynamic, String> {
    let mut map = Map::new();
    map.insert("id".into(), event.id.clone().into());
    map.insert("tipo".into(), event.tipo.clone().into());
    map.insert("partner_id".into(), event.partner_id.clone().into());
    map.insert("received_at".into(), event.received_at.clone().into());
    map.insert("dados".into(), json_to_dynamic(&event.dados, 0)?);
    map.insert("meta".into(), json_to_dynamic(&event.meta, 0)?);
    Ok(Dynamic::from_map(map))
}

/// JSON → Rhai. Integers become `INT`, other numbers `FLOAT`, null becomes unit.
pub(crate) fn json_to_dynamic(value: &Value, depth: usize) -> Result<Dynamic, String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!("value nested deeper than {MAX_VALUE_DEPTH} levels"));
    }
    Ok(match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Dynamic::from_int(i)
            } else {
                // u64 above i64::MAX or a float.
                Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => s.as_str().into(),
        Value::Array(items) => {
            let mut array = Array::with_capacity(items.len());
            for item in items {
                array.push(json_to_dynamic(item, depth + 1)?);
            }
            Dynamic::from_array(array)
        }
        Value::Object(entries) => {
            let mut map = Map::new();
            for (key, item) in entries {
                map.insert(key.as_str().into(), json_to_dynamic(item, depth + 1)?);
            }
            Dynamic::from_map(map)
        }
    })
}

/// Rhai → JSON. `INT` stays an integer, `FLOAT` a float (NaN/infinity are
/// errors), unit becomes null, chars become strings, BLOBs arrays of bytes.
fn dynamic_to_json(value: Dynamic, depth: usize) -> Result<Value, String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!("value nested deeper than {MAX_VALUE_DEPTH} levels"));
    }
    let value = value.flatten();
    if value.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = value.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = value.as_float() {
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| format!("number {f} (NaN or infinite) is not valid JSON"));
    }
    if let Ok(c) = value.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    if value.is_string() {
        let s = value
            .into_immutable_string()
            .map_err(|t| format!("unexpected {t}"))?;
        return Ok(Value::String(s.to_string()));
    }
    if value.is_blob() {
        let blob = value.into_blob().map_err(|t| format!("unexpected {t}"))?;
        return Ok(Value::Array(blob.into_iter().map(Value::from).collect()));
    }
    if value.is_array() {
        let array = value.into_array().map_err(|t| format!("unexpected {t}"))?;
        let mut out = Vec::with_capacity(array.len());
        for item in array {
            out.push(dynamic_to_json(item, depth + 1)?);
        }
        return Ok(Value::Array(out));
    }
    if value.is_map() {
        let type_name = value.type_name();
        let map = value
            .try_cast::<Map>()
            .ok_or_else(|| format!("unexpected {type_name}"))?;
        let mut out = serde_json::Map::with_capacity(map.len());
        for (key, item) in map {
            out.insert(key.to_string(), dynamic_to_json(item, depth + 1)?);
        }
        return Ok(Value::Object(out));
    }
    Err(format!(
        "values of type '{}' have no JSON form",
        value.type_name()
    ))
}

/// Rhai maps are sorted by key; put keys that existed in `original` back in
/// their original order (recursively), followed by new keys.
fn restore_order(original: &Value, updated: Value) -> Value {
    match (original, updated) {
        (Value::Object(orig), Value::Object(mut upd)) => {
            let mut out = serde_json::Map::with_capacity(upd.len());
            for (key, orig_item) in orig {
                if let Some(slot) = upd.get_mut(key) {
                    let item = std::mem::take(slot);
                    out.insert(key.clone(), restore_order(orig_item, item));
                }
            }
            for (key, item) in upd {
                if !orig.contains_key(&key) {
                    out.insert(key, item);
                }
            }
            Value::Object(out)
        }
        (Value::Array(orig), Value::Array(upd)) => Value::Array(
            upd.into_iter()
                .enumerate()
                .map(|(i, item)| match orig.get(i) {
                    Some(orig_item) => restore_order(orig_item, item),
                    None => item,
                })
                .collect(),
        ),
        (_, updated) => updated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn origin(file: &str, line_offset: usize) -> ScriptOrigin {
        ScriptOrigin::new(file, line_offset)
    }

    fn event() -> ScriptEvent {
        ScriptEvent {
            id: "evt-1".into(),
            tipo: "venda".into(),
            partner_id: "loja-7".into(),
            received_at: "2024-05-01T12:00:00Z".into(),
            dados: json!({"produto": "cafe", "quantidade": 3, "preco": 2.5}),
            meta: json!({"origem": "api"}),
        }
    }

    fn run_src(host: &ScriptHost, src: &str, ev: &mut ScriptEvent) -> Result<Value, ScriptError> {
        let script = host
            .compile(src, origin("pipelines/scripts/t.rhai", 0))
            .expect("compiles");
        host.run(&script, ev)
    }

    #[test]
    fn lookups_read_the_scripts_own_tables() {
        let host = ScriptHost::default();
        let rows: serde_yaml::Value =
            serde_yaml::from_str("P-1: {nome: cafe, preco: 2.5}\n7: sete\n").expect("yaml");
        let mut tables = Tables::default();
        tables.insert(
            "produtos".into(),
            crate::tables::mapping_table(&rows).expect("table"),
        );
        let tables = Arc::new(tables);
        let compile = |src: &str| {
            host.compile(src, origin("pipelines/scripts/t.rhai", 0))
                .expect("compiles")
                .with_tables(Arc::clone(&tables))
        };
        let script = compile(
            r#"
                let p = lookup("produtos", "P-1");
                event.meta.nome = p.nome;
                event.meta.sete = lookup("produtos", 7);
                event.meta.falta = lookup("produtos", "X") == ();
                event.meta.padrao = lookup("produtos", "X", "d");
                event.meta.sem_chave = lookup("produtos", event.dados.nada, 0);
                event.meta.tem = has_row("produtos", "P-1") && !has_row("produtos", "P-2");
                p.nome = "mudado";
                lookup("produtos", "P-1").nome
            "#,
        );
        let mut ev = event();
        let out = host.run(&script, &mut ev).expect("runs");
        // The row a script gets is a copy: changing it changes no later lookup.
        assert_eq!(out, json!("cafe"));
        assert_eq!(
            ev.meta,
            json!({"origem": "api", "nome": "cafe", "sete": "sete", "falta": true, "padrao": "d",
                   "sem_chave": 0, "tem": true})
        );

        let err = host
            .run(&compile("let a = 1;\nlookup(\"precos\", \"P-1\")"), &mut event())
            .expect_err("unknown table");
        let text = err.to_string();
        assert!(text.contains("unknown table \"precos\""), "{text}");
        assert!(text.contains("declares produtos"), "{text}");
        assert!(text.contains("t.rhai:2"), "{text}");

        let err = host
            .run(&compile("lookup(\"produtos\", 1.5)"), &mut event())
            .expect_err("float key");
        assert!(err.to_string().contains("string or an integer"), "{err}");

        let bare = host
            .compile("lookup(\"produtos\", 1)", origin("x.rhai", 0))
            .expect("compiles");
        let err = host.run(&bare, &mut event()).expect_err("no tables");
        assert!(err.to_string().contains("declares no tables"), "{err}");
    }

    #[test]
    fn evaluate_reads_the_event_and_refuses_changes() {
        let host = ScriptHost::default();
        let ev = event();
        let compile = |src: &str| {
            host.compile(src, origin("pipelines/r.yaml", 10))
                .expect("compiles")
        };
        let out = host
            .evaluate(
                &compile(
                    "let e = event; e.meta.x = 1; if event.dados.quantidade > 2 { [\"a\"] } else { [] }",
                ),
                &ev,
            )
            .expect("runs");
        assert_eq!(out, json!(["a"]));
        // Changes to the event's fields last for the run only; assigning `event` itself is an error.
        let out = host
            .evaluate(
                &compile(
                    "event.meta.x = 1; event.dados.y = 2; [event.meta.x, event.dados.y, event.meta.origem]",
                ),
                &ev,
            )
            .expect("runs");
        // Within the run the script sees its own changes; none reaches the event.
        assert_eq!(out, json!([1, 2, "api"]));
        assert_eq!(ev, event(), "the event is unchanged");
        let err = host.evaluate(&compile("\nevent = 1;"), &ev).expect_err("assign");
        let text = err.to_string();
        assert!(text.contains("cannot change `event`"), "{text}");
        assert!(text.contains("pipelines/r.yaml:12"), "{text}");
        let err = host
            .evaluate(&compile("reject(\"no\")"), &ev)
            .expect_err("reject");
        assert!(matches!(err, ScriptError::Rejected(r) if r == "no"));
    }

    #[test]
    fn types_are_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ScriptHost>();
        assert_send_sync::<CompiledScript>();
        assert_send_sync::<ScriptError>();
    }

    #[test]
    fn enrichment_changes_dados_and_meta() {
        let host = ScriptHost::default();
        let mut ev = event();
        let out = run_src(
            &host,
            r#"
                event.dados.total = event.dados.quantidade * event.dados.preco;
                event.dados.unidades = event.dados.quantidade + 1;
                event.meta.enriquecido = true;
                event.meta.tag = upper("vip");
            "#,
            &mut ev,
        )
        .expect("runs");
        assert_eq!(out, Value::Null);
        assert_eq!(ev.dados["total"], json!(7.5));
        assert_eq!(ev.dados["unidades"], json!(4));
        assert!(ev.dados["unidades"].is_i64());
        assert_eq!(
            ev.meta,
            json!({"origem": "api", "enriquecido": true, "tag": "VIP"})
        );
        // original key order kept, new keys appended
        let keys: Vec<&String> = ev.dados.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["produto", "quantidade", "preco", "total", "unidades"]);
    }

    #[test]
    fn integers_stay_integers_and_floats_stay_floats() {
        let host = ScriptHost::default();
        let mut ev = event();
        ev.dados = json!({"quantidade": 3, "preco": 2.0, "big": 9007199254740993_i64, "lista": [1, 2.5, null, "x"], "n": {"a": 1}});
        run_src(&host, "event.dados.x = 1;", &mut ev).expect("runs");
        assert!(ev.dados["quantidade"].is_i64());
        assert_eq!(ev.dados["quantidade"], json!(3));
        assert_eq!(serde_json::to_string(&ev.dados["quantidade"]).expect("ser"), "3");
        assert!(ev.dados["preco"].is_f64());
        assert_eq!(ev.dados["big"], json!(9007199254740993_i64));
        assert_eq!(ev.dados["lista"], json!([1, 2.5, null, "x"]));
        assert!(ev.dados["lista"][0].is_i64());
        assert_eq!(ev.dados["n"], json!({"a": 1}));
    }

    #[test]
    fn routing_returns_array_of_strings() {
        let host = ScriptHost::default();
        let mut ev = event();
        let out = run_src(
            &host,
            r#"
                let destinos = ["erp"];
                if event.tipo == "venda" && event.dados.quantidade > 2 { destinos.push("crm"); }
                destinos
            "#,
            &mut ev,
        )
        .expect("runs");
        assert_eq!(out, json!(["erp", "crm"]));
        assert_eq!(ev, event(), "routing script did not change the event");
    }

    #[test]
    fn read_only_fields_are_ignored() {
        let host = ScriptHost::default();
        let mut ev = event();
        run_src(
            &host,
            r#"event.tipo = "outro"; event.id = "x"; event.partner_id = "p"; event.extra = 1; event.dados.ok = true;"#,
            &mut ev,
        )
        .expect("runs");
        assert_eq!(ev.tipo, "venda");
        assert_eq!(ev.id, "evt-1");
        assert_eq!(ev.partner_id, "loja-7");
        assert_eq!(ev.dados["ok"], json!(true));
    }

    #[test]
    fn shadowing_event_does_not_lose_changes() {
        let host = ScriptHost::default();
        let mut ev = event();
        run_src(&host, "event.meta.a = 1; let event = 5; event", &mut ev).expect("runs");
        assert_eq!(ev.meta["a"], json!(1));
    }

    #[test]
    fn dados_and_meta_must_stay_objects() {
        let host = ScriptHost::default();
        let mut ev = event();
        let err = run_src(&host, "event.meta.x = 1; event.dados = 5;", &mut ev).expect_err("fails");
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err:?}");
        assert!(err.to_string().contains("event.dados"), "{err}");
        assert_eq!(ev, event(), "event untouched on error");

        let err = run_src(&host, "event.meta = [];", &mut ev).expect_err("fails");
        assert!(err.to_string().contains("event.meta"), "{err}");
    }

    #[test]
    fn reject_inside_nested_function_is_rejected() {
        let host = ScriptHost::default();
        let mut ev = event();
        ev.dados["valor"] = json!(-10);
        let src = r#"
            fn validar(v) {
                if v < 0 { reject("valor negativo: " + v); }
                v
            }
            fn checar(d) { validar(d.valor) }
            event.meta.antes = 1;
            try { checar(event.dados); } catch (e) { log("swallowed " + e); }
            ["erp"]
        "#;
        let err = run_src(&host, src, &mut ev).expect_err("rejected");
        match &err {
            ScriptError::Rejected(reason) => assert_eq!(reason, "valor negativo: -10"),
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(err.to_string(), "rejected: valor negativo: -10");
        assert!(ev.meta.get("antes").is_none(), "no changes applied on rejection");
    }

    #[test]
    fn throw_is_runtime_error() {
        let host = ScriptHost::default();
        let mut ev = event();
        let script = host
            .compile("let a = 1;\nthrow \"boom\";", origin("p.yaml", 4))
            .expect("compiles");
        let err = host.run(&script, &mut ev).expect_err("fails");
        match err {
            ScriptError::Runtime { message, location } => {
                assert!(message.contains("boom"), "{message}");
                assert_eq!(location, "p.yaml:6");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn infinite_loop_hits_budget_quickly() {
        let host = ScriptHost::default();
        let mut ev = event();
        let started = Instant::now();
        let err = run_src(&host, "let x = 0;\nloop { x += 1; }", &mut ev).expect_err("budget");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        match &err {
            ScriptError::Budget { budget, location } => {
                assert!(*budget == "operations" || *budget == "wall time", "{budget}");
                assert_eq!(location, "pipelines/scripts/t.rhai:2");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wall_time_budget() {
        let host = ScriptHost::new(ScriptLimits {
            max_operations: 0,
            max_wall_time: Duration::from_millis(50),
            ..ScriptLimits::default()
        });
        let mut ev = event();
        let started = Instant::now();
        let err = run_src(&host, "loop { }", &mut ev).expect_err("budget");
        let elapsed = started.elapsed();
        assert_eq!(err.budget(), Some("wall time"), "{err:?}");
        assert!(elapsed >= Duration::from_millis(50), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        // the deadline is cleared afterwards
        assert_eq!(DEADLINE.with(Cell::get), None);
        // and the host keeps working
        assert_eq!(run_src(&host, "1 + 1", &mut ev).expect("runs"), json!(2));
    }

    #[test]
    fn deep_recursion_hits_call_depth() {
        let host = ScriptHost::default();
        let mut ev = event();
        let err = run_src(&host, "fn f(n) { f(n + 1) }\nf(0)", &mut ev).expect_err("budget");
        assert_eq!(err.budget(), Some("call depth"), "{err:?}");
        assert!(err.to_string().contains("pipelines/scripts/t.rhai:2"), "{err}");
    }

    #[test]
    fn string_growth_hits_string_size() {
        let host = ScriptHost::default();
        let mut ev = event();
        let err = run_src(&host, "let s = \"x\";\nloop { s += s; }", &mut ev).expect_err("budget");
        assert_eq!(err.budget(), Some("string size"), "{err:?}");
    }

    #[test]
    fn array_and_map_growth_hit_budgets() {
        // Default limits: doubling reaches the 10_000 element limit quickly.
        let host = ScriptHost::default();
        let mut ev = event();
        let err = run_src(&host, "let a = [1];\nloop { a += a; }", &mut ev).expect_err("budget");
        assert_eq!(err.budget(), Some("array size"), "{err:?}");
        // Element-by-element growth (Rhai re-checks sizes on every change, so
        // use small limits to keep the test fast in debug builds).
        let host = ScriptHost::new(ScriptLimits {
            max_array_size: 100,
            max_map_size: 100,
            ..ScriptLimits::default()
        });
        let err = run_src(&host, "let a = [];\nloop { a.push(1); }", &mut ev).expect_err("budget");
        assert_eq!(err.budget(), Some("array size"), "{err:?}");
        let err = run_src(
            &host,
            "let m = #{};\nlet i = 0;\nloop { m += #{}; m[`k${i}`] = i; i += 1; }",
            &mut ev,
        )
        .expect_err("budget");
        assert_eq!(err.budget(), Some("map size"), "{err:?}");
        // Rhai does not check map growth by index assignment; the output
        // (dados/meta/result) is checked after the run.
        let err =
            run_src(&host, "for i in 0..200 { event.dados[`k${i}`] = i; }", &mut ev).expect_err("budget");
        assert_eq!(err.budget(), Some("map size"), "{err:?}");
        let err = run_src(
            &host,
            "let m = #{};\nfor i in 0..200 { m[`k${i}`] = i; }\nm",
            &mut ev,
        )
        .expect_err("budget");
        assert_eq!(err.budget(), Some("map size"), "{err:?}");
        assert_eq!(ev, event(), "event untouched on error");
        // an input already above the limits is fine while the script leaves it alone
        let mut big = event();
        big.dados = Value::Object((0..200).map(|i| (format!("k{i}"), json!(i))).collect());
        let out = run_src(&host, "event.meta.n = 1; 5", &mut big).expect("runs");
        assert_eq!(out, json!(5));
        assert_eq!(big.meta["n"], json!(1));
    }

    #[test]
    fn compile_error_names_file_and_line() {
        let host = ScriptHost::default();
        let err = host
            .compile(
                "let a = 1;\nlet b = (a + ;\nlet c = 3;",
                origin("pipelines/venda.yaml", 14),
            )
            .expect_err("syntax error");
        match &err {
            ScriptCompileError::Syntax {
                location, line, file, ..
            } => {
                assert!(location.starts_with("pipelines/venda.yaml:16:"), "{location}");
                assert_eq!(*line, Some(16));
                assert_eq!(file, &PathBuf::from("pipelines/venda.yaml"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("pipelines/venda.yaml:16:"), "{err}");
    }

    #[test]
    fn expression_depth_is_a_compile_budget() {
        let host = ScriptHost::default();
        let src = format!("let x = {}1{};", "(".repeat(200), ")".repeat(200));
        let err = host.compile(&src, origin("x.rhai", 0)).expect_err("too deep");
        assert!(
            matches!(
                err,
                ScriptCompileError::Budget {
                    budget: "expression depth",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn runtime_error_location() {
        let host = ScriptHost::default();
        let mut ev = event();
        let script = host
            .compile(
                "let a = 1;\n\nlet b = funcao_inexistente(a);",
                origin("pipelines/venda.yaml", 10),
            )
            .expect("compiles");
        let err = host.run(&script, &mut ev).expect_err("fails");
        match err {
            ScriptError::Runtime { message, location } => {
                assert_eq!(location, "pipelines/venda.yaml:13");
                assert!(message.contains("funcao_inexistente"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }

        // error inside a function: innermost position, function named in message
        let script = host
            .compile("fn calc(d) {\n  d.x / 0\n}\ncalc(#{x: 1})", origin("s.rhai", 0))
            .expect("compiles");
        let err = host.run(&script, &mut ev).expect_err("fails");
        match err {
            ScriptError::Runtime { message, location } => {
                assert_eq!(location, "s.rhai:2");
                assert!(message.contains("function 'calc'"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn helpers_work() {
        let host = ScriptHost::default();
        let mut ev = event();
        let out = run_src(
            &host,
            r#"
                let s = "  Ab  ";
                let t = trim(s);
                let m = "  x ";
                m.trim();
                #{
                    upper: upper("abç"),
                    lower: lower("ABC"),
                    t: t,
                    m: m,
                    r: round(2.345, 2),
                    r0: round(2.5),
                    ri: round(7, 2),
                    neg: round(1234.5, -2),
                    ms: parse_iso_ms("2024-05-01T12:00:00Z"),
                    now_ok: now_ms() > 1700000000000,
                    iso_ok: parse_iso_ms(now_iso()) > 0,
                }
            "#,
            &mut ev,
        )
        .expect("runs");
        assert_eq!(out["upper"], json!("ABÇ"));
        assert_eq!(out["lower"], json!("abc"));
        assert_eq!(out["t"], json!("Ab"));
        assert_eq!(out["m"], json!("x"));
        assert_eq!(out["r"], json!(2.35));
        assert_eq!(out["r0"], json!(3.0));
        assert_eq!(out["ri"], json!(7.0));
        assert_eq!(out["neg"], json!(1200.0));
        assert_eq!(out["ms"], json!(1_714_564_800_000_i64));
        assert_eq!(out["now_ok"], json!(true));
        assert_eq!(out["iso_ok"], json!(true));

        let err = run_src(
            &host,
            "log(\"x\"); print(1); debug(2); parse_iso_ms(\"ontem\")",
            &mut ev,
        )
        .expect_err("invalid date");
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err:?}");
        assert!(err.to_string().contains("ontem"), "{err}");
    }

    #[test]
    fn sandbox_has_no_eval_or_import() {
        let host = ScriptHost::default();
        assert!(host.compile("eval(\"1\")", origin("x.rhai", 0)).is_err());
        let mut ev = event();
        let err = run_src(&host, "import \"foo\" as f; 1", &mut ev).expect_err("no modules");
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err:?}");
    }

    #[test]
    fn non_json_results_are_errors() {
        let host = ScriptHost::default();
        let mut ev = event();
        let err = run_src(&host, "0.0 / 0.0", &mut ev).expect_err("NaN");
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err:?}");
        assert_eq!(run_src(&host, "'c'", &mut ev).expect("char"), json!("c"));
        assert_eq!(run_src(&host, "()", &mut ev).expect("unit"), Value::Null);
    }

    #[test]
    fn concurrent_runs_have_independent_deadlines() {
        let host = Arc::new(ScriptHost::new(ScriptLimits {
            max_operations: 0,
            max_wall_time: Duration::from_millis(100),
            ..ScriptLimits::default()
        }));
        let slow = host
            .compile("loop { }", origin("slow.rhai", 0))
            .expect("compiles");
        let quick = host
            .compile(
                "let t = 0; for i in 0..200 { t += i; } event.dados.t = t; t",
                origin("quick.rhai", 0),
            )
            .expect("compiles");

        let slow_handle = {
            let host = Arc::clone(&host);
            std::thread::spawn(move || {
                let mut ev = event();
                let started = Instant::now();
                let result = host.run(&slow, &mut ev);
                (result, started.elapsed())
            })
        };
        let quick_handles: Vec<_> = (0..3)
            .map(|_| {
                let host = Arc::clone(&host);
                let quick = quick.clone();
                std::thread::spawn(move || {
                    let until = Instant::now() + Duration::from_millis(300);
                    let mut runs = 0;
                    while Instant::now() < until {
                        let mut ev = event();
                        let out = host.run(&quick, &mut ev).expect("quick run succeeds");
                        assert_eq!(out, json!(19900));
                        assert_eq!(ev.dados["t"], json!(19900));
                        runs += 1;
                    }
                    runs
                })
            })
            .collect();

        let (result, elapsed) = slow_handle.join().expect("slow thread");
        assert_eq!(result.expect_err("budget").budget(), Some("wall time"));
        assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        for handle in quick_handles {
            assert!(handle.join().expect("quick thread") > 0);
        }
    }
}
