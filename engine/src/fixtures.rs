//! Pipeline tests for integrators and analysts (`orchestrator test`), in the
//! spirit of `vector test`: YAML files under `PIPELINES_DIR/tests/` give input
//! events and what must come out — the schema verdict, the routes, fields of
//! the enriched `dados`/`meta`, the deliveries, a business rejection. Each case
//! runs through the real pipeline as a dry run: every stage, no side effects.
//!
//! ```yaml
//! event_type: VENDA
//! cases:
//!   - name: a large sale is also sent to the fraud check
//!     dados: {produto_id: P-1, quantidade: 1, valor: 20000}
//!     expect:
//!       outcome: processed          # processed | invalid | rejected | dead_lettered | retrying
//!       routes: [erp, fraude]
//!       meta: {faixa: alta}         # these fields, at least (objects compare recursively)
//! ```

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::model::RetryPolicy;
use crate::pipeline::{PipelineSet, normalize_tipo};
use crate::retry::RetryDecision;
use crate::stage::{Event, EventContext, StageError};

/// One fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureFile {
    pub event_type: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub dados: Value,
    #[serde(default)]
    pub meta: Option<Value>,
    #[serde(default)]
    pub partner_id: Option<String>,
    pub expect: Expect,
}

/// What must hold; absent fields are not checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `processed`, `invalid` (schema), `rejected` (a script's `reject`),
    /// `dead_lettered` (any other permanent error, or a transient one the
    /// retry policy gives no retry) or `retrying` (a transient failure the
    /// policy retries, as [`RetryPolicy::decide`] says for a first attempt).
    pub outcome: Option<String>,
    /// The routes chosen, in order.
    pub routes: Option<Vec<String>>,
    /// Fields the enriched `dados` must contain (recursively, for objects).
    pub dados: Option<Value>,
    /// Fields the enriched `meta` must contain.
    pub meta: Option<Value>,
    /// Destinations that would be delivered to, in any order.
    pub deliveries: Option<Vec<String>>,
    /// JSON pointers (into `dados`) the schema must refuse; implies `invalid`.
    pub invalid: Option<Vec<String>>,
    /// Text the error message must contain (rejection reason, script error…).
    pub error: Option<String>,
}

/// The verdict on one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: PathBuf,
    pub event_type: String,
    pub name: String,
    /// Empty when the case passed.
    pub failures: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// A fixture file that could not be read, or names no loaded pipeline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {message}", file = .file.display())]
pub struct FixtureError {
    pub file: PathBuf,
    pub message: String,
}

