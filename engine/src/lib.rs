//! The pipeline engine: the pipeline model, the all-or-nothing loader (from
//! directories or from files held in memory), the `Stage` trait and the
//! [`Event`] it runs on, the executor, the retry decision and the Rhai host.
//!
//! Architecture invariant: nothing here knows about HTTP, SQL or queues.
//! Stages leave what must be stored (deliveries made, the processed form) in
//! the [`EventContext`]; the service stores it with the attempt's outcome.

pub mod fixtures;
pub mod gate;
pub mod json;
pub mod loader;
pub mod model;
pub mod ordering;
pub mod pipeline;
pub mod retry;
pub mod script;
pub mod stage;
pub mod tables;
pub mod trace;

pub use loader::{
    LoadError, LoadErrors, LoadOptions, SourceFiles, StageBuildContext, StageFactory, load_from, load_set,
    load_stored,
};
pub use model::{
    CircuitBreaker, DeliveryLimits, DestinationConfig, PipelineSpec, Rate, RetryPolicy, StageConfig,
};
pub use pipeline::{Execution, Pipeline, PipelineSet, Violation, normalize_tipo, validate_with};
pub use retry::RetryDecision;
pub use script::{CompiledScript, ScriptHost, ScriptLimits};
pub use stage::{
    DeliveryOutcome, DeliveryReport, DeliveryWait, ERROR_CATEGORIES, ErrorClass, Event, EventContext, Stage,
    StageError, StageOutcome, StageTrace, Wait,
};
pub use tables::Tables;
