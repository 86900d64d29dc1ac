//! Signing keys: generation, storage in `keys.dir`, rotation and the JWKS.
//!
//! Each key is one JSON file (`<kid>.json`, mode 0600) holding its algorithm, creation
//! and retirement times and the private key (PKCS#8 / PKCS#1 DER, or the HMAC secret).
//! The active key is the newest key of the configured algorithm that is active by now
//! (`active_from`) and not retired by now. `rotate` publishes a new key ahead
//! (`keys.publish_ahead_secs`): it is in the JWKS at once but signs only from
//! `active_from`, the moment the old one retires, so a verifier that cached the JWKS
//! just before the rotation has it too before it meets its first token (the timeline:
//! next → active → retiring → gone). Every instance switches by the clock at its next
//! reload, with no coordination. A retired key keeps verifying, and stays in the JWKS,
//! until every token it can have signed has expired (`retention`), so a rotation never
//! logs anyone out. `rotate_now` (`tessera keys rotate --now`, for a leaked key) skips
//! the wait. Files are only ever added or rewritten whole (write to a
//! temporary file, then rename), so a server rereading the directory never sees half a key.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SecureRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde::{Deserialize, Serialize};

pub use crate::domain::KeyAlgorithm;

/// The jsonwebtoken algorithm of a key algorithm.
pub fn jwt_algorithm(alg: KeyAlgorithm) -> Algorithm {
    match alg {
        KeyAlgorithm::Es256 => Algorithm::ES256,
        KeyAlgorithm::EdDsa => Algorithm::EdDSA,
        KeyAlgorithm::Rs256 => Algorithm::RS256,
        KeyAlgorithm::Hs256 => Algorithm::HS256,
    }
}

/// The CSRF secret's file in `keys.dir` (see [`KeyStore::csrf_secret`]).
const CSRF_SECRET_FILE: &str = "csrf.secret";
/// The outbox's sealing secret's file in `keys.dir` (see [`KeyStore::outbox_secret`]).
const OUTBOX_SECRET_FILE: &str = "outbox.secret";

/// The on-disk form of one key.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    kid: String,
    alg: String,
    created_at: DateTime<Utc>,
    retired_at: Option<DateTime<Utc>>,
    /// When it starts signing (`None`: from `created_at`; keys from before publish-ahead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active_from: Option<DateTime<Utc>>,
    /// Base64 of the private key DER (or the HMAC secret).
    private_key: String,
}

/// A loaded key, ready to sign or verify.
pub struct KeyMaterial {
    pub kid: String,
    pub alg: KeyAlgorithm,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
    /// The private key parsed once, for signing (see [`Signer`]).
    pub signer: Signer,
    /// The JWS protected header of tokens this key signs, `{"alg","kid","typ":"at+jwt"}`,
    /// already base64url-encoded: the same for every token.
    pub jws_header: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    /// The public JWK; `None` for HMAC keys, which must never be published.
    pub jwk: Option<Jwk>,
    /// SHA-256 of the key's bytes: tells whether a kid still names the same key after
    /// a reload (remembered token verifications depend on it).
    pub fingerprint: [u8; 32],
}

/// A private key parsed once. jsonwebtoken keeps the DER and parses it again for every
/// signature (for ES256 12 of 34 µs, measured with `cargo bench --bench tokens`), so
/// Tessera signs its tokens itself; verification stays jsonwebtoken's.
pub enum Signer {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
    Rs256(aws_lc_rs::signature::RsaKeyPair),
    /// Boxed: an HMAC key is several times the size of the others.
    Hs256(Box<aws_lc_rs::hmac::Key>),
}

