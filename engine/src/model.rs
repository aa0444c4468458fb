//! The pipeline file format: what an integrator writes in `PIPELINES_DIR/*.yaml`.
//!
//! Every struct denies unknown keys, so a typo is a load error and never a
//! silently ignored setting.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// One pipeline file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// The `tipo` this pipeline handles (compared after NFC normalisation).
    pub event_type: String,
    /// Free text for people.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON Schema file under `SCHEMAS_DIR` that `dados` must satisfy.
    pub schema: String,
    /// Retry policy for transient failures.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Worker slots for this pipeline.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Stages after the implicit `validate`.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
    /// Named delivery targets that `route` may pick.
    #[serde(default)]
    pub destinations: BTreeMap<String, DestinationConfig>,
    /// Reference tables for the scripts' `lookup(table, key)`.
    #[serde(default)]
    pub tables: BTreeMap<String, TableSpec>,
    /// Events of one partner with equal keys run one at a time, in
    /// acceptance order.
    #[serde(default)]
    pub ordering: Option<OrderingSpec>,
}

/// `ordering:` of a pipeline.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OrderingSpec {
    /// A JSON pointer into the event: `/dados/produto_id`.
    pub key: String,
    #[serde(default)]
    pub on_dead_letter: OnDeadLetter,
}

/// What a dead letter does to the events behind it on its key.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    /// The key's next event proceeds.
    #[default]
    Skip,
    /// Later events wait until the dead letter is retried or removed.
    Block,
}

/// A reference table: inline `rows`, or a `file` under `PIPELINES_DIR`
/// (`.csv` with a header row, or `.yaml`/`.yml`/`.json` holding a mapping).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// Table file relative to `PIPELINES_DIR`.
    #[serde(default)]
    pub file: Option<String>,
    /// CSV: the key column (default: the first column).
    #[serde(default)]
    pub key: Option<String>,
    /// CSV: column types; unlisted columns are strings.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnType>,
    /// Inline rows: a mapping key → value (any YAML value).
    #[serde(default)]
    pub rows: Option<serde_yaml::Value>,
}

/// The type of a CSV column's cells.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    #[default]
    String,
    Int,
    Float,
    Bool,
}

fn default_concurrency() -> usize {
    8
}

/// How transient failures are retried before the event is dead-lettered
/// (what it decides: [`crate::retry`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// `fixed` or `exponential`.
    #[serde(default)]
    pub backoff: Backoff,
    /// Delay before the first retry.
    #[serde(default = "default_initial_delay", with = "duration_str")]
    pub initial_delay: Duration,
    /// Growth factor for `exponential`.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Upper bound for any delay.
    #[serde(default = "default_max_delay", with = "duration_str")]
    pub max_delay: Duration,
}

