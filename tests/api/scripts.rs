//! The project's scripts leave the machine alone: `scripts/services.sh` never changes
//! an existing role or password (it makes a dedicated role instead) and starts its own
//! Redis only on loopback with a password; `scripts/test-databases.sh` removes only the
//! databases of its own run, or of runs that are over.
//!
//! The PostgreSQL case runs against a throwaway cluster that the test makes with
//! `initdb` on a free port, where role `postgres` has a password of its own: it needs
//! root (to act as the postgres OS account) and PostgreSQL's server binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::Connection;

use crate::helpers::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/services.sh` with `env`, without the suite's own service variables.
fn services(env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg("scripts/services.sh")
        .current_dir(repo())
        .env_remove("TESSERA_TEST_POSTGRES")
        .env_remove("TESSERA_TEST_REDIS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sh(script: &str) -> Output {
    Command::new("bash").arg("-c").arg(script).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A PostgreSQL cluster of the test's own, stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    pg_ctl: PathBuf,
    port: u16,
}

impl Cluster {
    /// `None` (with the reason printed) where one cannot be made here.
    fn start(postgres_password: &str) -> Option<Cluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()?;
        if !sh("[ \"$(id -u)\" = 0 ] && id postgres").status.success() {
            return None;
        }
        let dir = temp_dir("tessera-scripts-pg");
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, postgres_password).unwrap();
        let port = free_port();
        let data = dir.join("data");
        let run = |cmd: String| {
            let out = sh(&format!(
                "chown -R postgres {d} && su postgres -c {q}",
                d = dir.display(),
                q = shell_quote(&cmd)
            ));
            assert!(out.status.success(), "{cmd}: {}", text(&out));
        };
        run(format!(
            "{}/initdb -D {} -U postgres --pwfile={} --auth-host=scram-sha-256 --auth-local=peer >/dev/null",
            bin.display(),
            data.display(),
            pwfile.display()
        ));
        run(format!(
            "{}/pg_ctl -D {} -l {}/log -w -o '-p {port} -k /var/run/postgresql -c listen_addresses=127.0.0.1' start >/dev/null",
            bin.display(),
            data.display(),
            dir.display()
        ));
        Some(Cluster {
            dir,
            pg_ctl: bin.join("pg_ctl"),
            port,
        })
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let cmd = format!(
            "{} -D {}/data -m immediate stop >/dev/null",
            self.pg_ctl.display(),
            self.dir.display()
        );
        sh(&format!("su postgres -c {}", shell_quote(&cmd)));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

async fn logs_in(url: &str) -> bool {
    sqlx::PgConnection::connect(url).await.is_ok()
}

#[tokio::test]
async fn services_never_change_an_existing_roles_password_and_make_a_dedicated_role() {
    let Some(cluster) = Cluster::start("the owners own secret") else {
        eprintln!("skipped: needs root, the postgres OS account and PostgreSQL's initdb");
        return;
    };
    let dev = temp_dir("tessera-scripts-dev");
    let env = [
        ("TESSERA_PG_PORT", cluster.port.to_string()),
        ("TESSERA_DEV_DIR", dev.display().to_string()),
    ];
    let out = services(&env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("creating the dedicated PostgreSQL role tessera_dev"),
        "{}",
        text(&out)
    );
    // The owner's password is as it was; the documented development one was not set.
    assert!(logs_in(&cluster.url("postgres", "the owners own secret")).await);
    assert!(!logs_in(&cluster.url("postgres", "postgres")).await);
    // The dedicated role works with the generated password, kept private.
    let password = std::fs::read_to_string(dev.join("postgres-password")).unwrap();
    assert!(password.len() >= 32);
    assert!(logs_in(&cluster.url("tessera_dev", &password)).await);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dev.join("postgres-password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");

    // A second run uses it as it is.
    let again = services(&env);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("using role tessera_dev"));
    assert!(!text(&again).contains("creating"));

    // An existing tessera_dev that is not ours is left alone, with a clear error.
    let other_dev = temp_dir("tessera-scripts-dev");
    let out = services(&[
        ("TESSERA_PG_PORT", cluster.port.to_string()),
        ("TESSERA_DEV_DIR", other_dev.display().to_string()),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("role tessera_dev exists"),
        "{}",
        text(&out)
    );
    assert!(logs_in(&cluster.url("tessera_dev", &password)).await);
    let _ = std::fs::remove_dir_all(dev);
    let _ = std::fs::remove_dir_all(other_dev);
}

#[tokio::test]
async fn services_start_their_own_redis_on_loopback_with_a_password() {
    if !sh("command -v redis-server && command -v redis-cli")
        .status
        .success()
    {
        eprintln!("skipped: needs redis-server and redis-cli");
        return;
    }
    let dev = temp_dir("tessera-scripts-dev");
    let own = free_port();
    let out = services(&[
        ("TESSERA_TEST_POSTGRES", postgres_base()),
        ("TESSERA_REDIS_PORT", free_port().to_string()),
        ("TESSERA_OWN_REDIS_PORT", own.to_string()),
        ("TESSERA_DEV_DIR", dev.display().to_string()),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let password = std::fs::read_to_string(dev.join("redis-password")).unwrap();
    let cli = |args: &str, auth: Option<&str>| {
        let auth = auth.map_or(String::new(), |p| format!("REDISCLI_AUTH={p} "));
        let out = sh(&format!("{auth}redis-cli -h 127.0.0.1 -p {own} {args}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let unauthenticated = cli("ping", None);
    let bind = cli("config get bind", Some(&password));
    let pong = cli("ping", Some(&password));
    cli("shutdown nosave", Some(&password));
    assert!(unauthenticated.contains("NOAUTH"), "{unauthenticated}");
    assert_eq!(pong, "PONG");
    assert!(bind.ends_with("127.0.0.1"), "{bind}");
    assert!(!Path::new(&dev.join("redis").join("dump.rdb")).exists());
    let _ = std::fs::remove_dir_all(dev);
}

#[tokio::test]
async fn the_test_script_removes_only_its_own_runs_databases_and_those_of_runs_that_are_over() {
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_base()))
        .await
        .unwrap();
    // A run that is over: a process that has exited. A live run: this test process.
    let mut child = Command::new("true").spawn().unwrap();
    let over = child.id();
    child.wait().unwrap();
    let live = std::process::id();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let names = [
        format!("tessera_test_r{over}_{suffix}"),
        format!("tessera_test_r{live}_{suffix}"),
    ];
    for name in &names {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let exists = |name: String| {
        let url = format!("{}/postgres", postgres_base());
        async move {
            let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            )
            .bind(name)
            .fetch_one(&mut db)
            .await
            .unwrap()
        }
    };
    let drop_them = |which: &str, run: String| {
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source scripts/test-databases.sh && drop_test_databases {which}"
            ))
            .current_dir(repo())
            .env("TESSERA_TEST_RUN", run)
            .env("TESSERA_TEST_POSTGRES", postgres_base())
            .output()
            .unwrap()
    };
    // Another run's cleanup of stale databases takes the finished run's only.
    let out = drop_them("stale", "r1".into());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !exists(names[0].clone()).await,
        "a finished run's database stays"
    );
    assert!(
        exists(names[1].clone()).await,
        "a live run's database was dropped"
    );
    // Another run's own cleanup leaves it too; its own run's removes it.
    drop_them("own", "r1".into());
    assert!(exists(names[1].clone()).await);
    drop_them("own", format!("r{live}"));
    assert!(!exists(names[1].clone()).await);
}
