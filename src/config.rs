//! Configuration: built-in defaults, then an optional YAML file
//! (`CONFIG_FILE`, default `orchestrator.yaml` when present), then the
//! environment. Keys in the file are the environment names, any case.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// `sqlite://…` or `postgres://…`.
    pub database_url: SecretString,
    /// `None` = the embedded SQLite queue.
    pub redis_url: Option<SecretString>,
    /// Namespace of every Redis key (several deployments can share one Redis).
    pub redis_prefix: String,
    /// Certificates for a `rediss://` `REDIS_URL`.
    pub redis_tls: RedisTls,
    /// SQLite queue file (embedded mode).
    pub queue_database_url: String,
    pub data_dir: PathBuf,
    pub pipelines_dir: PathBuf,
    pub schemas_dir: PathBuf,
    pub jwt_secret: Option<SecretString>,
    /// Lifetime of the tokens `POST /auth/login` issues.
    pub jwt_ttl: Duration,
    pub admin_api_key: Option<SecretString>,
    pub log_format: LogFormat,
    pub rate_limit_ip_per_minute: u32,
    pub rate_limit_partner_per_minute: u32,
    pub rate_limit_partner_burst: u32,
    pub max_body_bytes: usize,
    /// Limits on the JSON of request bodies.
    pub json_limits: engine::json::JsonLimits,
    /// Largest total size of a request's headers, bytes.
    pub max_header_bytes: usize,
    /// Peers whose `X-Forwarded-For` names the client (load balancers).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `POST /auth/login` attempts per minute for one username.
    pub login_per_user_per_minute: u32,
    /// `POST /auth/login` attempts per minute from one client IP.
    pub login_per_ip_per_minute: u32,
    pub request_timeout: Duration,
    /// A console session unused for this long is signed out.
    pub console_idle_timeout: Duration,
    /// A console session ends this long after its sign-in, used or not.
    pub console_session_lifetime: Duration,
    /// How long a worker holds an event before another may take it over.
    pub processing_lease: Duration,
    /// A `received` event not picked up for this long is queued again.
    pub requeue_after: Duration,
    pub sweep_interval: Duration,
    /// How long processed and dead-lettered events are kept, counted from
    /// when they reached that status.
    pub retention: Retention,
    /// How often the purge runs (default: a quarter of the shortest
    /// retention, between 1 s and 1 min).
    pub purge_interval: Duration,
    /// The time range of one PostgreSQL event partition (default: a quarter
    /// of `RETENTION_PROCESSED`, between 1 s and 1 day).
    pub partition_period: Duration,
    /// Reload when files under the pipeline or schema directory change.
    pub watch_pipelines: bool,
    /// Quiet time after the last change before that reload.
    pub watch_debounce: Duration,
    pub script_max_operations: u64,
    pub script_max_wall_time: Duration,
    /// Create the `demo` partner on first start.
    pub create_demo_partner: bool,
    pub migrate_on_start: bool,
}

/// The files a `rediss://` connection uses beyond the system's trust store:
/// a private CA (`REDIS_CA_FILE`, PEM, trusted instead of the system's
/// roots) and a client certificate and key for servers that ask for one
/// (`REDIS_CLIENT_CERT_FILE`, `REDIS_CLIENT_KEY_FILE`, PEM, both or none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl RedisTls {
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert_file.is_some() || self.client_key_file.is_some()
    }
}

/// How long terminal events are kept, counted from when they reached their
/// status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub processed: Duration,
    pub dead_lettered: Duration,
}

