//! Layered settings: `config/default.toml` (compiled in) < `--config FILE` <
//! `TESSERA__SECTION__KEY` environment variables.
//!
//! Every key has a default in `config/default.toml`; an environment variable can only
//! override a key that exists there, and its value is parsed according to the type of
//! that default (lists are comma-separated). Unknown keys anywhere are an error, so a
//! typo fails at start rather than silently leaving a default in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde::Deserialize;

/// The compiled-in defaults.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "TESSERA__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub cookies: CookieSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub tokens: TokenSettings,
    pub keys: KeySettings,
    pub password: PasswordSettings,
    pub login: LoginSettings,
    pub registration: RegistrationSettings,
    pub users: UsersSettings,
    pub mfa: MfaSettings,
    pub introspection: IntrospectionSettings,
    pub sessions: SessionSettings,
    pub cleanup: CleanupSettings,
    pub cache: CacheSettings,
    pub audit: AuditSettings,
    pub email: EmailSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub events: EventSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub trusted_proxies: Vec<String>,
    pub workers: usize,
    pub cors_allowed_origins: Vec<String>,
    /// After SIGTERM: how long readiness answers 503 while requests are still served.
    pub shutdown_delay_secs: u64,
    /// Then: how long in-flight requests get to finish once the listener is closed.
    pub shutdown_timeout_secs: u64,
}

/// Browser sessions (`[cookies]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieSettings {
    pub secure: bool,
    pub domain: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub create_database: bool,
    pub auto_migrate: bool,
    pub sqlite_synchronous: SqliteSynchronous,
    /// TLS to PostgreSQL (`database.sslmode`); `None` keeps what the URL says.
    #[serde(deserialize_with = "empty_is_none")]
    pub sslmode: Option<PgTls>,
    /// A PEM file of CA certificates that may sign PostgreSQL's certificate.
    pub ca_file: PathBuf,
}

/// The PEM certificates in a `*.ca_file` setting (`key` names it in errors); `None`
/// when it is empty.
pub fn read_ca_file(path: &Path, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let file = path.display();
    let pem = std::fs::read(path).with_context(|| format!("cannot read {key} {file}"))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        bail!("{key} {file} holds no PEM certificate");
    }
    Ok(Some(pem))
}

/// `""` as `None`, anything else as a `T` named by that string.
fn empty_is_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::IntoDeserializer;
    let s = String::deserialize(deserializer)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    T::deserialize(s.trim().into_deserializer()).map(Some)
}

/// How Tessera talks TLS to PostgreSQL, as libpq's `sslmode` (`database.sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgTls {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS always, the certificate unverified (unless `ca_file` is set: then as
    /// `VerifyCa`, as libpq does with a root certificate).
    Require,
    /// TLS always, the certificate signed by a trusted CA.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host in `database.url`.
    VerifyFull,
}

/// When a SQLite commit reaches the disk (`database.sqlite_synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// Before the commit is answered: nothing answered is lost, even on a power cut.
    Full,
    /// At checkpoints (WAL): nothing is lost when the process is killed; a power cut may
    /// lose the last commits (the database stays consistent).
    Normal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: SecretString,
    pub key_prefix: String,
    pub timeout_ms: u64,
    pub local_copy: bool,
    pub local_copy_lease_ms: u64,
    /// A PEM file of CA certificates for a `rediss://` URL, instead of the system's.
    pub ca_file: PathBuf,
    /// Replicas that must have a revocation before it is answered (`WAIT`).
    pub wait_replicas: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub algorithm: String,
    pub access_ttl_secs: u64,
    pub leeway_secs: u64,
    pub refresh_idle_ttl_secs: u64,
    pub refresh_absolute_ttl_secs: u64,
    pub refresh_short_absolute_ttl_secs: u64,
    pub refresh_reuse_grace_secs: u64,
    /// Per-role lifetimes (`[tokens.roles.<role>]`), by role name.
    pub roles: BTreeMap<String, RoleLifetimes>,
}

