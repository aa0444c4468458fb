//! OpenTelemetry traces, exported over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set; the SDK reads the other standard variables (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`). Off when unset, or with
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
//!
//! Either way every request and every attempt has a W3C trace context
//! ([`continue_trace`]): the partner's `traceparent` continued, or a new
//! trace. With the exporter on, that context is the span's own (its parent
//! the partner's span, or the request span for an attempt), so the spans of
//! one event, from the request to each delivery, form one trace; with it
//! off, the ids are made here and nothing is recorded.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use engine::trace::TraceContext;
use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (the OpenTelemetry layer is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(super) fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
    engine::trace::install_current_span(current_span);
}

/// This service's crates.
const OURS: [&str; 3] = ["orchestrator", "engine", "plugins"];

/// Whether a target is one of this service's crates.
pub(super) fn is_ours(target: &str) -> bool {
    OURS.iter().any(|c| {
        target
            .strip_prefix(c)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// The spans exported: this service's own, not its libraries' (nor the
/// exporter's own HTTP calls).
pub(super) fn span_filter() -> Targets {
    OURS.iter()
        .fold(Targets::new(), |t, c| t.with_target(*c, tracing::Level::INFO))
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// The tracer provider the environment asks for, if any.
pub(super) fn provider_from_env() -> Result<Option<SdkTracerProvider>, String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none")
        || (env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
            && env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none())
    {
        return Ok(None);
    }
    if let Some(other) = env("OTEL_TRACES_EXPORTER").filter(|v| v.trim() != "otlp") {
        return Err(format!("OTEL_TRACES_EXPORTER={other:?}: otlp or none"));
    }
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(p) = protocol.filter(|p| p.trim() != "http/protobuf") {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={p:?}: this build exports http/protobuf only \
             (a collector's OTLP/HTTP port, usually 4318)"
        ));
    }
    let timeout_ms =
        match env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT")) {
            None => 10_000,
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("OTEL_EXPORTER_OTLP_TIMEOUT={v:?}: milliseconds expected"))?,
        };
    let http = collector_tls(reqwest::Client::builder())?
        .timeout(Duration::from_millis(timeout_ms))
        .build()
        .map_err(|e| format!("OTLP HTTP client: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(OtlpHttp {
            http,
            runtime: tokio::runtime::Handle::current(),
        })
        .build()
        .map_err(|e| format!("OTLP exporter (OTEL_EXPORTER_OTLP_*): {e}"))?;
    let mut resource = Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name("orchestrator");
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// `OTEL_EXPORTER_OTLP_CERTIFICATE` (a CA, PEM, trusted besides the
/// system's roots) and `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` /
/// `_CLIENT_KEY` (PEM), each also in its `_TRACES_` form.
fn collector_tls(mut builder: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, String> {
    let file = |name: &str| -> Result<Option<Vec<u8>>, String> {
        let traces = name.replacen("OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_TRACES_", 1);
        match env(&traces).or_else(|| env(name)) {
            None => Ok(None),
            Some(path) => std::fs::read(path.trim())
                .map(Some)
                .map_err(|e| format!("{name}: cannot read {path}: {e}")),
        }
    };
    if let Some(pem) = file("OTEL_EXPORTER_OTLP_CERTIFICATE")? {
        let ca = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE: {e}"))?;
        builder = builder.add_root_certificate(ca);
    }
    match (
        file("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")?,
        file("OTEL_EXPORTER_OTLP_CLIENT_KEY")?,
    ) {
        (None, None) => {}
        (Some(mut cert), Some(key)) => {
            cert.push(b'\n');
            cert.extend_from_slice(&key);
            let identity = reqwest::Identity::from_pem(&cert)
                .map_err(|e| format!("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE: {e}"))?;
            builder = builder.identity(identity);
        }
        _ => {
            return Err(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together"
                    .to_owned(),
            );
        }
    }
    Ok(builder)
}

/// The exporter's HTTP client: this service's reqwest. The SDK's batch
/// processor exports from a thread of its own, outside the runtime, so
/// each request runs as a task on the runtime and the thread awaits it.
#[derive(Debug)]
struct OtlpHttp {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.http.clone();
        let call = async move {
            let (parts, body) = request.into_parts();
            let resp = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let mut out = http::Response::builder().status(resp.status());
            if let Some(headers) = out.headers_mut() {
                *headers = resp.headers().clone();
            }
            let body = resp.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out.body(body)?)
        };
        self.runtime.spawn(call).await?
    }
}

/// Puts `span` (not yet entered) in `parent`'s trace, or starts a trace,
/// records its `traceId`, and returns the context a child of `span`
/// continues: with the exporter on, `span`'s own; otherwise made here.
pub fn continue_trace(span: &tracing::Span, parent: Option<&TraceContext>) -> TraceContext {
    let made_here = || {
        parent
            .map(TraceContext::child)
            .unwrap_or_else(TraceContext::new_root)
    };
    let tc = if enabled() {
        if let Some(p) = parent {
            let _ = span.set_parent(Context::new().with_remote_span_context(span_context(p)));
        }
        match of_span(span) {
            Some(mut own) => {
                if own.state.is_none() {
                    own.state = parent.and_then(|p| p.state.clone());
                }
                own
            }
            None => made_here(),
        }
    } else {
        made_here()
    };
    span.record("traceId", tc.trace_id_hex());
    tc
}

fn span_context(tc: &TraceContext) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(tc.trace_id.to_be_bytes()),
        SpanId::from_bytes(tc.parent_id.to_be_bytes()),
        TraceFlags::new(tc.flags),
        true,
        tc.state
            .as_deref()
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default(),
    )
}

/// A span's OpenTelemetry context, when it has a valid one.
fn of_span(span: &tracing::Span) -> Option<TraceContext> {
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if !sc.is_valid() {
        return None;
    }
    let state = sc.trace_state().header();
    Some(TraceContext {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        parent_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        flags: sc.trace_flags().to_u8(),
        state: (!state.is_empty()).then_some(state),
    })
}

/// The current span's context (the engine asks, for an outgoing call).
fn current_span() -> Option<TraceContext> {
    of_span(&tracing::Span::current())
}
