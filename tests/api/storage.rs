//! Constant storage per session: however often a session refreshes, it keeps the rows
//! of its current token, the previous one and those rotated within the grace window,
//! and a token of the chain older than those is still recognised as reuse.

use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::*;

/// Rows the session `sid` holds in `refresh_tokens`, and the bytes of their values
/// and of its `sessions` row's values (tuple headers and alignment aside, which differ
/// by a few bytes with where a tuple sits, not with how much it holds).
async fn footprint(app: &TestApp, sid: &str) -> (i64, i64) {
    let mut db = app.db().await;
    sqlx::query_as(app.pick(
        "SELECT (SELECT count(*) FROM refresh_tokens WHERE session_id = $1::uuid),
                (SELECT coalesce(sum(pg_column_size(token_hash) + pg_column_size(session_id)
                        + pg_column_size(created_at) + coalesce(pg_column_size(rotated_at), 0)
                        + coalesce(pg_column_size(successor_hash), 0)
                        + coalesce(pg_column_size(successor_sealed), 0)), 0)
                 FROM refresh_tokens WHERE session_id = $1::uuid)::int8
              + (SELECT sum(pg_column_size(v)) FROM sessions s,
                        LATERAL (VALUES (pg_column_size(s.id)), (pg_column_size(s.user_id)),
                                        (pg_column_size(s.expires_at)),
                                        (pg_column_size(s.last_used_at)),
                                        (pg_column_size(s.generation)),
                                        (pg_column_size(s.chain_hash)),
                                        (pg_column_size(s.last_ip)),
                                        (pg_column_size(s.last_user_agent))) AS c(v)
                 WHERE s.id = $1::uuid)::int8",
        // SQLite stores an integer in up to 8 bytes by its value: counted as 8, so
        // that only what the rows hold is compared.
        "SELECT (SELECT count(*) FROM refresh_tokens WHERE session_id = $1),
                (SELECT coalesce(sum(length(token_hash) + length(session_id) + 8
                        + (CASE WHEN rotated_at IS NULL THEN 0 ELSE 8 END)
                        + coalesce(length(successor_hash), 0)
                        + coalesce(length(successor_sealed), 0)), 0)
                 FROM refresh_tokens WHERE session_id = $1)
              + (SELECT length(id) + length(user_id) + 8 + 8 + 8
                        + coalesce(length(chain_hash), 0) + coalesce(length(last_ip), 0)
                        + coalesce(length(last_user_agent), 0)
                 FROM sessions WHERE id = $1)",
    ))
    .bind(sid)
    .fetch_one(&mut db)
    .await
    .unwrap()
}

fn short_grace() -> tessera::config::Settings {
    let mut settings = test_settings();
    settings.tokens.refresh_reuse_grace_secs = 1;
    settings
}

