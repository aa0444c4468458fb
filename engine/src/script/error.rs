//! What can go wrong with a script, and where: [`ScriptCompileError`],
//! [`ScriptError`], the [`ScriptOrigin`] that turns Rhai positions into
//! `file:line` of the pipeline files, and the mapping of Rhai's own errors to
//! budget names and locations.
//!
//! Errors name the line in the file the analyst edits (the YAML file for an
//! inline script, the `.rhai` file otherwise), never a line of the script
//! text alone.

use std::fmt;
use std::path::PathBuf;

use rhai::{EvalAltResult, ParseErrorType, Position};

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

/// Termination token raised by `reject(reason)`. A termination, unlike a
/// thrown error, cannot be caught by the script's own `try`/`catch`.
#[derive(Clone, Debug)]
pub(super) struct Rejection(pub(super) String);

/// Termination token raised by the progress callback when the deadline passed.
#[derive(Clone, Debug)]
pub(super) struct WallTimeExceeded;

pub(super) fn compile_error(
    kind: ParseErrorType,
    pos: Position,
    origin: &ScriptOrigin,
) -> ScriptCompileError {
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

pub(super) fn map_eval_error(err: EvalAltResult, origin: &ScriptOrigin) -> ScriptError {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::ScriptHost;
    use super::super::testkit::{event, origin};
    use super::*;

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
}
