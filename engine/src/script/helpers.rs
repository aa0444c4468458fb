//! The functions registered for analysts' scripts, and where their output
//! goes.
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
//! [`ScriptError::Rejected`]: super::ScriptError::Rejected

use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, NativeCallContext, Position};

use super::context::{current_location, with_current_tables};
use super::error::Rejection;

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Registers the helpers and routes `print`/`debug` to `tracing`.
pub(super) fn register(engine: &mut Engine) {
    engine.on_print(|text| {
        tracing::debug!(target: "script", script = %current_location(Position::NONE), "{text}");
    });
    engine.on_debug(|text, _source, pos| {
        tracing::debug!(target: "script", script = %current_location(pos), "{text}");
    });

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
    with_current_tables(|tables| {
        let Some(tables) = tables else {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::super::testkit::{event, origin, run_src};
    use super::super::{ScriptError, ScriptHost};
    use crate::tables::Tables;

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
}
