//! The script host: one configured Rhai engine ([`ScriptHost`]) and the
//! scripts it compiled ([`CompiledScript`]); compiling, running a script that
//! may change the event, and evaluating one that only reads it.
//!
//! Scripts are compiled once, at load, and run many times. The host is
//! `Send + Sync` and shared by every worker thread; what differs per run (the
//! deadline, the script's origin and tables) is installed per thread around
//! each run (see `budget` and `context`).

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use rhai::{AST, Dynamic, Engine, EvalAltResult, Map, Position, Scope};
use serde_json::Value;

use super::budget::{self, DeadlineGuard, ScriptLimits};
use super::context::RunContext;
use super::convert::{dynamic_to_json, event_to_dynamic, json_kind, restore_order};
use super::error::{ScriptCompileError, ScriptError, ScriptOrigin, compile_error, map_eval_error};
use super::helpers;
use crate::stage::Event;
use crate::tables::Tables;

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
        budget::configure(&mut engine, &limits);

        // Sandbox: no file-system modules, no runtime compilation.
        engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.disable_symbol("eval");

        helpers::register(&mut engine);

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
    pub fn run(&self, script: &CompiledScript, event: &mut Event) -> Result<Value, ScriptError> {
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
    pub fn evaluate(&self, script: &CompiledScript, event: &Event) -> Result<Value, ScriptError> {
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
        event: &Event,
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
            let _deadline = DeadlineGuard::enter(deadline);
            let _context = RunContext::enter(&script.origin, &script.tables);
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testkit::{event, origin, run_src};
    use super::*;

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
    fn sandbox_has_no_eval_or_import() {
        let host = ScriptHost::default();
        assert!(host.compile("eval(\"1\")", origin("x.rhai", 0)).is_err());
        let mut ev = event();
        let err = run_src(&host, "import \"foo\" as f; 1", &mut ev).expect_err("no modules");
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err:?}");
    }
}