impl Signer {
    fn parse(alg: KeyAlgorithm, der: &[u8]) -> anyhow::Result<Self> {
        let bad = |_| anyhow::anyhow!("the {} key cannot be parsed", alg.as_str());
        Ok(match alg {
            KeyAlgorithm::Es256 => Signer::Es256(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(bad)?,
            ),
            KeyAlgorithm::EdDsa => {
                Signer::EdDsa(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(bad)?)
            }
            KeyAlgorithm::Rs256 => {
                Signer::Rs256(aws_lc_rs::signature::RsaKeyPair::from_der(der).map_err(bad)?)
            }
            KeyAlgorithm::Hs256 => Signer::Hs256(Box::new(aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                der,
            ))),
        })
    }

    /// Signs `jws` (`header.payload`) and appends `.signature` (base64url, in the form
    /// RFC 7518 gives; ES256: r ‖ s, 64 bytes).
    pub fn sign_appending(&self, jws: &mut String) -> anyhow::Result<()> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let message = jws.as_bytes();
        let mut rsa = Vec::new();
        let es256;
        let ed25519;
        let hmac;
        let signature: &[u8] = match self {
            Signer::Es256(pair) => {
                es256 = pair
                    .sign(&rng, message)
                    .map_err(|_| anyhow::anyhow!("ES256 signing failed"))?;
                es256.as_ref()
            }
            Signer::EdDsa(pair) => {
                ed25519 = pair.sign(message);
                ed25519.as_ref()
            }
            Signer::Rs256(pair) => {
                rsa.resize(pair.public_modulus_len(), 0);
                pair.sign(
                    &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                    &rng,
                    message,
                    &mut rsa,
                )
                .map_err(|_| anyhow::anyhow!("RS256 signing failed"))?;
                &rsa
            }
            Signer::Hs256(key) => {
                hmac = aws_lc_rs::hmac::sign(key, message);
                hmac.as_ref()
            }
        };
        let signature = signature.to_owned();
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, jws);
        Ok(())
    }
}

/// What one load of the key directory gives: the signing key, every key that still
/// verifies, and the JWKS document, serialized once.
pub struct Keyring {
    pub signing: Arc<KeyMaterial>,
    pub verifying: HashMap<String, Arc<KeyMaterial>>,
    pub jwks: String,
}

/// Summary for `tessera keys list`.
pub struct KeyInfo {
    pub kid: String,
    pub alg: String,
    pub created_at: DateTime<Utc>,
    pub active_from: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
    /// `next` (published, not signing yet), `active`, `retiring` (verifying only) or
    /// `gone` (past retention: out of the JWKS, deleted at the next rotation).
    pub status: &'static str,
}

impl KeyFile {
    fn activation(&self) -> DateTime<Utc> {
        self.active_from.unwrap_or(self.created_at)
    }
}

/// The key directory.
#[derive(Clone)]
pub struct KeyStore {
    dir: PathBuf,
    alg: KeyAlgorithm,
    /// How long a retired key keeps verifying: access token lifetime, clock leeway and
    /// the servers' reload interval (a server may sign with the old key until it rereads).
    retention: Duration,
    /// How long before it signs a rotated-in key is published (`keys.publish_ahead_secs`).
    publish_ahead: Duration,
}

impl KeyStore {
    pub fn new(dir: &Path, alg: KeyAlgorithm, retention: Duration) -> Self {
        KeyStore {
            dir: dir.to_owned(),
            alg,
            retention,
            publish_ahead: Duration::ZERO,
        }
    }

    /// Rotations publish the new key `ahead` before it signs.
    pub fn publishing_ahead(mut self, ahead: Duration) -> Self {
        self.publish_ahead = ahead;
        self
    }

    pub fn from_settings(settings: &crate::config::Settings) -> anyhow::Result<Self> {
        let t = &settings.tokens;
        let retention = t.access_ttl_secs + t.leeway_secs + settings.keys.reload_secs;
        Ok(KeyStore::new(
            &settings.keys.dir,
            KeyAlgorithm::parse(&t.algorithm)?,
            Duration::from_secs(retention),
        )
        .publishing_ahead(Duration::from_secs(settings.keys.publish_ahead_secs)))
    }

    /// Makes sure an active key of the configured algorithm exists; creates one (and
    /// retires keys of other algorithms) if not. Returns the new kid, if one was made.
    pub fn ensure_active(&self) -> anyhow::Result<Option<String>> {
        let files = self.read_files()?;
        if self.active_of(&files, Utc::now()).is_some() {
            return Ok(None);
        }
        // Nothing signs now (a first start, or another algorithm): no verifier can
        // have cached anything to wait for.
        self.rotate_now().map(Some)
    }

