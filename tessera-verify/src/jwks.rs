//! The issuer's public keys: fetched, cached per `Cache-Control`, refetched at most
//! once per `refetch_interval` (single flight), served stale while the issuer is down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::{Config, VerifyError};

pub(crate) struct VerifyKey {
    pub alg: Algorithm,
    pub key: DecodingKey,
}

struct Cache {
    keys: HashMap<String, Arc<VerifyKey>>,
    /// When the cached set should be refetched; `None` for fixed keys.
    stale_at: Option<Instant>,
    loaded: bool,
    /// The last fetch attempt, successful or not (the refetch rate limit).
    last_attempt: Option<Instant>,
}

pub(crate) struct KeySource {
    cache: RwLock<Cache>,
    remote: Option<Remote>,
    fetches: AtomicU64,
}

struct Remote {
    http: reqwest::Client,
    issuer: String,
    configured_url: Option<String>,
    resolved_url: tokio::sync::OnceCell<String>,
    refetch_interval: Duration,
    default_max_age: Duration,
    /// Single flight: one fetch at a time; waiters then see its result.
    fetching: tokio::sync::Mutex<()>,
}

impl KeySource {
    pub fn remote(config: &Config) -> Result<Self, VerifyError> {
        let http = reqwest::Client::builder()
            .timeout(config.http_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| VerifyError::Config(format!("HTTP client: {e}")))?;
        Ok(KeySource {
            cache: RwLock::new(Cache {
                keys: HashMap::new(),
                stale_at: None,
                loaded: false,
                last_attempt: None,
            }),
            remote: Some(Remote {
                http,
                issuer: config.issuer.trim_end_matches('/').to_owned(),
                configured_url: config.jwks_url.clone(),
                resolved_url: tokio::sync::OnceCell::new(),
                refetch_interval: config.refetch_interval,
                default_max_age: config.default_max_age,
                fetching: tokio::sync::Mutex::new(()),
            }),
            fetches: AtomicU64::new(0),
        })
    }

    pub fn fixed(jwks: &JwkSet) -> Self {
        KeySource {
            cache: RwLock::new(Cache {
                keys: parse_set(jwks),
                stale_at: None,
                loaded: true,
                last_attempt: None,
            }),
            remote: None,
            fetches: AtomicU64::new(0),
        }
    }

    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    pub fn get(&self, kid: &str) -> Option<Arc<VerifyKey>> {
        self.read().keys.get(kid).cloned()
    }

    pub fn never_loaded(&self) -> bool {
        !self.read().loaded
    }

    pub fn is_stale(&self) -> bool {
        self.read().stale_at.is_some_and(|at| Instant::now() >= at)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|e| e.into_inner())
    }

    fn may_fetch(&self, interval: Duration) -> bool {
        self.read()
            .last_attempt
            .is_none_or(|at| at.elapsed() >= interval)
    }

    /// Refetches the key set unless one was fetched within `refetch_interval`.
    pub async fn refresh(&self) {
        let Some(remote) = &self.remote else {
            return;
        };
        if !self.may_fetch(remote.refetch_interval) {
            return;
        }
        let _guard = remote.fetching.lock().await;
        // Someone else may have fetched while we waited.
        if !self.may_fetch(remote.refetch_interval) {
            return;
        }
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .last_attempt = Some(Instant::now());
        match self.fetch(remote).await {
            Ok((set, max_age)) => {
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                cache.keys = parse_set(&set);
                cache.loaded = true;
                cache.stale_at = Some(Instant::now() + max_age);
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS fetch failed; keeping the cached keys");
            }
        }
    }

    async fn fetch(&self, remote: &Remote) -> Result<(JwkSet, Duration), String> {
        let url = remote
            .resolved_url
            .get_or_try_init(|| async {
                if let Some(url) = &remote.configured_url {
                    return Ok(url.clone());
                }
                let metadata = format!("{}/.well-known/oauth-authorization-server", remote.issuer);
                self.fetches.fetch_add(1, Ordering::Relaxed);
                let doc: serde_json::Value = get_json(&remote.http, &metadata).await?.0;
                doc["jwks_uri"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "issuer metadata has no jwks_uri".to_owned())
            })
            .await?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let (set, max_age) = get_json::<JwkSet>(&remote.http, url).await?;
        Ok((set, max_age.unwrap_or(remote.default_max_age)))
    }
}

/// GETs JSON; returns it with the response's `Cache-Control` max-age, if any.
async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<(T, Option<Duration>), String> {
    let res = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !res.status().is_success() {
        return Err(format!("{url} answered {}", res.status()));
    }
    let max_age = res
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_max_age);
    let body = res.bytes().await.map_err(|e| e.to_string())?;
    let value = serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
    Ok((value, max_age))
}

/// `max-age=N` (capped at a day); `no-cache`/`no-store` mean 0.
pub(crate) fn parse_max_age(header: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in header.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(n) = lower.strip_prefix("max-age=") {
            max_age = n.trim_matches('"').parse::<u64>().ok();
        }
    }
    max_age.map(|s| Duration::from_secs(s.min(86_400)))
}

/// The usable signature keys of a set. Symmetric keys are ignored: a JWKS is public,
/// so a key found there can never be trusted for HMAC.
fn parse_set(set: &JwkSet) -> HashMap<String, Arc<VerifyKey>> {
    set.keys
        .iter()
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let key = parse_key(jwk)?;
            Some((kid, Arc::new(key)))
        })
        .collect()
}

fn parse_key(jwk: &Jwk) -> Option<VerifyKey> {
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => inferred,
        Some(KeyAlgorithm::HS256 | KeyAlgorithm::HS384 | KeyAlgorithm::HS512) => return None,
        Some(declared) => Algorithm::try_from(declared).ok()?,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey { alg, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age_is_honoured() {
        assert_eq!(
            parse_max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(parse_max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(parse_max_age("public"), None);
        assert_eq!(
            parse_max_age("max-age=99999999"),
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn symmetric_keys_in_a_jwks_are_never_used() {
        let set: JwkSet = serde_json::from_value(serde_json::json!({"keys": [
            {"kty": "oct", "kid": "h", "alg": "HS256", "k": "c2VjcmV0"}
        ]}))
        .unwrap();
        assert!(parse_set(&set).is_empty());
    }
}
