//! The OpenAPI document against the server, as a client generator reads it:
//! schemathesis (`scripts/services.sh` installs a pinned version in `.dev/schemathesis`)
//! runs every check (`-c all`: status codes, content types, headers and bodies as
//! documented, schema-valid requests accepted and schema-violating ones refused, auth
//! enforced, 405 with `Allow`, ...) over every operation, with a fixed seed, as an
//! admin whose token the run cannot log out (tests/schemathesis/hooks.py logs in for
//! every request). Any failure fails the test with schemathesis's report.

use std::process::Command;

use crate::helpers::*;

/// The schemathesis program: `TESSERA_TEST_SCHEMATHESIS`, else the project's venv.
fn schemathesis() -> Option<std::path::PathBuf> {
    let path = match std::env::var_os("TESSERA_TEST_SCHEMATHESIS") {
        Some(path) => path.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".dev/schemathesis/bin/schemathesis"),
    };
    path.exists().then_some(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_holds_against_the_server() {
    // One backend is enough for the document: the embedded one, the default.
    if !embedded() {
        eprintln!("schemathesis: runs in the embedded half of the suite");
        return;
    }
    let Some(program) = schemathesis() else {
        // scripts/test.sh sets TESSERA_TEST_SCHEMATHESIS_REQUIRED=1 after installing it.
        assert_ne!(
            std::env::var("TESSERA_TEST_SCHEMATHESIS_REQUIRED").as_deref(),
            Ok("1"),
            "schemathesis is not installed (scripts/services.sh installs it)"
        );
        eprintln!("schemathesis is not installed: skipped (scripts/test.sh runs it)");
        return;
    };
    // It loads the machine for half a minute.
    let _turn = HEAVY.lock().await;
    let mut settings = test_settings();
    settings.introspection.clients = vec!["schemathesis:st-client-secret".to_owned().into()];
    settings.introspection.failures_per_minute = 1_000_000;
    settings.registration.anonymous = true;
    let app = spawn_app_with(settings).await;
    let email = app.new_user().await;
    app.make_admin(&email).await;

    let manifest = env!("CARGO_MANIFEST_DIR");
    // Schemathesis keeps a cache (.schemathesis/) in its working directory: not the
    // checkout's.
    let scratch = std::env::temp_dir().join(format!("tessera-st-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&scratch).unwrap();
    // A fixed seed, so a run is repeatable; TESSERA_TEST_SCHEMATHESIS_SEED explores.
    let seed = std::env::var("TESSERA_TEST_SCHEMATHESIS_SEED").unwrap_or("20261207".into());
    let out = tokio::task::spawn_blocking({
        let base = app.base.clone();
        let scratch = scratch.clone();
        move || {
            Command::new(program)
                .current_dir(&scratch)
                .arg("--config-file")
                .arg(format!("{manifest}/tests/schemathesis/schemathesis.toml"))
                .arg("run")
                .arg(format!("{manifest}/docs/openapi.json"))
                .args(["--url", &base, "-c", "all", "--max-examples", "25"])
                .args(["--seed", &seed, "--no-color"])
                .env("PYTHONPATH", format!("{manifest}/tests/schemathesis"))
                .env("SCHEMATHESIS_HOOKS", "hooks")
                .env("TESSERA_ST_BASE", &base)
                .env("TESSERA_ST_EMAIL", &email)
                .env("TESSERA_ST_PASSWORD", PASSWORD)
                .env("TESSERA_ST_CLIENT", "schemathesis:st-client-secret")
                .output()
                .expect("schemathesis runs")
        }
    })
    .await
    .unwrap();
    std::fs::remove_dir_all(&scratch).ok();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It ran: every operation of the document was tested.
    let document: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| methods.iter().filter(|m| item.get(**m).is_some()).count())
        .sum();
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "not every one of the {operations} operations was tested:\n{report}"
    );
}
