//! Per-role lifetimes (`[tokens.roles.<role>]`): shorter access tokens and sessions for
//! admins, applied at login and at every refresh, while users' sessions live on.

use std::time::Duration;

use reqwest::StatusCode;
use tessera::config::RoleLifetimes;

use crate::helpers::*;

fn lifetime(tokens: &Tokens) -> i64 {
    let claims = tokens.claims();
    claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap()
}

#[tokio::test]
async fn an_admin_session_ends_on_the_admin_lifetimes_while_a_user_session_lives_on() {
    let mut settings = test_settings();
    settings.tokens.roles.insert(
        "admin".into(),
        RoleLifetimes {
            access_ttl_secs: Some(60),
            refresh_idle_ttl_secs: Some(3),
            refresh_absolute_ttl_secs: Some(6),
        },
    );
    let app = spawn_app_with(settings).await;
    let admin_email = app.new_user().await;
    app.make_admin(&admin_email).await;
    let user_email = app.new_user().await;
    let mut user = app.login_ok(&user_email).await;
    let admin = app.login_ok(&admin_email).await;
    assert_eq!(lifetime(&admin), 60);
    assert_eq!(admin.body["expires_in"], 60);
    assert!(admin.body["refresh_token_expires_in"].as_i64().unwrap() <= 3);
    assert_eq!(lifetime(&user), 900);
    assert_eq!(user.body["expires_in"], 900);

    // Idle for longer than the admins' 3 seconds: over for the admin only.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_invalid_grant(app.refresh(&admin.refresh).await, "idle_expired").await;
    user = app.refresh_ok(&user.refresh).await;
    // The idled-out session is not listed as live any more.
    let mut admin = app.login_ok(&admin_email).await;
    let listed = app.sessions(&admin.access).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], admin.session_id.as_str());

    // Refreshed every second, an admin session still ends 6 seconds after its login.
    let mut refreshed = 0;
    let reason = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        user = app.refresh_ok(&user.refresh).await;
        let res = app.refresh(&admin.refresh).await;
        if res.status() != StatusCode::OK {
            let body: serde_json::Value = res.json().await.unwrap();
            break body["error_reason"].clone();
        }
        admin = Tokens::from_body(res.json().await.unwrap());
        assert_eq!(lifetime(&admin), 60);
        refreshed += 1;
        assert!(
            refreshed < 10,
            "the admin session outlived its absolute lifetime"
        );
    };
    assert_eq!(reason, "expired");
    assert!(refreshed >= 4, "ended after {refreshed} refreshes");

    // The user's session, now older than 6 seconds, ends at the refresh after the user
    // becomes an admin.
    app.make_admin(&user_email).await;
    assert_invalid_grant(app.refresh(&user.refresh).await, "expired").await;
}