    /// Publishes a new signing key that signs from `keys.publish_ahead_secs` from now,
    /// when the keys signing until then retire. Returns its kid.
    pub fn rotate(&self) -> anyhow::Result<String> {
        self.rotate_at(Utc::now() + chrono::Duration::from_std(self.publish_ahead)?)
    }

    /// A new signing key that signs at once (a leaked key must stop signing now; a
    /// verifier with a cached JWKS refetches on the unknown kid).
    pub fn rotate_now(&self) -> anyhow::Result<String> {
        self.rotate_at(Utc::now())
    }

    /// The new key signs from `activation`; every key not retired yet retires then.
    fn rotate_at(&self, activation: DateTime<Utc>) -> anyhow::Result<String> {
        self.create_dir()?;
        let now = Utc::now();
        let mut new = generate(self.alg, now)?;
        new.active_from = (activation > now).then_some(activation);
        // The new key is written before the old ones are retired, so a reader never
        // finds no active key.
        self.write_file(&new)?;
        for (path, mut file) in self.read_files_with_paths()? {
            if file.kid == new.kid {
                continue;
            }
            if file.retired_at.is_none_or(|at| at > activation) {
                file.retired_at = Some(activation);
                self.write_file(&file)?;
            } else if self.expired(&file, now) {
                fs::remove_file(&path)
                    .with_context(|| format!("cannot remove expired key {}", path.display()))?;
            }
        }
        Ok(new.kid)
    }

    pub fn list(&self) -> anyhow::Result<Vec<KeyInfo>> {
        let now = Utc::now();
        let files = self.read_files()?;
        let active = self.active_of(&files, now).map(|f| f.kid.clone());
        let mut out: Vec<KeyInfo> = files
            .iter()
            .map(|f| KeyInfo {
                kid: f.kid.clone(),
                alg: f.alg.clone(),
                created_at: f.created_at,
                active_from: f.activation(),
                retired_at: f.retired_at,
                status: if Some(&f.kid) == active.as_ref() {
                    "active"
                } else if self.expired(f, now) {
                    "gone"
                } else if f.activation() > now && f.retired_at.is_none_or(|at| at > now) {
                    "next"
                } else {
                    "retiring"
                },
            })
            .collect();
        out.sort_by_key(|k| k.created_at);
        Ok(out)
    }

    /// Loads the keyring. Fails if there is no active key (run `ensure_active` first).
    pub fn load(&self) -> anyhow::Result<Keyring> {
        let now = Utc::now();
        let files = self.read_files()?;
        let active_kid = self
            .active_of(&files, now)
            .map(|f| f.kid.clone())
            .with_context(|| {
                format!(
                    "no active {} key in {}; run `tessera keys generate`",
                    self.alg.as_str(),
                    self.dir.display()
                )
            })?;
        let mut verifying = HashMap::new();
        let mut signing = None;
        for file in files.into_iter().filter(|f| !self.expired(f, now)) {
            let key = Arc::new(material(file)?);
            if key.kid == active_kid {
                signing = Some(key.clone());
            }
            verifying.insert(key.kid.clone(), key);
        }
        let signing = signing.context("active key vanished while loading")?;
        let mut keys: Vec<&Arc<KeyMaterial>> = verifying.values().collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
        let set = JwkSet {
            keys: keys.iter().filter_map(|k| k.jwk.clone()).collect(),
        };
        let jwks = serde_json::to_string(&set)?;
        Ok(Keyring {
            signing,
            verifying,
            jwks,
        })
    }

