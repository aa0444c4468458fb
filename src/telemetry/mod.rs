//! Logs (one JSON object per line, or pretty for people), Prometheus
//! metrics ([`Metrics`]) and OpenTelemetry traces ([`otel`]).
//!
//! A JSON log line written inside a span carries that span as `span`
//! (its name and fields). Every span of an event's work (the request, the
//! attempt, each stage and delivery) has the event's `traceId`, so every
//! line about the event names its trace, whether or not traces are
//! exported.

mod metrics;
pub mod otel;

pub use metrics::Metrics;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The filter when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,apalis=warn,apalis_core=warn,hyper=warn";

/// Longest wait at exit for the spans not yet exported.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`init`] installed. [`Telemetry::shutdown`] exports the spans not
/// yet sent; call it before the process exits.
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub async fn shutdown(self) {
        if let Some(provider) = self.traces {
            // The batch processor's thread finishes its export on the
            // runtime, so this waits off the runtime's threads, and not for
            // ever: a collector that does not answer must not hold the exit.
            let flush = tokio::task::spawn_blocking(move || provider.shutdown());
            let _ = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
        }
    }
}

/// Installs the global subscriber on stdout (`RUST_LOG` filters, default
/// [`DEFAULT_LOG_FILTER`]) and, when the `OTEL_*` environment names an OTLP
/// endpoint, the trace exporter. An unusable `OTEL_*` setting is an error.
pub fn init(format: LogFormat) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let traces = otel::provider_from_env()?;
    install(format, filter, std::io::stdout, traces.as_ref());
    Ok(Telemetry { traces })
}

/// Installs the global subscriber with this filter and writer, without
/// traces (the tests capture the production JSON layout this way). A
/// second call does nothing.
pub fn init_logging_with<W>(format: LogFormat, filter: EnvFilter, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    install(format, filter, writer, None);
}

fn install<W>(format: LogFormat, filter: EnvFilter, writer: W, traces: Option<&SdkTracerProvider>)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let logs = tracing_subscriber::fmt::layer().with_writer(writer);
    let logs = match format {
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => logs.pretty().boxed(),
    };
    // This service's spans are always on for the log layer, whatever
    // `RUST_LOG` says, so the lines it lets through still carry their
    // span's `traceId`.
    let filter = filter.or(tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span() && otel::is_ours(meta.target())
    }));
    // Each layer has its own filter: `RUST_LOG` decides what is logged, not
    // which spans are exported.
    let spans = traces.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("orchestrator"))
            .with_filter(otel::span_filter())
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init();
    if installed.is_ok() && traces.is_some() {
        otel::enable();
    }
}
