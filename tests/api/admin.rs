use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

fn roles_of(access: &str) -> Value {
    // The payload is checked by the server; here it is only read.
    use base64::Engine;
    let payload = access.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice::<Value>(&bytes).unwrap()["roles"].clone()
}

/// An app with a signed-in admin, and a plain user (email, id).
async fn admin_and_user() -> (TestApp, Tokens, String, uuid::Uuid) {
    let app = spawn_app().await;
    let admin = app.admin().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    (app, admin, email, id)
}

#[tokio::test]
async fn a_non_admin_gets_403_insufficient_scope_on_every_admin_route() {
    let app = spawn_app().await;
    let email = app.new_user().await;
    let user = app.login_ok(&email).await;
    let id = app.user_id(&email).await;
    let patch = json!({"disabled": true});
    let routes = [
        (Method::GET, format!("/admin/users/{id}/sessions"), None),
        (Method::DELETE, format!("/admin/users/{id}/sessions"), None),
        (Method::PATCH, format!("/admin/users/{id}"), Some(&patch)),
        (Method::GET, "/admin/audit".to_owned(), None),
        // Even for ids that do not exist or do not parse: nothing is revealed.
        (Method::GET, "/admin/users/nope/sessions".to_owned(), None),
    ];
    for (method, path, body) in &routes {
        let res = app.call(method.clone(), path, &user.access, *body).await;
        assert_error(res, StatusCode::FORBIDDEN, "insufficient_scope").await;
        let res = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_invalid_token(res).await;
    }
    // None of it took effect.
    assert_eq!(app.me(&user.access).await.status(), StatusCode::OK);
    app.refresh_ok(&user.refresh).await;
}

