//! The event orchestrator service: HTTP API, store, queue, workers, CLI glue.
//!
//! Architecture invariant: dependencies point one way, `orchestrator` →
//! `plugins` → `engine`. Only this crate knows about HTTP servers, SQL and
//! queues.

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod console;
pub mod credentials;
pub mod destinations;
pub mod dispatch;
pub mod operators;
pub mod partners;
pub mod periodic;
pub mod pipelines;
pub mod queue;
pub mod redis_conn;
pub mod retention;
pub mod store;
pub mod telemetry;
pub mod worker;
