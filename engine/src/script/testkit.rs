//! Test fixtures shared by the script module's tests: an origin, a sample
//! event and a compile-and-run shortcut.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{ScriptError, ScriptHost, ScriptOrigin};
use crate::stage::Event;

pub(super) fn origin(file: &str, line_offset: usize) -> ScriptOrigin {
    ScriptOrigin::new(file, line_offset)
}

pub(super) fn event() -> Event {
    let received_at = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
        .expect("timestamp")
        .with_timezone(&Utc);
    Event::new(
        "evt-1".into(),
        "venda".into(),
        "loja-7".into(),
        received_at,
        json!({"produto": "cafe", "quantidade": 3, "preco": 2.5}),
        json!({"origem": "api"}),
    )
}

pub(super) fn run_src(host: &ScriptHost, src: &str, ev: &mut Event) -> Result<Value, ScriptError> {
    let script = host
        .compile(src, origin("pipelines/scripts/t.rhai", 0))
        .expect("compiles");
    host.run(&script, ev)
}
