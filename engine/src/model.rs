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
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("soon").is_err());
    }
}