/// A role's own lifetimes (`[tokens.roles.<role>]`); each replaces the global one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleLifetimes {
    pub access_ttl_secs: Option<u64>,
    pub refresh_idle_ttl_secs: Option<u64>,
    pub refresh_absolute_ttl_secs: Option<u64>,
}

/// The lifetimes that apply to a user's sessions (see [`TokenSettings::lifetimes_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub access_ttl_secs: u64,
    pub refresh_idle_ttl_secs: u64,
    /// From the login; `remember_me` decides between the two global ones.
    pub refresh_absolute_ttl_secs: u64,
}

impl TokenSettings {
    /// How long a revocation mark must live: until every access token issued before it
    /// has expired, leeway included (the longest access lifetime of any role).
    pub fn access_token_horizon(&self) -> std::time::Duration {
        let longest = self
            .roles
            .values()
            .filter_map(|r| r.access_ttl_secs)
            .fold(self.access_ttl_secs, u64::max);
        std::time::Duration::from_secs(longest + self.leeway_secs + 1)
    }

    /// The lifetimes of a session of a user holding `roles`: for each, the shortest of
    /// the values the user's roles set, or else the global one. A session without
    /// `remember_me` never outlives `refresh_short_absolute_ttl_secs`.
    pub fn lifetimes_for(&self, roles: &[String], remember_me: bool) -> Lifetimes {
        let shortest = |pick: fn(&RoleLifetimes) -> Option<u64>, global: u64| {
            roles
                .iter()
                .filter_map(|r| self.roles.get(r).and_then(pick))
                .min()
                .unwrap_or(global)
        };
        let mut absolute = shortest(
            |r| r.refresh_absolute_ttl_secs,
            self.refresh_absolute_ttl_secs,
        );
        if !remember_me {
            absolute = absolute.min(self.refresh_short_absolute_ttl_secs);
        }
        Lifetimes {
            access_ttl_secs: shortest(|r| r.access_ttl_secs, self.access_ttl_secs),
            refresh_idle_ttl_secs: shortest(
                |r| r.refresh_idle_ttl_secs,
                self.refresh_idle_ttl_secs,
            ),
            refresh_absolute_ttl_secs: absolute,
        }
    }

