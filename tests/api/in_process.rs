//! Revocation marks and login failure budgets kept in the process (`redis.url = ""`):
//! the same behaviour through HTTP, marks that survive a restart, and one instance
//! only per database.

use reqwest::{Method, StatusCode};
use tessera::config::Settings;
use tessera::startup::Application;

use crate::helpers::*;

fn in_process() -> Settings {
    let mut settings = test_settings();
    settings.redis.url = String::new().into();
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_every_kind_of_revocation_works_and_survives_a_restart() {
    let settings = in_process();
    let app = spawn_app_with(settings.clone()).await;
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status(), StatusCode::OK);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(
        body["redis"].as_str().unwrap().contains("single-instance"),
        "{body}"
    );
    let admin = app.admin().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let logged_out = app.login_ok(&email).await;
    let revoked = app.login_ok(&email).await;
    let kept = app.login_ok(&email).await;
    for t in [&logged_out, &revoked, &kept] {
        assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);
    }

    // A session mark, a single-token mark.
    assert_eq!(
        app.logout(&logged_out.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    let res = app
        .post_form("/revoke", &[("token", &revoked.access)])
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(app.me(&logged_out.access).await).await;
    assert_invalid_token(app.me(&revoked.access).await).await;
    assert_eq!(app.me(&kept.access).await.status(), StatusCode::OK);

    // Another user's role change: a per-user mark covering every earlier token.
    let other = app.new_user().await;
    let other_id = app.user_id(&other).await;
    let before_change = app.login_ok(&other).await;
    let res = app
        .call(
            Method::PATCH,
            &format!("/admin/users/{other_id}"),
            &admin.access,
            Some(&serde_json::json!({"roles": ["editor", "user"]})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(app.me(&before_change.access).await).await;

    // A restart: the marks come back from the database.
    let app = restart(app, &settings).await;
    assert_invalid_token(app.me(&logged_out.access).await).await;
    assert_invalid_token(app.me(&revoked.access).await).await;
    assert_invalid_token(app.me(&before_change.access).await).await;
    assert_eq!(app.me(&kept.access).await.status(), StatusCode::OK);
    // And a revocation after the restart still counts at once.
    let res = app
        .call(
            Method::PATCH,
            &format!("/admin/users/{id}"),
            &admin.access,
            Some(&serde_json::json!({"disabled": true})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(app.me(&kept.access).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_without_redis_on_the_same_database_refuses_to_start() {
    let settings = in_process();
    let _first = spawn_app_with(settings.clone()).await;
    let second = Application::build(settings.clone()).await;
    let error = format!("{:#}", second.err().expect("the second instance refused"));
    assert!(error.contains("another Tessera instance"), "{error}");
    assert!(error.contains("redis.url"), "says how to fix it: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_account_failure_budget_still_holds() {
    let mut settings = in_process();
    settings.login.free_failures = 2;
    settings.login.delay_base_secs = 60;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    for _ in 0..2 {
        assert_eq!(
            app.login(&email, "wrong password, long enough")
                .await
                .status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Past the free failures the next attempt must wait, even with the right password.
    let res = app.login(&email, PASSWORD).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key("retry-after"));
}
