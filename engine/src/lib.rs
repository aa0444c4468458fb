//! The pipeline engine: the pipeline model, the all-or-nothing loader, the
//! `Stage` trait, the executor and the Rhai host.
//!
//! Architecture invariant: nothing here knows about HTTP, SQL or queues.
//! Stages leave what must be stored (deliveries made, the processed form) in
//! the [`EventContext`]; the service stores it with the attempt's outcome.

pub mod fixtures;
pub mod json;
pub mod loader;
pub mod model;
pub mod pipeline;
pub mod script;
pub mod stage;
pub mod tables;

pub use loader::{LoadError, LoadErrors, LoadOptions, StageBuildContext, StageFactory, load_set};
pub use model::{DestinationConfig, PipelineSpec, RetryPolicy, StageConfig};
pub use pipeline::{Execution, Pipeline, PipelineSet, Violation, normalize_tipo, validate_with};
pub use script::{CompiledScript, ScriptEvent, ScriptHost, ScriptLimits};
pub use stage::{DeliveryReport, ErrorClass, EventContext, Stage, StageError, StageOutcome, StageTrace};
pub use tables::Tables;