    /// `{"role": seconds}` of the roles that set `pick`, for the stores' SQL (JSON).
    pub fn by_role(&self, pick: fn(&RoleLifetimes) -> Option<u64>) -> String {
        let map: BTreeMap<&str, u64> = self
            .roles
            .iter()
            .filter_map(|(role, l)| pick(l).map(|secs| (role.as_str(), secs)))
            .collect();
        serde_json::to_string(&map).expect("a map of numbers serializes")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    pub dir: PathBuf,
    pub reload_secs: u64,
    pub jwks_max_age_secs: u64,
    /// How long a rotated-in key is published before it signs.
    pub publish_ahead_secs: u64,
    /// Scheduled rotation (0: off).
    pub rotate_every_days: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordSettings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub allow_weak: bool,
    pub workers: usize,
    pub queue: usize,
    pub low_priority: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSettings {
    pub per_ip_per_minute: u32,
    pub per_account_per_minute: u32,
    pub free_failures: u32,
    pub delay_base_secs: u64,
    pub delay_max_secs: u64,
    pub failure_window_secs: u64,
    pub device_ttl_secs: u64,
    pub device_free_failures: u32,
    pub ipv6_prefix_len: u8,
    pub max_tracked_keys: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationSettings {
    pub enabled: bool,
    /// Whether `POST /users/anonymous` makes users with no email.
    pub anonymous: bool,
}

/// The second factor (`[mfa]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MfaSettings {
    /// The issuer authenticator apps show beside the account (no `:`).
    pub issuer_name: String,
    /// How recent a login (or `POST /me/reauthenticate`) must be for a password change or
    /// removing the second factor (RFC 9470 `max_age`).
    pub recent_auth_secs: u64,
    /// Roles whose routes refuse an access token without `otp` in its `amr`.
    pub required_for_roles: Vec<String>,
}

/// Users managed through files (`[users]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersSettings {
    /// Where `tessera migrate` finds user migrations, `NNNN_name.toml` ("" for none).
    pub migrations_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionSettings {
    pub clients: Vec<SecretString>,
    pub failures_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    pub max_per_user: u32,
    /// End a session whose refresh comes with another User-Agent than its login.
    pub bind_user_agent: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupSettings {
    pub interval_secs: u64,
    pub batch_size: u32,
    pub session_retention_secs: u64,
    pub audit_retention_secs: u64,
    /// Anonymous users never converted are deleted this long after their last refresh.
    pub anonymous_retention_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub user_emails: usize,
    pub verified_tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    pub refresh: bool,
}

/// Outgoing email (`[email]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    pub transport: EmailTransport,
    /// `smtp://user:pass@host:587` (STARTTLS required) or `smtps://…:465`: a secret.
    pub smtp_url: SecretString,
    /// A PEM file of a CA to trust beside the system's roots ("" for none).
    pub smtp_ca_file: PathBuf,
    pub smtp_timeout_secs: u64,
    pub from: String,
    pub link_base: String,
    /// Where overrides of the built-in templates live ("" for none).
    pub templates_dir: PathBuf,
    pub verification: EmailVerification,
    pub verify_ttl_secs: u64,
    pub reset_ttl_secs: u64,
    pub invite_ttl_secs: u64,
    pub per_ip_per_hour: u32,
    pub per_address_per_hour: u32,
    pub retry_base_secs: u64,
    pub retry_max_secs: u64,
    pub give_up_after_secs: u64,
    /// The security notices sent to a user's address (`email.notify`).
    pub notify: Vec<NoticeKind>,
}

/// A security notice a user can be sent (`email.notify`). None carries a token or a link
/// that acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// A login without a known device token, from a network and User-Agent the account
    /// has not logged in from before.
    NewDevice,
    /// `PUT /me/password` or a password reset.
    PasswordChanged,
    /// To the old address, when an email change is asked for.
    EmailChanged,
    /// A refresh token used again after its rotation: the session was ended.
    SessionReuseDetected,
}

/// Whether users must confirm their address (`email.verification`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailVerification {
    /// Nothing is sent at registration; `POST /email/verification` still works.
    Off,
    /// Registration sends a link; unverified users log in as usual.
    Optional,
    /// Registration sends a link; a correct password for an unverified user gets 403
    /// `email_not_verified`.
    Required,
}

/// How email leaves (`email.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmailTransport {
    /// Nothing is sent.
    None,
    /// Written to the server log, links included: development only.
    Log,
    Smtp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: String,
    pub level: String,
}

/// Security events sent as webhooks (`[events]`, `[[events.webhooks]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    pub webhooks: Vec<WebhookSettings>,
    pub timeout_secs: u64,
    pub retry_base_secs: u64,
    pub retry_max_secs: u64,
    pub give_up_after_secs: u64,
}

/// Every event a webhook may subscribe to (see `outbox::webhook`).
pub const EVENT_TYPES: &[&str] = &[
    "user.created",
    "user.deleted",
    "user.disabled",
    "user.enabled",
    "user.roles_changed",
    "user.email_changed",
    "session.created",
    "session.reuse_detected",
    "password.changed",
    "mfa.enabled",
    "mfa.disabled",
];

