//! The cost of `verify` against the raw signature check of the same algorithm (ES256),
//! with and without the revocation check (a local set loaded from Redis with 10,000
//! revoked sessions).
//!
//! ```sh
//! cargo bench -p tessera-verify --bench verify    # needs Redis on 127.0.0.1:6379 for the last case
//! ```

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use tessera_verify::{Claims, Config, JwkSet, RevocationConfig, Verifier};
use uuid::Uuid;

const ISSUER: &str = "http://127.0.0.1:8080";
const AUDIENCE: &str = "tessera";

struct Fixture {
    token: String,
    jwks: JwkSet,
    raw_key: DecodingKey,
}

fn fixture() -> Fixture {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref(); // 0x04 || x || y
    let jwks: JwkSet = serde_json::from_value(serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }]}))
    .unwrap();
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = Claims {
        iss: ISSUER.into(),
        sub: Uuid::new_v4(),
        aud: AUDIENCE.into(),
        exp: now + 3600,
        iat: now,
        nbf: now,
        jti: Uuid::now_v7().to_string(),
        sid: Uuid::new_v4(),
        roles: vec!["user".into()],
        email_verified: true,
        is_anonymous: false,
        amr: vec!["pwd".into()],
        auth_time: now,
    };
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    header.typ = Some("at+jwt".into());
    let token =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(pkcs8.as_ref())).unwrap();
    let raw_key = DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    Fixture {
        token,
        jwks,
        raw_key,
    }
}

/// 10,000 revoked sessions under a fresh prefix; None if Redis is not reachable.
fn seed_redis(prefix: &str) -> Option<()> {
    let client = redis::Client::open("redis://127.0.0.1:6379").ok()?;
    let mut conn = client.get_connection().ok()?;
    let mut pipe = redis::pipe();
    for _ in 0..10_000 {
        pipe.set_ex(format!("{prefix}revoked:sid:{}", Uuid::new_v4()), 1, 600)
            .ignore();
    }
    pipe.query::<()>(&mut conn).ok()
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let (message, signature) = f.token.rsplit_once('.').unwrap();
    let mut group = c.benchmark_group("es256");
    group.bench_function("raw signature check", |b| {
        b.iter(|| {
            jsonwebtoken::crypto::verify(
                black_box(signature),
                black_box(message.as_bytes()),
                &f.raw_key,
                Algorithm::ES256,
            )
            .unwrap()
        })
    });

    let plain = Verifier::with_keys(Config::new(ISSUER, AUDIENCE), &f.jwks).unwrap();
    group.bench_function("verify (claims, no revocation)", |b| {
        b.iter(|| plain.verify_local(black_box(&f.token)).unwrap())
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let prefix = format!("tessera_bench:{}:", Uuid::new_v4().simple());
    if seed_redis(&prefix).is_some() {
        let mut config = Config::new(ISSUER, AUDIENCE);
        config.revocation = Some(RevocationConfig::new("redis://127.0.0.1:6379", &prefix));
        let checked = Verifier::with_keys(config, &f.jwks).unwrap();
        assert!(runtime.block_on(checked.ready(Duration::from_secs(10))));
        group.bench_function("verify + revocation (10k revoked)", |b| {
            b.iter(|| checked.verify_local(black_box(&f.token)).unwrap())
        });
    } else {
        eprintln!("Redis not reachable on 127.0.0.1:6379: skipping the revocation case");
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
