//! Integration tests: one binary, many modules (faster to link).

/// Runs each named `async fn(Backend)` twice: `embedded::name` on SQLite and
/// the SQLite queue, `production::name` on PostgreSQL and Redis (skipped with a
/// printed line when they do not answer, unless `ORCH_REQUIRE_SERVICES=1`).
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Embedded).await
                }
            )*
        }
        mod production {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = $crate::helpers::Backend::production().await {
                        super::$name(backend).await
                    }
                }
            )*
        }
    };
}

mod browser;
mod cluster;
mod console;
/// Runs each named `async fn(Backend)` on PostgreSQL + Redis only (as
/// `production::name`), for topologies the embedded mode does not have.
#[macro_export]
macro_rules! production_only {
    ($($name:ident),* $(,)?) => {
        mod production_only {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = $crate::helpers::Backend::production().await {
                        super::$name(backend).await
                    }
                }
            )*
        }
    };
}

mod destinations;
mod dispatch;
mod fairness;
mod fixtures;
mod helpers;
mod hostile;
mod ingest;
mod lifecycle;
mod lists;
mod loading;
mod logcap;
mod observability;
mod ordering;
mod process;
mod reload;
mod retention;
mod security;
mod store;
mod sweep;
mod tables;
mod tls;
mod traces;
