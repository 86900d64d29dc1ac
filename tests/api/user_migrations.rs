//! User migrations (`users.migrations_dir`) through the real `tessera migrate`, beside a
//! running server: apply, re-apply (nothing), an edited file, a failing operation that
//! rolls its whole file back, `--dry-run`, ordering, and what applied changes do to
//! tokens (a disabled user's access token fails at once).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tessera::config::EmailVerification;
use tessera::domain::Password;

use crate::cli_users::configured;
use crate::helpers::{PASSWORD, TestApp, eventually, spawn_app_with};
use crate::smtp::{Options, SmtpServer, link, mailing};

fn migrate(app: &TestApp, dir: &Path, args: &[&str]) -> Output {
    configured(app)
        .env("TESSERA__USERS__MIGRATIONS_DIR", dir)
        .arg("migrate")
        .args(args)
        .output()
        .unwrap()
}

fn succeeds(out: Output) -> (String, String) {
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

fn fails(out: Output) -> String {
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "succeeded: {stderr}");
    stderr
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-users-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn roles(app: &TestApp, email: &str) -> Value {
    app.login_ok(email).await.claims()["roles"].clone()
}

#[tokio::test]
async fn user_migrations_apply_once_in_order_and_edited_files_are_refused() {
    let server = SmtpServer::start(Options::default()).await;
    let app = spawn_app_with(mailing(&server, EmailVerification::Off)).await;
    let hash = app
        .state
        .auth
        .hasher
        .hash(Password::parse_new(PASSWORD.to_owned()).unwrap())
        .await
        .unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (ops, bob, carol) = (
        format!("ops-{tag}@example.com"),
        format!("bob-{tag}@example.com"),
        format!("carol-{tag}@example.com"),
    );
    let dir = scratch_dir();
    write(
        &dir,
        "0001_staff.toml",
        &format!(
            r#"
[[operation]]
op = "create"
email = "{ops}"
password_hash = "{hash}"
roles = ["admin", "user"]

[[operation]]
op = "create"
email = "{bob}"
password_hash = "{hash}"
"#
        ),
    );
    write(
        &dir,
        "0002_editors.toml",
        &format!(
            r#"
[[operation]]
op = "grant"
email = "{bob}"
role = "editor"

[[operation]]
op = "invite"
email = "{carol}"
roles = ["user", "editor"]
"#
        ),
    );
    write(&dir, "README.md", "not a migration");

    let (stdout, _) = succeeds(migrate(&app, &dir, &[]));
    assert!(stdout.contains("applied 0001_staff.toml"), "{stdout}");
    assert!(
        stdout.contains(&format!("grant editor to {bob}")),
        "{stdout}"
    );
    assert_eq!(roles(&app, &ops).await, json!(["admin", "user"]));
    assert_eq!(
        roles(&app, &bob).await,
        json!(["editor", "user"]),
        "kept sorted"
    );
    // The invitation went through the outbox; its link sets Carol's password.
    let mail = server.wait_for(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!(
        mail.header("X-Test-Envelope-To").as_deref(),
        Some(carol.as_str())
    );
    let (_, token) = link(&mail);
    let res = app
        .post_json(
            "/password/reset",
            &json!({"token": token, "new_password": PASSWORD}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(roles(&app, &carol).await, json!(["editor", "user"]));
    let kinds = app.audit_kinds().await;
    let applied = kinds
        .iter()
        .filter(|k| *k == "user_migration_applied")
        .count();
    assert_eq!(applied, 2, "{kinds:?}");

    // Again: nothing to do, nothing done.
    let (_, stderr) = succeeds(migrate(&app, &dir, &[]));
    assert!(stderr.contains("up to date"), "{stderr}");
    let kinds = app.audit_kinds().await;
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "user_migration_applied")
            .count(),
        2
    );

    // An applied file edited afterwards is an error that names it.
    let first = std::fs::read_to_string(dir.join("0001_staff.toml")).unwrap();
    write(&dir, "0001_staff.toml", &format!("{first}\n# a comment\n"));
    let said = fails(migrate(&app, &dir, &[]));
    assert!(
        said.contains("0001_staff.toml") && said.contains("edited"),
        "{said}"
    );
    write(&dir, "0001_staff.toml", &first);

    // A new file numbered below an applied one is refused.
    write(&dir, "0000_early.toml", "");
    let said = fails(migrate(&app, &dir, &[]));
    assert!(said.contains("0000_early.toml"), "{said}");
    std::fs::remove_file(dir.join("0000_early.toml")).unwrap();
    // So is a name that is not NNNN_name.toml, and a file that does not parse.
    write(&dir, "third.toml", "");
    assert!(fails(migrate(&app, &dir, &[])).contains("third.toml"));
    std::fs::remove_file(dir.join("third.toml")).unwrap();
    write(&dir, "0003_bad.toml", "[[operation]]\nop = \"promote\"\n");
    assert!(fails(migrate(&app, &dir, &[])).contains("0003_bad.toml"));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_failing_operation_rolls_back_its_whole_file_and_dry_run_changes_nothing() {
    let app = spawn_app_with(crate::helpers::test_settings()).await;
    let admin = app.admin().await;
    let admin_email = app.me(&admin.access).await.json::<Value>().await.unwrap()["email"]
        .as_str()
        .unwrap()
        .to_owned();
    let bob = app.new_user().await;
    let dir = scratch_dir();

    // The second operation fails: the first is undone and the file is not recorded.
    write(
        &dir,
        "0001_mixed.toml",
        &format!(
            r#"
[[operation]]
op = "grant"
email = "{bob}"
role = "auditor"

[[operation]]
op = "delete"
email = "nobody-{}@example.com"
"#,
            uuid::Uuid::new_v4().simple()
        ),
    );
    let said = fails(migrate(&app, &dir, &[]));
    assert!(
        said.contains("0001_mixed.toml, operation 2") && said.contains("no user"),
        "{said}"
    );
    assert_eq!(roles(&app, &bob).await, json!(["user"]));
    // The last enabled admin cannot be removed by a file either.
    write(
        &dir,
        "0001_mixed.toml",
        &format!("[[operation]]\nop = \"revoke\"\nemail = \"{admin_email}\"\nrole = \"admin\"\n"),
    );
    assert!(fails(migrate(&app, &dir, &[])).contains("last enabled admin"));

    // Fixed, tried with --dry-run: printed, not applied.
    write(
        &dir,
        "0001_mixed.toml",
        &format!("[[operation]]\nop = \"disable\"\nemail = \"{bob}\"\n"),
    );
    let bob_tokens = app.login_ok(&bob).await;
    let (stdout, stderr) = succeeds(migrate(&app, &dir, &["--dry-run"]));
    assert!(
        stdout.contains(&format!("would apply 0001_mixed.toml:\n  disable {bob}")),
        "{stdout}"
    );
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(app.me(&bob_tokens.access).await.status(), StatusCode::OK);
    app.login_ok(&bob).await;

    // Applied for real: Bob's access token fails at once (through Redis, or within a
    // second through the embedded database), his session is over, he cannot log in.
    succeeds(migrate(&app, &dir, &[]));
    eventually("the disabled user's access token fails", || async {
        app.call(reqwest::Method::GET, "/sessions", &bob_tokens.access, None)
            .await
            .status()
            == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(
        app.refresh(&bob_tokens.refresh).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.login(&bob, PASSWORD).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (_, stderr) = succeeds(migrate(&app, &dir, &["--dry-run"]));
    assert!(stderr.contains("up to date"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_examples_are_valid_user_migrations() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/user-migrations");
    let files = tessera::auth::user_migrations::read_dir(&dir).unwrap();
    let versions: Vec<i64> = files.iter().map(|f| f.version).collect();
    assert_eq!(versions, [1, 2, 3]);
    let pending = tessera::auth::user_migrations::pending(&files, &[]).unwrap();
    assert_eq!(pending.len(), 3);
    let first = std::fs::read_to_string(dir.join("0001_first_admin.toml")).unwrap();
    let hash = first
        .lines()
        .find_map(|l| l.strip_prefix("password_hash = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    assert!(tessera::auth::password::is_argon2_hash(hash));
}
