//! Resource budgets of one script run: [`ScriptLimits`], how they are handed
//! to Rhai, and the wall-time deadline.
//!
//! Rhai enforces operations, call depth, sizes and expression depth itself;
//! wall time it does not know about, so a progress callback compares the
//! clock with a deadline every [`DEADLINE_CHECK_INTERVAL`] operations. The
//! deadline is kept per thread (not in the engine), so one [`ScriptHost`]
//! can be shared by many worker threads, each with its own running script.
//!
//! [`ScriptHost`]: super::ScriptHost

use std::cell::Cell;
use std::time::{Duration, Instant};

use rhai::{Dynamic, Engine};

use super::error::WallTimeExceeded;

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

/// How often (in operations) the wall-time deadline is checked: reading the
/// clock on every operation would cost more than most scripts.
const DEADLINE_CHECK_INTERVAL: u64 = 64;

thread_local! {
    /// Deadline of the script run currently executing on this thread.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets Rhai's own limits and installs the wall-time check.
pub(super) fn configure(engine: &mut Engine, limits: &ScriptLimits) {
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth);

    engine.on_progress(|ops| {
        if ops % DEADLINE_CHECK_INTERVAL != 0 {
            return None;
        }
        let deadline = DEADLINE.with(Cell::get)?;
        (Instant::now() >= deadline).then(|| Dynamic::from(WallTimeExceeded))
    });
}

/// Installs the deadline of one run on this thread; restores the previous
/// one on drop (also on panic), so nested or later runs never inherit it.
pub(super) struct DeadlineGuard {
    previous: Option<Instant>,
}

impl DeadlineGuard {
    pub(super) fn enter(deadline: Option<Instant>) -> Self {
        Self {
            previous: DEADLINE.with(|d| d.replace(deadline)),
        }
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};

    use super::super::testkit::{event, origin, run_src};
    use super::super::{ScriptCompileError, ScriptError, ScriptHost};
    use super::*;

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
