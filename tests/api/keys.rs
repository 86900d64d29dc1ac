use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

/// The real `tessera` binary, configured like the test's server.
pub fn cli(app: &TestApp) -> Command {
    use secrecy::ExposeSecret;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.env("TESSERA__KEYS__DIR", keys_dir(app))
        .env(
            "TESSERA__DATABASE__URL",
            app.settings.database.url.expose_secret(),
        )
        .env("TESSERA__PASSWORD__MEMORY_KIB", "256")
        .env("TESSERA__PASSWORD__ITERATIONS", "1")
        .env("TESSERA__PASSWORD__ALLOW_WEAK", "true")
        .env("TESSERA__LOG__LEVEL", "warn");
    cmd
}

/// Runs `tessera args...` and asserts it succeeded.
pub fn tessera(app: &TestApp, args: &[&str]) -> std::process::Output {
    let out = cli(app).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tessera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn jwks_kids(app: &TestApp) -> Vec<String> {
    let body = app.jwks().await;
    body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

pub fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_keeps_old_tokens_valid_and_new_tokens_verify() {
    let mut settings = test_settings();
    settings.keys.reload_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let before = app.login_ok(&email).await;
    let old_kid = kid_of(&before.access);

    let out = tessera(&app, &["keys", "rotate", "--now"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("new signing key"));
    eventually("the server publishes the new key", || async {
        jwks_kids(&app).await.len() == 2
    })
    .await;

    let after = app.login_ok(&email).await;
    let new_kid = kid_of(&after.access);
    assert_ne!(new_kid, old_kid, "new tokens are signed with the new key");
    assert_eq!(
        app.me(&before.access).await.status(),
        StatusCode::OK,
        "old tokens stay valid"
    );
    assert_eq!(app.me(&after.access).await.status(), StatusCode::OK);
    let kids = jwks_kids(&app).await;
    assert!(kids.contains(&old_kid) && kids.contains(&new_kid));

    let listing = String::from_utf8_lossy(&tessera(&app, &["keys", "list"]).stdout).to_string();
    assert!(
        listing.contains(&new_kid) && listing.contains("active"),
        "{listing}"
    );
    assert!(listing.contains("retiring"), "{listing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_key_file_ends_its_tokens_even_those_already_accepted() {
    let mut settings = test_settings();
    settings.keys.reload_secs = 1;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    let before = app.login_ok(&email).await;
    assert_eq!(app.me(&before.access).await.status(), StatusCode::OK);
    let old_kid = kid_of(&before.access);

    tessera(&app, &["keys", "rotate", "--now"]);
    eventually("the server publishes the new key", || async {
        jwks_kids(&app).await.len() == 2
    })
    .await;
    let after = app.login_ok(&email).await;
    assert_eq!(app.me(&before.access).await.status(), StatusCode::OK);

    // An operator who believes the old key leaked deletes it.
    std::fs::remove_file(keys_dir(&app).join(format!("{old_kid}.json"))).unwrap();
    eventually("the server drops the old key", || async {
        jwks_kids(&app).await == [kid_of(&after.access)]
    })
    .await;
    assert_invalid_token(app.me(&before.access).await).await;
    assert_eq!(app.me(&after.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn keys_survive_a_restart() {
    let settings = test_settings();
    let first = spawn_app_with(settings.clone()).await;
    let email = first.new_user().await;
    let token = first.login_ok(&email).await;
    let kids = jwks_kids(&first).await;
    let second = restart(first, &settings).await;
    assert_eq!(kids, jwks_kids(&second).await);
    assert_eq!(second.me(&token.access).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn keys_generate_is_idempotent_and_key_files_are_private() {
    let app = spawn_app().await;
    let out = tessera(&app, &["keys", "generate"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists"));
    for entry in std::fs::read_dir(keys_dir(&app)).unwrap() {
        let meta = entry.unwrap().metadata().unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077,
            0
        );
    }
}

#[tokio::test]
async fn the_cli_creates_users_that_can_log_in_and_a_first_admin() {
    use std::io::Write;
    let app = spawn_app().await;
    let mut child = cli(&app)
        .args([
            "user",
            "create",
            "--email",
            "admin@example.com",
            "--role",
            "admin",
            "--role",
            "user",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens = app.login_ok("admin@example.com").await;
    let me: Value = app.me(&tokens.access).await.json().await.unwrap();
    assert_eq!(me["roles"], serde_json::json!(["admin", "user"]));
    // Role names are checked as the admin API checks them, before any prompt.
    let out = cli(&app)
        .args([
            "user",
            "create",
            "--email",
            "x@example.com",
            "--role",
            "has space",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role"));
    // The first admin can use the admin routes.
    let res = app
        .call(reqwest::Method::GET, "/admin/audit", &tokens.access, None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn other_algorithms_can_be_configured() {
    for alg in ["EdDSA", "RS256", "HS256"] {
        let mut settings = test_settings();
        settings.tokens.algorithm = alg.into();
        let app = spawn_app_with(settings).await;
        let email = app.new_user().await;
        let t = app.login_ok(&email).await;
        assert_eq!(
            format!("{:?}", jsonwebtoken::decode_header(&t.access).unwrap().alg),
            alg
        );
        assert_eq!(app.me(&t.access).await.status(), StatusCode::OK, "{alg}");
        let kids = jwks_kids(&app).await;
        assert_eq!(
            kids.is_empty(),
            alg == "HS256",
            "HMAC keys are never published"
        );
    }
}

fn run_cli(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .current_dir(cwd)
        .env_remove("TESSERA__KEYS__DIR")
        .env("TESSERA__LOG__LEVEL", "warn")
        .output()
        .unwrap()
}

fn out_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_relative_keys_dir_is_resolved_against_the_config_file_and_printed_absolute() {
    let root = std::env::temp_dir().join(format!("tessera-test-keys-cfg-{}", uuid::Uuid::new_v4()));
    let etc = root.join("etc");
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = etc.join("tessera.toml");
    std::fs::write(&config, "[keys]\ndir = \"keys\"\n").unwrap();
    let config = config.display().to_string();
    for args in [
        ["--config", &config, "keys", "generate"],
        ["--config", &config, "keys", "rotate"],
    ] {
        let out = run_cli(&args, &elsewhere);
        assert!(out.status.success(), "{}", out_text(&out));
        let expected = etc.join("keys").display().to_string();
        assert!(out_text(&out).contains(&expected), "{}", out_text(&out));
    }
    assert_eq!(std::fs::read_dir(etc.join("keys")).unwrap().count(), 2);
    assert!(
        !elsewhere.join("keys").exists(),
        "nothing written where the CLI ran"
    );
    let out = run_cli(&["--config", &config, "keys", "list"], &elsewhere);
    assert!(out_text(&out).contains(&format!("keys.dir: {}", etc.join("keys").display())));
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn key_directories_and_files_open_to_others_or_owned_by_another_user_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let root =
        std::env::temp_dir().join(format!("tessera-test-keys-perm-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join("keys");
    let dir_s = dir.display().to_string();
    let keys = |cmd: &str| {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["keys", cmd])
            .env("TESSERA__KEYS__DIR", &dir)
            .env("TESSERA__LOG__LEVEL", "warn")
            .output()
            .unwrap()
    };
    assert!(keys("generate").status.success());
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let file_s = file.display().to_string();

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = keys("list");
    assert!(!out.status.success());
    assert!(
        out_text(&out).contains(&format!("chmod 700 {dir_s}")),
        "{}",
        out_text(&out)
    );
    let out = keys("rotate");
    assert!(!out.status.success(), "rotate must refuse too");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = keys("list");
    assert!(!out.status.success());
    assert!(
        out_text(&out).contains(&format!("chmod 600 {file_s}")),
        "{}",
        out_text(&out)
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(keys("list").status.success());

    // Owned by another user (root can hand it to nobody to try).
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .ok()
        == Some(0);
    if is_root {
        let chown = Command::new("chown")
            .args(["nobody", &file_s])
            .status()
            .unwrap();
        assert!(chown.success());
        let out = keys("list");
        assert!(!out.status.success());
        assert!(
            out_text(&out).contains(&format!("chown 0 {file_s}")),
            "{}",
            out_text(&out)
        );
    } else {
        eprintln!("ownership case skipped: needs root to give a file away");
    }
    std::fs::remove_dir_all(root).unwrap();
}

#[tokio::test]
async fn the_server_refuses_to_start_on_a_key_directory_open_to_others() {
    use std::os::unix::fs::PermissionsExt;
    let settings = test_settings();
    std::fs::create_dir_all(&settings.keys.dir).unwrap();
    std::fs::set_permissions(&settings.keys.dir, std::fs::Permissions::from_mode(0o775)).unwrap();
    let err = match tessera::startup::Application::build(settings.clone()).await {
        Ok(_) => panic!("the server started on a group-writable keys.dir"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("chmod 700"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_is_published_ahead_so_a_cached_jwks_never_meets_an_unknown_kid() {
    crate::shared_backend_only!(); // two instances sharing keys.dir
    let mut settings = test_settings();
    settings.keys.reload_secs = 1;
    settings.keys.jwks_max_age_secs = 1;
    settings.keys.publish_ahead_secs = 8;
    let first = spawn_app_with(settings.clone()).await;
    let second = spawn_app_with(settings.clone()).await;
    let email = first.new_user().await;
    let old_kid = kid_of(&first.login_ok(&email).await.access);

    let rotated = std::time::Instant::now();
    let out = cli(&first)
        .env("TESSERA__KEYS__PUBLISH_AHEAD_SECS", "8")
        .args(["keys", "rotate"])
        .output()
        .unwrap();
    let said = out_text(&out);
    assert!(out.status.success(), "{said}");
    let new_kid = said
        .split("new signing key ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_owned();
    // Both instances publish it within a reload, and still sign with the old key.
    for app in [&first, &second] {
        eventually("the new key is published", || async {
            jwks_kids(app).await.contains(&new_kid)
        })
        .await;
    }
    // A verifier that cached the JWKS now, and never refetches.
    let jwks: tessera_verify::JwkSet = serde_json::from_value(first.jwks().await).unwrap();
    let config = tessera_verify::Config::new(
        &first.settings.tokens.issuer,
        &first.settings.tokens.audience,
    );
    let verifier = tessera_verify::Verifier::with_keys(config, &jwks).unwrap();
    let listing = out_text(&tessera(&first, &["keys", "list"]));
    assert!(
        rotated.elapsed() < Duration::from_secs(6),
        "the test ran too slowly"
    );
    for app in [&first, &second] {
        assert_eq!(kid_of(&app.login_ok(&email).await.access), old_kid);
    }
    assert!(
        listing.contains("next") && listing.contains("active"),
        "{listing}"
    );

    // Then both switch by the clock, and the cached JWKS verifies every token.
    for app in [&first, &second] {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let token = app.login_ok(&email).await.access;
            verifier.verify_local(&token).unwrap();
            if kid_of(&token) == new_kid {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never switched");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        rotated.elapsed() >= Duration::from_secs(6),
        "switched before its time"
    );
    let listing = out_text(&tessera(&first, &["keys", "list"]));
    assert!(listing.contains("retiring"), "{listing}");
}
