//! Every log line the in-process services of this test binary write, in the
//! production JSON layout at debug level, is checked as it is written: it must
//! parse as one JSON object and contain none of the secrets tests register
//! (API keys, the admin key, passwords, JWTs, JWT and webhook secrets).
//! [`assert_clean`] fails the test that calls it (every `TestApp::stop` does)
//! when any line so far broke either rule.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, Once};

static SECRETS: LazyLock<Mutex<Vec<String>>> = LazyLock::new(Mutex::default);
static PROBLEMS: LazyLock<Mutex<Vec<String>>> = LazyLock::new(Mutex::default);
static LINES: AtomicU64 = AtomicU64::new(0);
/// A string a test watches for, and the lines that contained it.
type Watch = (String, Vec<String>);
static WATCHED: LazyLock<Mutex<Vec<Watch>>> = LazyLock::new(Mutex::default);

/// From now on, keeps every log line containing `needle`.
pub fn watch(needle: &str) {
    install();
    WATCHED
        .lock()
        .expect("lock")
        .push((needle.to_owned(), Vec::new()));
}

/// The lines kept for `needle` so far, each parsed.
pub fn watched(needle: &str) -> Vec<serde_json::Value> {
    WATCHED
        .lock()
        .expect("lock")
        .iter()
        .filter(|(n, _)| n == needle)
        .flat_map(|(_, lines)| lines.iter().filter_map(|l| serde_json::from_str(l).ok()))
        .collect()
}

/// Installs the capturing subscriber (once per test binary).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::new(
            "debug,sqlx=info,hyper=info,hyper_util=info,h2=info,reqwest=info,rustls=info,tower=info,\
             apalis=info,apalis_core=info,apalis_redis=info,apalis_sqlite=info,redis=info,mio=info,\
             tokio_util=info,tungstenite=info,governor=info",
        );
        orchestrator::telemetry::init_logging_with(orchestrator::config::LogFormat::Json, filter, || {
            LineCheck(Vec::new())
        });
    });
}

/// A value that must never be logged. Values shorter than 8 characters are
/// too likely to occur by chance and are refused.
pub fn secret(value: &str) {
    assert!(value.len() >= 8, "register only real secrets, not {value:?}");
    install();
    let mut secrets = SECRETS.lock().expect("lock");
    if !secrets.iter().any(|s| s == value) {
        secrets.push(value.to_owned());
    }
}

/// How many lines were checked so far.
pub fn lines_checked() -> u64 {
    LINES.load(Ordering::Relaxed)
}

/// Panics with the offending lines when any line leaked a secret or was not JSON.
pub fn assert_clean() {
    let problems = PROBLEMS.lock().expect("lock").clone();
    assert!(
        problems.is_empty(),
        "{} log line(s) broke the logging rules, first: {}",
        problems.len(),
        problems.first().cloned().unwrap_or_default()
    );
}

/// Buffers one event's output; checks it when the subscriber drops it.
struct LineCheck(Vec<u8>);

impl Write for LineCheck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineCheck {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            LINES.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut watched) = WATCHED.lock() {
                for (needle, lines) in watched.iter_mut() {
                    if line.contains(needle.as_str()) {
                        lines.push(line.to_owned());
                    }
                }
            }
            let mut problem = None;
            if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line).is_err() {
                problem = Some(format!("not a JSON object: {line}"));
            } else if let Ok(secrets) = SECRETS.lock()
                && let Some(s) = secrets.iter().find(|s| line.contains(s.as_str()))
            {
                problem = Some(format!("secret {}… in: {line}", &s[..4]));
            }
            if let Some(p) = problem
                && let Ok(mut problems) = PROBLEMS.lock()
            {
                problems.push(p);
            }
        }
    }
}
