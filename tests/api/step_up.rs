//! Step-up (RFC 9470) through HTTP: a recent authentication for a password change and
//! for removing the second factor, `POST /me/reauthenticate`, and roles whose routes
//! need `otp` (`mfa.required_for_roles`).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::mfa::{fresh_step, totp, with_totp};
use tessera::config::Settings;

const MAX_AGE: &str = r#"Bearer error="insufficient_user_authentication", max_age=3"#;
const NEEDS_MFA: &str = r#"Bearer error="insufficient_user_authentication", acr_values="mfa""#;

/// Logins count as recent for 3 seconds.
fn recent_for_3_secs() -> Settings {
    let mut s = test_settings();
    s.mfa.recent_auth_secs = 3;
    s
}

async fn reauthenticate(app: &TestApp, access: &str, body: Value) -> reqwest::Response {
    app.call(Method::POST, "/me/reauthenticate", access, Some(&body))
        .await
}

async fn reauthenticated(app: &TestApp, access: &str, body: Value) -> Tokens {
    let res = reauthenticate(app, access, body).await;
    assert_eq!(res.status(), StatusCode::OK);
    Tokens::from_body(res.json().await.unwrap())
}

/// The exact RFC 9470 challenge, and the contract's error body.
async fn assert_step_up(res: reqwest::Response, challenge: &str) {
    assert_eq!(
        res.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some(challenge)
    );
    assert_error(
        res,
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
    )
    .await;
}

fn auth_time(tokens: &Tokens) -> i64 {
    tokens.claims()["auth_time"].as_i64().unwrap()
}

#[tokio::test]
async fn an_old_login_reauthenticates_before_changing_the_password() {
    let app = spawn_app_with(recent_for_3_secs()).await;
    let email = app.new_user().await;
    let login = app.login_ok(&email).await;
    // Right after the login the password could change; 4 seconds later it cannot, and
    // a refresh does not make the login recent.
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let tokens = app.refresh_ok(&login.refresh).await;
    assert_eq!(auth_time(&tokens), auth_time(&login));
    assert_step_up(
        app.change_password(&tokens.access, PASSWORD, "another password 1")
            .await,
        MAX_AGE,
    )
    .await;
    let removal = json!({"password": PASSWORD, "code": "123456"});
    assert_step_up(
        app.call(
            Method::DELETE,
            "/me/mfa/totp",
            &tokens.access,
            Some(&removal),
        )
        .await,
        MAX_AGE,
    )
    .await;

    // A wrong password, or a code from a user without a second factor, is refused.
    assert_error(
        reauthenticate(
            &app,
            &tokens.access,
            json!({"password": "not the password"}),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    assert_error(
        reauthenticate(
            &app,
            &tokens.access,
            json!({"password": PASSWORD, "code": "123456"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let fresh = reauthenticated(&app, &tokens.access, json!({"password": PASSWORD})).await;
    assert_eq!(fresh.session_id, tokens.session_id, "the same session");
    assert!(auth_time(&fresh) > auth_time(&login));
    assert_eq!(fresh.claims()["amr"], json!(["pwd"]));
    // The session's refresh token from before is replaced (unknown, not reuse: the
    // session lives on), and the new one keeps the new auth_time across refreshes.
    assert_invalid_grant(app.refresh(&tokens.refresh).await, "unknown").await;
    let next = app.refresh_ok(&fresh.refresh).await;
    assert_eq!(auth_time(&next), auth_time(&fresh));
    let res = app
        .change_password(&next.access, PASSWORD, "another password 1")
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let kinds = app.audit_kinds().await;
    for kind in ["step_up_failed", "step_up_passed", "password_changed"] {
        assert!(kinds.contains(&kind.to_owned()), "{kind} in {kinds:?}");
    }
}

#[tokio::test]
async fn with_a_second_factor_reauthentication_needs_a_code_and_gives_otp() {
    let app = spawn_app().await;
    let (_, secret, codes, tokens) = with_totp(&app).await;
    assert_eq!(tokens.claims()["amr"], json!(["pwd"]));
    assert_error(
        reauthenticate(&app, &tokens.access, json!({"password": PASSWORD})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let stale = totp(&secret, fresh_step() - 20);
    assert_error(
        reauthenticate(
            &app,
            &tokens.access,
            json!({"password": PASSWORD, "code": stale}),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let code = totp(&secret, fresh_step());
    let fresh = reauthenticated(
        &app,
        &tokens.access,
        json!({"password": PASSWORD, "code": code}),
    )
    .await;
    assert_eq!(fresh.claims()["amr"], json!(["pwd", "otp"]));
    // A recovery code does too, once.
    let body = json!({"password": PASSWORD, "recovery_code": codes[0]});
    let again = reauthenticated(&app, &fresh.access, body.clone()).await;
    assert_eq!(again.claims()["amr"], json!(["pwd", "otp"]));
    assert_error(
        reauthenticate(&app, &again.access, body).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let kinds = app.audit_kinds().await;
    for kind in [
        "step_up_failed",
        "step_up_passed",
        "mfa_code_failed",
        "mfa_recovery_code_used",
    ] {
        assert!(kinds.contains(&kind.to_owned()), "{kind} in {kinds:?}");
    }
}

#[tokio::test]
async fn admin_routes_refuse_a_token_without_otp_when_the_admin_role_requires_it() {
    let mut settings = test_settings();
    settings.mfa.required_for_roles = vec!["admin".into()];
    let app = spawn_app_with(settings).await;
    // An admin logged in with a password alone.
    let admin = app.admin().await;
    assert_step_up(
        app.call(Method::GET, "/admin/users", &admin.access, None)
            .await,
        NEEDS_MFA,
    )
    .await;
    // Without the role it stays 403.
    let user = app.login_ok(&app.new_user().await).await;
    assert_error(
        app.call(Method::GET, "/admin/users", &user.access, None)
            .await,
        StatusCode::FORBIDDEN,
        "insufficient_scope",
    )
    .await;
    // An admin with a second factor who reauthenticates with a code passes.
    let (email, secret, _, tokens) = with_totp(&app).await;
    app.make_admin(&email).await;
    let promoted = app.refresh_ok(&tokens.refresh).await;
    assert_step_up(
        app.call(Method::GET, "/admin/users", &promoted.access, None)
            .await,
        NEEDS_MFA,
    )
    .await;
    let code = totp(&secret, fresh_step());
    let stepped_up = reauthenticated(
        &app,
        &promoted.access,
        json!({"password": PASSWORD, "code": code}),
    )
    .await;
    let res = app
        .call(Method::GET, "/admin/users", &stepped_up.access, None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn reauthenticating_needs_a_bearer_token_and_a_password() {
    let app = spawn_app().await;
    let res = app
        .post_json("/me/reauthenticate", &json!({"password": PASSWORD}))
        .await;
    assert_invalid_token(res).await;
    let tokens = app.login_ok(&app.new_user().await).await;
    assert_error(
        reauthenticate(&app, &tokens.access, json!({})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    // An ended session cannot be revived by reauthenticating.
    let res = app.logout(&tokens.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_invalid_token(reauthenticate(&app, &tokens.access, json!({"password": PASSWORD})).await)
        .await;
}