fn default_max_retries() -> u32 {
    3
}
fn default_initial_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_multiplier() -> f64 {
    4.0
}
fn default_max_delay() -> Duration {
    Duration::from_secs(600)
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: default_max_retries(),
            backoff: Backoff::default(),
            initial_delay: default_initial_delay(),
            multiplier: default_multiplier(),
            max_delay: default_max_delay(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    Fixed,
    #[default]
    Exponential,
}

/// A stage of the chain. The closed set of built-in plugins; `validate` is
/// implicit and always first, but may be listed to make it explicit.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "plugin", rename_all = "snake_case", deny_unknown_fields)]
pub enum StageConfig {
    /// JSON Schema validation of `dados` (implicit first stage).
    Validate {
        #[serde(default)]
        name: Option<String>,
    },
    /// Rhai enrichment: may change `event.dados` and `event.meta`, or `reject(..)`.
    Script {
        #[serde(default)]
        name: Option<String>,
        /// Script file relative to `PIPELINES_DIR`.
        #[serde(default)]
        file: Option<String>,
        /// Inline script.
        #[serde(default)]
        script: Option<String>,
    },
    /// Chooses destinations: a Rhai script returning names, or a static list.
    Route {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        file: Option<String>,
        #[serde(default)]
        script: Option<String>,
        #[serde(default)]
        to: Option<Vec<String>>,
    },
    /// Sends the event to the routed destinations.
    Deliver {
        #[serde(default)]
        name: Option<String>,
    },
    /// Records the final processed form of the event.
    Persist {
        #[serde(default)]
        name: Option<String>,
    },
}

impl StageConfig {
    pub fn plugin(&self) -> &'static str {
        match self {
            StageConfig::Validate { .. } => "validate",
            StageConfig::Script { .. } => "script",
            StageConfig::Route { .. } => "route",
            StageConfig::Deliver { .. } => "deliver",
            StageConfig::Persist { .. } => "persist",
        }
    }

    pub fn explicit_name(&self) -> Option<&str> {
        match self {
            StageConfig::Validate { name }
            | StageConfig::Script { name, .. }
            | StageConfig::Route { name, .. }
            | StageConfig::Deliver { name }
            | StageConfig::Persist { name } => name.as_deref(),
        }
    }

    /// Checks that need nothing but the config itself.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            StageConfig::Script { file, script, .. } => match (file, script) {
                (Some(_), Some(_)) => Err("give either `file` or `script`, not both".into()),
                (None, None) => Err("a script stage needs `file` or `script`".into()),
                _ => Ok(()),
            },
            StageConfig::Route { file, script, to, .. } => {
                let given = [file.is_some(), script.is_some(), to.is_some()]
                    .iter()
                    .filter(|g| **g)
                    .count();
                if given != 1 {
                    return Err("a route stage needs exactly one of `file`, `script` or `to`".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Where `deliver` sends events.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DestinationConfig {
    /// HTTP POST of the event as JSON.
    Webhook {
        /// Target URL; `${VAR}` expands from the environment at load.
        url: String,
        /// Per-request timeout.
        #[serde(default = "default_webhook_timeout", with = "duration_str")]
        timeout: Duration,
        /// Standard Webhooks signing secret (`whsec_<base64>` or raw text).
        #[serde(default)]
        secret: Option<String>,
        /// Extra request headers.
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// `log`: when the URL names an unset environment variable, deliver to the
        /// log instead of failing the load (keeps the default install self-contained).
        #[serde(default)]
        fallback: Option<Fallback>,
        /// Calls per second or minute (`200/s`, `600/m`), across every worker
        /// process; none by default.
        #[serde(default)]
        rate_limit: Option<Rate>,
        /// Concurrent calls, across every worker process.
        #[serde(default = "default_max_in_flight")]
        max_in_flight: u32,
        /// When consecutive transient failures stop the calls for a while.
        #[serde(default)]
        circuit_breaker: CircuitBreaker,
        /// How long an event may wait on this destination (open circuit,
        /// throttling) before it dead-letters.
        #[serde(default = "default_max_wait", with = "duration_str")]
        max_wait: Duration,
    },
    /// Writes the event to the service log.
    Log {
        #[serde(default)]
        level: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    Log,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_in_flight() -> u32 {
    64
}

fn default_max_wait() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// A call rate: `200/s` or `600/m` (`per_second` 200 and 10).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Calls allowed per `per`.
    pub calls: u32,
    pub per: Duration,
}

impl Rate {
    /// The time one call takes of the budget: `per / calls`.
    pub fn interval(&self) -> Duration {
        self.per / self.calls.max(1)
    }

    pub fn per_second(&self) -> f64 {
        f64::from(self.calls) / self.per.as_secs_f64()
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid rate {s:?}: expected calls per second or minute, like `200/s` or `600/m`");
        let (calls, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let calls: u32 = calls.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            _ => return Err(bad()),
        };
        if calls == 0 {
            return Err(format!("invalid rate {s:?}: must allow at least one call"));
        }
        Ok(Rate { calls, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = if self.per == Duration::from_secs(60) {
            "m"
        } else {
            "s"
        };
        write!(f, "{}/{unit}", self.calls)
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// When a destination's circuit opens, and for how long.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Consecutive transient failures (timeouts, connection errors, 408,
    /// 429, 5xx) that open the circuit.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How long it stays open before one probe; doubles while probes fail.
    #[serde(default = "default_open_for", with = "duration_str")]
    pub open_for: Duration,
    /// The longest it stays open.
    #[serde(default = "default_max_open", with = "duration_str")]
    pub max_open: Duration,
}

fn default_failure_threshold() -> u32 {
    5
}
fn default_open_for() -> Duration {
    Duration::from_secs(30)
}
fn default_max_open() -> Duration {
    Duration::from_secs(600)
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            open_for: default_open_for(),
            max_open: default_max_open(),
        }
    }
}

/// What a webhook destination's calls are held to (see [`crate::gate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliveryLimits {
    pub rate_limit: Option<Rate>,
    pub max_in_flight: u32,
    pub circuit_breaker: CircuitBreaker,
    pub max_wait: Duration,
    /// The call's timeout: how long a slot or a probe is held at most.
    pub timeout: Duration,
}

impl DeliveryLimits {
    /// Checks a destination's limits make sense; the message names the key.
    pub fn check(&self) -> Result<(), String> {
        let cb = &self.circuit_breaker;
        if self.max_in_flight == 0 {
            return Err("max_in_flight must be at least 1".into());
        }
        if cb.failure_threshold == 0 {
            return Err("circuit_breaker.failure_threshold must be at least 1".into());
        }
        if cb.open_for.is_zero() {
            return Err("circuit_breaker.open_for must be longer than zero".into());
        }
        if cb.max_open < cb.open_for {
            return Err(format!(
                "circuit_breaker.max_open ({}) is shorter than open_for ({})",
                humantime::format_duration(cb.max_open),
                humantime::format_duration(cb.open_for)
            ));
        }
        if self.max_wait.is_zero() {
            return Err("max_wait must be longer than zero".into());
        }
        Ok(())
    }
}

impl DestinationConfig {
    /// A webhook's delivery limits; `None` for destinations that make no calls.
    pub fn limits(&self) -> Option<DeliveryLimits> {
        match self {
            DestinationConfig::Webhook {
                timeout,
                rate_limit,
                max_in_flight,
                circuit_breaker,
                max_wait,
                ..
            } => Some(DeliveryLimits {
                rate_limit: *rate_limit,
                max_in_flight: *max_in_flight,
                circuit_breaker: *circuit_breaker,
                max_wait: *max_wait,
                timeout: *timeout,
            }),
            DestinationConfig::Log { .. } => None,
        }
    }
}

/// Parses `"500ms"`, `"1s"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

pub(crate) mod duration_str {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = String::deserialize(d)?;
        parse_duration(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let err = serde_yaml::from_str::<PipelineSpec>("event_type: X\nschema: x.json\nretries: 3\n")
            .expect_err("unknown key must fail");
        assert!(err.to_string().contains("retries"), "{err}");
        let err = serde_yaml::from_str::<PipelineSpec>(
            "event_type: X\nschema: x.json\nstages:\n  - plugin: script\n    fil: a.rhai\n",
        )
        .expect_err("unknown stage key must fail");
        assert!(err.to_string().contains("fil"), "{err}");
        let err = serde_yaml::from_str::<PipelineSpec>(
            "event_type: X\nschema: x.json\nstages:\n  - plugin: enrich\n",
        )
        .expect_err("unknown plugin must fail");
        assert!(err.to_string().contains("enrich"), "{err}");
    }

    #[test]
    fn rates_parse_per_second_and_minute() {
        let r: Rate = "200/s".parse().expect("rate");
        assert_eq!((r.calls, r.per), (200, Duration::from_secs(1)));
        assert_eq!(r.interval(), Duration::from_millis(5));
        let r: Rate = " 600 / m ".parse().expect("rate");
        assert_eq!(r.per_second(), 10.0);
        assert_eq!(r.to_string(), "600/m");
        for bad in ["200", "0/s", "-1/s", "10/h", "ten/s", "/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} must fail");
        }
    }

    #[test]
    fn webhook_limits_have_defaults_and_deny_unknown_keys() {
        let d: DestinationConfig = serde_yaml::from_str("type: webhook\nurl: http://x\n").expect("parses");
        let l = d.limits().expect("a webhook has limits");
        assert_eq!(l.rate_limit, None);
        assert_eq!(l.max_in_flight, 64);
        assert_eq!(l.circuit_breaker, CircuitBreaker::default());
        assert_eq!(l.max_wait, Duration::from_secs(86_400));
        let d: DestinationConfig = serde_yaml::from_str(
            "type: webhook\nurl: http://x\nrate_limit: 50/s\ncircuit_breaker:\n  open_for: 5s\n",
        )
        .expect("parses");
        let l = d.limits().expect("limits");
        assert_eq!(l.rate_limit.map(|r| r.calls), Some(50));
        assert_eq!(l.circuit_breaker.open_for, Duration::from_secs(5));
        assert_eq!(l.circuit_breaker.failure_threshold, 5);
        let err = serde_yaml::from_str::<DestinationConfig>(
            "type: webhook\nurl: http://x\ncircuit_breaker:\n  threshold: 3\n",
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("threshold"), "{err}");
        let err =
            serde_yaml::from_str::<DestinationConfig>("type: webhook\nurl: http://x\nrate_limit: fast\n")
                .expect_err("bad rate");
        assert!(err.to_string().contains("invalid rate"), "{err}");
        let bad = DeliveryLimits {
            circuit_breaker: CircuitBreaker {
                max_open: Duration::from_secs(1),
                ..CircuitBreaker::default()
            },
            ..l
        };
        assert!(bad.check().expect_err("max_open < open_for").contains("max_open"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").is_err());
    }
}