impl EventSettings {
    fn validate(&self) -> anyhow::Result<()> {
        use base64::Engine;
        use secrecy::ExposeSecret;
        if self.timeout_secs == 0
            || self.retry_base_secs == 0
            || self.retry_max_secs < self.retry_base_secs
        {
            bail!(
                "events.timeout_secs and events.retry_base_secs must be positive, and \
                 events.retry_max_secs at least retry_base_secs"
            );
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            let url = url::Url::parse(&hook.url).ok();
            if !url.is_some_and(|u| matches!(u.scheme(), "https" | "http") && u.has_host()) {
                bail!("events.webhooks[{i}].url must be an http(s):// URL");
            }
            let secret = hook.secret.expose_secret();
            let key = secret
                .strip_prefix("whsec_")
                .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok());
            if !key.is_some_and(|k| (24..=64).contains(&k.len())) {
                bail!(
                    "events.webhooks[{i}].secret must be whsec_ and the base64 of 24 to 64 \
                     random bytes, e.g. the output of: echo \"whsec_$(head -c 32 \
                     /dev/urandom | base64)\""
                );
            }
            if hook.events.is_empty() {
                bail!("events.webhooks[{i}].events is empty: name events, or [\"*\"] for all");
            }
            if let Some(unknown) = hook
                .events
                .iter()
                .find(|e| *e != "*" && !EVENT_TYPES.contains(&e.as_str()))
            {
                bail!(
                    "events.webhooks[{i}].events: unknown event {unknown:?}; known: {}",
                    EVENT_TYPES.join(", ")
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    /// `whsec_` and the base64 of 24 to 64 random bytes (Standard Webhooks).
    pub secret: SecretString,
    /// Event types (`user.created`, ...), or `["*"]` for all.
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where Prometheus scrapes `/metrics` (`host:port`); empty: no metrics listener.
    pub listen: String,
}

impl Settings {
    /// Defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let mut table: toml::Table = DEFAULT_TOML.parse().context("built-in defaults")?;
        // A relative keys.dir in a config file is relative to that file, so that the CLI
        // run from anywhere finds the keys the servers use.
        let mut keys_base: Option<PathBuf> = None;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let overlay: toml::Table = text
                .parse()
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            if overlay
                .get("keys")
                .and_then(|k| k.as_table())
                .is_some_and(|k| k.contains_key("dir"))
            {
                keys_base = Some(absolute(path.parent().unwrap_or(Path::new(".")))?);
            }
            merge(&mut table, overlay, "")
                .with_context(|| format!("in config file {}", path.display()))?;
        }
        for (name, value) in env {
            if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                apply_env(&mut table, rest, &value).with_context(|| format!("in ${name}"))?;
                if rest.eq_ignore_ascii_case("keys__dir") {
                    keys_base = None; // relative to the working directory
                }
            }
        }
        let mut settings: Settings = toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        settings.keys.dir = match keys_base {
            Some(base) if settings.keys.dir.is_relative() => base.join(&settings.keys.dir),
            _ => absolute(&settings.keys.dir)?,
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let t = &self.tokens;
        if t.access_ttl_secs == 0 || t.refresh_idle_ttl_secs == 0 {
            bail!("tokens.access_ttl_secs and tokens.refresh_idle_ttl_secs must be positive");
        }
        if t.refresh_absolute_ttl_secs == 0 || t.refresh_short_absolute_ttl_secs == 0 {
            bail!("session lifetimes must be positive");
        }
        crate::domain::KeyAlgorithm::parse(&t.algorithm)?;
        for origin in &self.server.cors_allowed_origins {
            if crate::domain::origin_of(origin).as_deref() != Some(origin.as_str()) {
                bail!(
                    "server.cors_allowed_origins: {origin:?} is not an origin; write it as \
                     scheme://host[:port] in lower case, with no path or trailing slash"
                );
            }
        }
        let domain = &self.cookies.domain;
        if !domain.is_empty()
            && (domain.starts_with('.')
                || !domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        {
            bail!("cookies.domain must be a plain domain name such as example.com");
        }
        let p = &self.password;
        if !p.allow_weak && (p.memory_kib < 19 * 1024 || p.iterations < 2 || p.parallelism < 1) {
            bail!(
                "password hashing below m=19456 KiB, t=2, p=1 is refused; \
                 set password.allow_weak = true only for tests"
            );
        }
        if self.login.per_ip_per_minute == 0 || self.login.per_account_per_minute == 0 {
            bail!("login.per_ip_per_minute and login.per_account_per_minute must be positive");
        }
        let l = &self.login;
        if l.delay_max_secs < l.delay_base_secs || l.failure_window_secs < l.delay_max_secs {
            bail!(
                "login: need delay_base_secs <= delay_max_secs <= failure_window_secs, \
                 or a delayed attempt could never come"
            );
        }
        if !(1..=128).contains(&l.ipv6_prefix_len) || l.max_tracked_keys == 0 {
            bail!("login.ipv6_prefix_len must be 1 to 128 and login.max_tracked_keys positive");
        }
        for (role, l) in &t.roles {
            let values = [
                l.access_ttl_secs,
                l.refresh_idle_ttl_secs,
                l.refresh_absolute_ttl_secs,
            ];
            if values.contains(&Some(0)) {
                bail!("tokens.roles.{role}: lifetimes must be positive");
            }
        }
        if self.mfa.recent_auth_secs == 0 {
            bail!("mfa.recent_auth_secs must be positive");
        }
        let c = &self.cleanup;
        if c.interval_secs == 0 || c.batch_size == 0 {
            bail!("cleanup.interval_secs and cleanup.batch_size must be positive");
        }
        if c.session_retention_secs < t.access_token_horizon().as_secs() {
            bail!(
                "cleanup.session_retention_secs must be at least tokens.access_ttl_secs + \
                 tokens.leeway_secs, so ended sessions outlive their access tokens"
            );
        }
        if !matches!(self.log.format.as_str(), "pretty" | "json") {
            bail!("log.format must be \"pretty\" or \"json\"");
        }
        self.events.validate()?;
        let listen = self.metrics.listen.trim();
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "metrics.listen must be an address and port such as 127.0.0.1:9464, or \"\" \
                 for no metrics listener"
            );
        }
        self.email.validate()?;
        for proxy in &self.server.trusted_proxies {
            crate::domain::IpRange::parse(proxy)
                .with_context(|| format!("server.trusted_proxies: {proxy:?}"))?;
        }
        Ok(())
    }