    /// The key that signs at `now`: of the configured algorithm, active by then and not
    /// retired by then; the newest such.
    fn active_of<'a>(&self, files: &'a [KeyFile], now: DateTime<Utc>) -> Option<&'a KeyFile> {
        files
            .iter()
            .filter(|f| f.alg == self.alg.as_str())
            .filter(|f| f.activation() <= now && f.retired_at.is_none_or(|at| at > now))
            .max_by_key(|f| (f.activation(), f.created_at))
    }

    /// `keys.rotate_every_days`: rotates (publishing ahead) when the newest key began
    /// signing longer than `every` ago and no key is waiting to. Instances sharing
    /// `keys.dir` see the new key at their next check, so at most one rotation runs unless
    /// two instances check in the same instant (then one of the two new keys retires
    /// unused at the other's activation).
    pub fn rotate_if_due(&self, every: Duration) -> anyhow::Result<Option<String>> {
        let now = Utc::now();
        let files = self.read_files()?;
        let newest = files
            .iter()
            .filter(|f| f.alg == self.alg.as_str())
            .map(KeyFile::activation)
            .max();
        let every = chrono::Duration::from_std(every)?;
        match newest {
            Some(at) if at > now || now - at < every => Ok(None),
            _ => self.rotate().map(Some),
        }
    }

    fn expired(&self, file: &KeyFile, now: DateTime<Utc>) -> bool {
        let retention = chrono::Duration::from_std(self.retention).unwrap_or(chrono::Duration::MAX);
        file.retired_at.is_some_and(|at| at + retention < now)
    }

    /// Where the keys are (absolute: `keys.dir` is resolved when settings load).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn create_dir(&self) -> anyhow::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create keys.dir {}", self.dir.display()))?;
        check_private(&self.dir, true)
    }

    fn read_files(&self) -> anyhow::Result<Vec<KeyFile>> {
        Ok(self
            .read_files_with_paths()?
            .into_iter()
            .map(|(_, f)| f)
            .collect())
    }

    fn read_files_with_paths(&self) -> anyhow::Result<Vec<(PathBuf, KeyFile)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read keys.dir {}", self.dir.display()));
            }
        };
        check_private(&self.dir, true)?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            check_private(&path, false)?;
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read key file {}", path.display()))?;
            let file: KeyFile = serde_json::from_str(&text)
                .with_context(|| format!("key file {} is damaged", path.display()))?;
            out.push((path, file));
        }
        Ok(out)
    }

    /// The secret that browser sessions' CSRF tokens are HMACs under
    /// (`csrf.secret` beside the keys; see [`KeyStore::secret`]).
    pub fn csrf_secret(&self) -> anyhow::Result<Vec<u8>> {
        self.secret(CSRF_SECRET_FILE)
    }

    /// The secret the outbox's rows are sealed under (`outbox.secret`; see
    /// [`crate::outbox`]).
    pub fn outbox_secret(&self) -> anyhow::Result<Vec<u8>> {
        self.secret(OUTBOX_SECRET_FILE)
    }

    /// The secret TOTP secrets are sealed under (`mfa.secret`; see [`crate::auth::mfa`]).
    pub fn mfa_secret(&self) -> anyhow::Result<Vec<u8>> {
        self.secret("mfa.secret")
    }

    /// A secret file beside the keys (32 random bytes, base64): read, or made on first
    /// use. Made by writing a temporary file and linking it into place, which fails if
    /// another instance got there first; then that one's secret is read, so every
    /// instance sharing `keys.dir` has the same.
    fn secret(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.dir.join(name);
        if !path.exists() {
            self.create_dir()?;
            let mut secret = [0u8; 32];
            aws_lc_rs::rand::SystemRandom::new()
                .fill(&mut secret)
                .map_err(|_| anyhow::anyhow!("random generator failed"))?;
            let tmp = self
                .dir
                .join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(STANDARD.encode(secret).as_bytes())?;
            f.sync_all()?;
            let linked = fs::hard_link(&tmp, &path);
            fs::remove_file(&tmp).ok();
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
        check_private(&path, false)?;
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let secret = STANDARD.decode(text.trim()).ok().filter(|s| s.len() >= 32);
        secret.with_context(|| {
            format!(
                "{} is damaged (want base64 of at least 32 bytes); remove it to make a new \
                 one ({})",
                path.display(),
                match name {
                    CSRF_SECRET_FILE => {
                        "every browser session's CSRF token then changes: its users log in again"
                    }
                    _ => "mail waiting in the outbox then cannot be sent and is dropped",
                }
            )
        })
    }

    fn write_file(&self, file: &KeyFile) -> anyhow::Result<()> {
        let path = self.dir.join(format!("{}.json", file.kid));
        let tmp = self.dir.join(format!(".{}.tmp", file.kid));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write key file {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(file)?.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }
}

/// Refuses a key directory that others may write to (they could plant a key that the
/// servers would sign with) or a key file that others may read or write, and either one
/// owned by another user; the message says exactly how to fix it.
fn check_private(path: &Path, is_dir: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let shown = path.display();
    // /proc/self belongs to the effective user of this process.
    if let Ok(me) = fs::metadata("/proc/self").map(|m| m.uid())
        && meta.uid() != me
    {
        bail!(
            "{shown} is owned by uid {} but Tessera runs as uid {me}; \
             fix it with: chown {me} {shown}  (or run Tessera as its owner)",
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o777;
    let (forbidden, fix) = if is_dir {
        (0o022, "700")
    } else {
        (0o077, "600")
    };
    if mode & forbidden != 0 {
        bail!(
            "{shown} has mode {mode:o}, open to group or others; \
             fix it with: chmod {fix} {shown}"
        );
    }
    Ok(())
}

fn generate(alg: KeyAlgorithm, now: DateTime<Utc>) -> anyhow::Result<KeyFile> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let der: Vec<u8> = match alg {
        KeyAlgorithm::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("ES256 key generation failed"))?
            .as_ref()
            .to_vec(),
        KeyAlgorithm::EdDsa => Ed25519KeyPair::generate_pkcs8v1(&rng)
            .map_err(|_| anyhow::anyhow!("Ed25519 key generation failed"))?
            .as_ref()
            .to_vec(),
        KeyAlgorithm::Rs256 => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
            let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
                .map_err(|_| anyhow::anyhow!("RSA key encoding failed"))?;
            pkcs8_to_pkcs1(pkcs8.as_ref())?.to_vec()
        }
        KeyAlgorithm::Hs256 => {
            let mut secret = vec![0u8; 32];
            rng.fill(&mut secret)
                .map_err(|_| anyhow::anyhow!("random generator failed"))?;
            secret
        }
    };
    let mut id = [0u8; 12];
    rng.fill(&mut id)
        .map_err(|_| anyhow::anyhow!("random generator failed"))?;
    Ok(KeyFile {
        kid: format!("{}-{}", now.format("%Y%m%d"), URL_SAFE_NO_PAD.encode(id)),
        alg: alg.as_str().to_owned(),
        created_at: now,
        retired_at: None,
        active_from: None,
        private_key: STANDARD.encode(der),
    })
}

