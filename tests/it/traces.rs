//! W3C trace context and OpenTelemetry traces.
//!
//! The real binary exports to an OTLP/HTTP receiver inside this test, which
//! decodes what arrives with `opentelemetry-proto`: the spans of one event,
//! from the partner's request to its webhook call, form one trace, each
//! under the right parent, and the webhook's `traceparent` names the
//! delivery span. Without an exporter, webhooks still continue the
//! partner's trace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{Value, json};

use crate::helpers::*;

const PARTNER_KEY: &str = "eo_trace_test_key_8c1d4f7a2b9e";
const PARTNER_TRACE: &str = "5a1e2b3c4d5e6f708192a3b4c5d6e7f8";
const PARTNER_SPAN: &str = "1122334455667788";

/// One span as exported.
#[derive(Debug, Clone)]
struct Exported {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    /// 0 unset, 1 ok, 2 error.
    status: i32,
    attributes: HashMap<String, String>,
    service: String,
}

#[derive(Default)]
struct Collected {
    spans: Vec<Exported>,
    /// Export requests that did not decode.
    undecodable: usize,
}

/// An OTLP/HTTP trace receiver on loopback.
struct Collector {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<Collected>>,
}

async fn export(
    State(state): State<Arc<Mutex<Collected>>>,
    body: axum::body::Bytes,
) -> impl axum::response::IntoResponse {
    let mut s = state.lock().expect("lock");
    match ExportTraceServiceRequest::decode(body) {
        Ok(req) => {
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for sp in ss.spans {
                        s.spans.push(Exported {
                            trace_id: hex::encode(&sp.trace_id),
                            span_id: hex::encode(&sp.span_id),
                            parent: hex::encode(&sp.parent_span_id),
                            name: sp.name,
                            kind: sp.kind,
                            status: sp.status.as_ref().map(|st| st.code).unwrap_or(0),
                            attributes: sp
                                .attributes
                                .iter()
                                .map(|kv| {
                                    (
                                        kv.key.clone(),
                                        text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                                    )
                                })
                                .collect(),
                            service: service.clone(),
                        });
                    }
                }
            }
        }
        Err(_) => s.undecodable += 1,
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn text(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

impl Collector {
    async fn start() -> Collector {
        let state = Arc::new(Mutex::new(Collected::default()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(export))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Collector { addr, state }
    }

    fn trace(&self, trace_id: &str) -> Vec<Exported> {
        let s = self.state.lock().expect("lock");
        assert_eq!(s.undecodable, 0, "every export decodes as OTLP protobuf");
        s.spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// A pipeline of three stages and one webhook (`/hook` of `rx`).
pub(crate) fn rastreio(rx: &Receiver) -> PipelineDir {
    let dir = PipelineDir::new();
    dir.any_schema().write(
        "pipelines/rastreio.yaml",
        &format!(
            r#"
event_type: RASTREIO
schema: any.schema.json
retry:
  max_retries: 3
  initial_delay: 100ms
stages:
  - plugin: validate
  - plugin: script
    name: enrich
    script: |
      event.meta.visto = true;
  - plugin: deliver
destinations:
  transportadora:
    type: webhook
    url: {url}
    timeout: 2s
"#,
            url = rx.url("/hook")
        ),
    );
    dir
}

fn the<'a>(spans: &'a [Exported], name: &str) -> &'a Exported {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {spans:#?}");
    found[0]
}

fn traceparent_of(r: &Received) -> String {
    r.headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .expect("the webhook call carries traceparent")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_is_one_trace_from_the_partner_request_to_its_webhook() {
    let collector = Collector::start().await;
    let rx = Receiver::start().await;
    let dir = rastreio(&rx);
    let data = tempfile::tempdir().expect("data");
    let port = free_port();
    let mut vars = node_env(&dir);
    vars.extend([
        ("DATA_DIR".to_owned(), data.path().display().to_string()),
        ("LISTEN_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            format!("http://{}", collector.addr),
        ),
        (
            "OTEL_SERVICE_NAME".to_owned(),
            "orchestrator-under-test".to_owned(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "60000".to_owned()),
        ("RUST_LOG".to_owned(), "warn,orchestrator=info".to_owned()),
    ]);
    create_partner(&vars, "acme", PARTNER_KEY);
    let log = data.path().join("server.log");
    let mut server = spawn_orchestrator(&vars, &["serve"], &log);
    let http = reqwest::Client::new();
    wait_healthy(&http, port).await;

    let post = |traceparent: Option<String>| {
        let mut req = http
            .post(format!("http://127.0.0.1:{port}/events"))
            .header("x-api-key", PARTNER_KEY)
            .json(&json!({"tipo": "RASTREIO", "dados": {"pedido": 7}}));
        if let Some(tp) = traceparent {
            req = req
                .header("traceparent", tp)
                .header("tracestate", "parceiro=abc123");
        }
        req.send()
    };
    let calls_for = |id: &str, n: usize| {
        let rx = &rx;
        let id = id.to_owned();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while rx.count_for("/hook", &id) < n {
                assert!(Instant::now() < deadline, "the webhook was not called {n} times");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The first attempt fails (500), the retry delivers.
    rx.set("/hook", Behaviour::Status(500));
    let id = accepted_id(
        post(Some(format!("00-{PARTNER_TRACE}-{PARTNER_SPAN}-01")))
            .await
            .expect("post"),
    )
    .await;
    calls_for(&id, 1).await;
    rx.set("/hook", Behaviour::Status(200));
    calls_for(&id, 2).await;
    // Without a traceparent the request starts a trace of its own.
    let other = accepted_id(post(None).await.expect("post")).await;
    calls_for(&other, 1).await;
    for event in [&id, &other] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status: Value = http
                .get(format!("http://127.0.0.1:{port}/events/{event}/status"))
                .header("x-api-key", PARTNER_KEY)
                .send()
                .await
                .expect("status")
                .json()
                .await
                .expect("json");
            if status["status"] == "processed" {
                break;
            }
            assert!(Instant::now() < deadline, "not processed: {status}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Spans go out in batches every 60 s here: none yet. SIGTERM must
    // export them before the process ends.
    assert!(
        collector.trace(PARTNER_TRACE).is_empty(),
        "nothing exported before the exit"
    );
    let stop = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill");
    assert!(stop.success());
    let status = server.wait().expect("wait");
    assert!(status.success(), "clean exit: {status:?}");

    let spans = collector.trace(PARTNER_TRACE);
    assert!(
        spans.iter().all(|s| s.service == "orchestrator-under-test"),
        "{spans:#?}"
    );
    let request = the(&spans, "POST /events");
    assert_eq!(
        request.parent, PARTNER_SPAN,
        "the request continues the partner's span"
    );
    assert_eq!(request.kind, 2, "a server span");
    assert_eq!(
        request.attributes.get("http.route").map(String::as_str),
        Some("/events")
    );
    assert_eq!(
        request
            .attributes
            .get("http.response.status_code")
            .map(String::as_str),
        Some("202")
    );
    for child in ["store.insert", "queue.push"] {
        assert_eq!(
            the(&spans, child).parent,
            request.span_id,
            "{child} is the request's child"
        );
    }
    // Both attempts continue the request, through the stored event; each
    // has its stages, and its delivery under its `deliver` stage.
    let attempts = children(&spans, &request.span_id, "process RASTREIO");
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    let mut delivered = Vec::new();
    for attempt in &attempts {
        assert_eq!(attempt.attributes.get("eventId"), Some(&id));
        for stage in ["validate", "enrich", "deliver"] {
            assert_eq!(
                children(&spans, &attempt.span_id, stage).len(),
                1,
                "stage {stage} of {attempt:?}"
            );
        }
        let deliver = children(&spans, &attempt.span_id, "deliver")[0];
        let delivery = children(&spans, &deliver.span_id, "deliver transportadora");
        assert_eq!(delivery.len(), 1);
        assert_eq!(delivery[0].kind, 3, "a client span");
        let code = delivery[0].attributes.get("http.response.status_code").cloned();
        delivered.push((attempt.status, code, delivery[0].span_id.clone()));
    }
    delivered.sort();
    assert_eq!(
        delivered
            .iter()
            .map(|(s, c, _)| (*s, c.as_deref()))
            .collect::<Vec<_>>(),
        vec![(0, Some("200")), (2, Some("500"))],
        "the failed attempt's span has the error status"
    );
    // Each webhook call's traceparent: the partner's trace, its delivery span.
    for call in rx.received("/hook").iter().filter(|r| r.body["id"] == id) {
        let (_, _, span) = delivered
            .iter()
            .find(|(_, c, _)| c.as_deref() == Some(call.status.to_string().as_str()))
            .expect("a delivery span for the call");
        assert_eq!(traceparent_of(call), format!("00-{PARTNER_TRACE}-{span}-01"));
        assert_eq!(
            call.headers.get("tracestate").and_then(|v| v.to_str().ok()),
            Some("parceiro=abc123")
        );
    }
    let call = rx
        .received("/hook")
        .into_iter()
        .find(|r| r.body["id"] == other)
        .expect("call");
    let tp = traceparent_of(&call);
    let own_trace = tp.split('-').nth(1).expect("trace id").to_owned();
    assert_ne!(own_trace, PARTNER_TRACE);
    let spans = collector.trace(&own_trace);
    assert_eq!(
        format!(
            "00-{own_trace}-{}-01",
            the(&spans, "deliver transportadora").span_id
        ),
        tp
    );
    assert_eq!(the(&spans, "POST /events").parent, "", "a root span");

    // Every line about the first event names its trace, though RUST_LOG
    // leaves the engine's spans out of the log.
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.contains(&id))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    for expected in [
        "event accepted",
        "attempt failed; retry scheduled",
        "event processed",
    ] {
        assert!(messages.contains(&expected), "{expected:?} in {messages:?}");
    }
    for line in &lines {
        assert_eq!(line["span"]["traceId"], PARTNER_TRACE, "{line}");
    }
}

/// The spans named `name` whose parent is `parent`.
fn children<'a>(spans: &'a [Exported], parent: &str, name: &str) -> Vec<&'a Exported> {
    spans
        .iter()
        .filter(|s| s.parent == parent && s.name == name)
        .collect()
}

/// Without an exporter, the partner's trace still reaches the webhook, and
/// an event without one gets a trace of its own.
async fn webhooks_continue_the_partners_trace_without_an_exporter(backend: Backend) {
    let rx = Receiver::start().await;
    let app = spawn_app_on(backend, rastreio(&rx)).await;
    let resp = app
        .http
        .post(app.url("/events"))
        .header("x-api-key", &app.key)
        .header("traceparent", format!("00-{PARTNER_TRACE}-{PARTNER_SPAN}-01"))
        .header("tracestate", "parceiro=abc123")
        .json(&json!({"tipo": "RASTREIO", "dados": {"n": 1}}))
        .send()
        .await
        .expect("post");
    let traced = accepted_id(resp).await;
    let resp = app
        .http
        .post(app.url("/events"))
        .header("x-api-key", &app.key)
        // Malformed: ignored, a new trace begins.
        .header("traceparent", format!("00-{}-{PARTNER_SPAN}-01", "0".repeat(32)))
        .json(&json!({"tipo": "RASTREIO", "dados": {"n": 2}}))
        .send()
        .await
        .expect("post");
    let fresh = accepted_id(resp).await;
    for id in [&traced, &fresh] {
        app.wait_for(id, "processed", Duration::from_secs(20)).await;
    }
    let calls = rx.received("/hook");
    let call = |id: &str| calls.iter().find(|r| r.body["id"] == id).expect("called");
    let tp = traceparent_of(call(&traced));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], PARTNER_TRACE, "the partner's trace continues");
    assert_ne!(parts[2], PARTNER_SPAN, "under a parent id of ours");
    assert_eq!(parts[3], "01");
    assert_eq!(
        call(&traced)
            .headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok()),
        Some("parceiro=abc123")
    );
    let tp = traceparent_of(call(&fresh));
    let parsed = engine::trace::TraceContext::parse(&tp, None).expect("a valid traceparent");
    assert_ne!(parsed.trace_id_hex(), PARTNER_TRACE);
    assert!(call(&fresh).headers.get("tracestate").is_none());
    // The event names its trace, for an operator to look it up.
    for (id, trace) in [
        (&traced, PARTNER_TRACE.to_owned()),
        (&fresh, parsed.trace_id_hex()),
    ] {
        let (status, ev) = app.get_json(&format!("/events/{id}"), &app.key).await;
        assert_eq!(status, 200);
        assert_eq!(ev["trace_id"], trace.as_str(), "{ev}");
    }
    app.stop().await;
}

both_backends!(webhooks_continue_the_partners_trace_without_an_exporter);