/// `n` refreshes in a row, then a pause past the grace window and one more, so that
/// what is measured does not depend on how fast the loop ran (tokens rotated within
/// the window are kept for it).
async fn refresh_times(app: &TestApp, mut current: Tokens, n: usize) -> (Tokens, Vec<Tokens>) {
    let mut seen = Vec::new();
    for _ in 0..n {
        seen.push(current.clone());
        current = app.refresh_ok(&current.refresh).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    seen.push(current.clone());
    current = app.refresh_ok(&current.refresh).await;
    (current, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_refreshes_leave_a_session_as_large_as_two() {
    let app = spawn_app_with(short_grace()).await;
    let email = app.new_user().await;
    let a = app.login_ok(&email).await;
    let b = app.login_ok(&email).await;

    let (_, _) = refresh_times(&app, a.clone(), 2).await;
    let after_two = footprint(&app, &a.session_id).await;
    let (current, seen) = refresh_times(&app, b.clone(), 1000).await;
    let after_thousand = footprint(&app, &b.session_id).await;
    assert_eq!(after_thousand, after_two, "(rows, bytes)");
    assert_eq!(after_two.0, 2, "the current and the previous token");

    // Every token of the chain is still known for what it is: the oldest, long gone
    // from the table, is reuse, and ends the session.
    assert_invalid_grant(app.refresh(&seen[0].refresh).await, "reused").await;
    assert_invalid_grant(app.refresh(&current.refresh).await, "revoked").await;
    assert_invalid_token(app.me(&current.access).await).await;
}

/// The rotation's pruning (the session's tokens rotated before the grace window) finds
/// them through an index on (session_id, rotated_at), not by reading every token the
/// session keeps: a session refreshed in a loop keeps every token of the last window,
/// and with an index on session_id alone each of its rotations read them all, slower as
/// the window filled (docs/performance.md, "The pruning scan").
#[tokio::test]
async fn the_pruning_finds_old_tokens_through_an_index() {
    use sqlx::Row;
    let app = spawn_app().await;
    let mut db = app.db().await;
    if !app.sqlite() {
        // A test's table is tiny: left to itself the planner would rather read it all.
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut db)
            .await
            .unwrap();
    }
    let column = app.pick("QUERY PLAN", "detail");
    let plan: Vec<String> = sqlx::query(app.pick(
        "EXPLAIN DELETE FROM refresh_tokens
         WHERE session_id = '00000000-0000-0000-0000-000000000000'::uuid
           AND token_hash <> '\\x00'::bytea AND rotated_at < now()",
        "EXPLAIN QUERY PLAN DELETE FROM refresh_tokens
         WHERE session_id = '00000000-0000-0000-0000-000000000000'
           AND token_hash <> x'00' AND rotated_at < 0",
    ))
    .fetch_all(&mut db)
    .await
    .unwrap()
    .iter()
    .map(|row| row.get::<String, _>(column))
    .collect();
    let by_index = if app.sqlite() {
        let wanted = "refresh_tokens_session_id_idx (session_id=? AND rotated_at<?)";
        plan.iter().any(|line| line.contains(wanted))
    } else {
        plan.iter()
            .any(|line| line.contains("Index Cond") && line.contains("rotated_at <"))
    };
    assert!(by_index, "{plan:#?}");
}

#[tokio::test]
async fn an_old_token_with_another_chains_secret_is_unknown_and_ends_nothing() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let app = spawn_app_with(short_grace()).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let (current, seen) = refresh_times(&app, t, 3).await;
    // Someone who knows the session id (downstream APIs do) forges an old generation.
    let mut raw = URL_SAFE_NO_PAD.decode(&seen[0].refresh).unwrap();
    raw[24] ^= 0xff; // the chain secret
    let forged = URL_SAFE_NO_PAD.encode(raw);
    assert_invalid_grant(app.refresh(&forged).await, "unknown").await;
    let res = app.post_form("/revoke", &[("token", &forged)]).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(app.me(&current.access).await.status(), StatusCode::OK);
    app.refresh_ok(&current.refresh).await;
}

#[tokio::test]
async fn revoking_an_old_token_of_the_chain_ends_its_session() {
    let app = spawn_app_with(short_grace()).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let (current, seen) = refresh_times(&app, t, 3).await;
    let res = app
        .post_form("/revoke", &[("token", &seen[0].refresh)])
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_invalid_grant(app.refresh(&current.refresh).await, "revoked").await;
}

#[tokio::test]
async fn with_audit_refresh_off_refreshes_write_no_audit_rows() {
    let mut settings = test_settings();
    settings.audit.refresh = false;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let mut t = app.login_ok(&email).await;
    for _ in 0..5 {
        t = app.refresh_ok(&t.refresh).await;
    }
    let kinds = app.audit_kinds().await;
    assert!(!kinds.iter().any(|k| k == "refresh"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "login_succeeded"));
    // On by default.
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    app.refresh_ok(&t.refresh).await;
    assert!(app.audit_kinds().await.iter().any(|k| k == "refresh"));
}

/// Sessions from before chain tokens hold tokens of the first format (43 characters,
/// random only): they keep refreshing, with successors of that format.
#[tokio::test]
async fn tokens_of_the_first_format_still_refresh() {
    use tessera::auth::refresh_token::RefreshToken;
    let app = spawn_app().await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let legacy = RefreshToken::generate();
    let mut db = app.db().await;
    let sid = t.session_id.as_str();
    sqlx::query("UPDATE refresh_tokens SET token_hash = $2 WHERE CAST(session_id AS TEXT) = $1")
        .bind(sid)
        .bind(legacy.hash())
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("UPDATE sessions SET chain_hash = NULL WHERE CAST(id AS TEXT) = $1")
        .bind(sid)
        .execute(&mut db)
        .await
        .unwrap();
    assert_invalid_grant(app.refresh(&t.refresh).await, "unknown").await;
    let next = app.refresh_ok(legacy.expose()).await;
    assert_eq!(next.refresh.len(), 43);
    assert_eq!(next.session_id, t.session_id);
    let again = app.refresh_ok(&next.refresh).await;
    assert_eq!(app.me(&again.access).await.status(), StatusCode::OK);
}
