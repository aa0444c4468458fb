//! Connections to Redis, for the queue and the destination gate alike: the
//! client `REDIS_URL` names (with the certificates of `rediss://`) and the
//! connection manager each of them holds.
//!
//! A leaf: it imports only `config`.

use std::path::Path;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, RedisError};

use crate::config::RedisTls;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL or a certificate file is unusable: nothing to retry.
    #[error("{0}")]
    Config(String),
    /// Redis answered with an error, or the TLS handshake failed (a
    /// certificate the client does not trust shows here, at once).
    #[error("{0}{hint}", hint = certificate_hint(.0))]
    Refused(RedisError),
    /// Nothing answered before the deadline.
    #[error("timed out after {0:?} connecting to Redis")]
    TimedOut(Duration),
}

/// Where to look when the TLS handshake failed over a certificate.
fn certificate_hint(e: &RedisError) -> &'static str {
    if e.to_string().contains("ertificate") {
        " (rediss://: the server's certificate is checked against REDIS_CA_FILE, or the system's \
         roots when it is unset; a server that asks for a client certificate gets \
         REDIS_CLIENT_CERT_FILE)"
    } else {
        ""
    }
}

/// How long a manager waits for its connection and for each answer, and
/// how far apart it retries a lost connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub max_retry_delay: Duration,
}

/// The client for `url`. A `rediss://` URL verifies the server against the
/// system's trust store, or against `tls.ca_file` alone when it is set,
/// and presents the client certificate when one is set.
pub fn client(url: &str, tls: &RedisTls) -> Result<Client, ConnectError> {
    let invalid = |e: RedisError| ConnectError::Config(format!("invalid REDIS_URL: {e}"));
    if !tls.is_set() {
        return Client::open(url).map_err(invalid);
    }
    let client_tls = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_pem("REDIS_CLIENT_CERT_FILE", cert)?,
            client_key: read_pem("REDIS_CLIENT_KEY_FILE", key)?,
        }),
        _ => None,
    };
    let root_cert = match &tls.ca_file {
        Some(ca) => Some(read_pem("REDIS_CA_FILE", ca)?),
        None => None,
    };
    Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| ConnectError::Config(format!("REDIS_URL with its certificates: {e}")))
}

fn read_pem(key: &str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    let pem = std::fs::read(path)
        .map_err(|e| ConnectError::Config(format!("{key}: cannot read {}: {e}", path.display())))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConnectError::Config(format!(
            "{key}: {} is not a PEM file",
            path.display()
        )));
    }
    Ok(pem)
}

/// A connection manager whose first connection is made before it returns.
///
/// Only a refused or unanswered connection is retried (Redis may be
/// starting), until `timeouts.connect`; anything else, a certificate the
/// client does not trust above all, is returned at once. The manager's own
/// start retries every error with backoff, which turned a wrong CA into a
/// "timed out" several seconds later; so the first connection is tried here
/// and the manager only starts once one succeeded.
pub async fn manager(client: &Client, timeouts: Timeouts) -> Result<ConnectionManager, ConnectError> {
    let deadline = tokio::time::Instant::now() + timeouts.connect;
    let probe = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeouts.connect))
        .set_response_timeout(Some(timeouts.response));
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, client.get_multiplexed_async_connection_with_config(&probe)).await {
            Err(_) => return Err(ConnectError::TimedOut(timeouts.connect)),
            Ok(Ok(_)) => break,
            Ok(Err(e)) if e.is_connection_refusal() || e.is_timeout() => {
                if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                    return Err(ConnectError::Refused(e));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => return Err(ConnectError::Refused(e)),
        }
    }
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(timeouts.response))
        .set_connection_timeout(Some(timeouts.connect))
        .set_max_delay(timeouts.max_retry_delay);
    let connect = client.get_connection_manager_with_config(config);
    tokio::time::timeout(timeouts.connect + timeouts.response, connect)
        .await
        .map_err(|_| ConnectError::TimedOut(timeouts.connect))?
        .map_err(ConnectError::Refused)
}