fn material(file: KeyFile) -> anyhow::Result<KeyMaterial> {
    let alg = KeyAlgorithm::parse(&file.alg)?;
    let der = STANDARD
        .decode(&file.private_key)
        .with_context(|| format!("key {} is damaged", file.kid))?;
    let encoding = match alg {
        KeyAlgorithm::Es256 => EncodingKey::from_ec_der(&der),
        KeyAlgorithm::EdDsa => EncodingKey::from_ed_der(&der),
        KeyAlgorithm::Rs256 => EncodingKey::from_rsa_der(&der),
        KeyAlgorithm::Hs256 => EncodingKey::from_secret(&der),
    };
    let (decoding, jwk) = if alg == KeyAlgorithm::Hs256 {
        (DecodingKey::from_secret(&der), None)
    } else {
        let mut jwk = Jwk::from_encoding_key(&encoding, jwt_algorithm(alg))
            .with_context(|| format!("key {} does not match its algorithm", file.kid))?;
        jwk.common.key_id = Some(file.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        (DecodingKey::from_jwk(&jwk)?, Some(jwk))
    };
    let fingerprint = super::sha256(&der);
    let signer = Signer::parse(alg, &der).with_context(|| format!("key {}", file.kid))?;
    let header = serde_json::json!({"alg": alg.as_str(), "kid": file.kid, "typ": "at+jwt"});
    let jws_header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
    Ok(KeyMaterial {
        kid: file.kid,
        alg,
        created_at: file.created_at,
        retired_at: file.retired_at,
        signer,
        jws_header,
        encoding,
        decoding,
        jwk,
        fingerprint,
    })
}

/// PKCS#8 `PrivateKeyInfo` wraps the PKCS#1 `RSAPrivateKey` in an OCTET STRING; the
/// signer wants the inner structure. Walks the three DER elements to reach it.
fn pkcs8_to_pkcs1(der: &[u8]) -> anyhow::Result<&[u8]> {
    fn element(input: &[u8]) -> anyhow::Result<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first().context("truncated DER")?;
        let (&first, rest) = rest.split_first().context("truncated DER")?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            anyhow::ensure!(n > 0 && n <= 4 && rest.len() >= n, "bad DER length");
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, &rest[n..])
        };
        anyhow::ensure!(rest.len() >= len, "truncated DER");
        Ok((tag, &rest[..len], &rest[len..]))
    }
    let (tag, body, _) = element(der)?;
    anyhow::ensure!(tag == 0x30, "PKCS#8 is not a SEQUENCE");
    let (_version, _, rest) = element(body)?;
    let (_algorithm, _, rest) = element(rest)?;
    let (tag, key, _) = element(rest)?;
    anyhow::ensure!(tag == 0x04, "PKCS#8 key is not an OCTET STRING");
    Ok(key)
}

