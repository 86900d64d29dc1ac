//! The embedded default as a new user meets it: `tessera serve` with no configuration
//! runs on SQLite in `./data` with revocations in process, one instance per data
//! directory, nothing answered lost when the process is killed; `tessera backup` copies
//! the live database while refreshes run.
//!
//! These tests choose SQLite themselves, so they run once, in the PostgreSQL + Redis run
//! of `scripts/test.sh` (the embedded run runs the whole suite on SQLite anyway).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

/// `tessera serve` in `dir` with no configuration at all but free ports (8080 and 9464
/// may be taken on the machine) and JSON logs; returns the child and its log file.
fn zero_config(dir: &Path) -> (Child, PathBuf) {
    let log = dir.join(format!("log-{}.json", uuid::Uuid::new_v4().simple()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TESSERA_") || name == "RUST_LOG" {
            cmd.env_remove(name);
        }
    }
    let child = cmd
        .current_dir(dir)
        .env("TESSERA__SERVER__PORT", "0")
        .env("TESSERA__METRICS__LISTEN", "127.0.0.1:0")
        .env("TESSERA__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

async fn address(log: &Path) -> String {
    listening_at(log).await
}

async fn post(base: &str, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn refresh(base: &str, token: &str) -> reqwest::Response {
    post(base, "/refresh", json!({"refresh_token": token})).await
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tessera-test-data-{}_{name}-{}",
        std::env::var("TESSERA_TEST_RUN").unwrap_or_else(|_| "r0".into()),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_configuration_the_server_runs_embedded_in_data_alone_and_loses_nothing_on_a_kill()
{
    crate::shared_backend_only!(); // runs once (see the module docs)
    let dir = scratch_dir("zero");
    let (mut first, log) = zero_config(&dir);
    let base = address(&log).await;

    // Created on first start: the database in data/, the directory private, keys beside.
    let data = dir.join("data");
    assert!(data.join("tessera.db").is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data/ is private");
    assert!(
        std::fs::read_dir(data.join("keys")).unwrap().count() > 0,
        "a signing key beside the database"
    );
    // One line says this is single-instance mode and how to switch.
    let lines: Vec<Value> = json_log(&log)
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("single-instance mode"))
        })
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = lines[0]["message"].as_str().unwrap();
    assert!(
        line.contains("SQLite") && line.contains("tessera copy") && line.contains("redis.url"),
        "{line}"
    );
    let ready: Value = reqwest::get(format!("{base}/health/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ready["redis"].as_str().unwrap().contains("not used"),
        "{ready}"
    );
    assert_eq!(ready["sqlite"], "ok", "{ready}");

    // It works end to end on the production defaults.
    let email = "first@example.com";
    let res = post(
        &base,
        "/users",
        json!({"email": email, "password": PASSWORD}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = post(
        &base,
        "/login",
        json!({"email": email, "password": PASSWORD}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut current = Tokens::from_body(res.json().await.unwrap());
    for _ in 0..20 {
        let res = refresh(&base, &current.refresh).await;
        assert_eq!(res.status(), StatusCode::OK);
        current = Tokens::from_body(res.json().await.unwrap());
    }

    // A second server on the same data directory refuses to start, saying why.
    let (mut second, second_log) = zero_config(&dir);
    let status = tokio::task::spawn_blocking(move || second.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success());
    let said = std::fs::read_to_string(&second_log).unwrap();
    assert!(said.contains("another Tessera instance"), "{said}");

    // Killed at once (no shutdown), then started again: every answered rotation is
    // there, and the session goes on.
    first.kill().unwrap();
    first.wait().unwrap();
    let (mut again, log) = zero_config(&dir);
    let base = address(&log).await;
    let res = refresh(&base, &current.refresh).await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the last answered token rotates"
    );
    let next = Tokens::from_body(res.json().await.unwrap());
    let me = reqwest::Client::new()
        .get(format!("{base}/me"))
        .bearer_auth(&next.access)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    again.kill().unwrap();
    again.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Settings for a server on SQLite (whatever this run's backend), in a fresh directory.
/// The request ids of the audit rows, oldest first.
async fn audit_request_ids(app: &TestApp) -> Vec<Option<String>> {
    let mut db = app.db().await;
    sqlx::query_scalar("SELECT request_id FROM audit_events ORDER BY id")
        .fetch_all(&mut db)
        .await
        .unwrap()
}

fn on_sqlite() -> tessera::config::Settings {
    let mut settings = test_settings();
    let dir = scratch_dir("backup");
    settings.database.url = format!("sqlite://{}/tessera.db", dir.display()).into();
    settings.redis.url = String::new().into();
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_refreshes_run_is_consistent_and_serves_the_chain() {
    crate::shared_backend_only!(); // runs once (see the module docs)
    let settings = on_sqlite();
    let app = spawn_app_with(settings.clone()).await;
    let email = app.new_user().await;
    let first = app.login_ok(&email).await;

    // One chain refreshed in a loop while the backup runs in another process.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chain = {
        let (client, url, stop) = (app.client.clone(), app.url("/refresh"), stop.clone());
        let mut token = first.refresh.clone();
        tokio::spawn(async move {
            let mut issued = vec![token.clone()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let res = client
                    .post(&url)
                    .json(&json!({"refresh_token": token}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                token = Tokens::from_body(res.json().await.unwrap()).refresh;
                issued.push(token.clone());
            }
            issued
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backup = std::env::temp_dir().join(format!(
        "tessera-test-data-{}_copy-{}.db",
        std::env::var("TESSERA_TEST_RUN").unwrap_or_else(|_| "r0".into()),
        uuid::Uuid::new_v4().simple()
    ));
    let out = crate::keys::tessera(&app, &["backup", backup.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("backup written"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let issued = chain.await.unwrap();
    assert!(issued.len() > 5, "refreshes ran during the backup");

    // A second backup onto the same file is refused (nothing overwritten).
    let again = crate::keys::cli(&app)
        .args(["backup", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    app.stop().await;
    let mut restored = settings.clone();
    restored.database.url = format!("sqlite://{}", backup.display()).into();
    let app = spawn_app_with(restored).await;
    let mut db = app.db().await;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    // One snapshot: the session has exactly one unrotated token, one of the chain's.
    let current: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT token_hash FROM refresh_tokens WHERE rotated_at IS NULL")
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(current.len(), 1);
    let token = issued
        .iter()
        .find(|t| tessera::domain::sha256(t.as_bytes()).as_slice() == current[0].as_slice())
        .expect("the backup's current token is one the chain issued");
    assert!(
        token != issued.last().unwrap(),
        "taken while the chain moved on"
    );
    // A server on the backup serves that session on.
    app.refresh_ok(token).await;
    app.login_ok(&email).await;
    std::fs::remove_file(&backup).ok();
}

#[tokio::test]
async fn backup_is_for_the_embedded_database_only() {
    crate::shared_backend_only!(); // the PostgreSQL run's server
    let app = spawn_app().await;
    let out = crate::keys::cli(&app)
        .args(["backup", "/tmp/never-written.db"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("pg_dump"), "{said}");
    assert!(!Path::new("/tmp/never-written.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tessera_copy_moves_everything_to_postgres_and_redis_with_every_user_still_logged_in() {
    crate::shared_backend_only!(); // needs the PostgreSQL and Redis of that run
    // Mail goes to a server that is down for now: the message waits in the outbox.
    let mut smtp = crate::smtp::SmtpServer::start(Default::default()).await;
    smtp.pause().await;
    let mut settings = on_sqlite();
    settings.email.transport = tessera::config::EmailTransport::Smtp;
    settings.email.smtp_url = smtp.url().into();
    settings.email.smtp_ca_file = smtp.ca_file();
    settings.email.retry_base_secs = 1;
    settings.email.retry_max_secs = 1;
    settings.registration.anonymous = true;
    let app = spawn_app_with(settings.clone()).await;
    let email = app.new_user().await;
    // An anonymous user (no email) comes along too.
    let res = app
        .client
        .post(app.url("/users/anonymous"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let guest = crate::helpers::Tokens::from_body(res.json().await.unwrap());
    let res = app
        .post_json("/email/verification", &json!({ "email": email }))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // The link is issued just after the answer (see `after_the_answer`).
    crate::helpers::eventually("the verification message is in the outbox", || async {
        app.state.auth.store.outbox_len().await.unwrap() == 1
    })
    .await;
    let kept = app.login_ok(&email).await;
    let kept = app.refresh_ok(&kept.refresh).await;
    let logged_out = app.login_ok(&email).await;
    let revoked = app.login_ok(&email).await;
    assert_eq!(
        app.logout(&logged_out.access, None).await.status(),
        StatusCode::NO_CONTENT
    );
    let res = app
        .post_form("/revoke", &[("token", &revoked.access)])
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    // A user migration applied on SQLite stays applied after the move.
    let other = app.new_user().await;
    let users_dir =
        crate::helpers::test_data_dir(&format!("users-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&users_dir).unwrap();
    std::fs::write(
        users_dir.join("0001_editor.toml"),
        format!("[[operation]]\nop = \"grant\"\nemail = \"{other}\"\nrole = \"editor\"\n"),
    )
    .unwrap();
    let migrate = |database: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.env("TESSERA__DATABASE__URL", database)
            .env("TESSERA__KEYS__DIR", &settings.keys.dir)
            .env("TESSERA__USERS__MIGRATIONS_DIR", &users_dir)
            .env("TESSERA__LOG__LEVEL", "warn")
            .arg("migrate");
        let out = cmd.output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{said}");
        said
    };
    {
        use secrecy::ExposeSecret;
        let said = migrate(settings.database.url.expose_secret());
        assert!(said.contains("1 user migration(s) applied"), "{said}");
    }
    // A user with a second factor keeps it (the secret sealed, the recovery codes).
    let (guarded, secret, recovery, _) = crate::mfa::with_totp(&app).await;
    let audited = app.audit_kinds().await.len();
    // Every row a request wrote has its id (the user migration's, by the CLI, has none).
    let request_ids = audit_request_ids(&app).await;
    assert!(
        request_ids.iter().filter(|id| id.is_none()).count() <= 1,
        "{request_ids:?}"
    );

    let run = std::env::var("TESSERA_TEST_RUN").unwrap_or_else(|_| "r0".into());
    let target = format!(
        "{}/tessera_test_{run}_{}",
        postgres_base(),
        uuid::Uuid::new_v4().simple()
    );
    let prefix = format!("tessera_test:copy-{}:", uuid::Uuid::new_v4().simple());
    let copy = || {
        use secrecy::ExposeSecret;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.env(
            "TESSERA__DATABASE__URL",
            settings.database.url.expose_secret(),
        )
        .env("TESSERA__LOG__LEVEL", "warn")
        .env("TESSERA_COPY_TO", &target)
        .env("TESSERA__REDIS__KEY_PREFIX", &prefix)
        .args(["copy", "--redis", &redis_url()]);
        cmd.output().unwrap()
    };
    // Not while the server runs: what it wrote afterwards would be lost.
    let out = copy();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));

    let keys = app.settings.keys.dir.clone();
    app.stop().await;
    // The stopped instance's tasks let go of the database within moments.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = copy();
        let busy = String::from_utf8_lossy(&out.stderr).contains("stop it first");
        if !busy || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("users: 4/4"), "progress: {said}");
    assert!(said.contains("mfa_totp: 1/1"), "progress: {said}");
    assert!(
        said.contains("mfa_recovery_codes: 10/10"),
        "progress: {said}"
    );
    assert!(said.contains("sessions: 6/6"), "progress: {said}");
    assert!(said.contains("email_tokens: 1/1"), "progress: {said}");
    assert!(said.contains("outbox: 1/1"), "progress: {said}");
    assert!(said.contains("user_migrations: 1/1"), "progress: {said}");
    assert!(said.contains("written to Redis"), "{said}");

    // The same deployment on PostgreSQL + Redis (the signing keys stay where they are).
    let mut moved = test_settings();
    moved.database.url = target.clone().into();
    moved.redis.url = redis_url().into();
    moved.redis.key_prefix = prefix.clone();
    moved.keys.dir = keys;
    moved.email = settings.email.clone();
    let app = spawn_app_with(moved).await;
    assert!(!app.sqlite());
    // The message written on SQLite goes out from PostgreSQL, and its link works there.
    smtp.resume().await;
    let mail = smtp.wait_for(1, Duration::from_secs(10)).await.remove(0);
    let text = mail.text();
    let token: String = text[text.find("&token=").expect("a link") + 7..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    let res = app
        .post_json("/email/verify", &json!({ "token": token }))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    // A refresh token issued on SQLite rotates on PostgreSQL; its access token works.
    assert_eq!(app.me(&kept.access).await.status(), StatusCode::OK);
    let next = app.refresh_ok(&kept.refresh).await;
    assert_eq!(next.session_id, kept.session_id);
    assert_eq!(app.me(&next.access).await.status(), StatusCode::OK);
    // The anonymous user's session goes on, still without an email, and converts.
    let guest = app.refresh_ok(&guest.refresh).await;
    let me: serde_json::Value = app.me(&guest.access).await.json().await.unwrap();
    assert_eq!(me["email"], serde_json::Value::Null);
    let res = app
        .client
        .post(app.url("/users"))
        .bearer_auth(&guest.access)
        .json(&json!({"email": "guest@example.com", "password": crate::helpers::PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    // What was revoked stays revoked: the ended session, the revoked access token.
    assert_invalid_token(app.me(&logged_out.access).await).await;
    assert_invalid_grant(app.refresh(&logged_out.refresh).await, "revoked").await;
    assert_invalid_token(app.me(&revoked.access).await).await;
    // Passwords, devices and the audit trail came along; new events follow the old.
    app.login_ok(&email).await;
    let kinds = app.audit_kinds().await;
    assert!(
        kinds.len() >= audited + 2,
        "{} then {}",
        audited,
        kinds.len()
    );
    assert_eq!(audit_request_ids(&app).await[..audited], request_ids[..]);

    // The second factor came along: a code from the same secret, and a recovery code.
    let mfa_token = crate::mfa::login_step_one(&app, &guarded).await;
    let code = crate::mfa::totp(&secret, crate::mfa::fresh_step());
    let res = crate::mfa::login_mfa(&app, &mfa_token, json!({ "code": code })).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mfa_token = crate::mfa::login_step_one(&app, &guarded).await;
    let res =
        crate::mfa::login_mfa(&app, &mfa_token, json!({ "recovery_code": recovery[0] })).await;
    assert_eq!(res.status(), StatusCode::OK);

    // The migration is known as applied there: nothing to do.
    let said = migrate(&target);
    assert!(said.contains("user migrations are up to date"), "{said}");
    assert_eq!(
        app.login_ok(&other).await.claims()["roles"],
        json!(["editor", "user"])
    );

    // A second copy into the now used database is refused.
    let out = copy();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds users"));
}

/// The embedded database's "backing service down": another process holds its write
/// lock past the busy timeout (5 s). Writes answer 503, reads go on, and the server is
/// back once the lock is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_by_another_process_gives_503_and_the_server_recovers() {
    crate::shared_backend_only!(); // runs once (see the module docs)
    let app = spawn_app_with(on_sqlite()).await;
    let email = app.new_user().await;
    let t = app.login_ok(&email).await;
    let mut other = app.db().await;
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    assert_unavailable(app.refresh(&t.refresh).await).await;
    assert_eq!(
        app.me(&t.access).await.status(),
        StatusCode::OK,
        "reads go on"
    );
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    // Nothing was lost: the token that failed during the outage still rotates.
    app.refresh_ok(&t.refresh).await;
}
