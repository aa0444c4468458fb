//! Prometheus metrics: every series the service exports, registered once.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Every metric the service exports.
pub struct Metrics {
    pub registry: Registry,
    pub events_received: IntCounterVec,
    pub events_processed: IntCounterVec,
    pub events_failed: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub events_retried: IntCounterVec,
    pub processing_duration: HistogramVec,
    pub stage_duration: HistogramVec,
    pub deliveries: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub reloads: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub oldest_pending: GaugeVec,
    pub events_by_status: IntGaugeVec,
    pub events_purged: IntCounterVec,
    pub sweep_duration: Histogram,
    pub destination_state: IntGaugeVec,
    pub destination_calls: IntCounterVec,
    pub destination_call_duration: HistogramVec,
    pub events_waiting: IntGaugeVec,
    pub events_waiting_on_key: IntGaugeVec,
    pub partner_waiting: IntGaugeVec,
    pub partner_in_flight: IntGaugeVec,
    pub component_up: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{name}: {e}"));
            registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            c
        };
        let events_received = counter(
            "events_received_total",
            "Events accepted by POST /events.",
            &["tipo"],
        );
        let events_processed = counter(
            "events_processed_total",
            "Events that reached processed.",
            &["tipo"],
        );
        let events_failed = counter(
            "events_failed_total",
            "Failed processing attempts, by error category.",
            &["tipo", "category"],
        );
        let events_dead_lettered = counter("events_dead_lettered_total", "Events dead-lettered.", &["tipo"]);
        let events_retried = counter("events_retried_total", "Retries scheduled.", &["tipo"]);
        let deliveries = counter(
            "deliveries_total",
            "Delivery attempts by destination and outcome.",
            &["tipo", "destination", "outcome"],
        );
        let http_requests = counter(
            "http_requests_total",
            "HTTP requests by route and status.",
            &["route", "status"],
        );
        let rate_limited = counter(
            "rate_limited_requests_total",
            "Requests refused with 429, by limit.",
            &["scope"],
        );
        let reloads = counter(
            "pipeline_reloads_total",
            "Pipeline set reloads by trigger (startup, admin, sighup, watch) and result (ok, rejected).",
            &["trigger", "result"],
        );
        let events_purged = counter(
            "events_purged_total",
            "Events removed by the retention purge, by status (processed, dead_lettered).",
            &["status"],
        );
        for status in ["processed", "dead_lettered"] {
            events_purged.with_label_values(&[status]);
        }
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            registry
                .register(Box::new(h.clone()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            h
        };
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let destination_calls = counter(
            "destination_calls_total",
            "Webhook calls made, by outcome (delivered, failed, rejected).",
            &["tipo", "destination", "outcome"],
        );
        let destination_call_duration = histogram(
            "destination_call_duration_seconds",
            "Time of one webhook call.",
            &["tipo", "destination"],
            buckets.clone(),
        );
        let processing_duration = histogram(
            "processing_duration_seconds",
            "Time to run a pipeline once.",
            &["tipo"],
            buckets.clone(),
        );
        let stage_duration = histogram(
            "stage_duration_seconds",
            "Time spent in each stage.",
            &["tipo", "stage"],
            buckets,
        );
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{name}: {e}"));
            registry
                .register(Box::new(g.clone()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            g
        };
        let queue_depth = gauge("queue_depth", "Pending tasks per pipeline queue.", &["tipo"]);
        let events_by_status = gauge("events_by_status", "Stored events per status.", &["status"]);
        let destination_state = gauge(
            "destination_state",
            "Circuit of each webhook destination: 0 closed, 1 half-open, 2 open.",
            &["tipo", "destination"],
        );
        let component_up = gauge(
            "component_up",
            "Whether the store and the queue answered a ping when /metrics was read (1) or not (0).",
            &["component"],
        );
        let events_waiting = gauge(
            "events_waiting",
            "Events waiting on a destination (open circuit, throttling).",
            &["tipo", "destination"],
        );
        let events_waiting_on_key = gauge(
            "events_waiting_on_key",
            "Events parked behind an earlier event of their ordering key.",
            &["tipo"],
        );
        let partner_waiting = gauge(
            "partner_events_waiting",
            "Events of a partner waiting to run (received, or retrying between attempts), over every type.",
            &["partner"],
        );
        let partner_in_flight = gauge(
            "partner_events_in_flight",
            "Events of a partner being processed now, over every type.",
            &["partner"],
        );
        let oldest_pending = GaugeVec::new(
            Opts::new(
                "queue_oldest_pending_seconds",
                "Age of the oldest event not yet processed or dead-lettered, per pipeline.",
            ),
            &["tipo"],
        )
        .unwrap_or_else(|e| panic!("queue_oldest_pending_seconds: {e}"));
        registry
            .register(Box::new(oldest_pending.clone()))
            .unwrap_or_else(|e| panic!("queue_oldest_pending_seconds: {e}"));
        let sweep_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sweep_duration_seconds",
                "Time of one sweeper pass (queue depths, stranded events, status counts).",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0]),
        )
        .unwrap_or_else(|e| panic!("sweep_duration_seconds: {e}"));
        registry
            .register(Box::new(sweep_duration.clone()))
            .unwrap_or_else(|e| panic!("sweep_duration_seconds: {e}"));
        Self {
            registry,
            events_received,
            events_processed,
            events_failed,
            events_dead_lettered,
            events_retried,
            processing_duration,
            stage_duration,
            deliveries,
            http_requests,
            rate_limited,
            reloads,
            queue_depth,
            oldest_pending,
            events_by_status,
            events_purged,
            sweep_duration,
            destination_state,
            destination_calls,
            destination_call_duration,
            events_waiting,
            events_waiting_on_key,
            partner_waiting,
            partner_in_flight,
            component_up,
        }
    }

    /// Creates every series labelled by the type (and its stages and
    /// destinations) of each loaded pipeline, at zero, so dashboards and
    /// alerts see them before the first event (Prometheus' advice for known
    /// label sets). Called at start and after every reload; series of types
    /// a reload removed stay, with their last values.
    pub fn init_types(&self, set: &engine::PipelineSet) {
        use engine::DeliveryOutcome as D;
        for p in set.pipelines() {
            let tipo = p.event_type.as_str();
            self.events_received.with_label_values(&[tipo]);
            self.events_processed.with_label_values(&[tipo]);
            self.events_dead_lettered.with_label_values(&[tipo]);
            self.events_retried.with_label_values(&[tipo]);
            for category in engine::ERROR_CATEGORIES {
                self.events_failed.with_label_values(&[tipo, category]);
            }
            self.processing_duration.with_label_values(&[tipo]);
            for (stage, _) in p.stage_names() {
                self.stage_duration.with_label_values(&[tipo, stage]);
            }
            self.queue_depth.with_label_values(&[tipo]);
            self.events_waiting_on_key.with_label_values(&[tipo]);
            self.oldest_pending.with_label_values(&[tipo]);
            for (name, d) in &p.destinations {
                for o in [D::Delivered, D::Failed, D::Rejected, D::Skipped, D::Waiting] {
                    self.deliveries.with_label_values(&[tipo, name, o.as_str()]);
                }
                if d.limits().is_some() {
                    for o in [D::Delivered, D::Failed, D::Rejected] {
                        self.destination_calls
                            .with_label_values(&[tipo, name, o.as_str()]);
                    }
                    self.destination_call_duration.with_label_values(&[tipo, name]);
                    self.destination_state.with_label_values(&[tipo, name]);
                    self.events_waiting.with_label_values(&[tipo, name]);
                }
            }
        }
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