/// The keyring a running server uses, reloaded from disk on a timer and when a token
/// names a kid it does not know (at most once a second), so a rotation made by the CLI
/// or another instance is picked up without a restart.
pub struct SharedKeyring {
    store: KeyStore,
    current: RwLock<Arc<Keyring>>,
    /// When an unknown kid last made it reread the directory (periodic rereads do not
    /// count: a key created just after one must still be found at once).
    last_forced: Mutex<Option<Instant>>,
}

impl SharedKeyring {
    pub fn open(store: KeyStore) -> anyhow::Result<Self> {
        if let Some(kid) = store.ensure_active()? {
            tracing::info!(%kid, dir = %store.dir.display(), "created signing key");
        }
        let ring = store.load()?;
        Ok(SharedKeyring {
            store,
            current: RwLock::new(Arc::new(ring)),
            last_forced: Mutex::new(None),
        })
    }

    pub fn current(&self) -> Arc<Keyring> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rereads the key directory; on failure keeps the keys it has.
    /// [`KeyStore::rotate_if_due`], logged.
    pub fn rotate_if_due(&self, every: Duration) {
        match self.store.rotate_if_due(every) {
            Ok(Some(kid)) => tracing::info!(%kid, "scheduled key rotation: new key published"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %format!("{e:#}"), "scheduled key rotation failed"),
        }
    }

    pub fn reload(&self) {
        match self.store.load() {
            Ok(ring) => {
                let old_kid = self.current().signing.kid.clone();
                if ring.signing.kid != old_kid {
                    tracing::info!(kid = %ring.signing.kid, "signing key changed");
                }
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "reloading keys failed"),
        }
    }