    pub fn listen_address(&self) -> String {
        format!("{}:{}", self.server.host, self.server.port)
    }
}

/// `path` made absolute against the working directory (it need not exist).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// Deep-merges `overlay` into `base`, refusing keys that `base` does not have.
fn merge(base: &mut toml::Table, overlay: toml::Table, path: &str) -> anyhow::Result<()> {
    for (key, value) in overlay {
        let full = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match (base.get_mut(&key), value) {
            // Role names are the operator's: any table goes, checked when deserialized.
            (None, v @ toml::Value::Table(_)) if path == "tokens.roles" => {
                base.insert(key, v);
            }
            (None, _) => bail!("unknown configuration key `{full}`"),
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o, &full)?,
            (Some(toml::Value::Table(_)), _) => bail!("`{full}` must be a table"),
            (Some(slot), v) => *slot = v,
        }
    }
    Ok(())
}

/// Applies `SECTION__KEY=value`, typed after the existing value.
fn apply_env(table: &mut toml::Table, name: &str, raw: &str) -> anyhow::Result<()> {
    let parts: Vec<String> = name.split("__").map(str::to_ascii_lowercase).collect();
    if let [tokens, roles, role, key] = parts.as_slice()
        && tokens == "tokens"
        && roles == "roles"
    {
        // TOKENS__ROLES__<ROLE>__<KEY>: a per-role lifetime (role names in lower case).
        let lifetimes = table
            .get_mut("tokens")
            .and_then(toml::Value::as_table_mut)
            .and_then(|t| t.get_mut("roles"))
            .and_then(toml::Value::as_table_mut)
            .context("no tokens.roles table")?
            .entry(role.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let seconds = raw.trim().parse().context("expected an integer")?;
        lifetimes
            .as_table_mut()
            .context("tokens.roles entries are tables")?
            .insert(key.clone(), toml::Value::Integer(seconds));
        return Ok(());
    }
    let [section, key] = parts.as_slice() else {
        bail!("expected TESSERA__<SECTION>__<KEY>");
    };
    if (section.as_str(), key.as_str()) == ("events", "webhooks") {
        // A list of tables: JSON, [{"url": ..., "secret": ..., "events": [...]}].
        let json: serde_json::Value = serde_json::from_str(raw).context(
            "expected a JSON list such as [{\"url\": \"https://...\", \"secret\": \"whsec_...\", \"events\": [\"*\"]}]",
        )?;
        let events = table
            .get_mut("events")
            .and_then(toml::Value::as_table_mut)
            .context("no events table")?;
        events.insert(
            "webhooks".into(),
            toml::Value::try_from(json).context("expected a JSON list of objects")?,
        );
        return Ok(());
    }
    let slot = table
        .get_mut(section)
        .and_then(toml::Value::as_table_mut)
        .and_then(|t| t.get_mut(key))
        .with_context(|| format!("unknown configuration key `{section}.{key}`"))?;
    *slot = match slot {
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse().context("expected an integer")?)
        }
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(raw.trim().parse().context("expected true or false")?)
        }
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_are_production_grade() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.tokens.algorithm, "ES256");
        assert_eq!(s.tokens.access_ttl_secs, 900);
        assert_eq!(s.tokens.refresh_reuse_grace_secs, 10);
        assert!(s.password.memory_kib >= 19 * 1024);
        assert!(s.password.iterations >= 2);
        assert_eq!(s.password.parallelism, 1);
        assert!(!s.password.allow_weak);
    }

    #[test]
    fn environment_overrides_are_typed_and_lists_are_comma_separated() {
        let s = Settings::load_from(
            None,
            env(&[
                ("TESSERA__SERVER__PORT", "9123"),
                (
                    "TESSERA__SERVER__TRUSTED_PROXIES",
                    "10.0.0.1, 192.168.0.0/16",
                ),
                ("TESSERA__REGISTRATION__ENABLED", "false"),
                ("TESSERA__REDIS__URL", "redis://elsewhere:6380"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.port, 9123);
        assert_eq!(s.server.trusted_proxies, vec!["10.0.0.1", "192.168.0.0/16"]);
        assert!(!s.registration.enabled);
        assert_eq!(s.redis.url.expose_secret(), "redis://elsewhere:6380");
    }

    /// A value of `default`'s type that differs from it and passes validation.
    fn another_value(section: &str, key: &str, default: &toml::Value) -> String {
        match (section, key) {
            ("server", "host") => "0.0.0.0".into(),
            ("server", "trusted_proxies") => "10.0.0.1,10.0.0.0/8".into(),
            ("server", "cors_allowed_origins") => "https://app.example.com".into(),
            ("cookies", "domain") => "example.com".into(),
            ("database", "url") => "postgres://u:p@db.example.com/other".into(),
            ("database", "sqlite_synchronous") => "normal".into(),
            ("database", "sslmode") => "verify-full".into(),
            ("redis", "url") => "redis://cache.example.com:6380".into(),
            ("tokens", "algorithm") => "EdDSA".into(),
            ("tokens", "issuer") => "https://auth.example.com".into(),
            ("introspection", "clients") => "api:secret".into(),
            ("email", "transport") => "log".into(),
            ("email", "smtp_url") => "smtps://u:p@mail.example.com".into(),
            ("email", "from") => "Other <other@example.com>".into(),
            ("email", "link_base") => "https://app.example.com/auth".into(),
            ("email", "verification") => "optional".into(),
            ("email", "notify") => "new_device,password_changed".into(),
            ("mfa", "required_for_roles") => "admin,auditor".into(),
            ("log", "format") => "json".into(),
            ("log", "level") => "debug".into(),
            ("metrics", "listen") => "0.0.0.0:9465".into(),
            ("events", "webhooks") => {
                r#"[{"url": "https://app.example.com/hooks", "secret": "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3", "events": ["*"]}]"#.into()
            }
            _ => match default {
                toml::Value::Integer(i) => (i + 1).to_string(),
                toml::Value::Boolean(b) => (!b).to_string(),
                toml::Value::String(s) => format!("{s}-other"),
                other => panic!("{section}.{key}: no other value for {other}"),
            },
        }
    }

    /// Everything a setting holds, secrets included, to see one change.
    fn everything(s: &Settings) -> String {
        format!(
            "{s:?} {} {} {} {:?} {:?}",
            s.database.url.expose_secret(),
            s.redis.url.expose_secret(),
            s.email.smtp_url.expose_secret(),
            s.introspection
                .clients
                .iter()
                .map(|c| c.expose_secret().to_owned())
                .collect::<Vec<_>>(),
            s.events
                .webhooks
                .iter()
                .map(|w| w.secret.expose_secret().to_owned())
                .collect::<Vec<_>>()
        )
    }

    #[test]
    fn every_key_can_be_overridden_from_the_environment() {
        let defaults: toml::Table = DEFAULT_TOML.parse().unwrap();
        let baseline = everything(&Settings::load_from(None, env(&[])).unwrap());
        let mut count = 0;
        for (section, keys) in &defaults {
            for (key, value) in keys.as_table().unwrap() {
                if (section.as_str(), key.as_str()) == ("tokens", "roles") {
                    continue; // a table of roles: see per_role_lifetimes_…
                }
                let raw = another_value(section, key, value);
                let name = format!(
                    "TESSERA__{}__{}",
                    section.to_uppercase(),
                    key.to_uppercase()
                );
                let mut vars = vec![(name.clone(), raw.clone())];
                if name == "TESSERA__EMAIL__VERIFICATION" {
                    // Sending links needs a transport.
                    vars.push(("TESSERA__EMAIL__TRANSPORT".into(), "log".into()));
                }
                let loaded = Settings::load_from(None, vars);
                let loaded = match loaded {
                    Ok(s) => s,
                    Err(e) => panic!("{name}={raw}: {e:#}"),
                };
                assert_ne!(everything(&loaded), baseline, "{name}={raw} had no effect");
                count += 1;
            }
        }
        assert!(count >= 30, "only {count} keys found");
    }

    #[test]
    fn per_role_lifetimes_come_from_a_file_or_the_environment_and_the_shortest_wins() {
        let dir = std::env::temp_dir().join(format!("tessera-roles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roles.toml");
        std::fs::write(
            &file,
            "[tokens.roles.admin]\naccess_ttl_secs = 300\nrefresh_idle_ttl_secs = 900\n\
             [tokens.roles.support]\nrefresh_idle_ttl_secs = 600\n",
        )
        .unwrap();
        let vars = env(&[
            (
                "TESSERA__TOKENS__ROLES__ADMIN__REFRESH_ABSOLUTE_TTL_SECS",
                "28800",
            ),
            ("TESSERA__TOKENS__ROLES__AUDITOR__ACCESS_TTL_SECS", "1800"),
        ]);
        let s = Settings::load_from(Some(&file), vars).unwrap();
        let roles = |names: &[&str]| names.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        let t = &s.tokens;
        let user = t.lifetimes_for(&roles(&["user"]), true);
        assert_eq!(
            user,
            Lifetimes {
                access_ttl_secs: 900,
                refresh_idle_ttl_secs: 604_800,
                refresh_absolute_ttl_secs: 2_592_000
            }
        );
        let admin = t.lifetimes_for(&roles(&["user", "admin", "support"]), true);
        assert_eq!(
            admin,
            Lifetimes {
                access_ttl_secs: 300,
                refresh_idle_ttl_secs: 600,
                refresh_absolute_ttl_secs: 28_800
            }
        );
        // A longer access lifetime replaces the global one, and revocation marks must
        // outlive it; a session without remember_me stays within its 12 hours.
        let auditor = t.lifetimes_for(&roles(&["auditor"]), false);
        assert_eq!(auditor.access_ttl_secs, 1800);
        assert_eq!(auditor.refresh_absolute_ttl_secs, 43_200);
        assert_eq!(t.access_token_horizon().as_secs(), 1800 + 30 + 1);
        assert_eq!(
            t.by_role(|r| r.refresh_idle_ttl_secs),
            r#"{"admin":900,"support":600}"#
        );
        // Typos and zeroes are refused.
        std::fs::write(&file, "[tokens.roles.admin]\nidle_secs = 900\n").unwrap();
        assert!(Settings::load_from(Some(&file), env(&[])).is_err());
        let zero = env(&[("TESSERA__TOKENS__ROLES__ADMIN__ACCESS_TTL_SECS", "0")]);
        assert!(Settings::load_from(None, zero).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_fail_loudly() {
        assert!(Settings::load_from(None, env(&[("TESSERA__SERVER__PROT", "1")])).is_err());
        assert!(Settings::load_from(None, env(&[("TESSERA__SERVER__PORT", "x")])).is_err());
        assert!(Settings::load_from(None, env(&[("TESSERA__TOKENS__ALGORITHM", "none")])).is_err());
        assert!(Settings::load_from(None, env(&[("TESSERA__PASSWORD__ITERATIONS", "1")])).is_err());
        for origin in [
            "*",
            "app.example.com",
            "https://app.example.com/path",
            "https://app.example.com/",
            "https://App.example.com",
            "https://",
        ] {
            let vars = env(&[("TESSERA__SERVER__CORS_ALLOWED_ORIGINS", origin)]);
            assert!(Settings::load_from(None, vars).is_err(), "{origin}");
        }
        for (key, value) in [
            ("TESSERA__EMAIL__FROM", "not an address"),
            ("TESSERA__EMAIL__LINK_BASE", "app.example.com/auth"),
            (
                "TESSERA__EMAIL__LINK_BASE",
                "https://app.example.com/auth?x=1",
            ),
        ] {
            assert!(
                Settings::load_from(None, env(&[(key, value)])).is_err(),
                "{value}"
            );
        }
        let smtp = |url| {
            env(&[
                ("TESSERA__EMAIL__TRANSPORT", "smtp"),
                ("TESSERA__EMAIL__SMTP_URL", url),
            ])
        };
        assert!(Settings::load_from(None, smtp("")).is_err());
        assert!(Settings::load_from(None, smtp("http://mail.example.com")).is_err());
        assert!(Settings::load_from(None, smtp("smtp://u:p@mail.example.com")).is_ok());
        for domain in [".example.com", "https://example.com", "example.com/x"] {
            let vars = env(&[("TESSERA__COOKIES__DOMAIN", domain)]);
            assert!(Settings::load_from(None, vars).is_err(), "{domain}");
        }
        let vars = env(&[(
            "TESSERA__SERVER__CORS_ALLOWED_ORIGINS",
            "http://localhost:8081",
        )]);
        assert!(Settings::load_from(None, vars).is_ok());
    }

    #[test]
    fn a_config_file_layers_over_defaults_and_rejects_typos() {
        let dir = std::env::temp_dir().join(format!("tessera-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[tokens]\naccess_ttl_secs = 60\n").unwrap();
        let s = Settings::load_from(Some(&good), env(&[])).unwrap();
        assert_eq!(s.tokens.access_ttl_secs, 60);
        assert_eq!(
            s.keys.dir,
            std::env::current_dir().unwrap().join("data/keys")
        );
        let with_keys = dir.join("with-keys.toml");
        std::fs::write(&with_keys, "[keys]\ndir = \"signing\"\n").unwrap();
        let s = Settings::load_from(Some(&with_keys), env(&[])).unwrap();
        assert_eq!(s.keys.dir, dir.join("signing"), "relative to the file");
        let s = Settings::load_from(Some(&with_keys), env(&[("TESSERA__KEYS__DIR", "k")])).unwrap();
        assert_eq!(s.keys.dir, std::env::current_dir().unwrap().join("k"));
        assert_eq!(s.tokens.leeway_secs, 30);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[tokens]\naccess_ttl = 60\n").unwrap();
        let err = Settings::load_from(Some(&bad), env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("tokens.access_ttl"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