impl Retention {
    /// A quarter of the shortest retention, between 1 s and 1 min: an
    /// expired event goes within about a quarter of its retention.
    pub fn default_purge_interval(&self) -> Duration {
        (self.processed.min(self.dead_lettered) / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// A quarter of the processed retention, between 1 s and 1 day: a
    /// PostgreSQL partition is dropped at most about a quarter of the
    /// retention after its newest event expired, and about five hold the
    /// events retained.
    pub fn default_partition_period(&self) -> Duration {
        (self.processed / 4).clamp(Duration::from_secs(1), Duration::from_secs(86_400))
    }
}

/// The keys, for documentation and unknown-key checks.
pub const KEYS: &[&str] = &[
    "LISTEN_ADDR",
    "DATABASE_URL",
    "REDIS_URL",
    "REDIS_PREFIX",
    "REDIS_CA_FILE",
    "REDIS_CLIENT_CERT_FILE",
    "REDIS_CLIENT_KEY_FILE",
    "QUEUE_DATABASE_URL",
    "DATA_DIR",
    "PIPELINES_DIR",
    "SCHEMAS_DIR",
    "JWT_SECRET",
    "JWT_TTL",
    "ADMIN_API_KEY",
    "LOG_FORMAT",
    "RATE_LIMIT_IP_PER_MINUTE",
    "RATE_LIMIT_PARTNER_PER_MINUTE",
    "RATE_LIMIT_PARTNER_BURST",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_JSON_STRING_BYTES",
    "MAX_JSON_ITEMS",
    "MAX_HEADER_BYTES",
    "TRUSTED_PROXIES",
    "LOGIN_ATTEMPTS_PER_USER_PER_MINUTE",
    "LOGIN_ATTEMPTS_PER_IP_PER_MINUTE",
    "REQUEST_TIMEOUT",
    "CONSOLE_IDLE_TIMEOUT",
    "CONSOLE_SESSION_LIFETIME",
    // Accepted and ignored: workers wake on work instead of polling.
    "QUEUE_POLL_INTERVAL",
    "PROCESSING_LEASE",
    "REQUEUE_AFTER",
    "SWEEP_INTERVAL",
    "RETENTION_PROCESSED",
    "RETENTION_DEAD_LETTERED",
    "PURGE_INTERVAL",
    "PARTITION_PERIOD",
    "WATCH_PIPELINES",
    "WATCH_DEBOUNCE",
    "SCRIPT_MAX_OPERATIONS",
    "SCRIPT_MAX_WALL_TIME",
    "CREATE_DEMO_PARTNER",
    "MIGRATE_ON_START",
];

impl Config {
    /// Reads the file named by `CONFIG_FILE` (or `orchestrator.yaml` if it
    /// exists), then the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let file = match env.get("CONFIG_FILE") {
            Some(f) => Some(PathBuf::from(f)),
            None => Some(PathBuf::from("orchestrator.yaml")).filter(|p| p.exists()),
        };
        let mut values = HashMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
            let map: HashMap<String, serde_yaml::Value> =
                serde_yaml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            for (k, v) in map {
                let key = k.to_ascii_uppercase();
                if !KEYS.contains(&key.as_str()) {
                    return Err(ConfigError(format!("{}: unknown key {k:?}", path.display())));
                }
                let v = match v {
                    serde_yaml::Value::String(s) => s,
                    other => serde_yaml::to_string(&other)
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                };
                values.insert(key, v);
            }
        }
        for k in KEYS {
            if let Some(v) = env.get(*k) {
                values.insert((*k).to_owned(), v.clone());
            }
        }
        Self::from_map(&values)
    }

    /// Builds a config from explicit values (tests); missing keys get defaults.
    pub fn from_map(values: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| values.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        fn parse<T: std::str::FromStr>(k: &str, v: Option<&str>, default: T) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            match v {
                None => Ok(default),
                Some(s) => s.parse().map_err(|e| ConfigError(format!("{k}={s:?}: {e}"))),
            }
        }
        let duration = |k: &str, default: Duration| -> Result<Duration, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some(s) => engine::model::parse_duration(s).map_err(|e| ConfigError(format!("{k}: {e}"))),
            }
        };
        let data_dir = PathBuf::from(get("DATA_DIR").unwrap_or("./data"));
        let database_url = get("DATABASE_URL")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("sqlite://{}/orchestrator.db", data_dir.display()));
        let queue_database_url = get("QUEUE_DATABASE_URL")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("sqlite://{}/queue.db", data_dir.display()));
        let log_format = match get("LOG_FORMAT").unwrap_or("json") {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => {
                return Err(ConfigError(format!(
                    "LOG_FORMAT must be json or pretty, got {other:?}"
                )));
            }
        };
        let retention = Retention {
            processed: duration("RETENTION_PROCESSED", Duration::from_secs(7 * 86_400))?,
            dead_lettered: duration("RETENTION_DEAD_LETTERED", Duration::from_secs(30 * 86_400))?,
        };
        let purge_interval = duration("PURGE_INTERVAL", retention.default_purge_interval())?;
        let partition_period = duration("PARTITION_PERIOD", retention.default_partition_period())?;
        let cfg = Config {
            listen_addr: parse(
                "LISTEN_ADDR",
                get("LISTEN_ADDR"),
                SocketAddr::from(([0, 0, 0, 0], 3000)),
            )?,
            database_url: SecretString::from(database_url),
            redis_url: get("REDIS_URL").map(|s| SecretString::from(s.to_owned())),
            redis_prefix: get("REDIS_PREFIX").unwrap_or("orchestrator").to_owned(),
            redis_tls: RedisTls {
                ca_file: get("REDIS_CA_FILE").map(PathBuf::from),
                client_cert_file: get("REDIS_CLIENT_CERT_FILE").map(PathBuf::from),
                client_key_file: get("REDIS_CLIENT_KEY_FILE").map(PathBuf::from),
            },
            queue_database_url,
            data_dir,
            pipelines_dir: PathBuf::from(get("PIPELINES_DIR").unwrap_or("./pipelines")),
            schemas_dir: PathBuf::from(get("SCHEMAS_DIR").unwrap_or("./schemas")),
            jwt_secret: get("JWT_SECRET").map(|s| SecretString::from(s.to_owned())),
            jwt_ttl: duration("JWT_TTL", Duration::from_secs(3600))?,
            admin_api_key: get("ADMIN_API_KEY").map(|s| SecretString::from(s.to_owned())),
            log_format,
            rate_limit_ip_per_minute: parse(
                "RATE_LIMIT_IP_PER_MINUTE",
                get("RATE_LIMIT_IP_PER_MINUTE"),
                1000,
            )?,
            rate_limit_partner_per_minute: parse(
                "RATE_LIMIT_PARTNER_PER_MINUTE",
                get("RATE_LIMIT_PARTNER_PER_MINUTE"),
                100,
            )?,
            rate_limit_partner_burst: parse("RATE_LIMIT_PARTNER_BURST", get("RATE_LIMIT_PARTNER_BURST"), 10)?,
            max_body_bytes: parse("MAX_BODY_BYTES", get("MAX_BODY_BYTES"), 256 * 1024)?,
            json_limits: engine::json::JsonLimits {
                max_depth: parse("MAX_JSON_DEPTH", get("MAX_JSON_DEPTH"), 32)?,
                max_string_bytes: parse("MAX_JSON_STRING_BYTES", get("MAX_JSON_STRING_BYTES"), 64 * 1024)?,
                max_items: parse("MAX_JSON_ITEMS", get("MAX_JSON_ITEMS"), 10_000)?,
            },
            max_header_bytes: parse("MAX_HEADER_BYTES", get("MAX_HEADER_BYTES"), 16 * 1024)?,
            trusted_proxies: trusted_proxies(get("TRUSTED_PROXIES"))?,
            login_per_user_per_minute: parse(
                "LOGIN_ATTEMPTS_PER_USER_PER_MINUTE",
                get("LOGIN_ATTEMPTS_PER_USER_PER_MINUTE"),
                10,
            )?,
            login_per_ip_per_minute: parse(
                "LOGIN_ATTEMPTS_PER_IP_PER_MINUTE",
                get("LOGIN_ATTEMPTS_PER_IP_PER_MINUTE"),
                30,
            )?,
            request_timeout: duration("REQUEST_TIMEOUT", Duration::from_secs(15))?,
            console_idle_timeout: duration("CONSOLE_IDLE_TIMEOUT", Duration::from_secs(30 * 60))?,
            console_session_lifetime: duration("CONSOLE_SESSION_LIFETIME", Duration::from_secs(12 * 3600))?,
            processing_lease: duration("PROCESSING_LEASE", Duration::from_secs(20))?,
            requeue_after: duration("REQUEUE_AFTER", Duration::from_secs(60))?,
            sweep_interval: duration("SWEEP_INTERVAL", Duration::from_secs(5))?,
            retention,
            purge_interval,
            partition_period,
            watch_pipelines: parse("WATCH_PIPELINES", get("WATCH_PIPELINES"), true)?,
            watch_debounce: duration("WATCH_DEBOUNCE", Duration::from_millis(250))?,
            script_max_operations: parse("SCRIPT_MAX_OPERATIONS", get("SCRIPT_MAX_OPERATIONS"), 1_000_000)?,
            script_max_wall_time: duration("SCRIPT_MAX_WALL_TIME", Duration::from_millis(250))?,
            create_demo_partner: parse("CREATE_DEMO_PARTNER", get("CREATE_DEMO_PARTNER"), true)?,
            migrate_on_start: parse("MIGRATE_ON_START", get("MIGRATE_ON_START"), true)?,
        };
        if cfg.max_body_bytes < 1024 {
            return Err(ConfigError("MAX_BODY_BYTES must be at least 1024".into()));
        }
        if cfg.json_limits.max_depth < 2 {
            return Err(ConfigError("MAX_JSON_DEPTH must be at least 2".into()));
        }
        for (k, d) in [
            ("RETENTION_PROCESSED", cfg.retention.processed),
            ("RETENTION_DEAD_LETTERED", cfg.retention.dead_lettered),
            ("PURGE_INTERVAL", cfg.purge_interval),
            ("PARTITION_PERIOD", cfg.partition_period),
            ("CONSOLE_IDLE_TIMEOUT", cfg.console_idle_timeout),
            ("CONSOLE_SESSION_LIFETIME", cfg.console_session_lifetime),
        ] {
            if d < Duration::from_secs(1) {
                return Err(ConfigError(format!("{k} must be at least 1s")));
            }
        }
        cfg.check_redis_tls()?;
        {
            use secrecy::ExposeSecret;
            if cfg
                .admin_api_key
                .as_ref()
                .is_some_and(|k| k.expose_secret().trim().len() < 16)
            {
                return Err(ConfigError(
                    "ADMIN_API_KEY must have at least 16 characters".into(),
                ));
            }
        }
        if cfg.max_header_bytes < 1024 {
            return Err(ConfigError("MAX_HEADER_BYTES must be at least 1024".into()));
        }
        Ok(cfg)
    }

    /// The certificate files only mean something for a `rediss://` URL,
    /// and a client certificate needs its key.
    fn check_redis_tls(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        let tls = &self.redis_tls;
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            return Err(ConfigError(
                "REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE go together: set both or neither".into(),
            ));
        }
        let rediss = self
            .redis_url
            .as_ref()
            .is_some_and(|u| u.expose_secret().starts_with("rediss://"));
        if tls.is_set() && !rediss {
            return Err(ConfigError(
                "REDIS_CA_FILE, REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE need a rediss:// REDIS_URL"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn is_embedded(&self) -> bool {
        use secrecy::ExposeSecret;
        self.redis_url.is_none() && self.database_url.expose_secret().starts_with("sqlite:")
    }
}

/// `TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks.
fn trusted_proxies(v: Option<&str>) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    v.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError(format!(
                        "TRUSTED_PROXIES: {s:?} is not an IP address or CIDR block"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_map(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    /// `.env.example` documents every key `load()` reads, and `load()` reads
    /// every key it documents (besides the OpenTelemetry SDK's own, the
    /// shipped pipelines' variables and docker-compose's).
    #[test]
    fn env_example_and_keys_agree() {
        let documented: std::collections::BTreeSet<&str> = include_str!("../.env.example")
            .lines()
            .map(|l| l.trim_start_matches("# "))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
            .collect();
        let foreign = |k: &str| {
            k.starts_with("OTEL_")
                || k.ends_with("_WEBHOOK_URL")
                || k.ends_with("_WEBHOOK_SECRET")
                || k == "POSTGRES_PASSWORD"
        };
        for k in &documented {
            assert!(
                foreign(k) || KEYS.contains(k),
                ".env.example documents {k}, which load() ignores"
            );
        }
        for k in KEYS {
            assert!(
                *k == "QUEUE_POLL_INTERVAL" || documented.contains(k),
                "{k} is read but not in .env.example"
            );
        }
    }

    #[test]
    fn redis_certificates_need_rediss_and_come_in_pairs() {
        let ok = config(&[
            ("REDIS_URL", "rediss://redis.internal:6380"),
            ("REDIS_CA_FILE", "ca.pem"),
            ("REDIS_CLIENT_CERT_FILE", "client.pem"),
            ("REDIS_CLIENT_KEY_FILE", "client.key"),
        ])
        .expect("a complete rediss configuration");
        assert_eq!(
            ok.redis_tls.ca_file.as_deref(),
            Some(std::path::Path::new("ca.pem"))
        );
        let plain = config(&[
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("REDIS_CA_FILE", "ca.pem"),
        ]);
        assert!(plain.is_err_and(|e| e.0.contains("rediss://")));
        let embedded = config(&[("REDIS_CA_FILE", "ca.pem")]);
        assert!(embedded.is_err_and(|e| e.0.contains("rediss://")));
        let half = config(&[
            ("REDIS_URL", "rediss://redis.internal:6380"),
            ("REDIS_CLIENT_KEY_FILE", "client.key"),
        ]);
        assert!(half.is_err_and(|e| e.0.contains("REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE")));
        assert!(config(&[("REDIS_URL", "rediss://redis.internal:6380")]).is_ok());
    }
}
