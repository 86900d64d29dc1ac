use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::helpers::*;

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn parts(token: &str) -> (Value, Value, String) {
    let mut it = token.split('.');
    let header =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap()).unwrap();
    let claims =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap()).unwrap();
    (header, claims, it.next().unwrap().to_owned())
}

fn hs256(key: &[u8], signing_input: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&key, signing_input.as_bytes()).as_ref())
}

#[tokio::test]
async fn forged_access_tokens_are_refused() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let real = app.login_ok(&email).await;
    // Accepted first, so the server remembers it: a forgery close to it must still fail.
    assert_eq!(app.me(&real.access).await.status(), 200);
    let (header, claims, signature) = parts(&real.access);
    let mut admin_claims = claims.clone();
    admin_claims["roles"] = json!(["admin"]);

    let mut forgeries = Vec::new();
    // alg: none, in any case, with and without a signature.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let mut h = header.clone();
        h["alg"] = json!(alg);
        forgeries.push(format!("{}.{}.", b64(&h), b64(&admin_claims)));
        forgeries.push(format!("{}.{}.{}", b64(&h), b64(&admin_claims), signature));
    }
    // HS256 signed with the server's public key (as JWK JSON, and as raw x||y bytes).
    let jwks = app.jwks().await;
    let jwk = &jwks["keys"][0];
    let mut raw_point = vec![4u8];
    raw_point.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
    raw_point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
    for key in [serde_json::to_vec(jwk).unwrap(), raw_point] {
        let mut h = header.clone();
        h["alg"] = json!("HS256");
        let input = format!("{}.{}", b64(&h), b64(&admin_claims));
        forgeries.push(format!("{input}.{}", hs256(&key, &input)));
    }
    // Tampered payload with the original signature.
    forgeries.push(format!(
        "{}.{}.{signature}",
        b64(&header),
        b64(&admin_claims)
    ));
    // Stripped signature.
    let (h, c) = real
        .access
        .rsplit_once('.')
        .unwrap()
        .0
        .split_once('.')
        .unwrap();
    forgeries.push(format!("{h}.{c}."));
    forgeries.push(format!("{h}.{c}"));
    // Wrong typ, unknown kid, missing kid (signature kept: must fail on the header).
    for (field, value) in [
        ("typ", json!("JWT")),
        ("kid", json!("no-such-key")),
        ("kid", Value::Null),
    ] {
        let mut h = header.clone();
        h[field] = value;
        forgeries.push(format!("{}.{}.{signature}", b64(&h), b64(&claims)));
    }

    for forged in &forgeries {
        assert_invalid_token(app.me(forged).await).await;
    }
    assert_eq!(
        app.me(&real.access).await.status(),
        200,
        "the real token still works"
    );
}

#[tokio::test]
async fn tokens_for_another_audience_or_issuer_or_expired_are_refused() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let real = app.login_ok(&email).await;
    let (header, claims, _) = parts(&real.access);
    // Sign with the server's real key, so only the claim checks can refuse them.
    let ring = app.state.auth.tokens.keyring().current();
    let sign = |c: &Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = header["kid"].as_str().map(String::from);
        h.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&h, c, &ring.signing.encoding).unwrap()
    };
    assert_eq!(
        app.me(&sign(&claims)).await.status(),
        200,
        "control: re-signed real claims pass"
    );
    let now = chrono::Utc::now().timestamp();
    let mut cases = Vec::new();
    for (field, value) in [
        ("aud", json!("someone-else")),
        ("iss", json!("https://evil.example")),
        ("exp", json!(now - 120)),
        ("nbf", json!(now + 600)),
    ] {
        let mut c = claims.clone();
        c[field] = value;
        cases.push(c);
    }
    let mut missing_sid = claims.clone();
    missing_sid.as_object_mut().unwrap().remove("sid");
    cases.push(missing_sid);
    for c in cases {
        assert_invalid_token(app.me(&sign(&c)).await).await;
    }
}

#[tokio::test]
async fn a_token_accepted_before_is_refused_once_it_expires() {
    let mut settings = test_settings();
    settings.tokens.access_ttl_secs = 1;
    settings.tokens.leeway_secs = 0;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    // Accepted (and remembered) while it is valid...
    assert_eq!(app.me(&t.access).await.status(), 200);
    assert_eq!(app.me(&t.access).await.status(), 200);
    // ...and refused after `exp` (issued at a whole second, valid for at most 2 s).
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    assert_invalid_token(app.me(&t.access).await).await;
}
