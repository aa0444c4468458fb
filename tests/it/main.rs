//! Integration tests: one binary, many modules (faster to link).

mod helpers;
mod ingest;
mod lifecycle;
mod loading;
mod process;