    /// Looks a kid up, rereading the directory once if it is unknown and no unknown
    /// kid made it reread in the last second (so garbage kids cannot cause a read storm).
    pub fn verifying_key(&self, kid: &str) -> Option<Arc<KeyMaterial>> {
        if let Some(key) = self.current().verifying.get(kid) {
            return Some(key.clone());
        }
        let may_reread = {
            let mut last = self.last_forced.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.is_none_or(|at| at.elapsed() > Duration::from_secs(1));
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if may_reread {
            self.reload();
            return self.current().verifying.get(kid).cloned();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store(alg: KeyAlgorithm, retention: Duration) -> (KeyStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("tessera-keys-{}", uuid::Uuid::new_v4()));
        (KeyStore::new(&dir, alg, retention), dir)
    }

    #[test]
    fn every_algorithm_signs_and_verifies_through_its_published_key() {
        for alg in [
            KeyAlgorithm::Es256,
            KeyAlgorithm::EdDsa,
            KeyAlgorithm::Rs256,
            KeyAlgorithm::Hs256,
        ] {
            let (store, dir) = temp_store(alg, Duration::from_secs(60));
            store.ensure_active().unwrap();
            let ring = store.load().unwrap();
            let mut header = jsonwebtoken::Header::new(jwt_algorithm(alg));
            header.kid = Some(ring.signing.kid.clone());
            let claims = serde_json::json!({"sub": "x", "exp": 4_000_000_000u64});
            let token = jsonwebtoken::encode(&header, &claims, &ring.signing.encoding).unwrap();
            let jwks: JwkSet = serde_json::from_str(&ring.jwks).unwrap();
            let key = match alg {
                KeyAlgorithm::Hs256 => {
                    assert!(jwks.keys.is_empty(), "HMAC secrets must not be published");
                    ring.signing.decoding.clone()
                }
                _ => {
                    let jwk = jwks
                        .find(&ring.signing.kid)
                        .expect("active key is published");
                    DecodingKey::from_jwk(jwk).unwrap()
                }
            };
            let mut v = jsonwebtoken::Validation::new(jwt_algorithm(alg));
            v.required_spec_claims.clear();
            jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).unwrap();
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn rotation_keeps_the_old_key_verifying_until_its_tokens_expire() {
        let (store, dir) = temp_store(KeyAlgorithm::Es256, Duration::from_secs(3600));
        let first = store.ensure_active().unwrap().unwrap();
        assert_eq!(
            store.ensure_active().unwrap(),
            None,
            "ensure_active is idempotent"
        );
        let second = store.rotate().unwrap();
        let ring = store.load().unwrap();
        assert_eq!(ring.signing.kid, second);
        assert!(ring.verifying.contains_key(&first));
        assert!(ring.jwks.contains(&first) && ring.jwks.contains(&second));

        let (expired, _) = temp_store(KeyAlgorithm::Es256, Duration::ZERO);
        let expired = KeyStore {
            dir: dir.clone(),
            ..expired
        };
        std::thread::sleep(Duration::from_millis(5));
        let ring = expired.load().unwrap();
        assert!(
            !ring.verifying.contains_key(&first),
            "retired past retention: dropped"
        );
        let mode = fs::metadata(dir.join(format!("{second}.json"))).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rotation_publishes_ahead_and_switches_by_the_clock() {
        let (store, dir) = temp_store(KeyAlgorithm::Es256, Duration::from_secs(3600));
        let store = store.publishing_ahead(Duration::from_millis(400));
        let first = store.ensure_active().unwrap().unwrap();
        assert_eq!(
            store.load().unwrap().signing.kid,
            first,
            "a first key signs at once"
        );
        let hour = Duration::from_secs(3600);
        assert_eq!(store.rotate_if_due(hour).unwrap(), None, "not due yet");
        let second = store.rotate_if_due(Duration::ZERO).unwrap().unwrap();
        assert_eq!(
            store.rotate_if_due(Duration::ZERO).unwrap(),
            None,
            "a key is already waiting"
        );
        let ring = store.load().unwrap();
        assert_eq!(ring.signing.kid, first, "not before its time");
        assert!(ring.jwks.contains(&second) && ring.verifying.contains_key(&second));
        let status = |kid: &str| {
            store
                .list()
                .unwrap()
                .into_iter()
                .find(|k| k.kid == kid)
                .unwrap()
                .status
        };
        assert_eq!((status(&first), status(&second)), ("active", "next"));
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(store.load().unwrap().signing.kid, second);
        assert_eq!((status(&first), status(&second)), ("retiring", "active"));
        // A leaked key: --now signs at once.
        let third = store.rotate_now().unwrap();
        assert_eq!(store.load().unwrap().signing.kid, third);
        fs::remove_dir_all(dir).unwrap();
    }
}
