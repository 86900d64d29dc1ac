//! Micro-benchmarks of the per-request work that is Tessera's own: signing and verifying
//! access tokens (every algorithm Tessera offers, through the server's own
//! `AccessTokens`, in full and for a token presented before), generating, hashing and
//! sealing refresh tokens (what one `/refresh` does before its database statement), and
//! the denylist check (one Redis `MGET`).
//!
//! ```sh
//! cargo bench --bench tokens     # the denylist case needs Redis (TESSERA__REDIS__URL)
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tessera::auth::access_token::AccessTokens;
use tessera::auth::keys::{KeyStore, SharedKeyring};
use tessera::auth::refresh_token::RefreshToken;
use tessera::config::Settings;
use tessera::domain::{SessionId, UserId};
use tessera::store::redis::Denylist;
use tessera::store::{Grant, Revocations};
use uuid::Uuid;

/// Settings from the environment with the keys in a fresh directory.
fn settings(keys: &std::path::Path, algorithm: &str) -> Settings {
    let env = std::env::vars()
        .filter(|(k, _)| k != "TESSERA__KEYS__DIR" && k != "TESSERA__TOKENS__ALGORITHM")
        .chain([
            ("TESSERA__KEYS__DIR".to_owned(), keys.display().to_string()),
            (
                "TESSERA__TOKENS__ALGORITHM".to_owned(),
                algorithm.to_owned(),
            ),
        ]);
    Settings::load_from(None, env).expect("valid settings")
}

fn access_tokens(c: &mut Criterion) {
    let mut group = c.benchmark_group("access token");
    for algorithm in ["ES256", "EdDSA", "RS256", "HS256"] {
        let dir = std::env::temp_dir().join(format!(
            "tessera-bench-keys-{}-{algorithm}",
            std::process::id()
        ));
        let settings = settings(&dir, algorithm);
        let ring =
            Arc::new(SharedKeyring::open(KeyStore::from_settings(&settings).unwrap()).unwrap());
        let tokens = AccessTokens::new(ring.clone(), &settings.tokens);
        let grant = Grant {
            session_id: SessionId(Uuid::new_v4()),
            user_id: UserId(Uuid::new_v4()),
            roles: vec!["user".to_owned()],
            email_verified: true,
            amr: vec!["pwd".to_owned()],
            auth_time: chrono::Utc::now(),
            expires_at: chrono::Utc::now(),
            remember_me: false,
            issued_at: chrono::Utc::now(),
        };
        group.bench_function(format!("sign {algorithm}"), |b| {
            b.iter(|| tokens.issue(black_box(&grant)).unwrap())
        });
        let token = tokens.issue(&grant).unwrap();
        // The same claims through jsonwebtoken, which parses the key for every call:
        // what `issue` did before it signed with the key parsed once.
        let claims = tokens.verify(&token).unwrap();
        let key = ring.current().signing.clone();
        let mut header = jsonwebtoken::Header::new(tessera::auth::keys::jwt_algorithm(key.alg));
        header.kid = Some(key.kid.clone());
        header.typ = Some("at+jwt".into());
        group.bench_function(format!("sign {algorithm} through jsonwebtoken"), |b| {
            b.iter(|| jsonwebtoken::encode(&header, black_box(&claims), &key.encoding).unwrap())
        });
        group.bench_function(format!("verify {algorithm}"), |b| {
            b.iter(|| tokens.verify(black_box(&token)).unwrap())
        });
        // The server's configuration: a token presented again is found by its SHA-256.
        let remembering = AccessTokens::new(ring, &settings.tokens).remembering(1000);
        remembering.verify(&token).unwrap();
        group.bench_function(format!("verify {algorithm}, presented before"), |b| {
            b.iter(|| remembering.verify(black_box(&token)).unwrap())
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
    group.finish();
}

/// Where an ES256 signature's time goes: jsonwebtoken parses the PKCS#8 key into an
/// `EcdsaKeyPair` on every call; this separates that from the signature itself.
fn es256_parts(c: &mut Criterion) {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let dir = std::env::temp_dir().join(format!(
        "tessera-bench-keys-{}-es256-parts",
        std::process::id()
    ));
    let settings = settings(&dir, "ES256");
    let ring = SharedKeyring::open(KeyStore::from_settings(&settings).unwrap()).unwrap();
    let der = ring.current().signing.encoding.as_bytes().to_vec();
    let message = [7u8; 300];
    let rng = SystemRandom::new();
    let mut group = c.benchmark_group("ES256 parts");
    group.bench_function("parse the PKCS#8 key pair", |b| {
        b.iter(|| EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, black_box(&der)))
    });
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).unwrap();
    group.bench_function("sign with a parsed key pair", |b| {
        b.iter(|| pair.sign(&rng, black_box(&message)).unwrap())
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn refresh_tokens(c: &mut Criterion) {
    let mut group = c.benchmark_group("refresh token");
    let sid = SessionId(uuid::Uuid::new_v4());
    group.bench_function("generate", |b| {
        b.iter(|| RefreshToken::start_chain(black_box(sid)))
    });
    let token = RefreshToken::start_chain(sid);
    group.bench_function("hash", |b| b.iter(|| black_box(&token).hash()));
    // What /refresh computes before its statement: parse the presented token, hash it,
    // make a successor, hash that and seal it for the reuse grace window.
    let presented = token.expose().to_owned();
    group.bench_function(
        "one rotation's work (parse, generate, 2 hashes, seal)",
        |b| {
            b.iter(|| {
                let current = RefreshToken::parse(black_box(&presented)).unwrap();
                let successor = current.successor();
                (
                    current.hash(),
                    successor.hash(),
                    current.seal_successor(&successor),
                )
            })
        },
    );
    group.finish();
}

fn denylist(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!(
        "tessera-bench-keys-{}-denylist",
        std::process::id()
    ));
    let settings = settings(&dir, "ES256");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let denylist = runtime
        .block_on(async { Denylist::connect_lazy(&settings.redis) })
        .unwrap();
    if let Err(e) = runtime.block_on(denylist.ping()) {
        eprintln!("skipping the denylist benchmark: Redis is not reachable ({e:#})");
        return;
    }
    let (user, session) = (UserId(Uuid::new_v4()), SessionId(Uuid::new_v4()));
    let jti = Uuid::now_v7().to_string();
    c.bench_function("denylist check (one MGET round trip)", |b| {
        b.iter(|| {
            let revoked = runtime
                .block_on(denylist.is_revoked(session, black_box(&jti), user, 0))
                .unwrap();
            assert!(!revoked);
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = access_tokens, es256_parts, refresh_tokens, denylist
}
criterion_main!(benches);
