//! Privilege changes racing logins and refreshes: a token that comes back from a login
//! or refresh in flight during a demotion or a disable carries the new roles or is
//! refused, and never passes `/admin/*`. Made deterministic by holding the login in the
//! hashing queue, and the refresh behind a row lock, while the change is made.

use std::time::Duration;

use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

/// One hashing thread with hashes of a few tens of ms: a burst of logins queues up.
fn slow_hashing() -> tessera::config::Settings {
    let mut settings = test_settings();
    settings.password.memory_kib = 4096;
    settings.password.iterations = 8;
    settings.password.workers = 1;
    settings
}

/// Two admins: the one to be demoted (its email) and the one who acts (its tokens).
async fn two_admins(app: &TestApp) -> (String, uuid::Uuid, Tokens) {
    let actor = app.admin().await;
    let email = app.new_user().await;
    let id = app.user_id(&email).await;
    let mut db = app.db().await;
    sqlx::query(app.pick(
        "UPDATE users SET roles = '{user,admin}' WHERE id = $1::uuid",
        r#"UPDATE users SET roles = '["user","admin"]' WHERE id = $1"#,
    ))
    .bind(id.to_string())
    .execute(&mut db)
    .await
    .unwrap();
    (email, id, actor)
}

async fn patch_user(app: &TestApp, actor: &Tokens, id: uuid::Uuid, body: Value) -> Response {
    app.call(
        Method::PATCH,
        &format!("/admin/users/{id}"),
        &actor.access,
        Some(&body),
    )
    .await
}

/// Runs `change` while a login of `email` waits in a hashing queue filled by other
/// logins; returns the login's response. Panics unless the change finished first.
async fn login_during(app: &TestApp, email: &str, change: impl Future<Output = ()>) -> Response {
    let filler = app.new_user().await;
    let fillers = futures_util::future::join_all((0..30).map(|_| app.login(&filler, "wrong pw")));
    let login = async {
        // Behind the fillers in the queue.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let res = app.login(email, PASSWORD).await;
        (res, std::time::Instant::now())
    };
    let changed = async {
        // After the login has read the user and queued its hash.
        tokio::time::sleep(Duration::from_millis(120)).await;
        change.await;
        std::time::Instant::now()
    };
    let (_, (res, login_done), change_done) = tokio::join!(fillers, login, changed);
    assert!(
        change_done < login_done,
        "the change must land while the login is in flight"
    );
    res
}