/// The fixture files of a pipelines directory: `DIR/tests/*.yaml`.
pub fn fixture_files(pipelines_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = pipelines_dir.join("tests");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Runs every case of every file; errors are files that could not run at all.
pub async fn run(set: &PipelineSet, files: &[PathBuf]) -> (Vec<CaseResult>, Vec<FixtureError>) {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let fail = |message: String| FixtureError {
            file: file.clone(),
            message,
        };
        let parsed = std::fs::read_to_string(file)
            .map_err(|e| fail(format!("cannot read: {e}")))
            .and_then(|text| serde_yaml::from_str::<FixtureFile>(&text).map_err(|e| fail(e.to_string())));
        let fixture = match parsed {
            Ok(f) => f,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if set.get(&normalize_tipo(&fixture.event_type)).is_none() {
            errors.push(fail(format!(
                "no pipeline for event type {:?}",
                fixture.event_type
            )));
            continue;
        }
        for case in fixture.cases {
            let failures = run_case(set, &fixture.event_type, &case).await;
            results.push(CaseResult {
                file: file.clone(),
                event_type: fixture.event_type.clone(),
                name: case.name,
                failures,
            });
        }
    }
    (results, errors)
}

async fn run_case(set: &PipelineSet, tipo: &str, case: &Case) -> Vec<String> {
    let Some(pipeline) = set.get(&normalize_tipo(tipo)) else {
        return vec![format!("no pipeline for {tipo:?}")];
    };
    let mut failures = Vec::new();
    let expect = &case.expect;
    let expected_outcome = expect
        .outcome
        .clone()
        .or_else(|| expect.invalid.as_ref().map(|_| "invalid".to_owned()));
    if let Err(violations) = pipeline.validate_dados(&case.dados) {
        let paths: Vec<String> = violations.iter().map(|v| v.path.clone()).collect();
        match (&expected_outcome, &expect.invalid) {
            (_, Some(want)) => {
                for w in want {
                    let w = w.strip_prefix("/dados").unwrap_or(w);
                    if !paths.iter().any(|p| p == w) {
                        failures.push(format!("expected a schema violation at {w}, got {paths:?}"));
                    }
                }
            }
            (Some(o), None) if o == "invalid" => {}
            _ => failures.push(format!(
                "the schema refused the event: {}",
                violations
                    .iter()
                    .map(|v| format!("{}: {}", v.path, v.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
        return failures;
    }
    if expected_outcome.as_deref() == Some("invalid") {
        return vec!["expected the schema to refuse the event, but it was valid".to_owned()];
    }
    let mut cx = EventContext::new(Event::new(
        "01FIXTURE0000000000000000000".to_owned(),
        pipeline.event_type.clone(),
        case.partner_id.clone().unwrap_or_else(|| "test".to_owned()),
        fixture_received_at(),
        case.dados.clone(),
        case.meta.clone().unwrap_or(Value::Null),
    ));
    cx.dry_run = true;
    let execution = pipeline.execute(&mut cx).await;
    let outcome = outcome_name(execution.error.as_ref(), &pipeline.retry);
    if let Some(want) = &expected_outcome
        && want != outcome
    {
        let why = execution
            .error
            .as_ref()
            .map(|e| format!(" ({}: {})", e.category, e.message))
            .unwrap_or_default();
        failures.push(format!("expected outcome {want}, got {outcome}{why}"));
    }
    if expected_outcome.is_none()
        && let Some(e) = &execution.error
    {
        failures.push(format!("failed: {}: {}", e.category, e.message));
    }
    if let Some(text) = &expect.error {
        match &execution.error {
            Some(e) if e.message.contains(text.as_str()) => {}
            Some(e) => failures.push(format!(
                "expected an error containing {text:?}, got {:?}",
                e.message
            )),
            None => failures.push(format!("expected an error containing {text:?}, got none")),
        }
    }
    if let Some(want) = &expect.routes
        && cx.routes.as_ref() != Some(want)
    {
        let got = cx
            .routes
            .as_ref()
            .map_or_else(|| "none (no route stage)".to_owned(), |r| format!("{r:?}"));
        failures.push(format!("expected routes {want:?}, got {got}"));
    }
    if let Some(want) = &expect.dados {
        contains(&cx.event.dados, want, "dados", &mut failures);
    }
    if let Some(want) = &expect.meta {
        contains(&cx.event.meta, want, "meta", &mut failures);
    }
    if let Some(want) = &expect.deliveries {
        let mut got: Vec<String> = cx.deliveries.iter().map(|d| d.destination.clone()).collect();
        let mut want = want.clone();
        got.sort();
        want.sort();
        if got != want {
            failures.push(format!("expected deliveries to {want:?}, got {got:?}"));
        }
    }
    failures
}

/// 2026-01-01T12:00:00Z: a fixed time, so that cases whose scripts read
/// `received_at` give the same result on every run.
fn fixture_received_at() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(2026, 1, 1)
        .and_then(|d| d.and_hms_opt(12, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or_default()
}

/// A dry run is the event's first attempt.
fn outcome_name(error: Option<&StageError>, retry: &RetryPolicy) -> &'static str {
    match error {
        None => "processed",
        Some(e) if e.category == "rejected" => "rejected",
        Some(e) => match retry.decide(e, 1) {
            RetryDecision::Retry { .. } | RetryDecision::Wait { .. } => "retrying",
            RetryDecision::DeadLetter => "dead_lettered",
        },
    }
}

/// Checks that `got` has every field of `want` (objects recursively; other
/// values equal, integers and floats by numeric value).
fn contains(got: &Value, want: &Value, at: &str, failures: &mut Vec<String>) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                let path = format!("{at}.{k}");
                match g.get(k) {
                    Some(gv) => contains(gv, wv, &path, failures),
                    None => failures.push(format!("expected {path} = {wv}, but it is absent")),
                }
            }
        }
        (Value::Number(g), Value::Number(w)) if g.as_f64() == w.as_f64() => {}
        _ if got == want => {}
        _ => failures.push(format!("expected {at} = {want}, got {got}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_checks_fields_recursively() {
        let got = json!({"a": 1, "b": {"c": 2.0, "d": [1, 2]}, "e": "x"});
        let mut f = Vec::new();
        contains(
            &got,
            &json!({"a": 1.0, "b": {"c": 2, "d": [1, 2]}}),
            "dados",
            &mut f,
        );
        assert!(f.is_empty(), "{f:?}");
        contains(&got, &json!({"b": {"c": 3}, "z": 1, "e": "y"}), "dados", &mut f);
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].contains("dados.b.c"));
        assert!(f[1].contains("dados.z") && f[1].contains("absent"));
    }

    #[test]
    fn fixture_events_are_received_at_a_fixed_time() {
        let ev = Event::new(
            String::new(),
            String::new(),
            String::new(),
            fixture_received_at(),
            json!({}),
            Value::Null,
        );
        assert_eq!(ev.received_at, "2026-01-01T12:00:00.000Z");
    }

    #[test]
    fn outcomes_follow_the_retry_decision_of_a_first_attempt() {
        let retry = RetryPolicy::default();
        let transient = StageError::transient("delivery", "x");
        assert_eq!(outcome_name(None, &retry), "processed");
        assert_eq!(
            outcome_name(Some(&StageError::permanent("rejected", "x")), &retry),
            "rejected"
        );
        assert_eq!(outcome_name(Some(&transient), &retry), "retrying");
        assert_eq!(
            outcome_name(Some(&StageError::permanent("script", "x")), &retry),
            "dead_lettered"
        );
        let once = RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        };
        assert_eq!(outcome_name(Some(&transient), &once), "dead_lettered");
    }

    #[test]
    fn fixture_files_refuse_unknown_keys() {
        let bad = "event_type: X\ncases:\n  - name: a\n    dados: {}\n    expect: {outcome: processed, routs: [a]}\n";
        let e = serde_yaml::from_str::<FixtureFile>(bad).expect_err("unknown key");
        assert!(e.to_string().contains("routs"), "{e}");
    }
}
