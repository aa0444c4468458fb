//! The console in a real browser, on both backends: `tests/browser` (Playwright
//! from the npm registry, run by Node's test runner) drives Debian's Chromium
//! against the service started here and seeded with events, dead letters and
//! a partner.
//!
//! Needs `node`, Chromium and `npm ci` in `tests/browser`; without them the
//! test prints a `skipped:` line, unless `ORCH_REQUIRE_BROWSER=1` (`.ci/run`
//! installs all three and sets it). `ORCH_SCREENSHOTS=DIR` saves a
//! screenshot of each page there (how `docs/console/` is made).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

struct Runner {
    chromium: PathBuf,
    dir: PathBuf,
}

/// What the browser tests need, or why they cannot run.
fn runner() -> Result<Runner, String> {
    let dir = repo_root().join("tests/browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        return Err("tests/browser/node_modules is missing (run `npm ci` there)".into());
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is not installed".into());
    }
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/lib/chromium/chromium", "/usr/bin/chromium"].map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or("Chromium is not installed (apt-get install chromium)")?;
    Ok(Runner { chromium, dir })
}

/// One browser at a time: two Chromiums at once would load the machine the
/// other tests' timings share.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn console_in_a_browser(backend: Backend) {
    let runner = match runner() {
        Ok(r) => r,
        Err(why) if std::env::var("ORCH_REQUIRE_BROWSER").as_deref() != Ok("1") => {
            println!("skipped: browser tests not run: {why} (set ORCH_REQUIRE_BROWSER=1 to require them)");
            return;
        }
        Err(why) => panic!("ORCH_REQUIRE_BROWSER=1 but {why}"),
    };
    let _browser = ONE_BROWSER.lock().await;
    // Each test signs in once; ten a minute per name would be close.
    let app = spawn_app_with(backend, crate::console::pipelines(), |v| {
        v.insert("LOGIN_ATTEMPTS_PER_USER_PER_MINUTE".into(), "100".into());
    })
    .await;
    let partner = app.add_partner("acme").await;
    let hostile = json!({
        "produto_id": "<script>window.pwned=1</script>",
        "quantidade": 2,
        "valor": 9.5,
        "cliente_id": "\"><img src=x onerror=window.pwned=2>",
    });
    let hostile_id = accepted_id(app.post_event("VENDA", hostile).await).await;
    let mut ids = vec![hostile_id.clone()];
    for n in 0..6 {
        ids.push(
            accepted_id(
                app.post_event_as(&partner, "REGRA", json!({"n": n % 2}), None)
                    .await,
            )
            .await,
        );
    }
    for id in &ids {
        app.wait_status(id, Duration::from_secs(30), |s| {
            s["status"] == "processed" || s["status"] == "dead_lettered"
        })
        .await;
    }
    let mut cmd = tokio::process::Command::new("node");
    cmd.args(["--test", "--test-concurrency=1", "console.test.mjs"])
        .current_dir(&runner.dir)
        .env("CONSOLE_URL", app.url(""))
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("HOSTILE_ID", &hostile_id)
        .env("PARTNER_ID", "acme")
        .env("DEAD_COUNT", "3")
        .env("CHROMIUM", &runner.chromium)
        .kill_on_drop(true);
    if let Some(dir) = std::env::var_os("ORCH_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        cmd.env("SCREENSHOT_DIR", std::path::absolute(dir).expect("absolute"));
    }
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("the browser tests finish within 240 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser tests failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("# fail 0"), "{stdout}");
    app.stop().await;
}

both_backends!(console_in_a_browser);