/// A token from a racing login or refresh: refused, or carrying no admin role, and in
/// any case not accepted at an admin route.
async fn assert_not_admin(app: &TestApp, access: &str) {
    let res = app.call(Method::GET, "/admin/audit", access, None).await;
    assert!(
        matches!(
            res.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ),
        "a demoted admin's racing token passed /admin: {}",
        res.status()
    );
    let me = app.me(access).await;
    if me.status() == StatusCode::OK {
        let body: Value = me.json().await.unwrap();
        assert!(
            !body["roles"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "admin"),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_in_flight_during_a_demotion_never_yields_an_admin_token() {
    let app = spawn_app_with(slow_hashing()).await;
    let (email, id, actor) = two_admins(&app).await;
    let res = login_during(&app, &email, async {
        let res = patch_user(&app, &actor, id, json!({"roles": ["user"]})).await;
        assert_eq!(res.status(), StatusCode::OK);
    })
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let tokens = Tokens::from_body(res.json().await.unwrap());
    assert_not_admin(&app, &tokens.access).await;
    // The session goes on: its next refresh carries the new roles.
    let next = app.refresh_ok(&tokens.refresh).await;
    assert_eq!(app.me(&next.access).await.status(), StatusCode::OK);
    assert_not_admin(&app, &next.access).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_in_flight_during_a_disable_is_refused() {
    let app = spawn_app_with(slow_hashing()).await;
    let (email, id, actor) = two_admins(&app).await;
    let res = login_during(&app, &email, async {
        let res = patch_user(&app, &actor, id, json!({"disabled": true})).await;
        assert_eq!(res.status(), StatusCode::OK);
    })
    .await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
}

/// Holds the row lock that `select_for_update` (with `$1` = the session id) takes, as a
/// slow transaction would, until the returned sender is used or dropped. SQLite has no
/// row locks: there it holds the database's write lock (`BEGIN IMMEDIATE` from another
/// connection, as `tessera backup` or a second process would), which every write waits
/// for.
async fn hold_lock(
    app: &TestApp,
    select_for_update: &'static str,
    session: &str,
) -> tokio::sync::oneshot::Sender<()> {
    use sqlx::Connection;
    let mut db = app.db().await;
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let sid = session.to_owned();
    let sqlite = app.sqlite();
    tokio::spawn(async move {
        if sqlite {
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut db)
                .await
                .unwrap();
            locked_tx.send(()).unwrap();
            let _ = release_rx.await;
            sqlx::raw_sql("ROLLBACK").execute(&mut db).await.unwrap();
            return;
        }
        let mut tx = db.begin().await.unwrap();
        sqlx::query(select_for_update)
            .bind(sid)
            .execute(&mut *tx)
            .await
            .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.await;
        tx.rollback().await.unwrap();
    });
    locked_rx.await.unwrap();
    release_tx
}

const SESSION_ROW: &str = "SELECT 1 FROM sessions WHERE id = $1::uuid FOR UPDATE";
const TOKEN_ROWS: &str = "SELECT 1 FROM refresh_tokens WHERE session_id = $1::uuid FOR UPDATE";

/// `POST /refresh` with `token`, running on its own (it may be stalled by a lock).
fn refresh_in_background(app: &TestApp, token: &str) -> tokio::task::JoinHandle<Response> {
    let (client, url) = (app.client.clone(), app.url("/refresh"));
    let body = json!({"refresh_token": token});
    tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_in_flight_during_a_demotion_never_yields_an_admin_token() {
    // Stalls the refresh on a row lock; SQLite has none (one writer at a time orders
    // the two instead).
    crate::shared_backend_only!();
    let app = spawn_app().await;
    let (email, id, actor) = two_admins(&app).await;
    let victim = app.login_ok(&email).await;
    let release = hold_lock(&app, SESSION_ROW, &victim.session_id).await;
    let refresh = refresh_in_background(&app, &victim.refresh);
    // The refresh is now stalled on the row lock; the demotion does not touch sessions.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = patch_user(&app, &actor, id, json!({"roles": ["user"]})).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        !refresh.is_finished(),
        "the refresh must still be in flight"
    );
    release.send(()).unwrap();
    let res = refresh.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let tokens = Tokens::from_body(res.json().await.unwrap());
    assert_not_admin(&app, &tokens.access).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_in_flight_during_a_disable_yields_no_usable_token() {
    crate::shared_backend_only!(); // a row lock, as above
    let app = spawn_app().await;
    let (email, id, actor) = two_admins(&app).await;
    let victim = app.login_ok(&email).await;
    let release = hold_lock(&app, SESSION_ROW, &victim.session_id).await;
    let refresh = refresh_in_background(&app, &victim.refresh);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Disabling ends the sessions, so it waits for the same lock as the refresh.
    let disable = tokio::spawn({
        let (client, url, token) = (
            app.client.clone(),
            app.url(&format!("/admin/users/{id}")),
            actor.access.clone(),
        );
        async move {
            client
                .patch(url)
                .bearer_auth(token)
                .json(&json!({"disabled": true}))
                .send()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();
    assert_eq!(disable.await.unwrap().status(), StatusCode::OK);
    let res = refresh.await.unwrap();
    if res.status() == StatusCode::OK {
        let tokens = Tokens::from_body(res.json().await.unwrap());
        assert_invalid_token(app.me(&tokens.access).await).await;
        assert_invalid_grant(app.refresh(&tokens.refresh).await, "revoked").await;
    } else {
        assert_invalid_grant(res, "revoked").await;
    }
    assert_invalid_token(app.me(&victim.access).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_stalled_longer_than_the_grace_window_still_gives_a_second_tab_the_same_successor()
 {
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let release = hold_lock(&app, TOKEN_ROWS, &t.session_id).await;
    let first_tab = refresh_in_background(&app, &t.refresh);
    // Stalled for twice the grace window.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    release.send(()).unwrap();
    let first = first_tab.await.unwrap();
    let second = app.refresh(&t.refresh).await;
    assert_one_successor(vec![first, second]).await;
}

#[tokio::test]
async fn a_statement_stalled_past_the_statement_timeout_answers_503_and_the_session_survives() {
    crate::shared_backend_only!(); // PostgreSQL's statement_timeout and row locks
    let mut settings = test_settings();
    settings.database.statement_timeout_ms = 500;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let release = hold_lock(&app, TOKEN_ROWS, &t.session_id).await;
    let res = tokio::time::timeout(Duration::from_secs(3), app.refresh(&t.refresh))
        .await
        .expect("a stalled statement must not hold the request");
    assert_error(
        res,
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
    )
    .await;
    release.send(()).unwrap();
    // Nothing was rotated: the same token works once the lock is gone.
    eventually("the refresh token works again", || async {
        app.refresh(&t.refresh).await.status() == StatusCode::OK
    })
    .await;
}
