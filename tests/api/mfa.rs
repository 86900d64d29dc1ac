//! The second factor through HTTP: enrollment, confirmation, the two-step login, replay
//! and exhaustion, recovery codes, removal, the claims, and the secret sealed at rest.
//! Codes are computed here from the secret with this file's own RFC 6238 code, not the
//! server's.

use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

/// RFC 4648 base32 (no padding), as authenticator apps read the secret.
pub fn base32_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u64, 0);
    for c in text.trim_end_matches('=').bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a',
            b'2'..=b'7' => c - b'2' + 26,
            other => panic!("not base32: {}", other as char),
        };
        buffer = (buffer << 5) | u64::from(value);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

/// RFC 6238 with HMAC-SHA-1, 6 digits, 30 s steps (RFC 4226 dynamic truncation).
pub fn totp(secret: &[u8], step: u64) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).unwrap();
    mac.update(&step.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[19] & 0x0f) as usize;
    let value = u32::from_be_bytes(digest[offset..offset + 4].try_into().unwrap()) & 0x7fff_ffff;
    format!("{:06}", value % 1_000_000)
}

fn step_now() -> u64 {
    chrono::Utc::now().timestamp() as u64 / 30
}

/// A user with TOTP on: (email, the secret, the recovery codes, a session's tokens).
pub async fn with_totp(app: &TestApp) -> (String, Vec<u8>, Vec<String>, Tokens) {
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let res = app
        .call(Method::POST, "/me/mfa/totp", &tokens.access, None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    let secret = base32_decode(body["secret"].as_str().unwrap());
    assert!(secret.len() >= 20, "at least 160 bits");
    let uri = body["otpauth_uri"].as_str().unwrap();
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    assert!(uri.contains(&format!("secret={}", body["secret"].as_str().unwrap())));
    assert!(body["qr_svg"].as_str().unwrap().contains("<svg"));
    // Not on yet: a login still gets tokens.
    app.login_ok(&email).await;
    let code = totp(&secret, step_now());
    let res = app
        .call(
            Method::POST,
            "/me/mfa/totp/confirm",
            &tokens.access,
            Some(&json!({ "code": code })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    let codes: Vec<String> = serde_json::from_value(body["recovery_codes"].clone()).unwrap();
    assert_eq!(codes.len(), 10);
    // Turning it on revokes the access tokens issued before; the session goes on.
    assert_invalid_token(app.me(&tokens.access).await).await;
    let tokens = app.refresh_ok(&tokens.refresh).await;
    (email, secret, codes, tokens)
}

pub async fn login_step_one(app: &TestApp, email: &str) -> String {
    let res = app.login(email, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "mfa_required");
    assert_eq!(body["methods"], json!(["totp", "recovery_code"]));
    body["mfa_token"].as_str().unwrap().to_owned()
}

pub async fn login_mfa(app: &TestApp, mfa_token: &str, factor: Value) -> reqwest::Response {
    let mut body = json!({ "mfa_token": mfa_token });
    body.as_object_mut()
        .unwrap()
        .extend(factor.as_object().unwrap().clone());
    app.post_json("/login/mfa", &body).await
}

/// A step whose code the server takes now without waiting: the confirmation used the
/// current one, and one step of skew either side is allowed, so the next one passes
/// (once).
pub fn fresh_step() -> u64 {
    step_now() + 1
}

async fn login_with_recovery_code(app: &TestApp, email: &str, code: &str) -> Tokens {
    let mfa_token = login_step_one(app, email).await;
    let res = login_mfa(app, &mfa_token, json!({ "recovery_code": code })).await;
    assert_eq!(res.status(), StatusCode::OK);
    Tokens::from_body(res.json().await.unwrap())
}

#[tokio::test]
async fn with_totp_a_login_needs_a_code_once_per_step_and_tokens_say_so() {
    let app = spawn_app().await;
    let (email, secret, _, tokens) = with_totp(&app).await;
    let me: Value = app.me(&tokens.access).await.json().await.unwrap();
    assert_eq!(me["mfa"], json!(["totp"]));

    let step = fresh_step();
    let mfa_token = login_step_one(&app, &email).await;
    let res = login_mfa(&app, &mfa_token, json!({ "code": totp(&secret, step) })).await;
    assert_eq!(res.status(), StatusCode::OK);
    let tokens = Tokens::from_body(res.json().await.unwrap());
    assert_eq!(tokens.claims()["amr"], json!(["pwd", "otp"]));
    assert_eq!(app.me(&tokens.access).await.status(), StatusCode::OK);
    // The amr survives a refresh.
    let next = app.refresh_ok(&tokens.refresh).await;
    assert_eq!(next.claims()["amr"], json!(["pwd", "otp"]));
    // The mfa_token is spent.
    let res = login_mfa(&app, &mfa_token, json!({ "code": totp(&secret, step) })).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_grant").await;

    // The same code again, in the same step, on a new login: refused (a replay).
    let mfa_token = login_step_one(&app, &email).await;
    let res = login_mfa(&app, &mfa_token, json!({ "code": totp(&secret, step) })).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    // A wrong password never learns about the second factor.
    assert_error(
        app.login(&email, "not the password").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let kinds = app.audit_kinds().await;
    for kind in ["mfa_enrollment_started", "mfa_enabled", "mfa_code_failed"] {
        assert!(kinds.contains(&kind.to_owned()), "{kind}: {kinds:?}");
    }
}

#[tokio::test]
async fn five_wrong_codes_end_the_mfa_token() {
    let mut settings = test_settings();
    settings.login.free_failures = 20;
    let app = spawn_app_with(settings).await;
    let (email, secret, _, _) = with_totp(&app).await;
    let mfa_token = login_step_one(&app, &email).await;
    for _ in 0..5 {
        let res = login_mfa(&app, &mfa_token, json!({ "code": "000000" })).await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    let step = fresh_step();
    let res = login_mfa(&app, &mfa_token, json!({ "code": totp(&secret, step) })).await;
    assert_error(res, StatusCode::BAD_REQUEST, "invalid_grant").await;
    // A new login starts over.
    let mfa_token = login_step_one(&app, &email).await;
    let res = login_mfa(&app, &mfa_token, json!({ "code": totp(&secret, step) })).await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_recovery_code_works_once_and_totp_can_be_removed() {
    let app = spawn_app().await;
    let (email, secret, codes, tokens) = with_totp(&app).await;
    let mfa_token = login_step_one(&app, &email).await;
    let res = login_mfa(
        &app,
        &mfa_token,
        json!({ "recovery_code": codes[0].to_uppercase() }),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mfa_token = login_step_one(&app, &email).await;
    let res = login_mfa(&app, &mfa_token, json!({ "recovery_code": codes[0] })).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert!(
        app.audit_kinds()
            .await
            .contains(&"mfa_recovery_code_used".to_owned())
    );

    // Removal needs the password and a code; other sessions end.
    let other = login_with_recovery_code(&app, &email, &codes[1]).await;
    let res = app
        .call(
            Method::DELETE,
            "/me/mfa/totp",
            &tokens.access,
            Some(&json!({"password": "wrong one", "recovery_code": codes[2]})),
        )
        .await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    app.forget_login_failures(&email).await;
    let step = fresh_step();
    let res = app
        .call(
            Method::DELETE,
            "/me/mfa/totp",
            &tokens.access,
            Some(&json!({"password": PASSWORD, "code": totp(&secret, step)})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    // Other sessions end; this one goes on with a new access token.
    assert_invalid_token(app.me(&other.access).await).await;
    assert_invalid_grant(app.refresh(&other.refresh).await, "revoked").await;
    assert_invalid_token(app.me(&tokens.access).await).await;
    let tokens = app.refresh_ok(&tokens.refresh).await;
    let me: Value = app.me(&tokens.access).await.json().await.unwrap();
    assert_eq!(me["mfa"], json!([]));
    // Logins need the password alone again.
    let tokens = app.login_ok(&email).await;
    assert_eq!(tokens.claims()["amr"], json!(["pwd"]));
}

#[tokio::test]
async fn an_admin_can_remove_a_users_second_factor_and_the_secret_is_sealed_at_rest() {
    let app = spawn_app().await;
    let admin = app.admin().await;
    let (email, secret, _, _) = with_totp(&app).await;
    let user = app.user_id(&email).await;

    let mut db = app.db().await;
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT secret_sealed FROM mfa_totp")
        .fetch_all(&mut db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert!(
        !stored[0]
            .windows(secret.len())
            .any(|w| w == secret.as_slice()),
        "the raw secret is in the database"
    );
    drop(db);

    let path = format!("/admin/users/{user}/mfa");
    let res = app.call(Method::DELETE, &path, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    app.login_ok(&email).await;
    // Again: nothing left to remove, which is no error (and no event).
    let res = app.call(Method::DELETE, &path, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let nobody = format!("/admin/users/{}/mfa", uuid::Uuid::new_v4());
    let res = app.call(Method::DELETE, &nobody, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let resets = app
        .audit_kinds()
        .await
        .into_iter()
        .filter(|k| k == "mfa_reset_by_admin")
        .count();
    assert_eq!(resets, 1);
}

#[tokio::test]
async fn a_browser_login_with_totp_gets_its_cookies_at_the_second_step() {
    let mut settings = test_settings();
    settings.cookies.secure = false;
    let app = spawn_app_with(settings).await;
    let (email, secret, _, _) = with_totp(&app).await;
    let res = app
        .post_json(
            "/login",
            &json!({"email": email, "password": PASSWORD, "token_delivery": "cookie"}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.headers().get("set-cookie").is_none(), "no session yet");
    let body: Value = res.json().await.unwrap();
    let step = fresh_step();
    let res = login_mfa(
        &app,
        body["mfa_token"].as_str().unwrap(),
        json!({ "code": totp(&secret, step) }),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let cookies: Vec<String> = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert!(
        cookies.iter().any(|c| c.contains("HttpOnly")),
        "{cookies:?}"
    );
    let body: Value = res.json().await.unwrap();
    assert!(
        body.get("refresh_token").is_none(),
        "the refresh token is only in a cookie"
    );
}

#[tokio::test]
async fn wrong_codes_count_against_the_accounts_failure_budget_like_passwords() {
    let app = spawn_app_with(with_failure_budget(2, 60, 60)).await;
    let (email, secret, _, _) = with_totp(&app).await;
    let mfa_token = login_step_one(&app, &email).await;
    for _ in 0..2 {
        let res = login_mfa(&app, &mfa_token, json!({ "code": "000000" })).await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    // The free failures are spent: even the right code waits now.
    let res = login_mfa(
        &app,
        &mfa_token,
        json!({ "code": totp(&secret, fresh_step()) }),
    )
    .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key("retry-after"));
    // And so does the password.
    assert_eq!(
        app.login(&email, PASSWORD).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// The dark modules of the enrollment SVG (`M{x} {y}h{w}v{h}H{x}V{y}` rectangles on a
/// white background), as a bitmap `size` pixels wide and high.
fn svg_bitmap(svg: &str) -> (usize, Vec<bool>) {
    let attr = |name: &str| -> usize {
        let start = svg.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        svg[start..].split('"').next().unwrap().parse().unwrap()
    };
    let (width, height) = (attr("width"), attr("height"));
    assert_eq!(width, height);
    let path = svg
        .split(" d=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let mut dark = vec![false; width * width];
    for rect in path.split('M').filter(|r| !r.is_empty()) {
        let numbers: Vec<usize> = rect
            .split(|c: char| !c.is_ascii_digit())
            .filter(|n| !n.is_empty())
            .map(|n| n.parse().unwrap())
            .collect();
        let [x, y, w, h, ..] = numbers[..] else {
            panic!("not a rectangle: {rect}");
        };
        for row in y..y + h {
            for col in x..x + w {
                dark[row * width + col] = true;
            }
        }
    }
    (width, dark)
}

#[tokio::test]
async fn an_authenticator_app_enrolls_from_the_qr_code() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let tokens = app.login_ok(&email).await;
    let res = app
        .call(Method::POST, "/me/mfa/totp", &tokens.access, None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    // What a camera sees: decoded by a QR reader of the test's own.
    let (size, dark) = svg_bitmap(body["qr_svg"].as_str().unwrap());
    let mut image = rqrr::PreparedImage::prepare_from_bitmap(size, size, |x, y| dark[y * size + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1);
    let (_, content) = grids[0].decode().unwrap();
    assert_eq!(content, body["otpauth_uri"].as_str().unwrap());
    // The URI says what an app needs (RFC 6238 defaults spelled out), and its secret
    // gives codes the server takes.
    let (label, query) = content
        .strip_prefix("otpauth://totp/")
        .unwrap()
        .split_once('?')
        .unwrap();
    assert!(label.starts_with("Tessera:"), "{label}");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    assert_eq!(param("issuer").as_deref(), Some("Tessera"));
    for (name, value) in [("algorithm", "SHA1"), ("digits", "6"), ("period", "30")] {
        assert!(
            param(name).is_none_or(|v| v == value),
            "{name}={:?}",
            param(name)
        );
    }
    let secret = base32_decode(&param("secret").unwrap());
    let res = app
        .call(
            Method::POST,
            "/me/mfa/totp/confirm",
            &tokens.access,
            Some(&json!({ "code": totp(&secret, step_now()) })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

/// RFC 4648 base32 without padding, as the server hands the secret out.
fn base32_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut out, mut buffer, mut bits) = (String::new(), 0u64, 0);
    for &b in bytes {
        buffer = (buffer << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[tokio::test]
async fn every_mfa_event_is_audited_without_a_secret_or_a_code() {
    let app = spawn_app().await;
    let admin = app.admin().await;
    let (email, secret, codes, tokens) = with_totp(&app).await;
    let mut never = vec![base32_encode(&secret), codes[0].clone(), codes[1].clone()];

    // A wrong code, then a recovery code, at a login.
    let mfa_token = login_step_one(&app, &email).await;
    let wrong = totp(&secret, step_now() - 20);
    let res = login_mfa(&app, &mfa_token, json!({ "code": wrong })).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let res = login_mfa(&app, &mfa_token, json!({ "recovery_code": codes[0] })).await;
    assert_eq!(res.status(), StatusCode::OK);
    never.extend([wrong, mfa_token]);

    // Step-up, failed and passed, then removal with a recovery code.
    let reauthenticate = |body: Value| {
        let (app, access) = (&app, tokens.access.clone());
        async move {
            app.call(Method::POST, "/me/reauthenticate", &access, Some(&body))
                .await
        }
    };
    let res = reauthenticate(json!({"password": "not the password", "code": "123456"})).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let code = totp(&secret, fresh_step());
    let res = reauthenticate(json!({"password": PASSWORD, "code": code})).await;
    assert_eq!(res.status(), StatusCode::OK);
    never.push(code);
    let fresh = Tokens::from_body(res.json().await.unwrap());
    let removal = json!({"password": PASSWORD, "recovery_code": codes[1]});
    let res = app
        .call(
            Method::DELETE,
            "/me/mfa/totp",
            &fresh.access,
            Some(&removal),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    // An admin's reset of another user's.
    let (other, other_secret, ..) = with_totp(&app).await;
    never.push(base32_encode(&other_secret));
    let path = format!("/admin/users/{}/mfa", app.user_id(&other).await);
    let res = app.call(Method::DELETE, &path, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);

    let mut db = app.db().await;
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT kind, CAST(detail AS TEXT) FROM audit_events ORDER BY id")
            .fetch_all(&mut db)
            .await
            .unwrap();
    for kind in [
        "mfa_enrollment_started",
        "mfa_enabled",
        "mfa_code_failed",
        "mfa_recovery_code_used",
        "step_up_failed",
        "step_up_passed",
        "mfa_disabled",
        "mfa_reset_by_admin",
    ] {
        assert!(rows.iter().any(|(k, _)| k == kind), "{kind} in {rows:?}");
    }
    let used: Value = rows
        .iter()
        .find(|(k, _)| k == "mfa_recovery_code_used")
        .and_then(|(_, d)| serde_json::from_str(d.as_deref()?).ok())
        .unwrap();
    assert_eq!(used["remaining"], 9, "{used}");
    for (kind, detail) in &rows {
        let detail = detail.as_deref().unwrap_or_default().to_ascii_uppercase();
        for secret in &never {
            assert!(
                !detail.contains(&secret.to_ascii_uppercase()),
                "{kind} row holds a secret or a code: {detail}"
            );
        }
    }
}