#[tokio::test]
async fn an_admin_lists_and_ends_a_users_sessions() {
    let (app, admin, email, id) = admin_and_user().await;
    let one = app.login_ok(&email).await;
    let two = app.login_ok(&email).await;
    let path = format!("/admin/users/{id}/sessions");

    let res = app.call(Method::GET, &path, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::OK);
    let listed: Vec<Value> = res.json().await.unwrap();
    let mut ids: Vec<&str> = listed.iter().map(|s| s["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut expected = [one.session_id.as_str(), two.session_id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    assert!(
        listed
            .iter()
            .all(|s| s["current"] == false && s["ip"] == "127.0.0.1")
    );

    let res = app.call(Method::DELETE, &path, &admin.access, None).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    for t in [&one, &two] {
        assert_invalid_token(app.me(&t.access).await).await;
        assert_invalid_grant(app.refresh(&t.refresh).await, "revoked").await;
    }
    let res = app.call(Method::GET, &path, &admin.access, None).await;
    assert_eq!(res.json::<Vec<Value>>().await.unwrap(), Vec::<Value>::new());
    // The admin's own session is untouched, and the user can log in again.
    assert_eq!(app.me(&admin.access).await.status(), StatusCode::OK);
    let again = app.login_ok(&email).await;
    assert_eq!(app.me(&again.access).await.status(), StatusCode::OK);

    let unknown = format!("/admin/users/{}/sessions", uuid::Uuid::new_v4());
    for method in [Method::GET, Method::DELETE] {
        let res = app
            .call(method.clone(), &unknown, &admin.access, None)
            .await;
        assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
        let res = app
            .call(method, "/admin/users/nope/sessions", &admin.access, None)
            .await;
        assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    }
}

#[tokio::test]
async fn disabling_a_user_ends_everything_and_login_fails_like_a_wrong_password() {
    let (app, admin, email, id) = admin_and_user().await;
    let t = app.login_ok(&email).await;
    // /me before the disable too, so that the server already knows the user's email.
    assert_eq!(app.me(&t.access).await.status(), StatusCode::OK);
    let wrong_password = app.login(&email, "wrong password").await;
    let wrong_password = (
        wrong_password.status(),
        wrong_password.text().await.unwrap(),
    );

    let path = format!("/admin/users/{id}");
    let res = app
        .call(
            Method::PATCH,
            &path,
            &admin.access,
            Some(&json!({"disabled": true})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["disabled"], true);
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["email"], email);

    assert_invalid_token(app.me(&t.access).await).await;
    assert_invalid_grant(app.refresh(&t.refresh).await, "revoked").await;
    let disabled = app.login(&email, PASSWORD).await;
    assert_eq!(
        (disabled.status(), disabled.text().await.unwrap()),
        wrong_password,
        "a disabled user's correct password gets the wrong-password answer"
    );

    let res = app
        .call(
            Method::PATCH,
            &path,
            &admin.access,
            Some(&json!({"disabled": false})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let back = app.login_ok(&email).await;
    assert_eq!(app.me(&back.access).await.status(), StatusCode::OK);
    // The old session stays ended.
    assert_invalid_grant(app.refresh(&t.refresh).await, "revoked").await;
}

#[tokio::test]
async fn a_role_change_invalidates_access_tokens_and_the_next_refresh_carries_it() {
    let (app, admin, email, id) = admin_and_user().await;
    let one = app.login_ok(&email).await;
    let two = app.login_ok(&email).await;
    assert_eq!(roles_of(&one.access), json!(["user"]));
    let me: Value = app.me(&one.access).await.json().await.unwrap();
    assert_eq!(me["roles"], json!(["user"]));

    let change = json!({"roles": ["user", "editor"]});
    let res = app
        .call(
            Method::PATCH,
            &format!("/admin/users/{id}"),
            &admin.access,
            Some(&change),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["roles"], json!(["editor", "user"]));

    for t in [&one, &two] {
        assert_invalid_token(app.me(&t.access).await).await;
    }
    // Tokens are told apart by their issue time in milliseconds; step past the one in
    // which the change was made (a token issued in it counts as issued before it).
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let next = app.refresh_ok(&one.refresh).await;
    assert_eq!(roles_of(&next.access), json!(["editor", "user"]));
    let me: Value = app.me(&next.access).await.json().await.unwrap();
    assert_eq!(me["roles"], json!(["editor", "user"]));
    // The other session's refresh token still works too and carries the new roles.
    let other = app.refresh_ok(&two.refresh).await;
    assert_eq!(app.me(&other.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn taking_the_admin_role_away_takes_effect_at_once() {
    let app = spawn_app().await;
    let root = app.admin().await;
    let second = app.admin().await;
    let second_id: String = app.me(&second.access).await.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        app.call(Method::GET, "/admin/audit", &second.access, None)
            .await
            .status(),
        StatusCode::OK
    );
    let res = app
        .call(
            Method::PATCH,
            &format!("/admin/users/{second_id}"),
            &root.access,
            Some(&json!({"roles": ["user"]})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_token(
        app.call(Method::GET, "/admin/audit", &second.access, None)
            .await,
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let demoted = app.refresh_ok(&second.refresh).await;
    let res = app
        .call(Method::GET, "/admin/audit", &demoted.access, None)
        .await;
    assert_error(res, StatusCode::FORBIDDEN, "insufficient_scope").await;
}

#[tokio::test]
async fn user_patches_are_validated() {
    let (app, admin, email, id) = admin_and_user().await;
    let path = format!("/admin/users/{id}");
    for bad in [
        json!({}),
        json!({"disabled": "yes"}),
        json!({"roles": "admin"}),
        json!({"roles": ["has space"]}),
        json!({"roles": [""]}),
        json!({"disable": true}),
    ] {
        let res = app
            .call(Method::PATCH, &path, &admin.access, Some(&bad))
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let unknown = format!("/admin/users/{}", uuid::Uuid::new_v4());
    let res = app
        .call(
            Method::PATCH,
            &unknown,
            &admin.access,
            Some(&json!({"disabled": true})),
        )
        .await;
    assert_error(res, StatusCode::NOT_FOUND, "not_found").await;
    // Nothing happened to the user.
    app.login_ok(&email).await;
}

#[tokio::test]
async fn the_audit_trail_pages_newest_first_and_filters_by_user() {
    let (app, admin, email, id) = admin_and_user().await;
    let t = app.login_ok(&email).await;
    app.refresh_ok(&t.refresh).await;
    app.login(&email, "wrong password").await;
    let path = format!("/admin/users/{id}/sessions");
    app.call(Method::DELETE, &path, &admin.access, None).await;

    let page = |query: String| {
        let app = &app;
        let token = admin.access.clone();
        async move {
            let res = app
                .call(Method::GET, &format!("/admin/audit{query}"), &token, None)
                .await;
            assert_eq!(res.status(), StatusCode::OK);
            res.json::<Vec<Value>>().await.unwrap()
        }
    };
    let all = page(String::new()).await;
    let ids: Vec<i64> = all.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");

    let mine = page(format!("?user_id={id}")).await;
    let kinds: Vec<&str> = mine.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "admin_sessions_ended",
            "login_failed",
            "refresh",
            "login_succeeded",
            "user_created"
        ]
    );
    let admin_event = &mine[0];
    assert_eq!(admin_event["user_id"], id.to_string());
    assert_eq!(
        admin_event["actor_id"],
        app.me(&admin.access).await.json::<Value>().await.unwrap()["id"]
    );
    assert_eq!(mine[2]["session_id"], t.session_id);
    assert_eq!(mine[2]["ip"], "127.0.0.1");
    assert!(mine[2]["occurred_at"].as_str().is_some());

    // Paging: two at a time, following `before`, yields the same events.
    let first = page(format!("?user_id={id}&limit=2")).await;
    assert_eq!(first, mine[..2]);
    let before = first[1]["id"].as_i64().unwrap();
    let second = page(format!("?user_id={id}&limit=2&before={before}")).await;
    assert_eq!(second, mine[2..4]);
    let at = mine[3]["occurred_at"].as_str().unwrap().replace('+', "%2B");
    let by_time = page(format!("?user_id={id}&before={at}")).await;
    assert!(!by_time.is_empty(), "older events exist");
    assert!(
        by_time
            .iter()
            .all(|e| e["occurred_at"].as_str() < mine[3]["occurred_at"].as_str())
    );
    assert_eq!(
        by_time.last(),
        mine.last(),
        "the oldest event is on the page"
    );
    assert!(by_time.len() < mine.len(), "newer events are not");

    for bad in [
        "?limit=0",
        "?limit=1001",
        "?limit=ten",
        "?before=yesterday",
        "?user_id=42",
        "?colour=red",
    ] {
        let res = app
            .call(
                Method::GET,
                &format!("/admin/audit{bad}"),
                &admin.access,
                None,
            )
            .await;
        assert_error(res, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
}
